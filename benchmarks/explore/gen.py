"""Step 5 exploration: 64 windows of 256 tokens sampled from the model with transformers' generate (seed 0,
temperature 1), saved to runs/explore/MODEL-gen.pt for selfcal.py.   python -m benchmarks.explore.gen demo-fine
"""
import argparse
import time

import torch

from moeprune.checkpoint import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="a demo model, e.g. demo-fine")
    name = ap.parse_args().name
    torch.set_num_threads(2)
    L = load(name, dtype="float32"); model, tok = L.model, L.tokenizer
    print("bos", tok.bos_token_id, "eos", tok.eos_token_id)
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    t = time.time()
    torch.manual_seed(0)
    ids = torch.full((64, 1), start)
    out = model.generate(ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=256,
                         min_new_tokens=256, pad_token_id=tok.eos_token_id)
    print("gen s", time.time() - t, out.shape)
    torch.save(out[:, 1:], "runs/explore/%s-gen.pt" % name)
    for r in out[:12]:
        print(repr(tok.decode(r[1:80])))


if __name__ == "__main__":
    main()
