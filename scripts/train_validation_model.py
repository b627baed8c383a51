#!/usr/bin/env python
"""Train one of moeprune's validation Mixture-of-Experts models on CPU (issue #22).

The project's defaults were chosen on the two demo models; these three are trained here with the
same machinery (``scripts/train_demo_model.py``: corpus sampling, schedule, router aux loss,
checkpoint/resume, logging, export) but are other kinds of model, each on its own domain mix, so
that a default fitted to the demos can be checked on models it was not fitted to.

All: vocab 8192 (the demo tokenizer, copied from ``src/moeprune/demo/models/demo-fine``),
4 layers, hidden 192, 3 attention heads of head_dim 64, RoPE, RMSNorm, bf16 weights.

* ``val-upcycled`` -- ``MixtralForCausalLM``, 1 KV head (GQA 3:1), untied embeddings, 8 experts of
  intermediate 384, top-2.  A dense ``MistralForCausalLM`` of the same shape is trained first
  (``--dense-frac`` of the steps), its MLP copied into every expert with 1e-3 relative noise, a
  fresh near-zero router, then training continues as an MoE: the experts stay near-copies.
  Mix: prose-heavy (literature, speeches, dialogue over-weighted; code and math rare).
* ``val-shared`` -- ``Qwen2MoeForCausalLM`` from scratch: 16 experts of moe_intermediate 96, top-4,
  softmax routing without top-k renormalisation (``norm_topk_prob`` false, as Qwen1.5-MoE), one
  shared expert of intermediate 384 behind its sigmoid ``shared_expert_gate``, qkv bias, tied
  embeddings.  Mix: code/technical/math-heavy.
* ``val-sigmoid`` -- ``DeepseekV3ForCausalLM`` from scratch: multi-head latent attention
  (q_lora_rank 96, kv_lora_rank 64, qk_nope 64 + qk_rope 64, v_head_dim 64), layer 0 dense
  (``first_k_dense_replace`` 1, intermediate 384), layers 1-3 with 64 routed experts of
  moe_intermediate 32, top-6, sigmoid scores, ``n_group`` = ``topk_group`` = 1, ``norm_topk_prob``,
  ``routed_scaling_factor`` 2.5, one shared expert; untied embeddings.  Balanced the DeepSeek-V3
  way, without an auxiliary loss: after every step each router's ``e_score_correction_bias`` moves
  by ``--bias-rate`` towards equal load (minus for over-loaded experts, plus for under-loaded
  ones), so the shipped model carries a non-zero correction bias.  Mix: encyclopedic/math-heavy.

Runs are scheduled by steps alone (``--steps``; ``--minutes`` only caps a run, with a message), so
the same command gives the same model.  Work files (token cache ``tokens-val/``, checkpoints, logs) live in ``--work``;
the model is written to ``validation/models/<name>/``, its loss curve to
``validation/img/loss_<name>.png`` and its summary into ``validation/training.json``.

Usage::

    python scripts/train_validation_model.py --name val-upcycled
    python scripts/train_validation_model.py --name val-sigmoid --trial 20    # speed check only

Prerequisite: ``scripts/build_corpus.py`` (the training split in ``<work>/corpus/train``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_demo_model as tdm  # noqa: E402

VALIDATION = tdm.REPO / "validation"
TOKENIZER = tdm.MODELS / "demo-fine"

ATTN = dict(vocab_size=tdm.VOCAB, hidden_size=192, num_hidden_layers=4, num_attention_heads=3,
            max_position_embeddings=1024, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0, pad_token_id=0,
            initializer_range=0.02)

# Relative domain weights (normalised by the trainer); the demo models used equal weights.
MIX = {
    "val-upcycled": {"literature": 3, "speeches": 2, "dialogue": 2, "encyclopedic": 1, "technical": 1,
                     "code": 0.5, "math": 0.5},
    "val-shared": {"code": 3, "technical": 2, "math": 2, "encyclopedic": 1, "dialogue": 1,
                   "literature": 0.5, "speeches": 0.5},
    "val-sigmoid": {"encyclopedic": 3, "math": 2, "dialogue": 1.5, "speeches": 1, "literature": 1,
                    "technical": 1, "code": 1},
}


def upcycled_model(kind: str):
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM
    shape = dict(num_key_value_heads=1, head_dim=64, tie_word_embeddings=False, rope_theta=10000.0,
                 sliding_window=None, intermediate_size=384, **ATTN)
    if kind == "dense":
        return MistralForCausalLM(MistralConfig(**shape))
    return MixtralForCausalLM(MixtralConfig(num_local_experts=8, num_experts_per_tok=2, output_router_logits=True,
                                            router_aux_loss_coef=0.02, **shape))


def shared_model(kind: str):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(
        num_key_value_heads=3, tie_word_embeddings=True, qkv_bias=True, intermediate_size=384,
        moe_intermediate_size=96, num_experts=16, num_experts_per_tok=4, norm_topk_prob=False,
        shared_expert_intermediate_size=384, decoder_sparse_step=1, mlp_only_layers=[],
        output_router_logits=True, router_aux_loss_coef=0.01, use_sliding_window=False, **ATTN))


def sigmoid_model(kind: str):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    return DeepseekV3ForCausalLM(DeepseekV3Config(
        num_key_value_heads=3, tie_word_embeddings=False, intermediate_size=384, moe_intermediate_size=32,
        n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=1, n_group=1, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=1,
        q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64,
        output_router_logits=True, num_mtp_layers=0, **ATTN))


BIAS_RATE = 1e-3


@torch.no_grad()
def balance_bias(model, out) -> None:
    """DeepSeek-V3 auxiliary-loss-free balancing: nudge each router's correction bias towards equal load."""
    gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    logits = out.router_logits
    assert logits is not None and len(logits) == len(gates), "router logits not returned"
    for gate, lg in zip(gates, logits):
        choice = lg.detach().float().sigmoid() + gate.e_score_correction_bias
        idx = choice.topk(gate.top_k, dim=-1).indices
        load = torch.bincount(idx.reshape(-1), minlength=gate.num_experts).float()
        gate.e_score_correction_bias += BIAS_RATE * torch.sign(load.mean() - load)


