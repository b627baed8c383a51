"""The inputs of every decoder layer, as the model's own forward passes them.

The per-layer engine runs decoder layers one after another on cached hidden states, so it needs, besides the
hidden states entering layer 0, the keyword arguments the model's forward gives each layer: the attention mask,
the position embeddings, and so on. They differ from layer to layer in models with more than one layer type:
GPT-OSS alternates sliding-window and full attention (`config.layer_types`), Llama-4 chunked attention and NoPE
layers, Qwen3-Next / MiniMax / Jamba / GraniteMoeHybrid / LFM2-MoE mix attention with linear-attention, mamba or
short-convolution layers that take another mask (or none). Layer 0's arguments are right only for layers of
layer 0's type.

`capture` runs the model's forward with every decoder layer's `forward` replaced by a recorder: it records its
arguments and hands its hidden-state input back unchanged; the forward is stopped by raising when it calls its
first head module (arch.head_modules: final_input, hc_head or the final norm) after the last layer, whose call is
recorded too (or at the last layer when no final norm is found). Every other module of the language model is
guarded: itself before the first layer (embeddings, rotary tables, masks), after it recorded as called between the
layers and answered by its first argument. Only the embeddings and whatever the model computes before its first
layer are used, so the decoder layers, the final norm and lm_head may be on the meta device (how the streamed
engine holds a checkpoint larger than memory). The layers stay in place (only an instance attribute is set and
removed again), so a model's `isinstance` checks and attribute reads on them (`decoder_layer.layer_type`,
`decoder_layer.self_attn....`) still work. Arguments the model builds once and hands to several layers (one mask
per layer type, the position embeddings) are the same tensor objects in every layer's kwargs: nothing is copied
per layer.

Three checks make a wrong capture an error rather than wrong numbers: every layer must receive exactly the tensor
the layer before it returned (a model that transforms the hidden states between its layers cannot be run layer by
layer from these inputs); the forward must call each layer once, and no other module between them (Inkling-2-Loop
runs a block of layers several times, message_input between the passes: refused, saying so); and no argument may
be built by the forward from earlier layers' outputs, unless it is a stack of the hidden states entering earlier
layers (found by running the forward once more with every layer returning other values, its input + 1, so every
layer's input differs). Such a stack (Inkling-2's block_states: the input of each block's first layer, which the
later layers' attention residuals attend over) is captured as an InputsOf placeholder, and `advance` puts each
layer's input into the placeholders that stack it, per batch and per stream; where the forward hands its first
head module such a stack beside the last output (Inkling-2's final_input(block_states, hidden)), that call's
arguments are one more entry after the layers' (head_arguments), which the logits use (sources.head_logits). An
argument the forward takes from the previous layer's output (the sparse-attention top-k indices that GLM-MoE-DSA,
GLM-5-Next and Hy-V4 hand from layer to layer as prev_topk_indices) is captured as a FromPrevious placeholder, and
`advance` fills it in from that layer's output as it runs it, per batch and per stream (the pruned model's stream
carries its own indices), as the model's forward does.

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
the previous layer's top-k). Stacked from earlier layers' inputs (block_states), and handed to final_input before
the norm: inkling2_text, inkling2 (tests/test_layer_inputs.py, tests/test_engine_layers.py).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import MutableMapping

import torch
from torch import nn

from .arch import MoePruneError, decoder_layers, head_modules, text_model

# arguments that hold or steer a generation cache: the engine runs each layer once over whole windows
CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past", "cache_params", "use_cache")

LayerInputs = tuple[torch.Tensor, list[dict]]   # per batch: (hidden states entering layer 0, kwargs of every layer
                                                # [, the head's arguments: head_arguments])
# keys of the head's entry (the kwargs list's entry after the last layer's): the attribute of the language model the
# forward calls first after its last decoder layer, and the name under which that module takes the hidden states
HEAD_MODULE, HEAD_HIDDEN = "__module__", "__hidden__"


class _Stop(Exception):
    """Raised when the forward has reached the last decoder layer, or the head after it."""


class FromPrevious:
    """What a recorder hands back beside the hidden states when the model unpacks a layer's output as a tuple.
    Found in decoder layer i+1's captured arguments, it stands for element `position` of layer i's output (e.g.
    the sparse-attention top-k indices GLM-MoE-DSA hands on as prev_topk_indices): `advance` puts that value in
    when it runs layer i, for each batch of each stream on its own."""

    def __init__(self, layer: int, position: int):
        self.layer, self.position = layer, position

    def __repr__(self) -> str:
        return f"<element {self.position} of decoder layer {self.layer}'s output>"


class InputsOf:
    """An argument the forward builds from the hidden states entering earlier decoder layers, stacked on axis -2:
    Inkling-2's block_states (the input of each attention-residual block's first layer, which later layers and the
    final_input before the norm attend over). `advance` fills in layer j's input as it runs layer j, per batch and
    per stream (a new placeholder each time: two streams advanced from one kwargs list hold their own)."""

    def __init__(self, layers: tuple[int, ...], filled: dict[int, torch.Tensor] | None = None):
        self.layers, self.filled = tuple(layers), filled or {}

    def with_input(self, layer: int, hidden: torch.Tensor) -> InputsOf:
        return InputsOf(self.layers, {**self.filled, layer: hidden})

    def value(self) -> torch.Tensor:
        missing = [j for j in self.layers if j not in self.filled]
        if missing:
            raise MoePruneError(f"{self!r} misses the input of decoder layer {missing[0]}: run the layers in order "
                                "with advance()")
        return torch.stack([self.filled[j] for j in self.layers], dim=-2)

    def __repr__(self) -> str:
        return f"<the hidden states entering decoder layers {list(self.layers)}, stacked on axis -2>"


class _Probe:
    """What one forward with recorders shows: every decoder-layer call (index, hidden states, kwargs) in order, the
    first head module's call after the last layer (its name, bound arguments), and any other module of the language
    model the forward calls after its first decoder layer (the last layer called before it, its name)."""

    def __init__(self):
        self.calls: list = []
        self.head: tuple[str, dict] | None = None
        self.between: list[tuple[int, str]] = []
        self.reached_last = False


class _Recorder:
    """Stands in for one decoder layer's forward: records its inputs and returns the hidden states unchanged."""

    def __init__(self, layer: nn.Module, index: int, last: bool, as_tuple: bool, probe: _Probe, shift: bool = False,
                 stop: bool = True):
        self.signature = inspect.signature(type(layer).forward)
        self.index, self.last, self.as_tuple, self.probe = index, last, as_tuple, probe
        self.shift = shift          # return other values (hidden + 1): the probe of what depends on layer outputs
        self.stop = stop            # the last one stops the forward (else the head's guard does)

    def __call__(self, *args, **kwargs):
        kwargs = _bound(self.signature, args, kwargs)
        hidden = kwargs.pop(next(iter(kwargs)))
        self.probe.calls.append((self.index, hidden, kwargs))
        if self.last:
            if self.stop:
                raise _Stop
            self.probe.reached_last = True
        out = hidden + 1 if self.shift else hidden
        return (out, FromPrevious(self.index, 1)) if self.as_tuple else out


