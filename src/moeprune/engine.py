"""The per-layer engine: one pipeline for a model in memory and for a checkpoint larger than memory.

    source = CheckpointSource(folder) | ModelSource(model)    # where the decoder layers come from
    calib, before, after = first-layer inputs of the calibration and evaluation batches
    for each decoder layer i:
        layer  = source.layer(i)                  # a checkpoint: materialised from its own tensors only
        stats  = observe(layer, calib)            # MoE layers; calib advances through the ORIGINAL layer
        before = layer(before)                    # evaluation of the original model
        plan_i = decide(i, stats)                 # a method, a saved plan, or nothing (collect only)
        apply(layer, plan_i); after = layer(after)    # evaluation of the pruned model
        writer.write_layer(i, layer); source.release(i)   # and the layer is freed
    score: logits = lm_head(norm(before / after))   # per evaluation batch, once the checkpoint is written

With --report-tradeoff, each alternative plan is also applied to a copy of the layer's MoE block and run on
held-out calibration text beside the original (moeprune.tradeoff).

The calibration stream advances through the original layers, as llm-compressor's sequential pipeline
does for observers: statistics then do not depend on the plan, so one statistics pass (or a
--stats-cache) serves every method and every K. Statistics are sums over batches, so a data-parallel
pass over several devices would be a reduction.

Memory at any time: one decoder layer in the compute dtype, the cached hidden states of the calibration
and evaluation batches, one layer's statistics, and the embeddings / lm_head while they are in use.
"""

from __future__ import annotations

import copy
import ctypes
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import Layout, MoeLayer, MoePruneError, decoder_layers, moe_layout
from .calibration import first_layer_inputs, forward_batches, observe_layer
from .plan import LayerPlan
from .preflight import check_finite
from .stats import LayerStats

Batches = list[tuple[torch.Tensor, dict]]       # per batch: (hidden states [B, T, d], decoder-layer kwargs)


# ---------------------------------------------------------------- where layers come from

def _return_memory() -> None:
    """Hand a freed layer's memory back to the system: glibc keeps freed heap pages (the per-expert reads fall
    under its mmap threshold) unless asked, and the next layer would then come on top of them. (A layer is
    freed by reference counting; no garbage collection pass is needed.)"""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):       # not glibc (musl): nothing to trim
            pass


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

    def embed(self, batches: list[torch.Tensor]) -> Batches:
        return first_layer_inputs(self.model, batches, self.device)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        base = getattr(self.model, "model", self.model)
        return self.model.lm_head(base.norm(hidden))

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

    def __init__(self, folder: Path, device: str | torch.device, dtype: torch.dtype):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from .shards import Checkpoint
        self.ckpt = Checkpoint(folder)
        config = AutoConfig.from_pretrained(folder)
        quantized = next((t.name for t in self.ckpt.tensors.values()
                          if t.dtype.startswith("F8") or t.name.endswith("_scale_inv")), None)
        if quantized or getattr(config, "quantization_config", None):
            what = f"tensor {quantized}" if quantized else "its config has a quantization_config"
            raise MoePruneError(f"{folder} is a quantized checkpoint ({what}); moeprune reads bf16/fp16/fp32 weights: "
                                "dequantize it to bf16 first (e.g. DeepSeek's fp8_cast_bf16.py for FP8 checkpoints)")
        with init_empty_weights(include_buffers=False):        # parameters on meta; rotary buffers are real
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model, self.layout = model.eval(), moe_layout(model)
        self.device, self.dtype = torch.device(device), dtype
        self.model.model.rotary_emb.to(self.device)

    def _read(self, name: str) -> torch.Tensor:
        if name == "lm_head.weight" and name not in self.ckpt and getattr(self.model.config, "tie_word_embeddings",
                                                                           False):
            name = "model.embed_tokens.weight"
        t = self.ckpt.get(name)
        check_finite(name, t, f"the checkpoint {self.ckpt.folder} is damaged (re-download it) or was saved after a "
                              "diverged training step")
        return t

    def materialise(self, module: nn.Module, prefix: str, layer: int | None = None) -> None:
        """Load `module`'s parameters and persistent buffers from the shards, in the compute dtype."""
        from .hub import check_shapes, module_tensors
        expected = {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}
        if layer is None:
            tensors = {k: self._read(k) for k in expected}
        else:
            tensors = dict(module_tensors(self.layout.family, layer, expected, self._read, self.dtype))
        check_shapes(expected, tensors, str(self.ckpt.folder))
        state = {k[len(prefix):]: t.to(self.device, self.dtype if t.is_floating_point() else t.dtype)
                 for k, t in tensors.items()}
        module.load_state_dict(state, assign=True, strict=True)

    def layer(self, i: int) -> nn.Module:
        layer = decoder_layers(self.model)[i]
        self.materialise(layer, f"model.layers.{i}.", layer=i)
        return layer

    def release(self, i: int) -> None:
        decoder_layers(self.model)[i].to("meta")
        _return_memory()

    def embed(self, batches: list[torch.Tensor]) -> Batches:
        embed = self.model.model.embed_tokens
        self.materialise(embed, "model.embed_tokens.")
        try:
            return first_layer_inputs(self.model, batches, self.device)
        finally:
            embed.to("meta")
            _return_memory()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.model.lm_head.weight.is_meta:
            self.materialise(self.model.model.norm, "model.norm.")
            self.materialise(self.model.lm_head, "lm_head.")
        return super().logits(hidden)

    def release_head(self) -> None:
        self.model.model.norm.to("meta")
        self.model.lm_head.to("meta")

    def weight_bytes(self) -> int:
        return sum(p.numel() for p in self.model.parameters()) * self.dtype.itemsize

    @contextmanager
    def whole(self):
        """Every module materialised at once, for a model that fits in memory; back to meta after."""
        base = self.model.model
        parts = [(base.embed_tokens, "model.embed_tokens.", None), (base.norm, "model.norm.", None),
                 (self.model.lm_head, "lm_head.", None)]
        parts += [(layer, f"model.layers.{i}.", i) for i, layer in enumerate(decoder_layers(self.model))]
        try:
            for module, prefix, layer in parts:
                self.materialise(module, prefix, layer=layer)
            yield self.model
        finally:
            for module, _, _ in parts:          # not the whole model: the rotary tables are real buffers
                module.to("meta")
            _return_memory()


