"""A prune as three stages: prepare -> the engine's steps -> finish.

    run    = prepare(cfg, method_options)     # every check of options, paths, plan and cache; the source opened
    tokens = calibration_windows(run)         # the calibration windows (text, and what the model writes)
    steps  = layer_steps(run, tokens, writer) # what the engine does to each decoder layer, in order
    engine.run(run.source, steps)
    report = finish(run, steps, writer, tmp)  # config, plan, scores -> a Report

`moeprune.api.prune` is these lines with the output folder around them.
"""

from __future__ import annotations

import resource
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from . import demo
from .arch import Layout, MoePruneError
from .checkpoint import check_output, check_side_path, folder_bytes, resolve
from .config import PruneConfig
from .engine import Step, run as run_engine, score
from .evaluate import Evaluation, evaluation_section
from .hub import CheckpointWriter
from .methods import Method, get_method
from .plan import LayerPlan, Plan
from .info import model_info
from .report import Report, pick_layers
from .selfcalib import mixed_windows, resolve_share, start_token, windows_for
from .sources import CheckpointSource, ModelSource, open_source
from .stats import LayerStats, Stats, check_cache, layer_file
from .steps import Apply, Decide, Evaluate, EvaluatePruned, KeepStats, Observe, Write
from .surgery import apply_layer, check_plan, update_config
from .text import LAZY_BYTES, calibration_tokens, check_spec, source_files, split_held_out, text_domains
from .tradeoff import AUTO, HELD_OUT, Auto, Tradeoff

FALLBACK = "diverse"      # the default method where auto cannot run (docs/ABLATION.md, step 6)


