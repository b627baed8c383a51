"""`moeprune eval`: evaluate a model, or a pruned model against its original, and report.

    moeprune eval [MODEL] [--against ORIGINAL] [--domains D ...] [--tasks T ...] [--lm-eval TASKS]
                  [--json FILE] [--md FILE] [--report DIR]

Wired into moeprune.cli by `add_eval_parser(sub)` and the handler `cmd_eval(args)`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..arch import MoePruneError


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
    e.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
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
             limit: int | None = None, batch_size: int = 8, dtype: str = "auto", device: str = "cpu",
             progress: bool = True) -> dict:
    """Load and evaluate MODEL (and ORIGINAL first, then freed); the report dict for report.write_report."""
    from ..api import model_info
    from ..arch import moe_layout
    from ..checkpoint import load
    from . import evaluate_model, evaluation_section, resolve_domains, resolve_tasks
    if domains is not None and len(domains):
        resolve_domains(domains)               # fail on a bad name before any model is loaded
    if tasks is not None and len(tasks):
        resolve_tasks(tasks)
    kwargs = {"domains": domains, "tasks": tasks, "lm_eval": lm_eval, "lm_eval_dir": lm_eval_dir, "seq_len": seq_len,
              "stride": stride, "batch_size": batch_size, "max_tokens": max_tokens, "task_limit": limit,
              "progress": progress}
    report: dict = {}
    before = None
    original_tokenizer = None
    if against is not None:
        loaded = load(against, dtype, device)
        original_tokenizer = loaded.tokenizer
        report["against"] = loaded.name
        report["before"] = _info(model_info, moe_layout, loaded.model)
        before = evaluate_model(loaded.model, loaded.tokenizer, **kwargs)
        del loaded
    loaded = load(model, dtype, device)
    report["model"] = loaded.name
    report["after"] = _info(model_info, moe_layout, loaded.model)
    after = evaluate_model(loaded.model, loaded.tokenizer or original_tokenizer, **kwargs)
    report["evaluation"] = evaluation_section(before, after)
    return report


def _info(model_info, moe_layout, model) -> dict | None:
    try:
        return model_info(model, moe_layout(model))
    except MoePruneError:          # a dense model can still be evaluated (e.g. a baseline)
        return None


def cmd_eval(args) -> int:
    from ..report import jsonable, make_plots, render_markdown, summary_table, write_report
    report = run_eval(args.model, args.against, _none(args.domains), _none(args.tasks), args.lm_eval,
                      args.lm_eval_dir, args.seq_len, args.stride, args.max_tokens, args.limit, args.batch_size,
                      args.dtype, args.device, progress=not args.quiet)
    print(summary_table(report))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(jsonable(report), indent=1, allow_nan=False) + "\n", encoding="utf-8")
        print(f"wrote {path}", file=sys.stderr)
    if args.md:
        path = Path(args.md)
        img = path.parent / f"{path.stem}_img"
        paths = make_plots(img, report)
        images = {k: p.relative_to(path.parent).as_posix() for k, p in paths.items()}
        path.write_text(render_markdown(jsonable(report), images), encoding="utf-8")
        print(f"wrote {path}", file=sys.stderr)
    if args.report:
        write_report(args.report, report)
        print(f"wrote {args.report}/report.md", file=sys.stderr)
    return 0
