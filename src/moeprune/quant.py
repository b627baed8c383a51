"""Quantized checkpoints read, pruned and written in the precision they ship.

Two schemes are read, as their hubs publish them (and as transformers' finegrained_fp8 / mxfp4 integrations
load them):

- FP8 (`quantization_config.quant_method == "fp8"`, DeepSeek-V3, Kimi-K2, Qwen3-FP8): a quantized linear
  weight `X.weight` is F8_E4M3 beside `X.weight_scale_inv` (float32, bfloat16, or e8m0 bytes as uint8) of
  shape ceil(out/b0) x ceil(in/b1) for `weight_block_size` [b0, b1]; its value is q * scale_inv, block by
  block. Experts stored fused (transformers 5's own layout) are `X` [E, out, in] beside `X_scale_inv`
  [E, ...]. What the file keeps in bf16 (embeddings, norms, routers, lm_head, `modules_to_not_convert`) is
  read as it is: a tensor is quantized exactly when the file stores it as F8 with its scale.
- MXFP4 (`quant_method == "mxfp4"`, gpt-oss): the routed experts' `X_blocks` uint8 [E, R, K/32, 16] (two
  FP4 e2m1 codes a byte, the low nibble first) beside `X_scales` uint8 e8m0 [E, R, K/32] (2^(byte - 127)
  per 32 values); the model's tensor `X` [E, K, R] is their product, transposed.
- FP8 with FP4 experts (`quant_method == "fp8"`, `expert_dtype == "fp4"`: DeepSeek-V4-Flash/Pro; older V4 configs
  carry `expert_dtype` at the top level, transformers' DeepseekV4Config moves it into quantization_config): the
  dense linears are FP8 as above with `scale_fmt` "ue8m0" (e8m0 scales), and every scale of this layout is named
  `X.scale` beside `X.weight` (transformers renames it to `X.weight_scale_inv` when it loads). The routed experts'
  `X.weight` is I8 [..., N, K/2] (two e2m1 codes a byte, the low nibble first) beside `X.scale` e8m0 [..., N, K/32]:
  MXFP4's arithmetic (`fp4_dequantize`, `fp4_quantize` are the MXFP4 functions on this layout), not transposed,
  the model's tensor being [..., N, K] (transformers' FP8Experts with expert_dtype "fp4").

`Scheme` maps the stored tensors to the plain (dequantized) tensors the model reads, under the names a plain
checkpoint would give them (`names()`), so the model skeleton is built without its quantization_config and
the engine never sees a quantized tensor. A tensor is dequantized when it is read (`read`), one at a time,
into the compute dtype; `quantize` goes the other way with fresh scales (FP8: amax / 448 per block; MXFP4 and FP4
experts: the per-32 power of two of lower error), for a merged expert the writer must store in the input's scheme.

`ExpertIndex` tells the writer which input expert a pruned expert's tensor still is, bit for bit (a kept,
unmerged expert), so that its stored bytes and scales are copied as they are instead of quantized again.

Every other quantization method is refused, naming it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .arch import MoePruneError
from .shards import DTYPES, Checkpoint

SUPPORTED = ("fp8", "mxfp4")
FP8_MAX = 448.0                                  # the largest float8_e4m3fn value
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MX_GROUP = 32                                    # values sharing one e8m0 scale
E8M0_BIAS = 127
SCALE_DTYPES = ("F32", "BF16", "U8", "F8_E8M0")  # FP8 block scales: float, or e8m0 exponents (bytes or torch's)
E8M0_DTYPES = ("U8", "F8_E8M0")                  # FP4 experts' scales: e8m0 exponents only
EXPERT_DTYPES = ("fp8", "fp4")                   # quantization_config.expert_dtype
_E8M0 = getattr(torch, "float8_e8m0fnu", None)
_SAMPLE = 1 << 14                                # values a fingerprint samples


# ---------------------------------------------------------------- the config

def quantization_config(config) -> dict | None:
    """The config's quantization_config as a plain dict (None when it has none)."""
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    if not isinstance(q, dict) and callable(getattr(q, "to_dict", None)):
        q = q.to_dict()
    if not isinstance(q, dict):
        raise MoePruneError(f"config.json: quantization_config is {str(q)[:80]!r}, not an object naming its "
                            "quant_method; restore the file")
    return q


def quant_method(config) -> str | None:
    """quantization_config.quant_method (None: the config has no quantization_config)."""
    q = quantization_config(config)
    if q is None:
        return None
    method = q.get("quant_method")
    method = getattr(method, "value", method)
    if not isinstance(method, str) or not method:
        raise MoePruneError(f"config.json: quantization_config names no quant_method ({str(method)[:80]!r}); restore "
                            "the file")
    return method


