"""What a model is: its MoE layers, experts and parameter counts (`moeprune info`, and the report's size table)."""

from __future__ import annotations

import torch

from .arch import Layout, decoder_layers, moe_layout


def parameter_counts(model: torch.nn.Module, layout: Layout) -> dict:
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for layer in layout.layers for p in layer.experts.parameters())
    active_experts = sum(p.numel() * min(layout.top_k, layer.num_experts) / layer.num_experts
                         for layer in layout.layers for p in layer.experts.parameters())
    return {"total": total, "routed_experts": experts, "active_per_token": int(total - experts + active_experts)}


def model_info(model: torch.nn.Module, layout: Layout | None = None) -> dict:
    layout = layout or moe_layout(model)
    shared = [name for name in layout.family.shared if getattr(layout.layers[0].block, name, None) is not None]
    return {
        "family": layout.family.model_type,
        "decoder_layers": len(decoder_layers(model)),
        "moe_layers": [layer.index for layer in layout.layers],
        "experts_per_layer": sorted({layer.num_experts for layer in layout.layers}),
        "top_k": layout.top_k,
        "shared_experts": shared,
        "parameters": parameter_counts(model, layout),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
