"""Tiny random MoE models of every supported family, built locally (no downloads).

They back the test-suite and the `tiny:<family>` model names of the CLI, e.g.
`moeprune info tiny:mixtral`. Attention head_dim is 64 so that vLLM's CPU build can serve them.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from .arch import FAMILIES, MoePruneError, set_config_value

_COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=1, num_key_value_heads=1,
               head_dim=64, max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-6,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)

# per family: config fields on top of _COMMON; experts / top_k are filled in by tiny_config
_EXTRA: dict[str, dict] = {
    "mixtral": dict(intermediate_size=32),
    "qwen2_moe": dict(intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                      decoder_sparse_step=1, norm_topk_prob=False),
    "qwen3_moe": dict(intermediate_size=64, moe_intermediate_size=32, decoder_sparse_step=1, norm_topk_prob=True),
    "olmoe": dict(intermediate_size=32),
    "deepseek_v2": dict(intermediate_size=64, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=0,
                        kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=64,
                        topk_method="group_limited_greedy", n_group=2, topk_group=1, routed_scaling_factor=1.0),
    "deepseek_v3": dict(intermediate_size=64, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=0,
                        kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=64,
                        head_dim=32,
                        n_group=2, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=True),
    "glm4_moe": dict(intermediate_size=64, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=0,
                     n_group=2, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=True,
                     partial_rotary_factor=0.5),
    "ernie4_5_moe": dict(intermediate_size=64, moe_intermediate_size=32, moe_num_shared_experts=1,
                         moe_layer_start_index=0, moe_layer_end_index=-1, moe_layer_interval=1, use_bias=False),
    "phimoe": dict(intermediate_size=32, router_jitter_noise=0.0, input_jitter_noise=0.0),
    "gpt_oss": dict(intermediate_size=32, layer_types=["sliding_attention", "full_attention"], sliding_window=16,
                    attention_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}
# per family: the config fields of the expert count and top-k, which tiny_config sets
_COUNTS: dict[str, tuple[str, str]] = {
    "mixtral": ("num_local_experts", "num_experts_per_tok"), "qwen2_moe": ("num_experts", "num_experts_per_tok"),
    "qwen3_moe": ("num_experts", "num_experts_per_tok"), "olmoe": ("num_experts", "num_experts_per_tok"),
    "deepseek_v2": ("n_routed_experts", "num_experts_per_tok"),
    "deepseek_v3": ("n_routed_experts", "num_experts_per_tok"),
    "glm4_moe": ("n_routed_experts", "num_experts_per_tok"), "ernie4_5_moe": ("moe_num_experts", "moe_k"),
    "phimoe": ("num_local_experts", "num_experts_per_tok"), "gpt_oss": ("num_local_experts", "num_experts_per_tok"),
}
# the model types with a hand-set tiny model (`tiny:<name>`) or an arch entry: what the test-suite runs every method on
# (with routing pinned by the router rows: not a family whose routers choose by token id, tests/test_hash_routing.py,
# and the router's own weight rows, pin_routing's: not DBRX's, whose router holds them in router.layer)
TINY_FAMILIES = sorted({*_EXTRA, *(t for t, f in FAMILIES.items()
                                   if not f.hash_table and f.router_tensors[0][0] == "weight")})


@torch.no_grad()
def plant_hash_tables(model, seed: int = 0):
    """A router's token-id -> expert-ids table (DeepSeek-V4's tid2eid) is zero when built (its values come from the
    checkpoint: every token on expert 0): a seeded table of distinct experts per token instead, as trained ones
    have. Returns the model."""
    family = FAMILIES.get(getattr(model.config, "model_type", ""))
    if family is None or not family.hash_table:
        return model
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        table = getattr(module, family.hash_table, None)
        if isinstance(table, torch.Tensor) and not table.is_meta:
            E = module.num_experts
            table.copy_(torch.stack([torch.randperm(E, generator=g)[:table.shape[1]] for _ in range(table.shape[0])]))
    return model


def tiny_config(model_type: str, num_experts: int = 8, top_k: int = 2, **overrides):
    """The tiny config of a supported family (hand-set fields), or of any other transformers model type
    (shrunk generically by `tiny_config_any`, with 8 experts and top-k 2 wherever its config names them)."""
    if model_type not in _EXTRA:
        from transformers import CONFIG_MAPPING
        if model_type in CONFIG_MAPPING:
            config = tiny_config_any(model_type, **overrides)
            if model_type in FAMILIES:          # an entry without hand-set fields (Llama 4): E and top-k as asked
                family, text = FAMILIES[model_type], config.get_text_config()
                set_config_value(text, family.n_experts_field, num_experts)
                set_config_value(text, family.top_k_field, top_k)
            return config
        raise MoePruneError(f"no tiny model for {model_type!r}; choose one of {', '.join(sorted(_EXTRA))} "
                            "or any transformers model type")
    n_field, k_field = _COUNTS[model_type]
    fields = {**_COMMON, **_EXTRA[model_type], n_field: num_experts, k_field: top_k, **overrides}
    return AutoConfig.for_model(model_type, **fields)


def tiny_model(model_type: str, num_experts: int = 8, top_k: int = 2, seed: int = 0, **overrides):
    """A randomly initialised float32 model; the router gets a larger scale so routing is not uniform."""
    config = tiny_config(model_type, num_experts, top_k, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return plant_hash_tables(spread_weights(model), seed).eval()


@torch.no_grad()
def spread_weights(model: nn.Module) -> nn.Module:
    """Matrices ~ N(0, 0.08) and biases ~ N(0, 0.02), drawn from torch's global generator: a larger scale than
    transformers' init, so routing and attention are far from uniform and a wrong mask or expert shows."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, 0.08)
        elif name.endswith("bias"):
            p.normal_(0.0, 0.02)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Tiny configs of ANY transformers model type, shrunk generically from the config class's own defaults.
