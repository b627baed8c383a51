"""Baselines: routing replayed from logits, selection by usage, REAP, NAEE, M-SMoE, HC-SMoE, and every method end to end."""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import ALL_FAMILIES, hand_set_router, make, pin_routing
from transformers import AutoModelForCausalLM

from moeprune.arch import FAMILIES, moe_layout
from moeprune.calibration import collect
from moeprune.methods import METHODS
from moeprune.methods.msmoe import frequency_weights
from moeprune.plan import LayerPlan, Plan
from moeprune.routing import restricted_routing, routing_rule
from moeprune.stats import Stats
from moeprune.surgery import apply_plan


def model_with_live_biases(family: str, **kw):
    """A tiny model whose routing quirks are all exercised: correction biases non-zero, PhiMoE jitter on."""
    model = make(family, **kw)
    with torch.no_grad():
        for layer in moe_layout(model).layers:
            bias = getattr(layer.router, "e_score_correction_bias", None)
            if bias is not None:                       # DeepSeek-V3 / GLM: a buffer, zero at init
                bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(layer.index)) * 0.05)
            if family == "phimoe":
                layer.router.router_jitter_noise = 0.3
    return model


def selection_plan(layout, kept) -> Plan:
    E = layout.layers[0].num_experts
    return Plan("test", {}, {layer.index: LayerPlan.selection(E, kept) for layer in layout.layers})


