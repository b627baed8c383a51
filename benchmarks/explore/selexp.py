"""Step 5 exploration: top-K selection by each score of probe.py's statistics, scored on the validation parts of
the seven calibration shards (2048 tokens each): the "data-free probes" table.
    python -m benchmarks.explore.selexp demo-fine          (after benchmarks.explore.probe)
"""
import argparse
import copy
from pathlib import Path

import torch

from benchmarks.common import ppl, ratios, split_all
from moeprune.arch import moe_layout
from moeprune.checkpoint import load
from moeprune.plan import LayerPlan, Plan
from moeprune.surgery import apply_plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="a demo model, e.g. demo-fine (runs/explore/NAME-stats.pt must exist)")
    name = ap.parse_args().name
    torch.set_num_threads(2)
    work = Path("runs/explore/work"); calib_all, valid_all = split_all(work)
    L = load(name, dtype="float32"); model, tok = L.model, L.tokenizer
    S = torch.load("runs/explore/%s-stats.pt" % name, weights_only=False)
    prose, oracle, probes = S["prose"], S["oracle"], S["probes"]
    full = ppl(model, tok, valid_all, 2048)
    def fr(s, i): c = s.layers[i].counts.double(); return c / c.sum()
    def contrib(s, i): c = s.layers[i].reap_sum.double(); return c / c.sum()
    def reap(s, i): r = s.layers[i].reap_saliency.double(); return r / r.sum()
    scores = {
     "freq": lambda i: fr(prose, i),
     "contrib": lambda i: contrib(prose, i),
     "reap": lambda i: reap(prose, i),
     "oracle": lambda i: fr(prose, i) + fr(oracle["math"], i) + fr(oracle["code"], i),
    }
    for pn, p in probes.items():
        scores[pn] = (lambda p: lambda i: fr(p, i))(p)
        scores["freq+" + pn] = (lambda p: lambda i: fr(prose, i) + fr(p, i))(p)
        scores["contrib+" + pn] = (lambda p: lambda i: contrib(prose, i) + fr(p, i))(p)
        scores["max(freq," + pn + ")"] = (lambda p: lambda i: torch.maximum(fr(prose, i), fr(p, i)))(p)
    E = prose.layers[0].num_experts
    for keep in (E * 3 // 4, E // 2):
        for sn, fn in scores.items():
            layers = {}
            for i in sorted(prose.layers):
                keepers = fn(i).argsort(descending=True)[:keep].sort().values.tolist()
                layers[i] = LayerPlan.selection(E, keepers)
            plan = Plan("select", {}, layers, model_type=model.config.model_type)
            m = copy.deepcopy(model); apply_plan(m, moe_layout(m), plan, prose)
            r = ratios(ppl(m, tok, valid_all, 2048), full)
            prosem = sum(v for d, v in r.items() if d not in ("math", "code")) / 5
            print(f"{name} keep {keep:2d} {sn:28s} prose {prosem:.3f} code {r['code']:.3f} math {r['math']:.3f} "
                  f"worst {max(r.values()):.3f}", flush=True)


if __name__ == "__main__":
    main()
