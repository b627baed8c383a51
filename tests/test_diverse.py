"""The paper's method: CKA, grouping, merge weights, router rule, neuron alignment."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import make
from moeprune.align import align_to, match, neuron_activations, neuron_features, permute_expert
from moeprune.arch import FAMILIES, moe_layout
from moeprune.calibration import collect
from moeprune.grouping import agglomerative, anchored, anchors, coverage_anchors, group, spectral
from moeprune.methods import get_method
from moeprune.methods.diverse import merge_weights
from moeprune.similarity import cka_matrix, cosine_matrix, linear_cka
from moeprune.surgery import apply_plan
from moeprune.tiny import tiny_model_any


@pytest.mark.parametrize("seed", range(5))
def test_cka_identity_and_invariances(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(50, 12, generator=g, dtype=torch.float64)
    y = torch.randn(50, 9, generator=g, dtype=torch.float64) + x[:, :9] * 0.5
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    scale = float(torch.rand(1, generator=g)) * 10 + 0.1
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    base = linear_cka(x, y)
    assert 0 < base < 1
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-10)       # orthogonal transform
    assert linear_cka(scale * x, y) == pytest.approx(base, abs=1e-10)   # isotropic scaling
    assert linear_cka(x + 3.0, y) == pytest.approx(base, abs=1e-10)     # centring


def test_cka_matrix_matches_pairwise_on_both_gram_sides():
    g = torch.Generator().manual_seed(0)
    for n, d in [(20, 7), (6, 30)]:
        reps = torch.randn(4, n, d, generator=g)
        m = cka_matrix(reps)
        assert torch.allclose(cka_matrix(reps, max_gram_entries=0), m, atol=1e-12)   # the per-pair path
        for i in range(4):
            for j in range(4):
                assert float(m[i, j]) == pytest.approx(linear_cka(reps[i], reps[j]), abs=1e-9)
    assert torch.allclose(cosine_matrix(torch.eye(3)), torch.eye(3, dtype=torch.float64))


def _blocks(sizes, noise=0.05, seed=0):
    """A similarity matrix with len(sizes) clear blocks, shuffled ids."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([b for b, s in enumerate(sizes) for _ in range(s)])
    labels = labels[torch.randperm(len(labels), generator=g)]
    sim = (labels[:, None] == labels[None, :]).double() * 0.8 + 0.1
    sim = sim + noise * torch.rand(len(labels), len(labels), generator=g, dtype=torch.float64)
    sim = (sim + sim.T) / 2
    sim.fill_diagonal_(1.0)
    truth = sorted((sorted(torch.where(labels == b)[0].tolist()) for b in range(len(sizes))), key=lambda x: x[0])
    return sim, truth


@pytest.mark.parametrize("how", ["agglomerative", "spectral"])
def test_grouping_recovers_blocks(how):
    sim, truth = _blocks([3, 2, 3])
    assert group(how, sim, 3) == truth
    assert all(len(group(how, sim, k)) == k for k in range(1, 9))       # always exactly K groups


def test_anchor_grouping_uses_usage():
    sim, truth = _blocks([4, 4])
    usage = torch.arange(8, dtype=torch.float64)          # the most used expert of each block anchors it
    groups = anchors(sim, 2, usage)
    assert groups == truth


def _labelled(labels: list[int], across: float) -> torch.Tensor:
    """Similarity 0.95 between experts of the same label, `across` between labels, 1 on the diagonal."""
    labels = torch.tensor(labels)
    sim = torch.where(labels[:, None] == labels[None, :], 0.95, across).double()
    return sim.fill_diagonal_(1.0)


def _distinct_minority():
    """Experts 0-3 near copies (heavily used), 4-6 near copies (medium), 7 unlike all (rarely used)."""
    sim = _labelled([0, 0, 0, 0, 1, 1, 1, 2], across=0.1)
    return sim, torch.tensor([10.0, 9, 8, 7, 5, 4, 3, 2], dtype=torch.float64)


