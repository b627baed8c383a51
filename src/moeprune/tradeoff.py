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

import math
from pathlib import Path

from .arch import Layout, MoePruneError
from .calibration import split_held_out, text_domains
from .methods import get_method
from .plan import LayerPlan, Plan
from .surgery import apply_layer

HELD_OUT = 0.2
# (label, method, options): the default, the paper's grouping with representatives kept (what protected
# unseen domains best on a model outside this repository), and the strongest baselines
ALTERNATIVES = [("diverse", "diverse", {}),
                # top contribution: the best held-out mean of step 5's validation, a slightly worse worst domain
                ("diverse anchors", "diverse", {"grouping": "anchors"}),
                ("diverse-prune agglomerative", "diverse-prune", {"grouping": "agglomerative", "saliency": "frequency"}),
                ("frequency", "frequency", {}), ("reap", "reap", {}), ("msmoe", "msmoe", {})]


class Tradeoff:
    """The held-out split, the alternatives' planning and surgery for the engine, and the resulting table."""

    def __init__(self, spec: str, tokenizer, config, layout: Layout, keep: int, seed: int, chosen: str,
                 chosen_options: dict, batch_size: int, max_tokens: int):
        from .evaluate import Evaluation
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
        self.tallies = {"held-out": self.evaluation.tally(),
                        **{f"held-out:{label}": self.evaluation.tally() for label in self.methods}}

    def alternatives(self) -> dict:
        """label -> (plan a layer, apply a plan to a block) for engine.Job.alternatives."""
        def entry(method, options):
            plan = self._plan(method, options, {})
            return (lambda i, ls: method.plan_layer(ls, self.keep, options, self.seed),
                    lambda block, lp, ls: apply_layer(block, lp, plan, self.layout, ls))
        return {label: entry(method, options) for label, (method, options) in self.methods.items()}

    def _plan(self, method, options, layers: dict[int, LayerPlan]) -> Plan:
        return method.assemble(layers, self.keep, options, self.seed, self.layout.family.model_type, 0.0)

    def result(self, plans: dict[str, dict[int, LayerPlan]], folder: Path | None) -> dict:
        """{"chosen", "held_out_tokens", "rows": {label: {"ratio": {domain: r}, "mean", "worst", "plan"}}};
        each alternative's plan is saved as tradeoff/<label>.plan.json in `folder`."""
        base = self.tallies["held-out"].result()["perplexity"]
        rows = {}
        for label, (method, options) in self.methods.items():
            ppl = self.tallies[f"held-out:{label}"].result()["perplexity"]
            ratio = {d: math.exp(ppl[d]["nll"] - base[d]["nll"]) for d in base}
            worst = max(ratio, key=ratio.get)
            rows[label] = {"ratio": ratio, "mean": sum(ratio.values()) / len(ratio),
                           "worst": {"domain": worst, "ratio": ratio[worst]}}
            if folder is not None:
                path = folder / "tradeoff" / f"{label.replace(' ', '-').replace('(', '').replace(')', '')}.plan.json"
                path.parent.mkdir(exist_ok=True)
                self._plan(method, options, plans[label]).save(path)
                rows[label]["plan"] = path.relative_to(folder).as_posix()
        return {"chosen": self.chosen, "held_out_tokens": {d: v["tokens"] for d, v in base.items()}, "rows": rows}


def tradeoff_table(tradeoff: dict) -> str:
    """The trade-off as a Markdown table: one row per plan, the chosen one first; ratios pruned / full."""
    rows = tradeoff["rows"]
    domains = list(next(iter(rows.values()))["ratio"])
    lines = ["| plan (held-out calibration text) | mean | worst | " + " | ".join(domains) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in domains) + " |"]
    for label, r in rows.items():
        name = f"**{label}** (written)" if label == tradeoff["chosen"] else label
        lines.append(f"| {name} | {r['mean']:.3f} | {r['worst']['ratio']:.3f} {r['worst']['domain']} | "
                     + " | ".join(f"{r['ratio'][d]:.3f}" for d in domains) + " |")
    return "\n".join(lines)
