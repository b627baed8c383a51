"""moeprune.layer_inputs: every decoder layer gets the inputs the model's own forward gives it.

Each family below is a real transformers model from a tiny config with more than one layer type. Running its
decoder layers one after another on `capture`'s hidden states with `capture`'s per-layer kwargs must give the
hidden states of the model's own forward (output_hidden_states=True) at a sequence longer than its sliding window
/ attention chunk / linear-attention block.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM

from moeprune.tiny import TINY_FAMILIES as SUPPORTED
from moeprune.arch import MoePruneError
from moeprune.layer_inputs import FromPrevious, InputsOf, advance, capture, head_arguments, run_layer
from moeprune.sources import head_logits
from moeprune.tiny import plant_hash_tables, tiny_model, tiny_model_any

torch.set_num_threads(1)

SEQ = 40          # longer than every window / chunk / block below
COMMON = dict(vocab_size=256, hidden_size=64, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# model type -> config fields on top of COMMON (4 layers, or as many as it takes to have every layer type)
FAMILIES: dict[str, dict] = {
    "gpt_oss": dict(num_hidden_layers=4, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                    layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=16),
    "qwen3_next": dict(num_hidden_layers=4, intermediate_size=64, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                       layer_types=["linear_attention", "full_attention"] * 2, linear_conv_kernel_dim=4,
                       linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                       linear_num_value_heads=4),
    "llama4_text": dict(num_hidden_layers=4, intermediate_size=32, intermediate_size_mlp=64, num_local_experts=4,
                        num_experts_per_tok=1, attention_chunk_size=8, no_rope_layer_interval=2, floor_scale=8,
                        interleave_moe_layer_step=1),
    "jamba": dict(num_hidden_layers=4, intermediate_size=32, num_experts=4, num_experts_per_tok=2, head_dim=None,
                  attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                  mamba_d_state=8, mamba_dt_rank=8, mamba_expand=2, use_mamba_kernels=False),
    "minimax": dict(num_hidden_layers=4, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                    block_size=16, layer_types=["linear_attention", "full_attention"] * 2),
    "granitemoehybrid": dict(num_hidden_layers=4, intermediate_size=32, shared_intermediate_size=32,
                             num_local_experts=4, num_experts_per_tok=2, head_dim=None,
                             layer_types=["linear_attention", "full_attention"] * 2, position_embedding_type="rope",
                             mamba_n_heads=4, mamba_d_state=16, mamba_chunk_size=16, mamba_n_groups=1),
    "lfm2_moe": dict(num_hidden_layers=4, intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                     num_experts_per_tok=2, num_dense_layers=1, layer_types=["conv", "full_attention"] * 2),
    "qwen3_5_moe_text": dict(num_hidden_layers=4, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                             num_experts=4, num_experts_per_tok=2,
                             layer_types=["linear_attention", "full_attention"] * 2, linear_key_head_dim=16,
                             linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4),
    "kimi_linear": dict(num_hidden_layers=4, intermediate_size=64, moe_intermediate_size=32, num_local_experts=4,
                        num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=16, v_head_dim=16, linear_head_dim=16, linear_num_heads=2,
                        layer_types=["linear_attention", "full_attention"] * 2),
    "nemotron_h": dict(layers_block_type=["mamba", "moe", "attention", "moe"], intermediate_size=64,
                       moe_intermediate_size=32, moe_shared_expert_intermediate_size=32, n_routed_experts=4,
                       num_experts_per_tok=2, ssm_state_size=16, mamba_num_heads=4, mamba_head_dim=32, n_groups=1,
                       chunk_size=16),
    "afmoe": dict(num_hidden_layers=4, intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                  num_experts_per_tok=2, num_shared_experts=1, num_dense_layers=1, sliding_window=16,
                  layer_types=["sliding_attention", "full_attention"] * 2),
    "cohere2_moe": dict(num_hidden_layers=4, intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                        sliding_window=16, layer_types=["sliding_attention", "full_attention"] * 2),
    "exaone_moe": dict(num_hidden_layers=4, intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                       num_experts_per_tok=2, first_k_dense_replace=1, sliding_window=16,
                       layer_types=["sliding_attention", "full_attention"] * 2),
    "granitemoe_swa": dict(num_hidden_layers=4, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                           sliding_window=16, layer_types=["sliding_attention", "full_attention"] * 2,
                           layer_rope_theta=[10000.0, 0.0, 1000.0, 10000.0]),     # per-layer rope; 0: NoPE
    "bailing_hybrid": dict(num_hidden_layers=4, intermediate_size=64, moe_intermediate_size=32, num_local_experts=4,
                           num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16,
                           qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, layer_group_size=2,
                           num_mtp_layers=0),
    "mimo_v2_flash": dict(num_hidden_layers=4, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4,
                          num_experts_per_tok=2, num_key_value_heads=1, v_head_dim=16, sliding_window=16,
                          layer_types=["sliding_attention", "full_attention"] * 2),
    "lara_mini": dict(num_hidden_layers=4, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
                      num_experts_per_tok=2, sliding_window=16, linear_key_head_dim=16, linear_value_head_dim=16,
                      linear_num_key_heads=2, linear_num_value_heads=4,
                      layer_types=["linear_attention", "sliding_attention", "linear_attention", "full_attention"]),
    # sliding / full, per-layer inputs, and the last two layers reuse earlier layers' keys and values (shared_kv_states)
    "gemma4_text": dict(num_hidden_layers=4, intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                        top_k_experts=2, enable_moe_block=True, sliding_window=16, global_head_dim=16,
                        vocab_size_per_layer_input=256, hidden_size_per_layer_input=16, num_kv_shared_layers=2,
                        layer_types=["sliding_attention", "full_attention"] * 2),
    # sparse attention whose "shared" layers reuse the previous layer's top-k indices (prev_topk_indices, handed on
    # in the layer's output): top-k 8 of 40 positions
    "glm_moe_dsa": dict(num_hidden_layers=4, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4,
                        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                        q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, index_topk=8,
                        index_head_dim=16, index_n_heads=2, indexer_types=["full", "shared", "full", "shared"]),
    # the same with hyper-connections (hidden states [B, T, hc_mult, d]) and its hc_head before the final norm
    "hy_v4": dict(num_hidden_layers=4, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4,
                  num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                  q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, index_topk=8,
                  index_head_dim=16, index_n_heads=2, indexer_types=["full", "shared", "full", "shared"]),
    # sliding / heavily compressed / compressed sparse attention (compressed every 8 / 4 tokens, indexer top-k 4 of
    # 10), hyper-connections, and hash layers that choose experts by token id (each layer is handed input_ids)
    "deepseek_v4": dict(num_hidden_layers=4, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                        num_key_value_heads=1, q_lora_rank=16, o_groups=2, o_lora_rank=16, index_topk=4,
                        index_head_dim=16, index_n_heads=2, sliding_window=8,
                        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
                        layer_types=["sliding_attention", "heavily_compressed_attention",
                                     "compressed_sparse_attention", "heavily_compressed_attention"],
                        mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"]),
    # a dense hybrid, here for its decoder layers' tuple output (`hidden_states, attn_weights = decoder_layer(...)`)
    "bamba": dict(num_hidden_layers=4, intermediate_size=64, attn_layer_indices=[1, 3], mamba_n_heads=4,
                  mamba_d_head=32, mamba_d_state=16, mamba_chunk_size=16, mamba_n_groups=1),
}


def build(model_type: str, attn: str | None = None, **overrides):
    known = set(CONFIG_MAPPING[model_type].__dataclass_fields__)
    common = {k: v for k, v in COMMON.items() if k in known}    # e.g. a config without head_dim
    fields = {k: v for k, v in {**common, **FAMILIES[model_type], **overrides}.items() if v is not None}
    config = AutoConfig.for_model(model_type, **fields)        # a None in FAMILIES: the config's own default
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    with torch.no_grad():     # larger weights than the default init: attention is far from uniform, masks matter
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name and "conv" not in name:
                p.normal_(0.0, 0.08)
    return plant_hash_tables(model.eval())          # DeepSeek-V4's token-id tables: not every token on expert 0


def tokens(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reference(model, ids) -> list[torch.Tensor]:
    """The model's own forward: the hidden states entering each decoder layer and the last layer's output."""
    layers = model.model.layers
    last = []
    handle = layers[-1].register_forward_hook(lambda m, a, out: last.append(out[0] if isinstance(out, tuple) else out))
    try:
        out = model(input_ids=ids, use_cache=False, output_hidden_states=True)
    finally:
        handle.remove()
    states = list(out.hidden_states)
    assert len(states) == len(layers) + 1
    return states[:len(layers)] + last


@torch.no_grad()
def layer_by_layer(layers, hidden, kwargs_list) -> list[torch.Tensor]:
    """The engine's way: advance, which also hands a layer's output on to the next layer's arguments."""
    states, batches = [hidden], [(hidden, kwargs_list)]
    for i, layer in enumerate(layers):
        batches = advance(layer, i, batches)
        states.append(batches[0][0])
    return states


