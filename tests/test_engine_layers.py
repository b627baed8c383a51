"""The engine runs every decoder layer with that layer's own inputs: its hidden states equal the model's own
forward, layer by layer, at a sequence longer than GPT-OSS's sliding window (layer 0's mask given to every
layer, the old behaviour, made the full-attention layers see only the window)."""

from __future__ import annotations

import math

import pytest
import torch

from moeprune.engine import LayerWork, Step, run, score
from moeprune.sources import CheckpointSource, ModelSource
from moeprune.steps import Evaluate
from moeprune.tiny import tiny_model, tiny_model_any

import test_layer_inputs                 # tiny configs that keep every layer type of a hybrid family

WINDOW, T = 8, 40


class Record(Step):
    """After Evaluate: the evaluation stream's hidden states as each layer left them."""
    name = "record"

    def __init__(self, evaluate: Evaluate):
        self.ev, self.hidden = evaluate, []

    def layer(self, work: LayerWork) -> None:
        self.hidden.append(torch.cat([h for h, _ in self.ev.before]))


def assert_engine_matches(source, ids: torch.Tensor, want, rows: int | None = None) -> None:
    """The engine's stream after each decoder layer equals the model's own output_hidden_states, and its logits
    the model's. hidden_states[i + 1] is layer i's output for every layer but the last (after the final norm).
    `rows`: the engine's batches hold that many of ids' rows (default: one batch)."""
    ev = Evaluate(list(ids.split(rows or ids.shape[0])))
    record = Record(ev)
    run(source, [ev, record], progress=False)
    for i, h in enumerate(record.hidden[:-1]):
        assert torch.allclose(h, want.hidden_states[i + 1], atol=1e-5), f"layer {i}"
    got = []
    score(source, [(ev.before, lambda k, logits: got.append(logits))])
    assert torch.allclose(torch.cat(got), want.logits, atol=1e-4)


def source_of(model, tmp_path, streamed: bool):
    """The engine's source of `model`: itself in memory, or its folder read layer by layer (eager attention, so the
    masks decide everything)."""
    if not streamed:
        return ModelSource(model)
    model.save_pretrained(tmp_path / "m")
    source = CheckpointSource(tmp_path / "m", "cpu", torch.float32)
    source.model.config._attn_implementation = "eager"
    return source


def own_forward(model, ids: torch.Tensor):
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True, use_cache=False)


def gpt_oss():
    model = tiny_model("gpt_oss", num_hidden_layers=4, sliding_window=WINDOW,
                       layer_types=["sliding_attention", "full_attention"] * 2)
    model.config._attn_implementation = "eager"          # the mask decides everything: no kernel shortcut
    return model


@pytest.mark.parametrize("streamed", [False, True])
def test_engine_hidden_states_equal_the_models_own_forward(tmp_path, streamed):
    model = gpt_oss()
    ids = torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
    assert_engine_matches(source_of(model, tmp_path, streamed), ids, own_forward(model, ids))


def test_full_attention_layers_see_past_the_window():
    """The check above can fail: the full-attention layers' outputs depend on tokens outside the window."""
    model = gpt_oss()
    ids = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % model.config.vocab_size          # a token far outside the last window
    with torch.no_grad():
        a = model(input_ids=ids, use_cache=False).logits[0, -1]
        b = model(input_ids=changed, use_cache=False).logits[0, -1]
    assert not torch.allclose(a, b, atol=1e-6) and math.isfinite(float(a.sum()))


@pytest.mark.parametrize("model_type,extra", [("qwen3_next", {}), ("jamba", {}), ("minimax", {}),
                                              ("granitemoehybrid", {"logits_scaling": 4.0}), ("cohere2_moe", {})])
def test_streamed_hybrid_families_equal_their_own_forward(model_type, extra, tmp_path):
    """Families found by structure with more than one layer type (linear attention, mamba, sliding windows),
    streamed from a folder under eager attention at a sequence longer than their window or block; the logits
    as the model's forward scales them (Cohere's logit_scale, Granite's logits_scaling)."""
    model = test_layer_inputs.build(model_type, attn="eager", **extra)
    ids = test_layer_inputs.tokens()
    assert_engine_matches(source_of(model, tmp_path, streamed=True), ids, own_forward(model, ids))


@pytest.mark.parametrize("streamed", [False, True], ids=["memory", "streamed"])
@pytest.mark.parametrize("model_type", ["glm_moe_dsa", "hy_v4"])
def test_top_k_indices_handed_from_layer_to_layer(model_type, streamed, tmp_path):
    """GLM-MoE-DSA and Hy-V4: each decoder layer hands its sparse-attention top-k indices to the next
    (prev_topk_indices), which the "shared" layers attend with; the engine carries them per stream, in memory and
    streamed, at 40 tokens against a top-k of 8. Hy-V4's logits go through its hyper-connection head (hc_head)
    before the final norm, read from the folder when streamed."""
    model = test_layer_inputs.build(model_type, attn="eager")
    assert "shared" in model.config.indexer_types and model.config.index_topk < test_layer_inputs.SEQ
    ids = test_layer_inputs.tokens()
    assert_engine_matches(source_of(model, tmp_path, streamed), ids, own_forward(model, ids))


