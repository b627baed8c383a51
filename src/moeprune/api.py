"""The Python API: the pipeline, read top to bottom.

    loaded = load(model)                       -> model, tokenizer
    layout = moe_layout(model)                 -> where the routed experts are
    stats  = collect(model, layout, tokens)    -> calibration statistics (cached on disk if asked)
    plan   = METHODS[name].plan(stats, keep)   -> per layer: groups, merge weights, router rule
    apply_plan(model, layout, plan)            -> weight surgery, config updated
    save                                       -> atomic; plan.json, report.json, report.md beside the weights

`prune(PruneConfig(...), **method_options)` runs all of it; the CLI is a thin layer over it.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from . import demo
from .arch import Layout, MoePruneError, moe_layout
from .calibration import calibration_tokens, check_spec, collect
from .checkpoint import AtomicFolder, Loaded, check_output, folder_bytes, load, resolve, save_model
from .methods import get_method
from .plan import Plan
from .report import write_report
from .stats import Stats
from .surgery import apply_plan


@dataclass
class PruneConfig:
    """Options of `moeprune prune`; the CLI flags are generated from these fields."""
    model: str | None = field(default=None, metadata={"help": "model name or path (default: demo-mixtral)"})
    method: str = field(default="diverse", metadata={"help": "pruning method, see `moeprune methods`"})
    keep: int | None = field(default=None, metadata={"help": "routed experts to keep per MoE layer"})
    ratio: float | None = field(default=None, metadata={"help": "fraction of routed experts to keep (instead of --keep)"})
    out: str | None = field(default=None, metadata={"help": "output folder for the pruned checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --out folder"})
    calib: str | None = field(default=None, metadata={
        "help": "calibration text: demo, demo:DOMAINS, a .txt/.jsonl file or folder, hf:NAME[:CONFIG][:SPLIT], "
                "random (default: demo when the model has a tokenizer, else random)"})
    samples: int = field(default=64, metadata={"help": "calibration sequences"})
    seq_len: int = field(default=256, metadata={"help": "tokens per calibration sequence"})
    seed: int = field(default=0, metadata={"help": "seed for calibration sampling and seeded methods"})
    sample_tokens: int = field(default=512, metadata={"help": "tokens per layer on which every expert is run"})
    batch_size: int = field(default=8, metadata={"help": "calibration batch size"})
    plan: str | None = field(default=None, metadata={"help": "apply this plan.json instead of planning"})
    plan_out: str | None = field(default=None, metadata={"help": "also write the plan to this file"})
    stats_cache: str | None = field(default=None, metadata={"help": "folder to save/reuse calibration statistics"})
    dtype: str = field(default="auto", metadata={"help": "dtype to compute and save in: float32, bfloat16, float16; "
                                                          "auto: float32 on the CPU, saved in the checkpoint's dtype"})
    device: str = field(default="cpu", metadata={"help": "torch device, e.g. cpu or cuda"})
    no_eval: bool = field(default=False, metadata={"help": "skip the before/after evaluation"})
    eval_domains: str | None = field(default=None, metadata={
        "help": "comma-separated evaluation texts: demo domain names, .txt/.jsonl files, NAME=PATH "
                "(default: the demo held-out shards)"})
    eval_tasks: str | None = field(default=None, metadata={
        "help": "comma-separated multiple-choice tasks: demo task names or .jsonl files (default: the demo tasks)"})
    eval_max_tokens: int | None = field(default=16384, metadata={"help": "evaluation tokens per domain (0: all)"})
    eval_limit: int | None = field(default=100, metadata={"help": "questions per multiple-choice task (0: all)"})
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})


@dataclass
class PruneResult:
    plan: Plan
    stats: Stats | None
    model: torch.nn.Module
    report: dict
    out: Path | None


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Stages:
    """Wall time of each stage and the peak resident memory reached by its end."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.times[name] = round(time.perf_counter() - start, 3)
        self.peak_mb[name] = round(_peak_rss_mb(), 1)
        return result


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
        "decoder_layers": len(getattr(model, "model", model).layers),
        "moe_layers": [layer.index for layer in layout.layers],
        "experts_per_layer": sorted({layer.num_experts for layer in layout.layers}),
        "top_k": layout.top_k,
        "shared_experts": shared,
        "parameters": parameter_counts(model, layout),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }


def resolve_keep(num_experts: int, top_k: int, keep: int | None, ratio: float | None) -> int:
    if (keep is None) == (ratio is None):
        raise MoePruneError("give exactly one of --keep K or --ratio R")
    if ratio is not None:
        if not 0 < ratio <= 1:
            raise MoePruneError(f"--ratio {ratio} must be in (0, 1]")
        keep = max(1, round(num_experts * ratio))
    if keep < 1:
        raise MoePruneError(f"--keep {keep} must be at least 1")
    if keep > num_experts:
        raise MoePruneError(f"--keep {keep} is more than the {num_experts} experts per layer")
    if keep < top_k:
        raise MoePruneError(f"--keep {keep} is below the model's top-k ({top_k}): every token routes to {top_k} "
                            f"experts; keep at least {top_k}")
    return keep


