"""The Python API.

For a model that fits in memory, step by step:

    loaded = load(model)                       -> model, tokenizer
    layout = moe_layout(model)                 -> where the routed experts are
    stats  = collect(model, layout, tokens)    -> calibration statistics (cached on disk if asked)
    plan   = METHODS[name].plan(stats, keep)   -> per layer: groups, merge weights, router rule
    apply_plan(model, layout, plan)            -> weight surgery, config updated

`prune(PruneConfig(...), **method_options)` runs the same steps one decoder layer at a time through the
per-layer engine (moeprune.engine): a local safetensors folder is read lazily, so the checkpoint never has
to fit in memory, and the output is written shard by shard into an atomic folder, then evaluated before
and after, with plan.json and the report beside the weights. The CLI is a thin layer over it.
"""

from __future__ import annotations

import dataclasses
import resource
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from . import demo
from .arch import Layout, MoePruneError, moe_layout
from .atomic import AtomicFolder
from .calibration import calibration_tokens, check_spec
from .checkpoint import check_output, folder_bytes, open_source, resolve, save_model
from .engine import CheckpointSource, Job, run, score
from .hub import CheckpointWriter
from .methods import get_method
from .plan import LayerPlan, Plan
from .report import _pick_layers, write_report
from .selfcalib import mixed_windows, resolve_share, start_token, windows_for
from .stats import LayerStats, Stats, layer_file, read_header
from .surgery import apply_layer, check_plan, update_config
from .tradeoff import HELD_OUT, Tradeoff


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
    self_calib: float | None = field(default=None, metadata={
        "help": "share of the calibration sequences the model writes itself, sampled from it (seeded): they cover the "
                "domains the model serves that the calibration text lacks; 0: the text alone, 1: no text "
                "(default: 0.5 when the whole model fits in memory, else 0)"})
    self_text: str | None = field(default=None, metadata={
        "help": "text the model wrote elsewhere, for a model too large to sample from here (a .txt/.jsonl file "
                "or folder; scripts/sample_self_text.py makes one with vLLM): the --self-calib share is cut from it"})
    seq_len: int = field(default=256, metadata={"help": "tokens per calibration sequence"})
    seed: int = field(default=0, metadata={"help": "seed for calibration sampling and seeded methods"})
    sample_tokens: int = field(default=512, metadata={"help": "tokens per layer on which every expert is run"})
    batch_size: int = field(default=8, metadata={"help": "calibration batch size"})
    plan: str | None = field(default=None, metadata={"help": "apply this plan.json instead of planning"})
    plan_out: str | None = field(default=None, metadata={"help": "also write the plan to this file"})
    stats_cache: str | None = field(default=None, metadata={"help": "folder to save/reuse calibration statistics"})
    dtype: str = field(default="auto", metadata={"help": "dtype to compute and save in: float32, bfloat16, float16; "
                                                          "auto: float32 on the CPU, saved in the checkpoint's dtype"})
    device: str = field(default="auto", metadata={"help": "torch device, e.g. cpu or cuda (auto: the GPU if any)"})
    no_eval: bool = field(default=False, metadata={"help": "skip the before/after evaluation"})
    eval_domains: str | None = field(default=None, metadata={
        "help": "comma-separated evaluation texts: demo domain names, .txt/.jsonl files, NAME=PATH "
                "(default: the demo held-out shards)"})
    eval_tasks: str | None = field(default=None, metadata={
        "help": "comma-separated multiple-choice tasks: demo task names or .jsonl files (default: the demo tasks)"})
    eval_max_tokens: int | None = field(default=16384, metadata={"help": "evaluation tokens per domain (0: all)"})
    eval_limit: int | None = field(default=100, metadata={"help": "questions per multiple-choice task (0: all)"})
    report_tradeoff: bool = field(default=False, metadata={
        "help": "also plan the strongest alternatives from the same statistics, score each on a held-out fifth of the "
                "calibration text per domain and print the trade-off (the --method plan is written; the others are "
                "saved under tradeoff/ for --plan)"})
    tradeoff_tokens: int = field(default=4096, metadata={"help": "held-out tokens per domain for --report-tradeoff"})
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


def calibration_spec(cfg: PruneConfig, tokenizer) -> str:
    return cfg.calib or ("demo" if tokenizer is not None and demo.domains("calib") else "random")


def stats_meta(cfg: PruneConfig, name: str, tokenizer, expert_outputs: bool, self_share: float) -> dict:
    return {"spec": calibration_spec(cfg, tokenizer), "samples": cfg.samples, "self_calib": self_share,
            "self_text": cfg.self_text,
            "seq_len": cfg.seq_len, "seed": cfg.seed, "sample_tokens": cfg.sample_tokens, "model": name,
            "expert_outputs": expert_outputs, "held_out": HELD_OUT if cfg.report_tradeoff else 0.0}


