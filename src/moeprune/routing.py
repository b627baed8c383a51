"""Routing as data: recompute a layer's top-k routing from cached router logits, for any subset of experts.

NAEE (and any method that scores a subset of experts by the output of the pruned layer) needs the
routing the pruned model will do: the router keeps only the rows of the kept experts, so softmax,
top-k, renormalisation and group limits all act on the kept experts alone. A method never sees the
model, so the calibration pass records each layer's routing rule as plain data (`routing_rule`),
and `restricted_routing` replays it on the cached logits [n, E]. Restricting the logits to a subset
is exact, because a router's logit for an expert depends only on that expert's row (and bias).

The rule, per family (transformers 5.x router code):
    mixtral                 softmax, top-k, renormalise
    qwen2_moe/qwen3_moe/olmoe  softmax, top-k, renormalise if norm_topk_prob
    deepseek_v2             softmax, (group-limited: best max-score groups) top-k, x routed_scaling_factor
    deepseek_v3, glm4_moe   sigmoid, choice on sigmoid + correction bias within the best groups (sum of
                            the top-2 scores per group), weights = sigmoid, renormalise if norm_topk_prob,
                            x routed_scaling_factor
    ernie4_5_moe            softmax, choice on softmax + correction bias, weights = softmax, renormalise
    phimoe                  sparsemixer: top-1, then top-1 of the rest, each weighted by a softmax over the
                            experts within 2 x jitter_eps (relative) of it
    gpt_oss                 top-k of the logits, softmax over those k
    llama4                  top-k of the logits, weights = sigmoid (scaling the experts' input, not output)
    dbrx                    softmax, top-k, divided by their p-norm (moe_normalize_expert_weights; None: not)
    deepseek_v4 (inferred)  sqrt(softplus), choice on the scores + correction bias, renormalise,
                            x routed_scaling_factor; its first layers ("hash_moe") choose by a token-id table

A layer that chooses its experts by token id (DeepSeek-V4's hash layers: tid2eid[input_ids]) cannot be replayed
from logits: its rule ("select": "hash") holds the sample's recorded choices instead, and pruning sends the tokens
of a dropped expert to the kept expert whose output is nearest to its own on the calibration sample (`stand_ins`:
what surgery writes into the table and what the replay of a subset routes to).

A router that also scores identity (zero-computation) experts after the real ones (LongCat-Flash: logits [n, E + Z];
a token routed to one gets w * x from the block) keeps them in every subset: its rule holds their count
("identity_slots") and the sample's logits for them ("identity_logits" [n, Z]; the statistics' logits are the real
experts'), and the replay of a subset S scores S and the Z identity slots together, returning the slots as ids
E .. E + Z - 1 (what the pruned router, K + Z rows, does). A router whose slots are shared experts that every token
goes to (Inkling: rows E .. E + S - 1 of its weight, n_shared_experts) is recorded the same way, with "slots":
"shared": the choice is among the experts alone, and the chosen experts' scores and the slots' are renormalised
together, so the replay returns the slots' weights beside the experts' (ids E .., in every token's row) and a
subset changes them too.

Group-limited routing of a subset follows what surgery does to the pruned model: the kept experts, in
id order, form n_group consecutive groups when n_group divides their number; otherwise routing falls
back to one group (surgery._group_routing).
"""

from __future__ import annotations

import itertools

import torch

from .arch import Family, MoeLayer, MoePruneError, get_tensor
from .discover import SCORINGS

SELECT = ("topk", "sparsemixer")


