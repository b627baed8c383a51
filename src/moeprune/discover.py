"""Find the routed experts of a transformers MoE model by its structure, not by its model type.

transformers 5 builds every routed MoE the same way: an `*Experts` module whose parameters carry the
expert index on axis 0, beside a router whose weight has one row per expert (E rows). `find_moe`
walks a built model and reports, as plain typed data, what moeprune's hand-written `arch.Family`
entries spell out per family:

    s = find_moe(model)                # -> MoeStructure
    s.num_experts, s.n_experts_key, s.top_k_key, s.moe_layers, s.block, s.router, s.experts, s.shared
    s.layers[0].expert_tensors         # every experts parameter with its expert axis and role
    s.layers[0].router_tensors         # every router tensor with an expert axis (weight, bias, correction bias)
    check_contract(s, model)           # does the router return (logits, weights, indices), do the
                                       # experts take (hidden, top_k_index, top_k_weights)?

What structure alone cannot tell (the gate/up layout of a fused projection, the scoring function) is
probed on the live module when its weights are real (not on the meta device): zeroing half of a fused
gate_up projection kills an expert's output exactly when that half is the gate, and the router's
returned weights are proportional to softmax, sigmoid or sqrt(softplus) of its returned logits (SCORINGS).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import MoePruneError

_TOP_K_NAME = ("per_tok", "top_k", "topk", "moe_k", "activated", "experts_per", "selected")
_TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "topk", "moe_k", "k", "num_selected_experts")
_GROUP_FIELDS = (("n_group", "topk_group"), ("num_expert_group", "topk_group"), ("moe_n_group", "moe_topk_group"))
_NOT_TEXT = ("vision", "visual", "audio", "speech", "image", "talker", "code2wav", "mtp")
# config ints that count experts a router scores after the E routed ones, their rows last ("slots"): zero-computation
# (identity) experts, chosen beside the routed ones, the block adding w * x for a token routed to one (LongCat-Flash's
# zero_expert_num); or shared experts that every token goes to, their weights normalised with the chosen experts'
# and returned apart (Inkling's n_shared_experts: the router's fourth output, the shared experts' gammas)
_IDENTITY = re.compile(r"zero.*expert|expert.*zero")
_SHARED = re.compile(r"shared.*expert|expert.*shared")
_NOT_A_COUNT = re.compile(r"size|dim|hidden|intermediate|gate|factor|scale|sink")

# how routers turn logits into the scores that weight (and, with a correction bias, choose) their experts: softmax
# over the experts, or one expert at a time (sigmoid; DeepSeek-V4's sqrt(softplus))
SCORINGS = {"softmax": lambda logits: torch.softmax(logits, dim=-1), "sigmoid": torch.sigmoid,
            "sqrtsoftplus": lambda logits: torch.nn.functional.softplus(logits).sqrt()}


@dataclass(frozen=True)
class ExpertTensor:
    """One parameter of the routed-experts module."""
    name: str                   # under the experts module, e.g. "gate_up_proj" or "mlp.w1"
    shape: tuple[int, ...]
    expert_axis: int | None     # the axis of length E (None: no such axis); 0 for a folded one
    role: str                   # "gate_up", "gate", "up", "down", "bias" or "other"
    transposed: bool = False    # the hidden size on axis 1 ([E, H, out]) instead of the last axis
    folded: int = 0             # rows per expert of a projection that folds the expert axis into axis 0 (DBRX's
                                # [E * I, H]: I), read as [E, I, H]; 0 when not folded

    @property
    def view_shape(self) -> tuple[int, ...]:
        """The shape with the expert axis first: [E, I, ...] for a folded tensor."""
        if not self.folded:
            return self.shape
        return (self.shape[0] // self.folded, self.folded, *self.shape[1:])


@dataclass(frozen=True)
class RouterTensor:
    name: str                   # under the router module, e.g. "weight", "moe_statics.e_score_correction_bias"
    shape: tuple[int, ...]
    expert_axis: int


@dataclass(frozen=True)
class MoeLayerInfo:
    """One MoE decoder layer; module paths are dotted attribute paths."""
    index: int
    block: str                  # relative to the decoder layer, e.g. "mlp"
    router: str                 # relative to the block, e.g. "gate"
    experts: str                # relative to the block, e.g. "experts"
    router_class: str
    experts_class: str
    num_experts: int
    router_tensors: tuple[RouterTensor, ...]
    expert_tensors: tuple[ExpertTensor, ...]
    shared: tuple[str, ...]     # the block's other children with parameters (shared experts, shared gates)
    block_tensors: tuple[RouterTensor, ...] = ()   # expert-axis tensors held by the block itself
    top_k: int | None = None    # the router's (or block's) top-k attribute
    router_args: tuple[str, ...] = ()   # block tensors the router's forward takes after the hidden states
    identity_slots: int = 0     # router rows after the E real experts' that are identity experts (LongCat)
    # the decoder layer's other routed-experts modules, relative to it (ERNIE-4.5-VL's mlp.vision_moe.experts beside
    # mlp.text_moe.experts): moeprune prunes one experts module per layer
    other_experts: tuple[str, ...] = ()


@dataclass(frozen=True)
class MoeStructure:
    """The routed-expert structure of one model, found by `find_moe`."""
    model_type: str
    layers_path: str                        # the decoder layers ModuleList, e.g. "model.layers"
    num_layers: int
    num_experts: int
    top_k: int | None
    layers: tuple[MoeLayerInfo, ...]
    n_experts_keys: tuple[str, ...]         # config paths whose value is E, best first ("text_config.num_experts")
    n_experts_aliases: tuple[str, ...]      # attribute_map spellings of those keys ("num_experts" for
                                            # "num_local_experts")
    top_k_keys: tuple[str, ...]             # config paths of the top-k, best first
    group_fields: tuple[str, str] | None    # (n_group, topk_group) config fields, when the config has both
    gate_up: str | None                     # "halves", "interleaved_t", "halves_t", "interleaved", "plain", "split"...
    gate_up_evidence: str                   # "probe" (measured on the module) or "shape" (from the shapes alone)
    scoring: str | None                     # a SCORINGS name (probed), else a guess from the router tensors
    scoring_evidence: str                   # "probe", "guess" or "none"
    other_stacks: tuple[str, ...] = ()      # other ModuleLists holding experts (a vision tower's MoE, ...)
    notes: tuple[str, ...] = field(default=())
    # the config path of the count of identity (zero-computation) experts the routers score after the real ones
    # (LongCat-Flash's "zero_expert_num"); None when the routers score the real experts only
    identity_key: str | None = None
    text_prefix: str = ""                   # where the language model's config sits ("text_config"; "" itself)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(layer.index for layer in self.layers)

    def _uniform(self, attr: str):
        values = {getattr(layer, attr) for layer in self.layers}
        return values.pop() if len(values) == 1 else None

    @property
    def block(self) -> str | None:
        return self._uniform("block")

    @property
    def router(self) -> str | None:
        return self._uniform("router")

    @property
    def experts(self) -> str | None:
        return self._uniform("experts")

    @property
    def shared(self) -> tuple[str, ...] | None:
        return self._uniform("shared")

    @property
    def n_experts_key(self) -> str | None:
        return self.n_experts_keys[0] if self.n_experts_keys else None

    @property
    def top_k_key(self) -> str | None:
        return self.top_k_keys[0] if self.top_k_keys else None

    @property
    def text_config_path(self) -> str:
        """Where the config holding the expert count sits: "" (the config itself), "text_config", ..."""
        key = self.n_experts_key or ""
        return key.rpartition(".")[0]

    @property
    def router_tensors(self) -> tuple[tuple[str, int], ...]:
        return tuple((t.name, t.expert_axis) for t in self.layers[0].router_tensors)

    @property
    def block_tensors(self) -> tuple[tuple[str, int], ...]:
        return tuple((t.name, t.expert_axis) for t in self.layers[0].block_tensors)

    @property
    def router_args(self) -> tuple[str, ...]:
        return self.layers[0].router_args

    @property
    def axis0(self) -> bool:
        """Every experts projection carries the expert index on axis 0 (what moeprune's surgery relies on); other
        parameters either do too (Ergo's per-expert norms) or have no expert axis: shared by the experts (Muse
        Spark's post-expert norm), left as they are."""
        return all(t.expert_axis == 0 or (t.expert_axis is None and t.role in ("other", "bias"))
                   for layer in self.layers for t in layer.expert_tensors)


@dataclass(frozen=True)
class Contract:
    """What moeprune relies on, checked on one MoE layer: `ok` when nothing differs."""
    router_returns: str        # e.g. "(logits [n, E], weights [n, k], indices [n, k])"
    experts_signature: str     # e.g. "(hidden_states, top_k_index, top_k_weights)"
    differences: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.differences


# ------------------------------------------------------------------------------------------------ helpers

def _get(root, dotted: str):
    for part in dotted.split(".") if dotted else []:
        root = root[int(part)] if part.isdigit() and isinstance(root, (nn.ModuleList, nn.Sequential)) \
            else getattr(root, part)
    return root


def _relative(path: str, prefix: str) -> str:
    return path[len(prefix) + 1:] if prefix else path


def _is_experts(module: nn.Module) -> bool:
    name = type(module).__name__
    return name.endswith("Experts") and any(True for _ in module.parameters())


def _text_config(config):
    for key in ("text_config", "language_config", "llm_config", "thinker_config"):
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            return _text_config(sub) if key == "thinker_config" else sub
    return config


def _tensors(module: nn.Module):
    yield from module.named_parameters()
    yield from ((n, b) for n, b in module.named_buffers() if b is not None)


def _int_paths(d: dict, value: int | None, prefix: str = ""):
    """Dotted paths of every int equal to `value` (None: every int) in a nested config dict."""
    for key, v in d.items():
        path = f"{prefix}{key}"
        if isinstance(v, dict):
            yield from _int_paths(v, value, path + ".")
        elif isinstance(v, int) and not isinstance(v, bool) and (value is None or v == value):
            yield path


def identity_experts(config) -> tuple[str | None, int]:
    """(config path, count) of the experts the routers may score after the E routed ones (their "slots"): a count of
    zero-computation experts (LongCat-Flash's zero_expert_num: a token routed to one gets w * x, the identity, from
    the block), else of shared experts (Inkling's n_shared_experts: every token goes to them, weighted by the router
    with the chosen experts); (None, 0) when the config names neither. Discovery accepts a router of E + count rows
    beside E experts only when this count says so; how the slots are routed is read off the router's output."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    prefix = _text_prefix(config) if hasattr(config, "to_dict") else ""
    for pattern, word in ((_IDENTITY, "zero"), (_SHARED, "shared")):
        leaf = lambda p: p.rpartition(".")[2]      # noqa: E731
        paths = sorted((p for p in _int_paths(d, None) if pattern.search(leaf(p)) and not _NOT_A_COUNT.search(leaf(p))),
                       key=lambda p: _rank_key(p, (word,), prefix))
        for path in paths:
            value = d
            for part in path.split("."):
                value = value[part]
            if value > 0:
                return path, value
    return None, 0


def router_slots(model: nn.Module) -> int:
    """How many rows the routers hold after their experts' (their slots: LongCat-Flash's identity experts, Inkling's
    shared experts, Zaya's skip expert), found by structure (on the meta skeleton too); 0 when none or no MoE."""
    try:
        return max(layer.identity_slots for layer in find_moe(model, probe=False).layers)
    except MoePruneError:
        return identity_experts(model.config)[1]


def _rank_key(path: str, words: tuple[str, ...], text_prefix: str = "") -> tuple:
    """Best first: the leaf names the thing, the key sits in the config that builds the decoder (the text
    config of a multimodal model), not in a vision/audio sub-config, not a shared-expert field."""
    leaf = path.rpartition(".")[2]
    outside_text = any(w in path for w in _NOT_TEXT) or (text_prefix and not path.startswith(text_prefix + "."))
    return (not any(w in leaf for w in words), bool(outside_text), "shared" in leaf, path.count("."), len(path))


def _text_prefix(config) -> str:
    text = _text_config(config)
    for key in ("thinker_config", "text_config", "language_config", "llm_config"):
        sub = getattr(config, key, None)
        if sub is text:
            return key
        if sub is not None and getattr(sub, "text_config", None) is text:
            return f"{key}.text_config"
    return ""


# ------------------------------------------------------------------------------------------------ discovery

def _decoder_stack(model: nn.Module, expert_paths: list[str]) -> tuple[str, dict[int, list[str]], list[str]]:
    """(path of the decoder-layer ModuleList, {layer index: expert paths}, other stacks with experts)."""
    stacks: dict[str, dict[int, list[str]]] = {}
    modules = dict(model.named_modules())
    for path in expert_paths:
        parts = path.split(".")
        for i in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:i])
            if parts[i].isdigit() and isinstance(modules.get(prefix), nn.ModuleList):
                stacks.setdefault(prefix, {}).setdefault(int(parts[i]), []).append(path)
                break
    if not stacks:
        raise MoePruneError(f"no routed experts found in {type(model).__name__}: no *Experts module inside a "
                            "ModuleList of decoder layers")
    best = min(stacks, key=lambda p: (any(w in p for w in _NOT_TEXT), -len(stacks[p]), len(p)))
    return best, stacks[best], sorted(p for p in stacks if p != best)


