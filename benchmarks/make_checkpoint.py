"""Write a random-weight checkpoint of a published MoE shape in the Hugging Face hub layout, one shard at a time.

    python -m benchmarks.make_checkpoint SHAPE OUT_DIR [--dtype bfloat16] [--shard-gb 2] [--seed 0] [--layers N]

SHAPE is one of olmoe-1b-7b, qwen3-30b-a3b, mixtral-8x7b, deepseek-v2-lite. config.json is written by hand with
the hub's keys (transformers 5 would rename some); --layers N overrides num_hidden_layers. Tensor names and shapes
come from the transformers model built on the meta device, its fused experts (`experts.gate_up_proj` [E, 2I, H] and
`experts.down_proj` [E, H, I]) split back into the per-expert tensors the hub files hold. Weights are normal(0, 0.02)
(norms 1.0), seeded per tensor name, so they do not depend on the sharding. Each shard is streamed to disk in 64 MiB
pieces, so memory stays well under one shard. Writes model-0000k-of-0000N.safetensors (at most --shard-gb GiB of
tensors each), model.safetensors.index.json, config.json and generation_config.json; no tokenizer (benchmarks on
these use --calib random; --tokenizer DIR copies one in). The hidden --tiny flag shrinks the widths (hidden 64,
16 experts) for tests.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import shutil
import struct
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from moeprune.shards import tensor_bytes

GIB = 2**30
COMMON = {"attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu", "initializer_range": 0.02,
          "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True}
SHAPES: dict[str, dict] = {
    "olmoe-1b-7b": {    # allenai/OLMoE-1B-7B-0924
        "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024,
        "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 50304,
        "num_experts": 64, "num_experts_per_tok": 8, "max_position_embeddings": 4096, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-05, "norm_topk_prob": False, "clip_qkv": None, "output_router_logits": False,
        "router_aux_loss_coef": 0.01, "pad_token_id": 1, "bos_token_id": None, "eos_token_id": 50279},
    "qwen3-30b-a3b": {  # Qwen/Qwen3-30B-A3B
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936, "num_experts": 128, "num_experts_per_tok": 8,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, "max_position_embeddings": 40960,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "sliding_window": None, "use_sliding_window": False,
        "max_window_layers": 48, "bos_token_id": 151643, "eos_token_id": 151645, "router_aux_loss_coef": 0.001,
        "output_router_logits": False},
    "mixtral-8x7b": {   # mistralai/Mixtral-8x7B-v0.1
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 32000, "num_local_experts": 8, "num_experts_per_tok": 2, "rope_theta": 1000000.0,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "sliding_window": None, "bos_token_id": 1,
        "eos_token_id": 2, "output_router_logits": False, "router_aux_loss_coef": 0.02},
    "deepseek-v2-lite": {   # deepseek-ai/DeepSeek-V2-Lite, without auto_map
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": 2048,
        "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_routed_experts": 64, "n_shared_experts": 2,
        "num_experts_per_tok": 6, "num_attention_heads": 16, "num_key_value_heads": 16, "kv_lora_rank": 512,
        "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 102400,
        "topk_method": "greedy", "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": False,
        "scoring_func": "softmax", "rope_theta": 10000, "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
        "bos_token_id": 100000, "eos_token_id": 100001,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}},
}
TINY = {"hidden_size": 64, "intermediate_size": 32, "moe_intermediate_size": 32, "vocab_size": 256, "head_dim": 64,
        "num_attention_heads": 1, "num_key_value_heads": 1, "num_experts": 16, "num_local_experts": 16,
        "n_routed_experts": 16, "kv_lora_rank": 32, "qk_nope_head_dim": 32, "qk_rope_head_dim": 32, "v_head_dim": 64}
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"), "phimoe": ("w1", "w3", "w2")}    # (gate, up, down) in the hub files


def hub_config(shape: str, dtype: str = "bfloat16", layers: int | None = None, tiny: bool = False,
               vocab_size: int | None = None) -> dict:
    """The hub's config.json for SHAPE, keys sorted as the hub has them."""
    cfg = {**COMMON, **SHAPES[shape], "torch_dtype": dtype}
    if tiny:
        cfg.update({k: v for k, v in TINY.items() if k in cfg})
    if vocab_size is not None:
        cfg["vocab_size"] = vocab_size
    if tiny or vocab_size is not None:
        cfg.update({k: cfg[k] % cfg["vocab_size"] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                    if cfg.get(k) is not None})
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    return dict(sorted(cfg.items()))


