"""HC-SMoE: hierarchical clustering of experts by their mean output, frequency-weighted merge per cluster.

Chen et al., "Retraining-Free Merging of Sparse MoE via Hierarchical Clustering", ICML 2025,
arXiv:2410.08589. Per layer:
  1. each expert is represented by its mean output over the calibration sample (every expert run on
     every sample token, not only on its routed tokens), which describes what the expert does
     without depending on the router;
  2. average-linkage agglomerative clustering into exactly K clusters, on cosine similarity of those
     mean outputs (`metric=cosine`) or on Euclidean distance (`metric=euclidean`);
  3. each cluster merges with weights = the members' usage frequency normalised within it (uniform
     when none was used); the most used member is the representative;
  4. router rows merge with the same weights (`router=weighted`).
Why: the paper finds output similarity a more reliable signal of redundancy than router logits or
weights, and a hierarchical clustering adapts group sizes to the data instead of fixing K anchors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..grouping import agglomerative
from ..plan import Align, LayerPlan, RouterRule
from ..similarity import cosine_matrix
from ..stats import LayerStats
from .registry import Method, register
from .diverse import representative
from .msmoe import frequency_weights

PAPER = "Chen et al., Retraining-Free Merging of Sparse MoE via Hierarchical Clustering, ICML 2025, arXiv:2410.08589"


@dataclass(frozen=True)
class HcsmoeOptions:
    metric: Literal["cosine", "euclidean"] = "cosine"
    router: RouterRule = "weighted"
    align: Align = "none"


def mean_output_similarity(ls: LayerStats, metric: str) -> torch.Tensor:
    """[E, E] similarity of the experts' mean outputs: cosine, or minus the Euclidean distance."""
    def compute():
        mean = ls.outputs.double().mean(dim=1)                                # [E, d]
        return (cosine_matrix(mean) if metric == "cosine" else -torch.cdist(mean, mean)).float()
    return ls.cached(f"similarity/{metric}/mean-output", compute).double()


def hcsmoe(ls: LayerStats, keep: int, o: HcsmoeOptions, seed: int) -> LayerPlan:
    groups = agglomerative(mean_output_similarity(ls, o.metric), keep)
    reps = [representative(g, ls.counts) for g in groups]
    weights = [frequency_weights(g, ls.counts) for g in groups]
    return LayerPlan(ls.num_experts, groups, weights, reps)


register(Method("hcsmoe", "average-linkage clustering of experts by mean output into K groups, usage-weighted "
                "merge (HC-SMoE)", PAPER, hcsmoe, HcsmoeOptions))