def calibrate(loaded: Loaded, layout: Layout, cfg: PruneConfig) -> Stats:
    """Statistics for cfg's calibration settings: from --stats-cache when they match, else a fresh pass."""
    spec = cfg.calib or ("demo" if loaded.tokenizer is not None and demo.domains("calib") else "random")
    meta = {"spec": spec, "samples": cfg.samples, "seq_len": cfg.seq_len, "seed": cfg.seed,
            "sample_tokens": cfg.sample_tokens, "model": loaded.name}
    cache = Path(cfg.stats_cache) if cfg.stats_cache else None
    if cache is not None and (cache / "stats.json").exists():
        stats = Stats.load(cache)
        if {k: stats.calibration.get(k) for k in meta} == meta:
            return stats
    tokens = calibration_tokens(spec, loaded.tokenizer, cfg.samples, cfg.seq_len, cfg.seed,
                                vocab_size=loaded.model.config.vocab_size)
    stats = collect(loaded.model, layout, tokens, sample_tokens=cfg.sample_tokens, batch_size=cfg.batch_size,
                    seed=cfg.seed, model_name=loaded.name, calibration=meta, progress=not cfg.quiet)
    if cache is not None:
        stats.save(cache)
    return stats


def _names(value: str | None) -> list[str] | None:
    return None if value is None else [v for v in value.split(",") if v.strip()]


def evaluation(model, tokenizer, cfg: PruneConfig) -> dict:
    from .evaluate import evaluate_model
    return evaluate_model(model, tokenizer, domains=_names(cfg.eval_domains), tasks=_names(cfg.eval_tasks),
                          batch_size=cfg.batch_size, max_tokens=cfg.eval_max_tokens or None,
                          task_limit=cfg.eval_limit or None, progress=not cfg.quiet)


def prune(cfg: PruneConfig, **method_options) -> PruneResult:
    """Load, calibrate, plan, apply, (evaluate,) save. Validates everything it can before heavy work."""
    stages = Stages()
    _, source = resolve(cfg.model)
    out = check_output(cfg.out, cfg.overwrite, source) if cfg.out else None
    method = None
    if cfg.plan is None:
        method = get_method(cfg.method)
        method.make_options(**method_options)           # bad options fail before the model is loaded
    elif method_options:
        raise MoePruneError("method options do not apply with --plan (the plan already fixes them)")
    if cfg.calib is not None:
        check_spec(cfg.calib)
    if cfg.quiet:
        transformers.utils.logging.disable_progress_bar()
    loaded = stages.run("load", load, cfg.model, cfg.dtype, cfg.device)
    model = loaded.model
    layout = moe_layout(model)
    info_before = model_info(model, layout)
    E = layout.layers[0].num_experts

    stats = None
    if cfg.plan is not None:
        plan = Plan.load(cfg.plan)
        if plan.needs_stats:
            stats = stages.run("calibrate", calibrate, loaded, layout, cfg)
    else:
        keep = resolve_keep(E, layout.top_k, cfg.keep, cfg.ratio)
        stats = stages.run("calibrate", calibrate, loaded, layout, cfg)
        plan = stages.run("plan", method.plan, stats, keep, cfg.seed, **method_options)
    do_eval = not cfg.no_eval and loaded.tokenizer is not None
    before = stages.run("eval_before", evaluation, model, loaded.tokenizer, cfg) if do_eval else None
    stages.run("apply", apply_plan, model, layout, plan, stats)
    info_after = model_info(model, layout)
    after = stages.run("eval_after", evaluation, model, loaded.tokenizer, cfg) if do_eval else None

    report = {
        "model": loaded.name, "method": plan.method, "options": plan.options, "router": plan.router,
        "align": plan.align, "keep_per_layer": {str(k): v for k, v in plan.keep_per_layer().items()},
        "experts_before": E, "before": info_before, "after": info_after,
        "calibration": stats.calibration if stats is not None else None,
        "bytes_on_disk": {"before": folder_bytes(source)},
    }
    if do_eval:
        from .evaluate import evaluation_section
        report["evaluation"] = evaluation_section(before, after)
    # live references: the save stage below still lands in the report written beside the weights
    report["stages"] = {"seconds": stages.times, "peak_rss_mb": stages.peak_mb}
    if out is not None:
        with AtomicFolder(out, cfg.overwrite) as tmp:
            stages.run("save", save_model, model, loaded.tokenizer, tmp, loaded.save_dtype)
            plan.save(tmp / "plan.json")
            report["bytes_on_disk"]["after"] = folder_bytes(tmp)
            write_report(tmp, report, stats, plan)
    if cfg.plan_out:
        plan.save(cfg.plan_out)
    return PruneResult(plan, stats, model, report, out)


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(PruneConfig))
