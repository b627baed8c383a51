"""Tiny checkpoints for the client checks of docs/CLIENTS.md, in their hubs' layouts, each with the demo models'
byte-level BPE tokenizer (vocab 8192, which llama.cpp's converter reads) and attention head_dim 64 (vLLM's CPU
attention refuses 8):

  gpt-oss-mxfp4     GPT-OSS: routed experts MXFP4 (`experts.gate_up_proj_blocks` uint8 [E, 2I, H/32, 16] and
                    `_scales` e8m0 [E, 2I, H/32], likewise down_proj), everything else bf16, quantization_config
                    {quant_method: mxfp4, modules_to_not_convert: [...]} as openai/gpt-oss-20b publishes it
  qwen3-moe-fp8     Qwen3-30B-A3B-FP8: every decoder linear weight but the router float8_e4m3fn with a float32
                    128x128 `weight_scale_inv`, modules_to_not_convert naming the norms, routers and lm_head
  deepseek-v3-fp8   DeepSeek-V3: the same FP8 layout (MLA attention), fmt e4m3, no modules_to_not_convert, the
                    router's e_score_correction_bias float32
  deepseek-v3-mtp   DeepSeek-V3 in bf16 with one multi-token-prediction layer past num_hidden_layers
                    (`model.layers.N.*`: the decoder layer with embed_tokens, enorm, hnorm, eh_proj,
                    shared_head.norm and shared_head.head; num_nextn_predict_layers 1), as V3/R1 ship it
  qwen3-vl-moe      Qwen3-VL-MoE, a multimodal wrapper: vision tower + language model (`model.language_model.*`,
                    the expert count in text_config), bf16, fused experts in the published [E, H, 2I] / [E, I, H]
  glm4v-moe         GLM-4.5V, a multimodal wrapper with per-expert tensors (`...mlp.experts.E.gate_proj.weight`), bf16

Weights are normal(0, 0.08) (biases 0.02, norms 1), seeded, so that greedy decoding has clear winners.

    python -m benchmarks.client_models OUT_DIR [--only gpt-oss-mxfp4,qwen3-moe-fp8,...]
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.quantize_fp8 import BLOCK, quantized as fp8_quantized
from moeprune.quant import fp8_quantize, mxfp4_quantize
from moeprune.shards import INDEX, Checkpoint
from moeprune.tiny import spread_weights, tiny_config, tiny_model_any

TOKENIZER = Path(__file__).resolve().parents[1] / "src/moeprune/demo/models/demo-mixtral"
VOCAB = 8192
HUB_EXPERT_KEY = {"qwen3_moe": "num_experts", "qwen3_vl_moe_text": "num_experts"}   # for num_local_experts
# fields the published config.json has and transformers 5 no longer writes (vLLM reads them: without topk_method its
# DeepSeek-V3 router has no e_score_correction_bias; transformers 4.57's Qwen3-VL reads its text rope_scaling's
# mrope_section, here for head_dim 64; for text alone, every section sees the same position)
HUB_FIELDS = {"deepseek_v3": {"topk_method": "noaux_tc", "scoring_func": "sigmoid"},
              "qwen3_vl_moe_text": {"rope_scaling": {"mrope_interleaved": True, "mrope_section": [12, 10, 10],
                                                     "rope_type": "default"},
                                    "tie_word_embeddings": False}}     # 4.57 ties by the text config, 5 by the top
GPT_OSS_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def tiny(model_type: str, seed: int = 0, **fields) -> torch.nn.Module:
    """A seeded tiny bf16 model of `model_type` (moeprune.tiny's config, `fields` set on its text config)."""
    config = tiny_config(model_type)
    text = config.get_text_config()
    if text is config:                                   # derived fields (DeepSeek's qk_head_dim) computed anew
        config = tiny_config(model_type, vocab_size=VOCAB, **fields)
    else:                                                # a wrapper: the language model's config
        for key, value in {"vocab_size": VOCAB, **fields}.items():
            setattr(text, key, value)
    return spread_weights(tiny_model_any(model_type, seed=seed, config=config)).to(torch.bfloat16)


def save(model, out: Path) -> None:
    """save_pretrained, with config.json in the hub's spelling (what transformers 4.57 and vLLM read: transformers 5
    writes rope_parameters and num_local_experts, which 4.57 ignores for its defaults), and the demo tokenizer."""
    model.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    for section in (s for s in (config, config.get("text_config")) if isinstance(s, dict)):
        if "rope_parameters" in section:
            rope = dict(section.pop("rope_parameters"))
            section["rope_theta"] = rope.pop("rope_theta")
            section["rope_scaling"] = None if rope in ({}, {"rope_type": "default"}) else rope   # as the hub writes it
        if section.get("model_type") in HUB_EXPERT_KEY and "num_local_experts" in section:
            section[HUB_EXPERT_KEY[section["model_type"]]] = section.pop("num_local_experts")
        section.update(HUB_FIELDS.get(section.get("model_type"), {}))
    for section in (config, *(v for v in config.values() if isinstance(v, dict))):
        if "dtype" in section:
            section["torch_dtype"] = section.pop("dtype")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(TOKENIZER / name, out / name)


def quantize_folder(folder: Path, rule: Callable[[str, torch.Tensor], str | None], qconfig: dict,
                    shards: int = 2) -> None:
    """Rewrite a bf16 folder's weights in place: each tensor that `rule` names a scheme for ("fp8" or "mxfp4") is
    stored quantized in its hub layout, the rest as they are, in `shards` shards of whole layers (`shard_of`);
    config.json gets `qconfig`."""
    ckpt = Checkpoint(folder)
    stored = {}
    for name in ckpt.tensors:
        t = ckpt.get(name).clone()
        scheme = rule(name, t)
        if scheme == "fp8":
            stored[name], stored[name + "_scale_inv"] = fp8_quantize(t, BLOCK)
        elif scheme == "mxfp4":
            stored[name + "_blocks"], stored[name + "_scales"] = mxfp4_quantize(t)
        elif name.endswith("e_score_correction_bias"):
            stored[name] = t.float()                                     # float32 in DeepSeek-V3's files
        else:
            stored[name] = t
    for f in ckpt.files:
        (folder / f).unlink()
    (folder / INDEX).unlink(missing_ok=True)
    layers = 1 + max(int(n.split(".")[2]) for n in stored if n.startswith("model.layers."))
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: t.contiguous() for n, t in sorted(stored.items()) if shard_of(n, layers, shards) == k}
        save_file(part, folder / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in stored.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": qconfig}, indent=2) + "\n")


GPT_OSS_ROPE = {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                "rope_type": "yarn", "truncate": False}          # openai/gpt-oss-20b's (vLLM reads nothing else)


def shard_of(name: str, layers: int, shards: int) -> int:
    """Shards as the hubs cut them: whole layers in order (llama.cpp's GPT-OSS converter pairs each `_blocks`
    tensor with the `_scales` it reads next), the embeddings in the first, the final norm and lm_head in the last."""
    if name.startswith("model.layers."):
        return int(name.split(".")[2]) * shards // layers
    return 0 if "embed" in name else shards - 1


def gpt_oss_mxfp4(out: Path) -> None:
    save(tiny("gpt_oss", hidden_size=128, intermediate_size=64), out)
    config = json.loads((out / "config.json").read_text())
    config.update(rope_theta=150000.0, rope_scaling=GPT_OSS_ROPE)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    quantize_folder(out, lambda n, t: "mxfp4" if n.endswith(("experts.gate_up_proj", "experts.down_proj")) else None,
                    {"modules_to_not_convert": GPT_OSS_NOT_CONVERTED, "quant_method": "mxfp4"})


def fp8(model_type: str, out: Path) -> None:
    lora = {"q_lora_rank": 128} if model_type == "deepseek_v3" else {}      # as DeepSeek-V3 has (see MLA_576)
    model = tiny(model_type, hidden_size=256, moe_intermediate_size=128, intermediate_size=256, **lora)
    save(model, out)
    if model_type == "qwen3_moe":           # Qwen3-FP8 names what it keeps in bf16
        skip = ["lm_head"] + [f"model.layers.{i}.{m}" for i in range(model.config.num_hidden_layers)
                              for m in ("input_layernorm", "mlp.gate", "post_attention_layernorm")]
        qconfig = {"activation_scheme": "dynamic", "modules_to_not_convert": skip, "quant_method": "fp8",
                   "weight_block_size": list(BLOCK)}
    else:
        qconfig = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                   "weight_block_size": list(BLOCK)}
    quantize_folder(out, lambda n, t: "fp8" if fp8_quantized(n, t.dim()) else None, qconfig)