def max_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def layer_types(model) -> list[str]:
    config = model.config
    if config.model_type == "bamba":
        return ["attention" if i in config.attn_layer_indices else "mamba" for i in range(config.num_hidden_layers)]
    types = list(getattr(config, "layer_types", None) or getattr(config, "layers_block_type"))
    if getattr(config, "indexer_types", None):           # sparse attention: its own indexer, or the previous top-k
        types = [f"{t} {i}" for t, i in zip(types, config.indexer_types)]
    return types


def carried(kwargs_list) -> bool:
    """Whether some layer takes an argument from the previous layer's output."""
    return any(isinstance(v, FromPrevious) for kw in kwargs_list for v in kw.values())


# the model's default attention (sdpa mostly: an unpadded full-attention mask is then None, as is a recurrent one);
# eager: every attention layer gets a materialised mask, so layer 0's kwargs are wrong for every family
@pytest.mark.parametrize("attn", [None, "eager"], ids=["default", "eager"])
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_layer_by_layer_matches_the_model(model_type, attn):
    model = build(model_type, attn)
    types = layer_types(model)
    assert len(set(types)) > 1, types
    ids = tokens()
    ref = reference(model, ids)
    [(hidden, kwargs_list)] = capture(model, [ids], "cpu")
    assert len(kwargs_list) == len(model.model.layers)
    assert torch.equal(hidden, ref[0])
    for kwargs in kwargs_list:
        assert not {"cache", "past_key_values", "cache_params", "use_cache"} & set(kwargs)
    assert max_error(layer_by_layer(model.model.layers, hidden, kwargs_list), ref) < 1e-5
    # layers of one type share the memory of one mask and one positions tensor: nothing is copied per layer
    # (gemma4 hands its KV-shared layers views of them; its per_layer_input is a slice per layer, and
    # granitemoe_swa's position embeddings are one per rope theta)
    for i, t in enumerate(types):
        j = types.index(t)
        for k in ("attention_mask", "position_ids"):
            a, b = kwargs_list[i].get(k), kwargs_list[j].get(k)
            assert a is b or a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr(), (model_type, i, j, k)
    if attn == "eager" and carried(kwargs_list):   # layer 0's kwargs everywhere: no top-k for a "shared" layer
        with pytest.raises(ValueError, match="top-k"):
            layer_by_layer(model.model.layers, hidden, [kwargs_list[0]] * len(types))
    elif attn == "eager" and model_type != "deepseek_v4":   # (its layers all take one mask, both rope tables)
        # the old behaviour, layer 0's kwargs everywhere, is wrong: the test can fail
        assert max_error(layer_by_layer(model.model.layers, hidden, [kwargs_list[0]] * len(types)), ref) > 1e-3


