"""Ablation of the paper's method's options; chooses the defaults on calibration validation data only.

    python benchmarks/ablation.py                     # both demo models, the lower sparsity, seed 0
    python benchmarks/ablation.py --models demo-mixtral --keep 4

Starting from a base configuration (--base paper: the paper's description; --base current: today's
defaults), each option is varied alone. Every variant is scored on a
validation split of the calibration shards (seen domains; used to choose) and, for the record only,
on every domain's held-out evaluation shard (seen and unseen apart). Writes docs/ABLATION.md and
docs/ablation.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import eval_domains, ppl, pruned_copy, ratios, split_calibration, stats_for, summarise  # noqa: E402

from moeprune.arch import moe_layout  # noqa: E402
from moeprune.checkpoint import load  # noqa: E402
from moeprune.methods import METHODS  # noqa: E402

BASES = {"paper": {"grouping": "agglomerative", "tau": 1.0, "weighting": "similarity"},   # the paper's description
         "current": {}}                                                                # today's defaults
VARIANTS = [
    {},
    {"representation": "weight"},
    {"similarity": "cosine"},
    {"grouping": "spectral"},
    {"grouping": "anchors"},
    {"tau": 0.1},
    {"tau": 0.02},
    {"router": "representative"},
    {"align": "weights"},
    {"align": "activations"},
    {"merge": "fit"},
    {"align": "weights", "merge": "fit"},
    {"grouping": "anchors", "align": "weights", "merge": "fit"},
    {"grouping": "anchors", "weighting": "usage"},
    {"grouping": "anchors", "weighting": "usage", "tau": 0.1},
]
KEEP = {"demo-mixtral": 4, "demo-fine": 16}


def label(v: dict) -> str:
    return ", ".join(f"{k}={x}" for k, x in v.items()) or "defaults"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["demo-mixtral", "demo-fine"])
    ap.add_argument("--keep", type=int, default=None)
    ap.add_argument("--base", choices=list(BASES), default="paper", help="options every variant starts from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--sample-tokens", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--work", default="runs/bench")
    ap.add_argument("--md", default="docs/ABLATION.md")
    ap.add_argument("--json", default="docs/ablation.json")
    args = ap.parse_args()
    start = time.perf_counter()
    calib_dir, valid = split_calibration(Path(args.work))
    evald = eval_domains()
    results = []
    for name in args.models:
        loaded = load(name, dtype="float32")      # CPU: float32 kernels are faster than bfloat16
        model, tok = loaded.model, loaded.tokenizer
        keep = args.keep or KEEP.get(name) or moe_layout(model).layers[0].num_experts // 2
        full_valid, full_eval = ppl(model, tok, valid, args.eval_tokens), ppl(model, tok, evald, args.eval_tokens)
        stats, _, _ = stats_for(model, tok, str(calib_dir), args.samples, args.seq_len, args.seed, args.sample_tokens)
        rows = []
        for ref in ("frequency", "diverse-prune"):
            pruned, _ = pruned_copy(model, METHODS[ref].plan(stats, keep, args.seed), stats)
            rows.append({"variant": f"({ref})", "valid": summarise(ratios(ppl(pruned, tok, valid, args.eval_tokens),
                                                                           full_valid))["mean"],
                         **summarise(ratios(ppl(pruned, tok, evald, args.eval_tokens), full_eval))})
        for v in VARIANTS:
            plan = METHODS["diverse"].plan(stats, keep, args.seed, **{**BASES[args.base], **v})
            pruned, _ = pruned_copy(model, plan, stats)
            row = {"variant": label(v), "options": v,
                   "valid": summarise(ratios(ppl(pruned, tok, valid, args.eval_tokens), full_valid))["mean"],
                   **summarise(ratios(ppl(pruned, tok, evald, args.eval_tokens), full_eval))}
            rows.append(row)
            print(f"[{name} keep {keep}] {row['variant']:45s} valid {row['valid']:.3f} eval mean {row['mean']:.3f} "
                  f"worst {row['worst']:.3f} unseen {row['unseen']:.3f}", flush=True)
        results.append({"model": name, "keep": keep, "rows": rows})
        Path(args.json).write_text(json.dumps(results, indent=1))
    lines = ["# Ablation of the diverse method's options", "",
             f"Command: `python benchmarks/ablation.py {' '.join(sys.argv[1:])}` "
             f"({(time.perf_counter() - start) / 60:.1f} min on this machine's 2 CPU cores).", "",
             "Each row varies the named option(s) from the defaults. `valid`: mean perplexity ratio (pruned/full) on "
             "a validation split of the seen domains' calibration shards: the only number used to choose defaults. "
             "The other columns are on the held-out evaluation shards, for the record. Rows in parentheses are "
             "reference methods.", ""]
    for res in results:
        lines += [f"## {res['model']}, keep {res['keep']}", "",
                  "| variant | valid (choose) | eval mean | eval worst | seen | unseen |", "| --- | --- | --- | --- | --- | --- |"]
        for r in sorted(res["rows"], key=lambda r: r["valid"]):
            lines.append(f"| {r['variant']} | {r['valid']:.3f} | {r['mean']:.3f} | {r['worst']:.3f} | {r['seen']:.3f} "
                         f"| {r['unseen']:.3f} |")
        lines.append("")
    Path(args.md).write_text("\n".join(lines))
    print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
