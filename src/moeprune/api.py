"""The Python API.

For a model that fits in memory, step by step:

    loaded = load(model)                       -> model, tokenizer
    layout = moe_layout(model)                 -> where the routed experts are
    stats  = collect(model, layout, tokens)    -> calibration statistics (cached on disk if asked)
    plan   = METHODS[name].plan(stats, keep)   -> per layer: groups, merge weights, router rule
    apply_plan(model, layout, plan)            -> weight surgery, config updated

`prune(PruneConfig(...), **method_options)` runs the same steps one decoder layer at a time through the
per-layer engine (moeprune.pipeline: prepare -> the engine's steps -> finish): a checkpoint folder is read
lazily, so it never has to fit in memory, and the output is written shard by shard into an atomic folder,
then evaluated before and after, with plan.json and the report beside the weights. The CLI is a thin
layer over it.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from . import engine
from .atomic import AtomicFolder
from .config import PruneConfig
from .hub import CheckpointWriter, output_bytes
from .info import model_info, parameter_counts
from .pipeline import calibration_windows, finish, layer_steps, prepare, resolve_keep
from .plan import Plan
from .report import Report, write_report
from .sources import CheckpointSource
from .stats import Stats
from .surgery import config_changes

__all__ = ["PruneConfig", "PruneResult", "model_info", "parameter_counts", "prune", "resolve_keep"]


@dataclass
class PruneResult:
    plan: Plan
    stats: Stats | None
    model: torch.nn.Module | None       # the pruned model, when it was in memory (None: streamed from a folder)
    report: Report
    out: Path | None


def prune(cfg: PruneConfig, **method_options) -> PruneResult:
    """Check everything, then read a layer -> calibrate -> plan -> apply -> write -> free for every decoder
    layer, then complete the checkpoint, score it and write the report. The output appears only when complete."""
    with prepare(cfg, method_options) as run:
        tokens = calibration_windows(run)
        # enough free space for the output's tensors (known from the input's headers) is checked before layer 0
        with AtomicFolder(run.out, cfg.overwrite, needs_bytes=output_bytes(run.source, run.layout, run.keep,
                          cfg.dequantize)) if run.out is not None else nullcontext() as tmp:
            writer = CheckpointWriter(tmp, run.source, run.layout, run.keep, config_changes(run.layout, run.keep),
                                      dequantize=cfg.dequantize) if tmp is not None else None
            steps = layer_steps(run, tokens, writer)
            seconds = run.stages.run("prune", engine.run, run.source, steps, not cfg.quiet)
            report, plan, stats = finish(run, steps, writer, tmp, seconds)
            if tmp is not None:
                write_report(tmp, report, stats, plan)
    if cfg.plan_out:
        plan.save(cfg.plan_out)
    model = None if isinstance(run.source, CheckpointSource) else run.source.model
    return PruneResult(plan, stats, model, report, run.out)
