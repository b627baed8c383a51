"""Where the decoder layers come from: a model in memory, or a checkpoint folder read one layer at a time.

    source = ModelSource(model) | CheckpointSource(folder, device, dtype)
    batches = source.embed(token batches)       # hidden states entering decoder layer 0, with its kwargs
    layer = source.layer(i); ...; source.release(i)
    logits = source.logits(hidden, kwargs); source.release_head()

The engine (moeprune.engine) sees only this interface, so the in-memory API and a checkpoint larger than
memory run the same loop.
"""

from __future__ import annotations

import ctypes
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast

from .arch import Layout, MoePruneError, decoder_layers, head_modules, moe_layout, text_model
from .checkpoint import (CONFIG_ERRORS, torch_dtype, build_skeleton, check_weights, compute_dtype, load,
                         load_config, load_tokenizer, resolve, resolve_device)
from .layer_inputs import HEAD_HIDDEN, HEAD_MODULE, LayerInputs, capture, head_arguments
from .hub import check_shapes
from .hubmap import HubMap
from .preflight import check_finite
from .quant import ExpertIndex, plain_config, scheme_of
from .shards import Checkpoint


def _return_memory() -> None:
    """Hand a freed layer's memory back to the system: glibc keeps freed heap pages (the per-expert reads fall
    under its mmap threshold) unless asked, and the next layer would then come on top of them. (A layer is
    freed by reference counting; no garbage collection pass is needed.)"""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):       # not glibc (musl): nothing to trim
            pass


def unload(module: nn.Module) -> None:
    """`module`'s parameters and persistent buffers (what CheckpointSource.materialise reads) back on the meta
    device; the buffers the model computed when it was built (rotary tables), which no checkpoint holds, stay."""
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None and not p.is_meta:
                m._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None and not b.is_meta and name not in m._non_persistent_buffers_set:
                m._buffers[name] = b.to("meta")