class Stages:
    """Wall time of each stage and the peak resident memory reached by its end."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.times[name] = round(time.perf_counter() - start, 3)
        self.peak_mb[name] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        return result


@dataclass
class Run:
    """A prune, checked and prepared: everything decided before the first layer is read."""
    cfg: PruneConfig
    name: str                           # the model as the user named it
    source: ModelSource
    tokenizer: object | None
    folder: Path | None                 # the input folder, when there is one
    out: Path | None
    method: Method | None               # None with --plan
    options: object | None
    saved_plan: Plan | None
    keep: int
    experts_before: int
    expert_outputs: bool                # whether the statistics run every expert on the sample
    weight_similarity: bool             # whether the method reads the experts' weight similarity
    share: float                        # share of the calibration windows the model writes
    calibration_note: str | None        # why it writes none, when it does not by default
    meta: dict                          # the calibration settings: the --stats-cache key
    cache: dict[int, Path]              # layer -> statistics file of a matching --stats-cache
    evaluation: Evaluation | None
    tradeoff: Tradeoff | None
    info_before: dict
    stages: Stages = field(default_factory=Stages)
    scratch: tempfile.TemporaryDirectory | None = None     # the input written out, for a model built in memory
    auto: Auto | None = None            # --method auto: its plans, scored on held-out windows before one is written

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        if self.scratch is not None:
            self.scratch.cleanup()

    @property
    def layout(self) -> Layout:
        return self.source.layout

    @property
    def needs_stats(self) -> bool:
        return self.saved_plan is None or self.saved_plan.needs_stats


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


def cached_stats(folder: str | None, meta: dict, layers: list[int], weight_similarity: bool = False
                 ) -> dict[int, Path]:
    """Layer -> statistics file of a --stats-cache made with the same settings from the same inputs, whose files
    are intact (stats.check_cache); else {} and a warning naming the reason: they are recollected."""
    if folder is None or not (Path(folder) / "stats.json").exists():
        return {}
    files, reason = check_cache(folder, meta, layers, weight_similarity)
    if reason is not None:
        warnings.warn(f"--stats-cache {folder} is not used: {reason}; they are recollected and replaced",
                      stacklevel=3)
    return files


def _names(value: str | None) -> list[str] | None:
    return None if value is None else [v for v in value.split(",") if v.strip()]


def _check_options(cfg: PruneConfig, method_options: dict) -> tuple[Method | None, object | None]:
    """Everything the options alone can tell, before any model is read."""
    for flag, value, least in (("--samples", cfg.samples, 1), ("--batch-size", cfg.batch_size, 1),
                               ("--sample-tokens", cfg.sample_tokens, 1), ("--seq-len", cfg.seq_len, 2),
                               ("--tradeoff-tokens", cfg.tradeoff_tokens, 1), ("--eval-max-tokens", cfg.eval_max_tokens, 0),
                               ("--eval-limit", cfg.eval_limit, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise MoePruneError(f"{flag} {value} must be an integer of at least {least}"
                                + (" (0: all)" if least == 0 else ""))
    method = options = None
    if cfg.plan is None and cfg.method is None:         # the default: auto, unless the options rule it out
        cfg.method = FALLBACK if method_options or cfg.report_tradeoff or cfg.stats_cache else AUTO
    if cfg.plan is None and cfg.method == AUTO:
        for bad, why in ((method_options, "method options"), (cfg.report_tradeoff, "--report-tradeoff"),
                         (cfg.stats_cache, "--stats-cache")):
            if bad:
                flags = why if why.startswith("--") else ", ".join("--" + k.replace("_", "-") for k in method_options)
                raise MoePruneError(f"--method auto takes no {why}: it plans each of its candidates with their "
                                    "defaults from statistics it keeps apart (text, self-written) and reports their "
                                    f"held-out scores itself; leave out {flags}")
    elif cfg.plan is None:
        method = get_method(cfg.method)
        options = method.make_options(**method_options)
    elif method_options:
        raise MoePruneError("method options do not apply with --plan (the plan already fixes them)")
    elif cfg.keep is not None or cfg.ratio is not None or cfg.method is not None:
        raise MoePruneError("--keep, --ratio and --method do not apply with --plan: the plan fixes what is kept and "
                            "how; leave them out, or plan again without --plan")
    if cfg.plan is not None and cfg.report_tradeoff:
        raise MoePruneError("--report-tradeoff compares methods planned from this run's statistics; with --plan "
                            "there is nothing to plan")
    if cfg.calib is not None:
        check_spec(cfg.calib)
    if cfg.self_calib is not None:
        windows_for(cfg.self_calib, cfg.samples)
    if cfg.self_text is not None:
        try:
            check_spec(cfg.self_text)
        except MoePruneError as e:
            raise MoePruneError(f"--self-text: {e}") from e
    return method, options


def _why_not_auto(cfg: PruneConfig, tokenizer, share: float) -> str | None:
    """Why auto, the default, cannot run here (None: it can): it needs a tokenizer, calibration text (read whole: at
    most LAZY_BYTES) of which some documents can be held out, and windows the model writes itself."""
    spec = calibration_spec(cfg, tokenizer)
    if tokenizer is None:
        return "the model folder has no tokenizer files"
    if spec == "random":
        return "--calib random is no text"
    files = source_files(spec)
    if files is not None and sum(f.stat().st_size for f in files) > LAZY_BYTES:
        return f"the calibration text is larger than {LAZY_BYTES // 2**20} MiB, read a window at a time"
    try:
        held = split_held_out(text_domains(spec), HELD_OUT, cfg.seed)[1]
    except MoePruneError:
        held = None
    if not held:
        return "no document of the calibration text can be held out"
    if share == 0:
        return "the model writes no calibration windows of its own (--self-calib 0, or too large to sample here)"
    return None


def prepare(cfg: PruneConfig, method_options: dict) -> Run:
    """Every check of options, paths, plan and cache, then the source opened (a checkpoint: headers only)."""
    _, folder = resolve(cfg.model)
    out = check_output(cfg.out, cfg.overwrite, folder) if cfg.out is not None else None
    if cfg.plan_out is not None:          # never inside the input, never inside the output being written
        cfg.plan_out = str(check_side_path("--plan-out", cfg.plan_out, folder, out, folder_ok=False))
    if cfg.stats_cache is not None:
        cfg.stats_cache = str(check_side_path("--stats-cache", cfg.stats_cache, folder, out, folder_ok=True))
    defaulted = cfg.plan is None and cfg.method is None
    method, options = _check_options(cfg, method_options)
    if cfg.quiet:
        transformers.utils.logging.disable_progress_bar()
    stages = Stages()
    name, source, tokenizer, folder = stages.run("load", open_source, cfg.model, cfg.dtype, cfg.device)
    scratch = None
    if out is not None and not isinstance(source, CheckpointSource):
        scratch, source, folder = _as_checkpoint(source, tokenizer)
    layout = source.layout
    positions = getattr(layout.config, "max_position_embeddings", None)
    if isinstance(positions, int) and cfg.seq_len > positions:
        raise MoePruneError(f"--seq-len {cfg.seq_len} is longer than the {positions} positions the model was built for; "
                            f"give at most {positions}")
    saved_plan = Plan.load(cfg.plan) if cfg.plan is not None else None
    E = layout.layers[0].num_experts
    keep = check_plan(saved_plan, layout) if saved_plan is not None else \
        resolve_keep(E, layout.top_k, cfg.keep, cfg.ratio)
    needs_stats = saved_plan is None or saved_plan.needs_stats
    auto = cfg.plan is None and cfg.method == AUTO
    if cfg.self_text is not None and tokenizer is None:
        raise MoePruneError("--self-text is text: the model folder needs tokenizer files to encode it")
    share, note = resolve_share(cfg.self_calib, source, start_token(layout.config, tokenizer),
                                cfg.self_text is not None) if needs_stats else (0.0, None)
    why = _why_not_auto(cfg, tokenizer, share) if auto and defaulted else None
    if why is not None:
        # no text to hold out, or no windows written by the model (too large to sample here, or --self-calib 0):
        # auto was chosen for scoring its plans on those windows (docs/ABLATION.md step 6), and it reads a
        # checkpoint twice; without them the default is diverse
        warnings.warn(f"the default method auto scores its candidate plans on held-out text and on windows the "
                      f"model writes itself, but {why}: pruning with {FALLBACK}")
        cfg.method, auto = FALLBACK, False
        method, options = get_method(FALLBACK), get_method(FALLBACK).make_options()
    # the alternatives of the trade-off include diverse
    expert_outputs = auto or cfg.report_tradeoff or (method.needs_outputs if saved_plan is None
                                                     else saved_plan.merge == "fit")
    meta = {"spec": calibration_spec(cfg, tokenizer), "samples": cfg.samples, "self_calib": share,
            "self_text": cfg.self_text, "seq_len": cfg.seq_len, "seed": cfg.seed, "sample_tokens": cfg.sample_tokens,
            "model": name, "expert_outputs": expert_outputs,
            "held_out": HELD_OUT if cfg.report_tradeoff or auto else 0.0, **({"method": AUTO} if auto else {})}
    tradeoff = Tradeoff(meta["spec"], tokenizer, layout.config, layout, keep, cfg.seed, method.name,
                        method_options, cfg.batch_size, cfg.tradeoff_tokens) if cfg.report_tradeoff else None
    chooser = Auto(meta["spec"], tokenizer, layout.config, layout, keep, cfg.seed, share, cfg.samples, cfg.seq_len,
                   cfg.batch_size) if auto else None
    weight_similarity = getattr(options, "representation", None) == "weight"      # a cache must hold it then too
    cache = cached_stats(cfg.stats_cache, meta, [layer.index for layer in layout.layers],
                         weight_similarity) if needs_stats else {}
    evaluation = None
    if not cfg.no_eval and tokenizer is not None:
        evaluation = Evaluation(tokenizer, layout.config, _names(cfg.eval_domains), _names(cfg.eval_tasks),
                                batch_size=cfg.batch_size, max_tokens=cfg.eval_max_tokens or None,
                                task_limit=cfg.eval_limit or None)
    return Run(cfg, name, source, tokenizer, folder, out, method, options, saved_plan, keep, E, expert_outputs,
               weight_similarity, share, note, meta, cache, evaluation, tradeoff, model_info(source.model, layout),
               stages, scratch, chooser)


def _as_checkpoint(source: ModelSource, tokenizer) -> tuple[tempfile.TemporaryDirectory, CheckpointSource, Path]:
    """A model built in memory (tiny:NAME) written out once in the hub's layout, so that its output goes
    through the one writer every checkpoint does; the folder lasts as long as the run."""
    scratch = tempfile.TemporaryDirectory(prefix="moeprune-input-")
    folder = Path(scratch.name)
    source.model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    dtype = next(source.model.parameters()).dtype
    return scratch, CheckpointSource(folder, source.device, dtype), folder


def calibration_windows(run: Run) -> torch.Tensor | None:
    """The calibration windows of a fresh statistics pass (None: a saved plan or a matching cache needs none):
    text cut into windows, and the --self-calib share written by the model (sampled here, or --self-text)."""
    cfg = run.cfg
    if not run.needs_stats or run.cache:
        return None

    def windows(spec: str, docs: list[str] | None = None):
        return lambda n: calibration_tokens(spec, run.tokenizer, n, cfg.seq_len, cfg.seed,
                                            vocab_size=run.layout.config.vocab_size, docs=docs)
    sampling = run.share and cfg.self_text is None
    start = start_token(run.layout.config, run.tokenizer)
    own = windows(cfg.self_text) if cfg.self_text is not None else None
    if run.auto is not None:              # text windows, self-written ones, and the self-written held out
        def written(n: int) -> torch.Tensor:
            return mixed_windows(None, run.source, start, 1.0, n, cfg.seq_len, cfg.seed, not cfg.quiet, own)
        return run.stages.run("self-calibration" if sampling else "calibration text", run.auto.windows,
                              lambda n, docs: windows(run.meta["spec"], docs)(n), written if run.share else None)
    text = windows(run.meta["spec"], run.tradeoff.calibration if run.tradeoff is not None else None)
    return run.stages.run("self-calibration" if sampling else "calibration text", mixed_windows, text, run.source,
                          start, run.share, cfg.samples, cfg.seq_len, cfg.seed, not cfg.quiet, own)


def _plan_of(run: Run, layers: dict[int, LayerPlan], seconds: float) -> Plan:
    """The whole plan: the saved one, or the method's from its layers (no layer: its plan-wide options only)."""
    if run.saved_plan is not None:
        return run.saved_plan
    if run.auto is not None:
        return run.auto.chosen_plan(seconds)
    return run.method.assemble(layers, run.keep, run.options, run.cfg.seed, run.layout.family.model_type, seconds)


