"""M-SMoE: K dominant experts by usage; each other expert merges into the one its router treats alike.

Li et al., "Merge, Then Compress: Demystify Efficient SMoE with Hints from Its Routing Policy",
ICLR 2024, arXiv:2310.01334 (MC-SMoE without the compression stage). Per layer:
  1. the K experts routed most often on the calibration tokens are dominant (ties: lower id);
  2. every other expert joins the dominant expert with the most similar router-logit profile:
     cosine similarity of the columns of the router logits on the sample tokens, i.e. two experts
     are alike when the router scores them alike on the same tokens;
  3. each group merges with weights = the members' usage frequency normalised within the group
     (uniform if none of them was used), after aligning the members' neurons to the dominant
     expert (the paper permutation-aligns before merging: default `align=weights`);
  4. the dominant expert's router row stays (`router=representative`).
Why: the router's own behaviour says which experts are interchangeable, and usage says which
expert of a group carries most of the load, so it dominates the merged expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..grouping import anchors
from ..plan import Align, LayerPlan, RouterRule
from ..similarity import cosine_matrix
from ..stats import LayerStats
from .registry import Method, register
from .selection import top

PAPER = ("Li et al., Merge, Then Compress: Demystify Efficient SMoE with Hints from Its Routing Policy, "
         "ICLR 2024, arXiv:2310.01334")


@dataclass(frozen=True)
class MsmoeOptions:
    router: RouterRule = "representative"
    align: Align = "weights"


def frequency_weights(members: list[int], counts: torch.Tensor) -> list[float]:
    """Usage of each member normalised within the group; uniform when no member was used."""
    c = [float(counts[e]) for e in members]
    total = sum(c)
    return [x / total for x in c] if total > 0 else [1.0 / len(members)] * len(members)


def router_logit_similarity(ls: LayerStats) -> torch.Tensor:
    """[E, E] cosine similarity of the experts' router logits over the sample tokens."""
    return ls.cached("similarity/cosine/router-logits", lambda: cosine_matrix(ls.logits.T).float()).double()


def msmoe(ls: LayerStats, keep: int, o: MsmoeOptions, seed: int) -> LayerPlan:
    dominant = set(top(ls.counts, keep))
    groups = anchors(router_logit_similarity(ls), keep, usage=ls.counts)
    reps = [next(e for e in g if e in dominant) for g in groups]
    weights = [frequency_weights(g, ls.counts) for g in groups]
    return LayerPlan(ls.num_experts, groups, weights, reps, {"dominant": sorted(dominant)})


register(Method("msmoe", "K most used experts dominate; others merge into the dominant one with the most "
                "similar router logits, usage-weighted (M-SMoE)", PAPER, msmoe, MsmoeOptions,
                needs_outputs=False))
