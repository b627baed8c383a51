"""Families found by structure route as their own routers do: the routing rule read off the router's decisions on
calibration tokens (routing.inferred_rule) replays them, and replays the router of a model pruned to a subset, which
is what NAEE's search scores. Routers handed the block's per-expert correction bias (MiniMax-M2, AFMoE, HY-V3,
LFM2-MoE) and a router wrapped in a *Gate (Hunyuan-A13B) included, each with a live (non-zero) bias; LongCat-Flash's
router, which also scores identity experts after the real ones (kept in every subset, ids E .. E + Z - 1)."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch

from moeprune.arch import discovered_family, moe_layout
from moeprune.discover import find_moe
from moeprune.calibration import collect
from moeprune.plan import LayerPlan, Plan
from moeprune.routing import correction_bias, restricted_routing
from moeprune.surgery import apply_plan
from moeprune.tiny import tiny_model_any

TYPES = ["minimax_m2", "afmoe", "hy_v3", "lfm2_moe", "hunyuan_v1_moe", "exaone_moe", "muse_spark", "llama4_text",
         "ergo", "longcat_flash", "inkling2_text",
         # group-limited choice (num_group 2, topk_group 1 in the tiny configs), read off the router's attributes
         "deepseek_v32", "axk1", "beam"]
KEPT = [0, 2, 3, 5, 6, 7]


def live_model(model_type: str):
    model = tiny_model_any(model_type)
    with torch.no_grad():
        for layer in moe_layout(model).layers:
            bias, scale = correction_bias(layer), 0.1
            if layer.identity_slots:          # LongCat: logits that spread the softmax over the E + Z rows, and a bias
                layer.router.classifier.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(9))
                scale = 0.02                  # of its scores' size (about 1 / 11), so both decide
            if bias is not None:              # zero at init: make the choice differ from the weights' order
                bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(layer.index)) * scale)
    return model


def by_expert(weights: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = indices.argsort(dim=-1)
    return weights.gather(1, order).double(), indices.gather(1, order)


@pytest.mark.parametrize("model_type", TYPES)
def test_inferred_routing_replays_the_router_and_the_pruned_router(model_type):
    model = live_model(model_type)
    layout = moe_layout(model)
    assert model_type not in ("minimax_m2", "afmoe", "hy_v3", "lfm2_moe") or layout.family.router_args
    ids = torch.randint(3, 200, (4, 32), generator=torch.Generator().manual_seed(0))
    stats = collect(model, layout, ids, sample_tokens=96, progress=False, weight_similarity=False)
    E, k, Z = layout.layers[0].num_experts, layout.top_k, layout.layers[0].identity_slots
    assert (model_type == "longcat_flash") == (Z > 0)
    slots = torch.tensor(KEPT + list(range(E, E + Z)))        # the pruned router's rows: kept experts, identity slots
    pruned = copy.deepcopy(model)
    plan = Plan("test", {}, {m.index: LayerPlan.selection(E, KEPT) for m in layout.layers})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_plan(pruned, moe_layout(pruned), plan)
    pruned_layers = moe_layout(pruned).by_index()
    for layer in layout.layers:
        ls = stats.layers[layer.index]
        assert ls.routing, f"layer {layer.index}: no routing rule reproduces the router"
        x = ls.inputs
        logits, w, i = layer.route(x)
        assert logits.shape[1] == E + Z
        logits = logits[:, :E]          # what statistics hold: the real experts' (the rule holds the identity slots')
        w2, i2 = restricted_routing(logits, range(E), ls.routing, k)
        (w, i), (w2, i2) = by_expert(w, i), by_expert(w2, i2)
        assert torch.equal(i, i2) and torch.allclose(w, w2, rtol=1e-3, atol=1e-5)
        assert not Z or bool((i >= E).any())                      # identity slots chosen on the sample
        _, w, local = pruned_layers[layer.index].route(x)
        w, i = by_expert(w, slots[local])
        w2, i2 = by_expert(*restricted_routing(logits, KEPT, ls.routing, k))
        assert torch.equal(i, i2) and torch.allclose(w, w2, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("model_type", ["lfm2_moe", "flint"])
def test_a_wrong_scoring_guess_is_settled_by_the_router(model_type):
    """On the meta skeleton of a streamed checkpoint the scoring is a guess (softmax unless a correction bias says
    sigmoid); LFM2-MoE and Flint score by sigmoid without one. The statistics follow the router's own decisions:
    the summed probabilities are the sigmoid ones whatever the guess."""
    model = live_model(model_type)
    right = moe_layout(model)
    assert right.family.scoring == "sigmoid"
    wrong = moe_layout(model)
    wrong.family = dataclasses.replace(wrong.family, scoring="softmax")
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    a = collect(model, right, ids, sample_tokens=32, progress=False, weight_similarity=False)
    b = collect(model, wrong, ids, sample_tokens=32, progress=False, weight_similarity=False)
    for i, ls in a.layers.items():
        assert ls.routing["scoring"] == b.layers[i].routing["scoring"] == "sigmoid"
        assert torch.equal(ls.prob_sum, b.layers[i].prob_sum)
    with torch.device("meta"):                     # precondition: the skeleton does guess softmax
        skeleton = type(model)._from_config(copy.deepcopy(model.config))
    assert discovered_family(find_moe(skeleton)).scoring == "softmax"


@pytest.mark.parametrize("model_type", ["longcat_flash", "deepseek_v4"])
def test_statistics_of_two_samples_joined_keep_every_tokens_record(model_type):
    """Self-calibration keeps the text and the self-written windows' sums apart and joins them (selfcalib.combine):
    a rule that records something per sample token (DeepSeek-V4's hash choices, LongCat's identity-slot logits)
    must cover both halves, or NAEE, which replays it, stops on the joined statistics."""
    from conftest import calibrated, token_rows
    from moeprune.methods import get_method
    from moeprune.selfcalib import combine
    import test_hash_routing
    import test_longcat_flash
    model = test_longcat_flash.longcat() if model_type == "longcat_flash" else test_hash_routing.deepseek_v4()
    _, text = calibrated(model, token_rows(1, seed=1))
    _, own = calibrated(model, token_rows(1, seed=2))
    joined = combine(text, own)
    per_token = [(ls, v) for ls in joined.layers.values() for k, v in ls.routing.items()
                 if k in ("chosen", "identity_logits")]          # DeepSeek-V4: its hash layers only
    assert per_token and all(len(v) == ls.logits.shape[0] for ls, v in per_token)
    E = next(iter(joined.layers.values())).num_experts
    plan = get_method("naee").plan(joined, keep=E // 2)
    assert all(lp.keep == E // 2 for lp in plan.layers.values())


@pytest.mark.parametrize("model_type", ["qwen3_next", "granitemoe", "qwen3_moe"])
def test_a_router_run_in_bfloat16_is_read_off_too(model_type):
    """A model run in bfloat16 (as on a GPU) returns its routing weights rounded to bfloat16: the rule is still read
    off (within two of its epsilons; Qwen3-Next's and Granite's layers had none, so NAEE and auto's NAEE refused
    them), and it replays the router's choice exactly and its weights to bfloat16's precision."""
    model = live_model(model_type).to(torch.bfloat16)
    layout = moe_layout(model)
    ids = torch.randint(3, 200, (4, 32), generator=torch.Generator().manual_seed(0))
    stats = collect(model, layout, ids, sample_tokens=96, progress=False, weight_similarity=False)
    for layer in layout.layers:
        ls = stats.layers[layer.index]
        assert ls.routing and ls.routing["scale"] == pytest.approx(1.0, abs=2e-3), layer.index
        _, w, i = layer.route(ls.inputs.to(torch.bfloat16))
        assert w.dtype == torch.bfloat16
        (w, i), (w2, i2) = by_expert(w, i), by_expert(*restricted_routing(ls.logits, range(layer.num_experts),
                                                                          ls.routing, layout.top_k))
        assert torch.equal(i, i2) and torch.allclose(w, w2, rtol=2 ** -7, atol=1e-6)