def layer_steps(run: Run, tokens: torch.Tensor | None, writer: CheckpointWriter | None) -> list[Step]:
    """What the engine does to each decoder layer, in order (moeprune.steps)."""
    cfg, layout, streamed = run.cfg, run.layout, isinstance(run.source, CheckpointSource)
    plot_layers = set(pick_layers([layer.index for layer in layout.layers]))

    def decide(i: int, ls: LayerStats | None) -> LayerPlan:
        if run.saved_plan is not None:
            return run.saved_plan.layers[i]
        if run.auto is not None:
            return run.auto.plans[run.auto.chosen][i]
        return run.method.plan_layer(ls, run.keep, run.options, cfg.seed)

    def keep_stats(i: int, ls: LayerStats) -> LayerStats:
        if cfg.stats_cache and i not in run.cache:
            ls.save(layer_file(cfg.stats_cache, i))
        # a checkpoint larger than memory keeps only what the report shows of a layer; a model in memory, all
        return ls.light(similarity=i in plot_layers and ls.outputs.numel() > 0) if streamed else ls

    weight_similarity = run.weight_similarity or not streamed        # a model in memory: cheap, always kept
    if run.auto is not None:
        cached = _choose(run, tokens, weight_similarity, keep_stats)
        tokens = None
    else:
        cached = lambda i: LayerStats.load(run.cache[i]) if i in run.cache else None    # noqa: E731
    plan = _plan_of(run, {}, 0.0)          # the plan-wide options (router rule, alignment, merge) of the surgery
    steps: list[Step] = [Observe(layout, tokens, cached, cfg.sample_tokens, cfg.seed, cfg.batch_size,
                                 weight_similarity, run.expert_outputs)]
    evaluate = Evaluate(run.evaluation.batches) if run.evaluation is not None else None
    steps += [evaluate] if evaluate is not None else []
    steps += [run.tradeoff] if run.tradeoff is not None else []
    steps += [Decide(decide), Apply(lambda m, lp, ls: apply_layer(m, lp, plan, layout, ls))]
    # written before "after" is evaluated: a merged expert of a quantized checkpoint is scored as the file holds it
    steps += [Write(writer.write_layer)] if writer is not None else []
    steps += [EvaluatePruned(evaluate)] if evaluate is not None else []
    steps += [KeepStats(keep_stats)]
    return steps


