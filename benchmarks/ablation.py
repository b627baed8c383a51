"""Ablation of the paper's method's options; chooses the defaults on calibration data only.

    python benchmarks/ablation.py                                  # step 3: domain-out, both models, both sparsities
    python benchmarks/ablation.py --variants contribution --references     # step 3, second round
    python benchmarks/ablation.py --protocol in-domain --base paper --models demo-mixtral --keep 4

Each variant changes some options of a base configuration (--base paper: the paper's description;
--base step2: the defaults before step 3 of docs/ABLATION.md; --base current: today's defaults).
Two ways to score a variant, both on calibration data only:

  in-domain   calibrate on 80% of the seen domains' calibration shards, score the mean perplexity ratio
              (pruned / full) on the other 20% (`valid`).
  domain-out  five folds: calibrate on four seen domains, score on the validation parts of all five, so
              one of them is unseen in every fold. `valid` is the mean ratio over folds; `held-out` is the
              held-out domain's ratio. This is what a task-agnostic method must do: stand up on text
              its calibration mix did not contain. Default, and what the defaults were chosen on.

For the record only (never used to choose), every variant is also calibrated on all seen domains and
evaluated on every domain's held-out evaluation shard (unseen = code and math). Writes --md and --json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (domain_out_folds, eval_domains, keeps_for, ppl, pruned_copy, ratios, split_calibration,  # noqa: E402
                    stats_for, summarise)

from moeprune.arch import moe_layout  # noqa: E402
from moeprune.checkpoint import load  # noqa: E402
from moeprune.methods import METHODS  # noqa: E402

BASES = {"paper": {"grouping": "agglomerative", "tau": 1.0, "weighting": "similarity",   # the paper's description
                   "saliency": "frequency"},
         "step2": {"saliency": "frequency"},   # the defaults step 3 of docs/ABLATION.md started from
         "current": {}}                        # today's defaults
VARIANTS = {
    "paper": [{}, {"representation": "weight"}, {"similarity": "cosine"}, {"grouping": "spectral"},
              {"grouping": "anchors"}, {"tau": 0.1}, {"tau": 0.02}, {"router": "representative"},
              {"align": "weights"}, {"align": "activations"}, {"merge": "fit"}, {"align": "weights", "merge": "fit"},
              {"grouping": "anchors", "align": "weights", "merge": "fit"},
              {"grouping": "anchors", "weighting": "usage"},
              {"grouping": "anchors", "weighting": "usage", "tau": 0.1}],
    "step2": [{}, {"tau": 0.02}, {"tau": 0.5}, {"router": "representative"},
                {"align": "weights", "merge": "fit"}, {"representation": "weight"},
                {"saliency": "reap"}, {"saliency": "reap", "weighting": "saliency"},
                {"grouping": "coverage"}, {"grouping": "coverage", "tau": 0.5},
                {"grouping": "coverage", "saliency": "reap"},
                {"grouping": "coverage", "saliency": "reap", "weighting": "saliency"},
                {"grouping": "coverage", "align": "weights", "merge": "fit"}],
    "contribution": [{"saliency": "contribution"}, {"grouping": "coverage", "saliency": "contribution"}],
}
VARIANTS["current"] = VARIANTS["step2"]
REFERENCES = ["frequency", "reap", "naee", "msmoe"]


def label(v: dict) -> str:
    return ", ".join(f"{k}={x}" for k, x in v.items()) or "base"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["demo-mixtral", "demo-fine"])
    ap.add_argument("--keep", type=int, nargs="+", default=None, help="experts to keep (default: both sparsities)")
    ap.add_argument("--protocol", choices=["domain-out", "in-domain"], default="domain-out")
    ap.add_argument("--base", choices=list(BASES), default="step2", help="options every variant starts from")
    ap.add_argument("--variants", choices=list(VARIANTS), default=None, help="default: the base's own list")
    ap.add_argument("--references", nargs="*", default=REFERENCES, help="reference methods scored alongside")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--sample-tokens", type=int, default=512)
    ap.add_argument("--valid-tokens", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--work", default="runs/bench")
    ap.add_argument("--md", default=None, help="default docs/ablation-PROTOCOL-BASE.md")
    ap.add_argument("--json", default=None, help="default docs/ablation-PROTOCOL-BASE.json")
    args = ap.parse_args()
    stem = f"docs/ablation-{args.protocol}-{args.variants or args.base}"
    args.md, args.json = args.md or stem + ".md", args.json or stem + ".json"
    start = time.perf_counter()
    work = Path(args.work)
    calib_dir, valid = split_calibration(work)
    folds = domain_out_folds(work, calib_dir) if args.protocol == "domain-out" else {"": calib_dir}
    evald = eval_domains()
    candidates = [(f"({m})", m, {}) for m in args.references] + \
                 [(label(v), "diverse", {**BASES[args.base], **v}) for v in VARIANTS[args.variants or args.base]]
    results = []
    for name in args.models:
        loaded = load(name, dtype="float32")      # CPU: float32 kernels are faster than bfloat16
        model, tok = loaded.model, loaded.tokenizer
        E = moe_layout(model).layers[0].num_experts
        full_valid, full_eval = ppl(model, tok, valid, args.valid_tokens), ppl(model, tok, evald, args.eval_tokens)
        fold_stats = {d: stats_for(model, tok, str(c), args.samples, args.seq_len, args.seed, args.sample_tokens)[0]
                      for d, c in folds.items()}
        record_stats = stats_for(model, tok, str(calib_dir), args.samples, args.seq_len, args.seed,
                                 args.sample_tokens)[0]

        def score(method: str, options: dict, stats, keep: int, domains, full, tokens: int) -> dict[str, float]:
            pruned, _ = pruned_copy(model, METHODS[method].plan(stats, keep, args.seed, **options), stats)
            return ratios(ppl(pruned, tok, domains, tokens), full)

        for keep in args.keep or keeps_for(name, E):
            rows = []
            for text, method, options in candidates:
                per_fold = {d: score(method, options, s, keep, valid, full_valid, args.valid_tokens)
                            for d, s in fold_stats.items()}
                row = {"variant": text, "method": method, "options": options,
                       "valid": statistics.mean(statistics.mean(r.values()) for r in per_fold.values()),
                       "valid_worst": statistics.mean(max(r.values()) for r in per_fold.values())}
                if args.protocol == "domain-out":
                    row["held_out"] = statistics.mean(r[d] for d, r in per_fold.items())
                row.update(summarise(score(method, options, record_stats, keep, evald, full_eval, args.eval_tokens)))
                rows.append(row)
                print(f"[{name} keep {keep}] {text:60s} valid {row['valid']:.3f} held-out {row.get('held_out', 0):.3f}"
                      f" | eval mean {row['mean']:.3f} worst {row['worst']:.3f} unseen {row['unseen']:.3f}",
                      flush=True)
            results.append({"model": name, "keep": keep, "experts": E, "protocol": args.protocol,
                            "base": args.base, "rows": rows})
            Path(args.json).write_text(json.dumps(results, indent=1))
    Path(args.md).write_text(markdown(results, args, time.perf_counter() - start))
    print(f"wrote {args.md} and {args.json}")
    return 0


def markdown(results: list[dict], args, wall: float) -> str:
    lines = [f"Command: `python benchmarks/ablation.py {' '.join(sys.argv[1:])}` "
             f"({wall / 60:.1f} min on this machine's 2 CPU cores). Protocol {args.protocol}, base {args.base}.", "",
             "`valid` (used to choose) and `held-out` are on validation splits of the calibration shards; the "
             "`eval` columns are on the held-out evaluation shards, for the record only. Rows in parentheses are "
             "reference methods. Sorted by `valid`; lower is better.", ""]
    for res in results:
        held = res["protocol"] == "domain-out"
        lines += [f"### {res['model']}, keep {res['keep']} of {res['experts']}", "",
                  "| variant | valid (choose) |" + (" held-out domain |" if held else "") +
                  " eval mean | eval worst | seen | unseen |",
                  "| --- | --- |" + (" --- |" if held else "") + " --- | --- | --- | --- |"]
        for r in sorted(res["rows"], key=lambda r: r["valid"]):
            lines.append(f"| {r['variant']} | {r['valid']:.3f} |" + (f" {r['held_out']:.3f} |" if held else "") +
                         f" {r['mean']:.3f} | {r['worst']:.3f} | {r['seen']:.3f} | {r['unseen']:.3f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
