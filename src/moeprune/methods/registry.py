"""The method registry: a method turns calibration statistics into a plan, per MoE layer (moeprune.methods
imports every method module, and each registers its methods here).

A method is one small registered function `(layer_stats, keep, options, seed) -> LayerPlan` with a
typed options dataclass. The CLI flags are generated from those dataclasses, so the CLI and the
Python API cannot drift apart, and a flag that the chosen method does not take is an error,
never silently ignored. A variant is a registry entry with other defaults, not a copy.
"""

from __future__ import annotations

import dataclasses
import time
import typing
from dataclasses import dataclass
from typing import Callable

from ..arch import MoePruneError
from ..plan import LayerPlan, Plan
from ..stats import LayerStats, Stats


@dataclass(frozen=True)
class NoOptions:
    pass


@dataclass(frozen=True)
class Method:
    name: str
    summary: str                     # one line: what it does
    paper: str                       # source, "" for none
    fn: Callable[[LayerStats, int, object, int], LayerPlan]
    options: type = NoOptions
    defaults: dict = dataclasses.field(default_factory=dict)   # overrides of the options' defaults (variants)
    # whether it reads every expert's output on the calibration sample (the costly part of the statistics)
    needs_outputs: bool = True

    def make_options(self, **given) -> object:
        fields = {f.name for f in dataclasses.fields(self.options)}
        unknown = sorted(set(given) - fields)
        if unknown:
            flags = ", ".join("--" + u.replace("_", "-") for u in unknown)
            takes = ", ".join("--" + f.replace("_", "-") for f in sorted(fields)) or "no options"
            raise MoePruneError(f"method {self.name!r} does not take {flags} (it takes {takes})")
        options = self.options(**{**self.defaults, **given})
        check_choices(options)
        return options

    def plan_layer(self, ls: LayerStats, keep: int, options: object, seed: int = 0) -> LayerPlan:
        """One layer's plan (the per-layer engine's step); the layer's seed is seed + its index."""
        lp = self.fn(ls, keep, options, seed + ls.layer)
        lp.validate(f"plan layer {ls.layer}")
        return lp

    def assemble(self, layers: dict[int, LayerPlan], keep: int, options: object, seed: int, model_type: str,
                 seconds: float) -> Plan:
        """The whole plan from its layers, with the options that made it."""
        opts = dataclasses.asdict(options)
        plan = Plan(method=self.name, options={**opts, "keep": keep, "seed": seed}, layers=dict(sorted(layers.items())),
                    router=opts.get("router", "weighted"), align=opts.get("align", "none"),
                    merge=opts.get("merge", "average"), model_type=model_type)
        plan.options["planning_seconds"] = round(seconds, 4)
        plan.validate()
        return plan

    def plan(self, stats: Stats, keep: int, seed: int = 0, **given) -> Plan:
        options = self.make_options(**given)
        start = time.perf_counter()
        layers = {i: self.plan_layer(ls, keep, options, seed) for i, ls in sorted(stats.layers.items())}
        return self.assemble(layers, keep, options, seed, stats.model_type, time.perf_counter() - start)


def check_choices(options) -> None:
    """Every Literal-typed option must hold one of its values: fail loudly, never fall through."""
    hints = typing.get_type_hints(type(options))
    for f in dataclasses.fields(options):
        choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is typing.Literal else ()
        value = getattr(options, f.name)
        if choices and value not in choices:
            raise MoePruneError(f"--{f.name.replace('_', '-')} {value!r} is not one of {', '.join(map(str, choices))}")


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name} registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise MoePruneError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)} (see `moeprune methods`), "
                            "or auto (with moeprune prune)")
    return METHODS[name]