def _expert_count(experts: nn.Module) -> int | None:
    count = getattr(experts, "num_experts", None)
    if count is None:
        count = getattr(experts, "total_experts", None)
    if isinstance(count, int) and not isinstance(count, bool) and count > 0:
        return count
    firsts = {p.shape[0] for _, p in experts.named_parameters(recurse=False) if p.dim() >= 1}
    return firsts.pop() if len(firsts) == 1 else None


def _find_router(block: nn.Module, experts_rel: str, E: int, H: int | None):
    """(path, module) of the router: a module outside the experts whose 2-D weight has E rows (of width H)."""
    found = []
    for width in (H, None):                 # of the hidden width first; else any (a router MLP's last layer)
        for path, module in block.named_modules():
            if path == experts_rel or path.startswith(experts_rel + ".") or not path:
                continue
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == E \
                    and (width is None or weight.shape[1] == width):
                found.append(path)
        if found:
            break
    if not found:
        return None, None
    # the router is the outermost such module (a router wrapping a Linear is the router, not the Linear)
    # (Zaya's router MLP inside its router: the outermost Router or Gate around the weight)
    path = min(found, key=lambda p: p.count("."))
    parent = path.rpartition(".")[0]
    while parent and parent != experts_rel and not isinstance(_get(block, parent), nn.ModuleList) \
            and "forward" in type(_get(block, parent)).__dict__ \
            and any(w in type(_get(block, parent)).__name__ for w in ("Router", "Gate")):
        path, parent = parent, parent.rpartition(".")[0]
    return path, _get(block, path)


