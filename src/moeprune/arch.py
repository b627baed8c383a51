"""Where the routed experts live: found by structure, with a table for what structure cannot tell.

transformers 5.x builds every routed MoE the same way: a fused `*Experts` module whose tensors carry the expert
index on axis 0, and a router whose forward returns `(router_logits, topk_weights, topk_indices)`. moeprune finds
that by structure (moeprune.discover), on a built model or the meta-device skeleton of a checkpoint, so a model
type needs no entry here when nothing about it is special. The entries below are the exceptions, each for a fact
the skeleton does not show: GPT-OSS interleaves gate and up columns (same shapes as halves), ERNIE-4.5 scores by
softmax although its router carries a correction bias, Llama 4's router and experts have another contract, DBRX's
router returns its logits only (the block chooses the experts). How
each known family routes (renormalised or not, group-limited, sparsemixer) is in moeprune.routing; the tests
check every entry against discovery.

    layout = moe_layout(model)      # -> Layout with one MoeLayer per MoE decoder layer
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Literal

import torch
from torch import nn


from .discover import MoeStructure, check_contract, find_moe
from .errors import MoePruneError, NotMoE


@dataclass(frozen=True)
class Family:
    model_type: str
    # config fields holding the routed expert count and the top-k, dotted when nested in a sub-config of the language
    # model's config (DBRX's "ffn_config.moe_num_experts")
    n_experts_field: str
    top_k_field: str = "num_experts_per_tok"
    block: str = "mlp"                   # decoder-layer attribute holding the MoE block
    router: str = "gate"                 # MoE-block attribute holding the router
    experts: str = "experts"             # MoE-block attribute holding the fused routed experts
    shared: tuple[str, ...] = ()         # shared experts (and their gates): never touched
    # router tensors that hold one entry per expert, with the axis of the expert index
    router_tensors: tuple[tuple[str, int], ...] = (("weight", 0),)
    # per-expert tensors the MoE block holds itself (MiniMax-M2's e_score_correction_bias), cut like router rows
    block_tensors: tuple[tuple[str, int], ...] = ()
    router_args: tuple[str, ...] = ()    # block tensors the router's forward takes after the hidden states
    # a router of another contract: (the MoeLayer, its router's output) -> (logits [n, E], weights [n, k],
    # indices [n, k])
    read_router: Callable[[MoeLayer, tuple], tuple] | None = None
    # experts of another call than (hidden, top_k_index, top_k_weights): (experts module, x [n, d], e) -> E_e(x)
    expert_fn: Callable[[nn.Module, torch.Tensor, int], torch.Tensor] | None = None
    # how router logits become scores: softmax, sigmoid, or DeepSeek-V4's sqrt(softplus(logit))
    scoring: Literal["softmax", "sigmoid", "sqrtsoftplus"] = "softmax"
    # gate_up layout: "halves" = gate_up_proj [E, 2I, H], gate rows then up rows (down_proj [E, H, I]);
    # "interleaved" = gate and up rows alternating; "plain" = no gate, up_proj [E, I, H]; each with a "_t" form
    # stored [E, H, ...] (x @ W; down_proj [E, I, H]): GPT-OSS is "interleaved_t", Llama 4 "halves_t"
    gate_up: str = "halves"
    # "split" experts (gate, up and down stored apart, e.g. DBRX's w1, v1, w2): the tensors stored x @ W per expert
    # ([in, out], DBRX's w2); the others are nn.Linear's [out, in]
    transposed: tuple[str, ...] = ()
    # experts tensors that fold the expert axis into axis 0: [E * I, ...], expert e's rows e*I .. (e+1)*I (DBRX's
    # w1, v1, w2 [E * I, H]); read and written through the view [E, I, ...]
    folded: tuple[str, ...] = ()
    group_fields: tuple[str, str] | None = None          # (n_group, topk_group) config fields
    # a router buffer [vocab, top_k] of expert ids: a router that holds it chooses its experts by token id (it is
    # handed the batch's input_ids), not by its logits; surgery rewrites the ids (DeepSeek-V4's hash layers)
    hash_table: str = ""
    # a config field counting identity (zero-computation) experts that the router scores after the real ones: its
    # tensors have E + that many rows, a token routed to one gets w * x from the block (LongCat-Flash's
    # zero_expert_num). Pruning keeps those rows after the kept experts'; they are not experts to keep or drop
    identity_experts: str = ""


def _llama4_router(layer: MoeLayer, output: tuple) -> tuple:
    """Llama 4's router returns (scores [n, E]: sigmoid of the top-k logits, 0 elsewhere; logits [n, E])."""
    scores, logits = output
    indices = logits.topk(layer.router.top_k, dim=-1).indices
    return logits, scores.gather(-1, indices), indices