# vLLM's CPU MLA kernel takes only DeepSeek's latent width, kv_lora_rank 512 + qk_rope_head_dim 64 = 576; llama.cpp
# reads deepseek2.attention.q_lora_rank, which a checkpoint without q_a_proj (q_lora_rank None) has not
MLA_576 = dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64, head_dim=64, q_lora_rank=64)


def deepseek_v3_mtp(out: Path) -> None:
    """The last decoder layer copied to index N with DeepSeek-V3's MTP extras."""
    model = tiny("deepseek_v3", **MLA_576)
    save(model, out)
    n, d = model.config.num_hidden_layers, model.config.hidden_size
    ckpt = Checkpoint(out)
    tensors = {name: ckpt.get(name).clone() for name in ckpt.tensors}
    mtp = {k.replace(f"model.layers.{n - 1}.", f"model.layers.{n}."): v.clone()
           for k, v in tensors.items() if k.startswith(f"model.layers.{n - 1}.")}
    gen = torch.Generator().manual_seed(1)
    mtp[f"model.layers.{n}.eh_proj.weight"] = (torch.randn(d, 2 * d, generator=gen) * 0.08).to(torch.bfloat16)
    mtp[f"model.layers.{n}.enorm.weight"] = torch.ones(d, dtype=torch.bfloat16)
    mtp[f"model.layers.{n}.hnorm.weight"] = torch.ones(d, dtype=torch.bfloat16)
    mtp[f"model.layers.{n}.shared_head.norm.weight"] = torch.ones(d, dtype=torch.bfloat16)
    mtp[f"model.layers.{n}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    mtp[f"model.layers.{n}.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    for f in ckpt.files:
        (out / f).unlink()
    save_file({**tensors, **mtp}, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}, indent=2) + "\n")