def plain_config(config):
    """A copy of the config without its quantization_config: the model of plain modules the engine reads."""
    plain = copy.deepcopy(config)
    for c in (plain, getattr(plain, "get_text_config", lambda: None)()):
        if c is not None and hasattr(c, "quantization_config"):
            try:
                delattr(c, "quantization_config")
            except AttributeError:
                c.quantization_config = None
    return plain


def config_text_without_quantization(text: str) -> str:
    """config.json's text without quantization_config, and without the top-level expert_dtype older DeepSeek-V4
    configs carry (a dequantized output); every other key as it was."""
    raw = json.loads(text)
    for c in (raw, *(sub for sub in raw.values() if isinstance(sub, dict))):   # a text sub-config: its own copy
        c.pop("quantization_config", None)
        c.pop("expert_dtype", None)
    return json.dumps(raw, indent=2) + "\n"


# ---------------------------------------------------------------- FP8 e4m3 with block scales

def _scale_values(scale: torch.Tensor) -> torch.Tensor:
    """Block scales as float32: e8m0 bytes are 2^(byte - 127)."""
    if scale.dtype == _E8M0:
        scale = scale.view(torch.uint8)
    if scale.dtype == torch.uint8:
        return torch.ldexp(torch.ones(scale.shape, dtype=torch.float32), scale.to(torch.int32) - E8M0_BIAS)
    return scale.to(torch.float32)