def _block_router(layer: MoeLayer, output: torch.Tensor) -> tuple:
    """A router that returns its logits only, the block choosing the experts (DBRX: DbrxFFN.route_tokens_to_experts,
    softmax, top-k, divided by a p-norm): the block's own code turns them into weights and indices."""
    logits = output.reshape(-1, output.shape[-1])
    weights, indices = layer.block.route_tokens_to_experts(logits)
    return logits, weights, indices


def _llama4_expert(experts: nn.Module, x: torch.Tensor, e: int) -> torch.Tensor:
    """One of Llama4TextExperts (gate_up [E, H, 2I], gate first; down [E, I, H]) on x, unscaled. Its forward runs
    every expert on every token, the input scaled by the routing score: not a per-expert call."""
    gate, up = (x @ experts.gate_up_proj[e]).chunk(2, dim=-1)
    return (up * experts.act_fn(gate)) @ experts.down_proj[e]


FAMILIES: dict[str, Family] = {f.model_type: f for f in [
    Family("ernie4_5_moe", "moe_num_experts", top_k_field="moe_k", shared=("shared_experts",),
           router_tensors=(("weight", 0), ("moe_statics.e_score_correction_bias", 1))),
    Family("gpt_oss", "num_local_experts", router="router", router_tensors=(("weight", 0), ("bias", 0)),
           gate_up="interleaved_t"),
    *(Family(t, "num_local_experts", block="feed_forward", router="router", shared=("shared_expert",),
             scoring="sigmoid", gate_up="halves_t", read_router=_llama4_router, expert_fn=_llama4_expert)
      for t in ("llama4_text", "llama4")),
    # DeepSeek-V4: the first layers (mlp_layer_types "hash_moe") choose experts by a token-id table, the others by
    # top-k of sqrt(softplus(logits)) + a correction bias; the skeleton's first MoE layer shows neither the bias the
    # later routers hold nor the scoring
    Family("deepseek_v4", "n_routed_experts", shared=("shared_experts",), scoring="sqrtsoftplus",
           router_tensors=(("weight", 0), ("e_score_correction_bias", 0)), hash_table="tid2eid"),
    # DBRX: the router returns logits only (the block computes top-k); the rest is what structure finds: experts
    # folded [E * I, H] (w1 gate, v1 up, w2 down stored x @ W), counts nested in ffn_config
    Family("dbrx", "ffn_config.moe_num_experts", top_k_field="ffn_config.moe_top_k", block="ffn", router="router",
           router_tensors=(("layer.weight", 0),), read_router=_block_router, gate_up="split", transposed=("mlp.w2",),
           folded=("mlp.w1", "mlp.v1", "mlp.w2")),
]}


