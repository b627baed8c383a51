"""Partition E experts into exactly K groups from a similarity matrix S. Deterministic; ties by expert id.

    agglomerative  average linkage on distance 1 - S, merged until K clusters remain
    spectral       spectral embedding of the graph max(S, 0), then average linkage on the embedding
    anchors        the K most salient experts are anchors; every other expert joins its most similar anchor
    coverage       K anchors chosen greedily so that every expert, weighted by its saliency, has a similar
                   anchor (facility location: max sum_j w_j max_a S_ja); others join their most similar anchor

`anchors` keeps what matters most; `coverage` keeps what matters *and* differs, which is the paper's
aim: a dropped expert is only harmless when a kept one can stand in for it.
"""

from __future__ import annotations

import numpy as np
import torch


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


def top_anchors(score: torch.Tensor, k: int) -> list[int]:
    """The k highest scores; ties go to the lower expert id."""
    return sorted(range(score.numel()), key=lambda e: (-float(score[e]), e))[:k]


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


ANCHORED = {"anchors": lambda sim, k, score: top_anchors(score, k),
            "coverage": coverage_anchors}


def anchored(method: str, sim: torch.Tensor, k: int, score: torch.Tensor) -> tuple[list[list[int]], list[int]]:
    """Groups around the anchors `method` (anchors|coverage) picks, and each group's anchor, in group order."""
    ids = set(ANCHORED[method](sim, k, score))
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