def test_coverage_keeps_a_distinct_expert_that_top_usage_drops():
    sim, usage = _distinct_minority()
    assert anchors(sim, 3, usage) == [[0, 3, 4, 5, 6, 7], [1], [2]]     # three copies of one function kept
    assert coverage_anchors(sim, 3, usage) == [0, 4, 7]                 # one of each function kept
    assert anchored("coverage", sim, 3, usage) == ([[0, 1, 2, 3], [4, 5, 6], [7]], [0, 4, 7])
    assert group("coverage", sim, 3, usage) == [[0, 1, 2, 3], [4, 5, 6], [7]]
    assert coverage_anchors(sim, 1, usage) == [0]                       # one anchor: the heaviest block's


@pytest.mark.parametrize("seed", range(4))
def test_coverage_greedy_is_within_its_guarantee_of_the_best_set(seed):
    from itertools import combinations
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64)
    sim = cosine_matrix(x).clamp_min(0)
    w = torch.rand(9, generator=g, dtype=torch.float64)

    def value(chosen):
        return float((w * sim[:, list(chosen)].max(1).values).sum())

    best = max(value(c) for c in combinations(range(9), 3))
    greedy = value(coverage_anchors(sim, 3, w))
    assert greedy <= best + 1e-12 and greedy >= (1 - 1 / torch.e) * best


def test_grouping_is_deterministic_under_ties():
    sim = torch.ones(6, 6, dtype=torch.float64)
    assert agglomerative(sim, 3) == agglomerative(sim.clone(), 3)
    assert spectral(sim, 2) == spectral(sim.clone(), 2)


def test_merge_weights_are_a_softmax_of_similarity():
    sim = torch.tensor([[1.0, 0.8, 0.2], [0.8, 1.0, 0.1], [0.2, 0.1, 1.0]], dtype=torch.float64)
    for tau in (0.1, 1.0, 5.0):
        w = merge_weights(sim, 0, [0, 1, 2], tau)
        expect = torch.softmax(torch.tensor([1.0, 0.8, 0.2], dtype=torch.float64) / tau, 0)
        assert sum(w) == pytest.approx(1.0) and torch.allclose(torch.tensor(w, dtype=torch.float64), expect)
    with pytest.raises(ValueError):
        merge_weights(sim, 0, [0, 1], 0.0)


def prototype_model(seed=0, noise=0.15):
    """A Mixtral whose 8 experts are noisy copies of 3 prototypes (router rows copied likewise)."""
    model = make("mixtral", seed=seed)
    layout = moe_layout(model)
    proto_of = [0, 1, 2, 0, 1, 2, 0, 1]
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for layer in layout.layers:
            for p in list(layer.experts.parameters()) + [layer.router.weight]:
                base = p[:3].clone()
                for e, k in enumerate(proto_of):
                    p[e] = base[k] + noise * base[k].std() * torch.randn(base[k].shape, generator=g)
    return model, layout, [[0, 3, 6], [1, 4, 7], [2, 5]]


def test_prototypes_are_recovered_and_merging_beats_keeping_one():
    model, layout, truth = prototype_model()
    tokens = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    stats = collect(model, layout, tokens, sample_tokens=128, progress=False)
    reference = model(tokens).logits
    errors = {}
    for name in ("diverse-paper", "diverse-prune"):
        plan = get_method(name).plan(stats, keep=3, grouping="agglomerative")
        if name == "diverse-paper":
            for lp in plan.layers.values():
                assert lp.groups == truth
                for w in lp.weights:
                    assert sum(w) == pytest.approx(1.0)
        pruned = copy.deepcopy(model)
        apply_plan(pruned, moe_layout(pruned), plan, stats)
        errors[name] = float((pruned(tokens).logits - reference).square().mean())
    assert errors["diverse-paper"] < errors["diverse-prune"]


