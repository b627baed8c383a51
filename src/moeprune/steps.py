"""The engine's steps: each one small object that does one thing to every decoder layer (moeprune.engine).

    Observe         calibration statistics of each MoE layer (the calibration stream, original layers)
    Evaluate        the evaluation batches through the original layer ("before")
    Tradeoff        alternative plans on copies of the MoE block, held-out text (moeprune.tradeoff)
    Decide          a layer's plan: a method's, or a saved plan's
    Apply           the plan's surgery on the layer
    Write           the layer into the output checkpoint (a quantized one: as the file will hold it)
    EvaluatePruned  the evaluation batches through the layer as the plan left it ("after")
    KeepStats       what is kept of a layer's statistics (and the --stats-cache file)

Their order is the engine's list: what a step reads, an earlier step has set on the LayerWork.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from .arch import Layout, MoeLayer
from .engine import LayerWork, Step
from .layer_inputs import LayerInputs, advance
from .observer import observe_layer
from .plan import LayerPlan
from .sources import ModelSource
from .stats import LayerStats


class Observe(Step):
    """The calibration windows through the original layers, the observer on each MoE block that has no cached
    statistics. Runs only as far as the last layer that needs statistics when nothing else needs the rest."""
    name = "calibrate"

    def __init__(self, layout: Layout, tokens: torch.Tensor | None, cached: Callable[[int], LayerStats | None],
                 sample_tokens: int, seed: int, batch_size: int, weight_similarity: bool, expert_outputs: bool):
        self.layout, self.tokens, self.cached = layout, tokens, cached
        self.sample_tokens, self.seed, self.batch_size = sample_tokens, seed, batch_size
        self.weight_similarity, self.expert_outputs = weight_similarity, expert_outputs
        need = [i for i in layout.by_index() if cached(i) is None] if tokens is not None else []
        self.last = max(need, default=-1)
        self.calib: list[LayerInputs] | None = None
        self.positions: torch.Tensor | None = None

    def begin(self, source: ModelSource) -> None:
        if self.last < 0:
            return
        total = self.tokens.numel()        # the seeded sample of flat token positions every expert runs on
        order = torch.randperm(total, generator=torch.Generator().manual_seed(self.seed))
        self.positions = order[:min(self.sample_tokens, total)].sort().values
        self.calib = source.embed(list(self.tokens.split(self.batch_size)))

    def layers(self, n: int) -> int:
        return self.last + 1

    def layer(self, work: LayerWork) -> None:
        if work.moe is not None:
            work.stats = self.cached(work.index)
        if self.calib is None or work.index > self.last:
            return
        if work.moe is not None and work.stats is None:
            work.stats, self.calib = observe_layer(work.module, work.moe, self.layout, self.calib, self.positions,
                                                   self.weight_similarity, self.expert_outputs)
        else:
            self.calib = advance(work.module, work.index, self.calib)
        if work.index == self.last:
            self.calib = None                                   # nothing further needs the stream


class Evaluate(Step):
    """The evaluation batches through the original layers: `before`. Unless EvaluatePruned runs a changed
    layer, `after` is the same stream (an unpruned layer is computed once)."""
    name = "evaluate"

    def __init__(self, batches: list[torch.Tensor]):
        self.batches = batches
        self.before: list[LayerInputs] | None = None
        self.after: list[LayerInputs] | None = None
        self.after_inputs: list[LayerInputs] | None = None        # `after` as it entered the current layer
        self.shared = True                              # whether `after` was `before` there

    def begin(self, source: ModelSource) -> None:
        self.before = self.after = source.embed(self.batches)

    def layer(self, work: LayerWork) -> None:
        self.shared, self.after_inputs = self.after is self.before, self.after
        self.before = advance(work.module, work.index, self.before)
        if self.shared:
            self.after = self.before

    def streams(self) -> dict[str, list[LayerInputs]]:
        """"before", and "after" where it differs."""
        return {"before": self.before, **({"after": self.after} if self.after is not self.before else {})}


class EvaluatePruned(Step):
    """The evaluation batches through the layer as the plan left it (after Apply): `after`."""
    name = "evaluate"

    def __init__(self, evaluate: Evaluate):
        self.ev = evaluate

    def layer(self, work: LayerWork) -> None:
        ev = self.ev
        if work.plan is not None or not ev.shared:
            ev.after = advance(work.module, work.index, ev.after_inputs)


class Decide(Step):
    """Each MoE layer's plan, from `decide(layer index, its statistics)`: a method, or a saved plan's layer.
    `seconds` is the planning time alone (the plan records it)."""
    name = "plan"

    def __init__(self, decide: Callable[[int, LayerStats | None], LayerPlan]):
        self.decide, self.plans, self.seconds = decide, {}, 0.0

    def layer(self, work: LayerWork) -> None:
        if work.moe is None:
            return
        start = time.perf_counter()
        work.plan = self.plans[work.index] = self.decide(work.index, work.stats)
        self.seconds += time.perf_counter() - start


class Apply(Step):
    """The plan's surgery on the layer's experts and router, in place."""
    name = "apply"

    def __init__(self, apply: Callable[[MoeLayer, LayerPlan, LayerStats | None], None]):
        self.apply = apply

    def layer(self, work: LayerWork) -> None:
        if work.plan is not None:
            self.apply(work.moe, work.plan, work.stats)


class KeepStats(Step):
    """What the run keeps of each layer's statistics once the layer is done: `keep(i, stats)` may save them
    (--stats-cache) and lighten them (a checkpoint larger than memory keeps only what the report shows)."""
    name = "stats"

    def __init__(self, keep: Callable[[int, LayerStats], LayerStats | None] = lambda i, ls: ls):
        self.keep, self.stats = keep, {}

    def layers(self, n: int) -> int:
        return 0                                    # needs no layer of its own

    def layer(self, work: LayerWork) -> None:
        if work.stats is not None and (kept := self.keep(work.index, work.stats)) is not None:
            self.stats[work.index] = kept


class Write(Step):
    """The layer into the output checkpoint (moeprune.hub.CheckpointWriter)."""
    name = "write"

    def __init__(self, write: Callable[[int, nn.Module], None]):
        self.write = write

    def layer(self, work: LayerWork) -> None:
        self.write(work.index, work.module)
