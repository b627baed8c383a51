"""Apply a plan to the weights: one expert per group, router rows combined, config updated.

Every tensor of the fused experts module carries the expert index on axis 0, and the family lists
the router tensors with their expert axis, so one weighted sum serves every family. Merging is done
in float32 (float64 accumulation for the weights) and cast back to the model's dtype. A router that
chooses its experts by token id (DeepSeek-V4's tid2eid table) keeps its table's shape with the ids
rewritten to the new slots (`hash_slots`).
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from .align import align_to, neuron_activations
from .arch import Layout, MoeLayer, MoePruneError, config_value, get_tensor, set_config_value
from .observer import probabilities
from .plan import LayerPlan, Plan
from .routing import group_routing_after, output_distance, stand_ins
from .stats import LayerStats, Stats

FIT_RIDGE = 0.1   # ridge toward the averaged down projection, relative to the mean activation energy

_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "num_routed_experts", "moe_num_experts",
                "n_total_experts", "num_router_classes")   # Inkling's, Zaya's: the experts and the slots


def _set_tensor(module: nn.Module, dotted: str, value: torch.Tensor) -> None:
    *path, name = dotted.split(".")
    for part in path:
        module = getattr(module, part)
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[name] = value


def _merge(rows: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    if len(rows) == 1 and weights[0] == 1.0:
        return rows[0]                          # a kept expert: exactly itself, no float64 round trip
    acc = sum(w * r.double() for w, r in zip(weights, rows))
    return acc.to(rows[0].dtype)


def fit_down(layer: MoeLayer, merged: dict[str, torch.Tensor], group: list[int], ls: LayerStats,
             layout: Layout, gate_up: str | None = None) -> torch.Tensor:
    """Refit the merged expert's down projection to reproduce its group on the calibration sample.

    Gate and up stay the (aligned) average; the down projection D solves a ridge-regularised weighted
    least squares  min_D sum_t w_t ||D h_t - y_t||^2 + lam ||D - D_avg||^2, where h_t are the merged
    expert's intermediate activations, y_t the router-probability-weighted mean of the members'
    outputs and w_t the group's router probability on token t. No gradients, one solve per group.
    `gate_up`: the layout of `merged` (default the family's; "halves" for split experts given canonically).
    """
    gate_up = gate_up or layout.family.gate_up
    scoring = (ls.routing or {}).get("scoring", layout.family.scoring)            # read off the router when found
    probs = probabilities(ls.logits, scoring)[:, group]                           # [n, g]
    w = probs.sum(1)                                                              # [n]
    target = torch.einsum("tg,gtd->td", probs, ls.outputs[group].double()) / w.clamp_min(1e-12)[:, None]
    h = neuron_activations(layer, merged, ls.inputs, gate_up).T                  # [n, I]
    stored_t = gate_up.endswith("_t")                                            # down_proj stored [I, d]
    d0 = merged["down_proj"].double().T if stored_t else merged["down_proj"].double()   # [d, I]
    if "down_proj_bias" in merged:
        target = target - merged["down_proj_bias"].double()
    hw = h * w[:, None]
    gram = h.T @ hw                                                               # [I, I]
    lam = FIT_RIDGE * gram.trace() / gram.shape[0] + 1e-8
    rhs = target.T @ hw + lam * d0                                                # [d, I]
    d = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), rhs.T).T
    d = d.to(merged["down_proj"].dtype)
    return d.T if stored_t else d


@torch.no_grad()
def _distance(layer: MoeLayer, ls: LayerStats, chunk: int = 64) -> torch.Tensor:
    """output_distance of the layer's experts on the calibration sample: the recorded outputs, else the experts run
    on the recorded inputs (a method that needs no outputs), a chunk of tokens at a time."""
    if ls.outputs.numel():
        return output_distance(ls.outputs.split(chunk, dim=1))
    p = next(layer.experts.parameters())
    xs = ls.inputs.to(p.device, p.dtype).split(chunk)
    return output_distance(layer.every_expert(x).float().cpu() for x in xs)


def hash_slots(layer: MoeLayer, lp: LayerPlan, ls: LayerStats | None) -> list[int] | None:
    """For a layer that chooses its experts by token id (DeepSeek-V4's tid2eid): the output slot that each original
    expert's tokens go to, None for any other layer. A grouped expert's tokens go to its group's slot; a dropped
    expert's to the slot of the grouped expert whose output is nearest its own on the calibration sample
    (routing.stand_ins, what NAEE's replay routes to). Recorded in the plan (info["hash_slots"]), so the saved plan
    applies again without statistics and gives the same table."""
    if layer.hash_table is None:
        return None
    E = lp.num_experts
    slots = [-1] * E
    for j, group in enumerate(lp.groups):
        for e in group:
            slots[e] = j
    dropped = [e for e in range(E) if slots[e] < 0]
    recorded = lp.info.get("hash_slots")
    if recorded is not None:
        if not (isinstance(recorded, list) and len(recorded) == E and all(
                isinstance(s, int) and 0 <= s < lp.keep and (slots[e] < 0 or s == slots[e])
                for e, s in enumerate(recorded))):
            raise MoePruneError(f"plan layer {layer.index}: info.hash_slots must list, for each of the {E} experts, "
                                f"its group's slot (0..{lp.keep - 1}); it is {recorded}")
        return recorded
    if dropped:
        if ls is None or not (ls.outputs.numel() or ls.inputs.numel()):
            raise MoePruneError(
                f"layer {layer.index} chooses its experts by token id (a hash table) and the plan drops experts "
                f"{dropped}: their tokens go to the kept expert of nearest output on the calibration sample, which "
                "this run has not collected and the plan does not record (info.hash_slots); plan the model again "
                "(a plan written by this version records it)")
        grouped = torch.tensor([[e for e in range(E) if slots[e] >= 0]])
        stand_in = stand_ins(_distance(layer, ls), grouped, E)[0].tolist()
        slots = [slots[stand_in[e]] for e in range(E)]
    lp.info["hash_slots"] = slots
    return slots


def merge_layer(layer: MoeLayer, lp: LayerPlan, plan: Plan, layout: Layout, ls: LayerStats | None) -> None:
    """Replace the layer's experts by one per group, and the router rows likewise.

    Memory: the merged experts are written into the layer's own expert tensors, slot j after group j is
    computed; that is safe when the groups are ordered by their smallest member (as every method orders
    them), since group j then reads only experts >= j. Only another order needs a second set of tensors.
    """
    family = layout.family
    if lp.num_experts != layer.num_experts:
        raise MoePruneError(f"plan layer {layer.index} is for {lp.num_experts} experts, the model has "
                            f"{layer.num_experts}: the plan was made for another model")
    slots = hash_slots(layer, lp, ls)            # before the experts change: a dropped expert's stand-in
    identity = layer.identity_slots              # router rows after the experts' (LongCat's zero experts): kept
    # every per-expert parameter ([E, ...]), nested ones too (Ergo's post_expert_norm.weight [E, H]), folded ones
    # as [E, I, ...] (DBRX); a parameter the experts share (Muse Spark's post_expert_norm.weight [H]) is left as it
    # is. Split experts (DBRX's gate, up, down apart) are merged, aligned and fitted as "halves" (MoeLayer.canonical)
    # through a view of the layer whose experts carry those tensors and their activation (what align reads)
    params = {n: p.detach() for n, p in layer.expert_params().items()}
    view, gate_up = layer.canonical_view()
    original = params if view is layer.experts else {n: getattr(view, n) for n in ("gate_up_proj", "down_proj")}
    seen = dataclasses.replace(layer, experts=view)
    names = list(original)
    in_place = all(min(a) < min(b) for a, b in zip(lp.groups, lp.groups[1:]))
    out = original if in_place else {n: t.new_empty((lp.keep, *t.shape[1:])) for n, t in original.items()}
    expert = lambda e: {n: original[n][e] for n in names}   # noqa: E731  one expert's tensors
    inputs = ls.inputs if ls is not None else None
    for j, (group, weights, rep) in enumerate(zip(lp.groups, lp.weights, lp.representatives)):
        members = [expert(e) for e in group]
        if plan.align != "none" and len(group) > 1:
            members = [m if e == rep else align_to(seen, expert(rep), m, gate_up, plan.align, inputs)
                       for e, m in zip(group, members)]
        one = {n: _merge([m[n] for m in members], weights) for n in names}
        if plan.merge == "fit" and len(group) > 1:
            one["down_proj"] = fit_down(seen, one, group, ls, layout, gate_up)
        for n in names:
            out[n][j] = one[n]
    kept = {n: out[n][:lp.keep] for n in names}
    for n, t in (kept if original is params else layer.native(kept, params)).items():
        _set_tensor(layer.experts, n, layer.stored(n, t))                  # folded back to [K * I, ...] (DBRX)

    for module, name, axis in layer.per_expert_tensors(family):
        t = get_tensor(module, name)
        if t is None:
            continue
        t = t.detach()
        if plan.router == "representative":
            rows = [t.select(axis, r) for r in lp.representatives]
        else:
            rows = [_merge([t.select(axis, e) for e in g], w) for g, w in zip(lp.groups, lp.weights)]
        extra = t.shape[axis] - lp.num_experts
        if extra not in (0, identity):
            raise MoePruneError(f"layer {layer.index}: {name} has {t.shape[axis]} entries along its expert axis, "
                                f"not the {lp.num_experts} experts (and {identity} identity slots) of the layer")
        rows += [t.select(axis, r) for r in range(lp.num_experts, t.shape[axis])]   # identity slots, after the kept
        _set_tensor(module, name, torch.stack(rows, dim=axis).contiguous())
    if slots is not None:                        # the token-id table names the new slots: same shape, ids < keep
        table = layer.hash_table
        _set_tensor(layer.router, family.hash_table, torch.as_tensor(slots, dtype=table.dtype,
                                                                     device=table.device)[table.long()])


def config_changes(layout: Layout, keep: int) -> dict[str, int]:
    """The config attributes that a prune to `keep` experts per layer changes, and their new values: the
    expert count; top-k when it exceeds `keep`; DeepSeek/GLM group-limited routing when the kept experts
    cannot form its groups (routing.group_routing_after)."""
    family, config = layout.family, layout.config
    changes = {family.n_experts_field: keep}
    if int(config_value(config, family.top_k_field)) > keep:
        changes[family.top_k_field] = keep
    if family.group_fields is not None:
        n_field, topk_field = family.group_fields
        n_group, topk_group = getattr(config, n_field, None) or 1, getattr(config, topk_field, None) or 1
        if group_routing_after(keep, n_group, topk_group) != (n_group, topk_group):
            changes.update({n_field: 1, topk_field: 1})
    return changes


def _ungrouped(layout: Layout, changes: dict[str, int]) -> bool:
    fields = layout.family.group_fields
    return fields is not None and all(changes.get(f) == 1 for f in fields)


def _update_attributes(root: nn.Module, before: int, keep: int, identity: int = 0, skip: set[int] = frozenset()) \
        -> None:
    """Every module attribute under `root` that holds the expert count or top-k (MoE blocks, routers,
    experts, and the causal-LM head's load-balancing loss) follows the new expert count; a count of the experts and
    `identity` slots together (LongCat's router.n_routed_experts) follows too. Modules whose id is in `skip` (the
    pruned MoE blocks' own, already updated) are left alone."""
    for module in root.modules():
        if id(module) in skip:
            continue
        for attr in _COUNT_ATTRS:
            value = getattr(module, attr, None)
            if not isinstance(value, int) or isinstance(value, bool):
                continue
            if value == before:
                setattr(module, attr, keep)
            elif identity and value == before + identity:
                setattr(module, attr, keep + identity)
        for attr in ("top_k", "num_experts_per_tok"):
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > keep:
                setattr(module, attr, keep)


@torch.no_grad()
def apply_layer(layer: MoeLayer, lp: LayerPlan, plan: Plan, layout: Layout, ls: LayerStats | None) -> None:
    """Prune/merge one MoE layer in place: its experts, router rows and module attributes (the engine's step)."""
    if plan.needs_stats and ls is None:
        raise MoePruneError("this plan (activation alignment or fitted merge) needs the calibration statistics")
    identity = layer.identity_slots
    merge_layer(layer, lp, plan, layout, ls)
    _update_attributes(layer.block, lp.num_experts, lp.keep, identity)
    if _ungrouped(layout, config_changes(layout, lp.keep)):      # group-limited routing falls back to one group
        for attr in ("num_group", "topk_group", "n_group"):
            if isinstance(getattr(layer.router, attr, None), int):
                setattr(layer.router, attr, 1)


def update_config(model: nn.Module, layout: Layout, before: int, keep: int) -> dict[str, int]:
    """After every layer: the config and the model-level attributes follow; returns the config changes."""
    changes = config_changes(layout, keep)
    if _ungrouped(layout, changes):
        n_field, topk_field = layout.family.group_fields
        warnings.warn(f"{keep} experts per layer cannot form {n_field}={getattr(layout.config, n_field)} groups of "
                      f"at least 2: group-limited routing falls back to {n_field}={topk_field}=1", stacklevel=3)
    # the blocks apply_layer pruned are done: their router's count of experts and identity slots (LongCat) may now
    # equal the old expert count
    done = {id(m) for layer in layout.layers if layer.num_experts == keep for m in layer.block.modules()}
    _update_attributes(model, before, keep, layout.layers[0].identity_slots, skip=done)
    for attr, value in changes.items():
        set_config_value(layout.config, attr, value)
    return changes


def check_plan(plan: Plan, layout: Layout) -> int:
    """Validate a plan against the model's MoE layers; returns the one expert count it keeps."""
    plan.validate()
    if plan.model_type and plan.model_type != layout.family.model_type:
        raise MoePruneError(f"the plan was made for another model (a {plan.model_type}; this one is a "
                            f"{layout.family.model_type}): plan this model (moeprune prune without --plan)")
    moe = {layer.index for layer in layout.layers}
    if set(plan.layers) != moe:
        raise MoePruneError(f"the plan covers layers {sorted(plan.layers)}, the model's MoE layers are "
                            f"{sorted(moe)}: the plan was made for another model")
    for layer in layout.layers:
        if plan.layers[layer.index].num_experts != layer.num_experts:
            raise MoePruneError(f"plan layer {layer.index} is for {plan.layers[layer.index].num_experts} experts, the "
                                f"model has {layer.num_experts}: the plan was made for another model")
    keeps = set(plan.keep_per_layer().values())
    if len(keeps) != 1:
        raise MoePruneError(f"transformers configs hold one expert count for all layers; this plan keeps {keeps}")
    keep = keeps.pop()
    if keep < layout.top_k:
        raise MoePruneError(f"the plan keeps {keep} experts per layer, below the model's top-k ({layout.top_k}): every "
                            f"token routes to {layout.top_k} experts; keep at least {layout.top_k}")
    return keep


@torch.no_grad()
def apply_plan(model: nn.Module, layout: Layout, plan: Plan, stats: Stats | None = None) -> None:
    """Prune/merge a model in memory according to `plan`; the config is updated to match."""
    keep = check_plan(plan, layout)
    before = layout.layers[0].num_experts
    if plan.needs_stats and stats is None:
        raise MoePruneError("this plan (activation alignment or fitted merge) needs the calibration statistics")
    for layer in layout.layers:
        apply_layer(layer, plan.layers[layer.index], plan, layout,
                    stats.layers[layer.index] if stats is not None else None)
    update_config(model, layout, before, keep)
