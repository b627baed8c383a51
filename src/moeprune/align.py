"""Neuron alignment: permute a member expert's intermediate neurons to match its representative.

Experts that do not share an origin do not share a basis of intermediate neurons, so averaging them
as they are mixes unrelated neurons. A permutation applied consistently to the gate and up rows and
the down columns leaves the expert's function unchanged; Hungarian matching picks the one under
which the member's neurons best match the representative's, by weights or by activations on the
calibration tokens (as MC-SMoE aligns before merging).
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from .arch import MoeLayer


def _gate_up_index(perm: torch.Tensor, layout: str, inter: int) -> torch.Tensor:
    """Index into the fused gate_up axis that applies `perm` to both gate and up neurons."""
    if layout == "halves":                       # [gate_0..gate_I-1, up_0..up_I-1]
        return torch.cat([perm, perm + inter])
    return torch.stack([2 * perm, 2 * perm + 1], dim=1).flatten()   # interleaved [g0, u0, g1, u1, ...]


def intermediate_size(layer: MoeLayer, layout: str) -> int:
    gu = layer.experts.gate_up_proj
    return (gu.shape[1] if layout == "halves" else gu.shape[2]) // 2


def permute_expert(tensors: dict[str, torch.Tensor], perm: torch.Tensor, layout: str) -> dict[str, torch.Tensor]:
    """One expert's tensors (expert axis removed) with intermediate neuron j taken from old neuron perm[j]."""
    inter = perm.numel()
    idx = _gate_up_index(perm, layout, inter)
    out = dict(tensors)
    if layout == "halves":
        out["gate_up_proj"] = tensors["gate_up_proj"][idx]            # [2I, H]
        out["down_proj"] = tensors["down_proj"][:, perm]              # [H, I]
    else:
        out["gate_up_proj"] = tensors["gate_up_proj"][:, idx]         # [H, 2I]
        out["down_proj"] = tensors["down_proj"][perm]                 # [I, H]
        if "gate_up_proj_bias" in tensors:
            out["gate_up_proj_bias"] = tensors["gate_up_proj_bias"][idx]
    return out


def neuron_features(tensors: dict[str, torch.Tensor], layout: str) -> torch.Tensor:
    """[I, f] per intermediate neuron: its gate row, up row and down column, concatenated."""
    gu, down = tensors["gate_up_proj"].double(), tensors["down_proj"].double()
    if layout == "halves":
        inter = down.shape[1]
        return torch.cat([gu[:inter], gu[inter:], down.T], dim=1)
    inter = down.shape[0]
    return torch.cat([gu[:, 0::2].T, gu[:, 1::2].T, down], dim=1)


def neuron_activations(layer: MoeLayer, tensors: dict[str, torch.Tensor], x: torch.Tensor, layout: str) -> torch.Tensor:
    """[I, n]: each intermediate neuron's activation on the sample tokens x [n, d]."""
    experts = layer.experts
    x = x.to(tensors["gate_up_proj"].dtype)
    if layout == "halves":
        gate, up = (x @ tensors["gate_up_proj"].T).chunk(2, dim=-1)
        h = experts.act_fn(gate) * up
    else:
        h = experts._apply_gate(x @ tensors["gate_up_proj"] + tensors.get("gate_up_proj_bias", 0))
    return h.double().T


def _standardise(f: torch.Tensor) -> torch.Tensor:
    f = f - f.mean(dim=1, keepdim=True)
    return f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)


def match(reference: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """perm with member[perm[j]] the best partner of reference[j] (max total correlation, Hungarian)."""
    corr = _standardise(reference) @ _standardise(member).T            # [I, I]
    rows, cols = linear_sum_assignment(corr.numpy(), maximize=True)
    perm = torch.empty(reference.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


def align_to(layer: MoeLayer, ref: dict[str, torch.Tensor], member: dict[str, torch.Tensor], layout: str,
             mode: str, x: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """`member` permuted to match `ref` (mode "weights" or "activations", the latter on tokens x)."""
    if mode == "weights":
        perm = match(neuron_features(ref, layout), neuron_features(member, layout))
    elif mode == "activations":
        if x is None:
            raise ValueError("activation alignment needs the calibration sample of the layer inputs")
        perm = match(neuron_activations(layer, ref, x, layout), neuron_activations(layer, member, x, layout))
    else:
        raise ValueError(f"unknown alignment mode {mode!r}")
    return permute_expert(member, perm, layout)
