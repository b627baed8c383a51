"""Foundation: layouts, identity and selection plans, merges, save/reload, statistics."""

from __future__ import annotations

import hashlib

import pytest
import torch
from transformers import AutoModelForCausalLM
from safetensors import safe_open

from conftest import hand_set_router, make, pin_routing
from moeprune.arch import moe_layout
from moeprune.calibration import collect
from moeprune.plan import LayerPlan, Plan
from moeprune.stats import Stats
from moeprune.surgery import apply_plan


def plan_for(layout, groups, weights=None, router="weighted", align="none"):
    E = layout.layers[0].num_experts
    weights = weights or [[1.0 / len(g)] * len(g) for g in groups]
    lp = lambda: LayerPlan(E, [list(g) for g in groups], [list(w) for w in weights], [g[0] for g in groups])  # noqa
    return Plan("test", {}, {layer.index: lp() for layer in layout.layers}, router=router, align=align)


def test_layout_matches_config_rule(family):
    model = make(family)
    layout = moe_layout(model)
    structural = [layer.index for layer in layout.layers]
    by_rule = list(range(model.config.get_text_config().num_hidden_layers))   # the tiny configs: every layer
    assert structural == by_rule and structural
    assert layout.layers[0].num_experts == 8 and layout.top_k == 2


def test_keep_all_plan_is_identity(family, tokens):
    model = make(family)
    before = model(tokens).logits
    layout = moe_layout(model)
    apply_plan(model, layout, plan_for(layout, [[e] for e in range(8)]))
    assert torch.allclose(model(tokens).logits, before, atol=1e-5)


def test_selection_of_the_only_reachable_experts_is_exact(family, tokens):
    kept = [0, 1, 2, 4, 5, 6]          # one dropped per DeepSeek group of 4, so group routing is unchanged
    model = make(family)
    layout = pin_routing(model, kept)
    # precondition: the original model never routes to a dropped expert on these tokens
    chosen = set()
    hooks = [layer.router.register_forward_hook(lambda m, a, o, layer=layer: chosen.update(
        layer.decisions(o)[2].flatten().tolist())) for layer in layout.layers]
    before = model(tokens).logits
    for h in hooks:
        h.remove()
    assert chosen <= set(kept)
    apply_plan(model, layout, plan_for(layout, [[e] for e in kept]))
    assert model.config.get_text_config() is model.config
    assert getattr(model.config, layout.family.n_experts_field) == 6
    assert torch.allclose(model(tokens).logits, before, atol=1e-5)