def hub_tensors(config_dir: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor as the hub files store it, in the model's (layer) order."""
    cfg = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    gate, up, down = EXPERT_NAMES.get(cfg.model_type, ("gate_proj", "up_proj", "down_proj"))
    tensors = []
    for name, t in model.state_dict().items():
        if cfg.model_type in EXPERT_NAMES:      # the MoE block is `block_sparse_moe` in the hub files
            name = name.replace(".mlp.", ".block_sparse_moe.")
        base, _, leaf = name.rpartition(".")
        if base.endswith(".experts") and leaf == "gate_up_proj":     # [E, 2I, H]: gate rows, then up rows
            tensors += [(f"{base}.{e}.{proj}.weight", (t.shape[1] // 2, t.shape[2]))
                        for e in range(t.shape[0]) for proj in (gate, up)]
        elif base.endswith(".experts") and leaf == "down_proj":      # [E, H, I]
            tensors += [(f"{base}.{e}.{down}.weight", tuple(t.shape[1:])) for e in range(t.shape[0])]
        else:
            tensors.append((name, tuple(t.shape)))
    return tensors


def random_chunks(name: str, numel: int, dtype: torch.dtype, seed: int, chunk: int = 2**24) -> Iterator[torch.Tensor]:
    """A tensor's values, flat, in pieces: normal(0, 0.02) drawn in float32 and cast to dtype; norm weights are 1.0."""
    if name.endswith("norm.weight"):
        yield torch.ones(numel, dtype=dtype)
        return
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode(), seed))     # torch keeps 32 bits of a seed
    buf = torch.empty(min(chunk, numel))
    for start in range(0, numel, chunk):
        yield buf[:min(chunk, numel - start)].normal_(0.0, 0.02, generator=gen).to(dtype)


# a tensor to write: its name, safetensors dtype, shape, and a function giving its bytes as tensors, piece by piece
Entry = tuple[str, str, tuple[int, ...], Callable[[], Iterator[torch.Tensor]]]


def write_shard(path: Path, entries: list[Entry], progress: Callable[[int], object] = lambda n: None) -> int:
    """A safetensors file written piece by piece (header, then each tensor's bytes), so no tensor is held whole;
    `progress(bytes)` after each piece. Returns its tensor bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, _ in entries:
        end = offset + tensor_bytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)       # the tensor data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, dtype, shape, produce in entries:
            written = 0
            for piece in produce():
                piece = piece.contiguous()
                f.write(piece.view(torch.uint8).numpy().data)
                written += piece.nbytes
                progress(piece.nbytes)
            if written != tensor_bytes(dtype, shape):
                raise AssertionError(f"{name}: wrote {written} bytes, its header says {tensor_bytes(dtype, shape)}")
    return offset


def plan_shards(tensors: list[tuple[str, tuple[int, ...]]], itemsize: int,
                limit: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive groups of tensors of at most `limit` bytes each (a larger tensor gets a shard of its own)."""
    shards, size = [[]], 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def make_checkpoint(shape: str, out_dir: str | Path, dtype: str = "bfloat16", shard_gb: float = 2.0, seed: int = 0,
                    layers: int | None = None, tiny: bool = False, tokenizer: Path | None = None) -> dict:
    """Write the checkpoint; returns a summary (total bytes and GiB, shards, tensors, seconds). `tokenizer`: a
    folder whose tokenizer files are copied in (the vocabulary size follows the tokenizer)."""
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = None
    if tokenizer is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (Path(tokenizer) / name).is_file():
                shutil.copy2(Path(tokenizer) / name, out / name)
        vocab = len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    cfg = hub_config(shape, dtype, layers, tiny, vocab)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tensors = hub_tensors(out)
    torch_dtype = getattr(torch, dtype)
    total = sum(math.prod(s) for _, s in tensors) * torch_dtype.itemsize
    free = shutil.disk_usage(out).free
    if free < total + 2 * GIB:
        raise OSError(errno.ENOSPC, f"{shape} needs {total / GIB:.1f} GiB + 2 GiB to spare, {out} has "
                                    f"{free / GIB:.1f} GiB free")
    shards = plan_shards(tensors, torch_dtype.itemsize, int(shard_gb * GIB))
    weight_map = {}
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=shape) as bar:
        for k, shard in enumerate(shards, 1):
            file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            write_shard(out / file, [(name, SAFETENSORS_DTYPES[torch_dtype], shape,
                                      lambda name=name, shape=shape: random_chunks(name, math.prod(shape), torch_dtype,
                                                                                   seed))
                                     for name, shape in shard], bar.update)
            weight_map.update({name: file for name, _ in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    generation = {"_from_model_config": True, "bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return {"out_dir": str(out), "total_bytes": total, "total_gib": round(total / GIB, 3), "shards": len(shards),
            "tensors": len(tensors), "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("shape", choices=SHAPES)
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--shard-gb", type=float, default=2.0, help="largest shard, GiB (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, help="override num_hidden_layers")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", type=Path, help="copy this folder's tokenizer files; vocab size follows")
    args = parser.parse_args()
    try:
        summary = make_checkpoint(args.shape, args.out_dir, args.dtype, args.shard_gb, args.seed, args.layers,
                                  args.tiny, args.tokenizer)
    except OSError as err:
        sys.exit(f"make_checkpoint: {err}")
    print(f"{args.shape}: {summary['total_gib']} GiB in {summary['shards']} shards, {summary['tensors']} tensors, "
          f"{summary['seconds']} s -> {summary['out_dir']}")


if __name__ == "__main__":
    main()