class _DecoderOutput(BaseModelOutputWithPast):
    """The decoder's output as a causal LM's forward reads it; any other field it asks for is None."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return None


def head_logits(model: nn.Module, hidden: torch.Tensor, head: dict | None = None) -> torch.Tensor:
    """Logits from the last decoder layer's output, computed by the causal LM's own forward with its decoder
    answered by `hidden` after the final norm: whatever the forward does to lm_head's output (Cohere's
    logit_scale, Granite's logits_scaling, Muse Spark's output_multiplier before a tanh cap, Gemma's softcapping)
    is done by transformers' code, not copied here. `head`: the stream's arguments of the first head module where
    the forward hands it more than the hidden states (layer_inputs.head_arguments: Inkling-2's final_input takes
    the block_states; its output's first element, cast to the hidden states' dtype after the norm as the forward
    casts it, goes on)."""
    *before, lm_head = head_modules(model)
    base, dtype = text_model(model), hidden.dtype
    for module in before:
        if head is not None and module is getattr(base, head[HEAD_MODULE]):
            args = {k: v for k, v in head.items() if k not in (HEAD_MODULE, HEAD_HIDDEN)}
            out = module(**{head[HEAD_HIDDEN]: hidden, **args})
            hidden = out[0] if isinstance(out, (tuple, list)) else out
        else:
            hidden = module(hidden)
    if head is not None:
        hidden = hidden.to(dtype)
    inner = getattr(model, "model", None) or text_model(model)   # what the forward calls first (Llama 4's wrapper
                                                                 # calls its causal LM, whose decoder this is)
    inner.forward = lambda *args, **kwargs: _DecoderOutput(last_hidden_state=hidden)
    try:
        ids = torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        return model(input_ids=ids, use_cache=False).logits
    finally:
        del inner.forward


class ModelSource:
    """A model that is already in memory: tiny models, hub ids, the in-memory API."""

    def __init__(self, model: nn.Module, layout: Layout | None = None, save_dtype: torch.dtype | None = None):
        self.model = model
        self.layout = layout or moe_layout(model)
        self.device = next(model.parameters()).device
        self.save_dtype = save_dtype                  # the dtype a saved checkpoint is written in

    def layer(self, i: int) -> nn.Module:
        return decoder_layers(self.model)[i]

    def release(self, i: int) -> None:
        pass

    def embed(self, batches: list[torch.Tensor]) -> list[LayerInputs]:
        return capture(self.model, batches, self.device)

    def logits(self, hidden: torch.Tensor, kwargs: list[dict] | None = None) -> torch.Tensor:
        """Logits of a stream's last hidden states; `kwargs`: the stream's kwargs list as the last layer left it
        (the head's arguments, where the forward hands the head more than the hidden states, are in it)."""
        head = head_arguments(kwargs, len(decoder_layers(self.model))) if kwargs is not None else None
        return head_logits(self.model, hidden, head)

    def release_head(self) -> None:
        pass

    def weight_bytes(self) -> int:
        """Bytes the whole model takes in the compute dtype."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @contextmanager
    def whole(self):
        """The whole model, runnable end to end (self-calibration samples from it)."""
        yield self.model


class CheckpointSource(ModelSource):
    """A safetensors checkpoint folder read lazily: the model skeleton on the meta device, each module's
    tensors read from the shards when it is used and dropped after (see moeprune.shards, moeprune.hub)."""

    def __init__(self, folder: Path, device: str | torch.device, dtype: torch.dtype, config=None):
        self.ckpt = Checkpoint(folder)
        config = config if config is not None else load_config(folder)
        # FP8 / MXFP4 checkpoints are read as the plain model they quantize: the skeleton is built without the
        # quantization_config and every quantized tensor is dequantized as it is read (moeprune.quant)
        self.quant = scheme_of(config, self.ckpt)
        if self.quant is not None:
            config = plain_config(config)
        model = build_skeleton(config, dtype)                  # parameters on meta; rotary buffers are real
        self.model, self.layout = model.eval(), moe_layout(model)
        self.device, self.dtype = torch.device(device), dtype
        for module in self.model.modules():             # the real buffers (rotary tables) onto the device
            for name, buf in module.named_buffers(recurse=False):
                if not buf.is_meta:
                    setattr(module, name, buf.to(self.device))
        names = self.quant.names() if self.quant is not None else \
            {name: tuple(t.shape) for name, t in self.ckpt.tensors.items()}
        self.hub = HubMap.for_model(self.model, file_names=names)   # files <-> modules, as the files store them
        self._prefixes = {id(m): name + "." for name, m in self.model.named_modules()}
        self.experts = ExpertIndex(self.quant, self.hub) if self.quant is not None else None

    def prefix(self, module: nn.Module) -> str:
        """The state-dict prefix of one of the model's modules ("model.embed_tokens.", "lm_head.", ...)."""
        return self._prefixes[id(module)]

    def _read(self, name: str) -> torch.Tensor:
        if self.quant is not None and name in self.quant.tensors:
            t = self.quant.read(name, self.dtype)               # dequantized into the compute dtype
            what = f"{name} dequantized from {', '.join(self.quant.tensors[name].parts)}"
        else:
            t, what = self.ckpt.get(name), name
        check_finite(what, t, f"the checkpoint {self.ckpt.folder} is damaged (re-download it) or was saved after a "
                              "diverged training step")
        if self.experts is not None:
            self.experts.record(name, t, self.hub)
        return t

    def materialise(self, module: nn.Module, prefix: str) -> None:
        """Load `module`'s parameters and persistent buffers from the shards, in the compute dtype: each assembled
        from its file tensors (fused experts expert by expert, straight into the compute dtype)."""
        skeleton = {prefix + k: v for k, v in module.state_dict().items()}
        tensors = {k: self._read_as(k, v) for k, v in skeleton.items()}
        check_shapes({k: tuple(v.shape) for k, v in skeleton.items()}, tensors, str(self.ckpt.folder))
        state = {k[len(prefix):]: t for k, t in tensors.items()}
        module.load_state_dict(state, assign=True, strict=True)

    def _read_as(self, name: str, skeleton: torch.Tensor) -> torch.Tensor:
        """The module tensor `name`, assembled from its file tensors, on the device: floating ones in the compute
        dtype, except a float32 tensor the module declares so whatever the model's dtype (DeepSeek-V4's gate bias,
        routers' correction biases), as transformers keeps it."""
        dtype = torch.float32 if skeleton.dtype == torch.float32 else self.dtype
        t = self.hub.to_module(name, tuple(skeleton.shape), self._read, dtype)
        return t.to(self.device, dtype if t.is_floating_point() else t.dtype)

    def layer(self, i: int) -> nn.Module:
        layer = decoder_layers(self.model)[i]
        self.materialise(layer, f"{self.layout.layers_prefix}{i}.")
        return layer

    def release(self, i: int) -> None:
        unload(decoder_layers(self.model)[i])
        _return_memory()

    def before_layers(self) -> list[nn.Module]:
        """The modules with weights that the forward may run before its first decoder layer: the input embeddings
        and every other child of the language model that holds weights and is neither the decoder layers nor one
        of head_modules (a learned rotary scale, Mistral-Large-4's rotary_emb.alpha; per-layer input embeddings)."""
        base, embed = text_model(self.model), self.model.get_input_embeddings()
        try:
            after = head_modules(self.model)
        except MoePruneError:               # said when the logits are asked for; the embeddings do not need them
            after = [self.model.get_output_embeddings()]
        skip = {id(m) for m in (decoder_layers(self.model), *after)}
        children = [c for c in base.children() if next(iter(c.state_dict()), None) is not None
                    and not any(id(m) in skip for m in c.modules())]
        inside = any(embed is m for c in children for m in c.modules())
        return children if inside else [embed, *children]

    @contextmanager
    def own_tensors(self):
        """The language model's own tensors, outside any child module (Zaya's input_hidden_states_scale and _bias,
        applied to the embeddings before the first layer), read while the block runs; back on meta after."""
        base = text_model(self.model)
        own = {n: t for n, t in [*base._parameters.items(), *base._buffers.items()]
               if t is not None and t.is_meta and n not in base._non_persistent_buffers_set}

        def put(n: str, value: torch.Tensor) -> None:
            if n in base._parameters:
                base._parameters[n] = nn.Parameter(value, requires_grad=False)
            else:
                base._buffers[n] = value
        try:
            for n, t in own.items():
                put(n, self._read_as(self.prefix(base) + n, t))
            yield
        finally:
            for n, t in own.items():
                put(n, t)

    def embed(self, batches: list[torch.Tensor]) -> list[LayerInputs]:
        modules = self.before_layers()
        try:
            for module in modules:
                self.materialise(module, self.prefix(module))
            with self.own_tensors():
                return capture(self.model, batches, self.device)
        finally:
            for module in modules:
                unload(module)
            _return_memory()

    def logits(self, hidden: torch.Tensor, kwargs: list[dict] | None = None) -> torch.Tensor:
        for module in head_modules(self.model):
            if any(t.is_meta for t in module.state_dict().values()):
                self.materialise(module, self.prefix(module))
        return super().logits(hidden, kwargs)

    def release_head(self) -> None:
        for module in head_modules(self.model):
            unload(module)
        _return_memory()

    def weight_bytes(self) -> int:
        return sum(p.numel() for p in self.model.parameters()) * self.dtype.itemsize

    @contextmanager
    def whole(self):
        """Every module materialised at once, for a model that fits in memory; back to meta after."""
        parts = [(m, self.prefix(m)) for m in (*self.before_layers(), *head_modules(self.model))]
        parts += [(layer, f"{self.layout.layers_prefix}{i}.") for i, layer in enumerate(decoder_layers(self.model))]
        try:
            for module, prefix in parts:
                self.materialise(module, prefix)
            with self.own_tensors():
                yield self.model
        finally:
            for module, _ in parts:
                unload(module)
            _return_memory()


def open_source(spec: str | None, dtype: str = "auto", device: str = "auto"):
    """(name, source for the per-layer engine, tokenizer, input folder or None).

    A local folder of safetensors is read lazily, a layer at a time (CheckpointSource): the
    model never has to fit in memory. A tiny model or a hub id is loaded; a folder of pickle weights
    (pytorch_model.bin) is refused.
    """
    name, path = resolve(spec)
    device = resolve_device(device)
    compute = compute_dtype(dtype, device)
    if path is not None:
        check_weights(path)
        config = load_config(path)           # before any header: custom code refused, fields checked
        if compute == "auto":
            compute = torch_dtype(config.dtype) or torch.float32
        try:
            source = CheckpointSource(path, device, compute, config)
        except MoePruneError:
            raise
        except CONFIG_ERRORS + (ZeroDivisionError, OverflowError, RuntimeError) as e:
            raise MoePruneError(f"{path}: transformers cannot build the model its config.json describes "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})") from None
        return name, source, load_tokenizer(str(path)), path
    loaded = load(spec, dtype, device)
    return name, ModelSource(loaded.model, save_dtype=loaded.save_dtype), loaded.tokenizer, path
