"""Step 5 exploration: methods calibrated on 64 prose windows, on those plus 64 self-written windows (gen.py) and on
the self-written ones alone, scored on the validation parts of the seven calibration shards: the "model's own
text" table.   python -m benchmarks.explore.selfcal demo-fine 24,16 diverse:diversity=0.5,frequency,reap,msmoe
"""
import argparse
import copy
from pathlib import Path

import torch

from benchmarks.common import ppl, ratios, split_all, split_calibration
from moeprune.arch import moe_layout
from moeprune.calibration import collect
from moeprune.text import calibration_tokens
from moeprune.checkpoint import load
from moeprune.methods import METHODS
from moeprune.surgery import apply_plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="a demo model, e.g. demo-fine (runs/explore/NAME-gen.pt must exist)")
    ap.add_argument("keeps", help="comma-separated experts to keep, e.g. 24,16")
    ap.add_argument("methods", help="comma-separated METHOD[:OPTION=VALUE...], e.g. diverse:diversity=0.5,frequency")
    args = ap.parse_args()
    name, keeps, methods = args.name, [int(k) for k in args.keeps.split(",")], args.methods.split(",")
    torch.set_num_threads(2)
    work = Path("runs/explore/work"); calib, _ = split_calibration(work); calib_all, valid_all = split_all(work)
    L = load(name, dtype="float32"); model, tok = L.model, L.tokenizer; layout = moe_layout(model)
    gen = torch.load("runs/explore/%s-gen.pt" % name)
    prose = calibration_tokens(str(calib), tok, 64, 256, 0)
    full = ppl(model, tok, valid_all, 2048)
    for cname, ids in {"prose": prose, "prose+self": torch.cat([prose, gen[:, :256]]), "self": gen[:, :256]}.items():
        stats = collect(model, layout, ids, sample_tokens=512, seed=0, progress=False)
        for keep in keeps:
            for mn in methods:
                m, *opt = mn.split(":")
                kw = dict(o.split("=") for o in opt)
                kw = {k: (float(v) if v.replace(".", "").isdigit() else v) for k, v in kw.items()}
                plan = METHODS[m].plan(stats, keep, 0, **kw)
                pm = copy.deepcopy(model); apply_plan(pm, moe_layout(pm), plan, stats)
                r = ratios(ppl(pm, tok, valid_all, 2048), full)
                prosem = sum(v for d, v in r.items() if d not in ("math", "code")) / 5
                print(f"{name} {cname:10s} keep {keep:2d} {mn:34s} prose {prosem:.3f} code {r['code']:.3f} "
                      f"math {r['math']:.3f} mean {sum(r.values())/7:.3f} worst {max(r.values()):.3f}", flush=True)


if __name__ == "__main__":
    main()
