"""Zaya (ZayaForCausalLM): its router (ZayaRouter: down_proj, an MLP, out_proj) scores num_experts + 1 classes,
the last a skip expert that no config field names (num_router_classes); the choice is the top-1 of the softmax
over all of them plus balancing_biases, and a token routed to the skip expert gets nothing (the router masks it as
expert 0 of weight 0). Each router also adds the previous layer's router state (router_states), which the decoder
layers hand on: the engine carries it as a FromPrevious argument (moeprune.layer_inputs).

Found by structure, no arch entry: a router whose rows exceed the experts by the slots it counts itself
(num_router_classes = E + 1), the skip slot read off its masked choice. Pruning keeps the skip row of out_proj and
balancing_biases after the kept experts' (K + 1 rows, num_router_classes K + 1); the statistics count the real
experts; the rule ("slots": "skip") replays the router and the pruned router; NAEE's error is the pruned block's."""

from __future__ import annotations


import pytest
import torch
from conftest import calibrated, check_standard_and_keep_all, pruned_copy
from conftest import token_rows as tokens

import moeprune.methods  # noqa: F401  registers the methods
from moeprune.arch import FAMILIES, moe_layout
from moeprune.discover import check_contract, find_moe
from moeprune.methods.naee import Reconstruction
from moeprune.methods.registry import METHODS
from moeprune.plan import LayerPlan, Plan
from moeprune.routing import restricted_routing
from moeprune.tiny import tiny_model_any

torch.set_num_threads(1)
E = 8
KEPT = [0, 2, 3, 5, 6, 7]


def zaya():
    """The tiny Zaya (8 experts and the skip slot, top-1), its routers live: random projections of a size that
    spreads the choice, and balancing biases that make the skip slot one choice among the others."""
    model = tiny_model_any("zaya")
    with torch.no_grad():
        for layer in moe_layout(model).layers:
            g = torch.Generator().manual_seed(layer.index)
            for w in layer.router.parameters():
                if w.dim() == 2:
                    w.normal_(0.0, 2.0 / w.shape[1] ** 0.5, generator=g)
            bias = torch.randn(E + 1, generator=g) * 0.05
            bias[-1] = 0.05
            layer.router.balancing_biases.copy_(bias)
    return model


def own_forward(model, ids):
    """Per MoE layer, what the model's own forward hands its block: (hidden states, the previous router state),
    and its router's output."""
    seen, handles = {}, []
    for m in moe_layout(model).layers:
        handles.append(m.block.register_forward_pre_hook(
            lambda mod, args, i=m.index: seen.__setitem__(i, {"args": args})))
        handles.append(m.router.register_forward_hook(lambda mod, args, out, i=m.index: seen[i].update(out=out)))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return seen


def test_found_by_structure():
    """A router of E + 1 rows that counts them itself beside E experts: found without an arch entry or a config
    int; the router is ZayaRouter (around its MLP); the contract holds, its fourth output (the router state) aside."""
    assert "zaya" not in FAMILIES
    model = zaya()
    s = find_moe(model)
    assert (s.num_experts, s.identity_key, s.n_experts_key, s.router) == (E, None, "num_experts", "gate")
    assert all(layer.identity_slots == 1 for layer in s.layers)
    assert s.router_tensors == (("router_mlp.out_proj.weight", 0), ("balancing_biases", 0))
    assert (s.scoring, s.scoring_evidence) == ("softmax", "probe")
    assert check_contract(s, model).ok


def test_statistics_see_the_models_own_forward():
    """The sample's inputs are the blocks' own; the counts are the router's choices in the model's forward (with
    the carried router state), skips left out; the rule replays them, the skip slot as id 8 of weight 0."""
    model = zaya()
    ids = tokens()
    layout, stats = calibrated(model, ids)
    seen = own_forward(model, ids)
    skips = 0
    for m in layout.layers:
        ls = stats.layers[m.index]
        x = seen[m.index]["args"][0]
        logits, w, i, _ = seen[m.index]["out"]
        assert torch.allclose(ls.inputs, x.reshape(-1, x.shape[-1]), atol=1e-5), m.index
        chosen = torch.where(w == 0, E, i).flatten()                      # the router masks a skip as expert 0
        skips += int((chosen == E).sum())
        assert torch.equal(ls.counts, torch.bincount(chosen, minlength=E + 1)[:E].double())
        assert torch.allclose(ls.logits, logits[:, :E], atol=1e-6)
        rule = ls.routing
        assert (rule["identity_slots"], rule["scoring"], rule["renormalize"]) == (1, "softmax", False)
        w2, i2 = restricted_routing(ls.logits, range(E), rule, layout.top_k)
        assert torch.equal(i2.flatten(), chosen)
        assert torch.allclose(w2.flatten(), w.flatten().double(), atol=1e-6)
        assert rule["slots"] == "skip"          # read off the sample's skips, else probed (routing.slot_kind)
    assert skips > 0 and any(not (torch.where(s["out"][1] == 0, E, s["out"][2]) == E).any() for s in seen.values())


