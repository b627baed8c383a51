"""A plan: what becomes of the experts of each MoE layer. Plain data, saved as JSON.

Output expert j of a layer is the weighted sum of the original experts in `groups[j]`; a pure
selection is groups of one with weight 1. The router rule says how the router rows of a group
become one: "weighted" (the same weighted sum) or "representative" (the representative's row).
A plan can be saved, inspected, edited and applied again without recalibrating.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal, get_args

from .arch import MoePruneError

RouterRule = Literal["weighted", "representative"]
Align = Literal["none", "weights", "activations"]
Merge = Literal["average", "fit"]
ROUTER_RULES: tuple[str, ...] = get_args(RouterRule)
ALIGN_MODES: tuple[str, ...] = get_args(Align)
MERGE_MODES: tuple[str, ...] = get_args(Merge)


@dataclass
class LayerPlan:
    num_experts: int                     # E before pruning (checked against the model)
    groups: list[list[int]]              # original expert ids per output expert
    weights: list[list[float]]           # merge weight of each member, summing to 1 per group
    representatives: list[int]           # one member per group (router row, alignment target)
    info: dict = field(default_factory=dict)   # method diagnostics (e.g. NAEE's reconstruction error)

    @property
    def keep(self) -> int:
        return len(self.groups)

    @classmethod
    def selection(cls, num_experts: int, kept: list[int], **info) -> "LayerPlan":
        kept = sorted(int(e) for e in kept)
        return cls(num_experts, [[e] for e in kept], [[1.0] for _ in kept], kept, info)

    def validate(self, where: str = "") -> None:
        seen: set[int] = set()
        if not self.groups:
            raise MoePruneError(f"{where}: a plan must keep at least one expert")
        if not (len(self.groups) == len(self.weights) == len(self.representatives)):
            raise MoePruneError(f"{where}: groups, weights and representatives differ in length")
        for g, w, r in zip(self.groups, self.weights, self.representatives):
            if not g or len(g) != len(w):
                raise MoePruneError(f"{where}: group {g} has {len(w)} weights")
            if any(e < 0 or e >= self.num_experts for e in g):
                raise MoePruneError(f"{where}: group {g} names an expert outside 0..{self.num_experts - 1}")
            if len(set(g)) != len(g):
                raise MoePruneError(f"{where}: group {g} lists an expert twice")
            if seen & set(g):
                raise MoePruneError(f"{where}: expert(s) {sorted(seen & set(g))} appear in two groups")
            seen |= set(g)
            if r not in g:
                raise MoePruneError(f"{where}: representative {r} is not in its group {g}")
            if any(x < 0 for x in w) or not math.isclose(sum(w), 1.0, abs_tol=1e-5):
                raise MoePruneError(f"{where}: merge weights {w} must be >= 0 and sum to 1")


@dataclass
class Plan:
    method: str
    options: dict
    layers: dict[int, LayerPlan]
    router: RouterRule = "weighted"
    align: Align = "none"
    merge: Merge = "average"         # "fit": down projection refitted to the group's outputs (least squares)
    model_type: str = ""

    @property
    def needs_stats(self) -> bool:
        """Applying this plan needs the calibration sample (activation alignment, fitted merge)."""
        return self.align == "activations" or self.merge == "fit"

    def validate(self, top_k: int | None = None) -> None:
        if self.router not in ROUTER_RULES:
            raise MoePruneError(f"unknown router rule {self.router!r}; choose one of {ROUTER_RULES}")
        if self.align not in ALIGN_MODES:
            raise MoePruneError(f"unknown alignment {self.align!r}; choose one of {ALIGN_MODES}")
        if self.merge not in MERGE_MODES:
            raise MoePruneError(f"unknown merge {self.merge!r}; choose one of {MERGE_MODES}")
        for i, lp in self.layers.items():
            lp.validate(f"plan layer {i}")

    def keep_per_layer(self) -> dict[int, int]:
        return {i: lp.keep for i, lp in self.layers.items()}

    def to_json(self) -> str:
        d = asdict(self)
        d["layers"] = {str(i): v for i, v in d["layers"].items()}
        return json.dumps(d, indent=1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def from_json(cls, text: str, where: str = "plan") -> "Plan":
        """A plan from its JSON, every field's type checked: a hand-edited or foreign file is named, not run."""
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise MoePruneError(f"{where} is not valid JSON ({e}); write it with moeprune prune --plan-out") from None
        _expect(d, dict, where, "the file")
        _fields(d, {f.name for f in fields(cls)}, {"method", "options", "layers"}, where, "the plan")
        _expect(d["method"], str, where, "method")
        _expect(d["options"], dict, where, "options")
        _expect(d["layers"], dict, where, "layers")
        for key in ("router", "align", "merge", "model_type"):
            if key in d:
                _expect(d[key], str, where, key)
        layers = {}
        for i, v in d["layers"].items():
            if not (isinstance(i, str) and i.isdigit()):
                raise MoePruneError(f"{where}: layer key {i!r} is not a decoder layer index")
            at = f"layers.{i}"
            _expect(v, dict, where, at)
            _fields(v, {f.name for f in fields(LayerPlan)}, {"num_experts", "groups", "weights", "representatives"},
                    where, at)
            _expect(v["num_experts"], int, where, f"{at}.num_experts")
            for key, kind in (("groups", int), ("weights", (int, float))):
                _expect(v[key], list, where, f"{at}.{key}")
                for g in v[key]:
                    _expect(g, list, where, f"{at}.{key}[...]")
                    for x in g:
                        _expect(x, kind, where, f"{at}.{key}[...][...]")
            _expect(v["representatives"], list, where, f"{at}.representatives")
            for r in v["representatives"]:
                _expect(r, int, where, f"{at}.representatives[...]")
            if "info" in v:
                _expect(v["info"], dict, where, f"{at}.info")
            layers[int(i)] = LayerPlan(**{**v, "weights": [[float(x) for x in w] for w in v["weights"]]})
        plan = cls(**{**d, "layers": layers})
        plan.validate()
        return plan

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise MoePruneError(f"cannot read the plan {path}: {e}") from None
        return cls.from_json(text, str(path))


_TYPE_NAMES = {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number"}


def _expect(value, kind, where: str, what: str) -> None:
    """`value` must be of `kind` (bool is never a number here)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        want = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
        raise MoePruneError(f"{where}: {what} must be {want}, not {json.dumps(value)[:40]}")


def _fields(d: dict, allowed: set[str], required: set[str], where: str, what: str) -> None:
    missing, unknown = sorted(required - set(d)), sorted(set(d) - allowed)
    if missing or unknown:
        raise MoePruneError(f"{where}: {what} " + (f"lacks {', '.join(missing)}" if missing else
                                                  f"has unknown field(s) {', '.join(unknown)}"))