def _bound(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """A call's arguments by name (self left out, **kwargs spread), in the signature's order."""
    bound = signature.bind(None, *args, **kwargs)      # None stands for self
    named = dict(bound.arguments)
    named.pop(next(iter(named)))
    extra = {}
    for name, p in signature.parameters.items():          # **kwargs are bound as one dict
        if p.kind is inspect.Parameter.VAR_KEYWORD and name in named:
            extra = named.pop(name)
    return {**named, **extra}


class _Guard:
    """Stands in for the forward of a module of the language model outside its decoder layers: the module itself
    until the first decoder layer is called (embeddings, rotary tables, masks); after it, the first head module
    (arch.head_modules) reached after the last layer records its call and stops the forward, and any other module
    is recorded as called between the layers and answered by its first tensor argument, so the probe follows the
    forward on to the layers it calls next (a looped block) without running a module that may be on meta."""

    def __init__(self, module: nn.Module, name: str, forward, head: bool, probe: _Probe):
        self.module, self.name, self.forward, self.head, self.probe = module, name, forward, head, probe

    def __call__(self, *args, **kwargs):
        probe = self.probe
        if not probe.calls:
            return self.forward(*args, **kwargs)
        if self.head and probe.reached_last:
            probe.head = (self.name, _bound(inspect.signature(type(self.module).forward), args, kwargs))
            raise _Stop
        probe.between.append((probe.calls[-1][0], self.name))
        return next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))


def _clean(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k not in CACHE_ARGS}