def test_merging_identical_copies_reproduces_the_expert(family):
    model = make(family)
    layout = moe_layout(model)
    with torch.no_grad():
        for layer in layout.layers:
            for p in layer.experts.parameters():
                p[3] = p[2]
    layer0 = layout.layers[0]
    x = torch.randn(10, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    want = layer0.expert(x, 2)
    groups = [[0], [1], [2, 3], [4], [5], [6], [7]]
    weights = [[1.0], [1.0], [0.3, 0.7], [1.0], [1.0], [1.0], [1.0]]
    apply_plan(model, layout, plan_for(layout, groups, weights))
    assert torch.allclose(layer0.expert(x, 2), want, atol=1e-5)
    assert layer0.num_experts == 7


def test_merge_is_the_weighted_sum_and_router_rule(family):
    model = make(family)
    layout = moe_layout(model)
    layer = layout.layers[0]
    orig = {n: p.detach().clone() for n, p in layer.experts.named_parameters()}
    w_router = layer.router.weight.detach().clone()
    groups = [[0, 5], [1], [2], [3], [4, 6, 7]]
    weights = [[0.25, 0.75], [1.0], [1.0], [1.0], [0.5, 0.3, 0.2]]
    plan = plan_for(layout, groups, weights, router="representative")
    plan.layers[layer.index].representatives = [5, 1, 2, 3, 6]
    apply_plan(model, layout, plan)
    for n, p in layer.experts.named_parameters():
        assert torch.allclose(p[0], 0.25 * orig[n][0] + 0.75 * orig[n][5], atol=1e-6)
        assert torch.allclose(p[4], 0.5 * orig[n][4] + 0.3 * orig[n][6] + 0.2 * orig[n][7], atol=1e-6)
    assert torch.equal(layer.router.weight[0], w_router[5]) and torch.equal(layer.router.weight[4], w_router[6])


def test_weighted_router_rule(tokens):
    model = make("mixtral")
    layout = moe_layout(model)
    w = layout.layers[0].router.weight.detach().clone()
    apply_plan(model, layout, plan_for(layout, [[0, 1], [2], [3], [4], [5], [6], [7]], [[0.4, 0.6]] + [[1.0]] * 6))
    assert torch.allclose(layout.layers[0].router.weight[0], 0.4 * w[0] + 0.6 * w[1], atol=1e-6)


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_prune_save_reload_with_plain_transformers(family, tmp_path, tokens):
    from moeprune.api import PruneConfig, prune
    src = tmp_path / "src"
    make(family).save_pretrained(src)
    digest = _digest(src)
    out = tmp_path / "out"
    result = prune(PruneConfig(model=str(src), method="frequency", keep=6, out=str(out), calib="random",
                               samples=4, seq_len=16, quiet=True, no_eval=True))
    assert _digest(src) == digest                                  # the input is untouched
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert getattr(reloaded.config, moe_layout(reloaded).family.n_experts_field) == 6
    assert moe_layout(reloaded).layers[0].num_experts == 6
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = [k for k in f.keys() if ".experts." in k]
        ids = {k.split(".experts.")[1].split(".")[0] for k in keys}
        if not any(i.isdigit() for i in ids):                      # the hub stores GPT-OSS, Llama 4 experts fused
            assert {f.get_slice(k).get_shape()[0] for k in keys} == {6}
        else:                                                      # hub layout: experts 0..5 only
            assert ids == {str(i) for i in range(6)}
    in_memory = make(family)                                        # the same plan applied in memory
    apply_plan(in_memory, moe_layout(in_memory), result.plan)
    assert torch.allclose(reloaded(tokens).logits, in_memory(tokens).logits, atol=1e-5)
    assert (out / "plan.json").exists() and Plan.load(out / "plan.json").keep_per_layer() == {
        i: 6 for i in result.plan.layers}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temporary folder left


def test_statistics_on_a_hand_set_router(tmp_path):
    """Router pinned so that experts 3 and 5 win every token: counts and weights follow by hand."""
    model = make("mixtral")
    layout = hand_set_router(model, {3: 5.0, 5: 5.0})     # logits 5 * x0 (x0 > 0) for 3 and 5, 0 for the rest
    tokens = torch.randint(3, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    stats = collect(model, layout, tokens, sample_tokens=20, batch_size=2, progress=False)
    N = tokens.numel()
    for ls in stats.layers.values():
        expect = torch.zeros(8, dtype=torch.float64)
        expect[[3, 5]] = N
        assert torch.equal(ls.counts, expect)
        assert torch.allclose(ls.weight_sum, expect / 2)          # renormalised top-2 weights are 1/2 each
        assert torch.allclose(ls.prob_sum, expect / 2, atol=1e-6)  # the other experts' probability is ~0
        assert ls.tokens == N and ls.inputs.shape == (20, 64) and ls.outputs.shape == (8, 20, 64)
        # each sampled output is the expert run on the sampled input
        layer = layout.by_index()[ls.layer]
        assert torch.allclose(ls.outputs[4], layer.expert(ls.inputs, 4), atol=1e-5)
    stats.layers[0].cache["similarity/x"] = torch.eye(8)
    stats.save(tmp_path / "s")
    back = Stats.load(tmp_path / "s")
    assert back.calibration == stats.calibration and set(back.layers) == set(stats.layers)
    for i in stats.layers:
        for name in ("counts", "prob_sum", "weight_sum", "reap_sum", "inputs", "logits", "outputs"):
            assert torch.equal(getattr(back.layers[i], name), getattr(stats.layers[i], name))
    assert torch.equal(back.layers[0].cache["similarity/x"], torch.eye(8))


def test_sampled_logits_are_the_routers(tokens):
    model = make("qwen3_moe")
    layout = moe_layout(model)
    stats = collect(model, layout, tokens, sample_tokens=16, progress=False)
    for ls in stats.layers.values():
        logits, _, _ = layout.by_index()[ls.layer].route(ls.inputs)
        assert torch.allclose(ls.logits, logits.float(), atol=1e-5)


def test_statistics_are_deterministic(tokens):
    model = make("olmoe")
    layout = moe_layout(model)
    a = collect(model, layout, tokens, sample_tokens=16, seed=3, progress=False)
    b = collect(model, layout, tokens, sample_tokens=16, seed=3, progress=False)
    for i in a.layers:
        assert torch.equal(a.layers[i].outputs, b.layers[i].outputs)
        assert torch.equal(a.layers[i].reap_sum, b.layers[i].reap_sum)


def test_group_routing_falls_back_when_k_not_divisible():
    model = make("deepseek_v3")
    layout = moe_layout(model)
    with pytest.warns(UserWarning, match="group-limited routing falls back"):
        apply_plan(model, layout, plan_for(layout, [[e] for e in range(5)]))
    assert model.config.n_group == 1 and model.config.topk_group == 1
    assert model(torch.arange(3, 10)[None]).logits.isfinite().all()


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe", "deepseek_v2"])
def test_group_routing_falls_back_for_groups_of_one(family):
    """K == n_group would leave one expert per group; V3/GLM score groups by their top-2 sum."""
    model = make(family)
    layout = moe_layout(model)
    with pytest.warns(UserWarning, match="group-limited routing falls back"):
        apply_plan(model, layout, plan_for(layout, [[0], [5]]))
    assert model.config.n_group == 1 and model(torch.arange(3, 10)[None]).logits.isfinite().all()


def test_pruned_model_trains_with_the_router_loss(family, tokens):
    """output_router_logits=True makes the causal-LM head compute the load-balancing loss over E experts."""
    model = make(family, output_router_logits=True)
    layout = moe_layout(model)
    apply_plan(model, layout, plan_for(layout, [[0, 3], [1], [2], [4, 7], [5], [6]]))
    out = model(tokens, labels=tokens)
    assert out.loss.isfinite()
    assert getattr(out, "aux_loss", None) is None or out.aux_loss.isfinite()   # DeepSeek/GLM have no aux loss
    assert getattr(model, "num_experts", 6) == 6


@pytest.mark.parametrize("model_type", ["qwen3_moe", "dbrx", "llama4_text", "gpt_oss"])
def test_many_experts_in_one_call_are_each_expert_alone(model_type):
    """expert_rows runs each row through its own expert in one call of the experts module (the observer's REAP
    sums and expert outputs, the hash-slot distances): the same values as one expert at a time, for fused experts,
    DBRX's folded ones, an entry's own expert function (Llama 4) and GPT-OSS's biased, clamped ones."""
    from moeprune.tiny import tiny_model_any
    layer = moe_layout(tiny_model_any(model_type)).layers[0]
    d = next(layer.router.parameters()).shape[-1]
    x = torch.randn(10, d, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([3, 0, 3, 7, 1, 1, 5, 2, 6, 4])
    with torch.no_grad():
        got = layer.expert_rows(x, ids)
        one = torch.stack([layer.expert(x[m:m + 1], int(e))[0] for m, e in enumerate(ids)])
        every = layer.every_expert(x[:3])
    assert torch.allclose(got, one, rtol=1e-5, atol=1e-6)
    assert every.shape == (layer.num_experts, 3, got.shape[1])
    assert all(torch.allclose(every[e], layer.expert(x[:3], e), rtol=1e-5, atol=1e-6) for e in range(8))
