"""How alike the experts of each demo model are: quantiles of the off-diagonal expert-output CKA.

    python -m benchmarks.similarity_spread          # writes docs/data/similarity_spread.json

Calibration as in benchmarks/compare.py (seen-domain mix, 64 x 256 tokens, seed 0, 512 sampled tokens per
layer); all MoE layers pooled. Docs quote these numbers to explain when merging can help.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from benchmarks.common import KEEPS, split_calibration, stats_for

from moeprune.checkpoint import load
from moeprune.methods.diverse import similarity

QUANTILES = [0.1, 0.5, 0.9, 1.0]


def main() -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    calib_dir, _ = split_calibration(Path("runs/bench"))
    out = {}
    for name in KEEPS:
        loaded = load(name, dtype="float32")
        stats = stats_for(loaded.model, loaded.tokenizer, str(calib_dir), 64, 256, 0, 512)[0]
        off = []
        for ls in stats.layers.values():
            sim = similarity(ls, "output", "cka")
            off.append(sim[~torch.eye(sim.shape[0], dtype=torch.bool)])
        q = torch.quantile(torch.cat(off), torch.tensor(QUANTILES, dtype=torch.float64))
        out[name] = {f"q{int(p * 100)}": round(float(v), 3) for p, v in zip(QUANTILES, q)}
        print(name, out[name], flush=True)
    Path("docs/data/similarity_spread.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
