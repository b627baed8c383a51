"""How the statistics pass and each method's planning time grow with experts and calibration tokens.

    python -m benchmarks.cost_sweep            # writes docs/COST.md and docs/data/cost.json (a few minutes on 2 cores)

Tiny Qwen3-MoE models built on the fly (hidden 256, 2 MoE layers, expert width 64, top-4), random token
calibration. Each time is the fastest of 3 runs (one run when it takes over 5 s). Planning keeps half
the experts; every planning time includes the similarity matrices the method computes (a real run
caches them in the statistics, so a second method or K on the same statistics is cheaper).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from moeprune.arch import moe_layout
from moeprune.calibration import collect
from moeprune.methods import METHODS
from moeprune.tiny import tiny_model

EXPERTS = [8, 16, 32, 64, 128]
TOKENS = [2048, 8192]


def best_of(fn, repeats: int = 3, long_s: float = 5.0):
    """(fastest of `repeats` runs, fn's result); one run if it takes over long_s. The fastest run is the
    one least disturbed by other load on the machine."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        if times[-1] > long_s:
            break
    return min(times), result


def main() -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    torch.manual_seed(0)
    rows = []
    for E in EXPERTS:
        model = tiny_model("qwen3_moe", num_experts=E, top_k=4, hidden_size=256, moe_intermediate_size=64,
                           num_attention_heads=4, num_key_value_heads=4, vocab_size=1024)
        layout = moe_layout(model)
        for T in TOKENS:
            ids = torch.randint(0, 1024, (T // 256, 256), generator=torch.Generator().manual_seed(0))
            def forward():
                with torch.no_grad():
                    for b in ids.split(8):
                        model(input_ids=b, use_cache=False)

            forward_s, _ = best_of(forward)
            stats_s, stats = best_of(lambda: collect(model, layout, ids, sample_tokens=512, progress=False))
            collected = {i: dict(ls.cache) for i, ls in stats.layers.items()}

            def plan(method):
                for i, ls in stats.layers.items():      # drop what an earlier plan cached: each pays its own way
                    ls.cache = dict(collected[i])
                method.plan(stats, E // 2, 0)
            row = {"experts": E, "tokens": T, "forward_s": forward_s, "stats_s": stats_s,
                   "plan_s": {name: best_of(lambda: plan(method))[0] for name, method in METHODS.items()}}
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                              if k != "plan_s"}), flush=True)
    Path("docs/data/cost.json").write_text(json.dumps(rows, indent=1))
    names = list(METHODS)
    lines = ["# Cost: statistics pass and planning time", "",
             "Command: `python -m benchmarks.cost_sweep` on this 2-core CPU machine (tiny Qwen3-MoE, hidden 256, "
             "2 MoE layers, expert width 64, top-4, 512 sampled tokens per layer; planning keeps half the experts; "
             "each time is the fastest of 3 runs, one run when over 5 s).", "",
             "| experts | calibration tokens | one forward s | statistics pass s | stats / forward | "
             + " | ".join(f"plan {n} s" for n in names) + " |",
             "| " + " | ".join(["---"] * (5 + len(names))) + " |"]
    for r in rows:
        lines.append(f"| {r['experts']} | {r['tokens']} | {r['forward_s']:.2f} | {r['stats_s']:.2f} | "
                     f"{r['stats_s'] / r['forward_s']:.1f} | "
                     + " | ".join(f"{r['plan_s'][n]:.3f}" for n in names) + " |")
    Path("docs/COST.md").write_text("\n".join(lines) + "\n")
    print("wrote docs/COST.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
