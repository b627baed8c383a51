"""`moeprune eval`: evaluate a model, or a pruned model against its original, and report.

    moeprune eval [MODEL] [--against ORIGINAL] [--domains D ...] [--tasks T ...] [--lm-eval TASKS]
                  [--json FILE] [--md FILE] [--report DIR]

Wired into moeprune.cli by `add_eval_parser(sub)` and the handler `cmd_eval(args)`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..arch import NotMoE
from ..checkpoint import load
from ..engine import run, score
from ..info import model_info
from ..report import Report, jsonable, make_plots, render_markdown, summary_table, write_report
from ..sources import open_source
from ..steps import Evaluate
from . import Evaluation, _run_lm_eval, evaluate_model, evaluation_section, resolve_domains, resolve_tasks


def add_eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="perplexity per domain and task accuracy of a model (vs. its original)")
    e.add_argument("model", nargs="?", default=None, help="model name or path (default: demo-mixtral)")
    e.add_argument("--against", default=None, metavar="ORIGINAL",
                   help="also evaluate this (unpruned) model and report ratios pruned / full")
    e.add_argument("--domains", nargs="+", default=None, metavar="D",
                   help="held-out text: demo domain names, .txt/.jsonl files or folders, NAME=PATH; 'none' to skip "
                        "(default: the demo evaluation shards)")
    e.add_argument("--tasks", nargs="+", default=None, metavar="T",
                   help="multiple-choice JSONL tasks {query, choices, gold}: demo task names, files, folders, "
                        "NAME=PATH; 'none' to skip (default: the demo tasks)")
    e.add_argument("--lm-eval", default=None, metavar="TASKS",
                   help="comma-separated lm-evaluation-harness tasks (needs pip install 'moeprune[eval]'); "
                        "our JSONL task names and files are run through lm-eval too")
    e.add_argument("--lm-eval-dir", default=None, metavar="DIR", help="a folder of local lm-eval YAML tasks")
    e.add_argument("--seq-len", type=int, default=256, help="tokens per perplexity window")
    e.add_argument("--stride", type=int, default=None, help="window stride (default: --seq-len, no overlap)")
    e.add_argument("--max-tokens", type=int, default=None, help="at most this many tokens per domain")
    e.add_argument("--limit", type=int, default=None, help="at most this many questions per task")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    e.add_argument("--device", default="auto", help="torch device, e.g. cpu or cuda (auto: the GPU if any)")
    e.add_argument("--json", default=None, metavar="FILE", help="write the report as JSON")
    e.add_argument("--md", default=None, metavar="FILE", help="write the report as Markdown (plots beside it)")
    e.add_argument("--report", default=None, metavar="DIR", help="write report.json, report.md and img/ here")
    e.add_argument("--quiet", action="store_true", help="no progress bars")


def _none(values):
    if values is None:
        return None
    return [] if [v.lower() for v in values] == ["none"] else values


def run_eval(model: str | None, against: str | None = None, domains=None, tasks=None, lm_eval=None,
             lm_eval_dir=None, seq_len: int = 256, stride: int | None = None, max_tokens: int | None = None,
             limit: int | None = None, batch_size: int = 8, dtype: str = "auto", device: str = "auto",
             progress: bool = True) -> Report:
    """Evaluate ORIGINAL (if given) then MODEL, each read one decoder layer at a time when it is a local
    safetensors folder, so neither has to fit in memory."""
    if domains is not None and len(domains):
        resolve_domains(domains)               # fail on a bad name before any model is loaded
    if tasks is not None and len(tasks):
        resolve_tasks(tasks)
    settings = {"domains": domains, "tasks": tasks, "seq_len": seq_len, "stride": stride, "batch_size": batch_size,
                "max_tokens": max_tokens, "task_limit": limit}
    lm = {"lm_eval": lm_eval, "lm_eval_dir": lm_eval_dir}
    before, tokenizer, info_before, original = None, None, None, None
    if against is not None:
        original, info_before, before, tokenizer = _evaluate(against, settings, lm, dtype, device, None, progress)
    name, info, after, _ = _evaluate(model, settings, lm, dtype, device, tokenizer, progress)
    return Report(model=name, against=original, before=info_before, after=info,
                  evaluation=evaluation_section(before, after))


def _evaluate(spec, settings: dict, lm: dict, dtype: str, device: str, fallback_tokenizer, progress: bool):
    """(name, model info, evaluation, tokenizer) of one model: streamed through the per-layer engine; a dense
    model (a baseline) is loaded and evaluated in memory; lm-eval always needs the model in memory."""
    try:
        name, source, tokenizer, _ = open_source(spec, dtype, device)
    except NotMoE:
        loaded = load(spec, dtype, device)
        tokenizer = loaded.tokenizer or fallback_tokenizer
        return loaded.name, None, evaluate_model(loaded.model, tokenizer, progress=progress, **settings, **lm), \
            tokenizer
    tokenizer = tokenizer or fallback_tokenizer
    ev = Evaluation(tokenizer, source.model.config, **settings)
    step, tally = Evaluate(ev.batches), ev.tally()
    run(source, [step], progress)
    score(source, [(step.before, tally.score)])
    result = tally.result()
    if lm["lm_eval"]:
        names = [n for n in str(lm["lm_eval"]).split(",") if n.strip()]
        result["lm_eval"] = _run_lm_eval(load(spec, dtype, device).model, tokenizer, names, lm["lm_eval_dir"],
                                         settings["batch_size"], settings["task_limit"])
    return name, model_info(source.model, source.layout), result, tokenizer


def cmd_eval(args) -> int:
    report = run_eval(args.model, args.against, _none(args.domains), _none(args.tasks), args.lm_eval,
                      args.lm_eval_dir, args.seq_len, args.stride, args.max_tokens, args.limit, args.batch_size,
                      args.dtype, args.device, progress=not args.quiet)
    print(summary_table(report))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(jsonable(report.to_json()), indent=1, allow_nan=False) + "\n", encoding="utf-8")
        print(f"wrote {path}", file=sys.stderr)
    if args.md:
        path = Path(args.md)
        img = path.parent / f"{path.stem}_img"
        paths = make_plots(img, report)
        images = {k: p.relative_to(path.parent).as_posix() for k, p in paths.items()}
        path.write_text(render_markdown(jsonable(report.to_json()), images), encoding="utf-8")
        print(f"wrote {path}", file=sys.stderr)
    if args.report:
        write_report(args.report, report)
        print(f"wrote {args.report}/report.md", file=sys.stderr)
    return 0
