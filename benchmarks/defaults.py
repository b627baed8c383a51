"""Step 6 of docs/ABLATION.md (issue #22): every candidate default on five models, scored on validation and
evaluation text; one JSON per model and seed. `python -m benchmarks.lomo` then chooses leave-one-model-out.

    OMP_NUM_THREADS=1 python -m benchmarks.defaults --models val-shared demo-mixtral --seeds 0 1 2 --out runs/defaults

Per model and calibration seed: the statistics of today's default (64 windows x 256 tokens, half written by the
model, 512 sample tokens) and of `--self-calib 0`; auto's one pass (moeprune.tradeoff.auto_stats). Per keep (75%
and 50% of the experts): each fixed candidate planned, applied to a copy and scored on `validation` (the 20% of
each of the seven calibration shards never calibrated on, --valid-tokens each) and `evaluation` (every
evaluation shard, --eval-tokens each); auto's eight plans scored the same way and on its held-out windows, and
its picks (auto, auto[text-held-out], auto[mixed-only]) recorded as rows of their own.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import eval_domains, keeps_for, ppl, pruned_copy, ratios, split_all, split_calibration, stats_for
from moeprune.arch import moe_layout
from moeprune.checkpoint import load
from moeprune.methods import METHODS
from moeprune.tradeoff import AUTO_STATS, SELF_GROUP, auto_choose, auto_stats, pick

ROOT = Path(__file__).resolve().parents[1]
VALIDATION = ["val-upcycled", "val-shared", "val-sigmoid"]
MODELS = VALIDATION + ["demo-mixtral", "demo-fine"]
# (candidate, registered method, options, self-calibration share) -- docs/ABLATION.md step 6's table
FIXED = [("diverse", "diverse", {}, 0.5),
         ("diverse --self-calib 0", "diverse", {}, 0.0),
         ("diverse --grouping anchors", "diverse", {"grouping": "anchors"}, 0.5),
         ("naee", "naee", {}, 0.5),
         ("reap", "reap", {}, 0.5),
         ("frequency", "frequency", {}, 0.5),
         ("diverse-prune agglomerative", "diverse-prune", {"grouping": "agglomerative", "saliency": "frequency"}, 0.5)]
AUTO = ["auto", "auto[text-held-out]", "auto[mixed-only]"]
AUTO_6B = ["auto[window-worst]", "auto[lowest-mean]", "auto[lowest-worst]"]      # step 6b, after step 6's seed 0


def model_path(name: str) -> str:
    return str(ROOT / "validation" / "models" / name) if name in VALIDATION else name


def auto_picks(rows: dict[str, dict]) -> dict[str, str]:
    """Each auto rule's pick among the eight held-out rows (step 6's, then step 6b's)."""
    text_groups = [g for g in next(iter(rows.values()))["held"] if not g.startswith(SELF_GROUP)]
    mixed = {label: row for label, row in rows.items() if label.endswith(f"({AUTO_STATS[1]})")}
    return {"auto": pick(rows, windows="group"), "auto[text-held-out]": pick(rows, groups=text_groups),
            "auto[mixed-only]": pick(mixed, windows="group"),
            "auto[window-worst]": pick(rows, windows="worst"),
            "auto[lowest-mean]": pick(rows, within=0.0), "auto[lowest-worst]": pick(rows, within=math.inf)}


def run(name: str, seed: int, args, calib: Path, valid: dict[str, Path]) -> dict:
    loaded = load(model_path(name), dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    E = moe_layout(model).layers[0].num_experts
    texts = {"valid": (valid, args.valid_tokens), "eval": (eval_domains(), args.eval_tokens)}
    full = {k: ppl(model, tok, d, n) for k, (d, n) in texts.items()}

    def scores(pruned) -> dict:
        return {k: ratios(ppl(pruned, tok, d, n), full[k]) for k, (d, n) in texts.items()}

    res = {"model": name, "seed": seed, "experts": E, "keeps": keeps_for(name, E), "full": full, "rows": [],
           "cmd": "python -m benchmarks.defaults " + " ".join(sys.argv[1:]), "seconds": {}}
    t0 = time.perf_counter()
    stats = {share: stats_for(model, tok, str(calib), args.samples, args.seq_len, seed, args.sample_tokens, share)[0]
             for share in sorted({s for *_, s in FIXED})}
    measured = auto_stats(model, tok, str(calib), args.samples, args.seq_len, seed, args.sample_tokens, 0.5)
    res["seconds"]["stats"] = time.perf_counter() - t0
    for keep in res["keeps"]:
        for label, method, options, share in FIXED:
            start = time.perf_counter()
            plan = METHODS[method].plan(stats[share], keep, seed, **options)
            plan_s = time.perf_counter() - start
            pruned, _ = pruned_copy(model, plan, stats[share])
            res["rows"].append({"keep": keep, "candidate": label, "plan_s": plan_s, **scores(pruned)})
            del pruned
            log(res["rows"][-1], name, seed)
        inner = {}
        start = time.perf_counter()
        chosen = auto_choose(model, tok, measured, keep, seed, args.held_tokens,
                             visit=lambda label, pruned: inner.__setitem__(label, scores(pruned)))
        res["seconds"][f"auto keep {keep}"] = time.perf_counter() - start
        for label, held in chosen["rows"].items():
            res["rows"].append({"keep": keep, "candidate": f"plan: {label}", "held": held["held"], **inner[label]})
            log(res["rows"][-1], name, seed)
        for rule, label in auto_picks(chosen["rows"]).items():
            res["rows"].append({"keep": keep, "candidate": rule, "picked": label, **inner[label]})
            log(res["rows"][-1], name, seed)
    res["seconds"]["total"] = time.perf_counter() - t0
    return res


def log(row: dict, name: str, seed: int) -> None:
    def s(r):
        return f"{sum(r.values()) / len(r):.3f}/{max(r.values()):.3f}"
    extra = f" -> {row['picked']}" if "picked" in row else ""
    print(f"{name} s{seed} keep {row['keep']:2d} {row['candidate']:32s} valid {s(row['valid'])} eval {s(row['eval'])}"
          f"{extra}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--sample-tokens", type=int, default=512)
    ap.add_argument("--valid-tokens", type=int, default=2048)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--held-tokens", type=int, default=2048, help="auto's held-out tokens per text domain")
    ap.add_argument("--work", default="runs/defaults/work")
    ap.add_argument("--out", default="runs/defaults", help="folder for MODEL-sSEED.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    calib, _ = split_calibration(Path(args.work))
    _, valid = split_all(Path(args.work))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:                     # seed-major: a run cut short still has every model's first seed
        for name in args.models:
            path = Path(args.out) / f"{name}-s{seed}.json"
            if path.exists():
                print(f"{path} exists: skipped", flush=True)
                continue
            res = run(name, seed, args, calib, valid)
            path.write_text(json.dumps(res, indent=1))
            print(f"wrote {path} ({res['seconds']['total']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
