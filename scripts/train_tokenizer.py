#!/usr/bin/env python
"""Train the byte-level BPE tokenizer of the moeprune demo models.

Reads the *training* split written by ``scripts/build_corpus.py``
(``<work>/corpus/train/*.txt``; the shipped calib/eval shards are never seen)
and trains a GPT-2 style byte-level BPE with a vocabulary of 8192 and one
special token, ``<|endoftext|>``, used as bos/eos/pad/unk.  The result is saved
with ``PreTrainedTokenizerFast.save_pretrained`` so that
``transformers.AutoTokenizer.from_pretrained(folder)`` loads it offline.
``scripts/train_demo_model.py`` copies it into every demo model folder.

Usage::

    python scripts/train_tokenizer.py [--work /work/corpus_build] [--out <work>/tokenizer]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

EOT = "<|endoftext|>"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/work/corpus_build", type=Path)
    ap.add_argument("--out", default=None, type=Path)
    ap.add_argument("--vocab-size", default=8192, type=int)
    args = ap.parse_args()
    out = args.out or args.work / "tokenizer"
    os.environ.setdefault("RAYON_NUM_THREADS", "1")

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    files = sorted(str(p) for p in (args.work / "corpus/train").glob("*.txt"))
    assert files, "run scripts/build_corpus.py first"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(files, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=EOT,
        model_max_length=1024, clean_up_tokenization_spaces=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    # transformers 5 writes its internal class name ("TokenizersBackend"); record the
    # public alias so that older and newer transformers both resolve it
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")

    # check: loads through AutoTokenizer and round-trips text
    t2 = AutoTokenizer.from_pretrained(out)
    s = "def f(x):\n    return x ** 2  # The quick brown fox, 3/4 + 1/4 = 1."
    ids = t2(s)["input_ids"]
    assert t2.decode(ids) == s, t2.decode(ids)
    print(f"saved {out}: vocab {len(t2)}, class {type(t2).__name__}, {len(ids)} tokens for {len(s)} chars")


if __name__ == "__main__":
    main()
