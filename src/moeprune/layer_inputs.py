"""The inputs of every decoder layer, as the model's own forward passes them.

The per-layer engine runs decoder layers one after another on cached hidden states, so it needs, besides the
hidden states entering layer 0, the keyword arguments the model's forward gives each layer: the attention mask,
the position embeddings, and so on. They differ from layer to layer in models with more than one layer type:
GPT-OSS alternates sliding-window and full attention (`config.layer_types`), Llama-4 chunked attention and NoPE
layers, Qwen3-Next / MiniMax / Jamba / GraniteMoeHybrid / LFM2-MoE mix attention with linear-attention, mamba or
short-convolution layers that take another mask (or none). Layer 0's arguments are right only for layers of
layer 0's type.

`capture` runs the model's forward with every decoder layer's `forward` replaced by a recorder: it records its
arguments and hands its hidden-state input back unchanged, and the last one stops the forward by raising. Only the
embeddings and whatever the model computes before its first layer (rotary tables, masks) are used, so the decoder
layers, the final norm and lm_head may be on the meta device (how the streamed engine holds a checkpoint larger
than memory). The layers stay in place (only an instance attribute is set and removed again), so a model's
`isinstance` checks and attribute reads on them (`decoder_layer.layer_type`, `decoder_layer.self_attn....`)
still work. Arguments the model builds once and hands to several layers (one mask per layer type, the position
embeddings) are the same tensor objects in every layer's kwargs: nothing is copied per layer.

Two checks make a wrong capture an error rather than wrong numbers: every layer must receive exactly the tensor
the layer before it returned (a model that transforms the hidden states between its layers cannot be run layer by
layer from these inputs), and no argument may be built by the forward from earlier layers' outputs (found by
running the forward once more with every layer returning other values: Inkling-2's block_states, the stack of the
hidden states entering each block of its attention residuals, is refused). An argument the forward takes from the
previous layer's output (the sparse-attention top-k indices that GLM-MoE-DSA, GLM-5-Next and Hy-V4 hand from
layer to layer as prev_topk_indices) is captured as a FromPrevious placeholder, and `advance` fills it in from
that layer's output as it runs it, per batch and per stream (the pruned model's stream carries its own indices),
as the model's forward does.

Verified by tests/test_layer_inputs.py with transformers 5.25 (running the layers one after another with the
captured kwargs gives the hidden states of the model's own forward, float32, atol 1e-5, at a sequence longer than
the sliding window / attention chunk / linear-attention block, with the model's default attention and with eager;
and again with every module but the embeddings and rotary tables on the meta device):
    gpt_oss (sliding / full), llama4_text (chunked / full, NoPE), afmoe, cohere2_moe, exaone_moe, mimo_v2_flash,
    granitemoe_swa (sliding / full; granitemoe_swa also per-layer rope theta and NoPE), qwen3_next,
    qwen3_5_moe_text, minimax, kimi_linear, bailing_hybrid (linear / full attention), lara_mini (linear /
    sliding / full), jamba, granitemoehybrid, nemotron_h (mamba / attention / MoE / MLP blocks), lfm2_moe (short
    convolution / attention), gemma4_text (sliding / full, per-layer inputs, KV-shared layers), bamba (a dense
    hybrid whose layers return tuples), deepseek_v4 (sliding / heavily compressed / compressed sparse attention,
    hyper-connection streams [B, T, hc_mult, d]), and every hand-set tiny family (moeprune.tiny.TINY_FAMILIES).
Arguments that differ from batch to batch are recorded per batch: DeepSeek-V4's decoder layers take the batch's
input_ids (its hash layers choose experts by token id), and each batch's layers get its own.
gemma4's (and kolibri1_1's) KV-shared layers read the keys and values an earlier layer wrote into
`shared_kv_states`, a mapping in every layer's kwargs of one batch: run each batch's layers in order with
`advance`, which gives each stream its own copy of the mapping.
Carried from layer to layer (prev_topk_indices): glm_moe_dsa and hy_v4 (with "shared" indexer layers that reuse
the previous layer's top-k).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import MutableMapping

import torch
from torch import nn

from .arch import MoePruneError, decoder_layers

# arguments that hold or steer a generation cache: the engine runs each layer once over whole windows
CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past", "cache_params", "use_cache")

LayerInputs = tuple[torch.Tensor, list[dict]]   # per batch: (hidden states entering layer 0, kwargs of every layer)


class _Stop(Exception):
    """Raised by the last recorder: the forward has reached the last decoder layer."""


class FromPrevious:
    """What a recorder hands back beside the hidden states when the model unpacks a layer's output as a tuple.
    Found in decoder layer i+1's captured arguments, it stands for element `position` of layer i's output (e.g.
    the sparse-attention top-k indices GLM-MoE-DSA hands on as prev_topk_indices): `advance` puts that value in
    when it runs layer i, for each batch of each stream on its own."""

    def __init__(self, layer: int, position: int):
        self.layer, self.position = layer, position

    def __repr__(self) -> str:
        return f"<element {self.position} of decoder layer {self.layer}'s output>"


class _Recorder:
    """Stands in for one decoder layer's forward: records its inputs and returns the hidden states unchanged."""

    def __init__(self, layer: nn.Module, index: int, last: bool, as_tuple: bool, calls: list, shift: bool = False):
        self.signature = inspect.signature(type(layer).forward)
        self.index, self.last, self.as_tuple, self.calls = index, last, as_tuple, calls
        self.shift = shift          # return other values (hidden + 1): the probe of what depends on layer outputs

    def __call__(self, *args, **kwargs):
        bound = self.signature.bind(None, *args, **kwargs)      # None stands for self
        named = dict(bound.arguments)
        names = list(named)
        named.pop(names[0])                                        # self
        hidden_name = names[1]
        hidden = named.pop(hidden_name)
        extra = {}
        for name, p in self.signature.parameters.items():          # **kwargs are bound as one dict
            if p.kind is inspect.Parameter.VAR_KEYWORD and name in named:
                extra = named.pop(name)
        kwargs = {**named, **extra}
        self.calls.append((self.index, hidden, kwargs))
        if self.last:
            raise _Stop
        out = hidden + 1 if self.shift else hidden
        return (out, FromPrevious(self.index, 1)) if self.as_tuple else out


