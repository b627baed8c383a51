"""Calibration statistics: everything a method needs, so that a method never touches the model.

Per MoE layer, over all calibration tokens: how often each expert is picked in the top-k, the summed
router probability, the summed routing weight, and REAP's sum of routing weight x output norm.
On a seeded sample of n tokens: the layer inputs, the router logits and every expert's output.

Statistics save to a folder (stats.json + one layer-<i>.safetensors per MoE layer) and load back, one
layer at a time if need be, so planning again at another K needs no model run. Similarity matrices are
derived once and cached with them.

A folder is reused as a --stats-cache only when `check_cache` finds nothing wrong: stats.json is intact (its
own sha256), it was made with the same settings (the calibration dict) from the same inputs (name, size
and modification time of the calibration text and model files), and every layer file has the sha256 the
header recorded and holds finite, non-negative sums of consistent shapes. Anything else is a reason, and
the statistics are recollected.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .arch import MoePruneError
from .similarity import cka_matrix

STATS_VERSION = 3       # 2: one safetensors file per layer; 3: sha256 of every file, input fingerprints


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
    # [n, d] float32, on the sample: the output of the slots the router sends every token to beside its experts
    # (Inkling's shared experts), per unit of their summed weight; empty when it has none (moeprune.observer)
    surplus: torch.Tensor = field(default_factory=lambda: torch.empty(0))

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
        return replace(self, inputs=empty, logits=empty, outputs=empty, surplus=empty, cache=dict(self.cache))

    def save(self, path: Path) -> None:
        tensors = {name: getattr(self, name).contiguous() for name in _TENSORS}
        tensors.update({f"cache.{k}": v.contiguous() for k, v in self.cache.items()})
        if self.surplus.numel():
            tensors["surplus"] = self.surplus.contiguous()
        save_file(tensors, str(path), metadata={"meta": json.dumps(
            {"layer": self.layer, "top_k": self.top_k, "tokens": self.tokens, "routing": self.routing})})

    @classmethod
    def load(cls, path: Path) -> "LayerStats":
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["meta"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        cache = {k[len("cache."):]: v for k, v in tensors.items() if k.startswith("cache.")}
        surplus = tensors.get("surplus", torch.empty(0))
        return cls(**meta, cache=cache, surplus=surplus, **{name: tensors[name] for name in _TENSORS})


_TENSORS = ("counts", "prob_sum", "weight_sum", "reap_sum", "inputs", "logits", "outputs")


@dataclass
class Stats:
    model_type: str
    model: str                      # name or path the model was loaded from
    calibration: dict               # spec, samples, seq_len, seed, sample_tokens
    layers: dict[int, LayerStats]

    def header(self, folder: str | Path | None = None) -> dict:
        header = {"version": STATS_VERSION, "model_type": self.model_type, "model": self.model,
                  "calibration": self.calibration, "layers": sorted(self.layers),
                  "inputs": input_fingerprint(self.calibration)}
        if folder is not None:
            header["files"] = {layer_file(folder, i).name: file_sha256(layer_file(folder, i)) for i in sorted(self.layers)}
        header["sha256"] = _self_sha256(header)
        return header

    def save(self, folder: str | Path) -> None:
        """stats.json and one layer-<i>.safetensors per MoE layer (a later run reads them one at a time)."""
        for i, ls in self.layers.items():
            ls.save(layer_file(folder, i))
        self.save_header(folder)

    def save_header(self, folder: str | Path) -> None:
        """stats.json: written last (with the sha256 of every layer file), so a folder whose layers are still
        being written, or were changed since, is not a cache."""
        tmp = Path(folder) / "stats.json.tmp"
        tmp.write_text(json.dumps(self.header(folder), indent=1))
        tmp.replace(Path(folder) / "stats.json")

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
    try:
        header = json.loads((Path(folder) / "stats.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise MoePruneError(f"{folder}/stats.json cannot be read ({type(e).__name__}); delete the folder or give "
                            "another --stats-cache, and the statistics are recollected") from None
    version = header.get("version") if isinstance(header, dict) else None
    if version != STATS_VERSION:
        raise MoePruneError(f"{folder}: statistics version {version} != {STATS_VERSION}; delete the "
                            "folder or give another --stats-cache, and they are recollected")
    return header


# ---------------------------------------------------------------- checking a cache before it is used

def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _self_sha256(header: dict) -> str:
    body = {k: v for k, v in header.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def input_fingerprint(calibration: dict) -> dict:
    """Name, size and modification time of each local file that shaped the statistics: the calibration text
    (--calib, --self-text) and the model folder's weights and config. Names (demo, hf:, hub ids) have none."""
    out = {}
    for key in ("spec", "self_text", "model"):
        value = calibration.get(key)
        if not isinstance(value, str) or not value or value in ("demo", "random") or value.startswith(("demo:", "hf:")):
            continue
        path = Path(value)
        try:
            if path.is_file():
                files, base = [path], path.parent
            elif path.is_dir():
                kinds = (".safetensors", ".json") if key == "model" else (".txt", ".jsonl")      # what is read
                files = sorted(q for q in path.rglob("*") if q.suffix in kinds and q.is_file())
                base = path
            else:
                continue
            out[key] = [[q.relative_to(base).as_posix(), q.stat().st_size, q.stat().st_mtime_ns] for q in files]
        except OSError:
            out[key] = "unreadable"
    return out


