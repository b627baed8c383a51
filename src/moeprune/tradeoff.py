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
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .arch import Layout, MoeLayer, MoePruneError
from .engine import LayerWork, Step
from .evaluate import Evaluation
from .layer_inputs import LayerInputs, advance
from .methods import get_method
from .plan import LayerPlan, Plan
from .sources import ModelSource
from .stats import LayerStats
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
        self.dropped: dict[str, str] = {}       # label -> why its method cannot plan this model

    def begin(self, source: ModelSource) -> None:
        self.held = source.embed(self.evaluation.batches)
        self.alt = {label: self.held for label in self.methods}

    def layer(self, work: LayerWork) -> None:
        """Before the chosen plan changes the layer: the original, then each alternative on a copy of the block."""
        held_in, self.held = self.held, advance(work.module, work.index, self.held)
        for label, (method, options) in list(self.methods.items()):
            if work.moe is None:                  # a dense layer: a stream that still is the original's is shared
                self.alt[label] = self.held if self.alt[label] is held_in else advance(work.module, work.index,
                                                                                       self.alt[label])
                continue
            try:
                lp = method.plan_layer(self.stats_of(label, work), self.keep, options, self.seed)
            except MoePruneError as e:
                if label == self.chosen:          # the written plan itself: its own error
                    raise
                self.drop(label, f"layer {work.index}: {e}")
                continue
            self.plans[label][work.index] = lp
            self.alt[label] = self._with_plan(work, lp, self.surgery[label], self.alt[label])

    def drop(self, label: str, why: str) -> None:
        """An alternative whose method refuses this model (NAEE where a router's rule cannot be replayed) leaves the
        comparison, said in a warning and in the result, and the others go on."""
        warnings.warn(f"{self.name} leaves out {label}: {why}")
        self.dropped[label] = why
        for table in (self.methods, self.tallies, self.surgery, self.plans, self.alt):
            table.pop(label, None)

    def stats_of(self, label: str, work: LayerWork):
        """The statistics `label`'s plan is made from: the layer's."""
        return work.stats

    def _with_plan(self, work: LayerWork, lp: LayerPlan, plan: Plan, batches: list[LayerInputs]) -> list[LayerInputs]:
        """The decoder layer run on `batches` with a pruned copy of its MoE block in place of its own."""
        family, moe = self.layout.family, work.moe
        block = copy.deepcopy(moe.block)
        apply_layer(MoeLayer.of(moe.index, block, family), lp, plan, self.layout, work.stats)
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
        return {"chosen": self.chosen, "held_out_tokens": {d: v["tokens"] for d, v in base.items()}, "rows": rows,
                **({"left_out": dict(self.dropped)} if self.dropped else {})}


# ---------------------------------------------------------------- `auto`: the plan chosen per model on held-out windows

# the strong plans auto chooses among, each from two sets of statistics of one pass: the text alone and the text
# with the self-written windows (docs/ABLATION.md, step 6, fixed before its runs)
AUTO = "auto"                        # --method auto (a whole-model rule, not a per-layer method of the registry)
AUTO_METHODS = [("diverse", {}), ("naee", {}), ("reap", {}), ("frequency", {})]
AUTO_STATS = ("text", "text+self")
SELF_GROUP = "self-written"          # the held-out self-written windows (each its own group: "self-written K")
WORST_WINDOW = "self-written, worst window"
WITHIN = 0.02                        # a plan is eligible when its held-out mean is within 2% of the lowest
AUTO_HELD_TOKENS = 2048              # held-out tokens per text domain
HELD_SELF = 0.5                      # held-out self-written windows, as a share of those calibrated on
# what the worst group is: "group" all self-written windows as one group (step 6 as fixed before its runs); "worst"
# also every window on its own, so that a domain the model writes in one window of sixteen is not averaged away
# (step 6b)
WINDOWS = ("group", "worst")
AUTO_PICK = "worst"                  # auto's `windows`: step 6b's rule, chosen by step 6 (docs/ABLATION.md)


def auto_label(method: str, stats: str) -> str:
    return f"{method} ({stats})"