def _built_from_outputs(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, as_tuple: bool,
                        calls: list) -> list[tuple[int, str]]:
    """(layer, argument) for every tensor argument that the forward builds from earlier decoder layers' outputs
    (Inkling-2's block_states, a stack of the hidden states entering each block): the forward run again with
    every layer returning other values (its input + 1), an argument that changes with them."""
    probe = _record(model, layers, ids, as_tuple, shift=True)
    found = []
    for (i, _, kw), (j, _, other) in zip(calls, probe):
        for k, v in kw.items():
            w = other.get(k)
            if isinstance(v, torch.Tensor) and isinstance(w, torch.Tensor) \
                    and not (v.shape == w.shape and torch.equal(v, w)):
                found.append((i, k))
    return found


def _clean(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k not in CACHE_ARGS}


def _record(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor, as_tuple: bool,
            shift: bool = False) -> list:
    calls: list = []
    saved = []
    try:
        for i, layer in enumerate(layers):
            saved.append((layer, layer.__dict__.get("forward")))   # an accelerate hook sets an instance forward
            layer.forward = _Recorder(layer, i, i == len(layers) - 1, as_tuple, calls, shift)
        try:
            model(input_ids=input_ids, use_cache=False)
        except _Stop:
            pass
    finally:
        for layer, forward in saved:
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
    return calls


def _same(a, b: torch.Tensor) -> bool:
    """a is b, or a view of all of b's memory in b's layout (e.g. gemma4's hidden_states[:, -0:])."""
    return a is b or (isinstance(a, torch.Tensor) and a.shape == b.shape and a.stride() == b.stride()
                      and a.dtype == b.dtype and a.device == b.device and a.data_ptr() == b.data_ptr())


def _chained(calls: list, n: int) -> bool:
    """Whether the forward reached every layer, in order, each on the very tensor the one before received."""
    return [c[0] for c in calls] == list(range(n)) and all(_same(c[1], calls[0][1]) for c in calls)


