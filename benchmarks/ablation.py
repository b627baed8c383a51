"""Ablation of the paper's method's options; chooses the defaults on calibration data only.

    python -m benchmarks.ablation --protocol all-out --base step3 --variants far --references frequency reap msmoe \
        --valid-tokens 2048 --eval-tokens 2048                   # step 4: all seven domains out, one at a time
    python -m benchmarks.ablation                                  # step 3: domain-out, both models, both sparsities
    python -m benchmarks.ablation --variants contribution --references     # step 3, second round
    python -m benchmarks.ablation --protocol in-domain --base paper --models demo-mixtral --keep 4

Each variant changes some options of a base configuration (--base paper: the paper's description;
--base step2 / step3: the defaults before step 3 / step 4 of docs/ABLATION.md; --base current: today's
defaults). Three ways to score a variant, all on calibration data only:

  in-domain   calibrate on 80% of the seen domains' calibration shards, score the mean perplexity ratio
              (pruned / full) on the other 20% (`valid`).
  domain-out  five folds: calibrate on four seen domains, score on the validation parts of all five, so
              one of them is unseen in every fold. `valid` is the mean ratio over folds; `held-out` is the
              held-out domain's ratio. This is what a task-agnostic method must do: stand up on text
              its calibration mix did not contain. What step 3 chose on.
  all-out     seven folds over all seven calibration shards, code and math included: each fold calibrates
              on the other six and scores the held-out domain's validation part. `held-out` is the mean over
              the seven folds, `worst held-out` the largest. Prose-only folds cannot see how a choice
              transfers to very different text; these can. Code and math then inform the choice of
              defaults, while the evaluation record below still calibrates on the five seen domains only.
              What step 4 of docs/ABLATION.md chose on.

For the record only (never used to choose), every variant is also calibrated on all seen domains and
evaluated on every domain's held-out evaluation shard (unseen = code and math). Writes --md and --json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import (domain_out_folds, eval_domains, keeps_for, ppl, pruned_copy, ratios, split_all,
                               split_calibration, stats_for, summarise)

from moeprune.arch import moe_layout
from moeprune.checkpoint import load
from moeprune.methods import METHODS
from moeprune.selfcalib import DEFAULT_SHARE

BASES = {"paper": {"grouping": "agglomerative", "tau": 1.0, "weighting": "similarity",   # the paper's description
                   "saliency": "frequency"},
         # the defaults step 3 of docs/ABLATION.md started from
         "step2": {"grouping": "anchors", "saliency": "frequency"},
         # the defaults step 4 started from (step 3's choice), pinned so that a rerun reproduces step 4
         "step3": {"grouping": "anchors", "saliency": "contribution", "diversity": 0.0, "reserve": 0.0},
         # the defaults step 5 started from (step 4's choice)
         "step4": {"grouping": "coverage", "saliency": "contribution", "diversity": 0.5, "reserve": 0.0},
         # today's defaults, pinned (step 5's choice)
         "step5": {"grouping": "coverage", "saliency": "contribution", "diversity": 0.25, "reserve": 0.0},
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
    # step 4 (protocol all-out): from saliency towards diversity (grouping.py's --diversity and --reserve),
    # for each saliency and both anchored groupings, and with data-free (weight) similarity
    "far": [{}, {"saliency": "frequency"},
            {"diversity": 0.5}, {"diversity": 0.75}, {"diversity": 1.0},
            {"saliency": "frequency", "diversity": 0.5}, {"saliency": "frequency", "diversity": 0.75},
            {"saliency": "reap", "diversity": 0.5},
            {"grouping": "coverage", "diversity": 0.5},
            {"grouping": "coverage", "saliency": "frequency", "diversity": 0.5},
            {"reserve": 0.25}, {"saliency": "frequency", "reserve": 0.25},
            {"representation": "weight", "diversity": 0.75},
            {"representation": "weight", "saliency": "frequency", "diversity": 0.5}],
}
# step 5 (protocol all-out with code and math also out together, self-calibrated): with the model writing half
# the calibration windows, how much diversity the anchors still need, and which saliency
VARIANTS["self"] = [{}, {"grouping": "anchors"}, {"grouping": "anchors", "saliency": "frequency"},
                    {"grouping": "anchors", "saliency": "reap"}, {"grouping": "anchors", "diversity": 0.5},
                    {"diversity": 0.25}, {"diversity": 0.75}, {"saliency": "frequency"}, {"saliency": "reap"},
                    {"representation": "weight"}]
VARIANTS["step4"] = VARIANTS["self"]
VARIANTS["step5"] = [{}]
# after step 5: a saliency between contribution and REAP's, checked over calibration seeds (docs/ABLATION.md)
VARIANTS["seeds"] = [{}, {"saliency": "balanced"}, {"grouping": "anchors", "saliency": "balanced"},
                     {"grouping": "anchors", "saliency": "reap"}]        # with --self-calib S: how the share of self-written windows moves the default
VARIANTS["current"] = VARIANTS["step2"]
VARIANTS["step3"] = VARIANTS["far"]
REFERENCES = ["frequency", "reap", "naee", "msmoe"]


def scored(folds: dict) -> list[str]:
    """The domains the all-out folds score: "code+math" scores code and math."""
    return sorted({d for fold in folds for d in fold.split("+")})


def label(v: dict) -> str:
    return ", ".join(f"{k}={x}" for k, x in v.items()) or "base"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["demo-mixtral", "demo-fine"])
    ap.add_argument("--keep", type=int, nargs="+", default=None, help="experts to keep (default: both sparsities)")
    ap.add_argument("--protocol", choices=["domain-out", "all-out", "in-domain"], default="domain-out")
    ap.add_argument("--base", choices=list(BASES), default="step2", help="options every variant starts from")
    ap.add_argument("--variants", choices=list(VARIANTS), default=None, help="default: the base's own list")
    ap.add_argument("--references", nargs="*", default=REFERENCES, help="reference methods scored alongside")
    ap.add_argument("--folds", nargs="+", default=None, help="all-out: only these held-out domains (a quick look)")
    ap.add_argument("--out-together", nargs="+", default=None, metavar="DOMAIN",
                    help="all-out: one more fold that leaves these domains out at once and scores each of them")
    ap.add_argument("--self-calib", type=float, default=DEFAULT_SHARE,
                    help="share of the calibration windows the model writes itself (moeprune.selfcalib)")
    ap.add_argument("--no-record", action="store_true", help="skip the evaluation-shard record (a quick look)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--sample-tokens", type=int, default=512)
    ap.add_argument("--valid-tokens", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--work", default="runs/bench")
    ap.add_argument("--md", default=None, help="default docs/data/ablation-PROTOCOL-BASE.md")
    ap.add_argument("--json", default=None, help="default docs/data/ablation-PROTOCOL-BASE.json")
    ap.add_argument("--render", nargs="+", default=None, metavar="JSON",
                    help="only write --md and --json from finished runs' JSON files (e.g. one run per model, in "
                         "parallel), concatenated in this order")
    args = ap.parse_args()
    stem = f"docs/data/ablation-{args.protocol}-{args.variants or args.base}"
    args.md, args.json = args.md or stem + ".md", args.json or stem + ".json"
    if args.render:
        results = [res for path in args.render for res in json.loads(Path(path).read_text())]
        Path(args.json).write_text(json.dumps(results, indent=1))
        Path(args.md).write_text(markdown(results, args, float("nan")) +
                                 (all_out_markdown(results) if args.protocol == "all-out" else ""))
        return 0
    start = time.perf_counter()
    work = Path(args.work)
    calib_dir, valid = split_calibration(work)      # the record always calibrates on the five seen domains
    if args.protocol == "all-out":
        all_dir, valid = split_all(work)
        folds = domain_out_folds(work, all_dir, list(valid), name="folds-all")
        folds = {d: f for d, f in folds.items() if not args.folds or d in args.folds}
        if args.out_together:           # e.g. code and math out at once, as the benchmark's calibration has them
            together = "+".join(args.out_together)
            folds[together] = domain_out_folds(work, all_dir, [d for d in valid if d not in args.out_together[1:]],
                                               name=f"folds-{together}")[args.out_together[0]]
    else:
        folds = domain_out_folds(work, calib_dir) if args.protocol == "domain-out" else {"": calib_dir}
    evald = eval_domains()
    candidates = [(f"({m})", m, {}) for m in args.references] + \
                 [(label(v), "diverse", {**BASES[args.base], **v}) for v in VARIANTS[args.variants or args.base]]
    results = []
    for name in args.models:
        loaded = load(name, dtype="float32")      # CPU: float32 kernels are faster than bfloat16
        model, tok = loaded.model, loaded.tokenizer
        E = moe_layout(model).layers[0].num_experts
        full_valid = ppl(model, tok, {d: valid[d] for d in scored(folds)} if args.protocol == "all-out" else valid,
                         args.valid_tokens)
        full_eval = ppl(model, tok, evald, args.eval_tokens) if not args.no_record else {}
        fold_stats = {d: stats_for(model, tok, str(c), args.samples, args.seq_len, args.seed, args.sample_tokens,
                                   args.self_calib)[0] for d, c in folds.items()}
        record_stats = None if args.no_record else stats_for(model, tok, str(calib_dir), args.samples, args.seq_len,
                                                             args.seed, args.sample_tokens, args.self_calib)[0]

        def score(method: str, options: dict, stats, keep: int, domains, full, tokens: int) -> dict[str, float]:
            pruned, _ = pruned_copy(model, METHODS[method].plan(stats, keep, args.seed, **options), stats)
            return ratios(ppl(pruned, tok, domains, tokens), full)

        for keep in args.keep or keeps_for(name, E):
            rows = []
            for text, method, options in candidates:
                if args.protocol == "all-out":      # each fold scores only the domain(s) it left out
                    held = {}
                    for fold, s in fold_stats.items():
                        out = fold.split("+")
                        r = score(method, options, s, keep, {d: valid[d] for d in out},
                                  {d: full_valid[d] for d in out}, args.valid_tokens)
                        held.update({d if len(out) == 1 else f"{d} ({fold} out)": r[d] for d in out})
                    row = {"variant": text, "method": method, "options": options, "held_out_by_domain": held,
                           "held_out": statistics.mean(held.values()), "held_out_worst": max(held.values())}
                    row["valid"] = row["held_out"]
                else:
                    per_fold = {d: score(method, options, s, keep, valid, full_valid, args.valid_tokens)
                                for d, s in fold_stats.items()}
                    row = {"variant": text, "method": method, "options": options,
                           "valid": statistics.mean(statistics.mean(r.values()) for r in per_fold.values()),
                           "valid_worst": statistics.mean(max(r.values()) for r in per_fold.values())}
                if args.protocol == "domain-out":
                    row["held_out"] = statistics.mean(r[d] for d, r in per_fold.items())
                row.update(summarise(score(method, options, record_stats, keep, evald, full_eval, args.eval_tokens))
                           if not args.no_record else dict.fromkeys(("mean", "worst", "seen", "unseen"), float("nan")))
                rows.append(row)
                print(f"[{name} keep {keep}] {text:60s} valid {row['valid']:.3f} held-out {row.get('held_out', 0):.3f}"
                      f" worst held-out {row.get('held_out_worst', 0):.3f}"
                      f" | eval mean {row['mean']:.3f} worst {row['worst']:.3f} unseen {row['unseen']:.3f}",
                      flush=True)
            results.append({"model": name, "keep": keep, "experts": E, "protocol": args.protocol,
                            "base": args.base, "rows": rows})
            Path(args.json).write_text(json.dumps(results, indent=1))
    text = markdown(results, args, time.perf_counter() - start)
    Path(args.md).write_text(text + (all_out_markdown(results) if args.protocol == "all-out" else ""))
    print(f"wrote {args.md} and {args.json}")
    return 0


def markdown(results: list[dict], args, wall: float) -> str:
    took = "" if math.isnan(wall) else f" ({wall / 60:.1f} min on this machine's 2 CPU cores)"
    lines = [f"Command: `python -m benchmarks.ablation {' '.join(sys.argv[1:])}`{took}. "
             f"Protocol {args.protocol}, base {args.base}.", "",
             "`valid` / `held-out` (used to choose) are on validation splits of the calibration shards; the "
             "`eval` columns are on the held-out evaluation shards, for the record only. Rows in parentheses are "
             "reference methods. Lower is better.", ""]
    for res in results:
        if res["protocol"] == "all-out":
            lines += [f"### {res['model']}, keep {res['keep']} of {res['experts']}", "",
                      "| variant | held-out mean (choose) | worst held-out (choose) | eval mean | eval worst | seen "
                      "| unseen |",
                      "| --- | --- | --- | --- | --- | --- | --- |"]
            for r in sorted(res["rows"], key=lambda r: (r["held_out_worst"], r["held_out"])):
                lines.append(f"| {r['variant']} | {r['held_out']:.3f} | {r['held_out_worst']:.3f} | {r['mean']:.3f} | "
                             f"{r['worst']:.3f} | {r['seen']:.3f} | {r['unseen']:.3f} |")
            lines.append("")
            continue
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


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def choose(summary: list[dict], tolerance: float = 0.02) -> dict:
    """Step 4's rule, fixed before the runs: among the `diverse` variants whose held-out mean (geometric mean
    over the settings) is within `tolerance` (relative) of the best one's, the lowest worst held-out domain
    (geometric mean over the settings of each setting's worst fold)."""
    ours = [r for r in summary if r["method"] == "diverse"]
    best_mean = min(r["held_out"] for r in ours)
    return min((r for r in ours if r["held_out"] <= best_mean * (1 + tolerance)),
               key=lambda r: (r["held_out_worst"], r["held_out"]))


def summarise_settings(results: list[dict]) -> list[dict]:
    """Per variant, the geometric mean over every setting of each score (a 10% loss weighs alike everywhere)."""
    keys = ("held_out", "held_out_worst", "mean", "worst", "unseen")
    rows = {}
    for res in results:
        for r in res["rows"]:
            rows.setdefault(r["variant"], {"variant": r["variant"], "method": r["method"], **{k: [] for k in keys}})
            for k in keys:
                rows[r["variant"]][k].append(r[k])
    return [{**r, **{k: geomean(r[k]) for k in keys}} for r in rows.values()]


def all_out_markdown(results: list[dict]) -> str:
    summary = sorted(summarise_settings(results), key=lambda r: (r["held_out_worst"], r["held_out"]))
    chosen = choose(summary)
    lines = ["### Over all settings (geometric mean over the model x keep settings above)", "",
             "| variant | held-out mean | worst held-out | eval mean | eval worst | eval unseen |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in summary:
        bold = "**" if r is chosen else ""
        lines.append(f"| {bold}{r['variant']}{bold} | {r['held_out']:.3f} | {r['held_out_worst']:.3f} "
                     f"| {r['mean']:.3f} "
                     f"| {r['worst']:.3f} | {r['unseen']:.3f} |")
    lines += ["", "Rule (`choose`, fixed before the runs): the lowest worst held-out among the `diverse` variants "
              "whose "
              f"held-out mean is within 2% of the best. Chosen: **{chosen['variant']}**.", ""]
    for res in results:
        domains = list(res["rows"][0]["held_out_by_domain"])
        lines += [f"#### {res['model']}, keep {res['keep']}: held-out ratio per fold", "",
                  "| variant | " + " | ".join(domains) + " |", "| --- |" + " --- |" * len(domains)]
        for r in sorted(res["rows"], key=lambda r: (r["held_out_worst"], r["held_out"])):
            cells = " | ".join(f"{r['held_out_by_domain'][d]:.3f}" for d in domains)
            lines.append(f"| {r['variant']} | {cells} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