#
# The rules are data: a field name -> tiny value table (applied in the config and in every nested sub-config),
# name patterns for the routed / shared expert counts and top-k, and the per-layer lists (`layer_types`,
# `mlp_layer_types`, ...) cut to the tiny layer count while keeping every distinct kind of layer. Per-type
# overrides (`_TYPE_OVERRIDES`) only where a family needs a value the table cannot give.
# ---------------------------------------------------------------------------------------------------------------

import dataclasses  # noqa: E402
import re  # noqa: E402

TINY_EXPERTS = 8
TINY_TOP_K = 2
TINY_LAYERS = 4

# field -> tiny value; a field absent from a config is ignored, a field whose default is None or 0 stays so
_SIZES: dict[str, object] = {
    # widths
    "hidden_size": 64, "d_model": 64, "n_embd": 64, "text_hidden_size": 64, "out_hidden_size": 64,
    "thinker_hidden_size": 64, "projector_hidden_size": 64, "projection_hidden_dim": 64, "merged_hidden_size": 64,
    "intermediate_size": 64, "ffn_hidden_size": 64, "d_ff": 64, "dense_intermediate_size": 64,
    "intermediate_size_mlp": 64, "decoder_ffn_dim": 64, "encoder_ffn_dim": 64, "mlp_dim": 64,
    # expert widths: 2 x 16 != 64, so a fused [E, 2I, H] projection cannot be mistaken for [E, H, 2I]
    "moe_intermediate_size": 16, "expert_ffn_hidden_size": 16, "moe_hidden_size": 16,
    "shared_expert_intermediate_size": 16, "shared_experts_intermediate_size": 16, "shared_intermediate_size": 16,
    "moe_shared_expert_intermediate_size": 16, "share_expert_dim": 16, "router_hidden_size": 32,
    "projection_intermediate_size": 64, "projector_input_dim": 64, "projector_output_dim": 64,
    "vision_output_dim": 64, "adapter_out_dim": 64, "output_dim": 64,
    # attention
    "num_attention_heads": 2, "n_heads": 2, "num_heads": 2, "decoder_attention_heads": 2,
    "encoder_attention_heads": 2, "num_key_value_heads": 1, "kv_n_heads": 1, "head_dim": 64, "d_kv": 64,
    "kv_channels": 32, "swa_head_dim": 64, "swa_num_attention_heads": 2, "swa_num_key_value_heads": 1,
    "num_sliding_attention_heads": 2, "query_pre_attn_scalar": 64, "rotary_dim": 32,
    "kv_lora_rank": 16, "q_lora_rank": 32, "o_lora_rank": 32, "qk_rope_head_dim": 32, "qk_nope_head_dim": 32,
    "qk_head_dim": 64, "v_head_dim": 64, "index_head_dim": 32, "index_n_heads": 2, "index_topk": 16,
    "linear_key_head_dim": 32, "linear_value_head_dim": 32, "linear_num_key_heads": 1, "linear_num_value_heads": 2,
    "linear_head_dim": 32, "linear_num_heads": 2, "hc_lowrank": 16, "ple_embed_dim": 32, "gated_norm_rank": 8,
    "loop_gate_rank": 8, "num_attention_heads_per_layer": 2,
    # state-space / linear attention
    "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_head_dim": 16, "mamba_num_heads": 8, "ssm_state_size": 16,
    "mamba_d_state": 16, "mamba_dt_rank": 8, "mamba_chunk_size": 16, "chunk_size": 16,
    "mamba_n_groups": 1, "n_groups": 1,
    # sequence / vocabulary
    "vocab_size": 256, "unpadded_vocab_size": 256, "max_position_embeddings": 256, "max_seq_len": 256,
    "sliding_window": 16, "sliding_window_size": 16, "attention_chunk_size": 16, "block_size": 16,
    "vocab_size_per_layer_input": 256, "hidden_size_per_layer_input": 16, "ngram_vocab_size_base": 256,
    "split_ngram_parts": 2, "model_max_length": 256, "canvas_length": 16, "index_block_size": 16,
    # layer counts of encoders (vision / audio): 2
    "depth": 2, "encoder_layers": 2, "decoder_layers": 2, "n_layers": 2,
    # decoder layers per block of Inkling-2's attention residuals: two blocks in the tiny layers, as real ones have
    "n_layers_per_attn_res_block": 2,
    # LongCat-Flash's identity (zero-computation) experts, scored after the routed ones: 3 beside the 8 (256 beside
    # 512 in the real one), a count no other field holds (8, the top-k 2, the edited 4)
    "zero_expert_num": 3,
}
# fields holding the number of decoder layers (set to TINY_LAYERS; per-layer lists follow)
_LAYER_FIELDS = ("num_hidden_layers", "n_layers", "num_layers", "num_decoder_layers", "decoder_layers")
_TOP_K_FIELDS = ("num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_top_k", "moe_topk", "top_k",
                 "n_activated_experts", "num_activated_experts", "experts_per_token", "num_selected_experts")