def summary(ratio: dict[str, float], windows: str = "group") -> dict:
    """Mean and worst group of held-out perplexity ratios (pruned / full), from the ratio of each text domain and each
    held-out self-written window ("self-written K"): the mean over the text domains and the self-written windows as
    one group (the geometric mean of their ratios: the group's ratio, the windows being of one length); the worst
    over the same groups, or with `windows` "worst" over the text domains and every window. "ratio" shows the
    text domains, the group and its worst window."""
    if windows not in WINDOWS:
        raise ValueError(f"windows must be one of {WINDOWS}, not {windows!r}")
    text = {g: r for g, r in ratio.items() if not g.startswith(SELF_GROUP)}
    own = [r for g, r in ratio.items() if g.startswith(SELF_GROUP)]
    shown, worst = dict(text), dict(text)
    if own:
        group = math.exp(sum(math.log(r) for r in own) / len(own))
        shown.update({SELF_GROUP: group, WORST_WINDOW: max(own)})
        worst.update({WORST_WINDOW: max(own)} if windows == "worst" else {SELF_GROUP: group})
    name = max(worst, key=worst.get)
    mean = (sum(text.values()) + (shown[SELF_GROUP] if own else 0.0)) / (len(text) + bool(own))
    return {"ratio": shown, "mean": mean, "worst": {"domain": name, "ratio": worst[name]}}


def pick(rows: dict[str, dict], within: float = WITHIN, groups: list[str] | None = None, windows: str = "group") -> str:
    """The plan auto keeps: among those whose held-out mean ratio is within `within` of the lowest, the one with
    the lowest worst group (step 4's rule; `summary` with `windows`); ties go to the earlier row. A row's ratios
    are its "held" (every text domain and self-written window), else its "ratio". `groups`: these groups only
    (text domains; SELF_GROUP for the self-written windows)."""
    if not rows:
        raise ValueError("no plans to choose from")
    def kept(g: str) -> bool:
        return groups is None or g in groups or (g.startswith(SELF_GROUP) and SELF_GROUP in groups)
    scores = {label: summary({g: r for g, r in row.get("held", row["ratio"]).items() if kept(g)}, windows)
              for label, row in rows.items()}
    best = min(s["mean"] for s in scores.values())
    eligible = [label for label, s in scores.items() if s["mean"] <= (1 + within) * best]
    return min(eligible, key=lambda label: scores[label]["worst"]["ratio"])


def auto_windows(model, tokenizer, spec: str, samples: int, seq_len: int, seed: int, share: float):
    """The windows of auto's one calibration pass, for a model in memory: (text windows cut from the calibration
    documents, self-written windows, held-out text documents by domain, held-out self-written windows).
    The text is split per domain as --report-tradeoff splits it; the self-written windows are sampled in one call,
    the last HELD_SELF share held out."""
    from .selfcalib import sample_windows, start_token, windows_for
    from .text import calibration_tokens
    text_config = model.config.get_text_config()
    calibration, held = split_held_out(text_domains(spec), HELD_OUT, seed)
    if not held:
        raise MoePruneError(f"auto scores plans on held-out calibration text: {spec!r} has too few documents to hold "
                            "some out; give it more documents")
    own = windows_for(share, samples)
    if not own:
        raise MoePruneError("auto compares statistics with and without the self-written windows: --self-calib must "
                            "be above 0")
    start = start_token(text_config, tokenizer)
    if start is None:
        raise MoePruneError("auto samples windows from the model, and it names no BOS or end-of-text token to start "
                            "from; choose another --method")
    held_own = max(1, round(HELD_SELF * own))
    written = sample_windows(model, start, own + held_own, seq_len, seed, progress=False)
    text = calibration_tokens(spec, tokenizer, samples - own, seq_len, seed, vocab_size=text_config.vocab_size,
                              docs=calibration)
    return text, written[:own], held, written[own:]


def auto_plans(text, mixed, keep: int, seed: int) -> dict[str, Plan]:
    """auto's eight plans: each of AUTO_METHODS from the text-alone and from the text + self-written statistics."""
    plans = {}
    for which, stats in zip(AUTO_STATS, (text, mixed)):
        for name, options in AUTO_METHODS:
            try:
                plans[auto_label(name, which)] = get_method(name).plan(stats, keep, seed, **options)
            except MoePruneError as e:          # the method refuses this model: left out, as the engine's Auto does
                warnings.warn(f"auto leaves out {auto_label(name, which)}: {e}")
    return plans


def held_out_evaluation(tokenizer, config, held: dict[str, list[str]], held_own, seq_len: int,
                        max_tokens: int = AUTO_HELD_TOKENS, batch_size: int = 8) -> Evaluation:
    """The held-out groups: each text domain's documents (up to max_tokens) and the self-written windows, scored
    window by window as written (a flat stream cut at seq_len gives back the same windows)."""
    texts = {d: docs for d, docs in held.items()}
    evaluation = Evaluation(tokenizer, config, tasks=[], texts=texts, seq_len=seq_len, batch_size=batch_size,
                            max_tokens=max_tokens)
    own = Evaluation(tokenizer, config, tasks=[], texts={f"{SELF_GROUP} {k + 1}": w for k, w in enumerate(held_own)},
                     seq_len=held_own.shape[1], batch_size=batch_size)
    for ids, owner in zip(own.batches, own._owner):
        evaluation._add(ids, owner)
    evaluation.domains += own.domains
    return evaluation