def test_streamed_rotary_scale_is_read(tmp_path):
    """Mistral-Large-4 learns a scale of its rotary frequencies (rotary_emb.alpha, a parameter outside the decoder
    layers that the forward uses before the first one): the streamed engine reads it from the folder; left on the
    meta device, the embedding step failed."""
    model = tiny_model_any("mistral_large4")
    with torch.no_grad():
        model.model.language_model.rotary_emb.alpha.normal_(0.0, 0.5)        # not its zero init: it must be read
    ids = torch.randint(3, 200, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    model.save_pretrained(tmp_path / "m")
    source = CheckpointSource(tmp_path / "m", "cpu", torch.float32)
    assert source.model.model.language_model.rotary_emb.alpha.is_meta
    assert_engine_matches(source, ids, want)
    assert source.model.model.language_model.rotary_emb.alpha.is_meta        # released again


@pytest.mark.parametrize("model_type", ["muse_spark", "llama4", "kolibri1_1", "afmoe", "minimax_m2", "longcat_flash",
                                        "dbrx"])
def test_streamed_engine_equals_the_forward_of_newer_families(model_type, tmp_path):
    """Families pruned since the router/experts hooks and the head run through the model's own forward: Muse Spark
    (experts on a projected input; logits times output_multiplier under a tanh cap), Llama 4's wrapper (its forward
    calls a causal LM), Kolibri-1.1 (indexed attention sharing keys and values), AFMoE and MiniMax-M2 (routers
    handed the block's correction bias), LongCat-Flash (two attention and two dense MLP sublayers per decoder layer
    beside a shortcut MoE whose router also scores identity experts), DBRX (transformer.blocks, experts folded
    [E * I, H], the block choosing the experts): layer by layer and in the logits, in memory and streamed."""
    model = tiny_model_any(model_type)
    model.config._attn_implementation = "eager"
    ids = torch.randint(3, 200, (2, T), generator=torch.Generator().manual_seed(0))
    want = own_forward(model, ids)
    for streamed in (False, True):
        assert_engine_matches(source_of(model, tmp_path, streamed), ids, want)


@pytest.mark.parametrize("streamed", [False, True], ids=["memory", "streamed"])
def test_deepseek_v4_engine_equals_its_forward(streamed, tmp_path):
    """DeepSeek-V4: sliding, heavily compressed and compressed sparse attention (windows of 8, compressed every 8 / 4
    tokens, indexer top-k 4) at 40 tokens; hyper-connection streams [B, T, 4, d] between layers and the hc_head
    before the final norm; hash layers that choose experts by token id, each of the engine's two batches run with
    its own input_ids. Layer by layer and in the logits, in memory and streamed from a folder."""
    model = test_layer_inputs.build("deepseek_v4", attn="eager")
    config = model.config
    assert T > max(config.sliding_window, *config.compress_rates.values()) and "hash_moe" in config.mlp_layer_types
    ids = test_layer_inputs.tokens()
    want = own_forward(model, ids)
    source = source_of(model, tmp_path, streamed)
    if streamed:
        skeleton = source.model.model.layers[0].mlp.gate.tid2eid               # read from the folder with its layer
        assert not torch.equal(skeleton, model.model.layers[0].mlp.gate.tid2eid)
    assert_engine_matches(source, ids, want, rows=1)


def _inkling2(model_type: str):
    """A tiny Inkling-2 with sliding and full-attention layers, two attention-residual blocks of two layers, and its
    residual queries random (they are built as zeros: every block state weighed the same)."""
    model = tiny_model_any(model_type)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_input.query"):
                p.normal_(0.0, 1.0)
    return model


@pytest.mark.parametrize("model_type", ["inkling2_text", "inkling2"])
def test_inkling2_block_states_are_carried_per_stream(model_type, tmp_path):
    """Inkling-2's attention residuals: each decoder layer attends over block_states, the hidden states entering
    every earlier block's first layer, and final_input attends over them all before the final norm. The engine
    carries them per stream (layer_inputs.InputsOf) and hands them to final_input in the logits: layer by layer and
    in the logits at 40 tokens against a window of 16, sliding and full layers, in memory and streamed (the
    multimodal wrapper too)."""
    model = _inkling2(model_type)
    config = model.config.get_text_config()
    assert {"hybrid", "hybrid_sliding"} <= set(config.layer_types) and config.sliding_window < T
    assert config.n_layers_per_attn_res_block < config.num_hidden_layers
    ids = torch.randint(3, 200, (2, T), generator=torch.Generator().manual_seed(0))
    want = own_forward(model, ids)
    for streamed in (False, True):
        assert_engine_matches(source_of(model, tmp_path, streamed), ids, want, rows=1)
    # the block states matter: zeroing final_input's query (every block state weighed the same) moves the logits
    base = model.model.language_model if model_type == "inkling2" else model.model
    with torch.no_grad():
        base.final_input.query.zero_()
        assert not torch.allclose(model(input_ids=ids, use_cache=False).logits, want.logits, atol=1e-3)
