"""auto's held-out scores window by window (step 6b of docs/ABLATION.md, after step 6's runs).

    OMP_NUM_THREADS=1 python -m benchmarks.auto_held --models val-sigmoid --seeds 0 --out runs/defaults-held

benchmarks.defaults recorded each of auto's eight plans on validation and evaluation, and on the held-out windows
with all self-written windows as one group. This reruns auto's calibration pass and plans (the same seeds: the same
plans) and records the held-out perplexity ratio of every text domain and of every held-out self-written window
on its own, so that other pick rules can be scored against the recorded validation and evaluation (benchmarks.lomo
--held). Nothing here is an evaluation shard.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import torch

from benchmarks.common import keeps_for, split_calibration
from benchmarks.defaults import MODELS, model_path
from moeprune.arch import moe_layout
from moeprune.checkpoint import load
from moeprune.evaluate import Evaluation
from moeprune.surgery import apply_plan
from moeprune.tradeoff import AUTO_HELD_TOKENS, AUTO_STATS, auto_plans, auto_stats


def per_window_evaluation(tokenizer, config, held: dict, held_own: torch.Tensor, max_tokens: int) -> Evaluation:
    """Every text domain one group and every held-out self-written window one group (self-K)."""
    texts = {**held, **{f"self-{k}": w for k, w in enumerate(held_own)}}
    return Evaluation(tokenizer, config, tasks=[], texts=texts, seq_len=held_own.shape[1], max_tokens=max_tokens)


def run(name: str, seed: int, args, calib: Path) -> dict:
    loaded = load(model_path(name), dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    E = moe_layout(model).layers[0].num_experts
    measured = auto_stats(model, tok, str(calib), args.samples, args.seq_len, seed, args.sample_tokens, 0.5)
    evaluation = per_window_evaluation(tok, model.config, measured["held"], measured["held_own"], args.held_tokens)
    base = evaluation.run(model, progress=False)["perplexity"]
    res = {"model": name, "seed": seed, "cmd": "python -m benchmarks.auto_held " + " ".join(sys.argv[1:]),
           "tokens": {d: v["tokens"] for d, v in base.items()}, "rows": []}
    for keep in keeps_for(name, E):
        for label, plan in auto_plans(measured["text"], measured["text+self"], keep, seed).items():
            pruned = copy.deepcopy(model)
            apply_plan(pruned, moe_layout(pruned), plan,
                       measured["text+self"] if label.endswith(f"({AUTO_STATS[1]})") else measured["text"])
            ppl = evaluation.run(pruned, progress=False)["perplexity"]
            res["rows"].append({"keep": keep, "plan": label,
                                "held": {d: math.exp(ppl[d]["nll"] - base[d]["nll"]) for d in base}})
            print(f"{name} s{seed} keep {keep} {label}", flush=True)
            del pruned
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--sample-tokens", type=int, default=512)
    ap.add_argument("--held-tokens", type=int, default=AUTO_HELD_TOKENS)
    ap.add_argument("--work", default="runs/defaults/work")
    ap.add_argument("--out", default="runs/defaults-held")
    args = ap.parse_args()
    torch.set_num_threads(1)
    calib, _ = split_calibration(Path(args.work))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for name in args.models:
            path = Path(args.out) / f"{name}-s{seed}.json"
            if not path.exists():
                path.write_text(json.dumps(run(name, seed, args, calib), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