COMMON = dict(out_root=VALIDATION / "models", docs=VALIDATION, summary_file="training.json",
              tokenizer=TOKENIZER, token_cache="tokens-val", step_schedule=True)
# Step budgets were sized from --trial runs on this CPU (one thread, about 1.0-1.4 s per step of
# 8 x 256 tokens) to take about 8 minutes each; --minutes only caps a run.
RUN = dict(batch_size=8, warmup=30, minutes=20, eval_minutes=1.5, ckpt_minutes=2)
SPECS = {
    "val-upcycled": tdm.Spec("val-upcycled", upcycled_model, upcycled=True, weights=MIX["val-upcycled"],
                             defaults=dict(steps=400, dense_frac=0.4, seed=101, **RUN),
                             notes={"kind": "upcycled from a dense Mistral; experts are near-copies"}, **COMMON),
    "val-shared": tdm.Spec("val-shared", shared_model, weights=MIX["val-shared"],
                           defaults=dict(steps=350, seed=202, **RUN),
                           notes={"kind": "from scratch; 1 shared expert with shared_expert_gate; "
                                          "softmax top-4 without renormalisation"}, **COMMON),
    "val-sigmoid": tdm.Spec("val-sigmoid", sigmoid_model, weights=MIX["val-sigmoid"], after_step=balance_bias,
                            defaults=dict(steps=350, seed=303, **RUN),
                            notes={"kind": "from scratch; sigmoid routing, aux-loss-free balancing through "
                                           "e_score_correction_bias", "bias_rate": BIAS_RATE}, **COMMON),
}


if __name__ == "__main__":
    tdm.main(SPECS, description=__doc__.split("\n\n")[0])
