"""The statistics observer: what one MoE layer does on the calibration tokens that reach it.

Per MoE layer it records the top-k counts, summed router probabilities and top-k weights, REAP's saliency
sums and, on a seeded sample of token positions, the layer inputs, router logits and (for the methods that
need them) every expert's output. Everything is accumulated in float64 on the CPU, batch after batch, so a
pass is a sum over batches whatever the model's dtype.
"""

from __future__ import annotations

import torch

from .arch import Layout, MoeLayer, MoePruneError, get_tensor
from .layer_inputs import advance
from .discover import SCORINGS
from .routing import hash_rule, inferred_rule, routing_rule, slot_kind
from .similarity import SIMILARITIES, weight_representation
from .stats import LayerStats


def probabilities(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """The router's scores of its logits (float64): softmax, sigmoid or sqrt(softplus) (discover.SCORINGS)."""
    return SCORINGS[scoring](logits.double())


class Observer:
    """Accumulates one MoE layer's statistics, batch after batch, from its router's decisions and its experts'
    input (hooks on both, so the block's own forward decides what they see)."""

    def __init__(self, layer: MoeLayer, scoring: str, top_k: int, sample_positions: torch.Tensor,
                 expert_outputs: bool = True):
        E = layer.num_experts
        self.layer, self.scoring, self.top_k, self.expert_outputs = layer, scoring, top_k, expert_outputs
        self.sample_positions = sample_positions          # sorted flat token positions over the calibration set
        self.offset = 0                                   # flat position of the current batch's first token
        self.tokens = 0
        z = lambda: torch.zeros(E, dtype=torch.float64)   # noqa: E731
        self.counts, self.weight_sum, self.reap_sum = z(), z(), z()
        # summed router probabilities under every scoring: a family found on the meta skeleton may have guessed
        # its scoring, and the routing rule read off the router's own decisions settles it (observe_layer)
        self.prob_sums = {name: z() for name in SCORINGS}
        self.inputs, self.logits, self.outputs = [], [], []
        self.chosen: list[tuple[torch.Tensor, torch.Tensor]] = []   # the sample's (top-k weights, indices)
        # slots that every token is routed to apart from the experts (Inkling's shared experts): on the sample, their
        # output per unit of their summed weight, what they add once pruning changes that weight (LayerStats.surplus)
        self.surplus: list[torch.Tensor] = []
        self._apart, self._slots = False, None         # the current batch's sample positions and slot weights

    @torch.no_grad()
    def routed(self, module, args, kwargs, output) -> None:
        """The router's forward hook: its decisions as the block itself asked for them (whatever arguments the
        block passes: a correction bias, [1, n, d] hidden states). They are observed with the input the experts
        then receive (Muse Spark projects and normalises it first); experts that run on every token (Llama 4) are
        observed on the router's input."""
        self._flush_slots()
        hidden = args[0] if args else kwargs["hidden_states"]
        decisions = self.layer.decisions(output, hidden)
        # slots routed apart (Inkling's shared experts): their weights are returned as the router's fourth output
        self._apart = bool(self.layer.identity_slots) and isinstance(output, tuple) and len(output) > 3 \
            and output[0].shape[-1] == self.layer.num_experts
        if self.layer.family is not None and self.layer.family.expert_fn is not None:
            self.observe(hidden.reshape(-1, hidden.shape[-1]), *decisions)
            return
        self._check_consumed()
        self._pending = decisions

    @torch.no_grad()
    def experts_called(self, module, args, kwargs) -> None:
        """The experts' forward pre-hook: the routed tokens' input, observed with the router's pending decisions
        (the observer's own calls of the experts find none pending)."""
        decisions, self._pending = getattr(self, "_pending", None), None
        if decisions is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            self.observe(hidden.reshape(-1, hidden.shape[-1]), *decisions)

    @torch.no_grad()
    def shared_called(self, module, args, output) -> None:
        """A forward hook on each of the block's shared modules, when the router routes to its slots apart (Inkling):
        their outputs on the batch's sample tokens, summed and divided by the slots' summed weight (the block adds
        them with those weights: a subset of experts changes their weight, not their direction)."""
        if self._slots is None or not isinstance(output, torch.Tensor):
            return
        local, total, parts = self._slots
        parts.append(output.reshape(-1, output.shape[-1])[local].double() / total.clamp_min(1e-30))

    def _flush_slots(self) -> None:
        if self._slots is not None:
            parts = self._slots[2]
            if not parts:
                raise MoePruneError(f"layer {self.layer.index}: the router routes every token to "
                                    f"{self.layer.identity_slots} shared slots, but no shared module of the block ran")
            self.surplus.append(sum(parts).float().cpu())
            self._slots = None

    def _check_consumed(self) -> None:
        if getattr(self, "_pending", None) is not None:
            raise MoePruneError(f"layer {self.layer.index}: the router ({type(self.layer.router).__name__}) ran "
                                "without the experts it routes to; moeprune cannot observe this MoE block")

    @torch.no_grad()
    def observe(self, x: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> None:
        """One batch's decisions. A router that also scores identity experts (LongCat-Flash: logits [n, E + Z], an
        index >= E names one) is counted for its E real experts only: the identity slots are not experts to keep or
        drop; its sample keeps every logit (the routing rule replays all of them)."""
        E = self.counts.numel()
        real = indices < E
        chosen, chosen_w = indices[real].cpu(), weights[real].double().cpu()
        self.counts += torch.bincount(chosen, minlength=E).double()
        for scoring, total in self.prob_sums.items():
            total += probabilities(logits, scoring)[:, :E].sum(0).cpu()
        self.weight_sum.index_add_(0, chosen, chosen_w)
        tok, slot = torch.where(real)                  # every (token, chosen expert): one call of the experts
        ids = indices[tok, slot]
        norms = self.layer.expert_rows(x[tok], ids).double().norm(dim=-1)
        self.reap_sum.index_add_(0, ids.cpu(), (weights[tok, slot].double() * norms).cpu())
        # the seeded sample of tokens that falls into this batch
        lo, hi = self.offset, self.offset + x.shape[0]
        local = self.sample_positions[(self.sample_positions >= lo) & (self.sample_positions < hi)] - lo
        if local.numel() and self._apart:               # the shared experts' hook (shared_called) completes it
            self._slots = (local.to(x.device), weights[local.to(x.device)].masked_fill(
                indices[local.to(x.device)] < E, 0).double().sum(-1, keepdim=True), [])
        if local.numel():
            xs = x[local.to(x.device)]
            self.inputs.append(xs.float().cpu())
            self.logits.append(logits[local.to(x.device)].float().cpu())
            self.chosen.append((weights[local.to(x.device)].cpu(), indices[local.to(x.device)].cpu()))
            if self.expert_outputs:     # every expert on every sample token: E / top-k times the routed compute
                self.outputs.append(self.layer.every_expert(xs).float().cpu())
        self.offset = hi
        self.tokens += x.shape[0]

    def result(self) -> LayerStats:
        """The layer's statistics; the sample's logits of the real experts ([n, E]: the logits of identity slots,
        `all_logits()[:, E:]`, go into the routing rule)."""
        self._check_consumed()
        self._flush_slots()
        E = self.counts.numel()
        logits = self.all_logits()
        return LayerStats(layer=self.layer.index, top_k=self.top_k, tokens=self.tokens, counts=self.counts,
                          prob_sum=self.prob_sums[self.scoring], weight_sum=self.weight_sum, reap_sum=self.reap_sum,
                          inputs=_cat(self.inputs), logits=logits[:, :E].contiguous() if logits.numel() else logits,
                          outputs=_cat(self.outputs, dim=1), surplus=_cat(self.surplus))

    def all_logits(self) -> torch.Tensor:
        """The sample's router logits, every row the router scores (identity slots included)."""
        return _cat(self.logits)


def _cat(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim) if parts else torch.empty(0)


@torch.no_grad()
def observe_layer(decoder_layer, moe: MoeLayer, layout: Layout, batches, positions: torch.Tensor,
                  weight_similarity: bool = True, expert_outputs: bool = True):
    """Run one decoder layer on the cached batches with the statistics observer on its MoE block;
    returns (the layer's statistics, the layer's outputs for the next layer). Without `expert_outputs`
    the sample records inputs and router logits only (what selection methods and M-SMoE need)."""
    observer = Observer(moe, layout.family.scoring, layout.top_k, positions, expert_outputs)
    handles = [moe.router.register_forward_hook(observer.routed, with_kwargs=True),
               moe.experts.register_forward_pre_hook(observer.experts_called, with_kwargs=True)]
    if moe.identity_slots:                              # shared slots: their outputs (Observer.shared_called)
        shared = (get_tensor(moe.block, name) for name in layout.family.shared)
        handles += [m.register_forward_hook(observer.shared_called) for m in shared if isinstance(m, torch.nn.Module)]
    try:
        outputs = advance(decoder_layer, moe.index, batches)
    finally:
        for handle in handles:
            handle.remove()
    ls = observer.result()
    ls.routing = routing_rule(moe, layout.family)
    if not ls.routing and observer.chosen:             # a family found by structure: read off its router
        w, i = (torch.cat(parts) for parts in zip(*observer.chosen))
        # a router that chooses by token id (DeepSeek-V4's hash layers): its recorded choices, not a rule of logits
        logits = observer.all_logits().double()
        # slots chosen beside the experts (logits of every row) but not on the sample: what they give is probed
        kind = slot_kind(moe, ls.inputs) if moe.identity_slots and logits.shape[1] > moe.num_experts \
            and not bool((i >= moe.num_experts).any()) else None
        ls.routing = hash_rule(ls.logits, w, i) if moe.hash_table is not None else \
            inferred_rule(moe, logits, w, i, layout.top_k, kind)
    if ls.routing and ls.routing["scoring"] != observer.scoring:         # the guess was wrong: the router's own
        ls.prob_sum = observer.prob_sums[ls.routing["scoring"]]
    if weight_similarity:
        # model-centric similarity needs the weights, which a method never sees: derive it now
        reps = weight_representation(*moe.canonical_view())       # split experts (DBRX) as "halves"
        for name, fn in SIMILARITIES.items():
            ls.cache[f"similarity/{name}/weight"] = fn(reps).float()
    return ls, outputs