def _record(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor, as_tuple: bool,
            shift: bool = False) -> _Probe:
    probe = _Probe()
    try:
        heads = {id(m) for m in head_modules(model)}
    except MoePruneError:       # no final norm found: stop at the last layer (the logits are refused later)
        heads = set()
    inside = {id(m) for layer in layers for m in layer.modules()} | {id(layers)}
    base = text_model(model)
    others = [(name, m) for name, m in base.named_modules() if name and id(m) not in inside]
    seen = {id(m) for _, m in others}                   # lm_head lies outside the base model
    others += [(name, m) for name, m in model.named_modules() if id(m) in heads and id(m) not in seen]
    saved = []
    try:
        for i, layer in enumerate(layers):
            saved.append((layer, layer.__dict__.get("forward")))   # an accelerate hook sets an instance forward
            layer.forward = _Recorder(layer, i, i == len(layers) - 1, as_tuple, probe, shift, stop=not heads)
        for name, m in others:
            saved.append((m, m.__dict__.get("forward")))
            m.forward = _Guard(m, name, m.forward, id(m) in heads, probe)
        try:
            model(input_ids=input_ids, use_cache=False)
        except _Stop:
            pass
        except Exception:
            if not probe.between:   # a module answered by its first argument led the forward astray: said below
                raise
    finally:
        for module, forward in saved:
            if forward is None:
                del module.forward
            else:
                module.forward = forward
    return probe


def _refuse_between(model: nn.Module, probe: _Probe) -> None:
    """A forward that calls decoder layers more than once (a looped block) or other modules between them cannot be
    run one layer at a time: said with what was found."""
    order = [c[0] for c in probe.calls]
    again = sorted({i for k, i in enumerate(order) if i in order[:k]})
    names = ", ".join(dict.fromkeys(name for _, name in probe.between))
    what = type(model).__name__
    if again:
        runs = max(order.count(i) for i in again)
        fed = f", {names} called between the runs" if names else ""
        raise MoePruneError(
            f"{what}'s forward runs decoder layers {again[0]}-{again[-1]} {runs} times (again after decoder layer "
            f"{order[order.index(again[0], order.index(again[0]) + 1) - 1]}{fed}): a looped block; moeprune runs each "
            "decoder layer once, in order, and its statistics and plan would see one pass of them")
    if probe.between:
        after, name = probe.between[0]
        raise MoePruneError(f"{what}'s forward calls {name} between its decoder layers (after decoder layer {after}): "
                            "it computes more than the layers and the head, and cannot be run one layer at a time")


def _stack_of(value, inputs: list[torch.Tensor]) -> tuple[int, ...] | None:
    """The decoder layers whose inputs `value` stacks on axis -2 (Inkling-2's block_states), from the shifted probe
    (every layer's input differs there: layer j's is the embeddings + j); None when it is not such a stack."""
    h = inputs[0]
    if not isinstance(value, torch.Tensor) or value.dim() != h.dim() + 1 or value.shape[-2] == 0 \
            or value.shape[:-2] != h.shape[:-1] or value.shape[-1] != h.shape[-1]:
        return None
    layers = []
    for s in range(value.shape[-2]):
        part = value[..., s, :]
        j = next((j for j, x in enumerate(inputs) if x.dtype == part.dtype and torch.equal(part, x)), None)
        if j is None:
            return None
        layers.append(j)
    return tuple(layers)