def by_expert(weights: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sorted by expert id, so that routings from unsorted top-k compare."""
    order = indices.argsort(dim=-1)
    return weights.gather(1, order).double(), indices.gather(1, order)


def inputs(n: int = 300, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(0)) * scale


def tokens(samples: int = 2, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (samples, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ routing replayed from the cached logits

def test_routing_rule_reproduces_the_router(family):
    """Full set of experts: the replayed routing is the router's own (group-limited DeepSeek routing included:
    the tiny DeepSeek/GLM configs have n_group=2, topk_group=1)."""
    model = model_with_live_biases(family)
    layout = moe_layout(model)
    for layer in layout.layers:
        logits, w, i = layer.route(inputs())
        rule = routing_rule(layer, layout.family)
        w2, i2 = restricted_routing(logits, range(8), rule, layout.top_k)
        (w, i), (w2, i2) = by_expert(w, i), by_expert(w2, i2)
        assert torch.equal(i, i2)
        assert torch.allclose(w, w2, atol=1e-6)
    if layout.family.group_fields:
        assert rule["n_group"] == 2 and rule["topk_group"] == 1      # group limiting was live in this test


@pytest.mark.parametrize("kept", [[0, 1, 2, 4, 5, 6], [1, 3, 4, 6], [0, 2, 3, 5, 7]])
def test_restricted_routing_is_the_pruned_routers(family, kept):
    """A subset: the replayed routing is what the router of the model pruned to that subset computes
    (5 experts: DeepSeek/GLM group routing falls back to one group, as surgery does)."""
    model = model_with_live_biases(family)
    layout = moe_layout(model)
    x = inputs()
    full = {layer.index: layer.route(x)[0] for layer in layout.layers}
    rules = {layer.index: routing_rule(layer, layout.family) for layer in layout.layers}
    pruned = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_plan(pruned, moe_layout(pruned), selection_plan(moe_layout(pruned), kept))
    for layer in moe_layout(pruned).layers:
        _, w, local = layer.route(x)
        w, i = by_expert(w, torch.tensor(kept)[local])
        w2, i2 = by_expert(*restricted_routing(full[layer.index], kept, rules[layer.index], layout.top_k))
        assert torch.equal(i, i2)
        assert torch.allclose(w, w2, atol=1e-6)


# ------------------------------------------------------------------ selection by usage

def test_frequency_and_soft_activation_keep_the_favoured_experts():
    """Router set by hand on a constant positive hidden coordinate: experts 4 and 6 win every token
    (logit 3 x0), expert 1 is a close third (2.9 x0) that never reaches the top-2, the rest score 0."""
    model = make("mixtral")
    layout = hand_set_router(model, {4: 3.0, 6: 3.0, 1: 2.9})
    stats = collect(model, layout, tokens(), sample_tokens=16, progress=False)
    N = tokens().numel()
    for ls in stats.layers.values():                          # precondition: the routing is as designed
        assert ls.counts[4] == ls.counts[6] == N and ls.counts.sum() == 2 * N
    kept = lambda name, k: {i: lp.groups for i, lp in METHODS[name].plan(stats, k).layers.items()}
    for name in ("frequency", "soft-activation"):
        assert kept(name, 2) == {0: [[4], [6]], 1: [[4], [6]]}
    # expert 1 holds much probability but is never picked: only soft-activation keeps it
    assert kept("soft-activation", 3) == {0: [[1], [4], [6]], 1: [[1], [4], [6]]}
    assert kept("frequency", 3) == {0: [[0], [4], [6]], 1: [[0], [4], [6]]}    # 0: the lowest id of the unused


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
@torch.no_grad()
def test_reap_saliency_by_hand(family):
    """REAP = mean over routed tokens of routing weight x ||E_i(x)||, recomputed from the fused weights on the
    MoE block inputs captured during a normal forward."""
    model = make(family)
    layout = moe_layout(model)
    ids = tokens(4, 32, seed=5)
    captured = {}
    hooks = [layer.block.register_forward_pre_hook(
        lambda m, a, i=layer.index: captured.__setitem__(i, a[0].reshape(-1, a[0].shape[-1]).double()))
        for layer in layout.layers]
    model(ids)
    for h in hooks:
        h.remove()
    stats = collect(model, layout, ids, sample_tokens=8, progress=False)
    plan = METHODS["reap"].plan(stats, 5)
    for layer in layout.layers:
        x = captured[layer.index]
        probs = torch.softmax(x @ layer.router.weight.double().T, dim=-1)
        w, idx = probs.topk(2, dim=-1)
        if family == "mixtral" or model.config.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        gate_up, down = layer.experts.gate_up_proj.double(), layer.experts.down_proj.double()
        inter = down.shape[2]
        saliency = torch.zeros(8, dtype=torch.float64)
        for e in range(8):
            tok, slot = torch.where(idx == e)
            h = F.silu(x[tok] @ gate_up[e, :inter].T) * (x[tok] @ gate_up[e, inter:].T)
            out = h @ down[e].T
            saliency[e] = (w[tok, slot] * out.norm(dim=-1)).sum() / max(len(tok), 1)
        assert saliency.min() > 0
        ls = stats.layers[layer.index]
        assert torch.allclose(ls.reap_saliency, saliency, rtol=1e-4)
        assert torch.allclose(torch.tensor(plan.layers[layer.index].info["scores"], dtype=torch.float64),
                              saliency, atol=2e-6)
        assert plan.layers[layer.index].groups == [[e] for e in sorted(saliency.argsort(descending=True)[:5].tolist())]


# ------------------------------------------------------------------ NAEE

def _block_out(model, index: int, x: torch.Tensor) -> torch.Tensor:
    out = moe_layout(model).by_index()[index].block(x[None])
    return (out[0] if isinstance(out, tuple) else out)[0].double()


@pytest.mark.parametrize("family", [f for f in ALL_FAMILIES if f not in FAMILIES or FAMILIES[f].expert_fn is None])
def test_naee_exhaustive_is_the_brute_force_optimum(family, tmp_path):
    """Every 6-of-8 subset is applied to a copy of the real model; the MoE block's output error on the sampled
    inputs is measured there. NAEE's subset is the argmin, its recorded error that subset's relative error.
    (Not Llama 4: its routing score scales an expert's input, so NAEE's sum of weighted outputs approximates it.)"""
    model = model_with_live_biases(family)
    layout = moe_layout(model)
    stats = collect(model, layout, tokens(2, 32), sample_tokens=48, progress=False)
    stats.save(tmp_path / "stats")
    stats = Stats.load(tmp_path / "stats")                              # the routing rule survives a reload
    plan = METHODS["naee"].plan(stats, 6)
    full = {i: _block_out(model, i, ls.inputs) for i, ls in stats.layers.items()}
    brute = {i: {} for i in stats.layers}
    for subset in itertools.combinations(range(8), 6):
        pruned = copy.deepcopy(model)
        apply_plan(pruned, moe_layout(pruned), selection_plan(moe_layout(pruned), list(subset)))
        for i, ls in stats.layers.items():
            brute[i][subset] = float((full[i] - _block_out(pruned, i, ls.inputs)).square().sum())
    for i, lp in plan.layers.items():
        best = min(brute[i], key=brute[i].get)
        ranked = sorted(brute[i].values())
        assert ranked[1] > ranked[0] * 1.001                             # precondition: a unique optimum
        assert lp.info["search"] == "exhaustive" and lp.info["evaluated"] == 28
        assert tuple(lp.info["subset"]) == best and lp.groups == [[e] for e in best]
        layer, x = layout.by_index()[i], stats.layers[i].inputs
        _, w, idx = layer.route(x)
        routed = layer.experts(x, idx, w).double()                       # the routed part of the full output
        assert lp.info["error_abs"] == pytest.approx(brute[i][best], rel=1e-3)
        assert lp.info["error"] == pytest.approx(brute[i][best] / float(routed.square().sum()), rel=1e-3)


def test_naee_seeded_search_is_reproducible_and_finds_the_optimum():
    """Budget 1 (one random start) on C(8, 4) = 70 subsets: the swaps must do the work."""
    model = model_with_live_biases("mixtral")
    stats = collect(model, moe_layout(model), tokens(2, 32), sample_tokens=48, progress=False)
    exhaustive = METHODS["naee"].plan(stats, 4)
    refined = 0
    for seed in range(4):
        a = METHODS["naee"].plan(stats, 4, seed=seed, budget=1)
        b = METHODS["naee"].plan(stats, 4, seed=seed, budget=1)
        for i in stats.layers:
            assert a.layers[i].info["search"] == "sampled"
            assert a.layers[i].groups == b.layers[i].groups and a.layers[i].info == b.layers[i].info
            assert a.layers[i].groups == exhaustive.layers[i].groups
            assert a.layers[i].info["error"] == pytest.approx(exhaustive.layers[i].info["error"])
            refined += a.layers[i].info["start_error"] > a.layers[i].info["error"] * 1.001
    assert refined >= 4                                                  # most random starts were not optimal


def _direct_error(ls, subset) -> float:
    """||y_full - y_S||^2 summed over the sample, straight from the experts' outputs (no Gram matrices)."""
    def output(s):
        w, idx = restricted_routing(ls.logits, s, ls.routing, ls.top_k)
        return (w.unsqueeze(-1) * ls.outputs[idx, torch.arange(len(idx)).unsqueeze(1)].double()).sum(1)
    return float((output(range(ls.num_experts)) - output(subset)).square().sum())


