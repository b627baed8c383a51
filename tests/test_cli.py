"""The CLI contract and bad input: clear messages, non-zero exits, no damage, nothing half-written."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from conftest import make
from moeprune import api
from moeprune.cli import main


@pytest.fixture
def tiny_dir(tmp_path):
    path = tmp_path / "model"
    make("mixtral").save_pretrained(path)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("cls,cfg", [(LlamaForCausalLM, LlamaConfig), (Qwen2ForCausalLM, Qwen2Config)])
def test_dense_model_is_refused(tmp_path, capsys, cls, cfg):
    path = tmp_path / "dense"
    cls(cfg(vocab_size=64, hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1,
            num_key_value_heads=1, head_dim=64)).save_pretrained(path)
    code, _, err = run(capsys, "prune", path, "--keep", 2, "--out", tmp_path / "o", "--calib", "random")
    assert code != 0 and "no MoE layers found" in err
    assert not (tmp_path / "o").exists()
    code, _, err = run(capsys, "info", path)
    assert code != 0 and "no MoE layers found" in err


@pytest.mark.parametrize("args,message", [
    (["--keep", 9], "more than the 8 experts"),
    (["--keep", 1], "below the model's top-k"),
    (["--keep", 0], "at least 1"),
    (["--ratio", 1.5], "must be in (0, 1]"),
    (["--keep", 4, "--method", "nonsense"], "unknown method 'nonsense'"),
    (["--keep", 4, "--method", "frequency", "--tau", 2.0], "does not take --tau"),
    (["--keep", 4, "--calib", "/no/such/file.txt"], "not found"),
    ([], "exactly one of --keep K or --ratio R"),
])
def test_bad_arguments(tiny_dir, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    code, _, err = run(capsys, "prune", tiny_dir, "--out", out, "--calib", "random", *args)
    assert code == 2 and message in err, err
    assert not out.exists()


def test_missing_model_path(tmp_path, capsys):
    code, _, err = run(capsys, "prune", tmp_path / "nope", "--keep", 4, "--out", tmp_path / "o")
    assert code == 2 and "not found" in err


def test_existing_out_needs_overwrite(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "prune", tiny_dir, "--keep", 4, "--out", out, "--calib", "random")
    assert code == 2 and "--overwrite" in err and (out / "keep.txt").read_text() == "mine"
    args = ("--keep", 4, "--calib", "random", "--samples", 2, "--seq-len", 16, "--overwrite", "--quiet", "--no-eval")
    # --overwrite replaces only what moeprune wrote: a folder of the user's own is never deleted
    code, _, err = run(capsys, "prune", tiny_dir, "--out", out, *args)
    assert code == 2 and (out / "keep.txt").read_text() == "mine"
    mine = tmp_path / "pruned"
    assert run(capsys, "prune", tiny_dir, "--out", mine, *args)[0] == 0
    (mine / "stale.txt").write_text("from the first run")
    code, _, _ = run(capsys, "prune", tiny_dir, "--out", mine, *args)
    assert code == 0 and not (mine / "stale.txt").exists() and (mine / "plan.json").exists()


def test_failure_mid_run_leaves_no_output(tiny_dir, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(api.CheckpointWriter, "finish", boom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        api.prune(api.PruneConfig(model=str(tiny_dir), keep=4, out=str(out), calib="random", samples=2,
                                  seq_len=16, quiet=True, no_eval=True))
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_out_inside_the_input_is_refused(tiny_dir, capsys):
    code, _, err = run(capsys, "prune", tiny_dir, "--keep", 4, "--out", tiny_dir / "pruned", "--calib", "random")
    assert code == 2 and "overlaps the input model" in err


def test_info_and_methods(tiny_dir, capsys):
    code, out, _ = run(capsys, "info", tiny_dir, "--json")
    info = json.loads(out)
    assert code == 0 and info["family"] == "mixtral" and info["experts_per_layer"] == [8] and info["top_k"] == 2
    p = info["parameters"]
    assert p["active_per_token"] == p["total"] - p["routed_experts"] + p["routed_experts"] * 2 // 8
    code, out, _ = run(capsys, "methods")
    assert code == 0 and "frequency" in out and "random" in out and out.startswith("auto ")   # the default first


def test_plan_out_and_replan_from_stats_cache(tiny_dir, tmp_path):
    cfg = dict(model=str(tiny_dir), calib="random", samples=2, seq_len=16, quiet=True, no_eval=True,
               stats_cache=str(tmp_path / "stats"))
    api.prune(api.PruneConfig(keep=6, plan_out=str(tmp_path / "p6.json"), out=str(tmp_path / "a"), **cfg))
    files = sorted((tmp_path / "stats").iterdir())
    assert [f.name for f in files] == ["layer-0.safetensors", "layer-1.safetensors", "stats.json"]
    stamps = [f.stat().st_mtime_ns for f in files]
    b = api.prune(api.PruneConfig(keep=4, **cfg))
    assert b.plan.keep_per_layer() == {0: 4, 1: 4}
    assert [f.stat().st_mtime_ns for f in files] == stamps             # re-planned from the cache, not rewritten
    # applying a saved plan again gives the same checkpoint without planning
    api.prune(api.PruneConfig(plan=str(tmp_path / "p6.json"), out=str(tmp_path / "c"),
                              **{k: v for k, v in cfg.items() if k != "stats_cache"}))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "c" / "model.safetensors").read_bytes()


def test_same_command_twice_gives_the_same_checkpoint(tiny_dir, tmp_path, capsys):
    for name in ("a", "b"):
        assert run(capsys, "prune", tiny_dir, "--keep", 5, "--method", "random", "--calib", "random",
                   "--samples", 2, "--seq-len", 16, "--out", tmp_path / name, "--quiet", "--no-eval")[0] == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_auto_dtype_computes_in_float32_and_saves_in_the_checkpoint_dtype(tmp_path):
    src = tmp_path / "bf16"
    make("qwen2_moe").to(torch.bfloat16).save_pretrained(src)
    result = api.prune(api.PruneConfig(model=str(src), keep=6, method="frequency", out=str(tmp_path / "o"),
                                       calib="random", samples=2, seq_len=16, quiet=True, no_eval=True))
    assert result.model is None                                          # streamed from the folder
    from safetensors import safe_open
    with safe_open(str(tmp_path / "o" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
