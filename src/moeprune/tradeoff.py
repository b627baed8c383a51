"""`--report-tradeoff`: the chosen method beside the strongest alternatives, scored on held-out calibration text.

No setting is best on both the mean and the worst domain at every sparsity (docs/BENCHMARKS.md), and which
one a user needs depends on the traffic their model will see. From the one statistics pass of a prune, the
engine plans each alternative too, applies it to a copy of each layer's MoE block and runs a held-out fifth
of the calibration text (split by document, per domain: demo shards, the files of a folder, a .jsonl
"domain" field) through it beside the original model. The table gives each plan's perplexity ratio per
domain, its mean and its worst domain; the --method plan is what gets written, and every alternative's
plan is saved under tradeoff/ in the output, to be applied with --plan without calibrating again.

Cost: one more forward of the held-out tokens per alternative and layer, and one more copy of a layer's
experts while an alternative is applied.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

from .arch import Layout, MoeLayer, MoePruneError
from .engine import LayerWork, Step
from .evaluate import Evaluation
from .layer_inputs import LayerInputs, advance
from .methods import get_method
from .plan import LayerPlan, Plan
from .sources import ModelSource
from .surgery import apply_layer
from .text import split_held_out, text_domains

HELD_OUT = 0.2
# (label, method, options): the default, the paper's grouping with representatives kept (what protected
# unseen domains best on a model outside this repository), and the strongest baselines
ALTERNATIVES = [("diverse", "diverse", {}),
                # top contribution: the best held-out mean of step 5's validation, a slightly worse worst domain
                ("diverse anchors", "diverse", {"grouping": "anchors"}),
                ("diverse-prune agglomerative", "diverse-prune", {"grouping": "agglomerative", "saliency": "frequency"}),
                ("frequency", "frequency", {}), ("reap", "reap", {}), ("msmoe", "msmoe", {})]


class Tradeoff(Step):
    """The held-out split, and the engine step that plans each alternative for a layer, applies it to a copy of
    the layer's MoE block and runs the held-out batches through it beside the original; then the table."""
    name = "trade-off"

    def __init__(self, spec: str, tokenizer, config, layout: Layout, keep: int, seed: int, chosen: str,
                 chosen_options: dict, batch_size: int, max_tokens: int):
        if spec == "random" or tokenizer is None:
            raise MoePruneError("--report-tradeoff scores plans on held-out calibration text: give text with --calib "
                                "(and a model with a tokenizer), not random tokens")
        self.calibration, held = split_held_out(text_domains(spec), HELD_OUT, seed)
        if not held:
            raise MoePruneError(f"--report-tradeoff: the calibration text {spec!r} has too few documents to hold "
                                "some out; give it more documents")
        self.evaluation = Evaluation(tokenizer, config, tasks=[], texts=held, batch_size=batch_size,
                                     max_tokens=max_tokens)
        self.layout, self.keep, self.seed = layout, keep, seed
        entries = [(chosen if not chosen_options else f"{chosen} (chosen options)", chosen, chosen_options)]
        entries += [e for e in ALTERNATIVES if (e[1], e[2]) != (chosen, chosen_options)]
        self.methods = {label: (get_method(name), get_method(name).make_options(**options))
                        for label, name, options in entries}
        self.chosen = entries[0][0]
        self.tally = self.evaluation.tally()                        # the original model
        self.tallies = {label: self.evaluation.tally() for label in self.methods}
        self.surgery = {label: self._plan(method, options, {}) for label, (method, options) in self.methods.items()}
        self.plans: dict[str, dict[int, LayerPlan]] = {label: {} for label in self.methods}
        self.held: list[LayerInputs] | None = None
        self.alt: dict[str, list[LayerInputs]] = {}

    def begin(self, source: ModelSource) -> None:
        self.held = source.embed(self.evaluation.batches)
        self.alt = {label: self.held for label in self.methods}

    def layer(self, work: LayerWork) -> None:
        """Before the chosen plan changes the layer: the original, then each alternative on a copy of the block."""
        held_in, self.held = self.held, advance(work.module, work.index, self.held)
        for label, (method, options) in self.methods.items():
            if work.moe is None:                  # a dense layer: a stream that still is the original's is shared
                self.alt[label] = self.held if self.alt[label] is held_in else advance(work.module, work.index,
                                                                                       self.alt[label])
                continue
            lp = self.plans[label][work.index] = method.plan_layer(work.stats, self.keep, options, self.seed)
            self.alt[label] = self._with_plan(work, lp, self.surgery[label], self.alt[label])

    def _with_plan(self, work: LayerWork, lp: LayerPlan, plan: Plan, batches: list[LayerInputs]) -> list[LayerInputs]:
        """The decoder layer run on `batches` with a pruned copy of its MoE block in place of its own."""
        family, moe = self.layout.family, work.moe
        block = copy.deepcopy(moe.block)
        apply_layer(MoeLayer(moe.index, block, getattr(block, family.router), getattr(block, family.experts)),
                    lp, plan, self.layout, work.stats)
        setattr(work.module, family.block, block)
        try:
            return advance(work.module, work.index, batches)
        finally:
            setattr(work.module, family.block, moe.block)

    def streams(self) -> list[tuple[list[LayerInputs], Callable]]:
        """(hidden states, scorer) pairs for engine.score: the original's and each alternative's."""
        return [(self.held, self.tally.score), *((self.alt[label], self.tallies[label].score) for label in self.methods)]

    def _plan(self, method, options, layers: dict[int, LayerPlan]) -> Plan:
        return method.assemble(layers, self.keep, options, self.seed, self.layout.family.model_type, 0.0)

    def result(self, folder: Path | None) -> dict:
        """{"chosen", "held_out_tokens", "rows": {label: {"ratio": {domain: r}, "mean", "worst", "plan"}}};
        each alternative's plan is saved as tradeoff/<label>.plan.json in `folder`."""
        base = self.tally.result()["perplexity"]
        rows = {}
        for label, (method, options) in self.methods.items():
            ppl = self.tallies[label].result()["perplexity"]
            ratio = {d: math.exp(ppl[d]["nll"] - base[d]["nll"]) for d in base}
            worst = max(ratio, key=ratio.get)
            rows[label] = {"ratio": ratio, "mean": sum(ratio.values()) / len(ratio),
                           "worst": {"domain": worst, "ratio": ratio[worst]}}
            if folder is not None:
                path = folder / "tradeoff" / f"{label.replace(' ', '-').replace('(', '').replace(')', '')}.plan.json"
                path.parent.mkdir(exist_ok=True)
                self._plan(method, options, self.plans[label]).save(path)
                rows[label]["plan"] = path.relative_to(folder).as_posix()
        return {"chosen": self.chosen, "held_out_tokens": {d: v["tokens"] for d, v in base.items()}, "rows": rows}
