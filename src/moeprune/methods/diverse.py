"""The paper's method: group similar experts, merge each group ("diverse"), or keep one per group.

Defaults differ from the paper's description where the ablation on the demo models says so
(docs/ABLATION.md): K anchors chosen greedily to cover the layer's functions, each expert weighted
a quarter of the way from its contribution (routing frequency x mean gate-weighted output norm) to
uniform (--grouping coverage --diversity 0.25), anchor the groups, and merge weights multiply the paper's
similarity softmax (tau 0.1) by routing frequency. `diverse-paper` keeps the description.

Zhang et al., "Diversifying the Expert Knowledge for Task-Agnostic Pruning in Sparse
Mixture-of-Experts" (arXiv:2407.09590, ACL 2025 Findings). Per layer:
  1. represent each expert: its outputs on the calibration sample (data-centric) or its weights;
  2. similarity matrix S (linear CKA or cosine);
  3. partition into K groups of similar experts;
  4. representative r = the most salient member; merge weights a_i = softmax_i(S_ri / tau);
  5. merged expert and router row = sum_i a_i W_i (or the representative's router row).
"diverse-prune" keeps each group's representative and drops the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..arch import MoePruneError
from ..grouping import ANCHORED, anchored, check_share, group, ranked
from ..plan import Align, LayerPlan, Merge, RouterRule
from ..similarity import SIMILARITIES
from ..stats import LayerStats
from .registry import Method, register

# the default --diversity of each anchored grouping: with half the calibration written by the model itself,
# coverage a quarter of the way to pure diversity had the best worst held-out domain of the validation folds
# (all seven domains out one at a time, and code and math out together), its mean within 0.4% of the best
# (docs/ABLATION.md, step 5; halfway, step 4's choice without self-calibration, now loses on both);
# `anchors` keeps its plain top-saliency meaning unless --diversity is given
DIVERSITY = {"coverage": 0.25, "anchors": 0.0}
PAPER = "Zhang et al., Diversifying the Expert Knowledge for Task-Agnostic Pruning in Sparse MoE, arXiv:2407.09590"


@dataclass(frozen=True)
class GroupOptions:
    representation: Literal["output", "weight"] = "output"
    similarity: Literal["cka", "cosine"] = "cka"
    # defaults chosen on calibration validation data (docs/ABLATION.md): usage-aware anchors beat the
    # usage-blind agglomerative grouping by a wide margin on both demo models (step 1); anchors that cover
    # the layer's functions, halfway between saliency and pure diversity, beat top-saliency anchors on
    # domains left out of the calibration, code and math included (step 4)
    grouping: Literal["agglomerative", "spectral", "anchors", "coverage"] = "coverage"
    # what makes an expert worth keeping: how often it is routed (frequency); REAP's mean gate x output
    # norm over its routed tokens (reap: blind to how often the calibration mix happens to need it); or
    # their product, its expected share of the layer output per token (contribution); or between the last two,
    # REAP's saliency x sqrt(frequency) (balanced: rare experts count more than under contribution)
    # (chosen on domain-out validation of the calibration data, docs/ABLATION.md)
    saliency: Literal["frequency", "reap", "contribution", "balanced"] = "contribution"
    # anchored groupings only: how far the anchors move from saliency towards pure diversity (0: saliency
    # alone, 1: usage-blind coverage of the similarity), and the share of the K slots guaranteed to
    # diversity (filled last, each by the expert least like those kept); moeprune.grouping has the rules
    # (None: DIVERSITY[grouping] with an anchored grouping, 0 with the others, which take no anchors)
    diversity: float | None = None
    reserve: float = 0.0

    def __post_init__(self):        # checked when the options are made, before any heavy work
        if self.diversity is None:
            object.__setattr__(self, "diversity", DIVERSITY.get(self.grouping, 0.0))
        check_share("diversity", self.diversity)
        check_share("reserve", self.reserve)
        if (self.diversity or self.reserve) and self.grouping not in ANCHORED:
            raise MoePruneError("--diversity and --reserve choose anchors: they need --grouping anchors or "
                                f"coverage, not {self.grouping}")


@dataclass(frozen=True)
class DiverseOptions(GroupOptions):
    tau: float = 0.1
    # merge weights: the paper's softmax of similarity to the representative, or that softmax times each
    # member's routing frequency (usage) or saliency, so that a minor member cannot dilute a major one
    weighting: Literal["similarity", "usage", "saliency"] = "usage"
    router: RouterRule = "weighted"
    align: Align = "none"
    merge: Merge = "average"

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.tau, (int, float)) and math.isfinite(self.tau) and self.tau > 0):
            raise MoePruneError(f"--tau {self.tau} must be a positive number: the temperature of the merge weights' "
                                "softmax (0.1 by default; larger: more even weights)")


def similarity(ls: LayerStats, representation: str, kind: str) -> torch.Tensor:
    """[E, E] similarity of a layer's experts, computed once and cached with the statistics."""
    key = f"similarity/{kind}/{representation}"
    if representation == "weight":
        if key not in ls.cache:
            raise ValueError("these statistics carry no weight similarity; recollect them")
        return ls.cache[key].double()
    return ls.cached(key, lambda: SIMILARITIES[kind](ls.outputs).float()).double()