def qwen3_vl_moe(out: Path) -> None:
    """Fused experts as Qwen/Qwen3-VL-30B-A3B publishes them, gate_up_proj [E, H, 2I] and down_proj [E, I, H]: the
    transpose of what transformers 5 builds and saves (it reads both, transposing where the dims say so)."""
    save(tiny("qwen3_vl_moe"), out)
    ckpt = Checkpoint(out)
    tensors = {name: ckpt.get(name).clone() for name in ckpt.tensors}
    for name in [n for n in tensors if n.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))]:
        tensors[name] = tensors[name].transpose(1, 2).contiguous()
    for f in ckpt.files:
        (out / f).unlink()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})


MODELS: dict[str, Callable[[Path], None]] = {
    "gpt-oss-mxfp4": gpt_oss_mxfp4,
    "qwen3-moe-fp8": lambda out: fp8("qwen3_moe", out),
    "deepseek-v3-fp8": lambda out: fp8("deepseek_v3", out),
    "deepseek-v3-mtp": deepseek_v3_mtp,
    "qwen3-vl-moe": qwen3_vl_moe,
    "glm4v-moe": lambda out: save(tiny("glm4v_moe"), out),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="folder to write the checkpoints into, one subfolder each")
    ap.add_argument("--only", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    args = ap.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    if unknown := set(names) - set(MODELS):
        ap.error(f"unknown models {sorted(unknown)}; known: {', '.join(MODELS)}")
    for name in names:
        folder = args.out / name
        if folder.exists():
            ap.error(f"{folder} exists; remove it first")
        MODELS[name](folder)
        print(f"{folder}: {sum(f.stat().st_size for f in folder.iterdir()) / 2**20:.1f} MiB", flush=True)


if __name__ == "__main__":
    main()
