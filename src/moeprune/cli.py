"""moeprune's command line: prune, info, methods, eval and sample. A thin layer over moeprune.api.

    moeprune info [MODEL]
    moeprune methods
    moeprune prune [MODEL] --method NAME (--keep K | --ratio R) --out DIR [...]
    moeprune eval [MODEL] [--against ORIGINAL]
    moeprune sample MODEL --out self.jsonl          (vLLM: text for prune --self-text)

Flags of `prune` are generated from api.PruneConfig and from every method's options dataclass.
"""

from __future__ import annotations

import argparse
import errno
import dataclasses
import json
import os
import sys
import tempfile
import traceback
import warnings
import typing
from pathlib import Path

from .api import PruneConfig, prune
from .arch import MoePruneError
from .atomic import Terminated
from .evaluate.command import add_eval_parser, cmd_eval
from .info import model_info
from .methods import METHODS
from .plan import Plan
from .report import summary_table, tradeoff_table
from .sample import add_sample_parser, cmd_sample
from .sources import CheckpointSource, open_source


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_dataclass_flags(parser, cls, skip=(), default_none: bool = False, seen: set | None = None) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or (seen is not None and f.name in seen):
            continue
        if seen is not None:
            seen.add(f.name)
        hint = hints[f.name]
        help_ = f.metadata.get("help", "")
        default = None if default_none else f.default
        if hint is bool:
            parser.add_argument(_flag(f.name), action="store_true", default=None if default_none else False, help=help_)
            continue
        kwargs: dict = {"default": default, "help": help_}
        if typing.get_origin(hint) is typing.Literal:
            kwargs["choices"] = typing.get_args(hint)
            kwargs["type"] = type(typing.get_args(hint)[0])
        else:
            base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
            kwargs["type"] = base[0] if base[0] in (int, float, str) else str
        parser.add_argument(_flag(f.name), **kwargs)


def _method_option_names() -> set[str]:
    return {f.name for m in METHODS.values() for f in dataclasses.fields(m.options)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeprune", description="Prune and merge the experts of MoE language models.")
    parser.add_argument("--log", default=None, metavar="FILE",
                        help="where the details of an internal error go (default: <--out>.moeprune-error.log beside "
                             "the output, else a file in the system temp folder; its path is printed)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model's routed experts and save a standard checkpoint")
    p.add_argument("model", nargs="?", default=None, help="model name or path (default: demo-mixtral)")
    _add_dataclass_flags(p, PruneConfig, skip={"model"})
    group = p.add_argument_group("method options (each applies only to the methods that take it)")
    seen: set[str] = set()
    for m in METHODS.values():
        _add_dataclass_flags(group, m.options, default_none=True, seen=seen)

    i = sub.add_parser("info", help="describe a model's MoE layers and parameter counts")
    i.add_argument("model", nargs="?", default=None)
    i.add_argument("--json", action="store_true", help="print JSON")

    sub.add_parser("methods", help="list the pruning methods")
    add_eval_parser(sub)
    add_sample_parser(sub)
    return parser


def cmd_prune(args) -> int:
    config_names = {f.name for f in dataclasses.fields(PruneConfig)}
    cfg = PruneConfig(**{k: v for k, v in vars(args).items() if k in config_names})
    options = {k: v for k, v in vars(args).items() if k in _method_option_names() and v is not None}
    if cfg.out is None:
        raise MoePruneError("--out DIR is required: the folder to write the pruned checkpoint to")
    result = prune(cfg, **options)
    r = result.report
    print("\n" + summary_table(r))          # ends with the parameter counts before/after
    if r.tradeoff is not None:
        print("\nthe trade-off: perplexity ratio pruned / full on held-out calibration text, per domain\n"
              + tradeoff_table(r.tradeoff))
    print(f"\n{r.method}: {r.experts_before} -> {next(iter(r.keep_per_layer.values()))} experts per MoE layer")
    print(f"saved to {result.out} (report: {result.out / 'report.md'})")
    return 0


def cmd_info(args) -> int:
    name, source, _, folder = open_source(args.model, device="cpu")     # a checkpoint: headers and config only
    info = {"model": name, **model_info(source.model, source.layout)}
    if isinstance(source, CheckpointSource):
        info["dtype"] = sorted({t.dtype for t in source.ckpt.tensors.values()})
        if source.quant is not None:
            info["quantization"] = source.quant.describe()
    plan_file = folder / "plan.json" if folder is not None else None
    if plan_file is not None and plan_file.is_file():
        plan = Plan.load(plan_file)
        info["pruned_by"] = {"method": plan.method, "keep": plan.options.get("keep"),
                             "origin": {str(i): lp.groups for i, lp in sorted(plan.layers.items())}}
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    p = info["parameters"]
    print(f"model              {info['model']}")
    print(f"family             {info['family']}")
    print(f"decoder layers     {info['decoder_layers']} ({len(info['moe_layers'])} MoE: {info['moe_layers']})")
    print(f"routed experts     {info['experts_per_layer']} per MoE layer, top-{info['top_k']}")
    print(f"shared experts     {', '.join(info['shared_experts']) or 'none'}")
    print(f"parameters         {p['total']:,} total, {p['routed_experts']:,} in routed experts, "
          f"{p['active_per_token']:,} active per token")
    print(f"dtype              {info['dtype']}")
    if "quantization" in info:
        print(f"quantization       {', '.join(f'{k} {v}' for k, v in info['quantization'].items())}")
    if "pruned_by" in info:
        print(f"pruned by          {info['pruned_by']['method']} (plan.json); each kept expert merged from "
              "the original experts:")
        for i, groups in info["pruned_by"]["origin"].items():
            print(f"  layer {i:>3}: " + "  ".join(f"{j}<-{g}" if len(g) > 1 else f"{j}<-{g[0]}"
                                               for j, g in enumerate(groups)))
    return 0


def cmd_methods(args) -> int:
    from .tradeoff import AUTO, AUTO_METHODS
    width = max(map(len, METHODS))
    names = ", ".join(name for name, _ in AUTO_METHODS)
    print(f"{AUTO:<{width}}  the default: plans {names} from the calibration text's statistics and from the text\n"
          f"{'':<{width}}  and the model's own windows', scores the eight on held-out windows and writes the best\n"
          f"{'':<{width}}  (diverse where the model writes no windows of its own); source: docs/ABLATION.md, step 6")
    for m in METHODS.values():
        print(f"{m.name:<{width}}  {m.summary}")
        if m.paper:
            print(f"{'':<{width}}  source: {m.paper}")
        opts = [f.name.replace("_", "-") for f in dataclasses.fields(m.options)]
        if opts:
            print(f"{'':<{width}}  options: {', '.join('--' + o for o in opts)}")
    return 0


def _warning(message, category, filename, lineno, line=None) -> str:
    return f"moeprune: warning: {message}\n"


INTERNAL_ERROR = 3      # a bug in moeprune, not a problem with the input (those exit 2)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _argparse_errors(parser: argparse.ArgumentParser) -> None:
    """argparse's own errors (a bad flag value, a missing argument) as one `moeprune: error:` line, exit 2."""
    def error(message, prog=parser.prog):
        print(f"moeprune: error: {prog}: {_one_line(message)} (see {prog} --help)", file=sys.stderr)
        raise SystemExit(2)
    parser.error = error
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _argparse_errors(sub)


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError, ValueError):
        return True