def routing_rule(layer: MoeLayer, family: Family) -> dict:
    """The routing rule of one MoE layer as JSON-able data, read from its router module."""
    r = layer.router
    rule = {"scoring": family.scoring, "select": "topk", "topk_softmax": False, "renormalize": False,
            "norm_min": 1e-20, "scale": 1.0, "correction_bias": None, "n_group": 1, "topk_group": 1,
            "group_score": "max", "jitter_eps": 0.0}
    mt = family.model_type
    if mt == "mixtral":
        rule["renormalize"] = True
    elif mt in ("qwen2_moe", "qwen3_moe", "olmoe"):
        rule["renormalize"] = bool(r.norm_topk_prob)
    elif mt == "deepseek_v2":
        rule["scale"] = float(r.routed_scaling_factor)
        if r.topk_method == "group_limited_greedy":
            rule.update(n_group=int(r.num_group), topk_group=int(r.topk_group), group_score="max")
        elif r.topk_method != "greedy":
            raise MoePruneError(f"deepseek_v2 topk_method {r.topk_method!r} is not supported")
    elif mt in ("deepseek_v3", "glm4_moe"):
        rule.update(renormalize=bool(r.norm_topk_prob), scale=float(r.routed_scaling_factor),
                    correction_bias=r.e_score_correction_bias.detach().float().flatten().tolist(),
                    n_group=int(r.num_group), topk_group=int(r.topk_group), group_score="top2_sum")
    elif mt == "ernie4_5_moe":
        bias = get_tensor(r, "moe_statics.e_score_correction_bias")
        rule.update(renormalize=True, norm_min=float(r.norm_min),
                    correction_bias=bias.detach().float().flatten().tolist())
    elif mt == "phimoe":
        rule.update(select="sparsemixer", jitter_eps=float(r.router_jitter_noise))
    elif mt == "gpt_oss":
        rule["topk_softmax"] = True
    elif mt in ("llama4", "llama4_text"):
        pass                          # sigmoid of the top-k logits, not renormalised
    elif mt == "dbrx":                # the block's route_tokens_to_experts
        p = layer.block.moe_normalize_expert_weights
        if p is not None:
            rule.update(renormalize=True, norm_p=float(p), norm_min=0.0)
    else:
        return {}                     # a family found by structure: inferred from the router's own choices
    return rule


def _base_rule(scoring: str) -> dict:
    return {"scoring": scoring, "select": "topk", "topk_softmax": False, "renormalize": False, "norm_min": 1e-20,
            "scale": 1.0, "correction_bias": None, "n_group": 1, "topk_group": 1, "group_score": "max",
            "jitter_eps": 0.0}


# a router's own bias of the scores for the choice: DeepSeek-V3 style, Zaya's (its skip slot's entry -1)
_BIASES = ("e_score_correction_bias", "balancing_biases")


def correction_bias(layer: MoeLayer) -> torch.Tensor | None:
    """The per-expert bias added to the scores for the choice only: the router's own (DeepSeek-V3 style, Zaya's
    balancing_biases), or the block's that the router is handed (MiniMax-M2's e_score_correction_bias, AFMoE's
    expert_bias)."""
    bias = next((b for b in (getattr(layer.router, n, None) for n in _BIASES) if torch.is_tensor(b)), None)
    args = layer.family.router_args if layer.family else ()
    if bias is None and args:
        bias = get_tensor(layer.block, args[0])
    return bias


@torch.no_grad()
def slot_kind(layer: MoeLayer, x: torch.Tensor) -> str | None:
    """What a router that chooses its slots beside its experts gives a token routed to one: "identity" (a weight:
    LongCat-Flash's block adds w * x) or "skip" (none: Zaya masks it as expert 0 of weight 0), probed on inputs x
    with its choice bias raised on the slots; None when it cannot be probed (no bias over the slots)."""
    E, S = layer.num_experts, layer.identity_slots
    bias = correction_bias(layer)
    if not torch.is_tensor(bias) or bias.is_meta or bias.numel() != E + S or not x.numel():
        return None
    saved = bias.detach().clone()
    try:
        bias.data[E:] += 1e4
        weight = next(layer.router.parameters())
        _, w, i = layer.route(x[:8].to(weight.device, weight.dtype))
    finally:
        bias.data.copy_(saved)
    slot = i >= E
    if not bool(slot.any()):
        return None
    return "skip" if bool((w[slot] == 0).all()) else "identity"