_EXPERT_FIELD = re.compile(r"expert")
_NOT_COUNT = re.compile(r"per_tok|per_token|shared|size|dim|capacity|layer|top|group|coef|factor|loss|"
                        r"interval|start|end|index|offset|period|freq|norm|bias|scale|noise|jitter|drop|type|zero")
_SHARED_COUNT = re.compile(r"shared_experts?$|shared_experts?_num$|^n_shared|num_shared_experts")
# sizes a family ties together: (a, b) -> a follows b's tiny value where the defaults have them equal
_TIED = (("num_key_value_heads", "num_attention_heads"), ("head_dim", "qk_rope_head_dim"))
# per-layer lists that a config class leaves None and its model indexes anyway (DeepSeek-OCR-2's text model):
# the tiny value, from the tiny layer count (a dense layer first, as first_k_dense_replace = 1 gives)
_UNSET_PER_LAYER = {"mlp_layer_types": lambda n: ["dense"] + ["sparse"] * (n - 1)}

# per model type: fields the table cannot give (applied last, to the top-level config)
_TYPE_OVERRIDES: dict[str, dict] = {
    # DbrxAttentionConfig declares no rope_theta, yet DbrxAttention reads attn_config.rope_theta; its clamp needs a
    # clip_qkv (the released configs' 8); the experts' width is ffn_config.ffn_hidden_size (16 against hidden 64,
    # as 10752 against 6144, so the folded [E * I, H] projections show their orientation), top-k 2 as released 4
    "dbrx": dict(attn_config=dict(kv_n_heads=1, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(ffn_hidden_size=16, moe_num_experts=8, moe_top_k=2)),
    # fields whose class default is None but that the modeling code reads
    "hunyuan_v1_moe": dict(head_dim=64, num_experts=8, moe_topk=2),   # its class defaults are dense (1 expert)
    # the modeling code's default mrope_section [8, 12, 12] needs head_dim 128: 2+3+3 = half of 32 x 0.5
    "glm4v_moe_text": dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5,
                                                mrope_section=[2, 3, 3])),
    # the modeling code's default mrope_section [22, 22, 20] needs head_dim 128: 6+6+4 = half of 64 / 2
    "ernie4_5_vl_moe_text": dict(rope_parameters=dict(rope_type="default", rope_theta=500000.0,
                                                      mrope_section=[6, 6, 4])),
    # sliding and full-attention layers (the default pattern has a full one every sixth layer, none in four)
    "inkling2_text": dict(layer_types=["hybrid_sliding", "hybrid"] * 2),
    # its looped layers (run loop_num_passes times per forward) within the tiny layers, on block boundaries
    "inkling2_loop_text": dict(loop_layer_index_start=2, loop_layer_index_end=4),
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv", "full_attention"]),
    # two indexed-attention layers, the second reusing the first's keys, values and index (as layers 9 and 4 of
    # the 50-layer default)
    "kolibri1_1": dict(layer_types=["sliding_attention", "indexed_attention", "sliding_attention", "indexed_attention"],
                       index_layers=[1], kv_source_layers=[0, 1, 2, 1], index_num_heads=2, index_topk=16,
                       index_pool_size=64, index_compression=4, index_num_local_tokens=8, index_num_sink_tokens=2),
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=64, indexer_budget=16,
                           indexer_compress_ratio=4),
}