def test_layer_0_kwargs_for_every_layer_is_wrong_for_gpt_oss():
    """The old behaviour: the full-attention layers run with the sliding-window mask."""
    model = build("gpt_oss")
    ids = tokens()
    ref = reference(model, ids)
    [(hidden, kwargs_list)] = capture(model, [ids], "cpu")
    assert kwargs_list[0]["attention_mask"] is not kwargs_list[1]["attention_mask"]
    old = layer_by_layer(model.model.layers, hidden, [kwargs_list[0]] * len(kwargs_list))
    assert max_error(old, ref) > 1e-3
    assert max_error(layer_by_layer(model.model.layers, hidden, kwargs_list), ref) < 1e-5


# bamba: a tuple-returning model, batch 1 first; deepseek_v4: each batch's own token ids (hash-routed layers)
@pytest.mark.parametrize("model_type", ["gpt_oss", "bamba", "deepseek_v4"])
def test_several_batches_advanced_layer_by_layer(model_type):
    """The engine's loop: advance every cached batch through layer 0, then layer 1, ..."""
    model = build(model_type)
    batches = [tokens(1, seed=1), tokens(2, seed=2)]
    captured = capture(model, batches, "cpu")
    assert len(captured) == 2
    refs = [reference(model, ids) for ids in batches]
    for ids, (hidden, kwargs_list) in zip(batches, captured):
        assert hidden.shape[:2] == (ids.shape[0], SEQ) and hidden.shape[-1] == 64
    for i, layer in enumerate(model.model.layers):
        captured = advance(layer, i, captured)
        for ref, (hidden, _) in zip(refs, captured):
            assert (hidden - ref[i + 1]).abs().max().item() < 1e-5


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_capture_with_layers_norm_and_head_on_meta(model_type):
    """The streamed engine's state: only the embeddings and the rotary tables are real; every other module of the
    model (decoder layers, final norm, lm_head) is on the meta device."""
    model = build(model_type)
    ids = tokens()
    ref = reference(model, ids)
    real_layers = copy.deepcopy(model.model.layers)
    embeddings = model.get_input_embeddings()      # embed_tokens, nemotron_h's embeddings
    for name, child in model.model.named_children():   # rotary_emb, lfm2_moe's pos_emb, granitemoe_swa's rotary_embs
        rotary = child is not model.model.layers and any("RotaryEmbedding" in type(m).__name__ for m in child.modules())
        before_layers = "per_layer" in name            # gemma4's per-layer input embeddings and projection
        if child is not embeddings and not rotary and not before_layers:
            child.to("meta")
    model.lm_head.to("meta")
    assert all(p.is_meta for p in model.model.layers.parameters())
    [(hidden, kwargs_list)] = capture(model, [ids], "cpu")
    assert not hidden.is_meta
    for kwargs in kwargs_list:
        assert not any(isinstance(v, torch.Tensor) and v.is_meta for v in kwargs.values())
    assert max_error(layer_by_layer(real_layers, hidden, kwargs_list), ref) < 1e-5
    # the real forwards are back: the layers are untouched
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)