def _counts_own_rows(router: nn.Module, rows: int) -> bool:
    """The router holds an int attribute equal to its row count (Zaya's num_router_classes, num_experts + 1): it
    says itself that it scores that many, the experts and its slots after them."""
    return any(isinstance(v, int) and not isinstance(v, bool) and v == rows for v in vars(router).values())


def _expert_axis_tensors(module: nn.Module, E: int, skip: tuple[str, ...] = (),
                         rows: tuple[int, ...] = ()) -> tuple[RouterTensor, ...]:
    """The tensors of `module` with an axis of E entries (or of one of `rows`: E plus identity slots)."""
    out = []
    for name, t in _tensors(module):
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        axes = [a for a, n in enumerate(t.shape) if n == E or n in rows]
        if axes:
            out.append(RouterTensor(name, tuple(t.shape), axes[0]))
    return tuple(out)


def _role(name: str) -> str:
    leaf = name.rpartition(".")[2].lower()
    if "bias" in leaf:
        return "bias"
    if "gate_up" in leaf or leaf in ("w13", "input_linear", "fc1", "wi"):
        return "gate_up"
    if "gate" in leaf or leaf in ("w1",):
        return "gate"
    if "up" in leaf or leaf in ("w3", "v1"):
        return "up"
    if "down" in leaf or leaf in ("w2", "output_linear", "fc2", "wo"):
        return "down"
    return "other"


