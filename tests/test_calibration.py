"""Calibration specs -> token windows: every source kind, determinism, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import char_tokenizer
from moeprune import demo
from moeprune.arch import MoePruneError
from moeprune.text import calibration_tokens, check_spec, load_texts

DOCS = ["the cat sat on the mat.", "a dog ran to the park, fast.", "what is two plus two? four."]


def test_txt_jsonl_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(DOCS[:2]))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in DOCS[2:]))
    assert load_texts(str(tmp_path / "a.txt")) == DOCS[:2]
    assert load_texts(str(tmp_path / "b.jsonl")) == DOCS[2:]
    assert load_texts(str(tmp_path)) == DOCS


def test_hf_spec_reads_a_local_dataset_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in DOCS))
    assert load_texts(f"hf:{folder}") == DOCS
    assert load_texts(f"hf:{folder}::train") == DOCS


def test_demo_spec_and_domain_subset():
    domains = demo.domains("calib")
    assert len(domains) >= 6
    some = load_texts(f"demo:{domains[0]}")
    assert some and len(load_texts("demo")) > len(some)
    with pytest.raises(MoePruneError, match="unknown demo domain"):
        load_texts("demo:klingon")


def test_windows_are_seeded_and_from_the_text(tmp_path):
    tok = char_tokenizer()
    (tmp_path / "t.txt").write_text("\n\n".join(DOCS * 4))
    a = calibration_tokens(str(tmp_path / "t.txt"), tok, samples=4, seq_len=10, seed=1)
    b = calibration_tokens(str(tmp_path / "t.txt"), tok, samples=4, seq_len=10, seed=1)
    c = calibration_tokens(str(tmp_path / "t.txt"), tok, samples=4, seq_len=10, seed=2)
    assert a.shape == (4, 10) and torch.equal(a, b) and not torch.equal(a, c)
    text = "".join(tok.decode(row) for row in a)
    assert "<unk>" not in text
    with pytest.raises(MoePruneError, match="lower --samples"):
        calibration_tokens(str(tmp_path / "t.txt"), tok, samples=1000, seq_len=10, seed=0)


def test_random_spec_and_errors(tmp_path):
    r = calibration_tokens("random", None, samples=3, seq_len=5, seed=0, vocab_size=50)
    assert r.shape == (3, 5) and int(r.max()) < 50
    with pytest.raises(MoePruneError, match="needs a tokenizer"):
        calibration_tokens("demo", None, samples=1, seq_len=8, seed=0)
    with pytest.raises(MoePruneError, match="not found"):
        check_spec(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(MoePruneError, match='"text" field'):
        load_texts(str(tmp_path / "bad.jsonl"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(MoePruneError, match=".txt or .jsonl"):
        load_texts(str(tmp_path / "x.csv"))
