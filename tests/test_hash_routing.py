"""DeepSeek-V4's hash layers choose their experts by token id (DeepseekV4HashRouter: tid2eid[input_ids], a
[vocab, top_k] table saved in the checkpoint) and weight them by the learned gate's sqrt(softplus) scores; its later
layers route by top-k of those scores plus a correction bias.

Pruning rewrites the table: a token whose row names a merged expert goes to its group's slot, one that names a
dropped expert to the slot of the kept expert whose output is nearest its own on the calibration sample (the plan
records where, info["hash_slots"]). The statistics count the table's choices, and NAEE replays them (a dropped
expert's to that same stand-in): what the pruned model computes."""

from __future__ import annotations

import copy
import json

import pytest
import test_layer_inputs  # the tiny DeepSeek-V4: hash layers 0, 1; top-k layers 2, 3; 4 experts
import torch
from conftest import calibrated, pruned_copy
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import moeprune.methods  # noqa: F401  registers the methods
from moeprune.arch import FAMILIES, MoePruneError, discovered_family, moe_layout
from moeprune.cli import main
from moeprune.discover import SCORINGS, _probe_scoring, check_contract, find_moe
from moeprune.methods.naee import Reconstruction
from moeprune.methods.registry import METHODS
from moeprune.plan import LayerPlan, Plan
from moeprune.routing import output_distance, restricted_routing

torch.set_num_threads(1)
KEPT = [0, 2, 3]


def deepseek_v4():
    model = test_layer_inputs.build("deepseek_v4", attn="eager")
    with torch.no_grad():                   # a live correction bias (zero when built): the choice is not the scores'
        for layer in model.model.layers[2:]:
            bias = layer.mlp.gate.e_score_correction_bias
            bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(7)) * 0.3)
    return model




