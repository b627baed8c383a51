"""Partition E experts into exactly K groups from a similarity matrix S. Deterministic; ties by expert id.

    agglomerative  average linkage on distance 1 - S, merged until K clusters remain
    spectral       spectral embedding of the graph max(S, 0), then average linkage on the embedding
    anchors        the K most salient experts are anchors; every other expert joins its most similar anchor
    coverage       K anchors chosen greedily so that every expert, weighted by its saliency, has a similar
                   anchor (facility location: max sum_j w_j max_a S_ja); others join their most similar anchor

`anchors` keeps what matters most; `coverage` keeps what matters *and* differs, which is the paper's
aim: a dropped expert is only harmless when a kept one can stand in for it.

Two knobs move the anchored groupings between saliency and pure diversity (both 0 by default):

    diversity λ    anchors: greedy max of (1-λ) sum_{a in A} s_a + λ mean_j max_{a in A} S_ja (s = saliency
                   normalised to sum 1); coverage: weights w_j = (1-λ) s_j + λ/E. λ = 1 is pure diversity
                   for both (every expert weighs alike, usage plays no part).
    reserve ρ      round(ρK) of the K slots are guaranteed to diversity: the other anchors are chosen first,
                   then each reserved slot goes to the expert that most raises the unweighted coverage
                   mean_j max_a S_ja, i.e. the function least represented among those kept.
"""

from __future__ import annotations

import numpy as np
import torch

from .arch import MoePruneError


def _order(groups: list[list[int]]) -> list[list[int]]:
    """Groups sorted internally and by their smallest member: a canonical form."""
    return sorted((sorted(g) for g in groups), key=lambda g: g[0])


def agglomerative(sim: torch.Tensor, k: int) -> list[list[int]]:
    """Average-linkage agglomerative clustering, cut at exactly k clusters (Lance-Williams updates)."""
    s = sim.double().numpy().copy()
    E = s.shape[0]
    groups: dict[int, list[int]] = {i: [i] for i in range(E)}
    avg = s.copy()
    np.fill_diagonal(avg, -np.inf)
    while len(groups) > k:
        ids = sorted(groups)
        sub = avg[np.ix_(ids, ids)]
        flat = int(np.argmax(sub))            # first maximum in row-major order: ties go to the lowest ids
        a, b = ids[flat // len(ids)], ids[flat % len(ids)]
        a, b = min(a, b), max(a, b)
        na, nb = len(groups[a]), len(groups[b])
        for c in ids:
            if c not in (a, b):
                avg[a, c] = avg[c, a] = (na * avg[a, c] + nb * avg[b, c]) / (na + nb)
        groups[a] += groups.pop(b)
        avg[b, :] = avg[:, b] = -np.inf
    return _order(list(groups.values()))


def spectral(sim: torch.Tensor, k: int) -> list[list[int]]:
    """Normalised spectral embedding (k leading eigenvectors) of max(S, 0), grouped by average linkage."""
    w = sim.double().clamp_min(0).numpy()
    d = w.sum(1)
    inv = 1.0 / np.sqrt(np.maximum(d, 1e-12))
    norm_affinity = inv[:, None] * w * inv[None, :]
    vals, vecs = np.linalg.eigh(norm_affinity)
    emb = vecs[:, -k:]
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    emb = emb * np.sign(emb[np.argmax(np.abs(emb), axis=0), range(k)])    # fix eigenvector signs
    return agglomerative(torch.from_numpy(emb @ emb.T), k)


def ranked(score: torch.Tensor, among: list[int] | None = None) -> list[int]:
    """Expert ids by descending score, ties to the lower id (stable, deterministic): the one rule for "the
    highest", whether K experts to keep, K anchors or a group's representative."""
    return sorted(range(score.numel()) if among is None else among, key=lambda e: (-float(score[e]), e))


def top_anchors(score: torch.Tensor, k: int) -> list[int]:
    """The k highest scores; ties go to the lower expert id."""
    return ranked(score)[:k]


def coverage_anchors(sim: torch.Tensor, k: int, weight: torch.Tensor) -> list[int]:
    """Greedy facility location: repeatedly add the expert that most raises sum_j w_j max_{a in A} S_ja.

    The objective is monotone submodular, so greedy is within 1 - 1/e of the best K-set. A heavy expert
    is picked early; after that, an expert unlike every anchor so far gains its own weight, so distinct
    experts survive even when their usage is modest, and near-copies of an anchor gain almost nothing.
    """
    s = sim.double().clamp(min=0.0)
    w = weight.double().clamp(min=0.0)
    if float(w.sum()) <= 0:
        w = torch.ones_like(w)
    cover = torch.zeros(s.shape[0], dtype=torch.float64)
    chosen: list[int] = []
    for _ in range(k):
        gain = ((s - cover[:, None]).clamp(min=0.0) * w[:, None]).sum(0)     # gain[a] of adding anchor a
        gain[chosen] = -1.0
        best = int(torch.argmax(gain))                                        # first maximum: lowest id
        chosen.append(best)
        cover = torch.maximum(cover, s[:, best])
    return sorted(chosen)


def assign(sim: torch.Tensor, anchor_ids: list[int]) -> list[list[int]]:
    """Groups around the anchors: every other expert joins its most similar anchor (ties: lower id)."""
    groups = {a: [a] for a in anchor_ids}
    for e in range(sim.shape[0]):
        if e not in groups:
            best = max(anchor_ids, key=lambda a: (float(sim[e, a]), -a))
            groups[best].append(e)
    return _order(list(groups.values()))


def anchors(sim: torch.Tensor, k: int, usage: torch.Tensor) -> list[list[int]]:
    """The k most used (or salient) experts anchor the groups; each other expert joins its most similar anchor."""
    return assign(sim, top_anchors(usage, k))


def _share(score: torch.Tensor) -> torch.Tensor:
    """Saliency as shares that sum to 1 (uniform when there is none)."""
    w = score.double().clamp(min=0.0)
    return w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / w.numel())


