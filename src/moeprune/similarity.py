"""Expert similarity: linear CKA and cosine, on expert outputs (data-centric) or weights (model-centric).

Pure tensor functions, float64 throughout. Linear CKA of O_i, O_j (n x d, columns centred):

    CKA = ||O_j^T O_i||_F^2 / (||O_i^T O_i||_F ||O_j^T O_j||_F)

computed through Gram matrices (||Y^T X||_F^2 = <X X^T, Y Y^T>_F) on whichever side is smaller.
It is invariant to orthogonal transforms and isotropic scaling of either side, which is what makes it
a fair comparison of two experts' feature spaces.
"""

from __future__ import annotations

import torch


def _centre(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x - x.mean(dim=-2, keepdim=True)


def linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Linear CKA between two representations of the same n samples: a [n, p], b [n, q]."""
    a, b = _centre(a), _centre(b)
    cross = (b.T @ a).square().sum()
    return float(cross / ((a.T @ a).norm() * (b.T @ b).norm()).clamp_min(1e-300))


def cka_matrix(reps: torch.Tensor, max_gram_entries: int = 2**27) -> torch.Tensor:
    """[E, E] linear CKA between every pair of reps [E, n, p] (each expert's n x p representation).

    Sample-side Grams (E x n x n, one matrix product for all pairs) whenever they fit in
    `max_gram_entries` float64 entries (1 GiB); else one [p, p] cross product per pair."""
    E, n, p = reps.shape
    if E * n * n <= max_gram_entries:            # sample side: <K_i, K_j>_F with K = X X^T [n, n]
        flat = torch.empty(E, n * n, dtype=torch.float64)
        for i in range(E):                       # one expert centred in float64 at a time (memory: E n^2)
            x = _centre(reps[i])
            flat[i] = (x @ x.T).reshape(-1)
        hsic = flat @ flat.T
    else:                                        # feature side: ||X_j^T X_i||_F^2, one [p, p] product per pair
        x = _centre(reps)
        hsic = torch.empty(E, E, dtype=torch.float64)
        for i in range(E):
            for j in range(i, E):
                hsic[i, j] = hsic[j, i] = (x[j].T @ x[i]).square().sum()
    diag = hsic.diagonal().clamp_min(1e-300).sqrt()
    s = hsic / (diag[:, None] * diag[None, :])
    return s.clamp(-1.0, 1.0).fill_diagonal_(1.0)


def cosine_matrix(reps: torch.Tensor) -> torch.Tensor:
    """[E, E] cosine similarity of the flattened reps [E, ...]."""
    flat = reps.reshape(reps.shape[0], -1).double()
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return (flat @ flat.T).clamp(-1.0, 1.0).fill_diagonal_(1.0)


def weight_representation(experts, gate_up_layout: str) -> torch.Tensor:
    """[E, H, 3I]: per expert, its gate, up and down weights as H x neuron matrices (model-centric; [E, H, 2I] for
    ungated experts).

    The hidden axis is shared by all experts, so CKA over it compares experts without assuming that
    their intermediate neurons correspond (CKA is invariant to permuting the neuron axis).
    """
    gu = (experts.up_proj if gate_up_layout.startswith("plain") else experts.gate_up_proj).detach().double()
    down = experts.down_proj.detach().double()
    if not gate_up_layout.endswith("_t"):   # gate_up [E, 2I, H], down [E, H, I]
        return torch.cat([gu.transpose(1, 2), down], dim=2)
    return torch.cat([gu, down.transpose(1, 2)], dim=2)    # gate_up [E, H, 2I], down [E, I, H]


SIMILARITIES = {"cka": cka_matrix, "cosine": cosine_matrix}
