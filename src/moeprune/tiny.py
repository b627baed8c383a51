"""Tiny random MoE models of every supported family, built locally (no downloads).

They back the test-suite and the `tiny:<family>` model names of the CLI, e.g.
`moeprune info tiny:mixtral`. Attention head_dim is 64 so that vLLM's CPU build can serve them.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from .arch import FAMILIES, MoePruneError

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
                     n_group=2, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=True, partial_rotary_factor=0.5),
    "ernie4_5_moe": dict(intermediate_size=64, moe_intermediate_size=32, moe_num_shared_experts=1,
                         moe_layer_start_index=0, moe_layer_end_index=-1, moe_layer_interval=1, use_bias=False),
    "phimoe": dict(intermediate_size=32, router_jitter_noise=0.0, input_jitter_noise=0.0),
    "gpt_oss": dict(intermediate_size=32, layer_types=["sliding_attention", "full_attention"], sliding_window=16,
                    attention_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}


def tiny_config(model_type: str, num_experts: int = 8, top_k: int = 2, **overrides):
    if model_type not in _EXTRA:
        raise MoePruneError(f"no tiny model for {model_type!r}; choose one of {', '.join(sorted(_EXTRA))}")
    family = FAMILIES[model_type]
    fields = {**_COMMON, **_EXTRA[model_type], family.n_experts_field: num_experts, family.top_k_field: top_k,
              **overrides}
    return AutoConfig.for_model(model_type, **fields)


def tiny_model(model_type: str, num_experts: int = 8, top_k: int = 2, seed: int = 0, **overrides):
    """A randomly initialised float32 model; the router gets a larger scale so routing is not uniform."""
    config = tiny_config(model_type, num_experts, top_k, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
    return model.eval()
