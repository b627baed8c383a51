"""NAEE ("O-prune"): keep the K-subset of experts whose pruned layer best reproduces the layer's output.

Lu et al., "Not All Experts are Equal: Efficient Expert Pruning and Skipping for Mixture-of-Experts
Large Language Models", ACL 2024, arXiv:2402.14800. Per layer, over the cached sample of n tokens:

    y_full(x) = sum over the router's top-k of w_i(x) E_i(x)
    y_S(x)    = the same with the router restricted to the kept experts S (softmax, top-k,
                renormalisation and group limits over S only: what the pruned model computes,
                replayed from the cached logits by moeprune.routing)
    error(S)  = sum over the sample of ||y_full(x) - y_S(x)||^2

Why output reconstruction: frequency or probability mass say how often an expert is used, not how
much the layer's output changes without it; NAEE measures the latter directly, with the routing the
pruned model will really do. Shared experts are the same in both outputs and cancel.

Search: every one of the C(E, K) subsets when there are at most `budget` of them (the paper enumerates
Mixtral's C(8, K)); otherwise, seeded, `budget` random subsets, and from the best of them greedy swaps
(exchange one kept expert for one dropped expert) while the error decreases. The chosen subset, its
relative error error(S) / sum ||y_full||^2 and the search's trace go into the plan's layer info.

Cost: the per-token Gram matrices G_t = O(t) O(t)^T of the experts' outputs are computed once per
layer (n E^2 d, float64); after that a subset costs O(n k^2) whatever the hidden size, with
||y_full - y_S||^2 = ||y_full||^2 - 2 <y_full, y_S> + ||y_S||^2, and subsets are scored in batches.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from ..arch import MoePruneError
from ..plan import LayerPlan
from ..routing import output_distance, restricted_routing
from ..stats import LayerStats
from .registry import Method, register

PAPER = ("Lu et al., Not All Experts are Equal: Efficient Expert Pruning and Skipping for Mixture-of-Experts LLMs, "
         "ACL 2024, arXiv:2402.14800")


@dataclass(frozen=True)
class NaeeOptions:
    # most subsets to evaluate: exhaustive search when C(E, K) <= budget, else `budget` random subsets
    # (seeded) and greedy swap refinement of the best
    budget: int = 5000

    def __post_init__(self):
        if not isinstance(self.budget, int) or self.budget < 1:
            raise MoePruneError(f"--budget {self.budget} must be at least 1: the most subsets NAEE evaluates per layer")


class Reconstruction:
    """error(S) = sum over the sample of ||y_full - y_S||^2 for subsets S of one layer's experts, memoised."""

    def __init__(self, ls: LayerStats, chunk: int = 256):
        self.ls = ls
        E, n, _ = ls.outputs.shape
        outputs = ls.outputs
        # a router that also scores identity experts (LongCat-Flash): every one of them outputs the layer's input,
        # one more "expert" E in the Gram matrices, whatever slot the replay names (ids E ..)
        # shared slots (Inkling's shared experts, every token's): their output per unit weight, recorded on the sample
        self.identity = bool(ls.routing.get("identity_slots"))
        if self.identity:
            slot = ls.inputs
            if ls.routing.get("slots") == "shared":
                if ls.surplus.shape != ls.inputs.shape:
                    raise MoePruneError(f"layer {ls.layer} routes every token to shared slots whose output these "
                                        "statistics do not hold; recollect them with this version of moeprune")
                slot = ls.surplus
            outputs = torch.cat([outputs, slot.to(outputs.dtype)[None]])
        width = outputs.shape[0]
        self.gram = torch.empty(n, width, width, dtype=torch.float64)    # G_t[i, j] = <E_i(x_t), E_j(x_t)>
        for lo in range(0, n, chunk):
            o = outputs[:, lo:lo + chunk].double().transpose(0, 1)        # [c, E, d]
            self.gram[lo:lo + chunk] = o @ o.transpose(1, 2)
        # a layer that chooses by token id (DeepSeek-V4's hash layers) replays its recorded choices, a dropped expert's
        # going to the kept expert of nearest output, as surgery rewrites the table (moeprune.routing.stand_ins)
        self.distance = output_distance(ls.outputs.split(64, dim=1)) if ls.routing.get("select") == "hash" else None
        w, idx = self._routing(range(E))
        t = torch.arange(n).unsqueeze(1)
        self.cross = torch.einsum("tj,tje->te", w, self.gram[t, idx])      # <y_full(x_t), E_e(x_t)>, [n, E]
        self.norm = float((w * self.cross.gather(1, idx)).sum())          # sum_t ||y_full(x_t)||^2
        self.memo: dict[tuple[int, ...], float] = {}

    def _routing(self, subset) -> tuple[torch.Tensor, torch.Tensor]:
        """The replayed routing of a subset (or [B, K] subsets), identity slots as the one identity expert E."""
        w, idx = restricted_routing(self.ls.logits, subset, self.ls.routing, self.ls.top_k, self.distance)
        return (w, idx.clamp_max(self.ls.logits.shape[1])) if self.identity else (w, idx)

    def _errors(self, subsets: torch.Tensor) -> torch.Tensor:
        """[B] errors of B subsets [B, K]."""
        w, idx = self._routing(subsets)                                                        # [B, n, k]
        t = torch.arange(idx.shape[1]).view(1, -1, 1, 1)
        gram = self.gram[t, idx.unsqueeze(3), idx.unsqueeze(2)]                                # [B, n, k, k]
        own = torch.einsum("btj,btjl,btl->b", w, gram, w)
        cross = (w * self.cross.unsqueeze(0).expand(len(subsets), -1, -1).gather(2, idx)).sum((1, 2))
        return (self.norm - 2 * cross + own).clamp_min(0.0)

    def best(self, candidates) -> tuple[tuple[int, ...] | None, float]:
        """The candidate of least error (the first one on ties); every candidate is scored and memoised."""
        best, best_err = None, math.inf
        candidates = iter(candidates)
        while True:
            batch = [tuple(sorted(s)) for s in itertools.islice(candidates, self.batch_size())]
            if not batch:
                return best, best_err
            new = sorted({s for s in batch if s not in self.memo})
            if new:
                for s, e in zip(new, self._errors(torch.tensor(new, dtype=torch.long)).tolist()):
                    self.memo[s] = e
            for s in batch:
                if self.memo[s] < best_err:
                    best, best_err = s, self.memo[s]

    def batch_size(self) -> int:
        n, k = self.ls.logits.shape[0], max(self.ls.top_k, 2)
        return max(1, (1 << 22) // (n * k * k))                          # ~32 MiB of gathered Gram entries

    def __call__(self, subset) -> float:
        return self.best([subset])[1]


def greedy_swaps(error: Reconstruction, start: tuple[int, ...], num_experts: int) -> tuple[tuple[int, ...], float]:
    """Local search: exchange one kept for one dropped expert while that lowers the error.

    The swaps are scored a batch at a time, in a fixed order; the best swap of the first batch that
    holds an improvement is taken (a batched first-improvement rule: far fewer evaluations than scoring
    every swap per step on layers with many experts). It stops when no swap improves: a local optimum.
    """
    current, current_err = start, error(start)
    improved = True
    while improved:
        improved = False
        dropped = [e for e in range(num_experts) if e not in current]
        moves = [tuple(sorted(set(current) - {out} | {inn})) for out in current for inn in dropped]
        size = error.batch_size()
        for lo in range(0, len(moves), size):
            cand, cand_err = error.best(moves[lo:lo + size])
            if cand_err < current_err:
                current, current_err, improved = cand, cand_err, True
                break
    return current, current_err


def naee(ls: LayerStats, keep: int, o: NaeeOptions, seed: int) -> LayerPlan:
    if o.budget < 1:
        raise MoePruneError(f"--budget must be >= 1, got {o.budget}")
    if not ls.routing:
        raise MoePruneError("naee replays the router's top-k routing, and these statistics hold no rule for it: the "
                            "model's router is none of the forms moeprune knows or could read off it (or the "
                            "statistics are older); choose another method, or recollect them")
    E = ls.num_experts
    error = Reconstruction(ls)
    relative = lambda e: e / error.norm if error.norm > 0 else 0.0
    info = {}
    if math.comb(E, keep) <= o.budget:
        info["search"] = "exhaustive"
        kept, err = error.best(itertools.combinations(range(E), keep))
    else:
        g = torch.Generator().manual_seed(seed)
        starts = [torch.randperm(E, generator=g)[:keep].tolist() for _ in range(o.budget)]
        start, start_err = error.best(starts)
        kept, err = greedy_swaps(error, start, E)
        info.update(search="sampled", start_error=round(relative(start_err), 8))
    return LayerPlan.selection(E, list(kept), **info, evaluated=len(error.memo), subset=list(kept),
                               error=round(relative(err), 8), error_abs=err)


register(Method("naee", "keep the K-subset whose pruned layer best reconstructs the layer output (O-prune)",
                PAPER, naee, NaeeOptions))
