"""Benchmark every method on the demo models under the task-agnostic protocol; write docs/BENCHMARKS.md.

    python -m benchmarks.compare                       # full run: 2 models x 2 sparsities x 3 seeds x all methods
    python -m benchmarks.compare --seeds 0 --eval-tokens 4096 --models demo-mixtral   # a quick look

Per model and calibration seed: one statistics pass on the seen-domain mix, then every registered
method at both sparsities, each applied to a copy of the model and evaluated on every domain's
held-out shard (seen and unseen reported apart) and on the multiple-choice tasks.
Time per stage and peak memory (RSS) are recorded; results go to docs/data/benchmarks.json and the tables
and plot to docs/BENCHMARKS.md and docs/data/img/quality_vs_sparsity.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (UNSEEN, eval_domains, keeps_for, ppl, pruned_copy, ratios, seen_domains,
                               split_calibration, stats_for, summarise)

from moeprune.arch import moe_layout
from moeprune.checkpoint import load, save_model
from moeprune.evaluate.multiple_choice import task_accuracy
from moeprune.methods import METHODS
from moeprune.selfcalib import DEFAULT_SHARE

ROOT = Path(__file__).resolve().parents[1]


def parse_method(text: str) -> tuple[str, dict]:
    """"diverse[saliency=frequency,tau=0.5]" -> ("diverse", {"saliency": "frequency", "tau": 0.5})."""
    name, _, rest = text.partition("[")
    options = {}
    for item in filter(None, rest.rstrip("]").split(",")):
        key, _, value = item.partition("=")
        try:
            options[key] = float(value)
        except ValueError:
            options[key] = value
    return name, options


MARKER = "<!-- written by hand below this line; compare.py keeps it when it rewrites the tables -->"


def write_markdown(path: Path, text: str) -> None:
    """Write the generated tables, keeping the hand-written discussion below MARKER in the old file."""
    old = path.read_text() if path.exists() else ""
    kept = old[old.index(MARKER):] if MARKER in old else MARKER + "\n"
    path.write_text(text.rstrip("\n") + "\n\n" + kept)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mean_acc(acc: dict) -> float:
    return statistics.mean(v["acc"] for v in acc.values()) if acc else float("nan")


def run_model(name: str, args, calib_dir: Path) -> dict:
    loaded = load(name, dtype="float32")      # CPU: float32 kernels are faster than bfloat16
    model, tok = loaded.model, loaded.tokenizer
    torch.manual_seed(0)
    E = moe_layout(model).layers[0].num_experts
    keeps = keeps_for(name, E)
    domains = eval_domains()
    full = ppl(model, tok, domains, args.eval_tokens)
    full_acc = task_accuracy(model, tok, limit=args.task_limit, progress=False) if args.task_limit else {}
    result = {"model": name, "experts": E, "keeps": keeps, "full_ppl": full, "task_limit": args.task_limit,
              "full_acc": {t: v["acc"] for t, v in full_acc.items()}, "runs": []}
    for seed in args.seeds:
        stats, tokens, t_stats = stats_for(model, tok, str(calib_dir), args.samples, args.seq_len, seed,
                                           args.sample_tokens, args.self_calib)
        start = time.perf_counter()
        with torch.no_grad():
            for batch in tokens.split(8):
                model(input_ids=batch, use_cache=False)
        t_forward = time.perf_counter() - start
        print(f"[{name} seed {seed}] stats {t_stats:.1f}s, one forward {t_forward:.1f}s, peak {peak_mb():.0f} MB",
              flush=True)
        for method in args.methods:
            for keep in keeps:
                start = time.perf_counter()
                base, options = parse_method(method)
                plan = METHODS[base].plan(stats, keep, seed, **options)
                t_plan = time.perf_counter() - start
                pruned, t_apply = pruned_copy(model, plan, stats)
                with tempfile.TemporaryDirectory() as tmp:
                    start = time.perf_counter()
                    save_model(pruned, tok, Path(tmp))
                    t_save = time.perf_counter() - start
                p = ppl(pruned, tok, domains, args.eval_tokens)
                acc = task_accuracy(pruned, tok, limit=args.task_limit, progress=False) \
                    if seed == args.seeds[0] and args.task_limit else None
                r = ratios(p, full)
                row = {"seed": seed, "method": method, "keep": keep, "ppl": p, "ratio": r, **summarise(r),
                       "acc": {t: v["acc"] for t, v in acc.items()} if acc else None,
                       "seconds": {"stats": t_stats, "plan": t_plan, "apply": t_apply, "save": t_save,
                                   "forward": t_forward},
                       "peak_rss_mb": peak_mb()}
                result["runs"].append(row)
                print(f"  {method:16s} keep {keep:2d}: mean {row['mean']:.3f} worst {row['worst']:.3f} "
                      f"unseen {row['unseen']:.3f} plan {t_plan:.2f}s apply {t_apply:.2f}s", flush=True)
                del pruned
    return result


def aggregate(result: dict) -> list[dict]:
    rows = []
    for keep in result["keeps"]:
        for method in dict.fromkeys(r["method"] for r in result["runs"]):
            runs = [r for r in result["runs"] if r["method"] == method and r["keep"] == keep]
            if not runs:
                continue
            agg = {"method": method, "keep": keep}
            for key in ("mean", "worst", "seen", "unseen"):
                vals = [r[key] for r in runs]
                agg[key] = statistics.mean(vals)
                agg[key + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            accs = [r for r in runs if r["acc"]]
            agg["acc"] = statistics.mean(accs[0]["acc"].values()) if accs else float("nan")
            sec = lambda k: statistics.mean(r["seconds"][k] for r in runs)  # noqa: E731
            agg.update(plan_s=sec("plan"), apply_s=sec("apply"), save_s=sec("save"), stats_s=sec("stats"),
                       forward_s=sec("forward"), peak_rss_mb=max(r["peak_rss_mb"] for r in runs))
            prune_s = agg["stats_s"] + agg["plan_s"] + agg["apply_s"] + agg["save_s"]
            agg["prune_vs_forward"] = prune_s / agg["forward_s"]
            rows.append(agg)
    return rows


def command() -> str:
    """This run's arguments, less a --render (which only re-draws a finished run)."""
    argv = sys.argv[1:]
    if "--render" in argv:
        i = argv.index("--render")
        argv = argv[:i] + argv[i + 2:]
    return " ".join(argv)


