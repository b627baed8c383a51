"""Write a random-weight DeepSeek-V4-Flash checkpoint slice in the layout and precision deepseek-ai publishes.

    python -m benchmarks.make_v4_flash OUT_DIR [--layers 4] [--seed 0]

What deepseek-ai/DeepSeek-V4-Flash ships, for its first --layers decoder layers (no MTP layer):
- config.json: the published one (hidden 4096, 256 routed experts top-6, 1 shared, moe_intermediate_size 2048,
  num_hash_layers 3, compress_ratios [0, 0, 4, 128, 4, 128, ...], hc_mult 4, quantization_config fp8 / e4m3 /
  ue8m0 / [128, 128] with expert_dtype "fp4" at the top level), num_hidden_layers and compress_ratios cut to the
  slice, num_nextn_predict_layers 0;
- V4-Flash's own tensor names (`layers.L.ffn.experts.E.w1.weight`, `embed.weight`, `head.weight`, `hc_head_fn`:
  transformers' save_pretrained names without `model.`), every scale named `X.scale` beside `X.weight`;
- routed experts in FP4: `w1`/`w2`/`w3.weight` I8 [N, K/2] (two e2m1 codes a byte) beside F8_E8M0 [N, K/32];
  uniform random bytes, every scale 2^-8 or 2^-7 (values of rms 0.011-0.023, at most 0.047);
- attention (wq_a, wq_b, wkv, wo_a, wo_b, the indexer's wq_b) and the shared expert in FP8 e4m3 beside F8_E8M0
  128x128 block scales: normal(0, 0.02) quantized by moeprune.quant.fp8_quantize;
- F32: hyper-connections (hc_*), attn_sink, the learned gate's bias, the compressors' ape; I64: the hash layers'
  `ffn.gate.tid2eid` [vocab, 6] (6 distinct random experts per token id); BF16: the rest (embed, head, router,
  compressors, the indexer's weights_proj, norms = 1);
- one shard for the embeddings, one per decoder layer, one for head / norm / hc_head, as the published shards.
Those dtypes match the published shard sizes (model-00002..00005-of-00048: layers 0-3, to within their headers).
Each tensor is seeded by its name; shards are written tensor by tensor (no shard is held in memory).
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import re
import shutil
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from benchmarks.make_checkpoint import Entry, random_chunks, write_shard
from moeprune import quant as Q
from moeprune.hubmap import HubMap
from moeprune.shards import DTYPE_NAMES, INDEX, tensor_bytes

GIB = 2**30
CONFIG = {   # deepseek-ai/DeepSeek-V4-Flash config.json (num_hidden_layers, compress_ratios: see flash_config)
    "architectures": ["DeepseekV4ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0,
    "eos_token_id": 1, "expert_dtype": "fp4", "hc_eps": 1e-06, "hc_mult": 4, "hc_sinkhorn_iters": 20, "head_dim": 512,
    "hidden_act": "silu", "hidden_size": 4096, "index_head_dim": 128, "index_n_heads": 64, "index_topk": 512,
    "initializer_range": 0.02, "max_position_embeddings": 1048576, "model_type": "deepseek_v4",
    "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 64, "num_experts_per_tok": 6, "num_hidden_layers": 43, "num_hash_layers": 3,
    "num_key_value_heads": 1, "num_nextn_predict_layers": 1, "o_groups": 8, "o_lora_rank": 1024, "q_lora_rank": 1024,
    "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 16,
                                            "original_max_position_embeddings": 65536, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.5, "scoring_func": "sqrtsoftplus", "sliding_window": 128,
    "swiglu_limit": 10.0, "tie_word_embeddings": False, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.57.1", "use_cache": True, "vocab_size": 129280, "compress_rope_theta": 160000,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0]}       # 43 layers, then the MTP layer's
FP8_LINEAR = re.compile(r"\.attn\.(wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)\.weight$|\.shared_experts\.w[123]\.weight$")
FP4_EXPERT = re.compile(r"\.ffn\.experts\.\d+\.w[123]\.weight$")
FLOAT32 = re.compile(r"(^|\.)hc_|attn_sink$|\.gate\.bias$|\.ape$")
FP4_SCALES = (127 - 8, 127 - 6)                 # e8m0 bytes drawn from [lo, hi): 2^-8 or 2^-7


def flash_config(layers: int | None) -> dict:
    config = dict(CONFIG)
    if layers is not None:
        config["num_hidden_layers"] = layers
        config["compress_ratios"] = CONFIG["compress_ratios"][:layers]
        config["num_nextn_predict_layers"] = 0                                 # no MTP layer is written
    return config


def published_name(name: str) -> str:
    """save_pretrained's name (model.layers.*, model.embed_tokens, model.hc_head.hc_fn) -> V4-Flash's."""
    name = name.removeprefix("model.")
    return {"embed_tokens.weight": "embed.weight"}.get(name, name.replace("hc_head.hc_", "hc_head_"))


def plain_tensors(folder: Path) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(V4-Flash name, plain shape, model dtype) of every tensor, from transformers' model on the meta device and the
    tensor names its save_pretrained writes (moeprune.hubmap's reversed conversion tables)."""
    config = AutoConfig.from_pretrained(folder)
    config.quantization_config = None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    state = model.state_dict()
    hub = HubMap.for_model(model)
    out = []
    for name in hub.all_file_names():
        f = hub.files[name]
        out.append((published_name(name), tuple(f.shape), state[f.pieces[0].module].dtype))
    return out