@torch.no_grad()
def capture(model: nn.Module, batches: list[torch.Tensor], device) -> list[LayerInputs]:
    """For every batch of token ids [B, T]: (the hidden states entering decoder layer 0, [the keyword arguments
    the model's forward passes to decoder layer i, for every i]), with cache arguments dropped. Run the layers
    in order with `advance`. Only the embeddings and the modules the model uses
    before its first decoder layer need real weights; decoder layers, final norm and lm_head may be on meta."""
    layers = decoder_layers(model)
    n = len(layers)
    if n == 0:
        raise MoePruneError(f"{type(model).__name__} has no decoder layers")
    out: list[LayerInputs] = []
    as_tuple = None                     # how the model's forward reads a decoder layer's output, found on batch 0
    for batch in batches:
        ids = batch.to(device)
        if as_tuple is None:
            try:
                calls, as_tuple = _record(model, layers, ids, as_tuple=False), False
            except (ValueError, TypeError, IndexError) as e:   # e.g. unpacking a tensor of batch 1 as a tuple
                first_error, calls = e, []
            else:
                first_error = None
            if not _chained(calls, n):  # or `hidden_states, extra = decoder_layer(...)` split the batch axis
                try:
                    calls, as_tuple = _record(model, layers, ids, as_tuple=True), True
                except Exception:
                    if first_error is not None:
                        raise first_error from None
                    # the tensor was handed on, but not unchanged: said below, with the layers it reached
                    as_tuple = False
        else:
            calls = _record(model, layers, ids, as_tuple)
        if not _chained(calls, n):
            raise MoePruneError(
                f"{type(model).__name__}'s forward does not hand each decoder layer the previous layer's output "
                f"unchanged (layers reached: {[c[0] for c in calls]} of {n}); it cannot be run one layer at a time")
        if not out:
            built = _built_from_outputs(model, layers, ids, as_tuple, calls)
            if built:
                i, k = built[0]
                raise MoePruneError(
                    f"{type(model).__name__}'s forward builds decoder layer {i}'s argument {k} from earlier layers' "
                    "outputs (not handed on as a layer's output); it cannot be run one layer at a time")
        kwargs = [_clean(c[2]) for c in calls]
        for i, kw in enumerate(kwargs):
            for k, v in kw.items():
                if isinstance(v, FromPrevious) and v.layer != i - 1:
                    raise MoePruneError(
                        f"{type(model).__name__}'s decoder layer {i} takes {k} from the output of decoder layer "
                        f"{v.layer}, not the one before it; it cannot be run one layer at a time")
        out.append((calls[0][1], kwargs))
    return out


def run_layer(decoder_layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder layer on hidden states [B, T, d] with its captured kwargs: its output hidden states
    (the first element when the layer returns a tuple). Run it under torch.no_grad() for calibration."""
    out = _run(decoder_layer, hidden, kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _run(decoder_layer: nn.Module, hidden: torch.Tensor, kwargs: dict):
    carried = [k for k, v in kwargs.items() if isinstance(v, FromPrevious)]
    if carried:
        raise MoePruneError(f"decoder layer {type(decoder_layer).__name__} takes {', '.join(carried)} from the "
                            "previous layer's output: run the layers in order with advance()")
    return decoder_layer(hidden, **kwargs)


def _handed_on(out, kwargs: list[dict], index: int) -> list[dict]:
    """The kwargs list with layer index+1's FromPrevious arguments replaced by layer `index`'s output `out`: a
    new list and a new dict for that layer (another stream may hold the same list, with its own values to come)."""
    if index + 1 >= len(kwargs):
        return kwargs
    wanted = {k: v.position for k, v in kwargs[index + 1].items() if isinstance(v, FromPrevious)}
    if not wanted:
        return kwargs
    if not isinstance(out, (tuple, list)) or max(wanted.values()) >= len(out):
        raise MoePruneError(f"decoder layer {index} returned no element {max(wanted.values())} to hand on to the "
                            f"next layer as {', '.join(wanted)}")
    return [*kwargs[:index + 1], {**kwargs[index + 1], **{k: out[p] for k, p in wanted.items()}}, *kwargs[index + 2:]]


def _own_mappings(kwargs: list[dict], index: int) -> list[dict]:
    """The kwargs list with every mapping the layers share (the KV-sharing dict that one layer writes and a later
    one reads: Gemma-4, Kolibri-1.1) copied from layer `index` on: two streams advanced from one list (the
    original's and the pruned model's) then never read each other's keys and values."""
    shared = {id(v): v for kw in kwargs[index:] for v in kw.values() if isinstance(v, MutableMapping)}
    if not shared:
        return kwargs
    copies = {i: copy.copy(v) for i, v in shared.items()}
    return [*kwargs[:index], *({k: copies.get(id(v), v) for k, v in kw.items()} for kw in kwargs[index:])]


@torch.no_grad()
def advance(decoder_layer: nn.Module, index: int, batches: list[LayerInputs]) -> list[LayerInputs]:
    """Decoder layer `index` run on every cached batch: [(its output hidden states, the kwargs list)], where the
    next layer's arguments that the model's forward takes from this layer's output (FromPrevious) now hold it,
    and the mappings the layers share (KV sharing) are this stream's own."""
    done = []
    for hidden, kwargs in batches:
        kwargs = _own_mappings(kwargs, index)
        out = _run(decoder_layer, hidden, kwargs[index])
        done.append((out[0] if isinstance(out, (tuple, list)) else out, _handed_on(out, kwargs, index)))
    return done
