"""Loading models by name or path, and saving standard checkpoints atomically.

Names: `demo-mixtral`, `demo-fine` (embedded), `tiny:<family>` (a tiny random model built here),
a local folder, or a Hugging Face hub id (when online). The output is written to a temporary
folder beside the destination and renamed into place, so a failure never leaves half a checkpoint,
and the input model is never written to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from . import demo
from .arch import MoePruneError

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object | None
    name: str                   # what the user asked for
    path: Path | None           # local folder it came from (None for tiny models and hub ids)
    save_dtype: torch.dtype | None = None   # the dtype to write the pruned checkpoint in


def resolve(spec: str | None) -> tuple[str, Path | None]:
    """(name, local folder or None) for a model spec; raises a clear error for a missing path."""
    spec = spec or demo.DEFAULT_MODEL
    if spec.startswith("tiny:"):
        return spec, None
    if (p := demo.model_path(spec)) is not None:
        return spec, p
    if spec in ("demo-mixtral", "demo-fine"):
        raise MoePruneError(f"the demo model {spec!r} is not in this installation; pass a MODEL path, or "
                            "tiny:mixtral for a tiny random model")
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise MoePruneError(f"{path} is not a model folder: it has no config.json")
        try:
            json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MoePruneError(f"{path / 'config.json'} is not valid JSON ({e}); the download is damaged or the "
                                "file was edited by hand: restore it") from None
        return spec, path.resolve()
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise MoePruneError(f"model path {spec!r} not found")
    return spec, None


def resolve_device(device: str | None) -> str:
    """"auto" (the default): the GPU when there is one, else the CPU."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def compute_dtype(dtype: str, device: str) -> torch.dtype | str:
    """dtype "auto": float32 on the CPU (its bfloat16 kernels are slow, and statistics want the precision),
    the checkpoint's own dtype elsewhere."""
    if dtype not in DTYPES:
        raise MoePruneError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if dtype == "auto" and torch.device(device).type == "cpu":
        return torch.float32
    return DTYPES[dtype]


def own_dtype(source: str | Path) -> torch.dtype | None:
    """The checkpoint's own dtype as its config.json states it (None when it states none)."""
    own = AutoConfig.from_pretrained(source).dtype
    own = getattr(torch, own, None) if isinstance(own, str) else own
    return own if isinstance(own, torch.dtype) else None


def load_tokenizer(source: str):
    """The model's tokenizer, or None when the folder has none that can encode text (transformers 5 builds an
    empty placeholder tokenizer for some families when the folder has no tokenizer files)."""
    from .preflight import usable_tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        return None
    return tokenizer if usable_tokenizer(tokenizer)[0] else None


def open_source(spec: str | None, dtype: str = "auto", device: str = "auto"):
    """(name, source for the per-layer engine, tokenizer, input folder or None).

    A local folder of safetensors is read lazily, a layer at a time (engine.CheckpointSource): the
    model never has to fit in memory. Anything else (a tiny model, a hub id, .bin weights) is loaded.
    """
    from .engine import CheckpointSource, ModelSource
    name, path = resolve(spec)
    device = resolve_device(device)
    compute = compute_dtype(dtype, device)
    if path is not None and any((path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        if compute == "auto":
            compute = own_dtype(path) or torch.float32
        return name, CheckpointSource(path, device, compute), load_tokenizer(str(path)), path
    loaded = load(spec, dtype, device)
    return name, ModelSource(loaded.model, save_dtype=loaded.save_dtype), loaded.tokenizer, path


def load(spec: str | None, dtype: str = "auto", device: str = "auto") -> Loaded:
    """Load a model for pruning. dtype "auto": float32 on the CPU (its bfloat16 kernels are slow, and
    statistics want the precision), the checkpoint's own dtype elsewhere; either way the pruned
    checkpoint is saved in the checkpoint's own dtype. An explicit dtype is used for both."""
    name, path = resolve(spec)
    device = resolve_device(device)
    compute = compute_dtype(dtype, device)
    if name.startswith("tiny:"):
        from .tiny import tiny_model
        model = tiny_model(name[5:])
        if dtype != "auto":
            model = model.to(DTYPES[dtype])
        return Loaded(model.to(device), None, name, None)
    source = str(path) if path is not None else name
    try:
        own = own_dtype(source)                                  # the checkpoint's own dtype, before loading
        model = AutoModelForCausalLM.from_pretrained(source, dtype=compute)
    except OSError as e:
        raise MoePruneError(f"could not load model {name!r}: {e}. Is it a local folder, or is the machine "
                            "online for a hub id?") from e
    tokenizer = load_tokenizer(source)
    save_dtype = DTYPES[dtype] if dtype != "auto" else own
    return Loaded(model.to(device).eval(), tokenizer, name, path, save_dtype)


def folder_bytes(path: Path | None) -> int | None:
    if path is None or not path.exists():
        return None
    return sum(f.stat().st_size for f in path.rglob("*.safetensors")) or None


def check_output(out: str | Path, overwrite: bool, source: Path | None) -> Path:
    """Validate the output folder before any work is done."""
    out = Path(out).expanduser().resolve()
    if source is not None and (out == source or source in out.parents or out in source.parents):
        raise MoePruneError(f"--out {out} overlaps the input model folder {source}; choose another folder")
    if out.exists() and not overwrite:
        raise MoePruneError(f"--out {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise MoePruneError(f"--out {out} exists and is not a folder")
    return out


def save_model(model, tokenizer, folder: Path, dtype: torch.dtype | None = None) -> None:
    """A standard checkpoint: transformers writes the experts in the hub's per-expert layout."""
    if dtype is not None and dtype != next(model.parameters()).dtype:
        model = model.to(dtype)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