def _expand(scale: torch.Tensor, block: tuple[int, int], rows: int, cols: int) -> torch.Tensor:
    """A per-block tensor [..., ceil(rows/b0), ceil(cols/b1)] repeated over its blocks, cut to [..., rows, cols]."""
    full = scale.repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    return full[..., :rows, :cols]


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [..., rows, cols] float8_e4m3fn times its block scales [..., ceil(rows/b0), ceil(cols/b1)] (the last
    blocks of a dimension that is not a multiple of the block size are partial), computed in float32; a tensor of
    several matrices (fused experts) one matrix at a time."""
    if q.dim() > 2:
        out = torch.empty(q.shape, dtype=dtype)
        for k in range(q.shape[0]):
            out[k] = fp8_dequantize(q[k], scale[k], block, dtype)
        return out
    rows, cols = q.shape[-2:]
    values = _scale_values(scale)
    if rows % block[0] == 0 and cols % block[1] == 0:           # whole blocks: a broadcast, no expanded scales
        nr, nc = values.shape
        out = (q.to(torch.float32).view(nr, block[0], nc, block[1]) * values.view(nr, 1, nc, 1)).view(rows, cols)
    else:
        out = q.to(torch.float32) * _expand(values, block, rows, cols)
    return out if dtype == torch.float32 else out.to(dtype)


def fp8_quantize(w: torch.Tensor, block: tuple[int, int], scale_dtype: str = "F32",
                 pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn, block scales in `scale_dtype`) of w [..., rows, cols], the scale of a block its largest
    magnitude / 448 (rounded up to a power of two when `pow2`, the e8m0 format; 1 for an all-zero block), as
    stored: q = w / stored scale, clamped to +-448."""
    rows, cols = w.shape[-2:]
    b0, b1 = block
    nr, nc = math.ceil(rows / b0), math.ceil(cols / b1)
    w32 = w.to(torch.float32)
    padded = torch.zeros(*w.shape[:-2], nr * b0, nc * b1, dtype=torch.float32)
    padded[..., :rows, :cols] = w32
    amax = padded.unflatten(-1, (nc, b1)).unflatten(-3, (nr, b0)).abs().amax(dim=(-3, -1))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    e8m0 = scale_dtype in ("U8", "F8_E8M0")
    if pow2 or e8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    if e8m0:
        stored = (torch.log2(scale).round().to(torch.int32) + E8M0_BIAS).clamp(0, 254).to(torch.uint8)
        stored = stored.view(_E8M0) if scale_dtype == "F8_E8M0" else stored
    else:
        stored = scale.to(DTYPES[scale_dtype])
    q = (w32 / _expand(_scale_values(stored), block, rows, cols)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, stored


# ---------------------------------------------------------------- MXFP4 (OCP microscaling, e2m1 + e8m0)

_FP4 = torch.tensor(FP4_VALUES, dtype=torch.float32)
_FP4_MAGNITUDES = _FP4[:8]
_FP4_MIDPOINTS = (_FP4_MAGNITUDES[1:] + _FP4_MAGNITUDES[:-1]) / 2
_FP4_PAIRS = _FP4[torch.stack([torch.arange(256) & 0x0F, torch.arange(256) >> 4], dim=-1)]   # byte -> its 2 values
_CHUNK = 1 << 14                                 # values a step quantizes: its ops stay under torch's
                                                 # 32768-element grain, so they run without thread barriers


def _rounding_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """Tables that round a magnitude v >= 0 (float32, or NaN) to e2m1 from its bits: the key (bits(v) - 1) >> 21,
    clamped at 0, is in 0..1023. Every midpoint between e2m1 magnitudes has its low 21 bits zero, so the count of
    midpoints below v, its magnitude code (a midpoint rounds down, as bucketize rounds it), is a function of the
    key; NaN keys (above +inf's) get code 7, as bucketize gives them, without the sign bit. Returns (the rounded
    magnitude, float32; the code with bit 3 set where a negative value takes a sign, uint8), each by key."""
    bounds = _FP4_MIDPOINTS.view(torch.int32)
    if torch.any(bounds & ((1 << 21) - 1)):
        raise AssertionError("e2m1 midpoints with low mantissa bits: the rounding table does not apply")
    key = torch.arange(1024, dtype=torch.int32)
    mag = ((bounds >> 21) <= key.unsqueeze(-1)).sum(dim=-1)
    signed = (mag > 0) & (key < (0x7F800000 >> 21))
    return _FP4_MAGNITUDES[mag].contiguous(), (mag | torch.where(signed, 8, 0)).to(torch.uint8)


_ROUNDED, _CODE = _rounding_tables()


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks uint8 [..., R, G, 16] (code of element 2k in the low nibble of byte k, 2k+1 in the high nibble)
    with scales uint8 [..., R, G] -> [..., G*32, R]: the model's layout, rows and columns swapped as transformers'
    mxfp4 loader swaps them. Fused experts are dequantized one expert at a time. A byte's two values come from
    one 256-entry table; the products with 2^(scale - 127) are exact (tests compare every byte and scale)."""
    if blocks.shape[:-1] != scales.shape:
        raise MoePruneError(f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not match")
    if blocks.dim() > 3:
        *lead, rows, groups, _ = blocks.shape
        out = torch.empty(*lead, groups * MX_GROUP, rows, dtype=dtype)
        for k in range(blocks.shape[0]):
            out[k] = mxfp4_dequantize(blocks[k], scales[k], dtype)
        return out
    out = _e2m1_rows(blocks, scales).t().contiguous()                # transposed in float32, then converted:
    return out if dtype == torch.float32 else out.to(dtype)          # a converting transpose is 2x slower


def _e2m1_rows(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks uint8 [R, G, 16] with e8m0 scales uint8 [R, G] -> float32 [R, G*32], row by row as stored."""
    rows, groups, _ = blocks.shape
    values = _FP4_PAIRS.index_select(0, blocks.reshape(-1).to(torch.int32)).view(rows, groups, MX_GROUP)
    exp = (scales.to(torch.int32) - E8M0_BIAS).unsqueeze(-1)                   # -127..128: 2^128 is no float32,
    values.mul_(torch.pow(2.0, exp // 2)).mul_(torch.pow(2.0, exp - exp // 2))  # two exact steps are ldexp
    return values.view(rows, groups * MX_GROUP)


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, scales) of w [..., K, R] (the model's layout; K a multiple of 32): per 32 values along K, the
    power-of-two scale of the two candidates (the one that fits the largest magnitude in 6 and the one below
    it, which clips that value) with the lower squared error (float32, summed over the 32; the larger scale on a
    tie), each value rounded to the nearest e2m1 code (a midpoint down, beyond 6 to 6).

    Fast, in the same arithmetic as the straightforward version it replaced (bucketize into int64 codes, then
    gathers; 6-15x slower on one thread, kept in tests/test_quant.py, whose tests compare the bytes): both
    candidates are tried on a few rows at a time (`_CHUNK`), the code is looked up from the bits of |w| / scale
    (`_rounding_tables`), the per-group exponents and powers of two are computed on the whole [..., R, G] tensor as
    before, and the error is summed over a contiguous last axis of 32 as before, so that every float32 operation
    sees the same operands."""
    x = w.to(torch.float32).transpose(-1, -2).contiguous()                       # [..., R, K]
    *lead, R, K = x.shape
    if K % MX_GROUP:
        raise MoePruneError(f"MXFP4 needs a multiple of {MX_GROUP} values per row, this tensor has {K}")
    G = K // MX_GROUP
    g = x.view(math.prod(lead) * R, G, MX_GROUP)                                  # [rows, G, 32]
    a = g.abs()
    tiny = torch.finfo(torch.float32).tiny
    high = torch.ceil(torch.log2((a.amax(dim=-1) / 6.0).clamp(min=tiny))).clamp(-E8M0_BIAS, 127).to(torch.int32)
    low = (high - 1).clamp(min=-E8M0_BIAS)
    down = torch.stack([torch.pow(2.0, -high), torch.pow(2.0, -low)]).unsqueeze(-1)     # [2, rows, G, 1]
    up = torch.stack([torch.pow(2.0, high), torch.pow(2.0, low)]).unsqueeze(-1)
    # a group with a NaN has no exponent (NaN cast to int32: INT_MIN on x86), 2^-exp no float32: its magnitudes are
    # scaled by ldexp, as before (its error is NaN, its codes those of 0, +-inf and NaN)
    odd = (high < -E8M0_BIAS) | (high > 127)
    odd = odd if bool(odd.any()) else None
    rows = g.shape[0]
    codes = torch.empty(rows, G, MX_GROUP, dtype=torch.uint8)
    lower = torch.empty(rows, G, dtype=torch.bool)                              # the lower scale is better
    step = max(1, _CHUNK // max(K, 1))
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        ar = a[r0:r1]
        scaled = ar * down[:, r0:r1]                                             # [2, r, G, 32]: |w| / scale
        if odd is not None and bool(odd[r0:r1].any()):
            o = odd[r0:r1]
            for c, exp in enumerate((high, low)):
                scaled[c][o] = torch.ldexp(ar[o], -exp[r0:r1][o].unsqueeze(-1))
        key = scaled.view(torch.int32).bitwise_and_(0x7FFFFFFF).sub_(1).bitwise_right_shift_(21).clamp_(min=0)
        err = _ROUNDED.index_select(0, key.view(-1)).view(key.shape).mul_(up[:, r0:r1]).sub_(ar)
        err = err.mul_(err).sum(dim=-1)                                          # [2, r, G]
        torch.lt(err[1], err[0], out=lower[r0:r1])
        torch.index_select(_CODE, 0, torch.where(lower[r0:r1].unsqueeze(-1), key[1], key[0]).view(-1),
                           out=codes[r0:r1].view(-1))
    codes &= torch.bitwise_right_shift(g.view(torch.int32), 28).to(torch.uint8) | 7     # the sign bit: 8 or 0
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (torch.where(lower, low, high) + E8M0_BIAS).to(torch.uint8)
    return blocks.view(*lead, R, G, MX_GROUP // 2), scales.view(*lead, R, G)


def fp4_dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """DeepSeek-V4's FP4 experts: q int8 [..., N, K/2] (two e2m1 codes a byte, element 2k in the low nibble of
    byte k) with e8m0 scales (uint8 or float8_e8m0fnu) [..., N, K/32] -> [..., N, K], as stored (not transposed):
    MXFP4's values (`_e2m1_rows`), exact. Fused experts are dequantized one expert at a time."""
    if scales.dtype == _E8M0:
        scales = scales.view(torch.uint8)
    *lead, rows, half = q.shape
    if half % (MX_GROUP // 2) or tuple(scales.shape) != (*lead, rows, half // (MX_GROUP // 2)):
        raise MoePruneError(f"FP4 weight {list(q.shape)} and scales {list(scales.shape)} do not match (scales "
                            f"[..., N, K/32] for a weight [..., N, K/2])")
    if q.dim() > 2:
        out = torch.empty(*lead, rows, 2 * half, dtype=dtype)
        for k in range(q.shape[0]):
            out[k] = fp4_dequantize(q[k], scales[k], dtype)
        return out
    blocks = q.contiguous().view(torch.uint8).view(rows, half // (MX_GROUP // 2), MX_GROUP // 2)
    out = _e2m1_rows(blocks, scales)
    return out if dtype == torch.float32 else out.to(dtype)


def fp4_quantize(w: torch.Tensor, scale_dtype: str = "F8_E8M0") -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [..., N, K/2], e8m0 scales [..., N, K/32] as `scale_dtype`, "U8" or "F8_E8M0") of w [..., N, K]:
    `mxfp4_quantize` (the same codes and scales, chosen the same way) on the transposed view, its blocks laid out
    as DeepSeek-V4 stores them."""
    if w.shape[-1] % MX_GROUP:
        raise MoePruneError(f"FP4 experts need a multiple of {MX_GROUP} values per row, this tensor has "
                            f"{w.shape[-1]}")
    blocks, scales = mxfp4_quantize(w.transpose(-1, -2))                          # [..., N, K/32, 16], [..., N, K/32]
    q = blocks.flatten(-2).view(torch.int8)
    return q, (scales.view(_E8M0) if scale_dtype == "F8_E8M0" else scales)


# ---------------------------------------------------------------- a checkpoint's scheme

@dataclass(frozen=True)
class QTensor:
    """A plain tensor of the model as a quantized checkpoint stores it."""
    name: str                      # the name a plain checkpoint gives it
    shape: tuple[int, ...]         # its shape, dequantized
    parts: tuple[str, ...]         # the stored tensors (FP8: weight, scale_inv; MXFP4: blocks, scales)
    dtypes: tuple[str, ...]        # their safetensors dtypes


class Scheme:
    """The quantized tensors of a checkpoint: names, reading (dequantized) and writing (quantized)."""
    method = ""

    def __init__(self, qconfig: dict, ckpt: Checkpoint):
        self.qconfig, self.ckpt = qconfig, ckpt
        self.tensors: dict[str, QTensor] = {}      # plain name -> its stored parts
        self.parts: dict[str, str] = {}            # stored part -> plain name

    def _add(self, q: QTensor) -> None:
        self.tensors[q.name] = q
        for p in q.parts:
            self.parts[p] = q.name

    def names(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the plain model reads: the stored tensors that are not quantized, and the quantized ones
        under their plain names and shapes (their parts hidden)."""
        out = {}
        for name, t in self.ckpt.tensors.items():
            if name in self.parts:
                q = self.tensors[self.parts[name]]
                out.setdefault(q.name, q.shape)
            else:
                out[name] = t.shape
        return out

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The plain tensor `name`, dequantized from its parts (read one after the other) into `dtype`."""
        q = self.tensors[name]
        return self.dequantize(name, [self.ckpt.get(p) for p in q.parts], dtype)

    def dequantize(self, name: str, parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def quantize(self, name: str, t: torch.Tensor) -> list[torch.Tensor]:
        """The stored parts of `t`, a value of the plain tensor `name` (or of one expert of it, when its first
        axis is the expert's), in the dtypes the input stores them in."""
        raise NotImplementedError

    def part_shapes(self, name: str, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """The shapes of the parts of the plain tensor `name` when it has `shape` (an expert axis cut)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What `moeprune info` and the report say of the scheme."""
        return {"method": self.method, "quantized_tensors": len(self.tensors)}


class FP8Scheme(Scheme):
    method = "fp8"

    def __init__(self, qconfig: dict, ckpt: Checkpoint):
        super().__init__(qconfig, ckpt)
        block = qconfig.get("weight_block_size")
        if not (isinstance(block, (list, tuple)) and len(block) == 2
                and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise MoePruneError(f"{ckpt.folder}: quantization_config.weight_block_size is {block!r}; moeprune reads "
                                "FP8 checkpoints with block scales (weight_block_size [128, 128], as DeepSeek-V3 and "
                                "Qwen3-FP8 publish them), not per-tensor or per-channel FP8")
        scheme = str(qconfig.get("activation_scheme", "dynamic")).lower()
        if scheme != "dynamic":
            raise MoePruneError(f"{ckpt.folder}: FP8 with activation_scheme {scheme!r} (static activation scales) is "
                                "not supported; moeprune reads dynamic-activation FP8 checkpoints")
        fmt = qconfig.get("fmt", "e4m3")
        if fmt not in (None, "e4m3"):
            raise MoePruneError(f"{ckpt.folder}: FP8 format {fmt!r} is not supported (moeprune reads e4m3)")
        self.block = (int(block[0]), int(block[1]))
        self.pow2 = qconfig.get("scale_fmt") == "ue8m0"
        self.expert_dtype = str(qconfig.get("expert_dtype") or "fp8")
        if self.expert_dtype not in EXPERT_DTYPES:
            raise MoePruneError(f"{ckpt.folder}: quantization_config.expert_dtype is {self.expert_dtype!r}; moeprune "
                                f"reads FP8 checkpoints whose experts are {' or '.join(EXPERT_DTYPES)}")
        self.fp4: set[str] = set()                 # plain names of the FP4 expert tensors
        scales = {}
        for name, t in ckpt.tensors.items():
            if t.dtype == "F8_E5M2":
                raise MoePruneError(f"{ckpt.folder}: {name} is F8_E5M2; moeprune reads FP8 e4m3 checkpoints")
            if name.endswith("_scale_inv"):
                scales[name] = t
        for name, t in ckpt.tensors.items():
            scale = self.scale_name(name)
            if t.dtype == "I8" and scale in ckpt.tensors:
                self._add_fp4(name, t, ckpt.tensors[scale])
                scales.pop(scale, None)
                continue
            if t.dtype != "F8_E4M3":
                continue
            s = scales.pop(scale, None) if scale.endswith("_scale_inv") else ckpt.tensors.get(scale)
            if s is None:
                raise MoePruneError(f"{ckpt.folder}: {name} is F8_E4M3 but the checkpoint has no {scale}; it is "
                                    "incomplete (re-download it)")
            if len(t.shape) < 2:
                raise MoePruneError(f"{ckpt.folder}: {name} is F8_E4M3 of shape {list(t.shape)}; FP8 block scales "
                                    "need a matrix")
            want = self._scale_shape(t.shape)
            if s.shape != want:
                raise MoePruneError(f"{ckpt.folder}: {scale} has shape {list(s.shape)}; {name} {list(t.shape)} with "
                                    f"weight_block_size {list(self.block)} needs {list(want)}")
            if s.dtype not in SCALE_DTYPES:
                raise MoePruneError(f"{ckpt.folder}: {scale} is {s.dtype}; FP8 block scales are read as "
                                    f"{', '.join(SCALE_DTYPES)} (e8m0 as uint8)")
            self._add(QTensor(name, t.shape, (name, scale), (t.dtype, s.dtype)))
        if scales:
            stray = sorted(scales)
            raise MoePruneError(f"{ckpt.folder}: {stray[0]} (and {len(stray) - 1} more) is a scale without an "
                                "F8_E4M3 weight; the checkpoint is damaged or of another FP8 layout")

    def scale_name(self, weight: str) -> str:
        """X.weight -> X.weight_scale_inv, or X.scale where the checkpoint names it so (DeepSeek-V4); a fused tensor
        X -> X_scale_inv (transformers' Fp8Quantize)."""
        if weight.endswith(".weight"):
            short = weight[: -len(".weight")] + ".scale"
            if short in self.ckpt.tensors and weight + "_scale_inv" not in self.ckpt.tensors:
                return short
        return weight + "_scale_inv"

    def _add_fp4(self, name: str, t, s) -> None:
        """An FP4 expert tensor (I8 beside e8m0 scales), checked against DeepSeek-V4's layout."""
        folder, scale = self.ckpt.folder, self.scale_name(name)
        if self.expert_dtype != "fp4":
            raise MoePruneError(f"{folder}: {name} is I8 beside {scale} (FP4 experts) but quantization_config."
                                f"expert_dtype is {self.expert_dtype!r}: restore config.json (DeepSeek-V4 says "
                                "expert_dtype \"fp4\")")
        *lead, rows, half = t.shape if len(t.shape) >= 2 else (0, 0)
        want = (*lead, rows, half // (MX_GROUP // 2))
        if len(t.shape) < 2 or half % (MX_GROUP // 2) or s.shape != want or s.dtype not in E8M0_DTYPES:
            expect = f"F8_E8M0 {list(want)}" if len(t.shape) >= 2 and not half % (MX_GROUP // 2) else \
                f"a weight whose last axis is a multiple of {MX_GROUP // 2}"
            raise MoePruneError(f"{folder}: {name} I8{list(t.shape)} with {scale} {s.dtype}{list(s.shape)} is not the "
                                f"FP4 expert layout (int8 [..., N, K/2] beside e8m0 scales [..., N, K/32]); "
                                f"expected {scale} {expect}")
        self.fp4.add(name)
        self._add(QTensor(name, (*lead, rows, 2 * half), (name, scale), ("I8", s.dtype)))

    def _scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape[:-2]) + (math.ceil(shape[-2] / self.block[0]), math.ceil(shape[-1] / self.block[1]))

    def dequantize(self, name, parts, dtype):
        if name in self.fp4:
            return fp4_dequantize(parts[0], parts[1], dtype)
        return fp8_dequantize(parts[0], parts[1], self.block, dtype)

    def quantize(self, name, t):
        if name in self.fp4:
            return list(fp4_quantize(t, self.tensors[name].dtypes[1]))
        q, s = fp8_quantize(t, self.block, self.tensors[name].dtypes[1], self.pow2)
        return [q, s]

    def part_shapes(self, name, shape):
        if name in self.fp4:
            *lead, rows, k = shape
            return [(*lead, rows, k // 2), (*lead, rows, k // MX_GROUP)]
        return [tuple(shape), self._scale_shape(tuple(shape))]

    def describe(self):
        out = {**super().describe(), "weight_block_size": list(self.block),
               "scale_dtypes": sorted({q.dtypes[1] for q in self.tensors.values()})}
        if self.fp4:
            out.update(expert_dtype="fp4", fp4_expert_tensors=len(self.fp4))
        return out


class MXFP4Scheme(Scheme):
    method = "mxfp4"

    def __init__(self, qconfig: dict, ckpt: Checkpoint):
        super().__init__(qconfig, ckpt)
        for name, t in ckpt.tensors.items():
            if not name.endswith("_blocks"):
                continue
            base = name[: -len("_blocks")]
            scales = ckpt.tensors.get(base + "_scales")
            if scales is None:
                raise MoePruneError(f"{ckpt.folder}: {name} has no {base}_scales beside it; the checkpoint is "
                                    "incomplete")
            if t.dtype != "U8" or scales.dtype != "U8" or len(t.shape) < 3 or t.shape[-1] != MX_GROUP // 2 \
                    or t.shape[:-1] != scales.shape:
                raise MoePruneError(f"{ckpt.folder}: {name} {t.dtype}{list(t.shape)} with {base}_scales "
                                    f"{scales.dtype}{list(scales.shape)} is not the MXFP4 layout (uint8 blocks "
                                    "[..., R, K/32, 16] and uint8 e8m0 scales [..., R, K/32])")
            *lead, rows, groups, _ = t.shape
            self._add(QTensor(base, (*lead, groups * MX_GROUP, rows), (name, base + "_scales"), ("U8", "U8")))
        stray = sorted(n for n in ckpt.tensors if n.endswith("_scales") and n not in self.parts)
        if stray:
            raise MoePruneError(f"{ckpt.folder}: {stray[0]} has no _blocks tensor beside it; the checkpoint is damaged")

    def dequantize(self, name, parts, dtype):
        return mxfp4_dequantize(parts[0], parts[1], dtype)

    def quantize(self, name, t):
        return list(mxfp4_quantize(t))

    def part_shapes(self, name, shape):
        *lead, k, rows = shape
        return [(*lead, rows, k // MX_GROUP, MX_GROUP // 2), (*lead, rows, k // MX_GROUP)]


SCHEMES: dict[str, type[Scheme]] = {"fp8": FP8Scheme, "mxfp4": MXFP4Scheme}


def scheme_of(config, ckpt: Checkpoint) -> Scheme | None:
    """The checkpoint's quantization scheme (None: plain weights); a method moeprune does not read is refused by
    name, and so are quantized tensors without a quantization_config."""
    method = quant_method(config)
    folder = ckpt.folder
    if method is None:
        odd = next((t for t in ckpt.tensors.values() if t.dtype.startswith("F8") or t.name.endswith("_scale_inv")
                    or (t.name.endswith("_blocks") and t.dtype == "U8")), None)
        if odd is not None:
            raise MoePruneError(f"{folder} is a quantized checkpoint ({odd.name} is {odd.dtype}) whose config.json "
                                "has no quantization_config saying how: restore config.json, or dequantize it to bf16 "
                                "first")
        return None
    if method not in SCHEMES:
        raise MoePruneError(f"{folder} is a quantized checkpoint of method {method!r} (quantization_config."
                            f"quant_method); moeprune reads {' and '.join(SUPPORTED)} checkpoints and plain "
                            "bf16/fp16/fp32 ones: dequantize it to bf16 first (e.g. with transformers: "
                            "from_pretrained, then save_pretrained)")
    qconfig = quantization_config(config)
    top = getattr(config, "expert_dtype", None)              # older DeepSeek-V4 configs: at the top level
    if top is not None and "expert_dtype" not in qconfig:
        qconfig = {**qconfig, "expert_dtype": top}
    scheme = SCHEMES[method](qconfig, ckpt)
    if not scheme.tensors:
        raise MoePruneError(f"{folder} is a quantized checkpoint by its config.json (quantization_config says "
                            f"{method!r}), but no tensor is stored quantized: config.json does not match the weights")
    return scheme


# ---------------------------------------------------------------- which input expert a pruned tensor still is

def fingerprint(t: torch.Tensor) -> bytes:
    """A cheap key of a tensor's values: the bits of up to 16384 of them at fixed, evenly spread positions, and its
    shape. Equal tensors have equal keys; unequal ones almost never do, and a match is always checked in full."""
    n = t.numel()
    idx = torch.linspace(0, max(n - 1, 0), min(n, _SAMPLE)).round().to(torch.int64)
    sample = torch.take(t.detach(), idx).contiguous()
    raw = sample.view(torch.uint8).numpy().tobytes() if n else b""
    return hashlib.blake2b(raw + repr((tuple(t.shape), str(t.dtype))).encode(), digest_size=16).digest()


def role(name: str, expert: int) -> str:
    """A per-expert file tensor's name with its expert index written '*': the same for every expert of a
    tensor, before and after pruning (the layer index comes first in the name, the expert index last)."""
    parts = name.split(".")
    for k in range(len(parts) - 1, -1, -1):
        if parts[k] == str(expert):
            parts[k] = "*"
            return ".".join(parts)
    raise MoePruneError(f"{name}: no expert index {expert} in the name")


class ExpertIndex:
    """For each quantized routed-expert tensor of the input (a per-expert file tensor, or one expert of a fused
    one): the fingerprint of its dequantized value as the engine read it. The writer looks a pruned expert's
    value up, checks the candidate bit for bit, and copies the stored bytes when it matches."""

    def __init__(self, scheme: Scheme, hub):
        self.scheme = scheme
        self.units: dict[str, dict[int, str]] = defaultdict(dict)     # role -> expert -> plain name
        self.fused: dict[str, str] = {}                               # plain name of a fused tensor -> its role
        for name, q in scheme.tensors.items():
            if name not in hub.files:                                 # not loaded, left out (DeepSeek-V4's mtp.*)
                continue
            expert = hub.expert_of(name)
            if expert is not None:
                self.units[role(name, expert[1])][expert[1]] = name
            elif hub.expert_axis(name) == 0:
                self.fused[name] = name + "[*]"
                for e in range(q.shape[0]):
                    self.units[name + "[*]"][e] = name
        self.seen: dict[str, dict[bytes, list[int]]] = defaultdict(lambda: defaultdict(list))   # role -> fp -> experts
        self.done: dict[str, set[int]] = defaultdict(set)
        self.enabled = False                                          # set by a writer: only a prune needs it

    def check_alike(self) -> None:
        """Every expert of a per-expert tensor stored in one precision (weight and scale dtypes): a pruned expert
        is written into the file slot of the input expert at its position, as that one's dtypes, so a kept expert's
        bytes in other dtypes would not fit (one expert's e8m0 scales stored as uint8, the rest as F8_E8M0)."""
        for r, experts in self.units.items():
            qs = [self.scheme.tensors[name] for _, name in sorted(experts.items())]
            odd = next((q for q in qs if q.dtypes != qs[0].dtypes), None)
            if odd is not None:
                k = next(k for k, (a, b) in enumerate(zip(qs[0].dtypes, odd.dtypes)) if a != b)
                raise MoePruneError(f"{self.scheme.ckpt.folder}: {qs[0].parts[k]} is {qs[0].dtypes[k]} but "
                                    f"{odd.parts[k]} is {odd.dtypes[k]}: the experts of one tensor differ in "
                                    "precision, and a pruned expert takes another's place in the files; re-save the "
                                    "checkpoint with every expert stored alike, or prune with --dequantize (bf16 "
                                    "output)")

    def record(self, name: str, t: torch.Tensor, hub) -> None:
        """Index the value `t` of the plain tensor `name` as it was read (for every expert a fused one holds)."""
        if not self.enabled:
            return
        expert = hub.expert_of(name)
        if expert is not None:
            self._add(role(name, expert[1]), expert[1], t)
        elif name in self.fused:
            for e in range(t.shape[0]):
                self._add(self.fused[name], e, t[e])

    def _add(self, r: str, e: int, t: torch.Tensor) -> None:
        if e not in self.done[r]:
            self.seen[r][fingerprint(t)].append(e)
            self.done[r].add(e)

    def candidates(self, r: str, t: torch.Tensor, read: Callable[[str, int], torch.Tensor]) -> list[int]:
        """The input experts of role `r` whose value may be `t` (fingerprints equal); experts the engine has not
        read are read now with `read(plain name, expert)`."""
        for e, name in self.units.get(r, {}).items():
            if e not in self.done[r]:
                self._add(r, e, read(name, e))
        return list(self.seen[r].get(fingerprint(t), ()))