def _layer_pattern(values: list, n: int) -> list:
    """A per-layer list cut to n entries that keeps every distinct entry: the first occurrence of each kind,
    in order, then the original pattern from its start."""
    keys = [repr(v) for v in values]
    firsts = [i for i, k in enumerate(keys) if k not in keys[:i]]
    n = max(n, len(firsts))
    picked = sorted(firsts)
    i = 0
    while len(picked) < n:
        if i not in picked:
            picked.append(i)
        i += 1
    return [values[i] for i in sorted(picked)]


def _shrunk_entry(entry):
    """One per-layer override of a config (Dots3-Note's per_layer_config: the sliding layers' own head counts and
    widths) shrunk by the same table, its ties kept."""
    if not isinstance(entry, dict):
        return entry
    out = {k: _SIZES[k] if k in _SIZES and isinstance(v, int) and not isinstance(v, bool) and v > 0 else v
           for k, v in entry.items()}
    for a, b in _TIED:
        if a in out and b in out and entry[a] == entry[b]:
            out[a] = out[b]
    return out


def _field_defaults(cls) -> dict:
    """The dataclass defaults of a config class (None where a field is computed in __post_init__)."""
    out = {}
    if dataclasses.is_dataclass(cls):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:   # type: ignore[misc]
                out[f.name] = f.default_factory()                # type: ignore[misc]
    return out


