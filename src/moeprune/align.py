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


def _split(t: torch.Tensor, layout: str, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) parts of a fused gate_up tensor (or its bias) along its neuron axis."""
    if layout.startswith("interleaved"):
        return t.unflatten(axis, (-1, 2)).unbind(axis + 1)
    return t.chunk(2, dim=axis)


def _join(gate: torch.Tensor, up: torch.Tensor, layout: str, axis: int) -> torch.Tensor:
    if layout.startswith("interleaved"):
        return torch.stack([gate, up], dim=axis + 1).flatten(axis, axis + 1)
    return torch.cat([gate, up], dim=axis)


def canonical(tensors: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """One expert's MLP whatever its storage: gate and up [I, H], down [H, I] (and the gate/up biases [I]).
    Layouts: "halves" gate_up [2I, H] gate rows first, "interleaved" [2I, H] gate at even rows, "plain" an ungated
    up_proj [I, H] (Nemotron-H, Ergo: no "gate"), and their "_t" forms stored [H, 2I] / [H, I] (x @ W) with down
    [I, H]."""
    t = layout.endswith("_t")
    if layout.startswith("plain"):
        return {"up": tensors["up_proj"].T if t else tensors["up_proj"],
                "down": tensors["down_proj"].T if t else tensors["down_proj"]}
    gate, up = _split(tensors["gate_up_proj"], layout, 1 if t else 0)
    out = {"gate": gate.T if t else gate, "up": up.T if t else up,
           "down": tensors["down_proj"].T if t else tensors["down_proj"]}
    if "gate_up_proj_bias" in tensors:
        out["gate_bias"], out["up_bias"] = _split(tensors["gate_up_proj_bias"], layout, 0)
    return out


def from_canonical(c: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """`tensors` with the gate, up and down of `c` stored back in `layout` (other tensors unchanged)."""
    t = layout.endswith("_t")
    out = dict(tensors)
    if layout.startswith("plain"):
        out["up_proj"], out["down_proj"] = (c["up"].T, c["down"].T) if t else (c["up"], c["down"])
        return out
    out["gate_up_proj"] = _join(c["gate"].T, c["up"].T, layout, 1) if t else _join(c["gate"], c["up"], layout, 0)
    out["down_proj"] = c["down"].T if t else c["down"]
    if "gate_bias" in c:
        out["gate_up_proj_bias"] = _join(c["gate_bias"], c["up_bias"], layout, 0)
    return out


def permute_expert(tensors: dict[str, torch.Tensor], perm: torch.Tensor, layout: str) -> dict[str, torch.Tensor]:
    """One expert's tensors (expert axis removed) with intermediate neuron j taken from old neuron perm[j]."""
    c = canonical(tensors, layout)
    moved = {k: (v[:, perm] if k == "down" else v[perm]) for k, v in c.items()}
    return from_canonical(moved, tensors, layout)


def neuron_features(tensors: dict[str, torch.Tensor], layout: str) -> torch.Tensor:
    """[I, f] per intermediate neuron: its gate row, up row and down column, concatenated."""
    c = canonical(tensors, layout)
    return torch.cat([*(c[k].double() for k in ("gate", "up") if k in c), c["down"].double().T], dim=1)


def neuron_activations(layer: MoeLayer, tensors: dict[str, torch.Tensor], x: torch.Tensor, layout: str) -> torch.Tensor:
    """[I, n]: each intermediate neuron's activation on the sample tokens x [n, d], through the experts' own
    `_apply_gate` where they have one (transformers' fused experts: GPT-OSS's clamped gate, Step3p7's limits)."""
    experts = layer.experts
    c = canonical(tensors, layout)
    x = x.to(c["up"].dtype)
    if "gate" not in c:                                   # ungated: act(up x)
        h = experts.act_fn(x @ c["up"].T)
    elif hasattr(experts, "_apply_gate"):
        gu = tensors["gate_up_proj"]
        h = experts._apply_gate(x @ (gu if layout.endswith("_t") else gu.T) + tensors.get("gate_up_proj_bias", 0))
    else:
        h = experts.act_fn(x @ c["gate"].T + c.get("gate_bias", 0)) * (x @ c["up"].T + c.get("up_bias", 0))
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