def _gen(name: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode(), seed))


def stored_entries(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> list[Entry]:
    """The stored tensors of one plain tensor, in V4-Flash's precision, each with a function giving its bytes."""
    numel = math.prod(shape)
    base = name.removesuffix(".weight")
    if FP4_EXPERT.search(name):
        rows, cols = shape
        gen = _gen(name, seed)
        return [(name, "I8", (rows, cols // 2),
                 lambda: iter([torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8, generator=gen)])),
                (base + ".scale", "F8_E8M0", (rows, cols // Q.MX_GROUP),
                 lambda: iter([torch.randint(*FP4_SCALES, (rows, cols // Q.MX_GROUP), dtype=torch.uint8,
                                             generator=gen)]))]
    if FP8_LINEAR.search(name):
        pair: dict[str, torch.Tensor] = {}

        def weight() -> Iterator[torch.Tensor]:
            w = torch.empty(shape).normal_(0.0, 0.02, generator=_gen(name, seed))
            pair["q"], pair["s"] = Q.fp8_quantize(w, (128, 128), "F8_E8M0")
            yield pair.pop("q")
        blocks = (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
        return [(name, "F8_E4M3", shape, weight), (base + ".scale", "F8_E8M0", blocks, lambda: iter([pair.pop("s")]))]
    if dtype == torch.int64:                   # tid2eid: token id -> its experts, distinct per row
        def table() -> Iterator[torch.Tensor]:
            gen = _gen(name, seed)
            for start in range(0, shape[0], 8192):
                yield torch.rand(min(8192, shape[0] - start), CONFIG["n_routed_experts"], generator=gen) \
                    .topk(shape[1], dim=-1).indices
        return [(name, "I64", shape, table)]
    target = torch.float32 if FLOAT32.search(name) else torch.bfloat16
    return [(name, DTYPE_NAMES[target], shape, lambda: random_chunks(name, numel, target, seed))]


def shard_of(name: str) -> str:
    m = re.match(r"layers\.(\d+)\.", name)
    return f"layer-{int(m.group(1)):03d}" if m else ("embed" if name.startswith("embed.") else "head")


def make(out: Path, layers: int | None, seed: int) -> dict:
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=False)
    config = flash_config(layers)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1}, indent=2) + "\n")
    groups: dict[str, list[Entry]] = {}
    for name, shape, dtype in plain_tensors(out):
        groups.setdefault(shard_of(name), []).extend(stored_entries(name, shape, dtype, seed))
    order = ["embed", *sorted(g for g in groups if g.startswith("layer-")), "head"]
    total = sum(tensor_bytes(d, s) for g in order for _, d, s, _ in groups[g])
    free = shutil.disk_usage(out).free
    if free < total + 2 * GIB:
        shutil.rmtree(out)
        raise OSError(errno.ENOSPC, f"the slice needs {total / GIB:.1f} GiB + 2 GiB to spare, {out} has "
                                    f"{free / GIB:.1f} GiB free")
    weight_map = {}
    for k, group in enumerate(order, 1):
        file = f"model-{k:05d}-of-{len(order):05d}.safetensors"
        size = write_shard(out / file, groups[group])
        weight_map.update({name: file for name, *_ in groups[group]})
        print(f"{file}: {group}, {len(groups[group])} tensors, {size / GIB:.2f} GiB", flush=True)
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
                             + "\n")
    return {"total_gib": round(total / GIB, 3), "shards": len(order), "tensors": len(weight_map),
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, help="keep the first N of the 43 decoder layers")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    try:
        summary = make(args.out, args.layers, args.seed)
    except OSError as err:
        sys.exit(f"make_v4_flash: {err}")
    print(f"DeepSeek-V4-Flash slice: {summary['total_gib']} GiB in {summary['shards']} shards, "
          f"{summary['tensors']} tensors, {summary['seconds']} s -> {args.out}")


if __name__ == "__main__":
    main()