def _expert_tensors(experts: nn.Module, E: int, H: int | None) -> tuple[ExpertTensor, ...]:
    """Each experts parameter with its expert axis, role and orientation. A 3-D projection is "transposed"
    when it is stored [E, in, out] (x @ W) instead of nn.Linear's [E, out, in]; where both trailing sizes
    equal the hidden size the other projections decide."""
    rows = []
    for name, p in experts.named_parameters():
        axes = [a for a, n in enumerate(p.shape) if n == E]
        axis = 0 if p.shape and p.shape[0] == E else (axes[0] if axes else None)
        role = _role(name)
        folded = 0
        shape = tuple(p.shape)
        if axis is None and p.dim() == 2 and p.shape[0] % E == 0 and role in ("gate_up", "gate", "up", "down"):
            folded, axis = p.shape[0] // E, 0           # [E * I, H]: the experts' rows one after another (DBRX)
            shape = (E, folded, p.shape[1])
        transposed = None
        if len(shape) == 3 and H is not None and (shape[1] == H) != (shape[2] == H):
            hidden_in = shape[1] == H if role != "down" else shape[2] == H
            transposed = hidden_in
        rows.append((name, tuple(p.shape), axis, role, transposed, folded))
    known = [t for *_, t, _ in rows if t is not None]
    default = bool(known) and sum(known) * 2 >= len(known)
    return tuple(ExpertTensor(name, shape, axis, role, default if t is None else t, folded)
                 for name, shape, axis, role, t, folded in rows)


def _gate_up_shape(tensors: tuple[ExpertTensor, ...]) -> str | None:
    roles = {t.role for t in tensors}
    fused = [t for t in tensors if t.role == "gate_up"]
    if fused:
        return "halves_t" if fused[0].transposed else "halves"
    if {"gate", "up"} <= roles:
        return "split"
    if "up" in roles:                       # an ungated expert MLP: up_proj, activation, down_proj
        return "plain_t" if next(t for t in tensors if t.role == "up").transposed else "plain"
    return None


def experts_width(tensors: tuple[ExpertTensor, ...], H: int | None) -> int | None:
    """The width of the experts' input: the hidden size, or what the block projects it to first (Muse Spark's
    moe_hidden_size), read off the input side of the first [E, out, in] (or transposed [E, in, out]) projection."""
    for t in tensors:
        if t.role in ("gate_up", "gate", "up") and t.expert_axis == 0 and len(t.view_shape) == 3:
            return t.view_shape[1] if t.transposed else t.view_shape[2]
    return H


