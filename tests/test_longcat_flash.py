"""LongCat-Flash's router scores its E routed experts and Z zero-computation (identity) experts (config
zero_expert_num) together: logits [n, E + Z], softmax over all of them, the choice on the scores plus a correction
bias; a token routed to an identity slot gets w * x from the block (LongcatFlashMoE), no expert runs.

Pruning keeps the identity slots: they are not experts to keep or drop. The router rows and correction bias keep
the Z identity rows after the K kept experts' (K + Z rows, n_routed_experts = K in config.json); the statistics
count the real experts only; the routing rule records the identity slots' logits, and its replay keeps them in
every subset, so NAEE's error of a subset is the pruned block's (identity outputs included). Found by structure: no
arch entry (a router of E + Z rows beside E experts, and a config int naming Z zero experts)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import calibrated, check_standard_and_keep_all, pruned_copy
from conftest import token_rows as tokens

import moeprune.methods  # noqa: F401  registers the methods
from moeprune.arch import FAMILIES, MoePruneError, moe_layout
from moeprune.discover import check_contract, find_moe
from moeprune.methods.naee import Reconstruction
from moeprune.methods.registry import METHODS
from moeprune.plan import LayerPlan, Plan
from moeprune.routing import join_rules, restricted_routing
from moeprune.tiny import tiny_config_any, tiny_model_any

torch.set_num_threads(1)
E, Z = 8, 3
KEPT = [0, 2, 3, 5, 7]                  # K + Z = 8 = E: the router's row count equals the old expert count


def longcat():
    """The tiny LongCat-Flash (8 experts, 3 identity slots, top-k 2), its routers live: logits that spread the
    softmax over the 11 rows and a correction bias of the scores' size, so identity slots are chosen."""
    model = tiny_model_any("longcat_flash")
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            g = torch.Generator().manual_seed(i)
            layer.mlp.router.classifier.weight.normal_(0.0, 0.3, generator=g)
            layer.mlp.router.e_score_correction_bias.copy_(torch.randn(E + Z, generator=g) * 0.02)
    return model





def test_identity_experts_are_found_by_structure():
    """A router of E + Z rows beside E experts, and a config int of Z that names zero experts: found on the live
    model and on the meta skeleton alike, without an arch entry; the expert count is n_routed_experts, not the
    zero-expert count; the contract holds with logits of E + Z columns. Without the config int it is refused."""
    assert "longcat_flash" not in FAMILIES
    model = longcat()
    with torch.device("meta"):
        skeleton = type(model)._from_config(copy.deepcopy(model.config))
    for m in (model, skeleton):
        s = find_moe(m)
        assert (s.num_experts, s.identity_key, s.n_experts_key, s.top_k_key) == (E, "zero_expert_num",
                                                                              "n_routed_experts", "moe_topk")
        assert all(layer.identity_slots == Z for layer in s.layers)
        assert s.router_tensors == (("classifier.weight", 0), ("e_score_correction_bias", 0))
        assert [t.shape[0] for t in s.layers[0].router_tensors] == [E + Z, E + Z]
    s = find_moe(model)
    assert s.scoring == "softmax" and s.scoring_evidence == "probe"
    assert check_contract(s, model).ok and "[6, 11]" in check_contract(s, model).router_returns
    layout = moe_layout(model)
    assert layout.family.identity_experts == "zero_expert_num" and layout.layers[0].identity_slots == Z
    odd = copy.deepcopy(model.config)
    odd.zero_expert_num = 2                          # the routers still score 3 more rows: not the config's count
    with torch.device("meta"):
        built = type(model)._from_config(tiny_config_any("longcat_flash"))
    built.config = odd
    with pytest.raises(MoePruneError, match="no config int names 3 zero-computation or shared experts"):
        find_moe(built)


def test_statistics_count_the_real_experts_only():
    """Counts, summed probabilities and weights of the E real experts: a choice of an identity slot is no expert's;
    the probabilities are the softmax over all E + Z rows. The sample's logits are the real experts'; the rule
    holds the identity slots' and their count."""
    model = longcat()
    ids = tokens()
    layout, stats = calibrated(model, ids)
    for m in layout.layers:
        ls = stats.layers[m.index]
        logits, w, i = m.route(ls.inputs)
        real = i < E
        assert 0 < int((~real).sum()) < i.numel()                      # identity slots chosen, not only
        assert ls.counts.shape == (E,) and torch.equal(ls.counts, torch.bincount(i[real], minlength=E).double())
        assert torch.allclose(ls.prob_sum, torch.softmax(logits.double(), -1)[:, :E].sum(0), rtol=1e-5)
        assert torch.allclose(ls.weight_sum, torch.zeros(E, dtype=torch.float64).index_add_(0, i[real],
                                                                                             w[real].double()))
        assert ls.logits.shape == (ids.numel(), E) and torch.allclose(ls.logits, logits[:, :E])
        assert ls.routing["identity_slots"] == Z and len(ls.routing["identity_logits"]) == ids.numel()
        assert torch.allclose(torch.tensor(ls.routing["identity_logits"]), logits[:, E:])
        assert ls.routing["scoring"] == "softmax" and not ls.routing["renormalize"]
        assert ls.routing["scale"] == pytest.approx(model.config.routed_scaling_factor)


