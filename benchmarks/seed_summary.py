"""Summarise ablation runs over calibration seeds (docs/ABLATION.md, step 5 afterwards).

    python -m benchmarks.seed_summary docs/data/ablation-seeds/balanced-*.json

Each JSON is one `python -m benchmarks.ablation --protocol all-out ... --seed S` run (the seed is the digit before
`.json`). Per variant: the geometric mean over settings and seeds of the held-out mean, and the geometric
mean over settings of the worst fold of the worst seed; then each setting's worst fold per seed. Prints a
Markdown table, best worst-seed score first.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in values) / len(values))


def main(paths: list[str]) -> None:
    rows = defaultdict(lambda: defaultdict(dict))      # variant -> (model, keep) -> seed -> (mean, worst fold)
    for path in paths:
        seed = int(Path(path).stem.rsplit("-", 1)[1])
        for res in json.loads(Path(path).read_text()):
            for r in res["rows"]:
                rows[r["variant"]][(res["model"], res["keep"])][seed] = (r["held_out"], r["held_out_worst"])
    out = []
    for variant, settings in rows.items():
        means = [m for by_seed in settings.values() for m, _ in by_seed.values()]
        worst = [max(w for _, w in by_seed.values()) for by_seed in settings.values()]
        detail = "; ".join(f"{model.removeprefix('demo-')} {keep}: " + "/".join(f"{s[k][1]:.3f}" for k in sorted(s))
                           for (model, keep), s in sorted(settings.items()))
        out.append((geomean(worst), geomean(means), variant, detail))
    print("| variant | held-out mean (all seeds) | worst fold, worst seed | per setting: worst fold by seed |")
    print("| --- | --- | --- | --- |")
    for worst, mean, variant, detail in sorted(out):
        print(f"| {variant} | {mean:.3f} | {worst:.3f} | {detail} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", metavar="JSON", help="ablation runs, one per seed: NAME-SEED.json")
    main(ap.parse_args().paths)
