"""What kind of MoE each of the five step-6 models is, from auto's one calibration pass (docs/ABLATION.md, step 6).

    OMP_NUM_THREADS=1 python -m benchmarks.model_traits --json docs/data/model_traits.json

Per model (calibration as benchmarks.defaults, seed 0; all MoE layers pooled): how alike its experts are (median
and 90th percentile of the off-diagonal expert-output CKA, median weight cosine), how evenly the text routes (the
entropy of each layer's top-k frequency over log E), and how far the model's own windows route from the text
(total variation between the two frequencies, per layer, averaged). Descriptive only: nothing is chosen from it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from benchmarks.common import split_calibration
from benchmarks.defaults import MODELS, model_path
from moeprune.checkpoint import load
from moeprune.methods.diverse import similarity
from moeprune.tradeoff import AUTO_STATS, auto_stats


def off_diagonal(m: torch.Tensor) -> torch.Tensor:
    return m[~torch.eye(m.shape[0], dtype=torch.bool)]


def traits(measured: dict) -> dict:
    text, mixed = measured[AUTO_STATS[0]], measured[AUTO_STATS[1]]
    cka, wcos, entropy, tv = [], [], [], []
    for i, ls in mixed.layers.items():
        cka.append(off_diagonal(similarity(ls, "output", "cka")))
        wcos.append(off_diagonal(ls.cache["similarity/cosine/weight"].double()))
        f_text = text.layers[i].frequency
        own = ls.counts - text.layers[i].counts
        f_own = own / own.sum().clamp_min(1)
        p = f_text[f_text > 0]
        entropy.append(float(-(p * p.log()).sum()) / math.log(ls.num_experts))
        tv.append(0.5 * float((f_text - f_own).abs().sum()))
    cka, wcos = torch.cat(cka), torch.cat(wcos)
    q = lambda x, p: round(float(torch.quantile(x, p)), 3)        # noqa: E731
    return {"experts": mixed.layers[min(mixed.layers)].num_experts, "top_k": mixed.layers[min(mixed.layers)].top_k,
            "cka_q50": q(cka, 0.5), "cka_q90": q(cka, 0.9), "weight_cosine_q50": q(wcos, 0.5),
            "text_routing_entropy": round(sum(entropy) / len(entropy), 3),
            "own_vs_text_routing_tv": round(sum(tv) / len(tv), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--work", default="runs/defaults/work")
    ap.add_argument("--json", default="docs/data/model_traits.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    calib, _ = split_calibration(Path(args.work))
    out = {}
    for name in args.models:
        loaded = load(model_path(name), dtype="float32")
        out[name] = traits(auto_stats(loaded.model, loaded.tokenizer, str(calib), 64, 256, 0, 512, 0.5))
        print(name, out[name], flush=True)
    Path(args.json).write_text(json.dumps({"cmd": "python -m benchmarks.model_traits " + " ".join(sys.argv[1:]),
                                           "models": out}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