def _carried(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, as_tuple: bool, probe: _Probe):
    """({(layer, argument): InputsOf} for the arguments the forward builds from the hidden states entering earlier
    layers, the head's entry or None): the forward run again with every layer returning other values (its input
    + 1). An argument that changes with them and is not such a stack is refused (it cannot be run from captured
    inputs)."""
    shifted = _record(model, layers, ids, as_tuple, shift=True)
    inputs = [c[1] for c in shifted.calls]
    what = type(model).__name__
    found: dict[tuple[int, str], InputsOf] = {}

    def classify(where: str, i: int, kw: dict, other: dict, before: int) -> None:
        for k, v in kw.items():
            w = other.get(k)
            stack = _stack_of(w, inputs)
            if stack is not None and max(stack) < before:
                found[(i, k)] = InputsOf(stack)
            elif isinstance(v, torch.Tensor) and isinstance(w, torch.Tensor) \
                    and not (v.shape == w.shape and torch.equal(v, w)):
                raise MoePruneError(f"{what}'s forward builds {where} argument {k} from earlier layers' outputs (not "
                                    "handed on as a layer's output); it cannot be run one layer at a time")

    for (i, _, kw), (_, _, other) in zip(probe.calls, shifted.calls):
        classify(f"decoder layer {i}'s", i, kw, other, i)
    head = None
    if probe.head is not None and shifted.head is not None:
        (name, kw), (_, other) = probe.head, shifted.head
        last = probe.calls[-1][1]                   # the last layer's output: its input, handed back
        hidden = next((k for k, v in kw.items() if isinstance(v, torch.Tensor) and _same(v, last)), None)
        rest = {k: v for k, v in kw.items() if k != hidden}
        classify(f"its {name}'s (after the last decoder layer)", len(layers), rest, other, len(layers))
        stacks = {k: v for (i, k), v in found.items() if i == len(layers)}
        if stacks and hidden is None:
            raise MoePruneError(f"{what}'s forward does not hand its {name} (after the last decoder layer) the last "
                                "layer's output unchanged; it cannot be run one layer at a time")
        if stacks:
            head = {HEAD_MODULE: name, HEAD_HIDDEN: hidden, **_clean(rest), **stacks}
    return {key: v for key, v in found.items() if key[0] < len(layers)}, head


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
    the model's forward passes to decoder layer i, for every i]), with cache arguments dropped; where the forward
    hands its first head module more than the last layer's output (Inkling-2's final_input and its block_states),
    that module's arguments follow as one more entry (head_arguments). Run the layers in order with `advance`. Only
    the embeddings and the modules the model uses before its first decoder layer need real weights; decoder layers,
    final norm and lm_head may be on meta."""
    layers = decoder_layers(model)
    n = len(layers)
    if n == 0:
        raise MoePruneError(f"{type(model).__name__} has no decoder layers")
    out: list[LayerInputs] = []
    as_tuple = None                     # how the model's forward reads a decoder layer's output, found on batch 0
    carried, head = None, None          # what the forward builds from earlier layers' inputs, found on batch 0
    for batch in batches:
        ids = batch.to(device)
        if as_tuple is None:
            try:
                probe, as_tuple = _record(model, layers, ids, as_tuple=False), False
            except (ValueError, TypeError, IndexError) as e:   # e.g. unpacking a tensor of batch 1 as a tuple
                first_error, probe = e, _Probe()
            else:
                first_error = None
            if not _chained(probe.calls, n) and not probe.between:
                # or `hidden_states, extra = decoder_layer(...)` split the batch axis
                try:
                    probe, as_tuple = _record(model, layers, ids, as_tuple=True), True
                except Exception:
                    if first_error is not None:
                        raise first_error from None
                    # the tensor was handed on, but not unchanged: said below, with the layers it reached
                    as_tuple = False
        else:
            probe = _record(model, layers, ids, as_tuple)
        _refuse_between(model, probe)
        calls = probe.calls
        if not _chained(calls, n):
            raise MoePruneError(
                f"{type(model).__name__}'s forward does not hand each decoder layer the previous layer's output "
                f"unchanged (layers reached: {[c[0] for c in calls]} of {n}); it cannot be run one layer at a time")
        if carried is None:
            carried, head = _carried(model, layers, ids, as_tuple, probe)
        kwargs = [_clean(c[2]) for c in calls]
        for (i, k), placeholder in carried.items():
            kwargs[i][k] = placeholder
        for i, kw in enumerate(kwargs):
            for k, v in kw.items():
                if isinstance(v, FromPrevious) and v.layer != i - 1:
                    raise MoePruneError(
                        f"{type(model).__name__}'s decoder layer {i} takes {k} from the output of decoder layer "
                        f"{v.layer}, not the one before it; it cannot be run one layer at a time")
        if head is not None:
            kwargs.append(dict(head))
        out.append((calls[0][1], kwargs))
    return out


def head_arguments(kwargs: list[dict], n: int) -> dict | None:
    """The arguments of the head module a stream's kwargs list carries after its n layers' (the module's name under
    HEAD_MODULE, its hidden-state argument's name under HEAD_HIDDEN, every other argument resolved), or None when
    the forward hands its head the last layer's output alone."""
    if len(kwargs) <= n:
        return None
    return {k: v.value() if isinstance(v, InputsOf) else v for k, v in kwargs[n].items()}


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
    return decoder_layer(hidden, **{k: v.value() if isinstance(v, InputsOf) else v for k, v in kwargs.items()})


def _with_input(kwargs: list[dict], index: int, hidden: torch.Tensor) -> list[dict]:
    """The kwargs list with layer `index`'s input `hidden` put into every later entry's InputsOf that stacks it: new
    dicts for those entries (another stream may hold the same list, with its own inputs to come)."""
    later = [m for m in range(index + 1, len(kwargs))
             if any(isinstance(v, InputsOf) and index in v.layers for v in kwargs[m].values())]
    if not later:
        return kwargs
    out = list(kwargs)
    for m in later:
        out[m] = {k: v.with_input(index, hidden) if isinstance(v, InputsOf) and index in v.layers else v
                  for k, v in kwargs[m].items()}
    return out


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
    next layer's arguments that the model's forward takes from this layer's output (FromPrevious) now hold it, the
    later arguments stacked from layer inputs (InputsOf) hold this layer's input, and the mappings the layers share
    (KV sharing) are this stream's own."""
    done = []
    for hidden, kwargs in batches:
        kwargs = _with_input(_own_mappings(kwargs, index), index, hidden)
        out = _run(decoder_layer, hidden, kwargs[index])
        done.append((out[0] if isinstance(out, (tuple, list)) else out, _handed_on(out, kwargs, index)))
    return done