def saliency(ls: LayerStats, kind: str) -> torch.Tensor:
    if kind == "balanced":          # sqrt(reap x contribution): the geometric mean of the two
        return (ls.reap_saliency.double() * ls.reap_sum.double()).sqrt()
    return {"frequency": ls.counts, "reap": ls.reap_saliency, "contribution": ls.reap_sum}[kind].double()


def representative(members: list[int], score: torch.Tensor) -> int:
    """The member of highest saliency; ties go to the lowest id."""
    return ranked(score, members)[0]


def merge_weights(sim: torch.Tensor, rep: int, members: list[int], tau: float,
                  usage: torch.Tensor | None = None) -> list[float]:
    """softmax over members i of S[rep, i] / tau; with usage, a_i proportional to usage_i * exp(S[rep, i] / tau)."""
    if tau <= 0:
        raise ValueError(f"--tau must be > 0, got {tau}")
    logits = torch.tensor([float(sim[rep, i]) for i in members], dtype=torch.float64) / tau
    if usage is not None:
        u = torch.tensor([float(usage[i]) for i in members], dtype=torch.float64)
        if u.sum() > 0:
            logits = logits + u.clamp_min(1e-12).log()
    return torch.softmax(logits, dim=0).tolist()


def _groups(ls: LayerStats, keep: int, o: GroupOptions):
    """Similarity, groups, and each group's representative (its anchor, for anchored groupings)."""
    sim = similarity(ls, o.representation, o.similarity)
    score = saliency(ls, o.saliency)
    if o.grouping in ANCHORED:
        return (sim, *anchored(o.grouping, sim, keep, score, o.diversity, o.reserve))
    groups = group(o.grouping, sim, keep)
    return sim, groups, [representative(g, score) for g in groups]


def diverse(ls: LayerStats, keep: int, o: DiverseOptions, seed: int) -> LayerPlan:
    sim, groups, reps = _groups(ls, keep, o)
    usage = None if o.weighting == "similarity" else saliency(ls, "frequency" if o.weighting == "usage" else o.saliency)
    weights = [merge_weights(sim, r, g, o.tau, usage) for g, r in zip(groups, reps)]
    return LayerPlan(ls.num_experts, groups, weights, reps)


def diverse_prune(ls: LayerStats, keep: int, o: GroupOptions, seed: int) -> LayerPlan:
    _, groups, reps = _groups(ls, keep, o)
    return LayerPlan.selection(ls.num_experts, reps, groups=groups)


register(Method("diverse", "group experts by output similarity (CKA), merge each group with its router rows",
                PAPER, diverse, DiverseOptions))
register(Method("diverse-paper", "`diverse` as the paper describes it: agglomerative grouping, softmax(S/1) weights, "
                "the most used member represents its group",
                PAPER, diverse, DiverseOptions,
                defaults={"grouping": "agglomerative", "tau": 1.0, "weighting": "similarity", "saliency": "frequency"}))
register(Method("diverse-prune", "group experts as `diverse` does, keep each group's representative",
                PAPER, diverse_prune, GroupOptions))