def cached_stats(folder: str | None, meta: dict, layers: list[int]) -> dict[int, Path]:
    """Layer -> statistics file of a --stats-cache made with the same settings (else {}: recollect)."""
    if folder is None or not (Path(folder) / "stats.json").exists():
        return {}
    try:
        header = read_header(Path(folder))
    except MoePruneError:
        return {}
    have = header["calibration"]
    differ = sorted(k for k in meta if have.get(k) != meta[k] and not (k == "expert_outputs" and have.get(k)))
    if differ or sorted(header["layers"]) != sorted(layers):          # (a cache with expert outputs serves all)
        differ = differ or ["layers"]
        warnings.warn(f"--stats-cache {folder} holds statistics of other settings ({', '.join(differ)} differ); "
                      "they are recollected and replaced", stacklevel=3)
        return {}
    return {i: layer_file(folder, i) for i in layers}


def _names(value: str | None) -> list[str] | None:
    return None if value is None else [v for v in value.split(",") if v.strip()]


def prune(cfg: PruneConfig, **method_options) -> PruneResult:
    """Load, calibrate, plan, apply, save and evaluate, one decoder layer at a time (moeprune.engine).
    Validates everything it can before the heavy work."""
    stages = Stages()
    _, folder = resolve(cfg.model)
    out = check_output(cfg.out, cfg.overwrite, folder) if cfg.out else None
    method = options = None
    if cfg.plan is None:
        method = get_method(cfg.method)
        options = method.make_options(**method_options)    # bad options fail before the model is read
    elif method_options:
        raise MoePruneError("method options do not apply with --plan (the plan already fixes them)")
    if cfg.calib is not None:
        check_spec(cfg.calib)
    if cfg.self_calib is not None:
        windows_for(cfg.self_calib, cfg.samples)
    if cfg.self_text is not None:
        try:
            check_spec(cfg.self_text)
        except MoePruneError as e:
            raise MoePruneError(f"--self-text: {e}") from e
    if cfg.quiet:
        transformers.utils.logging.disable_progress_bar()
    name, source, tokenizer, folder = stages.run("load", open_source, cfg.model, cfg.dtype, cfg.device)
    layout = source.layout
    info_before = model_info(source.model, layout)
    E = layout.layers[0].num_experts
    moe = [layer.index for layer in layout.layers]
    saved_plan = Plan.load(cfg.plan) if cfg.plan is not None else None
    if saved_plan is not None:
        keep = check_plan(saved_plan, layout)
    else:
        keep = resolve_keep(E, layout.top_k, cfg.keep, cfg.ratio)
    needs_stats = saved_plan is None or saved_plan.needs_stats
    expert_outputs = method.needs_outputs if saved_plan is None else saved_plan.merge == "fit"
    if cfg.report_tradeoff and saved_plan is not None:
        raise MoePruneError("--report-tradeoff compares methods planned from this run's statistics; with --plan "
                            "there is nothing to plan")
    expert_outputs = expert_outputs or cfg.report_tradeoff         # the alternatives include diverse

    # calibration: from --stats-cache when its settings match, else token windows for a fresh pass
    if cfg.self_text is not None and tokenizer is None:
        raise MoePruneError("--self-text is text: the model folder needs tokenizer files to encode it")
    start = start_token(source.model.config, tokenizer)
    share, no_self = resolve_share(cfg.self_calib, source, start, cfg.self_text is not None) \
        if needs_stats else (0.0, None)
    meta = stats_meta(cfg, name, tokenizer, expert_outputs, share)
    tradeoff = Tradeoff(meta["spec"], tokenizer, source.model.config, layout, keep, cfg.seed, method.name,
                        method_options, cfg.batch_size, cfg.tradeoff_tokens) if cfg.report_tradeoff else None
    cache = cached_stats(cfg.stats_cache, meta, moe) if needs_stats else {}
    tokens = None
    if needs_stats and not cache:
        def windows(spec: str, docs: list[str] | None = None):
            return lambda n: calibration_tokens(spec, tokenizer, n, cfg.seq_len, cfg.seed,
                                                vocab_size=source.model.config.vocab_size, docs=docs)
        sampling = share and cfg.self_text is None
        tokens = stages.run("self-calibration" if sampling else "calibration text", mixed_windows,
                            windows(meta["spec"], tradeoff.calibration if tradeoff is not None else None),
                            source, start, share, cfg.samples, cfg.seq_len, cfg.seed, not cfg.quiet,
                            windows(cfg.self_text) if cfg.self_text is not None else None)
    ev = None
    if not cfg.no_eval and tokenizer is not None:
        from .evaluate import Evaluation
        ev = Evaluation(tokenizer, source.model.config, _names(cfg.eval_domains), _names(cfg.eval_tasks),
                        batch_size=cfg.batch_size, max_tokens=cfg.eval_max_tokens or None,
                        task_limit=cfg.eval_limit or None)
    tallies = {"before": ev.tally(), "after": ev.tally()} if ev is not None else {}
    tallies.update(tradeoff.tallies if tradeoff is not None else {})
    plot_layers = set(_pick_layers(moe))
    planning = [0.0]

    def decide(i: int, ls: LayerStats | None) -> LayerPlan:
        if saved_plan is not None:
            return saved_plan.layers[i]
        start = time.perf_counter()
        lp = method.plan_layer(ls, keep, options, cfg.seed)
        planning[0] += time.perf_counter() - start
        return lp

    def keep_stats(i: int, ls: LayerStats) -> LayerStats:
        if cfg.stats_cache and i not in cache:
            ls.save(layer_file(cfg.stats_cache, i))
        # a checkpoint larger than memory keeps only what the report shows of a layer; a model in memory, all
        return ls.light(similarity=i in plot_layers and ls.outputs.numel() > 0) \
            if isinstance(source, CheckpointSource) else ls

    # the plan-wide options (router rule, alignment, merge) that each layer's surgery follows
    plan_opts = saved_plan or method.assemble({}, keep, options, cfg.seed, layout.family.model_type, 0.0)
    job = Job(calib=tokens, sample_tokens=cfg.sample_tokens, seed=cfg.seed, batch_size=cfg.batch_size,
              weight_similarity=getattr(options, "representation", None) == "weight" or not isinstance(
                  source, CheckpointSource), expert_outputs=expert_outputs,
              cached=lambda i: LayerStats.load(cache[i]) if i in cache else None,
              decide=decide, apply=lambda m, lp, ls: apply_layer(m, lp, plan_opts, layout, ls),
              keep_stats=keep_stats, evaluate=ev.batches if ev is not None else None, progress=not cfg.quiet)
    if tradeoff is not None:
        job.alternatives, job.held_out = tradeoff.alternatives(), tradeoff.evaluation.batches

    # the output is at most the input's size: enough free space for that is checked before the first layer
    needs = folder_bytes(folder) or sum(p.numel() * p.element_size() for p in source.model.parameters())
    with AtomicFolder(out, cfg.overwrite, needs_bytes=needs) if out is not None else nullcontext() as tmp:
        writer = None
        if tmp is not None and isinstance(source, CheckpointSource):
            writer = CheckpointWriter(tmp, source.ckpt, layout.family, moe, keep)
            job.write = writer.write_layer
        outcome = stages.run("prune", run, source, job)
        stages.times.update({f"prune: {step}": round(s, 3) for step, s in outcome.seconds.items()})
        changes = update_config(source.model, layout, E, keep)
        stats = Stats(layout.family.model_type, name, meta, outcome.stats) if outcome.stats else None
        if cfg.stats_cache and stats is not None and not cache:
            stats.save_header(cfg.stats_cache)
        if saved_plan is not None:
            plan = saved_plan
        else:
            plan = method.assemble(outcome.plans, keep, options, cfg.seed, layout.family.model_type, planning[0])
        info_after = model_info(source.model, layout)
        if tmp is not None:
            if writer is not None:
                stages.run("save", writer.finish, folder, layout.config, changes)
            else:
                stages.run("save", save_model, source.model, tokenizer, tmp, source.save_dtype)
            plan.save(tmp / "plan.json")
        report = {
            "model": name, "method": plan.method, "options": plan.options, "router": plan.router,
            "align": plan.align, "keep_per_layer": {str(k): v for k, v in plan.keep_per_layer().items()},
            "experts_before": E, "before": info_before, "after": info_after,
            "calibration": stats.calibration if stats is not None else None,
            "calibration_note": no_self,
            "bytes_on_disk": {"before": folder_bytes(folder), "after": folder_bytes(tmp)},
            "stages": {"seconds": stages.times, "peak_rss_mb": stages.peak_mb},
        }
        if tallies:
            # the checkpoint is complete: an evaluation that fails now costs the report a section, not the prune
            from .evaluate import evaluation_section
            try:
                stages.run("evaluate", score, source, outcome, lambda which, k, logits: tallies[which].score(k, logits))
                if ev is not None:
                    report["evaluation"] = evaluation_section(tallies["before"].result(), tallies["after"].result())
                if tradeoff is not None:
                    report["tradeoff"] = tradeoff.result(outcome.alternatives, tmp)
            except Exception as e:  # noqa: BLE001 - any failure here must not throw the pruned checkpoint away
                report["evaluation_error"] = f"{type(e).__name__}: {e}"
                warnings.warn(f"the evaluation failed ({type(e).__name__}: {e}); the pruned checkpoint is saved "
                              "and its report says so", stacklevel=2)
        if ev is None and not cfg.no_eval:
            report["evaluation_note"] = "skipped: the model has no tokenizer that can encode text"
        if tmp is not None:
            write_report(tmp, report, stats, plan)
    if cfg.plan_out:
        plan.save(cfg.plan_out)
    model = None if isinstance(source, CheckpointSource) else source.model
    return PruneResult(plan, stats, model, report, out)


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(PruneConfig))