def balanced_anchors(sim: torch.Tensor, k: int, score: torch.Tensor, diversity: float,
                     chosen: list[int] | None = None) -> list[int]:
    """Greedy max of (1-λ) sum_{a in A} s_a + λ mean_j max_{a in A} S_ja, s = saliency shares, λ = diversity.

    Monotone submodular (a modular term plus facility location), so greedy keeps its 1 - 1/e guarantee.
    λ = 0 is the top-k of saliency (ties: lower id); λ = 1 is pure, usage-blind coverage. In between, an
    expert unlike every anchor so far gains λ/E from covering itself, enough to beat a near-copy of an
    anchor whose extra saliency share is smaller than that. `chosen` continues from anchors already kept.
    """
    s = sim.double().clamp(min=0.0)
    E = s.shape[0]
    share = _share(score)
    chosen = list(chosen or [])
    cover = s[:, chosen].max(1).values if chosen else torch.zeros(E, dtype=torch.float64)
    for _ in range(k):
        gain = (1 - diversity) * share
        if diversity > 0:
            gain = gain + diversity * (s - cover[:, None]).clamp(min=0.0).sum(0) / E
        gain[chosen] = -float("inf")
        best = int(torch.argmax(gain))          # first maximum: the lowest id
        chosen.append(best)
        cover = torch.maximum(cover, s[:, best])
    return chosen


def check_share(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise MoePruneError(f"--{name} must lie in [0, 1], got {value}")


def pick_anchors(method: str, sim: torch.Tensor, k: int, score: torch.Tensor, diversity: float = 0.0,
                 reserve: float = 0.0) -> list[int]:
    """The k anchors of `method` (anchors|coverage), moved towards pure diversity by `diversity` and with
    round(reserve * k) slots filled last by unweighted coverage (module docstring)."""
    check_share("diversity", diversity)
    check_share("reserve", reserve)
    reserved = min(k, round(reserve * k))
    first = k - reserved
    if method == "anchors":
        ids = balanced_anchors(sim, first, score, diversity) if diversity > 0 else top_anchors(score, first)
    elif method == "coverage":
        weight = (1 - diversity) * _share(score) + diversity / score.numel() if diversity > 0 else score
        ids = coverage_anchors(sim, first, weight) if first else []
    else:
        raise ValueError(f"unknown anchored grouping {method!r}")
    if reserved:
        ids = balanced_anchors(sim, reserved, score, 1.0, chosen=list(ids))
    return sorted(ids)


ANCHORED = ("anchors", "coverage")         # the groupings built around anchors (pick_anchors)


def anchored(method: str, sim: torch.Tensor, k: int, score: torch.Tensor, diversity: float = 0.0,
             reserve: float = 0.0) -> tuple[list[list[int]], list[int]]:
    """Groups around the anchors `method` (anchors|coverage) picks, and each group's anchor, in group order."""
    ids = set(pick_anchors(method, sim, k, score, diversity, reserve))
    groups = assign(sim, sorted(ids))
    return groups, [next(e for e in g if e in ids) for g in groups]


def group(method: str, sim: torch.Tensor, k: int, usage: torch.Tensor | None = None) -> list[list[int]]:
    if not 1 <= k <= sim.shape[0]:
        raise ValueError(f"cannot make {k} groups of {sim.shape[0]} experts")
    if method == "agglomerative":
        return agglomerative(sim, k)
    if method == "spectral":
        return spectral(sim, k)
    if method in ANCHORED:
        if usage is None:
            raise ValueError(f"{method} grouping needs a per-expert saliency")
        return anchored(method, sim, k, usage)[0]
    raise ValueError(f"unknown grouping {method!r}")