@torch.no_grad()
def _probe_gate_up(experts: nn.Module, tensors: tuple[ExpertTensor, ...], H: int, k: int) -> str | None:
    """Which part of the fused gate_up projection is the gate, measured on expert 0: "halves" (gate rows
    first), "interleaved" (gate at even positions), "plain" (no gate: an ungated MLP); None if unknown."""
    fused = [t for t in tensors if t.role == "gate_up" and t.expert_axis == 0]
    if not fused:
        return None
    t = fused[0]
    axis = 2 if t.transposed else 1          # the fused axis of [E, 2I, H] is 1; of [E, H, 2I] it is 2
    param = _get(experts, t.name)
    bias_name = t.name + "_bias" if hasattr(experts, t.name.rpartition(".")[2] + "_bias") else None
    bias = _get(experts, bias_name) if bias_name else None
    n = 4
    hidden = torch.randn(n, experts_width(tensors, H), dtype=param.dtype)
    index = torch.zeros(n, k, dtype=torch.long)
    index[:, 1:] = torch.arange(1, k) if k > 1 else index[:, 1:]
    weights = torch.zeros(n, k, dtype=param.dtype)
    weights[:, 0] = 1.0

    def run(mask) -> torch.Tensor:
        saved, saved_bias = param.data.clone(), bias.data.clone() if bias is not None else None
        try:
            if mask is not None:
                param.data[0].mul_(mask.view((-1, 1) if axis == 1 else (1, -1)))
                if bias is not None:
                    bias.data[0].mul_(mask)
            return experts(hidden, index, weights).reshape(n, -1).float()
        finally:
            param.data.copy_(saved)
            if bias is not None:
                bias.data.copy_(saved_bias)

    width = param.shape[axis]
    if width % 2:
        return None
    full = run(None)
    dead = run(torch.zeros(width, dtype=param.dtype))          # the expert's output with no input projection
    if torch.allclose(full, dead):
        return None
    first = torch.ones(width, dtype=param.dtype)
    first[: width // 2] = 0
    even = torch.ones(width, dtype=param.dtype)
    even[0::2] = 0
    close = lambda out: torch.allclose(out, dead, atol=1e-6)   # noqa: E731
    if close(run(first)):
        return "halves"
    if close(run(even)):
        return "interleaved"
    return "plain"


@torch.no_grad()
def _probe_scoring(router: nn.Module, H: int, E: int, extra: tuple = ()) -> str | None:
    """The SCORINGS name ("softmax", "sigmoid", "sqrtsoftplus") whose scores of the router's returned logits at the
    chosen experts its returned weights are proportional to (per token, after an optional renormalisation); None
    when none is."""
    out = _call_router(router, torch.randn(16, H, dtype=next(router.parameters()).dtype) * 3, extra=extra)
    if out is None:
        return None
    logits, weights, index, *apart = out
    apart = apart and logits.shape[-1] < E          # E counts the slots: slot weights returned apart (Inkling)
    logits = logits.reshape(-1, logits.shape[-1]).double()
    weights, index = weights.reshape(logits.shape[0], -1).double(), index.reshape(logits.shape[0], -1)
    live = weights != 0                             # a masked choice (Zaya's skip slot: weight 0) says nothing
    if apart:
        live = torch.ones_like(live)
    for name, scores in SCORINGS.items():
        picked = scores(logits).gather(-1, index.clamp_max(logits.shape[-1] - 1))
        for cand in (picked, picked / picked.sum(-1, keepdim=True)):
            ratio = weights / cand
            # slots routed apart (Inkling's shared experts) share each token's normalisation: a ratio per token
            like = ratio[:, :1].expand_as(ratio) if apart else ratio[live][:1].expand_as(ratio)
            if live.any() and torch.allclose(ratio[live], like[live], rtol=1e-4, atol=1e-6):
                return name
    return None


def _describe(out) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor {list(out.shape)}"
    if isinstance(out, (tuple, list)):
        parts = [f"{list(o.shape)} {str(o.dtype)[6:]}" if isinstance(o, torch.Tensor) else type(o).__name__
                 for o in out]
        return "(" + ", ".join(parts) + ")"
    return type(out).__name__


def _call_router(router: nn.Module, hidden: torch.Tensor, why: list | None = None, extra: tuple = ()):
    """The router's (logits, weights, indices) on `hidden` ([n, H], else [1, n, H]), and the weights of the slots it
    routes every token to (Inkling's shared experts' gammas) when it returns them as a fourth tensor; None, with the
    reason appended to `why`, when its forward is of another contract."""
    errors = []
    for x in (hidden, hidden[None]):
        try:
            out = router(x, *extra)
        except Exception as e:                          # noqa: BLE001  a router of another contract
            errors.append(f"{type(e).__name__}: {str(e)[:100]}")
            continue
        if isinstance(out, tuple) and len(out) in (3, 4) and all(isinstance(o, torch.Tensor) for o in out):
            return out
        if why is not None:
            why.append(f"returns {_describe(out)}")
        return None
    if why is not None:
        why.append(f"forward(hidden) fails: {errors[0]}")
    return None


def _router_args(router: nn.Module, block_tensors: tuple[RouterTensor, ...]) -> tuple[str, ...]:
    """The block's per-expert tensors that the router's forward takes after the hidden states, matched by name
    (MiniMax-M2's `gate(hidden, e_score_correction_bias)`, AFMoE's `router(hidden, expert_bias)`)."""
    held = {t.name.rpartition(".")[2]: t.name for t in block_tensors}
    args = []
    for p in list(inspect.signature(router.forward).parameters.values())[1:]:
        if p.name not in held or p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        args.append(held[p.name])
    return tuple(args)


def _module_top_k(*modules) -> int | None:
    for module in modules:
        for attr in _TOP_K_ATTRS:
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _hidden_size(config) -> int | None:
    for key in ("hidden_size", "d_model", "n_embd"):
        value = getattr(_text_config(config), key, None)
        if isinstance(value, int):
            return value
    return None


def _aliases(config, keys: tuple[str, ...]) -> tuple[str, ...]:
    """attribute_map spellings (alias -> real field) of the given config paths."""
    out = []
    for key in keys:
        prefix, _, leaf = key.rpartition(".")
        try:
            sub = _get(config, prefix) if prefix else config
        except AttributeError:
            continue
        for alias, real in (getattr(type(sub), "attribute_map", None) or {}).items():
            if real == leaf:
                out.append(f"{prefix + '.' if prefix else ''}{alias}")
    return tuple(out)


def find_moe(model: nn.Module, probe: bool | None = None) -> MoeStructure:
    """The routed-expert structure of a built model (on any device; `probe` defaults to "weights are real")."""
    config = model.config
    is_meta = any(p.is_meta for p in model.parameters())
    probe = (not is_meta) if probe is None else probe
    H = _hidden_size(config)
    expert_paths = [p for p, m in model.named_modules() if _is_experts(m)]
    # an *Experts module nested inside another (JetMoE's ParallelExperts pairs) is part of its parent
    expert_paths = [p for p in expert_paths if not any(p.startswith(q + ".") for q in expert_paths)
                    and "shared" not in p.rpartition(".")[2]]
    stack_path, per_layer, others = _decoder_stack(model, expert_paths)
    stack = _get(model, stack_path)
    identity_key, Z = identity_experts(config)
    notes: list[str] = []
    layers = []
    for index in sorted(per_layer):
        layer_prefix = f"{stack_path}.{index}"
        path = per_layer[index][0]
        others = tuple(_relative(p, layer_prefix) for p in per_layer[index][1:])
        if others:
            notes.append(f"layer {index} holds {len(per_layer[index])} experts modules: {per_layer[index]}")
        experts = _get(model, path)
        E = _expert_count(experts)
        if E is None:
            notes.append(f"layer {index}: cannot tell the expert count of {type(experts).__name__}")
            continue
        block_path = path.rpartition(".")[0]
        router_path, router, identity = None, None, 0
        while True:                                     # the block: the innermost ancestor that holds a router
            block = _get(model, block_path)
            router_path, router = _find_router(block, _relative(path, block_path), E, H)
            if router is None and 0 < Z <= E:           # E real experts and Z identity experts the config names
                router_path, router = _find_router(block, _relative(path, block_path), E + Z, H)
                identity = Z if router is not None else 0
            for extra in range(1, E + 1) if router is None and not Z else ():   # or that the router counts itself
                found = _find_router(block, _relative(path, block_path), E + extra, H)
                if found[1] is not None and _counts_own_rows(found[1], E + extra):
                    (router_path, router), identity = found, extra
                    break
            if router is not None or block_path == layer_prefix or not block_path.startswith(layer_prefix):
                break
            block_path = block_path.rpartition(".")[0]
        if router is None:
            layer_module = _get(model, layer_prefix)
            inside = _relative(path, layer_prefix)
            wider = sorted({tuple(t.shape) for n, t in layer_module.named_parameters()
                            if t.dim() == 2 and E < t.shape[0] <= 2 * E and not n.startswith(inside)
                            and (H is None or H in t.shape or "router" in n or "gate" in n)})
            extra = f" (a {wider[0]} weight: the router scores {wider[0][0] - E} more experts than the experts " \
                    "module holds - shared, zero or no-op experts routed too - and no config int names " \
                    f"{wider[0][0] - E} zero-computation or shared experts)" if wider else ""
            notes.append(f"layer {index}: no router with {E} rows next to {path}{extra}")
            continue
        experts_rel = _relative(path, block_path)
        head = {experts_rel.split(".")[0], router_path.split(".")[0]}
        shared = tuple(name for name, child in block.named_children()
                       if name not in head and any(True for _ in child.parameters()))
        rows = (E + identity,) if identity else ()
        router_tensors = _expert_axis_tensors(router, E, rows=rows)
        block_tensors = tuple(t for t in _expert_axis_tensors(block, E, skip=(experts_rel, router_path, *shared),
                                                              rows=rows)
                              if not t.name.startswith(router_path + "."))
        layers.append(MoeLayerInfo(
            index=index, block=_relative(block_path, layer_prefix), router=router_path, experts=experts_rel,
            router_class=type(router).__name__, experts_class=type(experts).__name__, num_experts=E,
            router_tensors=router_tensors, expert_tensors=_expert_tensors(experts, E, H), shared=shared,
            block_tensors=block_tensors, top_k=_module_top_k(router, block, experts),
            router_args=_router_args(router, block_tensors), identity_slots=identity, other_experts=others))
    if not layers:
        raise MoePruneError(f"no MoE layer with a router found in {type(model).__name__}: " + "; ".join(notes))
    counts = {layer.num_experts for layer in layers}
    if len(counts) > 1:
        notes.append(f"the MoE layers hold different expert counts: {sorted(counts)}")
    E = layers[0].num_experts
    top_k = layers[0].top_k
    d = config.to_dict()
    prefix = _text_prefix(config)
    n_keys = tuple(sorted((p for p in _int_paths(d, E) if "expert" in p.rpartition(".")[2]
                           and not re.search(r"size|dim|per_tok|top|capacity", p.rpartition(".")[2])
                           and not _IDENTITY.search(p.rpartition(".")[2])
                           and not _SHARED.search(p.rpartition(".")[2])),
                          key=lambda p: _rank_key(p, ("expert",), prefix)))
    k_keys = ()
    if top_k is not None:
        k_keys = tuple(sorted((p for p in _int_paths(d, top_k)
                               if any(w in p.rpartition(".")[2] for w in _TOP_K_NAME)
                               and "group" not in p.rpartition(".")[2]),
                              key=lambda p: _rank_key(p, _TOP_K_NAME, prefix)))
    text = _text_config(config)
    group_fields = next(((a, b) for a, b in _GROUP_FIELDS if hasattr(text, a) and hasattr(text, b)), None)
    first = layers[0]
    experts0 = _get(model, f"{stack_path}.{first.index}.{first.block}.{first.experts}".replace("..", "."))
    block0 = _get(model, f"{stack_path}.{first.index}.{first.block}".rstrip("."))
    router0 = _get(block0, first.router)
    extra0 = tuple(_get(block0, name) for name in first.router_args)
    gate_up, gate_up_evidence = _gate_up_shape(first.expert_tensors), "shape"
    scoring, scoring_evidence = None, "none"
    if probe:
        try:
            probed = _probe_gate_up(experts0, first.expert_tensors, H, top_k or 2)
        except Exception as e:                          # noqa: BLE001  experts of another contract
            probed = None
            notes.append(f"gate_up probe failed: {type(e).__name__}: {e}"[:200])
        if probed is not None:
            fused = next(t for t in first.expert_tensors if t.role == "gate_up")
            gate_up, gate_up_evidence = probed + ("_t" if fused.transposed else ""), "probe"
        scoring = _probe_scoring(router0, H, E + first.identity_slots, extra0)
        scoring_evidence = "probe" if scoring else "none"
    if scoring is None:
        # a correction bias on the router goes with sigmoid scoring (DeepSeek-V3 style); else softmax
        direct = {t.name.rpartition(".")[2] for t in first.router_tensors + first.block_tensors}
        scoring, scoring_evidence = ("sigmoid" if "e_score_correction_bias" in direct else "softmax"), "guess"
    return MoeStructure(
        model_type=getattr(config, "model_type", type(config).__name__), layers_path=stack_path,
        num_layers=len(stack), num_experts=E, top_k=top_k, layers=tuple(layers), n_experts_keys=n_keys,
        n_experts_aliases=_aliases(config, n_keys), top_k_keys=k_keys, group_fields=group_fields,
        gate_up=gate_up, gate_up_evidence=gate_up_evidence, scoring=scoring, scoring_evidence=scoring_evidence,
        other_stacks=tuple(others), notes=tuple(notes),
        identity_key=identity_key if any(layer.identity_slots for layer in layers) else None, text_prefix=prefix)


# ------------------------------------------------------------------------------------------------ contract

_EXPERTS_ARGS = ("hidden_states", "top_k_index", "top_k_weights")


@torch.no_grad()
def check_contract(structure: MoeStructure, model: nn.Module) -> Contract:
    """Whether the router's forward returns (logits [n, E], weights [n, k], indices [n, k]) and the experts'
    forward takes (hidden_states, top_k_index, top_k_weights) and returns [n, H] (run on the first MoE layer;
    a meta-device model is checked by signature only)."""
    first = structure.layers[0]
    prefix = f"{structure.layers_path}.{first.index}" + (f".{first.block}" if first.block else "")
    router, experts = _get(model, f"{prefix}.{first.router}"), _get(model, f"{prefix}.{first.experts}")
    E, k, H = structure.num_experts, structure.top_k or 2, _hidden_size(model.config)
    diffs: list[str] = []
    params = [p for p in inspect.signature(experts.forward).parameters if p not in ("self", "args", "kwargs")]
    signature = f"({', '.join(params)})"
    if len(params) < 3 or not ("ind" in params[1] and "weight" in params[2]):
        diffs.append(f"experts {type(experts).__name__}.forward takes {signature}, not {_EXPERTS_ARGS}")
    if not structure.axis0:
        odd = [f"{t.name} {list(t.shape)}" for t in first.expert_tensors if t.expert_axis != 0]
        diffs.append(f"experts tensors without the expert index on axis 0: {', '.join(odd)}")
    if structure.top_k is None:
        diffs.append("neither the router nor the block has a top-k attribute")
    if first.other_experts:
        held = ", ".join((f"{first.block}.{first.experts}" if first.block else first.experts, *first.other_experts))
        vision = " (its vision experts see image tokens only)" if any(w in held for w in _NOT_TEXT) else ""
        diffs.append(f"decoder layer {first.index} holds {1 + len(first.other_experts)} routed-experts modules ({held}) "
                     f"under one expert count ({structure.n_experts_key}): each would need a plan of its own, from "
                     f"the tokens routed to it{vision}, and moeprune prunes one experts module per layer")
    returns = "not run (meta device)"
    if not any(p.is_meta for p in router.parameters()):
        n = 6
        dtype = next(router.parameters()).dtype
        why: list[str] = []
        hidden = torch.randn(n, H, dtype=dtype)
        block = _get(model, prefix)
        out = _call_router(router, hidden, why, tuple(_get(block, name) for name in first.router_args))
        if out is None:
            returns = why[0] if why else "not a 3-tuple of tensors"
            diffs.append(f"router {type(router).__name__}.forward {returns}, not (logits, weights, indices)")
        else:
            logits, weights, index, *apart = out
            returns = f"({list(logits.shape)}, {list(weights.shape)}, {list(index.shape)} {str(index.dtype)[6:]}" + \
                "".join(f", {list(a.shape)}" for a in apart) + ")"
            S = first.identity_slots
            R = E + S                                   # the real experts, then the slots (identity experts)
            # a fourth output beside logits of the E experts alone: the weights of the slots every token goes to,
            # returned apart (Inkling's shared experts); beside logits of every row it is not routing (Zaya's router
            # state for the next layer's router, which the engine hands on: moeprune.layer_inputs)
            if apart and logits.shape[-1] != R:
                if not S or apart[0].shape[-1] != S or apart[0].numel() != n * S:
                    diffs.append(f"router returns a fourth tensor {list(apart[0].shape)}, not the weights [{n}, "
                                 f"{S}] of {S} slots scored after the experts (shared experts) that every token "
                                 "goes to" if S else f"router returns a fourth tensor {list(apart[0].shape)} and "
                                 "scores no slots after the experts")
                R = E
            if logits.shape[-1] != R or logits.numel() != n * R:
                diffs.append(f"router logits have shape {list(logits.shape)}, not [{n}, {R}]")
            if index.dtype not in (torch.int64, torch.int32) or weights.shape != index.shape \
                    or index.shape[-1] != k:
                diffs.append(f"router returns weights {list(weights.shape)} / indices {list(index.shape)} "
                             f"{index.dtype}, not [{n}, {k}] / [{n}, {k}] int64")
            if not diffs or len(params) >= 3:
                try:
                    width = experts_width(first.expert_tensors, H)
                    y = experts(torch.randn(n, width, dtype=dtype), index.reshape(n, -1).long(),
                                weights.reshape(n, -1))
                    if y.numel() != n * width:
                        diffs.append(f"experts return shape {list(y.shape)}, not [{n}, {width}]")
                except Exception as e:                  # noqa: BLE001
                    diffs.append(f"experts forward failed: {type(e).__name__}: {str(e)[:120]}")
    return Contract(returns, signature, tuple(diffs))
