"""The embedded demo models: load offline, finite logits, and far better than a unigram model."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from moeprune import demo
from moeprune.arch import moe_layout
from moeprune.checkpoint import load
from moeprune.evaluate.perplexity import perplexity, token_stream

MAX_TOKENS = 4096


def unigram_perplexity(tokenizer, train_docs: list[str], test: torch.Tensor) -> float:
    """Add-one smoothed unigram model fitted on the calibration shards, scored on the same targets."""
    counts = Counter(token_stream(tokenizer, train_docs).tolist())
    total, vocab = sum(counts.values()), len(tokenizer)
    # the same targets the perplexity windows (256, non-overlapping) score: all but each window's first token
    targets = [t for i, t in enumerate(test.tolist()) if i % 256 != 0]
    nll = -sum(math.log((counts[t] + 1) / (total + vocab)) for t in targets) / len(targets)
    return math.exp(nll)


@pytest.mark.parametrize("name,family,experts", [("demo-mixtral", "mixtral", 8), ("demo-fine", None, 32)])
def test_demo_model_is_a_real_language_model(name, family, experts):
    assert name in demo.model_names(), f"{name} is missing from src/moeprune/demo/models"
    loaded = load(name)
    layout = moe_layout(loaded.model)
    assert layout.layers[0].num_experts >= experts and (family is None or layout.family.model_type == family)
    assert loaded.model.config.head_dim == 64
    ids = loaded.tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    assert torch.isfinite(loaded.model(ids).logits).all()
    domain = "literature"
    docs = [d for d in demo.shard("eval", domain).read_text(encoding="utf-8").split("\n\n") if d.strip()]
    stream = token_stream(loaded.tokenizer, docs, max_tokens=MAX_TOKENS)
    model_ppl = perplexity(loaded.model, None, stream, seq_len=256, progress=False)["ppl"]
    calib = [d for dom in demo.domains("calib") for d in
             demo.shard("calib", dom).read_text(encoding="utf-8").split("\n\n") if d.strip()]
    uni = unigram_perplexity(loaded.tokenizer, calib, stream)
    assert model_ppl < 0.5 * uni, (model_ppl, uni)


def test_demo_data_is_addressable():
    assert len(demo.domains("calib")) >= 6 and demo.domains("calib") == demo.domains("eval")
    for d in demo.domains("eval"):
        calib = set(demo.shard("calib", d).read_text(encoding="utf-8").split("\n\n"))
        held_out = set(demo.shard("eval", d).read_text(encoding="utf-8").split("\n\n"))
        assert not (calib & held_out) - {""}, f"{d}: calibration and evaluation shards share documents"
    assert demo.task_files()