def check_cache(folder: str | Path, meta: dict, layers: list[int], weight_similarity: bool = False
                ) -> tuple[dict[int, Path], str | None]:
    """(layer -> statistics file, None) for a cache that can be used for a run with these settings, else
    ({}, the reason it cannot). Never raises for what is in the folder."""
    folder = Path(folder)
    try:
        header = read_header(folder)
    except MoePruneError as e:
        return {}, str(e).split(";")[0].removeprefix(f"{folder}: ").removeprefix(f"{folder}/")
    if header.get("sha256") != _self_sha256(header):
        return {}, "stats.json was changed after it was written (its checksum does not match)"
    have, files = header.get("calibration"), header.get("files")
    if not isinstance(have, dict) or not isinstance(files, dict) or not isinstance(header.get("layers"), list):
        return {}, "stats.json lacks its calibration settings, layer list or file checksums"
    differ = sorted(k for k in meta if have.get(k) != meta[k] and not (k == "expert_outputs" and have.get(k)))
    if differ:
        return {}, f"it holds statistics of other settings ({', '.join(differ)} differ)"
    try:
        same_layers = sorted(header["layers"]) == sorted(layers)
    except TypeError:
        same_layers = False
    if not same_layers:
        return {}, "it holds statistics of other settings (layers differ)"
    if header.get("inputs") != input_fingerprint(meta):
        return {}, "the calibration text or the model files changed since the statistics were collected"
    out = {}
    for i in layers:
        path = folder / f"layer-{i}.safetensors"
        if not path.is_file():
            return {}, f"{path.name} is missing"
        try:
            digest = file_sha256(path)
        except OSError as e:
            return {}, f"{path.name} cannot be read ({e.strerror or e})"
        if files.get(path.name) != digest:
            return {}, f"{path.name} was changed or truncated after it was written (its sha256 does not match)"
        why = check_layer_file(path, i, bool(meta.get("expert_outputs")), weight_similarity)
        if why is not None:
            return {}, f"{path.name}: {why}"
        out[i] = path
    return out, None


def check_layer_file(path: Path, i: int, expert_outputs: bool, weight_similarity: bool) -> str | None:
    """None when the layer file holds statistics a method can use, else what is wrong (one tensor read at a time)."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "null"))
            if not isinstance(meta, dict) or set(meta) != {"layer", "top_k", "tokens", "routing"}:
                return "its metadata is not moeprune's layer statistics"
            if meta["layer"] != i or not isinstance(meta["routing"], dict):
                return f"it holds layer {meta['layer']!r}, not {i}"
            keys = set(f.keys())
            missing = [n for n in _TENSORS if n not in keys]
            if missing:
                return f"it lacks {', '.join(missing)}"
            shape = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
            E = shape["counts"][0] if len(shape["counts"]) == 1 else 0
            if E < 1 or any(shape[k] != (E,) for k in ("prob_sum", "weight_sum", "reap_sum")):
                return "its per-expert sums do not have one shape [E]"
            top_k, tokens = meta["top_k"], meta["tokens"]
            if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E \
                    or isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
                return f"top_k {top_k!r} / tokens {tokens!r} are not counts for {E} experts"
            n = shape["logits"][0] if len(shape["logits"]) == 2 and shape["logits"][1] == E else None
            if n is None or len(shape["inputs"]) != 2 or shape["inputs"][0] != n:
                return f"the token sample's inputs {list(shape['inputs'])} and logits {list(shape['logits'])} do not match"
            d = shape["inputs"][1]
            if shape["outputs"] != (E, n, d) and not (math.prod(shape["outputs"]) == 0 and not expert_outputs):
                return f"the expert outputs are {list(shape['outputs'])}, not {[E, n, d]}"
            if "surplus" in shape and shape["surplus"] != (n, d):
                return f"the token sample's slot outputs are {list(shape['surplus'])}, not {[n, d]}"
            if weight_similarity and not any(k.startswith("cache.similarity/") and k.endswith("/weight") for k in keys):
                return "it has no weight similarity (needed by --representation weight)"
            for k in sorted(keys):
                if k.startswith("cache.") and shape[k] != (E, E):
                    return f"{k} is {list(shape[k])}, not [{E}, {E}]"
                t = f.get_tensor(k)
                if not t.is_floating_point():
                    return f"{k} is {t.dtype}, not floating point"
                if not bool(t.isfinite().all()):
                    return f"{k} holds NaN or infinite values"
                if k in ("counts", "prob_sum", "weight_sum", "reap_sum") and bool((t < 0).any()):
                    return f"{k} holds negative values"
                del t
    except Exception as e:  # noqa: BLE001 - whatever the file holds, it is a reason, never a traceback
        return f"it cannot be read as statistics ({type(e).__name__})"
    return None