def _choose(run: Run, tokens: torch.Tensor, weight_similarity: bool, keep_stats) -> Callable:
    """--method auto's first pass: the statistics (text and self-written apart), each candidate's plan run on the
    held-out windows, the pick. Returns each layer's statistics of the chosen kind, for the pass that writes."""
    auto, cfg = run.auto, run.cfg
    auto.prepare(tokens, cfg.sample_tokens, weight_similarity, keep_stats)
    run.stages.run("auto: plan and score", run_engine, run.source, [auto], not cfg.quiet)
    chosen = run.stages.run("auto: choose", auto.choose, run.source)
    run.method, run.options = auto.methods[chosen]
    kept = auto.kept[auto.kind[chosen]]
    return kept.get


def _step(steps: list[Step], kind: type) -> Step | None:
    return next((s for s in steps if isinstance(s, kind)), None)


def finish(run: Run, steps: list[Step], writer: CheckpointWriter | None, tmp: Path | None,
           seconds: dict[str, float]) -> tuple[Report, Plan, Stats | None]:
    """Config, plan and statistics of the pruned model; the checkpoint completed in `tmp`; then the scores."""
    cfg, layout, stages = run.cfg, run.layout, run.stages
    stages.times.update({f"prune: {step}": round(s, 3) for step, s in seconds.items()})
    changes = update_config(run.source.model, layout, run.experts_before, run.keep)
    kept = _step(steps, KeepStats).stats
    stats = Stats(layout.family.model_type, run.name, run.meta, kept) if kept else None
    if cfg.stats_cache and stats is not None and not run.cache:
        stats.save_header(cfg.stats_cache)
    decided = _step(steps, Decide)
    plan = _plan_of(run, decided.plans, decided.seconds)
    if tmp is not None:
        stages.run("save", writer.finish, run.folder, layout.config, changes)
        plan.save(tmp / "plan.json")
    report = Report(model=run.name, method=plan.method, options=plan.options, router=plan.router, align=plan.align,
                    keep_per_layer={str(k): v for k, v in plan.keep_per_layer().items()},
                    experts_before=run.experts_before, before=run.info_before,
                    after=model_info(run.source.model, layout),
                    calibration=stats.calibration if stats is not None else None, calibration_note=run.calibration_note,
                    bytes_on_disk={"before": folder_bytes(run.folder), "after": folder_bytes(tmp)},
                    stages={"seconds": stages.times, "peak_rss_mb": stages.peak_mb},
                    quantization=_quantization(run, writer))
    if run.auto is not None:
        report.tradeoff = run.auto.result(tmp)
    _score(run, steps, report, tmp)
    return report, plan, stats