# ---------------------------------------------------------------- the loop

@dataclass
class Job:
    """What one pass over the layers does; every part is optional."""
    calib: torch.Tensor | None = None                 # calibration token ids [N, L]
    sample_tokens: int = 512
    seed: int = 0
    batch_size: int = 8
    weight_similarity: bool = True                    # derive model-centric similarity (costly for big experts)
    expert_outputs: bool = True                       # run every expert on the sample (data-centric methods)
    cached: Callable[[int], LayerStats | None] = lambda i: None     # statistics already on disk
    decide: Callable[[int, LayerStats | None], LayerPlan] | None = None   # None: statistics only
    apply: Callable[[MoeLayer, LayerPlan, LayerStats | None], None] | None = None
    write: Callable[[int, nn.Module], None] | None = None
    keep_stats: Callable[[int, LayerStats], LayerStats | None] = lambda i, ls: ls   # what to keep of a layer's
    evaluate: list[torch.Tensor] | None = None        # evaluation batches of token ids, run before and after
    # the trade-off: other plans, each applied to a copy of the layer's MoE block and run on `held_out`
    # batches beside the original; name -> (plan a layer, apply a plan to a block)
    alternatives: dict[str, tuple[Callable, Callable]] = field(default_factory=dict)
    held_out: list[torch.Tensor] | None = None
    progress: bool = True


@dataclass
class Outcome:
    stats: dict[int, LayerStats] = field(default_factory=dict)
    plans: dict[int, LayerPlan] = field(default_factory=dict)
    alternatives: dict[str, dict[int, LayerPlan]] = field(default_factory=dict)
    # the evaluation batches' last hidden states: "before" (original layers) and, when a layer was pruned,
    # "after"; scored by `score` once the checkpoint is written
    streams: dict[str, Batches] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)     # wall time per step, summed over the layers


