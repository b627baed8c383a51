"""Step 5 exploration: methods calibrated on 64 prose windows, on those plus 64 self-written windows (gen.py) and on
the self-written ones alone, scored on the validation parts of the seven calibration shards: the "model's own
text" table.   python benchmarks/explore/selfcal.py demo-fine 24,16 diverse:diversity=0.5,frequency,reap,msmoe
"""
import sys, torch, copy
sys.path.insert(0, "benchmarks")
from pathlib import Path
from common import split_calibration, split_all, ppl, ratios
from moeprune.checkpoint import load
from moeprune.arch import moe_layout
from moeprune.calibration import collect, calibration_tokens
from moeprune.methods import METHODS
from moeprune.surgery import apply_plan
torch.set_num_threads(2)
name = sys.argv[1]; keeps = [int(k) for k in sys.argv[2].split(",")]; methods = sys.argv[3].split(",")
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
            print(f"{name} {cname:10s} keep {keep:2d} {mn:34s} prose {prosem:.3f} code {r['code']:.3f} math {r['math']:.3f} mean {sum(r.values())/7:.3f} worst {max(r.values()):.3f}", flush=True)