@pytest.mark.parametrize("saliency", ["frequency", "contribution"])
def test_representative_is_the_most_salient_member_and_router_rule_recorded(saliency):
    model, layout, truth = prototype_model(seed=1)
    tokens = torch.randint(3, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    stats = collect(model, layout, tokens, sample_tokens=64, progress=False)
    for rule in ("weighted", "representative"):
        plan = get_method("diverse").plan(stats, keep=3, router=rule, saliency=saliency, grouping="anchors")
        assert plan.router == rule
        for i, lp in plan.layers.items():
            ls = stats.layers[i]
            score = ls.counts if saliency == "frequency" else ls.reap_sum
            for g, r in zip(lp.groups, lp.representatives):
                assert r == min(g, key=lambda e: (-float(score[e]), e))
        paper = get_method("diverse-paper").plan(stats, keep=3)      # the paper: the most routed member
        for i, lp in paper.layers.items():
            counts = stats.layers[i].counts
            assert lp.representatives == [min(g, key=lambda e: (-float(counts[e]), e)) for g in lp.groups]
        pruned = copy.deepcopy(model)
        pl = moe_layout(pruned)
        apply_plan(pruned, pl, plan, stats)
        w = layout.layers[0].router.weight
        lp = plan.layers[0]
        got = pl.layers[0].router.weight[0]
        expect = (w[lp.representatives[0]] if rule == "representative"
                  else sum(a * w[e] for e, a in zip(lp.groups[0], lp.weights[0])))
        assert torch.allclose(got, expect, atol=1e-6)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "aria_text", "nemotron_h", "ergo"])  # halves, interleaved_t, halves_t, plain, plain_t
@pytest.mark.parametrize("mode", ["weights", "activations"])
def test_alignment_recovers_a_permutation_and_merging_is_identity(family, mode):
    model = make(family) if family in FAMILIES else tiny_model_any(family)
    layout = moe_layout(model)
    layer = layout.layers[0]
    lay = layout.family.gate_up
    ref = {n: p[2].detach().clone() for n, p in layer.experts.named_parameters()}
    inter = ref["down_proj"].shape[0 if lay.endswith("_t") else 1]
    perm = torch.randperm(inter, generator=torch.Generator().manual_seed(3))
    shuffled = permute_expert(ref, perm, lay)
    x = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    if mode == "weights":
        found = match(neuron_features(ref, lay), neuron_features(shuffled, lay))
    else:
        found = match(neuron_activations(layer, ref, x, lay), neuron_activations(layer, shuffled, x, lay))
    assert torch.equal(perm[found], torch.arange(inter))          # the permutation is undone exactly
    aligned = align_to(layer, ref, shuffled, lay, mode, x)
    for n in ref:
        assert torch.allclose(aligned[n], ref[n])
    # the shuffled copy computes the same function; merged with its original after alignment: identity
    with torch.no_grad():
        for n, p in layer.experts.named_parameters():
            p[5] = shuffled[n]
    want = layer.expert(x, 2)
    assert torch.allclose(layer.expert(x, 5), want, atol=1e-5)
    from moeprune.plan import LayerPlan, Plan
    groups = [[0], [1], [2, 5], [3], [4], [6], [7]]
    plan = Plan("t", {}, {l.index: LayerPlan(8, groups, [[1.0], [1.0], [0.5, 0.5]] + [[1.0]] * 4,
                                              [0, 1, 2, 3, 4, 6, 7]) for l in layout.layers}, align=mode)
    stats = collect(model, layout, torch.randint(3, 256, (1, 16)), sample_tokens=16, progress=False) \
        if mode == "activations" else None
    if stats is not None:      # align on the same tokens the test checks
        for ls in stats.layers.values():
            ls.inputs = x
    apply_plan(model, layout, plan, stats)
    assert torch.allclose(layer.expert(x, 2), want, atol=1e-5)