def _group_limits(router, E: int) -> list[dict]:
    """The group-limited choices a router may make, most specific first: DeepSeek-V3-style routers (26 families in
    transformers 5.25: DeepSeek-V3.2, AXK1, Beam, ...) hold num_group and topk_group and choose among the experts of
    the topk_group groups of highest score (the sum of each group's two best, or its best, as DeepSeek-V2 does)."""
    n, k = getattr(router, "num_group", None), getattr(router, "topk_group", None)
    if isinstance(n, int) and isinstance(k, int) and 1 < n and E % n == 0 and 0 < k < n:
        return [{"n_group": n, "topk_group": k, "group_score": score} for score in ("top2_sum", "max")] + [{}]
    return [{}]


def inferred_rule(layer: MoeLayer, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                  top_k: int, slots: str | None = None) -> dict:
    """The routing rule of a family moeprune has no entry for, read off the router's own decisions on calibration
    tokens: the candidate (softmax or sigmoid scores, plus the router's correction bias if it has one; top-k of the
    scores, within the router's best groups where it holds num_group and topk_group, or softmax over the top-k
    logits; renormalised or not; a constant scale) that reproduces every token's
    chosen experts and their weights. {} when none does (then NAEE, which replays routing, refuses the layer).
    A layer that chooses by token id is read by `hash_rule` instead."""
    if logits.numel() == 0:
        return {}
    bias = correction_bias(layer)
    bias = bias.detach().float().flatten().tolist() if torch.is_tensor(bias) and not bias.is_meta else None
    # a router that returns its weights in bfloat16 / float16 (a model run in it) rounds them: within two of its
    # epsilons of the rule's, against 1e-3 in float32
    rtol = max(1e-3, 2 * torch.finfo(weights.dtype).eps) if weights.is_floating_point() else 1e-3
    want = weights.double()
    chosen = indices.sort(dim=-1).values
    E = layer.num_experts
    identity = {}
    if logits.shape[1] > E:                # identity slots scored after the real experts (LongCat-Flash)
        identity = {"identity_slots": logits.shape[1] - E, "identity_logits": logits[:, E:].tolist()}
        logits = logits[:, :E]
    # identity slots are chosen beside the experts (LongCat), skip slots too but give nothing (Zaya: weight 0);
    # shared slots are every token's (Inkling)
    # ("slots": the kind slot_kind probed, where the sample's choices cannot tell)
    modes = ({}, {"slots": "skip"}, {"slots": "shared"}) if identity else ({},)
    modes = tuple(m for m in modes if slots is None or m.get("slots", "identity") in (slots, "shared"))
    for scoring, topk_softmax, renormalize, mode, groups in itertools.product(
            SCORINGS, (False, True), (True, False), modes, _group_limits(layer.router, E)):
        biased = E if mode.get("slots") == "shared" else E + identity.get("identity_slots", 0)
        if mode and topk_softmax or bias is not None and len(bias) != biased:
            continue                       # no such router: its bias covers the rows its choice is among
        rule = {**_base_rule(scoring), "topk_softmax": topk_softmax, "renormalize": renormalize,
                "correction_bias": bias, **identity, **mode, **groups}
        w, idx = restricted_routing(logits, range(E), rule, top_k)
        order = idx.sort(dim=-1)
        if order.values.shape != chosen.shape or not torch.equal(order.values, chosen):
            continue
        got = w.gather(-1, order.indices)
        mine = want.gather(-1, indices.argsort(dim=-1))
        scale = float((mine.sum() / got.sum().clamp_min(1e-30)))
        if torch.allclose(got * scale, mine, rtol=rtol, atol=1e-6):
            return {**rule, "scale": round(scale, 6)}
    return {}


