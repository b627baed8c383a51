"""`--method auto` (docs/ABLATION.md, step 6): statistics of the text and of the self-written windows kept apart in
one pass, eight plans scored on held-out windows, the pick by a fixed rule; checked on planted structures."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from conftest import char_tokenizer, make
from test_tradeoff import ANIMALS, NUMBERS

from moeprune import api
from moeprune.arch import MoePruneError, decoder_layers, moe_layout
from moeprune.calibration import collect
from moeprune.checkpoint import load
from moeprune.cli import main
from moeprune.selfcalib import combine
from moeprune.report import tradeoff_table
from moeprune.tradeoff import (AUTO_METHODS, AUTO_STATS, SELF_GROUP, WORST_WINDOW, auto_choose, auto_label, auto_plans,
                               auto_stats, pick, summary)
from moeprune.tiny import tiny_model

RARE = 7            # the expert only the model's own text reaches
OWN = 64            # token ids >= OWN: what the model writes and the calibration text (characters, ids < 49) lacks
PREDICTED = [200, 201, 202, 203]      # after one of its own tokens, with RARE's output, the model writes these


@pytest.fixture
def calib(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    (folder / "animals.txt").write_text("\n\n".join(ANIMALS * 3) + "\n")
    (folder / "numbers.txt").write_text("\n\n".join(NUMBERS * 3) + "\n")
    return folder


def own_text_model():
    """One layer, 8 experts, top-2. The text's tokens (ids < OWN) route among experts 0-6 and never to RARE;
    the model's own tokens (ids >= OWN) always route to RARE, whose output (hidden coordinate 5, written by no
    other expert) is what the head reads to predict PREDICTED after them. So the model, sampled, writes mostly
    PREDICTED; dropping RARE makes its own text ~64x less predictable and leaves the text's perplexity as it was."""
    model = tiny_model("mixtral", num_hidden_layers=1)
    layer = moe_layout(model).layers[0]
    d, inner = model.config.hidden_size, model.config.intermediate_size
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        emb = torch.zeros(256, d)
        emb[:OWN, 1] = 1.0
        emb[:OWN, 6:] = torch.randn(OWN, d - 6, generator=g) * 0.3
        emb[OWN:, 0] = 1.0
        model.model.embed_tokens.weight.copy_(emb)
        decoder_layers(model)[0].self_attn.o_proj.weight.zero_()        # the MoE sees the token's own embedding
        router = layer.router.weight
        router.zero_()
        router[:RARE, 6:] = torch.randn(RARE, d - 6, generator=g)
        router[RARE, 0], router[RARE, 1] = 10.0, -10.0
        experts = layer.experts
        experts.down_proj[:, 5, :] = 0.0                                # no other expert writes coordinate 5
        experts.gate_up_proj[RARE].zero_()
        experts.gate_up_proj[RARE, 0, 0] = experts.gate_up_proj[RARE, inner, 0] = 1.0
        experts.down_proj[RARE].zero_()
        experts.down_proj[RARE, 5, 0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[PREDICTED, 5] = 1.0
    return model


def test_the_self_written_windows_decide_what_the_text_cannot_see(calib):
    model, tok = own_text_model(), char_tokenizer()
    measured = auto_stats(model, tok, str(calib), samples=16, seq_len=32, sample_tokens=128)
    assert (measured["held_own"][:, 1:] >= OWN).float().mean() > 0.7        # the model writes its own tokens
    assert float(measured["text"].layers[0].counts[RARE]) == 0               # the text never reaches RARE
    assert float(measured["text+self"].layers[0].counts[RARE]) > 0
    result = auto_choose(model, tok, measured, keep=4)
    rows, plans = result["rows"], result["plans"]
    assert list(rows) == [auto_label(m, k) for k in AUTO_STATS for m, _ in AUTO_METHODS]
    keeps_rare = {label: RARE in plan.layers[0].representatives for label, plan in plans.items()}
    assert not keeps_rare[auto_label("frequency", "text")] and keeps_rare[auto_label("frequency", "text+self")]
    # the held-out self-written windows see the loss; the held-out text cannot tell the plans apart
    for label, row in rows.items():
        own = row["ratio"][SELF_GROUP]
        assert own < 1.05 if keeps_rare[label] else own > 5.0, (label, own)
        assert all(abs(r - 1.0) < 0.01 for g, r in row["held"].items() if not g.startswith(SELF_GROUP)), (label, row)
        assert len([g for g in row["held"] if g.startswith(SELF_GROUP)]) == 4       # every held-out window
    assert keeps_rare[result["chosen"]] and keeps_rare[pick(rows, windows="worst")]
    text_groups = [g for g in rows[result["chosen"]]["held"] if not g.startswith(SELF_GROUP)]
    assert not keeps_rare[pick(rows, groups=text_groups)]          # scored on the text alone, the first plan wins


def test_combined_statistics_are_the_sums_of_one_pass():
    """The two sums kept apart add up to what one pass over all the windows counts; the samples are joined."""
    model = make("qwen2_moe")
    layout = moe_layout(model)
    text = torch.randint(3, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    own = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    a = collect(model, layout, text, sample_tokens=20, progress=False)
    b = collect(model, layout, own, sample_tokens=12, progress=False)
    whole = collect(model, layout, torch.cat([text, own]), sample_tokens=8, progress=False)
    both = combine(a, b)
    for i, ls in both.layers.items():
        assert ls.tokens == whole.layers[i].tokens == 80
        for name in ("counts", "prob_sum", "weight_sum", "reap_sum"):
            assert torch.allclose(getattr(ls, name), getattr(whole.layers[i], name), rtol=1e-5, atol=1e-6), name
        assert ls.outputs.shape[1] == ls.logits.shape[0] == ls.inputs.shape[0] == 32
        assert torch.equal(ls.outputs[:, :20], a.layers[i].outputs) and torch.equal(ls.logits[20:], b.layers[i].logits)
        assert torch.equal(ls.cache["similarity/cka/weight"], a.layers[i].cache["similarity/cka/weight"])
        assert "similarity/cka/output" not in ls.cache              # derived again from the joined sample
    assert both.calibration["samples"] == 5


def test_a_candidate_whose_method_refuses_the_model_is_left_out():
    """Statistics without a routing rule (a router no rule reproduces, or statistics older than the rules): NAEE
    refuses them, so auto leaves its two NAEE plans out with a warning naming why and plans the other six; the
    trade-off table says what was left out."""
    model = make("qwen2_moe")
    layout = moe_layout(model)
    ids = torch.randint(3, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    stats = collect(model, layout, ids, sample_tokens=20, progress=False)
    for ls in stats.layers.values():
        ls.routing = {}
    with pytest.warns(UserWarning, match=r"auto leaves out naee \(text\): naee replays the router's top-k routing"):
        plans = auto_plans(stats, stats, keep=4, seed=0)
    assert sorted(plans) == sorted(auto_label(name, which) for which in AUTO_STATS for name, _ in AUTO_METHODS
                                   if name != "naee")
    reap = {"ratio": {"a": 1.01, "b": 1.02}, "mean": 1.015, "worst": {"domain": "b", "ratio": 1.02}}
    table = tradeoff_table({"chosen": "reap (text)", "rows": {"reap (text)": reap},
                            "left_out": {"naee (text)": "layer 0: no rule"}})
    assert table.endswith("Left out: naee (text), whose method refuses this model (layer 0: no rule).")


def row(**ratio):
    return {"ratio": ratio}


def test_the_pick_rule():
    # means 1.15, 1.125, 1.175: only b is within 2% of the lowest, whatever a's better worst group
    assert pick({"a": row(x=1.00, y=1.30), "b": row(x=1.05, y=1.20), "c": row(x=1.10, y=1.25)}) == "b"
    rows = {"a": row(x=1.00, y=1.20), "b": row(x=1.10, y=1.12), "c": row(x=1.05, y=1.16)}
    assert pick(rows) == "b"                          # means 1.10-1.11, all eligible: b's worst group is lowest
    assert pick(rows, within=0.0) == "a"              # only the lowest mean is eligible
    assert pick(rows, groups=["x"]) == "a"            # scored on x alone
    assert pick({"a": row(x=1.1), "b": row(x=1.1)}) == "a"          # ties: the earlier row
    # a domain in one self-written window of four: averaged away in the group, seen window by window
    w = {"a": row(x=1.05, **{f"{SELF_GROUP} {k}": r for k, r in enumerate([1.0, 1.0, 1.0, 1.30])}),
         "b": row(x=1.08, **{f"{SELF_GROUP} {k}": r for k, r in enumerate([1.02, 1.02, 1.02, 1.04])})}
    assert summary(w["a"]["ratio"])["ratio"][SELF_GROUP] == pytest.approx(1.30 ** 0.25)
    assert summary(w["a"]["ratio"])["worst"] == {"domain": SELF_GROUP, "ratio": pytest.approx(1.30 ** 0.25)}
    assert summary(w["a"]["ratio"], "worst")["worst"] == {"domain": WORST_WINDOW, "ratio": 1.30}
    assert pick(w, windows="group") == "a" and pick(w, windows="worst") == "b"
    assert pick(w, groups=["x"]) == "a" and pick(w, groups=["x", SELF_GROUP], windows="worst") == "b"
    with pytest.raises(ValueError):
        summary(w["a"]["ratio"], "each")
    with pytest.raises(ValueError):
        pick({})


def test_cli_auto_writes_the_plan_the_in_memory_rule_chooses(calib, tmp_path):
    """The per-layer engine's two passes give the in-memory rule's rows and choice, and the written checkpoint is the
    chosen plan; every candidate's plan is saved under tradeoff/."""
    folder = tmp_path / "model"
    own_text_model().save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    out = tmp_path / "out"
    assert main(["prune", str(folder), "--method", "auto", "--keep", "4", "--calib", str(calib), "--samples", "16",
                 "--seq-len", "32", "--sample-tokens", "128", "--out", str(out), "--no-eval", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    loaded = load(str(folder))
    result = auto_choose(loaded.model, loaded.tokenizer,
                         auto_stats(loaded.model, loaded.tokenizer, str(calib), samples=16, seq_len=32,
                                    sample_tokens=128), keep=4)
    assert plan["method"] == "auto" and plan["options"]["chosen"] == report["tradeoff"]["chosen"] == result["chosen"]
    for label, r in result["rows"].items():
        for group, value in r["held"].items():
            assert math.isclose(report["tradeoff"]["rows"][label]["held"][group], value, rel_tol=1e-4), (label, group)
        assert report["tradeoff"]["rows"][label]["ratio"].keys() == r["ratio"].keys()
        assert (out / report["tradeoff"]["rows"][label]["plan"]).exists()
    assert plan["layers"]["0"]["groups"] == result["plans"][result["chosen"]].layers[0].groups
    assert RARE in plan["layers"]["0"]["representatives"]


@pytest.mark.parametrize("given, options, message", [({"report_tradeoff": True}, {}, "--report-tradeoff"),
                                                     ({}, {"diversity": 0.5}, "method options"),
                                                     ({"calib": "random"}, {}, "held-out calibration text")])
def test_auto_refuses_what_it_cannot_do(calib, given, options, message):
    cfg = {"model": "tiny:mixtral", "method": "auto", "keep": 4, "calib": str(calib), "samples": 8, "seq_len": 16,
           "quiet": True, "no_eval": True, **given}
    with pytest.raises(MoePruneError, match=message):
        api.prune(api.PruneConfig(**cfg), **options)


def test_the_default_is_auto_where_it_can_run(calib, tmp_path):
    """No --method: auto when there is calibration text to hold some of out and the model writes windows of its own;
    diverse where auto cannot run (random tokens, a model without a tokenizer), where the model writes none
    (--self-calib 0, or too large to sample here) or the options name another method's world (method options,
    --stats-cache, --report-tradeoff); --method auto where it cannot run is an error, not a fallback."""
    folder = tmp_path / "model"
    own_text_model().save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    common = {"keep": 4, "samples": 16, "seq_len": 32, "sample_tokens": 128, "quiet": True, "no_eval": True}
    chosen = api.prune(api.PruneConfig(model=str(folder), calib=str(calib), **common))
    assert chosen.plan.method == "auto" and RARE in chosen.plan.layers[0].representatives
    # where auto cannot run, a warning says why (the options that name another method's world need none)
    for given, options, why in (({"calib": "random"}, {}, "--calib random is no text"),
                                ({"calib": str(calib)}, {"diversity": 0.5}, None),
                                ({"calib": str(calib), "self_calib": 0.0}, {}, "writes no calibration windows"),
                                ({"calib": str(calib), "stats_cache": str(tmp_path / "cache")}, {}, None),
                                ({"calib": str(calib), "report_tradeoff": True}, {}, None)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = api.prune(api.PruneConfig(model=str(folder), **given, **common), **options)
        said = [str(w.message) for w in caught if "the default method auto" in str(w.message)]
        assert result.plan.method == "diverse", given
        assert (said == []) if why is None else (len(said) == 1 and why in said[0] and said[0].endswith(
            "pruning with diverse")), (given, said)
    with pytest.warns(UserWarning, match="the default method auto .* but the model folder has no tokenizer files"):
        assert api.prune(api.PruneConfig(model="tiny:mixtral", **common)).plan.method == "diverse"
    with pytest.raises(MoePruneError, match="held-out calibration text"):
        api.prune(api.PruneConfig(model="tiny:mixtral", method="auto", **common))
