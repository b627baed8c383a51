"""The per-layer engine: one loop for a model in memory and for a checkpoint larger than memory.

    source = CheckpointSource(folder) | ModelSource(model)       # moeprune.sources
    steps  = [Observe, Evaluate, Tradeoff, Decide, Apply, Write, EvaluatePruned, KeepStats]   # moeprune.steps
    for each decoder layer i:
        work = LayerWork(i, source.layer(i), ...)   # a checkpoint: materialised from its own tensors only
        for step in steps: step.layer(work)         # in order: statistics, evaluation, plan, surgery, output
        source.release(i)                           # and the layer is freed

Each step is one small object with the interface below; a new kind of per-layer work is a new step in the
list, not a new flag here. The calibration stream advances through the original layers (Observe runs
first), as llm-compressor's sequential pipeline does for observers: statistics then do not depend on the
plan, so one statistics pass (or a --stats-cache) serves every method and every K.

Every layer runs with the arguments the model's own forward gives that layer (moeprune.layer_inputs: the
sliding or full mask of its type, its position embeddings, a linear-attention or mamba mask), not layer 0's, and
with what the forward hands from one layer to the next (GLM-MoE-DSA's sparse-attention top-k indices) or stacks
from earlier layers' inputs (Inkling-2's block_states, which its final_input also takes before the norm), carried by
each stream on its own.

Memory at any time: one decoder layer in the compute dtype, the cached hidden states of the steps' batches,
one layer's statistics, and the embeddings / lm_head while they are in use.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import MoeLayer, decoder_layers
from .layer_inputs import LayerInputs
from .plan import LayerPlan
from .sources import ModelSource
from .stats import LayerStats


@dataclass
class LayerWork:
    """Decoder layer i while it is resident: what one step hands the next."""
    index: int
    module: nn.Module                   # the decoder layer, materialised
    moe: MoeLayer | None                # its routed experts, None for a dense layer
    stats: LayerStats | None = None     # set by Observe (or read from a --stats-cache)
    plan: LayerPlan | None = None       # set by Decide; the layer is pruned once Apply has run


class Step:
    """One thing done to every decoder layer, in the order of the engine's list. `name` labels its time."""
    name = "step"

    def begin(self, source: ModelSource) -> None:
        """Before layer 0: embed the batches this step runs through the layers."""

    def layers(self, n: int) -> int:
        """How many decoder layers, from the first, this step needs (the loop stops after the last needed)."""
        return n

    def layer(self, work: LayerWork) -> None:
        raise NotImplementedError


@contextmanager
def _timed(seconds: dict[str, float], step: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[step] = seconds.get(step, 0.0) + time.perf_counter() - start


@torch.no_grad()
def run(source: ModelSource, steps: list[Step], progress: bool = True) -> dict[str, float]:
    """Read a layer -> every step in order -> free, for each decoder layer; wall seconds per step, summed."""
    n = len(decoder_layers(source.model))
    for step in steps:
        step.begin(source)
    moe, seconds = source.layout.by_index(), {}
    for i in tqdm(range(max((s.layers(n) for s in steps), default=0)), desc="layers", unit="layer",
                  disable=not progress):
        with _timed(seconds, "read"):
            work = LayerWork(i, source.layer(i), moe.get(i))
        for step in steps:
            with _timed(seconds, step.name):
                step.layer(work)
        del work
        with _timed(seconds, "free"):
            source.release(i)
    return seconds


@torch.no_grad()
def score(source: ModelSource, streams: list[tuple[list[LayerInputs], Callable[[int, torch.Tensor], None]]]) -> None:
    """score(k, logits) for every batch k of every stream: the final norm and lm_head, one batch at a time (with the
    stream's head arguments where the forward hands the head more than the hidden states: Inkling-2's block_states)."""
    try:
        for stream, fn in streams:
            for k, (hidden, kwargs) in enumerate(stream):
                fn(k, source.logits(hidden, kwargs))
    finally:
        source.release_head()