def hash_rule(logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> dict:
    """The rule of a layer that chooses its experts by token id (DeepSeek-V4's tid2eid): the sample's recorded
    choices [n, k] ("chosen"), weighted by the scoring, renormalisation and constant scale that reproduce the
    router's weights from its logits at them. {} when none does."""
    if logits.numel() == 0:
        return {}
    logits, want = logits.double(), weights.double()
    for scoring, fn in SCORINGS.items():
        picked = fn(logits).gather(-1, indices)
        for renormalize in (True, False):
            got = picked / picked.sum(-1, keepdim=True).clamp_min(1e-20) if renormalize else picked
            scale = float(want.sum() / got.sum().clamp_min(1e-30))
            if torch.allclose(got * scale, want, rtol=1e-3, atol=1e-6):
                return {**_base_rule(scoring), "select": "hash", "renormalize": renormalize, "scale": round(scale, 6),
                        "chosen": indices.tolist()}
    return {}


# the entries of a rule that record one value per sample token, in the sample's order
PER_TOKEN = ("chosen", "identity_logits")


def join_rules(first: dict, second: dict) -> dict:
    """The rule of two token samples joined, `first`'s tokens then `second`'s (statistics combined from two passes,
    their logits concatenated likewise): the per-token records (PER_TOKEN) are concatenated, the rest is `first`'s."""
    if not first or not second:
        return first or second
    out = dict(first)
    for key in PER_TOKEN:
        if key in first or key in second:
            out[key] = list(first.get(key, [])) + list(second.get(key, []))
    return out


@torch.no_grad()
def output_distance(chunks) -> torch.Tensor:
    """[E, E] float64: the mean over the sample of ||E_i(x) - E_j(x)||^2, from every expert's outputs [E, c, d] on
    the sample, a chunk of tokens at a time (`ls.outputs.split(64, dim=1)`): no float64 copy of all outputs."""
    gram, n = None, 0
    for o in chunks:
        o2 = o.reshape(o.shape[0], -1).double()
        gram = o2 @ o2.T if gram is None else gram + o2 @ o2.T
        n += o.shape[1]
    sq = gram.diagonal()
    return ((sq[:, None] + sq[None, :] - 2 * gram) / max(n, 1)).clamp_min(0.0)


def stand_ins(distance: torch.Tensor | None, kept: torch.Tensor, E: int) -> torch.Tensor:
    """For each subset of the E expert ids kept [B, K]: [B, E], the expert every original expert's tokens go to in
    a layer that chooses by token id: itself when kept, else the kept expert of least output distance to it (the
    lowest id on ties)."""
    B, K = kept.shape
    out = torch.arange(E).expand(B, E).clone()
    is_kept = torch.zeros(B, E, dtype=torch.bool).scatter_(1, kept, True)
    if bool(is_kept.all()):
        return out
    if distance is None:
        raise MoePruneError("the layer chooses its experts by token id (a hash table): where a dropped expert's "
                            "tokens go is chosen from the experts' outputs on the calibration sample, which these "
                            "statistics do not hold; recollect them with expert outputs")
    d = distance.double()[:, kept].permute(1, 0, 2)                      # [B, E, K]
    nearest = kept.gather(1, d.argmin(dim=-1))                           # argmin: the first (lowest id) on ties
    return torch.where(is_kept, out, nearest)


def group_routing_after(keep: int, n_group: int, topk_group: int) -> tuple[int, int]:
    """(n_group, topk_group) of group-limited routing once `keep` experts remain per layer.

    The kept experts, in id order, form n_group consecutive groups. That needs n_group to divide
    `keep` and at least 2 experts per group (DeepSeek-V3/GLM score a group by its top-2 sum); else
    routing falls back to one group. Surgery and the replayed routing both follow this one rule.
    """
    if n_group > 1 and keep % n_group == 0 and keep // n_group >= 2 and topk_group <= n_group:
        return n_group, topk_group
    return 1, 1


def _group_mask(choice: torch.Tensor, n_group: int, topk_group: int, group_score: str) -> torch.Tensor:
    """[..., K] bool: the experts in each token's best `topk_group` of `n_group` consecutive groups."""
    *lead, K = choice.shape
    grouped = choice.reshape(*lead, n_group, K // n_group)
    if group_score == "max":
        scores = grouped.max(dim=-1).values
    else:   # "top2_sum"; a group of one expert scores that expert alone
        scores = grouped.topk(min(2, K // n_group), dim=-1).values.sum(dim=-1)
    best = scores.topk(topk_group, dim=-1).indices
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, best, True)
    return mask.unsqueeze(-1).expand(*lead, n_group, K // n_group).reshape(*lead, K)


def _sparsemixer(logits: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's top-2 sparsemixer in inference mode (transformers' `sparsemixer`, training=False)."""
    weights, indices = [], []
    scores = logits
    for _ in range(2):
        top, idx = scores.max(dim=-1, keepdim=True)
        factor = logits.abs().clamp(min=top)
        masked = scores.masked_fill((top - logits) / factor > 2 * eps, float("-inf"))
        weights.append(torch.softmax(masked, dim=-1).gather(-1, idx))
        indices.append(idx)
        scores = scores.scatter(-1, idx, float("-inf"))
    return torch.cat(weights, dim=-1), torch.cat(indices, dim=-1)


def restricted_routing(logits: torch.Tensor, subset, routing: dict, top_k: int,
                       distance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing of a layer pruned to `subset`, replayed on its router logits [n, E] (float64).

    `subset`: expert ids (any order), or a LongTensor [B, K] of B subsets at once.
    Returns (weights [n, k], indices [n, k]), or [B, n, k] each for B subsets, with indices in the
    original expert ids and k = min(top_k, K) (2 for PhiMoE's sparsemixer); identity slots (`identity_slots` in the
    rule: LongCat-Flash) are in every subset, as ids E .. E + Z - 1. Column order within a row
    is not meaningful (some routers use unsorted top-k). A layer that chooses by token id (select "hash") routes
    the recorded choices, a dropped expert's to its stand-in (`stand_ins`, from `distance`, output_distance of the
    sample: needed once a chosen expert is dropped); an index may then repeat (its weights add, as in the model).
    """
    if not routing:
        raise MoePruneError("these statistics carry no routing rule; recollect them with this version of moeprune")
    batched = torch.is_tensor(subset) and subset.dim() == 2
    ids = (subset if batched else torch.as_tensor([int(e) for e in subset], dtype=torch.long)[None]).sort(-1).values
    B, K = ids.shape
    n = logits.shape[0]
    real_k = K
    Z = int(routing.get("identity_slots") or 0)
    shared = Z and routing.get("slots") == "shared"
    if shared and routing["select"] != "topk":
        raise MoePruneError(f"a router with shared slots selects by top-k, not {routing['select']!r}")
    if Z:                                       # identity experts after the real ones: in every subset, ids E ..
        extra = torch.as_tensor(routing["identity_logits"], dtype=torch.float64).reshape(-1, Z)
        if extra.shape[0] != n:
            raise MoePruneError(f"the layer's router scores {Z} identity experts and its rule records their logits on "
                                f"{extra.shape[0]} sample tokens, but the statistics hold {n}: they were joined "
                                "without joining the rule's identity_logits (routing.join_rules)")
        E = logits.shape[1]
        logits = torch.cat([logits.double(), extra], dim=1)
        ids = torch.cat([ids, torch.arange(E, E + Z).expand(B, Z)], dim=1)
        K += Z
    k = min(top_k, K - Z if shared else K)
    x = logits.double().T[ids].transpose(1, 2)                           # [B, n, K]

    def done(weights: torch.Tensor, local: torch.Tensor):
        """local positions in the subset -> original expert ids; drop the batch axis for one subset."""
        indices = ids.unsqueeze(1).expand(B, n, K).gather(-1, local)
        return (weights, indices) if batched else (weights[0], indices[0])

    if routing["select"] == "hash":
        chosen = torch.as_tensor(routing["chosen"], dtype=torch.long)
        if chosen.dim() != 2 or chosen.shape[0] != n:
            raise MoePruneError(f"the layer chooses its experts by token id and its rule records the choices of "
                                f"{chosen.shape[0]} sample tokens, but the statistics hold {n}: they were joined "
                                "without joining the recorded choices (routing['chosen'])")
        go = stand_ins(distance, ids, logits.shape[1]).gather(1, chosen.reshape(1, -1).expand(B, -1))
        local = torch.searchsorted(ids, go).reshape(B, n, chosen.shape[1])        # positions in the (sorted) subset
        scores = SCORINGS[routing["scoring"]](x)
        weights = scores.gather(-1, local)
        if routing["renormalize"]:
            weights = _renormalised(weights, routing)
        return done(weights * routing["scale"], local)
    if routing["select"] == "sparsemixer":
        if K < 2:
            raise MoePruneError("PhiMoE's sparsemixer routes every token to 2 experts; keep at least 2")
        return done(*_sparsemixer(x, routing["jitter_eps"]))
    if routing["topk_softmax"]:                                           # GPT-OSS
        top, local = x.topk(k, dim=-1)
        return done(torch.softmax(top, dim=-1), local)
    if shared:                                  # the slots: every token's, after the top-k of the experts alone
        return _with_shared_slots(x, K - Z, k, routing, ids, done)
    scores = SCORINGS[routing["scoring"]](x)
    choice = scores
    if routing["correction_bias"] is not None:
        choice = scores + torch.tensor(routing["correction_bias"], dtype=torch.float64)[ids].unsqueeze(1)
    n_group, topk_group = group_routing_after(real_k, routing["n_group"], routing["topk_group"])
    if n_group > 1 and Z:
        raise MoePruneError("group-limited routing beside identity experts is not a router moeprune knows")
    if n_group > 1:
        keep = _group_mask(choice, n_group, topk_group, routing["group_score"])
        # DeepSeek-V2 masks with 0 (softmax scores are >= 0), DeepSeek-V3/GLM with -inf
        choice = choice.masked_fill(~keep, 0.0 if routing["group_score"] == "max" else float("-inf"))
    local = choice.topk(k, dim=-1).indices
    weights = scores.gather(-1, local)
    if routing["renormalize"]:
        weights = _renormalised(weights, routing)
    if Z and routing.get("slots") == "skip":      # a token routed to a skip slot gets nothing (Zaya)
        weights = weights.masked_fill(local >= K - Z, 0.0)
    return done(weights * routing["scale"], local)


def _with_shared_slots(x: torch.Tensor, K: int, k: int, routing: dict, ids: torch.Tensor, done):
    """Inkling's router on the logits x [B, n, K + S] of a subset's K experts and the S shared slots: the top-k of
    the experts' scores (plus the correction bias) are chosen, and their scores and the slots' are renormalised
    together and scaled; returns the chosen experts' then the slots' (weights, local positions) [B, n, k + S]."""
    if routing["topk_softmax"] or routing["n_group"] > 1:
        raise MoePruneError("shared slots beside top-k softmax or group-limited routing is not a router moeprune knows")
    scores = SCORINGS[routing["scoring"]](x)
    choice = scores[..., :K]
    if routing["correction_bias"] is not None:
        choice = choice + torch.tensor(routing["correction_bias"], dtype=torch.float64)[ids[:, :K]].unsqueeze(1)
    B, n = x.shape[:2]
    local = torch.cat([choice.topk(k, dim=-1).indices,
                       torch.arange(K, x.shape[-1]).expand(B, n, x.shape[-1] - K)], dim=-1)
    weights = scores.gather(-1, local)
    if routing["renormalize"]:
        weights = _renormalised(weights, routing)
    return done(weights * routing["scale"], local)


def _renormalised(weights: torch.Tensor, routing: dict) -> torch.Tensor:
    """The top-k weights divided by their sum, or by their p-norm (DBRX's moe_normalize_expert_weights)."""
    p = routing.get("norm_p", 1.0)
    total = weights.sum(dim=-1, keepdim=True) if p == 1.0 else weights.norm(p=p, dim=-1, keepdim=True)
    return weights / total.clamp_min(routing["norm_min"])