@pytest.mark.parametrize("model_type", ["glm_moe_dsa", "hy_v4"])
def test_an_argument_from_the_previous_layer_is_carried_per_stream(model_type):
    """GLM-MoE-DSA's and Hy-V4's layers hand their sparse-attention top-k indices to the next layer
    (prev_topk_indices), which a "shared" layer attends with: capture leaves a placeholder, run_layer refuses
    it, and advance fills it in from the layer's output. Two streams advanced from one captured kwargs list (the
    engine's original and pruned streams) each carry their own indices: each equals its own model forward."""
    model = build(model_type, "eager")
    ids, other = tokens(1, seed=1), tokens(1, seed=2)
    [(hidden, kwargs_list)] = capture(model, [ids], "cpu")
    assert kwargs_list[0]["prev_topk_indices"] is None
    for i, kw in enumerate(kwargs_list[1:]):
        assert isinstance(kw["prev_topk_indices"], FromPrevious) and kw["prev_topk_indices"].layer == i
    with pytest.raises(MoePruneError, match="advance"):
        run_layer(model.model.layers[1], hidden, kwargs_list[1])
    second = model.get_input_embeddings()(other)
    if model_type == "hy_v4":                             # the hyper-connection streams, as the forward makes them
        second = second.unsqueeze(2).expand(-1, -1, model.config.hc_mult, -1).contiguous()
    streams = [[(hidden, kwargs_list)], [(second, kwargs_list)]]
    refs = [reference(model, ids), reference(model, other)]
    for i, layer in enumerate(model.model.layers):
        streams = [advance(layer, i, s) for s in streams]
        for s, ref in zip(streams, refs):
            assert (s[0][0] - ref[i + 1]).abs().max().item() < 1e-5, (i, model_type)
    assert isinstance(kwargs_list[1]["prev_topk_indices"], FromPrevious)      # the captured list is unchanged
    # the carried indices matter: a "shared" layer given the other stream's indices computes something else
    swapped = [dict(kw) for kw in kwargs_list]
    first = advance(model.model.layers[0], 0, [(second, kwargs_list)])[0][1][1]["prev_topk_indices"]
    swapped[1]["prev_topk_indices"] = first
    h0 = advance(model.model.layers[0], 0, [(hidden, kwargs_list)])[0][0]
    assert (run_layer(model.model.layers[1], h0, swapped[1]) - refs[0][2]).abs().max().item() > 1e-3


