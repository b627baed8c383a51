"""Selection baselines: keep K experts by a per-expert score, drop the rest (groups of one)."""

from __future__ import annotations

import torch

from ..grouping import ranked
from ..plan import LayerPlan
from ..stats import LayerStats
from .registry import Method, register


def top(scores: torch.Tensor, keep: int) -> list[int]:
    """The `keep` highest scores; ties broken by the lower expert id (stable, deterministic)."""
    return ranked(scores)[:keep]


def _by(score):
    def fn(ls: LayerStats, keep: int, options, seed: int) -> LayerPlan:
        s = score(ls, seed)
        return LayerPlan.selection(ls.num_experts, top(s, keep), scores=[round(float(v), 6) for v in s])
    return fn


def _random(ls: LayerStats, seed: int) -> torch.Tensor:
    return torch.rand(ls.num_experts, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


HC_SMOE = "in Chen et al., HC-SMoE, ICML 2025, arXiv:2410.08589"
# selection reads only usage and REAP's sums: no expert outputs on the sample (the costly part of the statistics)
register(Method("random", "keep K experts chosen at random per layer (seeded)", "", _by(_random), needs_outputs=False))
register(Method("frequency", "keep the K experts picked most often in the top-k on the calibration tokens",
                f"F-prune {HC_SMOE}", _by(lambda ls, s: ls.counts), needs_outputs=False))
register(Method("soft-activation", "keep the K experts with the largest summed router probability",
                f"S-prune {HC_SMOE}", _by(lambda ls, s: ls.prob_sum), needs_outputs=False))
register(Method("reap", "keep the K experts of largest mean routing weight x output norm over their routed tokens",
                "Lasby et al., REAP the Experts, 2025, arXiv:2510.13999", _by(lambda ls, s: ls.reap_saliency),
                needs_outputs=False))
