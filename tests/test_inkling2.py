"""Inkling-2 (thinkingmachines/Inkling-2-*) is found by structure (no arch entry): sigmoid scores plus a correction
bias choose, renormalised and scaled. What is its own is the attention residuals: each decoder layer attends over
block_states, the hidden states entering every earlier block's first layer, and final_input attends over them all
before the final norm. The engine carries them per stream (layer_inputs.InputsOf, tests/test_layer_inputs.py) and
hands them to final_input in the logits (tests/test_engine_layers.py); here: the calibration statistics come from
the model's own forward, and every method prunes it. Inkling-2-Loop is refused: its looped layers run several
times per forward."""

from __future__ import annotations

import pytest
import torch
from conftest import block_inputs, calibrated, pruned_copy
from conftest import token_rows as tokens

import moeprune.methods  # noqa: F401  registers the methods
from moeprune.arch import FAMILIES, MoePruneError, moe_layout
from moeprune.methods.naee import Reconstruction
from moeprune.methods.registry import METHODS
from moeprune.plan import LayerPlan, Plan
from moeprune.routing import correction_bias
from moeprune.sources import ModelSource
from moeprune.tiny import tiny_model_any

torch.set_num_threads(1)
E, KEPT = 8, [0, 2, 3, 5, 6, 7]


def inkling2(model_type: str = "inkling2_text"):
    """The tiny Inkling-2 (sliding and full layers, blocks of two layers, 8 experts, top-k 2), its attention-residual
    queries random (built as zeros) and its correction biases live."""
    model = tiny_model_any(model_type)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_input.query"):
                p.normal_(0.0, 1.0)
        for layer in moe_layout(model).layers:
            bias = correction_bias(layer)
            bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(layer.index)) * 0.1)
    return model


def test_found_by_structure():
    model = inkling2()
    layout = moe_layout(model)
    assert "inkling2_text" not in FAMILIES and layout.family.scoring == "sigmoid"
    assert len(layout.layers) == 4 and layout.layers[0].num_experts == E


def test_statistics_see_the_models_own_layer_inputs():
    """The observed routers' inputs are those of the model's own forward (block_states stacked per stream: with
    the old capture the forward's second probe refused the model)."""
    model = inkling2()
    ids = tokens()
    layout, stats = calibrated(model, ids)
    seen = block_inputs(model, ids)
    for m in layout.layers:
        assert torch.allclose(stats.layers[m.index].inputs, seen[m.index], atol=1e-5), m.index


def test_naee_error_is_the_pruned_blocks():
    model = inkling2()
    layout, stats = calibrated(model, tokens())
    plan = Plan("test", {}, {m.index: LayerPlan.selection(E, KEPT) for m in layout.layers})
    after = moe_layout(pruned_copy(model, plan)).by_index()
    for m in layout.layers:
        ls = stats.layers[m.index]
        x = ls.inputs[None]
        with torch.no_grad():
            real = float((m.block(x) - after[m.index].block(x)).double().square().sum())
        assert real > 0 and Reconstruction(ls)(tuple(KEPT)) == pytest.approx(real, rel=1e-4), m.index


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_prunes_inkling2(method):
    """Every registered method plans the tiny Inkling-2 at keep 4 of 8: routers [4, 64], experts [4, ...], the
    correction bias [4], and the model runs."""
    model = inkling2()
    layout, stats = calibrated(model, tokens(2, seed=5))
    plan = METHODS[method].plan(stats, keep=4, seed=0)
    pruned = pruned_copy(model, plan, stats)
    for m in moe_layout(pruned).layers:
        assert m.num_experts == 4 and m.router.weight.shape[0] == 4 and correction_bias(m).shape == (4,)
    with torch.no_grad():
        assert torch.isfinite(pruned(input_ids=tokens(1)).logits).all()


def test_looped_variant_is_refused_with_the_reason():
    model = tiny_model_any("inkling2_loop_text")
    with pytest.raises(MoePruneError, match="runs decoder layers 2-3 3 times"):
        ModelSource(model).embed([tokens()])
