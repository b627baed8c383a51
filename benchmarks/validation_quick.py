"""Quick pass of a few methods on the validation models (issue #22 part 2); writes docs/data/validation_quick.json.

    OMP_NUM_THREADS=1 python -m benchmarks.validation_quick --keeps 0.5

The protocol of benchmarks/compare.py: calibrate on the seen domains (80% split of their calibration shards),
evaluate every domain's held-out shard; ratio = pruned ppl / full ppl; one calibration seed, small budgets.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import eval_domains, ppl, pruned_copy, ratios, split_calibration, stats_for, summarise
from moeprune.arch import moe_layout
from moeprune.checkpoint import load
from moeprune.selfcalib import DEFAULT_SHARE

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["val-upcycled", "val-shared", "val-sigmoid"]
# (label, registered method, options, self-calibration share)
METHODS = [("diverse", "diverse", {}, DEFAULT_SHARE),
           ("diverse (self-calib 0)", "diverse", {}, 0.0),
           ("frequency", "frequency", {}, DEFAULT_SHARE),
           ("naee", "naee", {}, DEFAULT_SHARE),
           ("reap", "reap", {}, DEFAULT_SHARE),
           ("diverse-prune[agglomerative,frequency]", "diverse-prune",
            {"grouping": "agglomerative", "saliency": "frequency"}, DEFAULT_SHARE)]


def main() -> int:
    from moeprune.methods import METHODS as REGISTRY
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--keeps", nargs="+", type=float, default=[0.5])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--sample-tokens", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/validation_quick")
    ap.add_argument("--json", default="docs/data/validation_quick.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    calib_dir, _ = split_calibration(Path(args.work))
    domains = eval_domains()
    results = []
    for name in args.models:
        t0 = time.perf_counter()
        loaded = load(str(ROOT / "validation" / "models" / name), dtype="float32")
        model, tok = loaded.model, loaded.tokenizer
        torch.manual_seed(0)
        E = moe_layout(model).layers[0].num_experts
        full = ppl(model, tok, domains, args.eval_tokens)
        res = {"model": name, "experts": E, "full_ppl": full, "runs": []}
        stats_by_share = {}
        for label, method, options, share in METHODS:
            if share not in stats_by_share:
                stats_by_share[share] = stats_for(model, tok, str(calib_dir), args.samples, args.seq_len, args.seed,
                                                  args.sample_tokens, share)[0]
            stats = stats_by_share[share]
            for frac in args.keeps:
                keep = round(E * frac)
                row = {"method": label, "keep": keep, "keep_fraction": frac, "self_calib": share}
                try:
                    plan = REGISTRY[method].plan(stats, keep, args.seed, **options)
                    pruned, _ = pruned_copy(model, plan, stats)
                    p = ppl(pruned, tok, domains, args.eval_tokens)
                    r = ratios(p, full)
                    row.update(ppl=p, ratio=r, **summarise(r))
                    del pruned
                    print(f"{name} {label:40s} keep {keep:2d}/{E}: mean {row['mean']:.3f} worst {row['worst']:.3f}",
                          flush=True)
                except Exception as exc:        # record and go on: this is a first look
                    row["error"] = f"{type(exc).__name__}: {exc}"
                    print(f"{name} {label} keep {keep}: ERROR {row['error']}", flush=True)
                res["runs"].append(row)
        res["seconds"] = time.perf_counter() - t0
        results.append(res)
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"wall {time.perf_counter() - start:.0f}s; wrote {args.json}")
    for frac in args.keeps:
        print(f"\nkeep {frac:.0%} of experts: mean ratio / worst-domain ratio\n")
        print("| method | " + " | ".join(f"{r['model']} (keep {round(r['experts'] * frac)}/{r['experts']})"
                                       for r in results) + " |")
        print("| --- |" + " --- |" * len(results))
        for label, *_ in METHODS:
            cells = []
            for r in results:
                row = next(x for x in r["runs"] if x["method"] == label and x["keep_fraction"] == frac)
                cells.append(f"{row['mean']:.3f} / {row['worst']:.3f}" if "mean" in row else "error")
            print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