def _shrunk_fields(cls, n_layers: int = TINY_LAYERS) -> dict:
    """Keyword arguments that make a tiny instance of config class `cls`."""
    try:
        instance = cls()
        defaults = instance.to_dict()
    except Exception:                                       # noqa: BLE001  a config that needs arguments
        instance, defaults = None, {}
    raw = _field_defaults(cls)
    kw: dict = {}
    for key, value in defaults.items():
        if value is None and key in _TOP_K_FIELDS:
            kw[key] = TINY_TOP_K                            # a top-k without a default (DeepSeek-V2)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            if key in _LAYER_FIELDS and value > 1 and (key != "n_layers" or "num_hidden_layers" not in defaults):
                decoder = key in ("num_hidden_layers", "num_layers", "num_decoder_layers")
                kw[key] = n_layers if decoder else min(value, 2)
            elif key in _TOP_K_FIELDS and value > 0:
                kw[key] = min(TINY_TOP_K, value) if value > 0 else value
            elif _EXPERT_FIELD.search(key) and _SHARED_COUNT.search(key) and value > 0:
                kw[key] = 1
            elif _EXPERT_FIELD.search(key) and not _NOT_COUNT.search(key) and value > 1:
                kw[key] = TINY_EXPERTS
            elif key in _SIZES and value > 0:
                kw[key] = _SIZES[key]
            elif key == "n_group" or key == "num_expert_group":
                kw[key] = 2 if value > 1 else value
            elif key == "topk_group":
                kw[key] = 1
            elif key in ("first_k_dense_replace", "num_dense_layers") and value > 0:
                kw[key] = 1
            elif (key.endswith("token_id") or key.endswith("token_index")) and value >= 256:
                kw[key] = 3 + len([k for k in kw if k.endswith(("token_id", "token_index"))]) % 250
    # sizes the family ties together: keep them tied (a width equal to the hidden size follows it)
    hidden = defaults.get("hidden_size")
    if isinstance(hidden, int) and hidden >= 256 and "hidden_size" in kw:
        for key, value in defaults.items():
            if key not in kw and value == hidden and not isinstance(value, bool) and re.search(r"dim|size|width", key):
                kw[key] = kw["hidden_size"]
    for a, b in _TIED:
        if a in kw and b in kw and defaults.get(a) == defaults.get(b):
            kw[a] = kw[b]
    if "qk_head_dim" in kw and "qk_nope_head_dim" in kw and "qk_rope_head_dim" in kw:
        kw["qk_head_dim"] = kw["qk_nope_head_dim"] + kw["qk_rope_head_dim"]
    if "sliding_window" in defaults and defaults["sliding_window"] is None:   # some read it unconditionally
        kw["sliding_window"] = _SIZES["sliding_window"]
    layers_before = next((defaults[k] for k in _LAYER_FIELDS if isinstance(defaults.get(k), int)), None)
    layers_after = next((kw[k] for k in _LAYER_FIELDS if k in kw), layers_before)
    for key, value in defaults.items():
        if key in kw or raw.get(key, value) is None:
            continue                                        # computed from the other fields in __post_init__
        per_layer = isinstance(value, (list, str)) and layers_before and len(value) == layers_before > 1
        if per_layer and layers_after != layers_before:
            cut = _layer_pattern(list(value), layers_after)
            kw[key] = "".join(cut) if isinstance(value, str) else cut
    # per-layer overrides keyed by layer index: those of the tiny layers, else the first one on the last layer
    plc = defaults.get("per_layer_config")
    if isinstance(plc, dict) and plc and layers_after and layers_after != layers_before:
        kept = {k: v for k, v in plc.items() if int(k) < layers_after}
        first = min(plc, key=int)
        kw["per_layer_config"] = {k: _shrunk_entry(v) for k, v in (kept or {layers_after - 1: plc[first]}).items()}
    for key, tiny in _UNSET_PER_LAYER.items():
        if key in defaults and defaults[key] is None and layers_after:
            kw[key] = tiny(layers_after)
    # lists of layer indices (mlp_only_layers, moe_layers, ...): only those of the tiny layers
    for key, value in defaults.items():
        if key in kw or not isinstance(value, list) or not value or raw.get(key, value) is None:
            continue
        if key.endswith("layers") and all(isinstance(v, int) and not isinstance(v, bool) for v in value) \
                and layers_before and max(value) < layers_before:
            kept = [v for v in value if v < layers_after]
            kw[key] = kept if kept or key != "moe_layers" else list(range(layers_after))
    rope = defaults.get("rope_parameters")
    if isinstance(rope, dict) and isinstance(rope.get("mrope_section"), list) and "hidden_size" in kw:
        # multimodal RoPE sections split half the rotary dimension: rescale them to the tiny one
        head = kw.get("head_dim") or kw["hidden_size"] // kw.get("num_attention_heads", 1)
        half = int(head * rope.get("partial_rotary_factor", defaults.get("partial_rotary_factor") or 1.0)) // 2
        old = rope["mrope_section"]
        new = [max(1, round(v * half / sum(old))) for v in old]
        new[0] += half - sum(new)
        kw["rope_parameters"] = {**rope, "mrope_section": new}
    kw.update(_TYPE_OVERRIDES.get(getattr(cls, "model_type", ""), {}))   # also where it is a sub-config
    # nested sub-configs: shrink them too
    for key, sub_cls in (getattr(cls, "sub_configs", None) or {}).items():
        default_sub = getattr(instance, key, None)
        if hasattr(default_sub, "to_dict") and not getattr(sub_cls, "model_type", ""):
            sub_cls = type(default_sub)                     # declared as AutoConfig: the default's own class
        if isinstance(defaults.get(key), dict) or key in raw:
            try:
                sub = sub_cls(**_shrunk_fields(sub_cls, n_layers))
                kw[key] = sub.to_dict()
            except Exception:                               # noqa: BLE001  left at its defaults
                pass
    return kw


