"""Shared fixtures: tiny models of every family, routing pinned by hand, and a no-litter guard."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from moeprune.arch import moe_layout
from moeprune.tiny import TINY_FAMILIES, tiny_model

ALL_FAMILIES = TINY_FAMILIES          # hand-set tiny models: every method runs on each
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_litter():
    """Fail a test that leaves files in the system temp folder (tests write under tmp_path only)."""
    tmp = Path(tempfile.gettempdir())
    before = set(os.listdir(tmp))
    yield
    after = set(os.listdir(tmp))
    new = {n for n in after - before if n.startswith(("moeprune", ".moeprune", "tmp_moeprune"))}
    assert not new, f"test left files behind: {new}"


def pin_routing(model, kept: list[int], scale: float = 20.0, level: float = 100.0):
    """Make the dropped experts unreachable for every token, by construction.

    Hidden coordinate 0 is set to a large constant in every embedding and nothing writes to it
    (row 0 of every o_proj / down_proj is zeroed), so the router input's coordinate 0 is positive
    for every token. Dropped experts get router weight -scale on it (logit about -scale*sqrt(d)),
    kept experts 0: their probability is ~0 and they never reach the top-k.
    """
    layout = moe_layout(model)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = level
        for name, p in model.named_parameters():
            if "o_proj" in name or "down_proj" in name:
                if p.dim() == 3:      # fused experts: halves [E, H, I]; GPT-OSS, Llama 4 [E, I, H]
                    (p[:, :, 0] if layout.family.gate_up.endswith("_t") else p[:, 0, :]).zero_()
                elif p.dim() == 2 and "down_proj_bias" in name:
                    p[:, 0] = 0
                elif p.dim() == 2:
                    p[0, :] = 0
                else:
                    p[0] = 0
        dropped = [e for e in range(layout.layers[0].num_experts) if e not in kept]
        for layer in layout.layers:
            w = layer.router.weight
            w[:, 0] = 0.0
            w[dropped, 0] = -scale
    return layout


def token_rows(rows: int = 2, seed: int = 0, length: int = 24) -> torch.Tensor:
    """Seeded token ids [rows, length] of the tiny vocabulary."""
    return torch.randint(3, 200, (rows, length), generator=torch.Generator().manual_seed(seed))


def calibrated(model, ids: torch.Tensor):
    """(layout, statistics) whose sample is every token, in order: sample token t is ids.flatten()[t]."""
    from moeprune.calibration import collect
    layout = moe_layout(model)
    return layout, collect(model, layout, ids, sample_tokens=ids.numel(), progress=False, weight_similarity=True)


def pruned_copy(model, plan, stats=None):
    """A copy of the model with `plan` applied in memory (the group-routing fallback warning silenced)."""
    import copy
    import warnings

    from moeprune.surgery import apply_plan
    pruned = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_plan(pruned, moe_layout(pruned), plan, stats)
    return pruned


def block_inputs(model, ids) -> dict[int, torch.Tensor]:
    """{MoE layer index: the [n, d] hidden states its MoE block receives in the model's own forward on ids}."""
    seen = {}
    layers = moe_layout(model).layers
    handles = [m.block.register_forward_pre_hook(lambda mod, args, i=m.index: seen.__setitem__(i, args[0]))
               for m in layers]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {i: x.reshape(-1, x.shape[-1]) for i, x in seen.items()}


def check_standard_and_keep_all(model, pruned, ids) -> None:
    """The pruned model is standard: built afresh from its config, it loads its state and gives its logits; and a
    plan that keeps every expert gives the model's own logits, bit for bit."""
    import copy

    from moeprune.plan import LayerPlan, Plan
    fresh = type(model)(copy.deepcopy(pruned.config)).eval()
    fresh.load_state_dict(pruned.state_dict())
    layers = moe_layout(model).layers
    E = layers[0].num_experts
    with torch.no_grad():
        assert torch.allclose(pruned(ids).logits, fresh(ids).logits, atol=1e-6)
        keep_all = pruned_copy(model, Plan("test", {}, {m.index: LayerPlan.selection(E, range(E)) for m in layers}))
        assert torch.equal(keep_all(ids).logits, model(ids).logits)


def hand_set_router(model, logits: dict[int, float]):
    """Every router scores expert e as logits[e] * x0 (x0 > 0 is the constant coordinate of pin_routing)
    and every other expert 0, so routing is known by hand for every token."""
    layout = pin_routing(model, kept=list(range(moe_layout(model).layers[0].num_experts)))
    with torch.no_grad():
        for layer in layout.layers:
            layer.router.weight.zero_()
            for e, value in logits.items():
                layer.router.weight[e, 0] = value
    return layout


@pytest.fixture(params=ALL_FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tokens():
    return torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def make(model_type: str, **kw):
    return tiny_model(model_type, **kw)


# ---------------------------------------------------------------- tiny tokenizers built in the tests

WORDS = ["<pad>", "<unk>", "<eos>", "<bos>", "the", "cat", "dog", "elephant", "sat", "ran", "is", "a", "big",
         "on", "mat", "red", "blue", "green", "fish", "bird"]
V = {w: i for i, w in enumerate(WORDS)}
VOCAB = 256                                    # the tiny models' vocabulary


def word_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over WORDS; with bos=True it prepends <bos> like Llama's."""
    tok = Tokenizer(models.WordLevel(V, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    kwargs = {}
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", V["<bos>"])])
        kwargs["bos_token"] = "<bos>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                                   **kwargs)


CHARS = ["<pad>", "<unk>", "<eos>", "<bos>", *"abcdefghijklmnopqrstuvwxyz0123456789 \n.,?:'"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, whitespace included: scores see every space and newline."""
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(CHARS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>")


def char_tokenizer_files(path: Path) -> None:
    """char_tokenizer's files as the hub ships them (tokenizer.json, tokenizer_config.json), written by hand so
    that no transformers version re-spells them."""
    vocab = {c: i for i, c in enumerate(CHARS)}
    (path / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated", "invert": False},
        "post_processor": None, "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}, indent=1))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>", "pad_token": "<pad>",
        "unk_token": "<unk>", "bos_token": "<bos>", "model_max_length": 256}, indent=2))
