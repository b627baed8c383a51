"""The in-memory API's statistics pass: `collect` runs the per-layer engine with only the observer.

    stats = collect(model, layout, input_ids)     # -> Stats, one LayerStats per MoE layer

Token windows come from moeprune.text (`calibration_tokens`) or, with self-written windows, from
moeprune.selfcalib (`calibration_windows`).
"""

from __future__ import annotations

import torch

from .arch import Layout
from .engine import run
from .sources import ModelSource
from .stats import Stats
from .steps import KeepStats, Observe


def collect(model, layout: Layout, input_ids: torch.Tensor, *, sample_tokens: int = 512, batch_size: int = 8,
            seed: int = 0, model_name: str = "", calibration: dict | None = None, progress: bool = True,
            weight_similarity: bool = True) -> Stats:
    """The layer-by-layer statistics pass over calibration tokens [N, L] of a model in memory."""
    kept = KeepStats()
    steps = [Observe(layout, input_ids, lambda i: None, sample_tokens, seed, batch_size, weight_similarity,
                     expert_outputs=True), kept]
    run(ModelSource(model, layout), steps, progress)
    meta = {"samples": int(input_ids.shape[0]), "seq_len": int(input_ids.shape[1]), "seed": seed,
            "sample_tokens": min(sample_tokens, input_ids.numel()), **(calibration or {})}
    return Stats(layout.family.model_type, model_name, meta, kept.stats)
