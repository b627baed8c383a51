"""A hub id is read from huggingface_hub's local cache like any folder (the same per-layer engine and writer),
never from the network; one that is not cached stops at once with the command that downloads it."""

from __future__ import annotations

import json
import shutil
import time

from huggingface_hub import constants
from transformers import AutoModelForCausalLM

from moeprune.cli import main
from moeprune.tiny import tiny_model


def _cache(tmp_path, monkeypatch, repo="acme/tiny-moe"):
    """A huggingface_hub cache as `hf download` leaves it: blobs, a snapshot of links to them, refs/main."""
    cache = tmp_path / "hub"
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    staged = tmp_path / "staged"
    tiny_model("mixtral").save_pretrained(staged)
    snapshot = repo_dir / "snapshots" / "0123456789abcdef"
    (repo_dir / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in staged.iterdir():
        blob = repo_dir / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(f"../../blobs/{blob.name}")
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return repo, repo_dir


def test_a_cached_hub_id_is_pruned_like_a_folder(tmp_path, monkeypatch, capsys):
    repo, repo_dir = _cache(tmp_path, monkeypatch)
    before = {p: p.read_bytes() for p in (repo_dir / "blobs").iterdir()}
    code = main(["prune", repo, "--method", "frequency", "--keep", "4", "--calib", "random", "--samples", "2",
                 "--seq-len", "16", "--no-eval", "--quiet", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_local_experts"] == 4
    assert not (tmp_path / "out" / "model.safetensors").is_symlink()           # real files, not links to blobs
    assert {p: p.read_bytes() for p in (repo_dir / "blobs").iterdir()} == before   # the cache is never written


def test_a_hub_id_that_is_not_cached_stops_at_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    start = time.perf_counter()
    code = main(["info", "Qwen/Qwen3-30B-A3B"])
    err = capsys.readouterr().err
    assert code == 2 and "hf download Qwen/Qwen3-30B-A3B" in err and err.count("\n") == 1
    assert time.perf_counter() - start < 5 and not (tmp_path / "empty").exists()