def test_anchored_groupings_represent_each_group_by_its_anchor():
    model, layout, truth = prototype_model(seed=2)
    tokens = torch.randint(3, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    stats = collect(model, layout, tokens, sample_tokens=64, progress=False)
    for grouping in ("anchors", "coverage"):
        for saliency in ("frequency", "reap"):
            plan = get_method("diverse").plan(stats, keep=3, grouping=grouping, saliency=saliency,
                                              weighting="saliency", tau=0.1, diversity=0.0)
            for i, lp in plan.layers.items():
                ls = stats.layers[i]
                score = ls.counts if saliency == "frequency" else ls.reap_saliency
                if grouping == "anchors":       # the anchors are the K most salient experts
                    top3 = sorted(range(8), key=lambda e: (-float(score[e]), e))[:3]
                    assert sorted(lp.representatives) == sorted(top3)
                else:
                    assert sorted(lp.representatives) == coverage_anchors(get_sim(ls), 3, score)
                    if saliency == "reap":      # similar saliencies: one anchor per prototype
                        assert lp.groups == truth
                for g, r, w in zip(lp.groups, lp.representatives, lp.weights):
                    # merge weights follow saliency x softmax(S / tau): the anchor weighs most unless a
                    # member is much more salient
                    sal = torch.tensor([float(score[e]) for e in g], dtype=torch.float64)
                    sim = torch.tensor([float(get_sim(ls)[r, e]) for e in g], dtype=torch.float64)
                    expect = torch.softmax(sim / 0.1 + sal.clamp_min(1e-12).log(), 0)
                    assert torch.allclose(torch.tensor(w, dtype=torch.float64), expect, atol=1e-9)


def get_sim(ls):
    from moeprune.methods.diverse import similarity
    return similarity(ls, "output", "cka")


def test_every_option_combination_plans(tmp_path):
    model = make("qwen3_moe")
    layout = moe_layout(model)
    stats = collect(model, layout, torch.randint(3, 256, (2, 16)), sample_tokens=32, progress=False)
    for rep in ("output", "weight"):
        for sim in ("cka", "cosine"):
            for grouping in ("agglomerative", "spectral", "anchors", "coverage"):
                plan = get_method("diverse").plan(stats, keep=4, representation=rep, similarity=sim,
                                                  grouping=grouping)
                assert all(lp.keep == 4 for lp in plan.layers.values())
    with pytest.raises(Exception, match="grouping"):
        get_method("diverse").plan(stats, keep=4, grouping="hierarchical")


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_fitted_merge_reproduces_the_group_better_than_averaging(family):
    """The least-squares down projection can only lower the weighted error the average has (D_avg is feasible)."""
    from moeprune.observer import probabilities
    model = make(family)
    layout = moe_layout(model)
    tokens = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    stats = collect(model, layout, tokens, sample_tokens=96, progress=False)
    groups = [[0, 1, 2], [3], [4], [5], [6, 7]]
    errors = {}
    for merge in ("average", "fit"):
        from moeprune.plan import LayerPlan, Plan
        lps = {i: LayerPlan(8, groups, [[1 / 3] * 3, [1.0], [1.0], [1.0], [0.5, 0.5]], [0, 3, 4, 5, 6])
               for i in stats.layers}
        pruned = copy.deepcopy(model)
        pl = moe_layout(pruned)
        apply_plan(pruned, pl, Plan("t", {}, lps, merge=merge), stats)
        total = 0.0
        for layer in pl.layers:
            ls = stats.layers[layer.index]
            p = probabilities(ls.logits, layout.family.scoring)[:, [0, 1, 2]]
            w = p.sum(1)
            target = torch.einsum("tg,gtd->td", p, ls.outputs[[0, 1, 2]].double()) / w[:, None]
            out = layer.expert(ls.inputs, 0).double()
            total += float((w[:, None] * (out - target).square()).sum())
        errors[merge] = total
    assert errors["fit"] < errors["average"]


def test_usage_weighting_multiplies_the_softmax_by_usage():
    sim = torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    usage = torch.tensor([30.0, 10.0], dtype=torch.float64)
    w = merge_weights(sim, 0, [0, 1], 1.0, usage)
    expect = torch.tensor([30 * torch.e ** 1.0, 10 * torch.e ** 0.5])
    assert torch.allclose(torch.tensor(w), expect / expect.sum())
    assert merge_weights(sim, 0, [0, 1], 1.0, torch.zeros(2)) == merge_weights(sim, 0, [0, 1], 1.0)


# --- step 4: anchors between saliency and diversity (--diversity), slots guaranteed to diversity (--reserve) ---

def _copies_and_a_rare_one():
    """Experts 0-5 near copies of one function (heavily used), 6 and 7 each unlike all others, 7 rarely used."""
    sim = _labelled([0, 0, 0, 0, 0, 0, 1, 2], across=0.05)
    return sim, torch.tensor([20.0, 18, 16, 14, 12, 10, 6, 1], dtype=torch.float64)


def test_diversity_zero_is_top_saliency_and_one_is_usage_blind_coverage():
    from moeprune.grouping import balanced_anchors, pick_anchors, top_anchors
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        sim = cosine_matrix(torch.randn(10, 4, generator=g, dtype=torch.float64))
        score = torch.randint(0, 4, (10,), generator=g).double()       # many ties: lower ids must win them
        for k in (1, 3, 6):
            assert sorted(balanced_anchors(sim, k, score, 0.0)) == sorted(top_anchors(score, k))
            assert pick_anchors("anchors", sim, k, score, diversity=0.0) == sorted(top_anchors(score, k))
            pure = coverage_anchors(sim, k, torch.ones(10, dtype=torch.float64))
            assert sorted(balanced_anchors(sim, k, score, 1.0)) == pure
            assert pick_anchors("anchors", sim, k, score, diversity=1.0) == pure      # both groupings meet at 1
            assert pick_anchors("coverage", sim, k, score, diversity=1.0) == pure
            assert pick_anchors("coverage", sim, k, score) == coverage_anchors(sim, k, score)
            assert pick_anchors("anchors", sim, k, score, reserve=1.0) == pure


def test_diversity_keeps_the_rare_distinct_expert_and_the_most_used_one():
    sim, usage = _copies_and_a_rare_one()
    from moeprune.grouping import pick_anchors
    assert pick_anchors("anchors", sim, 3, usage) == [0, 1, 2]                      # saliency: three copies
    for diversity in (0.75, 0.9):
        kept = pick_anchors("anchors", sim, 3, usage, diversity=diversity)
        assert kept == [0, 6, 7]                # one of the copies (the most used), and both distinct experts
        groups, reps = anchored("anchors", sim, 3, usage, diversity=diversity)
        assert groups == [[0, 1, 2, 3, 4, 5], [6], [7]] and reps == [0, 6, 7]
    # the weight is a dial: a distinct expert enters once lambda x (its own coverage) outweighs
    # (1 - lambda) x its saliency gap to the next copy; the rare one (usage 1) needs more than the other (6)
    assert pick_anchors("anchors", sim, 3, usage, diversity=0.1) == [0, 1, 2]
    assert pick_anchors("anchors", sim, 3, usage, diversity=0.5) == [0, 1, 6]
    assert pick_anchors("anchors", sim, 4, usage, diversity=0.6) == [0, 1, 6, 7]
    assert pick_anchors("anchors", sim, 2, usage, diversity=0.6) == [0, 6]


def test_reserve_guarantees_slots_to_the_least_covered_experts():
    sim, usage = _copies_and_a_rare_one()
    from moeprune.grouping import pick_anchors
    assert pick_anchors("anchors", sim, 4, usage, reserve=0.25) == [0, 1, 2, 6]     # 3 by saliency, 1 distinct
    assert pick_anchors("anchors", sim, 4, usage, reserve=0.5) == [0, 1, 6, 7]      # 2 and 2
    assert pick_anchors("coverage", sim, 4, usage, reserve=0.5)[:1] == [0]          # the heaviest stays
    assert pick_anchors("anchors", sim, 4, usage, reserve=0.1) == [0, 1, 2, 3]      # round(0.4) = 0 slots


def test_diversity_on_coverage_mixes_saliency_and_uniform_weights():
    from moeprune.grouping import pick_anchors
    sim, usage = _distinct_minority()
    for d in (0.0, 0.3, 0.7, 1.0):
        w = usage if d == 0 else (1 - d) * usage / usage.sum() + d / 8
        assert pick_anchors("coverage", sim, 3, usage, diversity=d) == coverage_anchors(sim, 3, w)


@pytest.mark.parametrize("given,message", [
    ({"diversity": 1.5}, "--diversity must lie in [0, 1]"),
    ({"reserve": -0.1}, "--reserve must lie in [0, 1]"),
    ({"grouping": "agglomerative", "diversity": 0.5}, "need --grouping anchors or coverage"),
    ({"grouping": "spectral", "reserve": 0.5}, "need --grouping anchors or coverage"),
])
def test_diversity_and_reserve_are_checked_before_any_work(given, message):
    from moeprune.arch import MoePruneError
    for name in ("diverse", "diverse-prune"):
        with pytest.raises(MoePruneError, match=message.replace("[", r"\[").replace("]", r"\]")):
            get_method(name).make_options(**given)


def test_diversity_and_reserve_plan_and_reach_the_cli(tmp_path, capsys):
    model = make("qwen3_moe")
    layout = moe_layout(model)
    stats = collect(model, layout, torch.randint(3, 256, (2, 16)), sample_tokens=32, progress=False)
    for grouping in ("anchors", "coverage"):
        for opts in ({"diversity": 0.5}, {"reserve": 0.5}, {"diversity": 1.0, "representation": "weight"}):
            for name in ("diverse", "diverse-prune"):
                plan = get_method(name).plan(stats, keep=4, grouping=grouping, **opts)
                assert all(lp.keep == 4 for lp in plan.layers.values())
                assert all(plan.options[k] == v for k, v in opts.items())
    from moeprune.cli import main
    path = tmp_path / "model"
    make("mixtral").save_pretrained(path)
    code = main(["prune", str(path), "--keep", "4", "--out", str(tmp_path / "o"), "--calib", "random",
                 "--diversity", "2"])
    assert code == 2 and "--diversity must lie in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    code = main(["prune", str(path), "--keep", "4", "--out", str(tmp_path / "p"), "--calib", "random",
                 "--samples", "2", "--seq-len", "16", "--no-eval", "--diversity", "0.5", "--reserve", "0.25"])
    assert code == 0
    saved = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert saved["options"]["diversity"] == 0.5 and saved["options"]["reserve"] == 0.25