def test_pruned_router_keeps_the_skip_row():
    """Keeping 6 of 8: out_proj's rows and the balancing biases are the kept experts' then the skip slot's, the
    router scores 7 classes; the pruned model is what transformers builds from its config and weights. Keeping
    every expert gives the same logits."""
    model = zaya()
    plan = Plan("test", {}, {m.index: LayerPlan.selection(E, KEPT) for m in moe_layout(model).layers})
    pruned = pruned_copy(model, plan)
    before, after = model.model.layers[1].mlp.gate, pruned.model.layers[1].mlp.gate
    assert torch.equal(after.router_mlp.out_proj.weight, before.router_mlp.out_proj.weight[KEPT + [E]])
    assert torch.equal(after.balancing_biases, before.balancing_biases[KEPT + [E]])
    assert (after.num_experts, after.num_router_classes, pruned.config.num_experts) == (6, 7, 6)
    check_standard_and_keep_all(model, pruned, tokens(1, seed=3))


def test_replayed_routing_and_naee_are_the_pruned_blocks():
    """On the model's own block inputs and router states: the rule's replay of the kept subset is the pruned
    router's choice (the skip slot as id 8, weight 0), and NAEE's error is the pruned block's squared error."""
    model = zaya()
    ids = tokens()
    layout, stats = calibrated(model, ids)
    plan = Plan("test", {}, {m.index: LayerPlan.selection(E, KEPT) for m in layout.layers})
    after = moe_layout(pruned_copy(model, plan)).by_index()
    seen = own_forward(model, ids)
    slots = torch.tensor(KEPT + [E])
    for m in layout.layers:
        ls, p = stats.layers[m.index], after[m.index]
        args = seen[m.index]["args"]
        with torch.no_grad():
            _, w, local, _ = p.router(args[0], router_states=args[1])
            full, cut = m.block(*args)[0], p.block(*args)[0]
        chosen = torch.where(w == 0, E, slots[local]).flatten()
        w2, i2 = restricted_routing(ls.logits, KEPT, ls.routing, layout.top_k)
        assert torch.equal(i2.flatten(), chosen) and torch.allclose(w2.flatten(), w.flatten().double(), atol=1e-6)
        real = float((full - cut).double().square().sum())
        assert real > 0 and Reconstruction(ls)(tuple(KEPT)) == pytest.approx(real, rel=1e-4), m.index


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_prunes_zaya(method):
    """Every registered method plans the tiny Zaya at keep 4 of 8: routers of 4 + 1 rows, the skip row last, and
    the model runs."""
    model = zaya()
    layout, stats = calibrated(model, tokens(2, seed=5))
    plan = METHODS[method].plan(stats, keep=4, seed=0)
    pruned = pruned_copy(model, plan, stats)
    for m, before in zip(moe_layout(pruned).layers, layout.layers):
        weight = m.router.router_mlp.out_proj.weight
        assert m.num_experts == 4 and m.identity_slots == 1 and weight.shape[0] == 5
        assert torch.equal(weight[4:], before.router.router_mlp.out_proj.weight[E:])
        assert torch.equal(m.router.balancing_biases[4:], before.router.balancing_biases[E:])
    with torch.no_grad():
        assert torch.isfinite(pruned(input_ids=tokens(1)).logits).all()


def test_the_streamed_checkpoint_writes_what_the_model_in_memory_writes(tmp_path):
    """Self-calibration samples from the whole streamed model (CheckpointSource.whole): ZayaModel's own
    input_hidden_states_scale and _bias, outside any child module, are read for it as for the embeddings (the
    default auto stopped on a meta tensor), and the windows are those the model in memory writes."""
    from moeprune.selfcalib import sample_windows
    from moeprune.sources import CheckpointSource
    model = zaya()
    with torch.no_grad():
        model.model.input_hidden_states_scale.normal_(1.0, 0.5)     # not the identity, so a lost one shows
    model.save_pretrained(tmp_path / "in")
    source = CheckpointSource(tmp_path / "in", "cpu", torch.float32)
    with source.whole() as streamed:
        got = sample_windows(streamed, 1, 3, 16, seed=0, progress=False)
    assert source.model.model.input_hidden_states_scale.is_meta          # back on meta after
    assert torch.equal(got, sample_windows(model, 1, 3, 16, seed=0, progress=False))
