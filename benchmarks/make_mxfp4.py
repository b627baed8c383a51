"""Write a random-weight GPT-OSS checkpoint in the MXFP4 layout openai/gpt-oss-20b and -120b ship, one layer a shard.

    python -m benchmarks.make_mxfp4 OUT_DIR [--shape gpt-oss-20b] [--layers N] [--seed 0]

The routed experts are stored as openai publishes them: `model.layers.L.mlp.experts.gate_up_proj_blocks` uint8
[E, 2I, H/32, 16] (two e2m1 codes a byte) beside `_scales` uint8 e8m0 [E, 2I, H/32], likewise down_proj
([E, H, I/32, 16]); their biases, the attention (with its sinks), the router, norms, embeddings and lm_head in
bf16; config.json with the published quantization_config. Codes are uniform random bytes and every scale is
2^-7 or 2^-6 (values of rms ~0.02-0.05, as trained weights have); the other weights normal(0, 0.02), norms 1.
Written directly in MXFP4 (no bf16 copy on disk or in memory), seeded per tensor name; no tokenizer (benchmarks
on these use --calib random). --layers N keeps the first N layers, as a slice of the full shape.
"""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from moeprune.quant import plain_config
from moeprune.shards import INDEX

SHAPES = {
    "gpt-oss-20b": {"num_hidden_layers": 24, "num_local_experts": 32},
    "gpt-oss-120b": {"num_hidden_layers": 36, "num_local_experts": 128},
}
CONFIG = {   # openai/gpt-oss-20b's config.json, less its layer count and experts (SHAPES)
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": 200002,
    "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096,
    "initializer_range": 0.02, "intermediate_size": 2880, "max_position_embeddings": 131072, "model_type": "gpt_oss",
    "num_attention_heads": 64, "num_experts_per_tok": 4, "num_key_value_heads": 8, "output_router_logits": False,
    "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                            "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                            "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.55.0.dev0",
    "use_cache": True, "vocab_size": 201088}
EXPERTS = ("gate_up_proj", "down_proj")


def hub_config(shape: str, layers: int | None) -> dict:
    config = {**CONFIG, **SHAPES[shape]}
    if layers is not None:
        config["num_hidden_layers"] = layers
    n = config["num_hidden_layers"]
    config["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    return dict(sorted(config.items()))


def generator(name: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode(), seed))


def plain(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=generator(name, seed)) * 0.02).to(torch.bfloat16)


def mxfp4(name: str, shape: tuple[int, ...], seed: int) -> dict[str, torch.Tensor]:
    """The hub's blocks and scales of the model's expert tensor `name` [E, K, R]."""
    e, k, r = shape
    gen = generator(name, seed)
    blocks = torch.randint(0, 256, (e, r, k // 32, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(127 - 7, 127 - 5, (e, r, k // 32), dtype=torch.uint8, generator=gen)
    return {f"{name}_blocks": blocks, f"{name}_scales": scales}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="gpt-oss-20b")
    ap.add_argument("--layers", type=int, help="keep the first N layers")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=False)
    config = hub_config(args.shape, args.layers)
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (args.out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 199998, "eos_token_id": [200002, 199999], "pad_token_id": 199999}, indent=2) + "\n")
    with torch.device("meta"):       # the plain model's tensors: names and the dequantized shapes
        model = AutoModelForCausalLM.from_config(plain_config(AutoConfig.from_pretrained(args.out)))
    groups: dict[str, dict[str, tuple[int, ...]]] = {}        # shard -> tensors: one a layer, one the rest
    for name, t in model.state_dict().items():
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        groups.setdefault(f"layer-{int(layer):03d}" if layer else "other", {})[name] = tuple(t.shape)
    n = len(groups)
    weight_map, total = {}, 0
    for k, (group, tensors) in enumerate(sorted(groups.items())):
        part = {}
        for name, shape in tensors.items():
            if name.rpartition(".")[2] in EXPERTS and ".mlp.experts." in name:
                part.update(mxfp4(name, shape, args.seed))
            else:
                part[name] = plain(name, shape, args.seed)
        file = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file(part, args.out / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in part})
        total += sum(t.nbytes for t in part.values())
        print(f"{file}: {group}, {len(part)} tensors, {sum(t.nbytes for t in part.values()) / 2**30:.2f} GiB",
              flush=True)
    (args.out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": dict(
        sorted(weight_map.items()))}, indent=2))


if __name__ == "__main__":
    main()
