"""DBRX (databricks/dbrx-base, dbrx-instruct): its experts fold the expert axis into axis 0 (experts.mlp.w1 gate,
v1 up, w2 down, each [E * I, H]; w2 stored x @ W), its counts sit in a nested sub-config (ffn_config.moe_num_experts,
ffn_config.moe_top_k), its decoder layers are transformer.blocks, and its router returns logits only: the block
chooses (route_tokens_to_experts: softmax, top-k, divided by the p-norm moe_normalize_expert_weights).

Structure finds the folded axis, the roles, the nested keys; the arch entry adapts the router (the block's own
route_tokens_to_experts). Surgery reads and writes the experts through the view [E, I, H] and merges, aligns and fits
them as gate_up / down ("halves"); the checkpoint's [E * I, H] tensors are cut to [K * I, H]; config.json's nested
count is edited in place."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import calibrated, pruned_copy
from conftest import token_rows as tokens

import moeprune.methods  # noqa: F401  registers the methods
from moeprune.arch import FAMILIES, discovered_family, moe_layout
from moeprune.discover import check_contract, find_moe
from moeprune.hub import edit_config
from moeprune.methods.naee import Reconstruction
from moeprune.methods.registry import METHODS
from moeprune.plan import LayerPlan, Plan
from moeprune.routing import restricted_routing
from moeprune.tiny import tiny_config, tiny_model_any

torch.set_num_threads(1)
E, I, H = 8, 16, 64
KEPT = [0, 2, 3, 6]


def dbrx(p: float | None = 1.0):
    """The tiny DBRX (8 experts of width 16, top-k 2), routers scaled so the softmax is not flat; `p` the p-norm the
    block divides the top-k weights by (None: not)."""
    config = tiny_config("dbrx")
    config.ffn_config.moe_normalize_expert_weights = p
    model = tiny_model_any("dbrx", config=config)
    with torch.no_grad():
        for i, block in enumerate(model.transformer.blocks):
            block.ffn.router.layer.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(i))
            for name in ("w1", "v1", "w2"):             # experts of distinct sizes: outputs far apart
                getattr(block.ffn.experts.mlp, name).normal_(0.0, 0.1, generator=torch.Generator().manual_seed(9 + i))
    return model





def experts_of(model, i: int = 0) -> dict[str, torch.Tensor]:
    mlp = model.transformer.blocks[i].ffn.experts.mlp
    return {n: getattr(mlp, n).detach().unflatten(0, (-1, I)) for n in ("w1", "v1", "w2")}


def test_structure_finds_the_folded_experts_and_nested_counts():
    """On the live model and the meta skeleton: 8 experts whose w1 / v1 / w2 fold 16 rows each into axis 0 (gate,
    up, down stored x @ W), the counts at ffn_config.moe_num_experts / moe_top_k, the layers at transformer.blocks.
    What differs from the contract is the router alone, which the entry adapts; the entry agrees with structure on
    everything else."""
    model = dbrx()
    with torch.device("meta"):
        skeleton = type(model)._from_config(copy.deepcopy(model.config))
    entry = FAMILIES["dbrx"]
    for m in (model, skeleton):
        s = find_moe(m)
        assert (s.num_experts, s.top_k, s.layers_path) == (E, 2, "transformer.blocks") and s.axis0
        assert [(t.name, t.role, t.folded, t.transposed, t.view_shape) for t in s.layers[0].expert_tensors] == [
            ("mlp.w1", "gate", I, False, (E, I, H)), ("mlp.v1", "up", I, False, (E, I, H)),
            ("mlp.w2", "down", I, True, (E, I, H))]
        found = discovered_family(s)
        for name in ("n_experts_field", "top_k_field", "block", "router", "experts", "shared", "router_tensors",
                     "gate_up", "transposed", "folded"):
            assert getattr(found, name) == getattr(entry, name), name
    differences = check_contract(find_moe(model), model).differences
    assert len(differences) == 1 and "DbrxRouter.forward returns a tensor" in differences[0]
    layout = moe_layout(model)
    assert layout.layers_prefix == "transformer.blocks." and layout.top_k == 2 and layout.layers[0].num_experts == E


def test_the_adapters_are_the_models_own_computation():
    """The router's decisions are the block's route_tokens_to_experts of its logits; an expert is DbrxExpertGLU on
    expert e's rows of w1, v1, w2; the canonical view ("halves": gate_up [E, 2I, H], down [E, H, I]) computes the
    same expert."""
    model = dbrx()
    layer = moe_layout(model).layers[0]
    x = torch.randn(10, H, generator=torch.Generator().manual_seed(0))
    logits, weights, indices = layer.route(x)
    raw = layer.router(x)
    w, idx = layer.block.route_tokens_to_experts(raw)
    assert torch.equal(logits, raw) and torch.equal(weights, w) and torch.equal(indices, idx)
    assert torch.allclose(weights.sum(-1), torch.ones(10))                  # p = 1: divided by their sum
    view, layout = layer.canonical_view()
    assert layout == "halves" and view.gate_up_proj.shape == (E, 2 * I, H) and view.down_proj.shape == (E, H, I)
    tensors = experts_of(model)
    for e in (0, 5):
        want = layer.experts.mlp(x, tensors["w1"][e], tensors["v1"][e], tensors["w2"][e])
        gate, up = (x @ view.gate_up_proj[e].T).chunk(2, dim=-1)
        assert torch.allclose(layer.expert(x, e), want, atol=1e-6)
        assert torch.allclose(view.act_fn(gate) * up @ view.down_proj[e].T, want, atol=1e-6)


@pytest.mark.parametrize("p", [1.0, 2.0, None])
def test_routing_rule_replays_the_router_and_the_pruned_router(p):
    """The rule (softmax, top-k, divided by the p-norm; none when None) replays the block's choices and weights on
    the sample, and those of the model pruned to a subset: what NAEE scores."""
    model = dbrx(p)
    layout, stats = calibrated(model, tokens())
    after = moe_layout(pruned_copy(model, Plan("test", {}, {m.index: LayerPlan.selection(E, KEPT)
                                                            for m in layout.layers}))).by_index()
    for m in layout.layers:
        ls = stats.layers[m.index]
        assert ls.routing["renormalize"] == (p is not None) and ls.routing.get("norm_p") == p
        _, w, i = m.route(ls.inputs)
        w2, i2 = restricted_routing(ls.logits, range(E), ls.routing, layout.top_k)
        assert torch.equal(i.sort(-1).values, i2.sort(-1).values)
        assert torch.allclose(w.double().gather(1, i.argsort(-1)), w2.gather(1, i2.argsort(-1)), atol=1e-6)
        _, w, local = after[m.index].route(ls.inputs)
        i = torch.tensor(KEPT)[local]
        w2, i2 = restricted_routing(ls.logits, KEPT, ls.routing, layout.top_k)
        assert torch.equal(i.sort(-1).values, i2.sort(-1).values)
        assert torch.allclose(w.double().gather(1, i.argsort(-1)), w2.gather(1, i2.argsort(-1)), atol=1e-6)


def test_surgery_through_the_folded_view():
    """A selection keeps expert e's 16 rows of w1, v1, w2 for each kept e, the router's rows likewise; the nested
    count and the block's attributes follow, so the pruned model is what transformers builds from its config and
    weights; NAEE's error of the subset is the pruned block's squared error on the sample."""
    model = dbrx()
    layout, stats = calibrated(model, tokens())
    plan = Plan("test", {}, {m.index: LayerPlan.selection(E, KEPT) for m in layout.layers})
    pruned = pruned_copy(model, plan)
    before, after = experts_of(model, 1), experts_of(pruned, 1)
    for n in ("w1", "v1", "w2"):
        assert torch.equal(after[n], before[n][KEPT])
    ffn = pruned.transformer.blocks[1].ffn
    assert torch.equal(ffn.router.layer.weight, model.transformer.blocks[1].ffn.router.layer.weight[KEPT])
    assert (ffn.experts.num_experts, ffn.experts.mlp.moe_num_experts, pruned.config.ffn_config.moe_num_experts) == \
        (len(KEPT),) * 3
    fresh = type(model)(copy.deepcopy(pruned.config)).eval()
    fresh.load_state_dict(pruned.state_dict())
    ids = tokens(1, seed=3)
    with torch.no_grad():
        assert torch.allclose(pruned(ids).logits, fresh(ids).logits, atol=1e-6)
    pruned_layers = moe_layout(pruned).by_index()
    for m in layout.layers:
        ls, x = stats.layers[m.index], stats.layers[m.index].inputs
        with torch.no_grad():
            real = float((m.block(x) - pruned_layers[m.index].block(x)).double().square().sum())
        assert real > 0 and Reconstruction(ls)(tuple(KEPT)) == pytest.approx(real, rel=1e-4)


def test_aligned_merge_finds_a_permuted_copy():
    """Expert 1 made expert 0 with its 16 intermediate neurons permuted (w1, v1 rows and w2 rows alike: the same
    function): merging {0, 1} with weight alignment gives expert 0 back, through the canonical view; without it the
    average mixes unrelated neurons. A fitted merge runs on the same view."""
    model = dbrx()
    perm = torch.randperm(I, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for block in model.transformer.blocks:
            for name in ("w1", "v1", "w2"):
                t = getattr(block.ffn.experts.mlp, name).unflatten(0, (E, I))
                t[1] = t[0][perm]
    layout, stats = calibrated(model, tokens())
    groups = LayerPlan(E, [[0, 1], [2], [3], [4]], [[0.5, 0.5], [1.0], [1.0], [1.0]], [0, 2, 3, 4])
    x = stats.layers[0].inputs
    for align, same in (("weights", True), ("none", False)):
        plan = Plan("test", {}, {m.index: copy.deepcopy(groups) for m in layout.layers}, align=align)
        merged = moe_layout(pruned_copy(model, plan, stats)).layers[0]
        assert torch.allclose(merged.expert(x, 0), layout.layers[0].expert(x, 0), atol=1e-5) == same, align
    plan = Plan("test", {}, {m.index: copy.deepcopy(groups) for m in layout.layers}, merge="fit")
    fitted = moe_layout(pruned_copy(model, plan, stats)).layers[0]
    assert torch.isfinite(fitted.expert(x, 0)).all() and fitted.num_experts == 4


def test_nested_count_edited_in_place():
    """config.json's ffn_config.moe_num_experts (and top-k) edited where they are: every other byte the same."""
    text = ('{\n  "d_model": 64,\n  "ffn_config": {\n    "ffn_hidden_size": 16,\n    "moe_num_experts": 8,\n'
            '    "moe_top_k": 2\n  },\n  "moe_num_experts": 8,\n  "model_type": "dbrx"\n}\n')
    config = tiny_config("dbrx")
    out = edit_config(text, config, {"ffn_config.moe_num_experts": 1, "ffn_config.moe_top_k": 1})
    assert out == text.replace('"moe_num_experts": 8,\n    "moe_top_k": 2',
                               '"moe_num_experts": 1,\n    "moe_top_k": 1')
    assert json.loads(out)["moe_num_experts"] == 8                        # the top-level key of that name untouched


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_prunes_dbrx(method):
    """Every registered method plans the tiny DBRX at keep 4 of 8: the experts are [4 * 16, 64], the router [4, 64],
    and the model runs."""
    model = dbrx()
    layout, stats = calibrated(model, tokens(2, seed=5))
    plan = METHODS[method].plan(stats, keep=4, seed=0)
    pruned = pruned_copy(model, plan, stats)
    for m in moe_layout(pruned).layers:
        assert m.num_experts == 4 and m.router.layer.weight.shape == (4, H)
        assert all(p.shape == (4 * I, H) for p in m.experts.parameters())
    with torch.no_grad():
        assert torch.isfinite(pruned(input_ids=tokens(1)).logits).all()