def _quantization(run: Run, writer: CheckpointWriter | None) -> dict | None:
    """A quantized input: its scheme, how the output holds it, and each merged expert's quantization error."""
    quant = getattr(run.source, "quant", None)
    if quant is None:
        return None
    out = {"input": quant.describe(), "output": "bf16 (--dequantize)" if run.cfg.dequantize else quant.method}
    if writer is not None and not run.cfg.dequantize:
        out.update(copied_expert_tensors=writer.copied_experts,
                   merged_expert_errors=dict(sorted(writer.quantization_errors.items())))
    return out


def _score(run: Run, steps: list[Step], report: Report, tmp: Path | None) -> None:
    """The evaluation and the trade-off scored from the streams the steps left: once the checkpoint is complete,
    so an evaluation that fails costs the report a section, not the prune."""
    evaluate = _step(steps, Evaluate)
    tallies = {}
    streams = []
    if evaluate is not None:
        tallies = {which: run.evaluation.tally() for which in ("before", "after")}
        got = evaluate.streams()
        streams += [(got.get(which, got["before"]), tallies[which].score) for which in ("before", "after")]
    if run.tradeoff is not None:
        streams += run.tradeoff.streams()
    if streams:
        try:
            run.stages.run("evaluate", score, run.source, streams)
            if tallies:
                report.evaluation = evaluation_section(tallies["before"].result(), tallies["after"].result())
            if run.tradeoff is not None:
                report.tradeoff = run.tradeoff.result(tmp)
        except Exception as e:  # noqa: BLE001 - any failure here must not throw the pruned checkpoint away
            report.evaluation_error = f"{type(e).__name__}: {e}"
            warnings.warn(f"the evaluation failed ({type(e).__name__}: {e}); the pruned checkpoint is saved "
                          "and its report says so", stacklevel=3)
    if run.evaluation is None and not run.cfg.no_eval:
        report.evaluation_note = "skipped: the model has no tokenizer that can encode text"
