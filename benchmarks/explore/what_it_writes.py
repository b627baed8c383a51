"""How many of the windows a demo model writes for self-calibration hold arithmetic questions (or code-like
text): the "12 of 32 windows" of docs/DESIGN.md and ABLATION.md step 5. Seed 0, 32 windows of 256 tokens,
as `moeprune prune` samples them.   python -m benchmarks.explore.what_it_writes
"""

import argparse
import re

import moeprune as mp
from moeprune.selfcalib import sample_windows, start_token


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    for name in ["demo-fine", "demo-mixtral"]:
        loaded = mp.load(name, dtype="float32")
        windows = sample_windows(loaded.model, start_token(loaded.model.config, loaded.tokenizer), 32, 256, seed=0,
                                 progress=False)
        texts = [loaded.tokenizer.decode(w) for w in windows]
        math = sum(bool(re.search(r"(Question: |Answer: )", t)) for t in texts)
        code = sum(bool(re.search(r"(def |import |self\.|return )", t)) for t in texts)
        print(f"{name}: {math} of {len(texts)} windows with arithmetic Q/A, {code} with code-like tokens")


if __name__ == "__main__":
    main()
