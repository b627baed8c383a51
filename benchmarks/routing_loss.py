"""Why a method loses on a domain: how much of that domain's routing goes to experts the plan drops.

    python -m benchmarks.routing_loss                      # both demo models, both sparsities, seed 0

Calibrates on the seen-domain mix (as benchmarks/compare.py does), plans with each method, then runs
the full model on every domain's evaluation text and counts, per MoE layer, the share of its top-k
assignments that go to experts which are not a kept representative (dropped, or merged into another
expert). A plan that keeps the experts a domain relies on loses little routing there. Writes
docs/data/routing_loss.md and .json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks.common import KEEPS, UNSEEN, eval_domains, keeps_for, split_calibration, stats_for

from moeprune.arch import moe_layout
from moeprune.calibration import collect
from moeprune.text import calibration_tokens
from moeprune.checkpoint import load
from moeprune.methods import METHODS

def lost_share(plan, domain_stats) -> float:
    """Mean over layers of the share of top-k assignments routed to a non-representative expert."""
    shares = []
    for i, lp in plan.layers.items():
        counts = domain_stats.layers[i].counts.double()
        kept = set(lp.representatives)
        lost = sum(float(counts[e]) for e in range(len(counts)) if e not in kept)
        shares.append(lost / max(float(counts.sum()), 1.0))
    return statistics.mean(shares)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(KEEPS))
    ap.add_argument("--methods", nargs="+", default=["frequency", "reap", "naee", "msmoe", "diverse"])
    ap.add_argument("--windows", type=int, default=16, help="256-token windows of each domain's evaluation text")
    ap.add_argument("--work", default="runs/bench")
    ap.add_argument("--out", default="docs/data/routing_loss")
    args = ap.parse_args()
    calib_dir, _ = split_calibration(Path(args.work))
    results = []
    for name in args.models:
        loaded = load(name, dtype="float32")
        model, tok = loaded.model, loaded.tokenizer
        layout = moe_layout(model)
        stats = stats_for(model, tok, str(calib_dir), 64, 256, 0, 512)[0]
        per_domain = {d: collect(model, layout, calibration_tokens(str(p), tok, args.windows, 256, 0),
                                 sample_tokens=16, progress=False) for d, p in eval_domains().items()}
        for keep in keeps_for(name, layout.layers[0].num_experts):
            for method in args.methods:
                plan = METHODS[method].plan(stats, keep, 0)
                row = {"model": name, "keep": keep, "method": method,
                       "lost": {d: lost_share(plan, s) for d, s in per_domain.items()}}
                results.append(row)
                print(name, keep, method, {d: round(v, 3) for d, v in row["lost"].items()}, flush=True)
    Path(args.out + ".json").write_text(json.dumps(results, indent=1))
    domains = sorted(eval_domains())
    lines = ["Share of each domain's top-k routing (full model, evaluation text) that goes to experts the plan does "
             "not keep as a representative (dropped, or merged into another). Calibration: seen-domain mix, seed 0. "
             f"Command: `{' '.join(['python', '-m', 'benchmarks.routing_loss'] + sys.argv[1:])}`. "
             "* = unseen in calibration.", ""]
    for name in args.models:
        for keep in dict.fromkeys(r["keep"] for r in results if r["model"] == name):
            lines += [f"### {name}, keep {keep}", "",
                      "| method | " + " | ".join(d + ("*" if d in UNSEEN else "") for d in domains) + " |",
                      "| --- |" + " --- |" * len(domains)]
            for r in results:
                if r["model"] == name and r["keep"] == keep:
                    lines.append(f"| {r['method']} | " + " | ".join(f"{r['lost'][d]:.3f}" for d in domains) + " |")
            lines.append("")
    Path(args.out + ".md").write_text("\n".join(lines))
    print(f"wrote {args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