def test_naee_sampled_search_on_a_large_layer():
    """16 experts, keep 8: C(16, 8) = 12870 > the default budget, so the seeded search runs by default.
    It is reproducible, its error is the directly computed one, and no single swap improves it."""
    model = model_with_live_biases("deepseek_v3", num_experts=16)
    stats = collect(model, moe_layout(model), tokens(2, 32), sample_tokens=32, progress=False)
    a = METHODS["naee"].plan(stats, 8, seed=3)
    b = METHODS["naee"].plan(stats, 8, seed=3)
    for i, ls in stats.layers.items():
        lp = a.layers[i]
        assert lp.info["search"] == "sampled" and lp.groups == b.layers[i].groups
        assert lp.info["error"] <= lp.info["start_error"]
        kept = lp.info["subset"]
        err = _direct_error(ls, kept)
        assert lp.info["error_abs"] == pytest.approx(err, rel=1e-6)
        for out, inn in itertools.product(kept, sorted(set(range(16)) - set(kept))):
            assert _direct_error(ls, sorted(set(kept) - {out} | {inn})) >= err * (1 - 1e-9)


# ------------------------------------------------------------------ M-SMoE and HC-SMoE

OUTPUT_GROUPS = [[0, 3, 6], [1, 4], [2, 5, 7]]       # experts are noisy copies of 3 prototypes
ROUTER_GROUPS = [[0, 1, 2], [3, 4, 5], [6, 7]]       # router rows are noisy copies of 3 other prototypes
DOMINANT = [2, 3, 7]                                 # one per router group, favoured by the router


def _moe_inputs(model, layer, ids) -> torch.Tensor:
    captured = []
    hook = layer.block.register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    model(ids)
    hook.remove()
    return captured[0].double()


