"""Calibration statistics: everything a method needs, so that a method never touches the model.

Per MoE layer, over all calibration tokens: how often each expert is picked in the top-k, the summed
router probability, the summed routing weight, and REAP's sum of routing weight x output norm.
On a seeded sample of n tokens: the layer inputs, the router logits and every expert's output.

Statistics save to a folder (stats.json + one layer-<i>.safetensors per MoE layer) and load back, one
layer at a time if need be, so planning again at another K needs no model run. Similarity matrices are
derived once and cached with them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .arch import MoePruneError
from .similarity import cka_matrix

STATS_VERSION = 2       # 2: one safetensors file per layer


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


    def light(self, similarity: bool = False) -> "LayerStats":
        """A copy without the token sample (inputs, logits, outputs): what a report keeps of a layer once it is
        planned. With `similarity`, the output CKA matrix the plots show is derived first."""
        if similarity:
            self.cached("similarity/cka/output", lambda: cka_matrix(self.outputs).float())
        empty = torch.empty(0)
        return replace(self, inputs=empty, logits=empty, outputs=empty, cache=dict(self.cache))

    def save(self, path: Path) -> None:
        tensors = {name: getattr(self, name).contiguous() for name in _TENSORS}
        tensors.update({f"cache.{k}": v.contiguous() for k, v in self.cache.items()})
        save_file(tensors, str(path), metadata={"meta": json.dumps(
            {"layer": self.layer, "top_k": self.top_k, "tokens": self.tokens, "routing": self.routing})})

    @classmethod
    def load(cls, path: Path) -> "LayerStats":
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["meta"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        cache = {k[len("cache."):]: v for k, v in tensors.items() if k.startswith("cache.")}
        return cls(**meta, cache=cache, **{name: tensors[name] for name in _TENSORS})


_TENSORS = ("counts", "prob_sum", "weight_sum", "reap_sum", "inputs", "logits", "outputs")


@dataclass
class Stats:
    model_type: str
    model: str                      # name or path the model was loaded from
    calibration: dict               # spec, samples, seq_len, seed, sample_tokens
    layers: dict[int, LayerStats]

    def header(self) -> dict:
        return {"version": STATS_VERSION, "model_type": self.model_type, "model": self.model,
                "calibration": self.calibration, "layers": sorted(self.layers)}

    def save(self, folder: str | Path) -> None:
        """stats.json and one layer-<i>.safetensors per MoE layer (a later run reads them one at a time)."""
        for i, ls in self.layers.items():
            ls.save(layer_file(folder, i))
        self.save_header(folder)

    def save_header(self, folder: str | Path) -> None:
        """stats.json: written last, so a folder whose layers are still being written is not a cache."""
        (Path(folder) / "stats.json").write_text(json.dumps(self.header(), indent=1))

    @classmethod
    def load(cls, folder: str | Path) -> "Stats":
        folder = Path(folder)
        header = read_header(folder)
        layers = {i: LayerStats.load(layer_file(folder, i)) for i in header["layers"]}
        return cls(header["model_type"], header["model"], header["calibration"], layers)

    def summary(self) -> dict:
        return {"model": self.model, "model_type": self.model_type, **self.calibration,
                "layers": len(self.layers)}


def layer_file(folder: str | Path, i: int) -> Path:
    """Where layer i's statistics are saved in a statistics folder (created if needed)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder) / f"layer-{i}.safetensors"


def read_header(folder: Path) -> dict:
    header = json.loads((Path(folder) / "stats.json").read_text())
    if header.get("version") != STATS_VERSION:
        raise MoePruneError(f"{folder}: statistics version {header.get('version')} != {STATS_VERSION}; delete the "
                            "folder or give another --stats-cache, and they are recollected")
    return header
