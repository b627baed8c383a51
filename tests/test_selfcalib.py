"""Self-calibration: windows the model writes itself cover what the calibration text lacks."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from test_streaming import write_hub_folder

from moeprune import api
from moeprune.arch import MoePruneError, decoder_layers, moe_layout
from moeprune.calibration import collect
from moeprune.checkpoint import load
from moeprune.sources import CheckpointSource, ModelSource
from moeprune.methods import get_method
from moeprune.selfcalib import mixed_windows, resolve_share, sample_windows, start_token, windows_for
from moeprune.tiny import tiny_model

RARE = 7            # the expert only the "unseen domain" (tokens below 128) routes to


def planted_model():
    """One layer, 8 experts, top-2. Tokens < 128 (domain A) route to expert RARE and to no other on purpose;
    tokens >= 128 (domain B) spread over experts 0-6 and never reach RARE. The head is zero, so the model
    writes every token equally often: half of what it writes is domain A."""
    model = tiny_model("mixtral", num_hidden_layers=1)
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        emb = torch.zeros(256, d)
        emb[:128, 0] = 1.0
        emb[128:, 1] = 1.0
        emb[128:, 2:] = torch.randn(128, d - 2, generator=g) * 0.3
        model.model.embed_tokens.weight.copy_(emb)
        decoder_layers(model)[0].self_attn.o_proj.weight.zero_()         # the MoE sees the token's own embedding
        router = moe_layout(model).layers[0].router.weight
        router.zero_()
        router[:RARE, 2:] = torch.randn(RARE, d - 2, generator=g)
        router[RARE, 0], router[RARE, 1] = 10.0, -10.0
        model.lm_head.weight.zero_()
    return model


def test_a_domain_only_the_model_writes_keeps_its_expert():
    model = planted_model()
    layout = moe_layout(model)
    text = torch.randint(128, 256, (16, 32), generator=torch.Generator().manual_seed(1))     # domain B only
    mixed = mixed_windows(lambda n: text[:n], ModelSource(model), start_token(model.config, None), 0.5, 16, 32,
                          seed=0, progress=False)
    assert mixed.shape == (16, 32) and torch.equal(mixed[:8], text[:8])
    assert (mixed[8:, 1:] < 128).float().mean() > 0.3           # the model writes domain A too
    for method in ("frequency", "diverse"):
        kept = {}
        for name, ids in (("text", text), ("self", mixed)):
            stats = collect(model, layout, ids, sample_tokens=256, progress=False)
            kept[name] = get_method(method).plan(stats, 4).layers[0].representatives
        assert RARE not in kept["text"], (method, kept)
        assert RARE in kept["self"], (method, kept)


def test_sampling_is_seeded_and_follows_the_model():
    model = tiny_model("mixtral")
    a = sample_windows(model, 1, 3, 20, seed=5, progress=False)
    assert a.shape == (3, 20) and (a[:, 0] == 1).all()
    assert torch.equal(a, sample_windows(model, 1, 3, 20, seed=5, progress=False))
    assert not torch.equal(a, sample_windows(model, 1, 3, 20, seed=6, progress=False))
    # the second token of every window is drawn from the model's next-token distribution after the start token
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)                     # a peaked distribution
        p = torch.softmax(model(input_ids=torch.tensor([[1]])).logits[0, -1].double(), dim=-1)
    n = 3000
    drawn = sample_windows(model, 1, n, 2, seed=0, progress=False)[:, 1]
    top = int(p.argmax())
    assert p[top] > 0.2
    assert abs(float((drawn == top).double().mean() - p[top])) < 4 * float((p[top] * (1 - p[top]) / n).sqrt())


def test_a_streamed_checkpoint_writes_the_same_windows_and_is_released(tmp_path):
    src = write_hub_folder(tmp_path / "src", "mixtral", dtype=torch.float32, shard="40KB")
    in_memory = sample_windows(load(str(src)).model, 1, 4, 12, seed=0, progress=False)
    source = CheckpointSource(src, "cpu", torch.float32)
    with source.whole() as model:
        streamed = sample_windows(model, 1, 4, 12, seed=0, progress=False)
    assert torch.equal(in_memory, streamed)
    assert all(p.is_meta for p in source.model.parameters())                # every weight handed back
    assert not source.model.model.rotary_emb.inv_freq.is_meta                # the rotary tables stay


def test_share_is_checked_and_a_model_too_large_falls_back_with_a_warning(tmp_path):
    with pytest.raises(MoePruneError, match="between 0 and 1"):
        windows_for(1.5, 64)
    assert windows_for(0.5, 64) == 32 and windows_for(1.0, 64) == 64
    source = ModelSource(tiny_model("mixtral"))
    assert resolve_share(None, source, 1) == (0.5, None)
    assert resolve_share(0.25, source, 1) == (0.25, None)
    with pytest.warns(UserWarning, match="no BOS"):
        assert resolve_share(None, source, None)[0] == 0.0
    with pytest.raises(MoePruneError, match="BOS"):
        resolve_share(0.5, source, None)
    source.weight_bytes = lambda: 2**50                     # a petabyte model: does not fit anywhere
    with pytest.warns(UserWarning, match="does not fit"):
        share, why = resolve_share(None, source, 1)
    assert share == 0.0 and "does not fit" in why
    with pytest.raises(MoePruneError, match="--self-calib 0"):
        resolve_share(0.5, source, 1)


def test_prune_mixes_self_written_windows_by_default_and_says_so(tmp_path):
    src = write_hub_folder(tmp_path / "src", "mixtral", dtype=torch.float32)

    def run(out, **kw):
        api.prune(api.PruneConfig(model=str(src), method="frequency", keep=4, out=str(tmp_path / out), calib="random",
                                  samples=8, seq_len=16, quiet=True, no_eval=True, **kw))
        weights = b"".join(f.read_bytes() for f in sorted((tmp_path / out).glob("*.safetensors")))
        return weights, json.loads((tmp_path / out / "report.json").read_text())
    a, report = run("a")
    assert report["calibration"]["self_calib"] == 0.5
    b, _ = run("b")
    c, report_c = run("c", self_calib=0.0)
    assert a == b                                           # seeded: the same command gives the same checkpoint
    assert report_c["calibration"]["self_calib"] == 0.0
    assert a != c
    assert "self_calib = 0.5" in (tmp_path / "a" / "report.md").read_text()


def test_a_model_that_does_not_fit_is_pruned_on_the_text_and_the_report_says_why(tmp_path, monkeypatch):
    from moeprune import selfcalib
    src = write_hub_folder(tmp_path / "src", "mixtral", dtype=torch.float32)
    monkeypatch.setattr(selfcalib, "FITS", 1e-12)          # as if the machine had almost no free memory
    with pytest.warns(UserWarning, match="does not fit"):
        api.prune(api.PruneConfig(model=str(src), method="frequency", keep=4, out=str(tmp_path / "out"),
                                  calib="random", samples=8, seq_len=16, quiet=True, no_eval=True))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["calibration"]["self_calib"] == 0.0 and "does not fit" in report["calibration_note"]
    assert "No window was written by the model: the whole model" in (tmp_path / "out" / "report.md").read_text()


def test_text_the_model_wrote_elsewhere_serves_a_model_that_does_not_fit(tmp_path, monkeypatch):
    from moeprune import selfcalib
    src = write_hub_folder(tmp_path / "src", "mixtral", dtype=torch.float32)
    (tmp_path / "self.jsonl").write_text("\n".join(json.dumps({"text": f"question {i}: what is {i} + {i}? answer: "
                                                                       f"{2 * i}."}) for i in range(300)))
    (tmp_path / "mine.txt").write_text("\n\n".join(f"the cat sat on mat number {i}." for i in range(300)))
    monkeypatch.setattr(selfcalib, "FITS", 1e-12)          # too large to sample from here
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # no "does not fit" fallback: the text is given
        api.prune(api.PruneConfig(model=str(src), method="frequency", keep=4, out=str(tmp_path / "out"),
                                  calib=str(tmp_path / "mine.txt"), self_text=str(tmp_path / "self.jsonl"),
                                  samples=8, seq_len=16, quiet=True, no_eval=True))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["calibration"]["self_calib"] == 0.5 and report["calibration"]["self_text"].endswith("self.jsonl")
    assert "cut from" in (tmp_path / "out" / "report.md").read_text()
    # the self-written share comes from the text written elsewhere, and nothing is sampled (no source given)
    windows = mixed_windows(lambda n: torch.full((n, 16), 5), None, None, 0.5, 8, 16, 0, False,
                            self_windows=lambda n: torch.full((n, 16), 7))
    assert torch.equal(windows, torch.cat([torch.full((4, 16), 5), torch.full((4, 16), 7)]))


def test_self_text_that_does_not_exist_is_refused_before_any_work(tmp_path):
    with pytest.raises(MoePruneError, match="nothing.jsonl"):
        api.prune(api.PruneConfig(model="tiny:mixtral", keep=4, self_text=str(tmp_path / "nothing.jsonl"),
                                  no_eval=True))


def test_self_text_needs_a_tokenizer_and_says_so(tmp_path):
    (tmp_path / "self.txt").write_text("some text the model wrote")
    with pytest.raises(MoePruneError, match="needs tokenizer files"):
        api.prune(api.PruneConfig(model="tiny:mixtral", keep=4, out=str(tmp_path / "out"),
                                  self_text=str(tmp_path / "self.txt"), no_eval=True, quiet=True))
    assert not (tmp_path / "out").exists()