def tiny_config_any(model_type: str, n_layers: int = TINY_LAYERS, **overrides):
    """A tiny config of any transformers model type, shrunk generically from its config class's defaults."""
    from transformers import CONFIG_MAPPING
    if model_type not in CONFIG_MAPPING:
        raise MoePruneError(f"transformers has no model type {model_type!r}")
    cls = CONFIG_MAPPING[model_type]
    fields = {**_shrunk_fields(cls, n_layers), **_TYPE_OVERRIDES.get(model_type, {}), **overrides}
    return cls(**fields)


def model_class_for(config):
    """The auto class that builds a config: a causal LM where transformers maps one, else an image-text-to-text
    model (multimodal MoE), else None."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto import modeling_auto as ma
    causal = config.model_type in ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    wrapper = config.model_type in ma.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    if wrapper and (not causal or hasattr(config, "vision_config")):
        return AutoModelForImageTextToText       # Llama 4 maps both: its published checkpoints are the wrapper
    return AutoModelForCausalLM if causal else None


def tiny_model_any(model_type: str, seed: int = 0, device: str | None = None, config=None, **overrides):
    """A seeded tiny model of any transformers model type (`tiny_config_any`), built by its causal-LM (or
    image-text-to-text) auto class; device="meta" builds the structure without weights (fast)."""
    config = config if config is not None else tiny_config(model_type, **overrides)
    cls = model_class_for(config)
    if cls is None:
        raise MoePruneError(f"{model_type!r} is not a causal LM (no causal-LM or image-text-to-text auto class)")
    torch.manual_seed(seed)
    if device == "meta":
        with torch.device("meta"):
            return cls.from_config(config, dtype=torch.float32).eval()
    return plant_hash_tables(cls.from_config(config, dtype=torch.float32), seed).eval()
