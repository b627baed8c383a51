"""Calibration statistics: everything a method needs, so that a method never touches the model.

Per MoE layer, over all calibration tokens: how often each expert is picked in the top-k, the summed
router probability, the summed routing weight, and REAP's sum of routing weight x output norm.
On a seeded sample of n tokens: the layer inputs, the router logits and every expert's output.

Statistics save to a folder (stats.safetensors + stats.json) and load back, so planning again at
another K needs no model run. Similarity matrices are derived once and cached with them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATS_VERSION = 1


@dataclass
class LayerStats:
    layer: int                      # decoder layer index
    top_k: int
    tokens: int                     # calibration tokens that reached the layer
    counts: torch.Tensor            # [E] float64, times each expert was in the top-k
    prob_sum: torch.Tensor          # [E] float64, summed router probability (softmax or sigmoid of the logits)
    weight_sum: torch.Tensor        # [E] float64, summed routing weight over the tokens routed to the expert
    reap_sum: torch.Tensor          # [E] float64, sum over routed tokens of routing weight * ||E_i(x)||
    inputs: torch.Tensor            # [n, d] float32, a sample of the MoE block's inputs
    logits: torch.Tensor            # [n, E] float32, router logits on the sample
    outputs: torch.Tensor           # [E, n, d] float32, every routed expert's output on the sample
    cache: dict[str, torch.Tensor] = field(default_factory=dict)   # derived matrices, e.g. "similarity/cka/output"
    # the layer's routing rule as data (routing.routing_rule), so that routing restricted to a subset of
    # experts can be replayed on `logits` without the model (NAEE); {} in statistics from before it existed
    routing: dict = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return int(self.counts.numel())

    @property
    def frequency(self) -> torch.Tensor:
        """Fraction of routing slots each expert took (sums to 1)."""
        return self.counts / self.counts.sum().clamp_min(1)

    @property
    def reap_saliency(self) -> torch.Tensor:
        """REAP: mean over the tokens routed to i of p_i(x) * ||E_i(x)||; 0 for an expert never routed."""
        return torch.where(self.counts > 0, self.reap_sum / self.counts.clamp_min(1), torch.zeros_like(self.reap_sum))

    def cached(self, key: str, compute) -> torch.Tensor:
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]


_TENSORS = ("counts", "prob_sum", "weight_sum", "reap_sum", "inputs", "logits", "outputs")


@dataclass
class Stats:
    model_type: str
    model: str                      # name or path the model was loaded from
    calibration: dict               # spec, samples, seq_len, seed, sample_tokens
    layers: dict[int, LayerStats]

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors, meta = {}, {}
        for i, ls in self.layers.items():
            for name in _TENSORS:
                tensors[f"{i}.{name}"] = getattr(ls, name).contiguous()
            for key, value in ls.cache.items():
                tensors[f"{i}.cache.{key}"] = value.contiguous()
            meta[str(i)] = {"top_k": ls.top_k, "tokens": ls.tokens, "routing": ls.routing}
        save_file(tensors, str(folder / "stats.safetensors"))
        header = {"version": STATS_VERSION, "model_type": self.model_type, "model": self.model,
                  "calibration": self.calibration, "layers": meta}
        (folder / "stats.json").write_text(json.dumps(header, indent=1))

    @classmethod
    def load(cls, folder: str | Path) -> "Stats":
        folder = Path(folder)
        header = json.loads((folder / "stats.json").read_text())
        if header.get("version") != STATS_VERSION:
            raise ValueError(f"{folder}: statistics version {header.get('version')} != {STATS_VERSION}; recollect them")
        tensors = load_file(str(folder / "stats.safetensors"))
        layers = {}
        for key, meta in header["layers"].items():
            i = int(key)
            cache = {k[len(f"{i}.cache."):]: v for k, v in tensors.items() if k.startswith(f"{i}.cache.")}
            layers[i] = LayerStats(layer=i, top_k=meta["top_k"], tokens=meta["tokens"], cache=cache,
                                   routing=meta.get("routing", {}),
                                   **{name: tensors[f"{i}.{name}"] for name in _TENSORS})
        return cls(header["model_type"], header["model"], header["calibration"], layers)

    def summary(self) -> dict:
        return {"model": self.model, "model_type": self.model_type, **self.calibration,
                "layers": len(self.layers)}
