"""Step 5 exploration (docs/ABLATION-NOTEBOOK.md): do data-free probes find the experts math/code need on
demo-fine? Statistics on the prose calibration, on math and code (the oracle) and on data-free probes (random
token windows, every vocabulary token alone or after BOS), saved to runs/explore/MODEL-stats.pt for selexp.py.
    python -m benchmarks.explore.probe demo-fine
"""
import argparse
from pathlib import Path

import torch

from benchmarks.common import split_all, split_calibration
from moeprune.arch import moe_layout
from moeprune.calibration import collect
from moeprune.text import calibration_tokens
from moeprune.checkpoint import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", nargs="?", default="demo-fine", help="a demo model (default demo-fine)")
    name = ap.parse_args().name
    torch.set_num_threads(2)
    work = Path("runs/explore/work"); calib, valid = split_calibration(work)
    calib_all, valid_all = split_all(work)
    L = load(name, dtype="float32"); model, tok = L.model, L.tokenizer
    layout = moe_layout(model)
    V = model.config.vocab_size
    def st(ids): return collect(model, layout, ids, sample_tokens=512, seed=0, progress=False, weight_similarity=False)
    prose = st(calibration_tokens(str(calib), tok, 64, 256, 0))
    oracle = {d: st(calibration_tokens(str(calib_all / f"{d}.txt"), tok, 16, 256, 0)) for d in ["math", "code"]}
    probes = {
      "random256": st(torch.randint(0, V, (64, 256), generator=torch.Generator().manual_seed(0))),
      "vocab1": st(torch.arange(V).view(-1, 1)),
      "vocab_bos": st(torch.stack([torch.full((V,), tok.bos_token_id or 0), torch.arange(V)], 1)),
    }
    torch.save({"prose": prose, "oracle": oracle, "probes": probes}, "runs/explore/%s-stats.pt" % name)
    def freq(s, i): c = s.layers[i].counts; return c / c.sum()
    # how well each probe ranks the math experts that prose under-uses
    for d in oracle:
        for pn, p in probes.items():
            cors = []
            for i in sorted(prose.layers):
                f_or, f_pr, f_pb = freq(oracle[d], i), freq(prose, i), freq(p, i)
                # spearman between probe freq and oracle freq
                r = lambda x: x.argsort().argsort().double()
                cors.append(float(torch.corrcoef(torch.stack([r(f_or), r(f_pb)]))[0, 1]))
            base = [float(torch.corrcoef(torch.stack([freq(oracle[d], i).argsort().argsort().double(),
                                                      freq(prose, i).argsort().argsort().double()]))[0, 1])
                    for i in sorted(prose.layers)]
            print(d, pn, "spearman probe~oracle %.3f  prose~oracle %.3f" % (sum(cors)/len(cors), sum(base)/len(base)))


if __name__ == "__main__":
    main()