def markdown(results: list[dict], args, wall: float) -> str:
    lines = ["# Benchmarks: every method, two sparsities, two models", "",
             f"Command: `python -m benchmarks.compare {command()}`  ",
             f"Machine: {cpu_name()} ({platform.machine()}), {torch.get_num_threads()} torch threads, "
             f"{os.cpu_count()} CPUs, {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}, "
             f"Python {platform.python_version()}, "
             f"torch {torch.__version__}; wall time {wall / 60:.1f} min.  ",
             f"Calibration: {args.samples} x {args.seq_len} tokens, "
             f"{round(args.self_calib * args.samples)} of the windows written by the model itself (`--self-calib "
             f"{args.self_calib}`, moeprune's default), the rest from the seen domains "
             f"({', '.join(seen_domains())}; 80% of each calibration shard, by document), seeds {args.seeds}. "
             f"Unseen domains: {', '.join(UNSEEN)}. Evaluation: first {args.eval_tokens} tokens of every domain's "
             "held-out shard; task accuracy on the multiple-choice tasks (first seed).", "",
             "Perplexity ratio = pruned / full model (1.0 = nothing lost; lower is better). mean and worst over all "
             "domains; seen/unseen: mean over those domains. +- is the standard deviation over calibration seeds.", ""]
    for res in results:
        lines += [f"## {res['model']} ({res['experts']} experts per layer)", "",
                  "Full model perplexity: " + ", ".join(f"{d} {v:.2f}" for d, v in res["full_ppl"].items()) + "  ",
                  "Full model task accuracy: " + (", ".join(f"{t} {v:.3f}" for t, v in res["full_acc"].items())
                                                  or "not measured in this run (--task-limit 0)"), ""]
        for keep in res["keeps"]:
            rows = sorted((r for r in res["agg"] if r["keep"] == keep), key=lambda r: r["mean"])
            lines += [f"### keep {keep} of {res['experts']}", "",
                      "| method | mean ratio | worst domain | seen | unseen | task acc | plan s | apply s | save s |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
            for r in rows:
                lines.append(f"| {r['method']} | {r['mean']:.3f} +- {r['mean_sd']:.3f} | {r['worst']:.3f} +- "
                             f"{r['worst_sd']:.3f} | {r['seen']:.3f} | {r['unseen']:.3f} | "
                             f"{'-' if r['acc'] != r['acc'] else format(r['acc'], '.3f')} | "
                             f"{r['plan_s']:.2f} | {r['apply_s']:.2f} | {r['save_s']:.2f} |")
            lines.append("")
            domains = list(res["full_ppl"])
            lines += [f"Per-domain perplexity ratio at keep {keep} (mean over seeds; * = unseen in calibration):", "",
                      "| method | " + " | ".join(d + ("*" if d in UNSEEN else "") for d in domains) + " |",
                      "| --- |" + " --- |" * len(domains)]
            for r in rows:
                runs = [x for x in res["runs"] if x["method"] == r["method"] and x["keep"] == keep]
                lines.append(f"| {r['method']} | " + " | ".join(
                    f"{statistics.mean(x['ratio'][d] for x in runs):.3f}" for d in domains) + " |")
            lines.append("")
        a = res["agg"][0]
        lines += [f"Statistics pass {a['stats_s']:.1f} s; one plain forward over the same calibration tokens "
                  f"{a['forward_s']:.2f} s; a whole prune (stats + plan + apply + save) is about "
                  f"{a['prune_vs_forward']:.0f}x one forward. "
                  f"Peak RSS {max(r['peak_rss_mb'] for r in res['agg']):.0f} MB.",
                  ""]
    task_limit = max((r.get("task_limit", args.task_limit) for r in results), default=args.task_limit)
    lines += ["![quality vs sparsity](data/img/quality_vs_sparsity.png)", ""] + verdict(results, task_limit)
    return "\n".join(lines)


def verdict(results: list[dict], task_limit: int, ours: str = "diverse") -> list[str]:
    """Per setting and metric: the best baseline against `ours`, computed from the table, not written by hand.

    Baselines are the other registered methods; variants of `ours` (NAME[...]) and its relatives
    (diverse-prune, diverse-paper) are left out, so `ours` must beat the strongest outside method.
    A gap smaller than the noise is marked: the larger seed standard deviation of the two for perplexity,
    two binomial standard errors for accuracy (first seed only, task_limit questions per task).
    """
    metrics = [("mean", "mean ratio", min), ("worst", "worst domain", min), ("seen", "seen domains", min),
               ("unseen", "unseen domains", min), ("acc", "task accuracy", max)]
    lines = [f"## Does `{ours}` beat every baseline? (generated from the tables above)", "",
             "| model | keep | metric | " + ours + " | best baseline | verdict |",
             "| --- | --- | --- | --- | --- | --- |"]
    for res in results:
        for keep in res["keeps"]:
            rows = {r["method"]: r for r in res["agg"] if r["keep"] == keep}
            if ours not in rows:
                continue
            others = {m: r for m, r in rows.items() if not m.startswith(ours)}
            for key, text, best in metrics:
                values = {m: r[key] for m, r in others.items() if r[key] == r[key]}     # drop NaN (no tasks)
                if not values or rows[ours][key] != rows[ours][key]:
                    continue
                top = best(values, key=values.get)
                mine, theirs = rows[ours][key], values[top]
                sd = rows[ours].get(key + "_sd", 0.0)
                if key == "acc":
                    n = task_limit * max(1, len(res["full_acc"]))
                    noise = 2 * (theirs * (1 - theirs) / n) ** 0.5
                else:
                    noise = max(sd, others[top].get(key + "_sd", 0.0))
                if round(mine, 3) == round(theirs, 3):
                    word = "tie"
                else:
                    word = "**wins**" if (mine < theirs) == (best is min) else "loses"
                    if abs(mine - theirs) <= noise:
                        word += " (within noise)"
                spread = f" +- {sd:.3f}" if sd else ""
                lines.append(f"| {res['model']} | {keep} | {text} | {mine:.3f}{spread} | {top} {theirs:.3f} | {word} |")
    return lines + [""]


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, res in zip(axes[0], results):
        for method in dict.fromkeys(r["method"] for r in res["agg"]):
            pts = sorted((r["keep"] / res["experts"], r["mean"]) for r in res["agg"] if r["method"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method,
                    linewidth=2.5 if method.startswith("diverse") else 1.2)
        ax.set_title(res["model"])
        ax.set_xlabel("fraction of experts kept")
        ax.set_ylabel("mean perplexity ratio (pruned / full)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["demo-mixtral", "demo-fine"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS) + ["diverse[diversity=0.5]", "diverse[grouping=anchors]",
                                                                     "diverse[grouping=anchors,saliency=frequency]"],
                    help="registered methods, or NAME[OPTION=VALUE,...] for a variant (default: all, and "
                         "diverse with the defaults of steps 4, 3 and 2 of docs/ABLATION.md)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--sample-tokens", type=int, default=512)
    ap.add_argument("--self-calib", type=float, default=DEFAULT_SHARE,
                    help="share of the calibration windows the model writes itself (moeprune.selfcalib)")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--task-limit", type=int, default=200, help="questions per task, first seed only (0: no tasks)")
    ap.add_argument("--work", default="runs/bench")
    ap.add_argument("--md", default="docs/BENCHMARKS.md")
    ap.add_argument("--json", default="docs/data/benchmarks.json")
    ap.add_argument("--merge", action="store_true",
                    help="update --json: rerun only --methods, keep the other methods' rows of the earlier run")
    ap.add_argument("--render", type=float, default=None, metavar="MINUTES",
                    help="only re-render the Markdown and plot from --json (MINUTES: the wall time of that run)")
    args = ap.parse_args()
    if args.render is not None:
        results = json.loads(Path(args.json).read_text())
        plot(results, Path(args.md).parent / "data" / "img" / "quality_vs_sparsity.png")
        write_markdown(Path(args.md), markdown(results, args, args.render * 60))
        return 0
    start = time.perf_counter()
    calib_dir, _ = split_calibration(Path(args.work))
    previous = {r["model"]: r for r in json.loads(Path(args.json).read_text())} if args.merge else {}
    results = []
    for name in args.models:
        res = run_model(name, args, calib_dir)
        if name in previous:      # keep the earlier run's other methods; this run's methods replace theirs
            old = previous.pop(name)
            res["runs"] = [r for r in old["runs"] if r["method"] not in args.methods] + res["runs"]
            res["full_acc"] = res["full_acc"] or old["full_acc"]
        res["agg"] = aggregate(res)
        results.append(res)
        Path(args.json).write_text(json.dumps(results + list(previous.values()), indent=1))
    results += list(previous.values())
    plot(results, Path(args.md).parent / "data" / "img" / "quality_vs_sparsity.png")
    write_markdown(Path(args.md), markdown(results, args, time.perf_counter() - start))
    print(f"wrote {args.md} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