def test_default_diversity_applies_to_anchored_groupings_only():
    from moeprune.methods.diverse import DIVERSITY
    default = get_method("diverse").make_options()
    assert (default.grouping, default.diversity, default.saliency) == ("coverage", 0.25, "contribution")
    assert DIVERSITY == {"coverage": 0.25, "anchors": 0.0}
    assert get_method("diverse-prune").make_options(grouping="coverage").diversity == 0.25
    assert get_method("diverse").make_options(grouping="anchors").diversity == 0.0     # plain top saliency
    for grouping in ("agglomerative", "spectral"):          # no anchors to choose: 0, and no error
        assert get_method("diverse").make_options(grouping=grouping).diversity == 0.0
    assert get_method("diverse-paper").make_options().diversity == 0.0
    assert get_method("diverse").make_options(diversity=0.0).diversity == 0.0


def test_balanced_saliency_lies_between_contribution_and_reap():
    """A rare expert that acts strongly when routed: REAP ranks it first, contribution (x its frequency) last,
    balanced (x the square root of its frequency) in between."""
    from moeprune.methods.diverse import saliency
    from moeprune.stats import LayerStats
    counts = torch.tensor([100.0, 100.0, 4.0], dtype=torch.float64)     # expert 2 is rare
    strength = torch.tensor([1.0, 0.5, 4.0], dtype=torch.float64)       # ... and strong when routed
    empty = torch.empty(0)
    ls = LayerStats(layer=0, top_k=1, tokens=204, counts=counts, prob_sum=counts.clone(), weight_sum=counts.clone(),
                    reap_sum=strength * counts, inputs=empty, logits=empty, outputs=empty)
    order = {k: saliency(ls, k).argsort(descending=True).tolist() for k in ("reap", "contribution", "balanced")}
    assert order["reap"] == [2, 0, 1] and order["contribution"] == [0, 1, 2] and order["balanced"] == [0, 2, 1]
    assert torch.allclose(saliency(ls, "balanced"), strength * counts.sqrt())