def test_token_ids_are_each_batchs_own():
    """DeepSeek-V4's decoder layers take the batch's input_ids (its hash layers choose experts by token id): capture
    records each batch's own, and they matter: layer 0 run with another batch's ids computes something else."""
    model = build("deepseek_v4")
    batches = [tokens(2, seed=1), tokens(2, seed=2)]
    captured = capture(model, batches, "cpu")
    for ids, (_, kwargs_list) in zip(batches, captured):
        assert all(torch.equal(kw["input_ids"], ids) for kw in kwargs_list)
    (hidden, kwargs_list), (_, other) = captured
    want = reference(model, batches[0])[1]
    assert (run_layer(model.model.layers[0], hidden, kwargs_list[0]) - want).abs().max().item() < 1e-5
    assert (run_layer(model.model.layers[0], hidden, other[0]) - want).abs().max().item() > 1e-3


def test_an_instance_forward_is_kept():
    """accelerate's hooks replace a module's forward on the instance; capture puts it back."""
    model = build("gpt_oss")
    layer = model.model.layers[1]
    wrapped = functools.partial(type(layer).forward, layer)
    layer.forward = wrapped
    capture(model, [tokens()], "cpu")
    assert layer.__dict__["forward"] is wrapped
    assert "forward" not in model.model.layers[0].__dict__


@pytest.mark.parametrize("model_type", sorted(SUPPORTED))
def test_single_type_families_are_unchanged(model_type):
    """moeprune's supported families, its tiny models (one layer type, except gpt_oss): the same."""
    model = tiny_model(model_type, num_experts=4, top_k=2)
    ids = tokens()
    [(hidden, kwargs_list)] = capture(model, [ids], "cpu")
    assert max_error(layer_by_layer(model.model.layers, hidden, kwargs_list), reference(model, ids)) < 1e-5


def test_hidden_states_changed_between_layers_are_refused():
    """A model that changes the hidden states between two decoder layers (here a pre-hook doubling layer 2's
    input) cannot be run from captured inputs: capture says so."""
    model = build("gpt_oss")
    handle = model.model.layers[2].register_forward_pre_hook(lambda m, args: (args[0] * 2, *args[1:]))
    with pytest.raises(MoePruneError, match="unchanged"):
        capture(model, [tokens()], "cpu")
    handle.remove()
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)


@pytest.mark.parametrize("model_type", ["gemma4_text", "kolibri1_1", "glm_moe_dsa"])
def test_two_streams_advanced_from_one_capture(model_type):
    """The engine's original and pruned streams start from one captured kwargs list and part where a layer is
    pruned (here every weight of layer 0 scaled in a copy of the model): each equals its own model's forward, so
    what the layers hand each other is each stream's own. Gemma-4's and Kolibri-1.1's KV-shared layers read the
    keys and values an earlier layer wrote into one mapping in every layer's kwargs (shared, the stream advanced
    second overwrote them for both); GLM-MoE-DSA's top-k indices are carried in the kwargs list."""
    model = build(model_type) if model_type in FAMILIES else tiny_model_any(model_type)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        for p in changed.model.layers[0].parameters():
            p.mul_(1.5)
    ids = tokens()
    refs = {"original": reference(model, ids), "changed": reference(changed, ids)}
    assert max_error(refs["original"][1:], refs["changed"][1:]) > 1e-2          # the streams do part
    [captured] = capture(model, [ids], "cpu")
    streams = {"original": [captured], "changed": [captured]}
    for i in range(len(model.model.layers)):
        for name, m in (("original", model), ("changed", changed)):
            streams[name] = advance(m.model.layers[i], i, streams[name])
            assert (streams[name][0][0] - refs[name][i + 1]).abs().max().item() < 1e-5, (name, i)