def auto_stats(model, tokenizer, spec: str, samples: int = 64, seq_len: int = 256, seed: int = 0,
               sample_tokens: int = 512, share: float = 0.5) -> dict:
    """auto's one calibration pass for a model in memory, the text and self-written sums kept apart:
    {"text": Stats, "text+self": Stats, "held": held-out documents by domain, "held_own": held-out windows}."""
    from .arch import moe_layout
    from .calibration import collect
    from .selfcalib import combine
    layout = moe_layout(model)
    text_windows, own_windows, held, held_own = auto_windows(model, tokenizer, spec, samples, seq_len, seed, share)
    part = round(sample_tokens * text_windows.shape[0] / samples)
    text = collect(model, layout, text_windows, sample_tokens=part, seed=seed, progress=False)
    own = collect(model, layout, own_windows, sample_tokens=sample_tokens - part, seed=seed, progress=False)
    return {"text": text, "text+self": combine(text, own), "held": held, "held_own": held_own}


def auto_choose(model, tokenizer, measured: dict, keep: int, seed: int = 0, held_tokens: int = AUTO_HELD_TOKENS,
                visit: Callable | None = None, windows: str = AUTO_PICK) -> dict:
    """`auto` for a model in memory, from auto_stats' `measured`: eight plans, each scored on the held-out windows;
    returns {"chosen", "rows": {label: held-out summary}, "plans"}. `visit(label, pruned model)` is called on
    each pruned copy (a benchmark scores it on more text)."""
    from .arch import moe_layout
    from .surgery import apply_plan
    text, mixed = measured["text"], measured["text+self"]
    plans = auto_plans(text, mixed, keep, seed)
    evaluation = held_out_evaluation(tokenizer, model.config, measured["held"], measured["held_own"],
                                     measured["held_own"].shape[1], held_tokens)
    base = evaluation.run(model, progress=False)["perplexity"]
    rows = {}
    for label, plan in plans.items():
        pruned = copy.deepcopy(model)
        apply_plan(pruned, moe_layout(pruned), plan, mixed if label.endswith(f"({AUTO_STATS[1]})") else text)
        ppl = evaluation.run(pruned, progress=False)["perplexity"]
        held = {d: math.exp(ppl[d]["nll"] - base[d]["nll"]) for d in base}
        rows[label] = {**summary(held, windows), "held": held}
        if visit is not None:
            visit(label, pruned)
        del pruned
    return {"chosen": pick(rows, windows=windows), "rows": rows, "plans": plans}