def test_pruned_router_keeps_the_identity_rows():
    """Keeping 5 of 8: the router's rows and correction bias are the kept experts' then the 3 identity rows, the
    router counts 8 rows (5 + 3, the old expert count: the model-level update leaves it), the block's identity test
    uses 5; the pruned model is what transformers builds from its config and weights. Keeping every expert gives
    the same logits."""
    model = longcat()
    plan = Plan("test", {}, {m.index: LayerPlan.selection(E, KEPT) for m in moe_layout(model).layers})
    pruned = pruned_copy(model, plan)
    before, after = model.model.layers[1].mlp, pruned.model.layers[1].mlp
    rows = KEPT + list(range(E, E + Z))
    assert torch.equal(after.router.classifier.weight, before.router.classifier.weight[rows])
    assert torch.equal(after.router.e_score_correction_bias, before.router.e_score_correction_bias[rows])
    assert (after.router.n_routed_experts, after.router.num_experts, after.num_routed_experts,
            after.experts.num_experts, after.zero_expert_num) == (len(KEPT) + Z, len(KEPT), len(KEPT), len(KEPT), Z)
    assert (pruned.config.n_routed_experts, pruned.config.zero_expert_num) == (len(KEPT), Z)
    check_standard_and_keep_all(model, pruned, tokens(1, seed=3))


def test_replayed_routing_and_naee_are_the_pruned_blocks():
    """The rule replays the router and the pruned router (identity slots as ids 8, 9, 10 in every subset); NAEE's
    error of the kept subset is the pruned block's squared error on the sample, the identity outputs (w * x) in
    both: they are a part of the layer's output that the error must count."""
    model = longcat()
    ids = tokens()
    layout, stats = calibrated(model, ids)
    plan = Plan("test", {}, {m.index: LayerPlan.selection(E, KEPT) for m in layout.layers})
    after = moe_layout(pruned_copy(model, plan)).by_index()
    slots = torch.tensor(KEPT + list(range(E, E + Z)))
    for m in layout.layers:
        ls, p = stats.layers[m.index], after[m.index]
        x = ls.inputs
        _, w, i = m.route(x)
        w2, i2 = restricted_routing(ls.logits, range(E), ls.routing, layout.top_k)
        assert torch.equal(i.sort(-1).values, i2.sort(-1).values)
        _, w, local = p.route(x)
        w, i = w.gather(1, slots[local].argsort(-1)), slots[local].sort(-1).values
        w2, i2 = restricted_routing(ls.logits, KEPT, ls.routing, layout.top_k)
        assert torch.equal(i, i2.sort(-1).values)
        assert torch.allclose(w.double(), w2.gather(1, i2.argsort(-1)), atol=1e-6)
        with torch.no_grad():
            full, cut = m.block(x), p.block(x)
            assert float((full - m.experts(x, *reversed(m.route(x)[1:]))).abs().max()) > 1e-4   # identity outputs
            real = float((full - cut).double().square().sum())
        assert Reconstruction(ls)(tuple(KEPT)) == pytest.approx(real, rel=1e-4, abs=1e-9), m.index


def test_joined_samples_join_the_identity_logits():
    """Statistics of two passes joined (self-written windows beside text): the rules' identity logits are
    concatenated like the logits (routing.join_rules); left unjoined, the replay refuses with what to do."""
    model = longcat()
    layout, a = calibrated(model, tokens(1, seed=1))
    _, b = calibrated(model, tokens(1, seed=2))
    for i in a.layers:
        la, lb = a.layers[i], b.layers[i]
        logits = torch.cat([la.logits, lb.logits])
        rule = join_rules(la.routing, lb.routing)
        w, idx = restricted_routing(logits, KEPT, rule, layout.top_k)
        wa, ia = restricted_routing(la.logits, KEPT, la.routing, layout.top_k)
        wb, ib = restricted_routing(lb.logits, KEPT, lb.routing, layout.top_k)
        assert torch.equal(idx, torch.cat([ia, ib])) and torch.allclose(w, torch.cat([wa, wb]))
        with pytest.raises(MoePruneError, match="join_rules"):
            restricted_routing(logits, KEPT, la.routing, layout.top_k)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_prunes_longcat(method):
    """Every registered method plans the tiny LongCat-Flash at keep 4 of 8: the pruned routers have 4 + 3 rows,
    the identity rows the input's, and the model runs."""
    model = longcat()
    layout, stats = calibrated(model, tokens(2, seed=5))
    plan = METHODS[method].plan(stats, keep=4, seed=0)
    pruned = pruned_copy(model, plan, stats)
    for m, before in zip(moe_layout(pruned).layers, layout.layers):
        assert m.num_experts == 4 and m.identity_slots == Z
        weight = m.router.classifier.weight
        assert weight.shape[0] == 4 + Z and torch.equal(weight[4:], before.router.classifier.weight[E:])
    with torch.no_grad():
        assert torch.isfinite(pruned(input_ids=tokens(1)).logits).all()


def test_slot_kind_is_probed_as_identity():
    """Where a layer's sample never chooses an identity slot, the rule reads the slots' kind off the router with its
    correction bias raised on them (routing.slot_kind): LongCat's give a weight (identity), Zaya's none (skip)."""
    from moeprune.routing import slot_kind
    model = longcat()
    layer = moe_layout(model).layers[0]
    x = torch.randn(8, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    bias = layer.router.e_score_correction_bias.clone()
    assert slot_kind(layer, x) == "identity" and torch.equal(layer.router.e_score_correction_bias, bias)