def by_expert(weights: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = indices.argsort(dim=-1, stable=True)
    return weights.gather(1, order).double(), indices.gather(1, order)


def test_the_family_entry_states_what_structure_cannot_tell():
    """Structure finds the block, router, experts and shared expert; the entry adds what it cannot tell: the hash
    routers take the token ids (the contract check names them), the first MoE layer (hash) lacks the correction
    bias the later routers hold, and the skeleton guesses softmax where the routers score by sqrt(softplus)."""
    model = deepseek_v4()
    entry, s = FAMILIES["deepseek_v4"], find_moe(model)
    found = discovered_family(s)
    for name in ("block", "router", "experts", "shared", "gate_up", "top_k_field", "n_experts_field"):
        assert getattr(found, name) == getattr(entry, name), name
    assert "input_ids" in " ".join(check_contract(s, model).differences)
    names = [{t.name for t in layer.router_tensors} for layer in s.layers]
    assert names == [{"weight"}] * 2 + [{"weight", "e_score_correction_bias"}] * 2
    assert found.router_tensors != entry.router_tensors
    with torch.device("meta"):
        skeleton = type(model)._from_config(copy.deepcopy(model.config))
    assert discovered_family(find_moe(skeleton)).scoring != entry.scoring == "sqrtsoftplus"
    assert _probe_scoring(model.model.layers[2].mlp.gate, 64, 4) == "sqrtsoftplus"     # what a top-k router shows
    layout = moe_layout(model)
    assert [m.hash_table is not None for m in layout.layers] == [True, True, False, False]
    with pytest.raises(MoePruneError, match="token id"):
        layout.layers[0].route(torch.randn(3, 64))


def test_statistics_count_the_tables_choices():
    """The observer reads the hash routers' decisions as the block asks for them (hidden states and input_ids): the
    counts are the table's rows of the calibration tokens, and the rule records those choices with the scoring
    that weights them; the top-k layers' rule is read off their routers (sqrt(softplus), correction bias)."""
    model = deepseek_v4()
    ids = test_layer_inputs.tokens(3, seed=3)
    layout, stats = calibrated(model, ids)
    E, flat = 4, ids.flatten()
    for m in layout.layers:
        ls = stats.layers[m.index]
        assert torch.allclose(ls.prob_sum, SCORINGS["sqrtsoftplus"](ls.logits.double()).sum(0), rtol=1e-5)
        if m.hash_table is None:
            assert ls.routing["select"] == "topk" and ls.routing["scoring"] == "sqrtsoftplus"
            assert ls.routing["correction_bias"] is not None and ls.routing["renormalize"]
            continue
        chosen = m.hash_table[flat]
        assert torch.equal(ls.counts, torch.bincount(chosen.flatten(), minlength=E).double())
        assert ls.routing["select"] == "hash" and ls.routing["chosen"] == chosen.tolist()
        assert ls.routing["scoring"] == "sqrtsoftplus" and ls.routing["renormalize"]
        assert ls.routing["scale"] == pytest.approx(model.config.routed_scaling_factor)


def test_replayed_routing_is_the_pruned_models_and_naee_scores_it():
    """A selection that drops expert 1: the routing replayed from the statistics (what NAEE scores) is the pruned
    model's own, hash layers (the table rewritten, a dropped expert's tokens on its stand-in) and top-k layers alike;
    NAEE's reconstruction error of the subset is the pruned block's squared error on the sample."""
    model = deepseek_v4()
    ids = test_layer_inputs.tokens(3, seed=3)
    layout, stats = calibrated(model, ids)
    plan = Plan("test", {}, {m.index: LayerPlan.selection(4, KEPT) for m in layout.layers})
    pruned = pruned_copy(model, plan, stats)
    after, flat, k = moe_layout(pruned).by_index(), ids.flatten(), layout.top_k
    for m in layout.layers:
        ls, p = stats.layers[m.index], after[m.index]
        x = ls.inputs
        distance = output_distance(ls.outputs.split(64, dim=1))
        token_ids = flat if m.hash_table is not None else None
        logits, w, i = m.route(x, token_ids)
        w2, i2 = restricted_routing(logits, range(4), ls.routing, k, distance)
        (w, i), (w2, i2) = by_expert(w, i), by_expert(w2, i2)
        assert torch.equal(i, i2) and torch.allclose(w, w2, rtol=1e-4, atol=1e-6)
        _, w, local = p.route(x, token_ids)
        w, i = by_expert(w, torch.tensor(KEPT)[local])
        w2, i2 = by_expert(*restricted_routing(logits, KEPT, ls.routing, k, distance))
        assert torch.equal(i, i2) and torch.allclose(w, w2, rtol=1e-4, atol=1e-6), m.index
        if m.hash_table is not None:
            assert (m.hash_table[flat] == 1).any()              # the dropped expert was chosen: stand-ins used
            assert p.hash_table.shape == m.hash_table.shape and int(p.hash_table.max()) < len(KEPT)
            with pytest.raises(MoePruneError, match="token id"):
                restricted_routing(logits, KEPT, ls.routing, k)       # no distance: the stand-in is unknown
        with torch.no_grad():
            _, wf, jf = m.route(x, token_ids)
            full = m.experts(x, jf, wf.to(x.dtype))
            _, ws, js = p.route(x, token_ids)
            real = float((full - p.experts(x, js, ws.to(x.dtype))).double().square().sum())
        assert Reconstruction(ls)(tuple(KEPT)) == pytest.approx(real, rel=1e-4, abs=1e-8), m.index


def test_tid2eid_rewrite_on_a_planted_table(tmp_path):
    """Layer 0's table planted by hand (token t -> experts t % 4, (t + 1) % 4) and expert 3 made a near copy of
    expert 1: merging {0, 2} into slot 0, keeping 1 in slot 1 and dropping 3 sends 0 and 2 to slot 0, 1 and 3 (its
    nearest kept expert, not the lowest id) to slot 1. The table keeps its shape and dtype; the plan records the
    slots, so the saved plan applies again without statistics to the same table; without them it is refused."""
    model = deepseek_v4()
    router, experts = model.model.layers[0].mlp.gate, model.model.layers[0].mlp.experts
    t = torch.arange(router.tid2eid.shape[0])
    with torch.no_grad():
        router.tid2eid.copy_(torch.stack([t % 4, (t + 1) % 4], dim=1))
        for p in (experts.gate_up_proj, experts.down_proj):
            p[3] = p[1] + 1e-3 * torch.randn(p[1].shape, generator=torch.Generator().manual_seed(0))
    layout, stats = calibrated(model, test_layer_inputs.tokens(2, seed=4))
    merge = LayerPlan(4, [[0, 2], [1]], [[0.5, 0.5], [1.0]], [0, 1])
    plan = Plan("test", {}, {m.index: copy.deepcopy(merge) for m in layout.layers})
    pruned = pruned_copy(model, plan, stats)
    table = pruned.model.layers[0].mlp.gate.tid2eid
    assert table.shape == router.tid2eid.shape and table.dtype == torch.long
    assert torch.equal(table, torch.tensor([0, 1, 0, 1])[router.tid2eid])
    assert plan.layers[0].info["hash_slots"] == [0, 1, 0, 1]
    assert "hash_slots" not in plan.layers[2].info                    # a top-k layer has no table
    with torch.no_grad():
        assert torch.isfinite(pruned(input_ids=test_layer_inputs.tokens(1), use_cache=False).logits).all()
    plan.save(tmp_path / "plan.json")
    again = pruned_copy(model, Plan.load(tmp_path / "plan.json"))                  # no statistics
    for a, b in zip(again.model.layers[:2], pruned.model.layers[:2]):
        assert torch.equal(a.mlp.gate.tid2eid, b.mlp.gate.tid2eid)
    bare = Plan("test", {}, {m.index: copy.deepcopy(merge) for m in layout.layers})
    with pytest.raises(MoePruneError, match="drops experts \\[3\\]"):
        pruned_copy(model, bare)
    wrong = Plan.load(tmp_path / "plan.json")
    wrong.layers[0].info["hash_slots"] = [1, 1, 0, 1]                   # expert 0 is in slot 0's group
    with pytest.raises(MoePruneError, match="hash_slots"):
        pruned_copy(model, wrong)
    keep_all = Plan("test", {}, {m.index: LayerPlan.selection(4, range(4)) for m in layout.layers})
    same = pruned_copy(model, keep_all)                                  # nothing dropped: no statistics needed
    assert torch.equal(same.model.layers[0].mlp.gate.tid2eid, router.tid2eid)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_prunes_deepseek_v4(method):
    """Every registered method plans the tiny DeepSeek-V4 at keep 2 of 4; the pruned model's tables name slots
    0..1 only and it runs."""
    model = deepseek_v4()
    layout, stats = calibrated(model, test_layer_inputs.tokens(2, seed=5))
    plan = METHODS[method].plan(stats, keep=2, seed=0)
    pruned = pruned_copy(model, plan, stats)
    for m in moe_layout(pruned).layers:
        assert m.num_experts == 2
        if m.hash_table is not None:
            assert m.hash_table.shape == (model.config.vocab_size, 2) and int(m.hash_table.max()) <= 1
            assert len(plan.layers[m.index].info["hash_slots"]) == 4
    with torch.no_grad():
        assert torch.isfinite(pruned(input_ids=test_layer_inputs.tokens(1), use_cache=False).logits).all()


def test_multi_token_prediction_tensors_are_left_out(tmp_path, capsys):
    """DeepSeek-V4 checkpoints ship their multi-token-prediction layer as mtp.* tensors, which transformers' loader
    drops by name (_keys_to_ignore_on_load_unexpected): the prune leaves them out (their experts were not pruned),
    says so, and writes num_nextn_predict_layers 0; the output loads cleanly. Another unknown tensor is refused."""
    model = deepseek_v4()
    src = tmp_path / "in"
    model.save_pretrained(src)
    tensors = load_file(src / "model.safetensors")
    mtp = {"mtp.0.ffn.gate.tid2eid": torch.zeros(256, 2, dtype=torch.long), "mtp.0.hc_head_fn": torch.zeros(4, 256),
           **{f"mtp.0.ffn.experts.{e}.w1.weight": torch.zeros(32, 64) for e in range(4)}}
    save_file({**tensors, **mtp}, src / "model.safetensors", metadata={"format": "pt"})
    args = ["prune", str(src), "--method", "frequency", "--keep", "2", "--calib", "random", "--samples", "2",
            "--seq-len", "16", "--self-calib", "0", "--no-eval"]
    with pytest.warns(UserWarning, match=f"{len(mtp)} tensors .* transformers does not load"):
        assert main([*args, "--out", str(tmp_path / "out")]) == 0
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert not any(k.startswith("mtp.") for k in written) and set(tensors) >= set(written)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0 and config["n_routed_experts"] == 2
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    save_file({**tensors, "extra.weight": torch.zeros(2)}, src / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "refused")]) != 0
    assert "extra.weight is not a file tensor" in capsys.readouterr().err