@contextmanager
def _timed(seconds: dict[str, float], step: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[step] = seconds.get(step, 0.0) + time.perf_counter() - start


@torch.no_grad()
def run(source: ModelSource, job: Job) -> Outcome:
    """Read a layer -> calibrate it -> plan -> apply -> write -> free, for every decoder layer in order."""
    layout, moe = source.layout, source.layout.by_index()
    n_layers = len(decoder_layers(source.model))
    need_stats = [i for i in moe if job.cached(i) is None] if job.calib is not None else []
    last_stats = max(need_stats, default=-1)
    calib = positions = None
    if need_stats:
        total = job.calib.numel()
        positions = torch.randperm(total, generator=torch.Generator().manual_seed(job.seed))
        positions = positions[:min(job.sample_tokens, total)].sort().values
        calib = source.embed(list(job.calib.split(job.batch_size)))
    before = after = source.embed(job.evaluate) if job.evaluate else None
    held = source.embed(job.held_out) if job.held_out else None
    alt = {name: held for name in job.alternatives} if held is not None else {}
    whole = job.decide is not None or job.write is not None or before is not None
    outcome = Outcome()
    for i in tqdm(range(n_layers if whole else last_stats + 1), desc="layers", unit="layer",
                  disable=not job.progress):
        t = outcome.seconds
        with _timed(t, "read"):
            layer = source.layer(i)
        m = moe.get(i)
        ls = job.cached(i) if m is not None else None
        if calib is not None and i <= last_stats:
            with _timed(t, "calibrate"):
                if m is not None and ls is None:
                    ls, calib = observe_layer(layer, m, layout, calib, positions, job.weight_similarity,
                                              job.expert_outputs)
                else:
                    calib = forward_batches(layer, calib)
        if before is not None:
            with _timed(t, "evaluate"):
                shared, after_inputs = after is before, after
                before = forward_batches(layer, before)
        if held is not None:               # the trade-off, before the chosen plan changes the layer
            with _timed(t, "trade-off"):
                held_in, held = held, forward_batches(layer, held)
                for name, (decide, apply) in job.alternatives.items():
                    if m is None:
                        alt[name] = held if alt[name] is held_in else forward_batches(layer, alt[name])
                        continue
                    lp = outcome.alternatives.setdefault(name, {})[i] = decide(i, ls)
                    alt[name] = _with_plan(layer, m, layout, lambda block: apply(block, lp, ls), alt[name])
        pruned = m is not None and job.decide is not None
        if pruned:
            with _timed(t, "plan"):
                outcome.plans[i] = job.decide(i, ls)
            with _timed(t, "apply"):
                job.apply(m, outcome.plans[i], ls)
        if before is not None:
            with _timed(t, "evaluate"):
                after = before if shared and not pruned else forward_batches(layer, after_inputs)
        if ls is not None and (kept := job.keep_stats(i, ls)) is not None:
            outcome.stats[i] = kept
        if job.write is not None:
            with _timed(t, "write"):
                job.write(i, layer)
        ls = None
        with _timed(t, "free"):
            source.release(i)
    if before is not None:
        outcome.streams = {"before": before, **({"after": after} if after is not before else {})}
    if held is not None:
        outcome.streams.update({"held-out": held, **{f"held-out:{name}": s for name, s in alt.items()}})
    return outcome


def _with_plan(layer: nn.Module, moe: MoeLayer, layout: Layout, apply: Callable[[MoeLayer], None],
               batches: Batches) -> Batches:
    """The decoder layer run on `batches` with a pruned copy of its MoE block in place of its own."""
    family = layout.family
    block = copy.deepcopy(moe.block)
    apply(MoeLayer(moe.index, block, getattr(block, family.router), getattr(block, family.experts)))
    setattr(layer, family.block, block)
    try:
        return forward_batches(layer, batches)
    finally:
        setattr(layer, family.block, moe.block)


@torch.no_grad()
def score(source: ModelSource, outcome: Outcome, fn: Callable[[str, int, torch.Tensor], None]) -> None:
    """fn(stream, batch index, logits) for every evaluation batch: the final norm and lm_head, one batch at a time."""
    try:
        for name, stream in outcome.streams.items():
            for k, (hidden, _) in enumerate(stream):
                fn(name, k, source.logits(hidden))
    finally:
        source.release_head()