@dataclass
class MoeLayer:
    """One MoE decoder layer: live references into the model."""
    index: int                 # decoder layer index
    block: nn.Module           # the MoE block (router + experts + shared experts)
    router: nn.Module
    experts: nn.Module
    family: Family | None = None         # how to call the router and the experts (None: the common contract)

    @classmethod
    def of(cls, index: int, block: nn.Module, family: Family) -> MoeLayer:
        return cls(index, block, get_tensor(block, family.router), get_tensor(block, family.experts), family)

    @property
    def num_experts(self) -> int:
        if self.family is not None and self.family.folded:          # [E * I, ...]: the router's rows say E
            name, axis = self.family.router_tensors[0]
            return get_tensor(self.router, name).shape[axis]
        return next(iter(self.experts.parameters())).shape[0]

    def expert_params(self) -> dict[str, torch.Tensor]:
        """Every per-expert parameter of the experts module as [E, ...] (nested ones too: Ergo's
        post_expert_norm.weight [E, H]); a folded one ([E * I, ...], DBRX) as its view [E, I, ...]. A parameter the
        experts share (Muse Spark's post_expert_norm.weight [H]) is not one."""
        E, folded = self.num_experts, set(self.family.folded if self.family is not None else ())
        out = {}
        for name, p in self.experts.named_parameters():
            if name in folded:
                out[name] = p.unflatten(0, (E, p.shape[0] // E))
            elif p.dim() and p.shape[0] == E:
                out[name] = p
        return out

    def stored(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """A per-expert parameter [K, ...] as the experts module stores it: folded back to [K * I, ...]."""
        folded = self.family.folded if self.family is not None else ()
        return t.flatten(0, 1) if name in folded else t

    def canonical(self, tensors: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], str]:
        """Experts tensors (`tensors`: the expert_params() names, [E, ...] or one expert's; default expert_params())
        in a layout moeprune's alignment, fitted merge and weight similarity read, with that layout's name: as they
        are, except "split" experts (gate, up, down stored apart: DBRX), given as "halves" (gate_up_proj [.., 2I, H],
        gate rows first; down_proj [.., H, I]); `native` reverses it."""
        tensors = self.expert_params() if tensors is None else tensors
        family = self.family
        if family is None or family.gate_up != "split":
            return tensors, family.gate_up if family is not None else "halves"
        roles = _split_roles(tensors)
        linear = lambda n: tensors[n].transpose(-1, -2) if n in family.transposed else tensors[n]   # noqa: E731
        return {"gate_up_proj": torch.cat([linear(roles["gate"]), linear(roles["up"])], dim=-2),
                "down_proj": tensors[roles["down"]] if roles["down"] not in family.transposed
                else tensors[roles["down"]].transpose(-1, -2)}, "halves"

    def native(self, canonical: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`canonical` (from `canonical(like)`) back under the names and orientations of `like`."""
        family = self.family
        if family is None or family.gate_up != "split":
            return canonical
        roles = _split_roles(like)
        gate, up = canonical["gate_up_proj"].chunk(2, dim=-2)
        out = {roles["gate"]: gate, roles["up"]: up, roles["down"]: canonical["down_proj"]}
        return {n: (t.transpose(-1, -2) if n in family.transposed else t).contiguous() for n, t in out.items()}

    def canonical_view(self) -> tuple[object, str]:
        """(an object with the experts' canonical tensors as attributes and their activation act_fn, its layout):
        what weight similarity and alignment read of the experts module (moeprune.similarity, moeprune.align)."""
        if self.family is None or self.family.gate_up != "split":
            return self.experts, self.family.gate_up if self.family is not None else "halves"
        tensors, layout = self.canonical({n: t.detach() for n, t in self.expert_params().items()})
        act = next((getattr(m, a) for m in self.experts.modules() for a in ("act_fn", "activation_fn")
                    if callable(getattr(m, a, None))), None)
        return SimpleNamespace(**tensors, act_fn=act), layout

    @property
    def identity_slots(self) -> int:
        """How many slots the router scores after the experts: its rows beyond the experts module's count (LongCat-
        Flash's identity experts, Inkling's shared experts, Zaya's skip expert); 0 for a router of E rows."""
        if self.family is None:
            return 0
        name, axis = self.family.router_tensors[0]
        weight = get_tensor(self.router, name)
        return max(weight.shape[axis] - self.num_experts, 0) if weight is not None else 0

    @property
    def hash_table(self) -> torch.Tensor | None:
        """The router's token-id -> expert-ids table [vocab, top_k] when it chooses its experts by token id
        (DeepSeek-V4's hash layers), else None."""
        name = self.family.hash_table if self.family is not None else ""
        return get_tensor(self.router, name) if name else None

    def route(self, x: torch.Tensor, input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                       torch.Tensor]:
        """The model's own routing of x [n, d]: (logits [n, E], top-k weights [n, k], top-k indices [n, k]).
        Routers take [n, d] or, like AFMoE's, [1, n, d]; a router that chooses by token id also takes the tokens'
        ids [n]. The statistics observer reads the router's decisions as the block asks for them instead
        (moeprune.observer)."""
        args = tuple(get_tensor(self.block, n) for n in (self.family.router_args if self.family else ()))
        if self.hash_table is not None:
            if input_ids is None:
                raise MoePruneError(f"layer {self.index} chooses its experts by token id: route(x, input_ids)")
            args = (input_ids.reshape(-1), *args)
        try:
            out = self.router(x, *args)
        except (ValueError, RuntimeError, IndexError):      # a router of [1, n, d] (AFMoE, Zaya)
            out = self.router(x[None], *args)
        return self.decisions(out, x)

    def decisions(self, output: tuple, hidden: torch.Tensor | None = None) \
            -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [n, E], top-k weights [n, k], top-k indices [n, k]) from what the router returned (its input
        `hidden`). A router that routes every token to its slots as well and returns their weights apart (Inkling's
        shared experts: logits [n, E], then their gammas [n, S]) gives them as LongCat's identity slots are given:
        logits [n, E + S] (the slots' computed from its rows after the experts'), weights and indices [n, k + S]
        with the slots as ids E .. E + S - 1."""
        read = self.family.read_router if self.family else None
        out = read(self, output) if read is not None else output[:3]
        logits, weights, indices = (t.reshape(-1, t.shape[-1]) for t in out)
        S = self.identity_slots
        if read is None and S and logits.shape[-1] == self.num_experts + S:
            # a router that masks a chosen slot as expert 0 of weight 0 (Zaya's skip expert: no output) names it again
            masked = weights == 0
            if bool(masked.any()):
                slot = self.num_experts + logits[:, self.num_experts:].argmax(-1, keepdim=True).to(indices.dtype)
                indices = torch.where(masked, slot.expand_as(indices), indices)
        if read is None and S and len(output) > 3 and logits.shape[-1] == self.num_experts:
            if hidden is None:
                raise MoePruneError(f"layer {self.index}: the router routes to {S} slots apart from its experts; "
                                    "their logits need its input: decisions(output, hidden)")
            E, n = self.num_experts, logits.shape[0]
            logits = torch.cat([logits, self.slot_logits(hidden, logits).to(logits.dtype)], dim=-1)
            weights = torch.cat([weights, output[3].reshape(n, S).to(weights.dtype)], dim=-1)
            indices = torch.cat([indices, torch.arange(E, E + S, device=indices.device).expand(n, S)
                                 .to(indices.dtype)], dim=-1)
        return logits, weights, indices

    def slot_logits(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """[n, S]: the router's logits of its slot rows (those after the experts' rows) on its input `hidden`, as it
        computes the experts' `logits` [n, E]: the hidden states times its weight's rows (checked on the experts')."""
        name, axis = self.family.router_tensors[0]
        weight = get_tensor(self.router, name)
        x = hidden.reshape(-1, weight.shape[1 - axis]).float()
        full = torch.nn.functional.linear(x, (weight if axis == 0 else weight.T).float())
        E = self.num_experts
        if not torch.allclose(full[:, :E], logits.float(), rtol=1e-3, atol=1e-4):
            raise MoePruneError(f"layer {self.index}: the router's logits are not its input times its {name} rows, "
                                f"so the logits of its {full.shape[1] - E} rows after the experts' cannot be "
                                "computed; moeprune cannot observe this router")
        return full[:, E:]

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """E_e(x) for every row of x [n, d], through the model's own experts module (weight 1, no routing)."""
        return self.expert_rows(x, torch.full((x.shape[0],), e, dtype=torch.long, device=x.device))

    def expert_rows(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """E_ids[m](x[m]) for every row m of x [m, d]: each row through its own expert, in one call of the model's
        experts module (each row routed to its expert alone with weight 1), so that many experts' outputs cost one
        dispatch, not one per expert (256 per chunk for DeepSeek-V4)."""
        m = x.shape[0]
        if self.family is None or self.family.expert_fn is None:
            # [m, d] (DBRX's experts return [m, 1, d] for a 2-D input)
            return self.experts(x, ids.reshape(m, 1), torch.ones((m, 1), dtype=x.dtype, device=x.device)).reshape(m, -1)
        parts = []                                   # an entry's own expert function: one expert at a time
        for e in ids.unique().tolist():
            rows = (ids == e).nonzero().flatten()
            parts.append((rows, self.family.expert_fn(self.experts, x[rows], e).reshape(rows.numel(), -1)))
        out = x.new_empty((m, parts[0][1].shape[1] if parts else x.shape[1]))
        for rows, y in parts:
            out[rows] = y
        return out

    def every_expert(self, x: torch.Tensor) -> torch.Tensor:
        """[E, n, d]: every expert on every row of x [n, d], in one call (expert_rows)."""
        E, n = self.num_experts, x.shape[0]
        ids = torch.arange(E, device=x.device).repeat_interleave(n)
        return self.expert_rows(x.repeat(E, 1), ids).reshape(E, n, -1)

    def per_expert_tensors(self, family: Family) -> list[tuple[nn.Module, str, int]]:
        """(module, dotted name, expert axis) of every tensor outside the experts with one entry per expert: the
        router's rows (and bias, correction bias) and the block's own per-expert tensors."""
        return [(self.router, n, a) for n, a in family.router_tensors] + \
            [(self.block, n, a) for n, a in family.block_tensors]


@dataclass
class Layout:
    """The MoE layers of one model and the family that describes them."""
    family: Family
    config: object             # the language model's PretrainedConfig (updated in place by surgery)
    layers: list[MoeLayer] = field(default_factory=list)
    # where `config` sits in config.json: "" (the top level), "text_config" (a multimodal wrapper's language model)
    config_key: str = ""
    layers_prefix: str = "model.layers."   # decoder layer i's state-dict keys start with this and "i."
    # patterns of checkpoint tensors transformers' loader drops (the model class's _keys_to_ignore_on_load_unexpected:
    # DeepSeek-V4's multi-token-prediction layers, mtp.*)
    ignored_on_load: tuple[str, ...] = ()

    @property
    def top_k(self) -> int:
        return int(config_value(self.config, self.family.top_k_field))

    def by_index(self) -> dict[int, MoeLayer]:
        return {layer.index: layer for layer in self.layers}


def _split_roles(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """{"gate", "up", "down"} -> the name of that projection among split experts' tensors (discover's roles)."""
    from .discover import _role
    roles = {_role(n): n for n in tensors}
    missing = [r for r in ("gate", "up", "down") if r not in roles]
    if missing:
        raise MoePruneError(f"split experts {sorted(tensors)}: no {missing[0]} projection among them")
    return roles


def config_value(config, dotted: str, default=None):
    """A config field by its dotted name ("ffn_config.moe_top_k": nested in a sub-config)."""
    for part in dotted.split("."):
        config = getattr(config, part, default) if config is not None else default
    return config


def set_config_value(config, dotted: str, value) -> None:
    *path, leaf = dotted.split(".")
    for part in path:
        config = getattr(config, part)
    setattr(config, leaf, value)


def get_tensor(module: nn.Module, dotted: str) -> torch.Tensor | None:
    """`module.a.b` by name, or None if absent."""
    *path, name = dotted.split(".")
    for part in path:
        module = getattr(module, part, None)
        if module is None:
            return None
    return getattr(module, name, None)


# the attribute of the decoder that holds its layers: "layers", DBRX's "blocks" (transformer.blocks)
LAYER_STACKS = ("layers", "blocks")


def _stack(base) -> str | None:
    return next((n for n in LAYER_STACKS if isinstance(getattr(base, n, None), nn.ModuleList)), None)


def text_model(model: nn.Module) -> nn.Module:
    """The language model's decoder (embeddings, decoder layers, final norm): `model.model` of a causal LM, the
    `language_model` of a multimodal wrapper (Qwen3-VL-MoE, GLM-4.5V, ...), as transformers' get_decoder says."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    for _ in range(3):                  # Llama 4's wrapper: get_decoder() is a causal LM, its .model the decoder
        if _stack(base) is not None:
            return base
        base = getattr(base, "model", None)
    return getattr(model, "model", model)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    name = _stack(text_model(model))
    if name is None:
        raise MoePruneError(f"cannot find the decoder layers of {type(model).__name__} (expected model.model.layers)")
    return getattr(text_model(model), name)


# the final norm's attribute on the base model, by family (Llama-style "norm" first; Qwen4-Exp's
# hyper_connection_mixer normalises and folds its hyper-connection streams into one)
FINAL_NORMS = ("norm", "final_layernorm", "norm_f", "final_norm", "ln_f", "embedding_norm", "hyper_connection_mixer")
# modules of the base model that its forward applies to the last decoder layer's output before the final norm, in
# order: Inkling-2's attention residual over the hidden states entering each block (`self.final_input(block_states,
# hidden_states)[0]`: the engine hands it the stream's block_states, moeprune.layer_inputs), the hyper-connection head
# folding the hc_mult residual streams into one (DeepSeek-V4, Hy-V4, GLM-5-Next: `self.norm(self.hc_head(hidden))`)
BEFORE_NORM = ("final_input", "hc_head")


def head_modules(model: nn.Module) -> list[nn.Module]:
    """What turns the last decoder layer's hidden states into logits, in the order a causal LM's forward applies
    them: the modules before the final norm (BEFORE_NORM) it has, the final norm, lm_head."""
    base = text_model(model)
    norm = next((getattr(base, n) for n in FINAL_NORMS if isinstance(getattr(base, n, None), nn.Module)), None)
    if norm is None:
        raise MoePruneError(f"cannot find the final norm of {type(model).__name__} "
                            f"(looked for {', '.join(FINAL_NORMS)})")
    before = [m for m in (getattr(base, n, None) for n in BEFORE_NORM) if isinstance(m, nn.Module)]
    return [*before, norm, model.get_output_embeddings()]


def layers_prefix(model: nn.Module) -> str:
    """The state-dict prefix of the decoder layers: "model.layers." ("model.language_model.layers." in a
    multimodal wrapper, "transformer.blocks." in DBRX); decoder layer i's keys start with it followed by "i."."""
    base = text_model(model)
    name = next((n for n, m in model.named_modules() if m is base), "")
    stack = _stack(base) or "layers"
    return f"{name}.{stack}." if name else f"{stack}."


def text_config_key(config) -> str:
    """Where the language model's config sits in config.json: "" when the config is its own, else the key of
    its sub-config ("text_config")."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is config:
        return ""
    return next((k for k, v in vars(config).items() if v is text), "text_config")


def discovered_family(s: MoeStructure) -> Family:
    """The Family that a model's structure describes (moeprune.discover), for a type with no entry above."""
    problems = [name for name, value in (("block", s.block), ("router", s.router), ("experts", s.experts),
                                          ("n_experts_key", s.n_experts_key), ("top_k_key", s.top_k_key)) if value is None]
    if problems:
        raise MoePruneError(f"model type {s.model_type!r}: its MoE layers differ in {', '.join(problems)}; moeprune "
                            "prunes models whose MoE layers share one layout (docs/FAMILIES.md)")
    def field(key: str) -> str:
        """The key relative to the language model's config: "num_experts" for "text_config.num_experts", a nested
        one as it is ("ffn_config.moe_num_experts" in a config that is its own language model's)."""
        prefix = s.text_prefix
        if prefix:
            return key[len(prefix) + 1:] if key.startswith(prefix + ".") else key.rpartition(".")[2]
        return key
    first = s.layers[0].expert_tensors
    return Family(s.model_type, field(s.n_experts_key), top_k_field=field(s.top_k_key),
                  block=s.block, router=s.router, experts=s.experts, shared=s.shared, router_tensors=s.router_tensors,
                  block_tensors=s.block_tensors, router_args=s.router_args,
                  scoring=s.scoring or "softmax", gate_up=s.gate_up or "halves", group_fields=s.group_fields,
                  identity_experts=(s.identity_key or "").rpartition(".")[2],
                  folded=tuple(t.name for t in first if t.folded),
                  transposed=tuple(t.name for t in first if t.transposed) if s.gate_up == "split" else ())


def family_of(model: nn.Module) -> Family:
    """The model's family: the entry above for its type, else what its structure shows (no entry needed when
    nothing about it is special). A model with experts that moeprune cannot prune yet is told what was found
    and what is missing; only a model without routed experts is called dense."""
    model_type = getattr(model.config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    try:
        s = find_moe(model)
    except MoePruneError as e:
        raise NotMoE(f"no MoE layers found in this {model_type} model ({e}): a dense model has no routed experts "
                     "to prune") from None
    contract = check_contract(s, model)
    if not contract.ok:
        first = s.layers[0]
        raise MoePruneError(f"model type {model_type!r}: found {s.num_experts} routed experts in {len(s.layers)} MoE "
                            f"layers ({first.experts_class} beside {first.router_class}), but "
                            f"{'; '.join(contract.differences)}; moeprune cannot prune this family yet "
                            "(docs/FAMILIES.md lists what each family needs)")
    return discovered_family(s)


def moe_layout(model: nn.Module) -> Layout:
    """Find every MoE layer of a transformers causal LM; raise NotMoE if there is none."""
    family = family_of(model)
    config = model.config.get_text_config()
    layout = Layout(family, config, config_key=text_config_key(model.config), layers_prefix=layers_prefix(model),
                    ignored_on_load=tuple(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()))
    for i, decoder_layer in enumerate(decoder_layers(model)):
        block = get_tensor(decoder_layer, family.block)
        experts = get_tensor(block, family.experts) if block is not None else None
        if experts is None or next(experts.parameters(), None) is None:      # a dense layer
            continue
        layout.layers.append(MoeLayer.of(i, block, family))
    if not layout.layers:
        raise NotMoE(f"no MoE layers found in this {family.model_type} model (it has no routed experts)")
    return layout