def _log_file(args) -> Path:
    """Where the traceback of an internal error goes: --log, else beside --out, else a new file in the system
    temp folder; never inside the input model folder."""
    out, model = getattr(args, "out", None), getattr(args, "model", None)
    input_folder = Path(model) if isinstance(model, str) and model and Path(model).is_dir() else None
    if getattr(args, "log", None) and (input_folder is None or not _inside(Path(args.log), input_folder)):
        return Path(args.log)
    if isinstance(out, str) and out.strip() and Path(out).name:
        log = Path(out).parent / f"{Path(out).name}.moeprune-error.log"
        unsafe = input_folder is not None and _inside(log, input_folder)
        if not unsafe and log.parent.is_dir() and os.access(log.parent, os.W_OK):
            return log
    fd, name = tempfile.mkstemp(prefix="moeprune-error-", suffix=".log")
    os.close(fd)
    return Path(name)


def _internal_error(args, argv, error: BaseException) -> int:
    """One line for the user; the whole traceback in a log file, whose path the line gives."""
    detail = "".join(traceback.format_exception(error))
    text = f"moeprune {' '.join(argv if argv is not None else sys.argv[1:])}\n\n{detail}"
    try:
        log = _log_file(args)
        log.write_text(text)
        where = f"the log at {log}"
    except Exception:  # noqa: BLE001 - the log is a courtesy; the message must still come out
        where = "the command you ran (no log file could be written)"
    print(f"moeprune: error: internal error ({type(error).__name__}: {_one_line(error)[:300]}); please report it "
          f"with {where}", file=sys.stderr)
    return INTERNAL_ERROR


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 a problem with the input or the environment (one `moeprune: error:` line naming it
    and the fix), 3 an internal error (one line, the traceback in a log file), 130 Ctrl-C, 128 + N signal N."""
    warnings.formatwarning = _warning
    parser = build_parser()
    _argparse_errors(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:                 # --help (0) or an argparse error, already printed as one line
        return e.code if isinstance(e.code, int) else 2
    handler = {"prune": cmd_prune, "info": cmd_info, "methods": cmd_methods, "eval": cmd_eval,
               "sample": cmd_sample}[args.command]
    try:
        return handler(args)
    except MoePruneError as e:
        print(f"moeprune: error: {e}", file=sys.stderr)
        return 2
    except Terminated as e:
        print(f"moeprune: stopped by signal {e.signum}; the unfinished output was removed", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("moeprune: interrupted; the unfinished output was removed", file=sys.stderr)
        return 130
    except MemoryError:
        print("moeprune: error: out of memory; lower --samples, --sample-tokens or --batch-size, or use "
              "--dtype bfloat16", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno == errno.ENOSPC:
            print(f"moeprune: error: no space left on the device while writing ({e}); the unfinished output was "
                  "removed. Free some space or write --out to another disk", file=sys.stderr)
            return 2
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.EISDIR, errno.ENOTDIR,
                       errno.EDQUOT, errno.EMFILE, errno.ENAMETOOLONG, errno.EIO):
            where = f" {e.filename}" if e.filename else ""
            print(f"moeprune: error: {e.strerror or e}:{where}; check that path (permissions, free space, that it "
                  "exists)", file=sys.stderr)
            return 2
        return _internal_error(args, argv, e)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - no traceback reaches the user: one line, the rest in the log
        return _internal_error(args, argv, e)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