@torch.no_grad()
def prototype_model(ids):
    """Mixtral whose expert weights come in OUTPUT_GROUPS and router rows in ROUTER_GROUPS: the two methods
    must disagree, each following its own signal. Router prototypes are the 3 leading principal directions
    of the layer's inputs on `ids` (independent logits of std 2 per router group); the pinned hidden
    coordinate 0 (constant over tokens) sets every expert's mean logit: 1 for DOMINANT, 0 for the rest,
    so that each dominant expert is used more than its router-group partners."""
    model = make("mixtral")
    layout = pin_routing(model, kept=list(range(8)), level=1.0)
    g = torch.Generator().manual_seed(7)
    for layer in layout.layers:
        for p in layer.experts.parameters():
            for grp in OUTPUT_GROUPS:
                for e in grp:
                    p[e] = p[grp[0]] + 0.002 * torch.randn(p[e].shape, generator=g)
    for layer in layout.layers:                      # in order: a router changes the next layer's inputs
        x = _moe_inputs(model, layer, ids)
        mean = x.mean(0)
        directions = torch.linalg.svd(x - mean, full_matrices=False).Vh[:3]
        w = layer.router.weight
        for grp, u in zip(ROUTER_GROUPS, directions):
            proto = 2 * u / ((x - mean) @ u).std()
            for e in grp:
                row = proto + 0.002 * torch.randn(proto.shape, generator=g, dtype=torch.float64)
                row[0] += ((1.0 if e in DOMINANT else 0.0) - float(row @ mean)) / float(mean[0])
                w[e] = row.float()
    return model, layout


def test_msmoe_and_hcsmoe_group_experts_built_to_be_similar():
    ids = tokens(4, 32)
    model, layout = prototype_model(ids)
    stats = collect(model, layout, ids, sample_tokens=128, progress=False)
    for ls in stats.layers.values():         # precondition: each dominant expert is its group's most used, and
        for grp, d in zip(ROUTER_GROUPS, DOMINANT):     # the 3 dominant experts are the 3 most used
            assert all(ls.counts[d] > ls.counts[e] for e in grp if e != d)
        assert sorted(ls.counts.argsort(descending=True)[:3].tolist()) == DOMINANT

    ms = METHODS["msmoe"].plan(stats, 3)
    assert ms.router == "representative" and ms.align == "weights"
    for i, lp in ms.layers.items():
        counts = stats.layers[i].counts
        assert lp.groups == ROUTER_GROUPS and lp.representatives == DOMINANT
        for grp, w in zip(lp.groups, lp.weights):
            assert w == pytest.approx([float(counts[e] / counts[grp].sum()) for e in grp])

    for metric in ("cosine", "euclidean"):
        hc = METHODS["hcsmoe"].plan(stats, 3, metric=metric)
        assert hc.router == "weighted" and hc.align == "none"
        for i, lp in hc.layers.items():
            counts = stats.layers[i].counts
            assert lp.groups == OUTPUT_GROUPS
            assert lp.representatives == [max(g, key=lambda e: (float(counts[e]), -e)) for g in OUTPUT_GROUPS]
            for grp, w in zip(lp.groups, lp.weights):
                assert w == pytest.approx([float(counts[e] / counts[grp].sum()) for e in grp])
    assert frequency_weights([1, 5], torch.zeros(8)) == [0.5, 0.5]     # no usage at all: uniform


# ------------------------------------------------------------------ every method, every family

@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_method_runs_saves_and_reloads(family, tmp_path):
    model = make(family)
    layout = moe_layout(model)
    stats = collect(model, layout, tokens(2, 16), sample_tokens=24, progress=False)
    ids = tokens(1, 12, seed=3)
    for name, method in METHODS.items():
        plan = method.plan(stats, 4, seed=1)
        pruned = copy.deepcopy(model)
        apply_plan(pruned, moe_layout(pruned), plan, stats)
        logits = pruned(ids).logits
        assert logits.isfinite().all(), name
        pruned.save_pretrained(tmp_path / name)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        assert moe_layout(reloaded).layers[0].num_experts == 4
        assert getattr(reloaded.config, moe_layout(reloaded).family.n_experts_field) == 4
        assert torch.allclose(reloaded(ids).logits, logits, atol=1e-5), name
