"""Checks that run before the heavy work, so that bad input fails in seconds with a clear message.

A prune of a large checkpoint takes hours; a tokenizer that cannot encode text, an evaluation task that
cannot be scored, a full disk or a NaN in the weights must not surface at the end of it (or, worse, as a
silently wrong report). Each check here is cheap next to a forward pass and raises MoePruneError naming
the problem and the fix (evaluation inputs are checked by moeprune.evaluate.Evaluation, which reads and
tokenises them before any model runs):

    usable_tokenizer(tokenizer)                 -> (ok, reason): can it encode text at all?
    check_free_space(folder, needed_bytes)      -> room for the output, plus a margin
    check_finite(name, tensor)                  -> no NaN or Inf in a tensor
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .arch import MoePruneError

PROBE = "The quick brown fox. 12 + 30 = 42"
MIN_VOCAB = 16                  # transformers builds 1- or 2-token placeholder tokenizers for folders without files
MARGIN_FRACTION = 0.05          # free space wanted beyond the estimate: the estimate is not exact
MARGIN_BYTES = 64 * 2**20       # and plan.json, report.json, report.md and the tokenizer files come on top
CHUNK = 2**24                   # elements scanned at a time by check_finite, to bound its extra memory
FINITE_FIX = "check the input checkpoint, or compute in float32 (--dtype float32)"


# ---------------------------------------------------------------- tokenizer

def usable_tokenizer(tokenizer) -> tuple[bool, str]:
    """(True, "") if the tokenizer can encode text, else (False, why). transformers 5 builds an EMPTY tokenizer
    for a model folder without tokenizer files for some families (Qwen2Tokenizer with 1 token, GPTNeoXTokenizer
    with 2), which encodes every text to nothing: such a tokenizer counts as none."""
    if tokenizer is None:
        return False, "the model has no tokenizer"
    name = type(tokenizer).__name__
    try:
        size = len(tokenizer)
        ids = tokenizer.encode(PROBE, add_special_tokens=False)
    except Exception as e:  # noqa: BLE001 - any failure to encode means the tokenizer is unusable
        return False, f"{name} fails to encode text ({type(e).__name__}: {e})"
    if size <= MIN_VOCAB:
        return False, f"{name} has only {size} token(s) (the model folder probably has no tokenizer files)"
    if not ids:
        return False, f"{name} encodes {PROBE!r} to no tokens"
    return True, ""


# ---------------------------------------------------------------- disk

def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def check_free_space(folder: str | Path, needed_bytes: int, what: str = "the pruned checkpoint") -> None:
    """MoePruneError unless the filesystem holding `folder` (or its nearest existing parent: the output
    folder is usually not created yet) has room for needed_bytes plus a margin."""
    folder = Path(folder).expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    wanted = int(needed_bytes * (1 + MARGIN_FRACTION)) + MARGIN_BYTES
    if free < wanted:
        raise MoePruneError(f"not enough free space in {folder} for {what}: it needs about {_gib(wanted)} "
                            f"({_gib(needed_bytes)} plus a margin) and the filesystem has {_gib(free)} free; free "
                            "some space or choose an --out folder on another disk")


# ---------------------------------------------------------------- NaN / Inf

def _nonfinite(tensor: torch.Tensor) -> tuple[int, int]:
    """(NaN count, Inf count), scanning CHUNK elements at a time."""
    nan = inf = 0
    for chunk in tensor.detach().reshape(-1).split(CHUNK):
        if not bool(torch.isfinite(chunk).all()):
            nan += int(torch.isnan(chunk).sum())
            inf += int(torch.isinf(chunk).sum())
    return nan, inf


def check_finite(name: str, tensor: torch.Tensor, fix: str = FINITE_FIX) -> None:
    """MoePruneError naming the tensor if it holds NaN or Inf values (integer and meta tensors pass)."""
    if tensor.device.type == "meta" or not (tensor.is_floating_point() or tensor.is_complex()):
        return
    if tensor.numel() and bool(torch.isfinite(tensor.sum(dtype=torch.complex128 if tensor.is_complex()
                                                      else torch.float64))):
        return              # a float64 sum of finite bf16/fp16/fp32 values cannot overflow: all are finite
    nan, inf = _nonfinite(tensor)
    if nan or inf:
        raise MoePruneError(f"{name} holds {nan} NaN and {inf} infinite value(s) of {tensor.numel()}; {fix}")