class Auto(Tradeoff):
    """`--method auto` in the per-layer engine: its first pass. Two observers keep the statistics of the text windows
    and of the self-written windows apart (each on its share of the sample tokens), and each layer's eight plans
    are applied to copies of its MoE block and run on the held-out windows beside the original, as --report-tradeoff
    runs its alternatives. `choose` then scores them and picks; the second pass writes the chosen plan.
    Without self-written windows (--self-calib 0, or a model that cannot write here) it chooses among the four
    text plans, on the held-out text alone."""
    name = "auto"

    def __init__(self, spec: str, tokenizer, config, layout: Layout, keep: int, seed: int, share: float, samples: int,
                 seq_len: int, batch_size: int, max_tokens: int = AUTO_HELD_TOKENS, windows: str = AUTO_PICK):
        from .selfcalib import windows_for
        if spec == "random" or tokenizer is None:
            raise MoePruneError("--method auto scores its plans on held-out calibration text: give text with --calib "
                                "(and a model with a tokenizer), not random tokens")
        self.calibration, self.held_text = split_held_out(text_domains(spec), HELD_OUT, seed)
        if not self.held_text:
            raise MoePruneError(f"--method auto: the calibration text {spec!r} has too few documents to hold some out; "
                                "give it more documents")
        self.tokenizer, self.config, self.layout, self.keep, self.seed = tokenizer, config, layout, keep, seed
        self.samples, self.seq_len, self.batch_size, self.max_tokens = samples, seq_len, batch_size, max_tokens
        self.own = windows_for(share, samples)
        self.held_own = max(1, round(HELD_SELF * self.own)) if self.own else 0
        self.kinds = AUTO_STATS if self.own else AUTO_STATS[:1]
        self.kind = {auto_label(name, kind): kind for kind in self.kinds for name, _ in AUTO_METHODS}
        self.methods = {auto_label(name, kind): (get_method(name), get_method(name).make_options(**options))
                        for kind in self.kinds for name, options in AUTO_METHODS}
        self.surgery = {label: self._plan(method, options, {}) for label, (method, options) in self.methods.items()}
        self.plans = {label: {} for label in self.methods}
        self.kept: dict[str, dict] = {kind: {} for kind in self.kinds}
        self.chosen: str | None = None
        self.held, self.alt, self.window_rule, self.dropped = None, {}, windows, {}

    def windows(self, text: Callable[[int, list[str]], torch.Tensor],
                written: Callable[[int], torch.Tensor] | None) -> torch.Tensor:
        """The calibration windows, [text; self-written; held-out self-written]: `text(n, documents)` cuts n
        windows from the calibration documents, `written(n)` gives n self-written windows (sampled in one call)."""
        own = written(self.own + self.held_own) if self.own else None
        parts = [text(self.samples - self.own, self.calibration)] + ([own] if own is not None else [])
        self.held_windows = own[self.own:] if own is not None else None
        return torch.cat(parts)

    def prepare(self, tokens: torch.Tensor, sample_tokens: int, weight_similarity: bool,
                keep_stats: Callable[[int, LayerStats], LayerStats] = lambda i, ls: ls) -> None:
        """The observers and the held-out evaluation, from the windows `windows` returned."""
        from .steps import Observe
        text = tokens[:self.samples - self.own]
        part = round(sample_tokens * text.shape[0] / self.samples)
        self.observers = {AUTO_STATS[0]: Observe(self.layout, text, lambda i: None, part, self.seed, self.batch_size,
                                                 weight_similarity, True)}
        if self.own:
            self.observers[AUTO_STATS[1]] = Observe(self.layout, tokens[text.shape[0]:self.samples], lambda i: None,
                                                    sample_tokens - part, self.seed, self.batch_size, False, True)
        self.keep_stats = keep_stats
        if self.held_windows is not None:
            self.evaluation = held_out_evaluation(self.tokenizer, self.config, self.held_text, self.held_windows,
                                                  self.seq_len, self.max_tokens, self.batch_size)
        else:
            self.evaluation = Evaluation(self.tokenizer, self.config, tasks=[], texts=self.held_text,
                                         seq_len=self.seq_len, batch_size=self.batch_size, max_tokens=self.max_tokens)
        self.tally = self.evaluation.tally()
        self.tallies = {label: self.evaluation.tally() for label in self.methods}

    def begin(self, source: ModelSource) -> None:
        for observer in self.observers.values():
            observer.begin(source)
        super().begin(source)

    def layers(self, n: int) -> int:
        return n

    def layer(self, work: LayerWork) -> None:
        got = {}
        for kind, observer in self.observers.items():
            work.stats = None
            observer.layer(work)
            got[kind] = work.stats
        if work.moe is not None and AUTO_STATS[1] in got:
            from .selfcalib import combine_layer
            got[AUTO_STATS[1]] = combine_layer(got[AUTO_STATS[0]], got[AUTO_STATS[1]])
        self.stats = got
        super().layer(work)
        if work.moe is not None:
            for kind, ls in got.items():
                self.kept[kind][work.index] = self.keep_stats(work.index, ls)
        work.stats = None

    def stats_of(self, label: str, work: LayerWork):
        return self.stats[self.kind[label]]

    def choose(self, source: ModelSource) -> str:
        """Score every plan on the held-out windows (the original model's too) and pick (`pick`)."""
        from .engine import score
        if not self.methods:
            raise MoePruneError("--method auto: none of its candidate plans could be made for this model ("
                                + "; ".join(f"{k}: {v}" for k, v in self.dropped.items()) + "); choose a --method")
        score(source, self.streams())
        self.chosen = pick(self.result(None)["rows"], windows=self.window_rule)
        return self.chosen

    def result(self, folder: Path | None) -> dict:
        """Tradeoff's result, each row's ratios shown as `summary` gives them (text domains, the self-written windows
        as a group and their worst window) and all of them under "held"."""
        out = super().result(folder)
        for row in out["rows"].values():
            held = row["ratio"]
            row.update(summary(held, self.window_rule), held=held)
        tokens = out["held_out_tokens"]
        own = [d for d in tokens if d.startswith(SELF_GROUP)]
        out["held_out_tokens"] = {**{d: t for d, t in tokens.items() if d not in own},
                                  **({SELF_GROUP: sum(tokens[d] for d in own)} if own else {})}
        out["chosen"], out["rule"] = self.chosen, {"within": WITHIN, "windows": self.window_rule}
        return out

    def chosen_plan(self, seconds: float) -> Plan:
        """The chosen plan as plan.json holds it: method "auto", the chosen candidate and its method's options."""
        method, options = self.methods[self.chosen]
        plan = method.assemble(self.plans[self.chosen], self.keep, options, self.seed, self.layout.family.model_type,
                               seconds)
        plan.method = "auto"
        plan.options = {"chosen": self.chosen, **plan.options}
        return plan