def _inkling2():
    """Tiny Inkling-2 (sliding and full layers, blocks of two layers) with random attention-residual queries."""
    model = tiny_model_any("inkling2_text")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_input.query"):
                p.normal_(0.0, 1.0)
    return model


def test_block_states_are_stacked_from_each_streams_layer_inputs():
    """Inkling-2's forward builds each layer's block_states from the hidden states entering every block's first
    layer (0 and 2 here) and hands them, with the last output, to final_input before the final norm: capture leaves
    InputsOf placeholders (and the head's entry after the layers'), run_layer refuses one not yet filled, and two
    streams advanced from one capture (the original and a copy with layer 0 changed, as the engine's original and
    pruned streams part) each stack their own inputs: each equals its own model's forward, layer by layer and in
    the logits."""
    model = _inkling2()
    changed = copy.deepcopy(model)
    with torch.no_grad():
        for p in changed.model.layers[0].parameters():
            p.mul_(1.5)
    ids = tokens()
    [(hidden, kwargs_list)] = capture(model, [ids], "cpu")
    n = len(model.model.layers)
    assert [kw.get("block_states").layers if isinstance(kw.get("block_states"), InputsOf) else None
            for kw in kwargs_list] == [None, (0,), (0,), (0, 2), (0, 2)]
    assert kwargs_list[0]["block_states"].shape[-2] == 0              # layer 0: no block before it
    assert head_arguments(kwargs_list[:n], n) is None and len(kwargs_list) == n + 1
    with pytest.raises(MoePruneError, match="advance"):
        run_layer(model.model.layers[3], hidden, kwargs_list[3])
    streams = {"original": [(hidden, kwargs_list)], "changed": [(hidden, kwargs_list)]}
    for name, m in (("original", model), ("changed", changed)):
        with torch.no_grad():
            want = m(input_ids=ids, use_cache=False, output_hidden_states=True)
        for i, layer in enumerate(m.model.layers):
            streams[name] = advance(layer, i, streams[name])
            if i < n - 1:
                assert (streams[name][0][0] - want.hidden_states[i + 1]).abs().max().item() < 1e-5, (name, i)
        [(last, kw)] = streams[name]
        with torch.no_grad():
            logits = head_logits(m, last, head_arguments(kw, n))
        assert (logits - want.logits).abs().max().item() < 1e-4, name
    assert not kwargs_list[3]["block_states"].filled                    # the captured list is unchanged
    # the stacked inputs matter: the original's last layer given the changed stream's block_states differs
    own, other = streams["original"][0][1][3], streams["changed"][0][1][3]
    assert not torch.equal(own["block_states"].value(), other["block_states"].value())


def test_looped_layers_are_refused():
    """Inkling-2-Loop runs decoder layers 2-3 three times per forward, message_input feeding each later pass: the
    engine runs each layer once, so capture says what it found instead of running one pass."""
    model = tiny_model_any("inkling2_loop_text")
    with pytest.raises(MoePruneError, match=r"runs decoder layers 2-3 3 times .*message_input.*looped block"):
        capture(model, [tokens()], "cpu")
    assert all("forward" not in m.__dict__ for m in model.modules())        # every forward put back


def test_a_module_called_between_layers_is_refused():
    """A forward that calls a module of the language model between two decoder layers (here layer 2's pre-hook
    calling the final norm) computes more than the layers: refused, naming it."""
    model = build("gpt_oss")
    handle = model.model.layers[2].register_forward_pre_hook(lambda m, args: (model.model.norm(args[0]), *args[1:]))
    with pytest.raises(MoePruneError, match="calls norm between its decoder layers .after decoder layer 1"):
        capture(model, [tokens()], "cpu")
    handle.remove()
    assert all("forward" not in m.__dict__ for m in model.modules())
