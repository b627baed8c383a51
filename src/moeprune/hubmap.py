"""The key map between a model's in-memory tensors and the hub's files, read from transformers' own tables.

transformers 5 loads a hub checkpoint through its conversion tables (`conversion_mapping.py`: `WeightRenaming`
and `WeightConverter` with `MergeModulelist`, `Concatenate`, `Chunk`, `Transpose`, ...) and reverses them when
it saves. `HubMap.for_model(model)` runs those reversed tables symbolically over the model's own state-dict
names and shapes (the model may live on the meta device): no tensor data is touched, and nothing is written
per family. The result says, for every in-memory tensor, which file tensors hold it and exactly where:

    hub = HubMap.for_model(model)
    hub.file_names("model.layers.0.mlp.experts.gate_up_proj")
        # ['model.layers.0.block_sparse_moe.experts.0.w1.weight', ..., '...experts.7.w3.weight']
    fused = hub.to_module("model.layers.0.mlp.experts.gate_up_proj", shape, ckpt.get, torch.float32)
    for file_name, t in hub.to_files(name, tensor): ...      # what save_pretrained writes
    hub.expert_of("model.layers.0.block_sparse_moe.experts.3.w2.weight")   # (0, 3)
    hub.expert_axis("model.layers.0.block_sparse_moe.gate.weight")         # 0

Every file tensor is described as pieces: `module_view(module tensor)` and `file_view(file tensor)` are views of
the same shape and the same values (views: select, narrow, transpose, unflatten). Assembling a module tensor
copies each file tensor, read one at a time, into its view of one preallocated tensor; splitting goes the other
way, and a file tensor that is one view of one module tensor comes out as that view, without a copy.

An operation of the tables that this module does not know raises MoePruneError naming the tensor and the model
type, never a guess.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from .arch import MoePruneError
from .discover import router_slots

View = tuple[str, tuple]          # ("select", (dim, i)) | ("narrow", (dim, start, length)) | ("transpose", (a, b))
                                  # | ("unflatten", (dim, sizes))
_LAYER = re.compile(r"(?:^|\.)(?:layers|blocks)\.(\d+)\.")      # arch.LAYER_STACKS
# config fields that hold the routed expert count, by family
_EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _apply(t: torch.Tensor, views: tuple[View, ...]) -> torch.Tensor:
    for op, args in views:
        t = getattr(t, op)(*args)
    return t


def _shape_after(shape: tuple[int, ...], views: tuple[View, ...]) -> tuple[int, ...]:
    return tuple(_apply(torch.empty(shape, device="meta"), views).shape)


@dataclass(frozen=True)
class Piece:
    """`module_view(module tensor)` holds the same values as `file_view(file tensor)`."""
    module: str
    module_view: tuple[View, ...] = ()
    file_view: tuple[View, ...] = ()


@dataclass(frozen=True)
class FileTensor:
    name: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    # transformers' Transpose(check_dims=True): a checkpoint may also store it with these two axes swapped (the
    # loader transposes whatever does not have the model's shape); save_pretrained writes it unswapped
    swapped: tuple[int, int] | None = None
    # values save_pretrained writes as zeros, held by no module tensor (Inkling-2's unembedding padded to vocab_size;
    # the loader drops them whatever they hold)
    zeros: int = 0

    @property
    def whole_view(self) -> bool:
        """The file tensor is one view of one module tensor."""
        return len(self.pieces) == 1 and not self.pieces[0].file_view


def _stored_swapped(f: FileTensor, stored: tuple[int, ...] | None) -> FileTensor:
    """`f` as a checkpoint stores it when that is with its `swapped` axes transposed: the stored shape, and each
    piece's file view first transposing back."""
    if f.swapped is None or stored is None or tuple(stored) == f.shape:
        return f
    a, b = f.swapped
    if tuple(stored) != tuple(torch.empty(f.shape, device="meta").transpose(a, b).shape):
        return f
    pieces = tuple(Piece(p.module, p.module_view, (("transpose", (a, b)),) + p.file_view) for p in f.pieces)
    return FileTensor(f.name, tuple(stored), pieces, None, f.zeros)


class _Unsupported(Exception):
    """An operation (or a combination) the symbolic interpreter cannot describe as views."""


# ---------------------------------------------------------------- symbolic tensors (the reversed ops, on views)

@dataclass
class _Sym:
    """A tensor of the save direction, as pieces of module tensors; `pieces`' file_view applies to this tensor."""
    shape: tuple[int, ...]
    pieces: list[Piece] = field(default_factory=list)
    swapped: tuple[int, int] | None = None
    zeros: int = 0                # values held by no piece: zeros

    @property
    def pure(self) -> bool:
        return len(self.pieces) == 1 and not self.pieces[0].file_view

    def _module_op(self, view: View) -> _Sym:
        if not self.pure:
            raise _Unsupported(f"{view[0]} of a tensor assembled from several parts")
        p = self.pieces[0]
        views = p.module_view + (view,)
        return _Sym(_shape_after(self.shape, (view,)), [Piece(p.module, views, ())])

    def narrow(self, dim: int, start: int, length: int) -> _Sym:
        return self._module_op(("narrow", (dim, start, length)))

    def select(self, dim: int, i: int) -> _Sym:
        return self._module_op(("select", (dim, i)))

    def transpose(self, a: int, b: int) -> _Sym:
        shape = _shape_after(self.shape, (("transpose", (a, b)),))
        if self.pure:
            return self._module_op(("transpose", (a, b)))
        return _Sym(shape, [Piece(p.module, p.module_view, (("transpose", (a, b)),) + p.file_view)
                            for p in self.pieces], zeros=self.zeros)

    def pad(self, dim: int, size: int) -> _Sym:
        """Zeros appended along `dim` up to `size` (the reverse of transformers' Inkling2UnpadVocab)."""
        dim = dim % len(self.shape)
        n = self.shape[dim]
        if size < n:
            raise _Unsupported(f"padding {n} rows to {size}")
        shape = self.shape[:dim] + (size,) + self.shape[dim + 1:]
        pieces = [Piece(p.module, p.module_view, (("narrow", (dim, 0, n)),) + p.file_view) for p in self.pieces]
        return _Sym(shape, pieces, zeros=self.zeros + math.prod(shape) - math.prod(self.shape))

    def rope_permute(self, heads: int, inverse: bool) -> _Sym:
        """transformers' PermuteForRope on axis 0 (h rows per head): F = T.view(heads, *hs, ...).transpose(1, 2)
        reshaped back, hs = (2, h/2) if inverse else (h/2, 2), so F.unflatten(0, (heads, hs[1], hs[0])) ==
        T.unflatten(0, (heads, *hs)).transpose(1, 2)."""
        if not self.pure:
            raise _Unsupported("PermuteForRope of a tensor assembled from several parts")
        rows = self.shape[0]
        half = rows // heads // 2
        if heads * half * 2 != rows:
            raise _Unsupported(f"PermuteForRope of {rows} rows into {heads} heads")
        hs = (2, half) if inverse else (half, 2)
        p = self.pieces[0]
        module_view = p.module_view + (("unflatten", (0, (heads, *hs))), ("transpose", (1, 2)))
        return _Sym(self.shape, [Piece(p.module, module_view, (("unflatten", (0, (heads, hs[1], hs[0]))),))])

    def interleave(self, dim: int, inverse: bool) -> _Sym:
        """transformers' Interleave: F' = F.unflatten(d, (n/2, 2)).transpose(d, d+1).reshape(shape) (inverse: 2, n/2),
        so F'.unflatten(d, (b, a)).transpose(d, d+1) == F.unflatten(d, (a, b))."""
        dim = dim % len(self.shape)
        n = self.shape[dim]
        a, b = (2, n // 2) if inverse else (n // 2, 2)
        if not self.pure:
            # parts concatenated along `dim` in blocks of b (Inkling's shared gate and up projections): F.narrow(d,
            # j * b, b) == F.unflatten(d, (a, b)).select(d, j) == F'.unflatten(d, (b, a)).transpose(d, d+1).select(d, j)
            pieces = []
            for p in self.pieces:
                head = p.file_view[0] if p.file_view else None
                if head is None or head[0] != "narrow" or head[1][0] != dim or head[1][2] != b or head[1][1] % b:
                    raise _Unsupported("Interleave of a tensor assembled from parts other than its halves")
                j = head[1][1] // b
                block = (("unflatten", (dim, (b, a))), ("transpose", (dim, dim + 1)), ("select", (dim, j)))
                pieces.append(Piece(p.module, p.module_view, block + p.file_view[1:]))
            return _Sym(self.shape, pieces, zeros=self.zeros)
        p = self.pieces[0]
        return _Sym(self.shape, [Piece(p.module, p.module_view + (("unflatten", (dim, (a, b))),),
                                       (("unflatten", (dim, (b, a))), ("transpose", (dim, dim + 1))))])

    @staticmethod
    def stack(syms: list[_Sym], dim: int) -> _Sym:
        shapes = {s.shape for s in syms}
        if len(shapes) != 1:
            raise _Unsupported(f"stacking tensors of different shapes {sorted(shapes)}")
        shape = list(syms[0].shape)
        dim = dim % (len(shape) + 1)
        shape.insert(dim, len(syms))
        pieces = [Piece(p.module, p.module_view, (("select", (dim, k)),) + p.file_view)
                  for k, s in enumerate(syms) for p in s.pieces]
        return _Sym(tuple(shape), pieces, zeros=sum(s.zeros for s in syms))

    @staticmethod
    def cat(syms: list[_Sym], dim: int) -> _Sym:
        dim = dim % len(syms[0].shape)
        rest = {s.shape[:dim] + s.shape[dim + 1:] for s in syms}
        if len(rest) != 1:
            raise _Unsupported("concatenating tensors of incompatible shapes")
        pieces, off = [], 0
        for s in syms:
            size = s.shape[dim]
            pieces += [Piece(p.module, p.module_view, (("narrow", (dim, off, size)),) + p.file_view) for p in s.pieces]
            off += size
        shape = list(syms[0].shape)
        shape[dim] = off
        return _Sym(tuple(shape), pieces, zeros=sum(s.zeros for s in syms))


def _first(value):
    return value[0] if isinstance(value, list) else value


def _chunk_sizes(n: int, chunks: int) -> list[int]:
    """The sizes torch.chunk returns."""
    step = math.ceil(n / chunks) if chunks else n
    sizes, left = [], n
    while left > 0:
        sizes.append(min(step, left))
        left -= step
    return sizes or [0]


def _run_op(op, data: dict[str, list[_Sym] | _Sym], sources: list[str], targets: list[str], config,
            expected: tuple[int, ...] | None = None) -> dict:
    """One reversed conversion op of transformers, on symbolic tensors, with the op's own key rules (`expected`:
    the shape of the model tensor the op is named after, which Transpose(check_dims=True) compares with)."""
    kind = type(op).__name__
    if kind == "Chunk":
        if len(data) > 1:
            raise _Unsupported("Chunk of several inputs")
        t = _first(next(iter(data.values())))
        attr = getattr(op, "num_shards_attribute", None)
        if attr is not None:
            n = getattr(config.get_text_config(), attr)
            targets = [targets[0].replace("*", str(i)) for i in range(n)]
        dim = op.dim % len(t.shape)
        out, start = {}, 0
        for target, size in zip(targets, _chunk_sizes(t.shape[dim], len(targets))):
            out[target] = t.narrow(dim, start, size)
            start += size
        return out
    if kind == "SplitModulelist":
        out = {}
        for source, tensors in data.items():
            t = _first(tensors)
            dim = op.dim % len(t.shape)
            if len(data) == 1:
                if len(targets) != 1:
                    raise _Unsupported("SplitModulelist of one input into several targets")
                pattern = targets[0]
            else:
                pattern = source
            for i in range(t.shape[dim]):
                out[pattern.replace("*", str(i))] = t.select(dim, i)
        return out
    if kind == "MergeModulelist":
        out = {}
        for source, tensors in data.items():
            if len(data) == 1:
                if len(targets) != 1:
                    raise _Unsupported("MergeModulelist of one input into several targets")
                key = targets[0]
            else:
                key = source
            out[key] = tensors if isinstance(tensors, _Sym) else _Sym.stack(tensors, op.dim)
        return out
    if kind == "Concatenate":
        if len(targets) > 1:
            raise _Unsupported("Concatenate into several targets")
        parts = []
        for source in sources:
            if source in data:
                v = data[source]
                parts += v if isinstance(v, list) else [v]
        return {targets[0]: _Sym.cat(parts, op.dim)}
    if kind == "Transpose":
        if len(data) != 1:
            raise _Unsupported("Transpose of several inputs")
        if len(targets) > 1:
            if len(sources) != 1:
                raise _Unsupported("Transpose between several sources and targets")
            key = sources[0]
        else:
            key = targets[0]
        t = _first(next(iter(data.values())))
        if getattr(op, "check_dims", False):
            if expected is None:
                raise _Unsupported("Transpose(check_dims=True) of a tensor whose name is not the model's")
            if tuple(t.shape) == tuple(expected):
                return {key: _Sym(t.shape, t.pieces, (op.dim0, op.dim1))}
        return {key: t.transpose(op.dim0, op.dim1)}
    if kind == "Interleave":
        return {targets[0]: _first(next(iter(data.values()))).interleave(op.dim, op.inverse)}
    if kind == "PermuteForRope":
        sub = getattr(config, op.subconfig_key, config) if op.subconfig_key is not None else config
        heads = getattr(sub, "num_attention_heads", 1)
        out = {}
        for source, tensors in data.items():
            target = op.get_target_pattern(source, sources, targets)
            if op.permute_layer_names is None or any(name in source for name in op.permute_layer_names):
                if isinstance(tensors, list) and len(tensors) > 1:
                    raise _Unsupported("PermuteForRope of several tensors under one name")
                t = _first(tensors)
                out[target] = t.rope_permute(heads, op.inverse) if len(t.shape) in (1, 2) else t
            else:
                out[target] = tensors
        return out
    if kind == "ErnieSplitAndDecoupleTextVisionExperts":
        # each source (text experts, vision experts) [E, n*I, ...] chunked in n along concat_dim, one chunk per
        # target; a target's list numbers the first source's experts, then the next source's
        out = {}
        for j, target in enumerate(targets):
            parts = []
            for source in sources:
                t = _first(data[source])
                dim = op.concat_dim % len(t.shape)
                sizes = _chunk_sizes(t.shape[dim], len(targets))
                part = t.narrow(dim, sum(sizes[:j]), sizes[j])
                parts += [part.select(op.stack_dim, e) for e in range(part.shape[op.stack_dim])]
            out.update({target.replace("*", str(i)): p for i, p in enumerate(parts)})
        return out
    if kind == "Inkling2LoopDequantizeExperts" and len(data) == 1:
        # one (unquantized) tensor: saved and loaded as it is, under the first target name (the NVFP4 / MXFP8
        # parts are only ever read, from the original checkpoints, never written)
        return {targets[0]: _first(next(iter(data.values())))}
    if kind == "Inkling2LoopMergeMessageQueries" and op.inverse:
        # [L, 4, H] (query, key, value, mlp per loop layer) -> queries [2L, H] (query, mlp) and kv [2L, H] (key, value)
        t = _first(next(iter(data.values())))
        if not t.pure or len(t.shape) != 3 or t.shape[1] != 4:
            raise _Unsupported(f"message queries of shape {list(t.shape)}")
        (m, mv), (n, h) = (t.pieces[0].module, t.pieces[0].module_view), (t.shape[0], t.shape[2])
        pairs = (("unflatten", (0, (n, 2))),)
        queries = [Piece(m, mv + (("select", (1, j)),), pairs + (("select", (1, k)),)) for k, j in enumerate((0, 3))]
        return {targets[0]: _Sym((2 * n, h), queries),
                targets[1]: _Sym((2 * n, h), [Piece(m, mv + (("narrow", (1, 1, 2)),), pairs)])}
    if kind == "Inkling2UnpadVocab" and op.inverse:
        return {targets[0]: _first(next(iter(data.values()))).pad(0, config.get_text_config().vocab_size)}
    raise _Unsupported(f"the operation {kind}")


# ---------------------------------------------------------------- transformers' tables

def _conversions(model) -> list:
    """The transforms transformers' save_pretrained reverses for this model (revert_weight_conversion's choice)."""
    from transformers.core_model_loading import PrefixChange
    used = getattr(model, "_weight_conversions", None)
    if used is not None:
        return list(used)
    from transformers.conversion_mapping import get_model_conversion_mapping
    return [t for t in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(t, PrefixChange)]


def _rename(key: str, renamings: list) -> str:
    for r in renamings:
        key, _ = r.rename_source_key(key)
    return key


def _expert_count(config) -> int | None:
    for c in (config, getattr(config, "get_text_config", lambda: None)(), getattr(config, "ffn_config", None)):
        for f in _EXPERT_COUNT_FIELDS:
            v = getattr(c, f, None) if c is not None else None
            if isinstance(v, int) and v > 1:
                return v
    return None


def _module_expert_axes(shapes: Mapping[str, tuple[int, ...]], n_experts: int | None, identity: int = 0) \
        -> tuple[dict[str, int], dict[str, int]]:
    """(module tensor -> the axis of its expert index, module tensor -> rows per expert of a folded one): the tensors
    of a module holding fused experts (3-D, experts first; or 2-D [E * I, H] under an `experts` module, the expert
    axis folded into axis 0: DBRX) and, in the MoE block around it, router tensors with exactly one axis of the
    expert count, or of the expert count plus the `identity` slots a router scores after them (LongCat-Flash;
    shared experts excluded)."""
    if not n_experts:
        return {}, {}
    counts = {n_experts, n_experts + identity}
    rows = {n: s[0] // n_experts for n, s in shapes.items()
            if len(s) == 2 and s[0] > n_experts and s[0] % n_experts == 0 and n_experts not in s
            and "experts" in n.split(".")[:-1] and "shared" not in n}
    parent = lambda n: n.rpartition(".")[0]

    def block_of(n: str) -> str:
        """The MoE block holding tensor n: the module around `experts`, else the decoder layer's child module."""
        parts = n.split(".")
        if "experts" in parts[:-1]:
            return ".".join(parts[:len(parts) - 1 - parts[::-1].index("experts")])
        m = _LAYER.search(n)
        return n[:m.end()] + n[m.end():].split(".")[0] if m else parent(n)

    fused = [n for n, s in shapes.items() if len(s) == 3 and s[0] == n_experts and "shared" not in n] + list(rows)
    holders = {parent(n) for n in fused}
    blocks = {block_of(n) for n in fused}
    axes: dict[str, int] = {}
    for n, s in shapes.items():
        block = next((b for b in blocks if n.startswith(b + ".")), None)
        if block is None or "shared" in n[len(block):]:
            continue
        if n in rows or (n in fused or parent(n) in holders) and s and s[0] == n_experts:
            axes[n] = 0
            continue
        dims = [i for i, d in enumerate(s) if d in counts]
        if len(dims) == 1:
            axes[n] = dims[0]
    return axes, rows


def _axis_through(module_view: tuple[View, ...], file_view: tuple[View, ...], axis: int):
    """Where module axis `axis` lands in the file tensor: ("axis", file axis) | ("index", i) when a select takes one
    entry of it | None when a view cuts or reshapes it."""
    pos = axis
    for op, args in module_view:
        if op == "select":
            d, i = args
            if d == pos:
                if file_view:
                    return None
                return ("index", i)
            if d < pos:
                pos -= 1
        elif op == "narrow":
            if args[0] == pos:
                return None
        elif op == "transpose":
            a, b = args
            pos = b if pos == a else a if pos == b else pos
        elif op == "unflatten":
            d, sizes = args
            if d == pos:
                return None
            if d < pos:
                pos += len(sizes) - 1
    for op, args in reversed(file_view):         # view axis -> file axis
        if op == "select":
            if pos >= args[0]:
                pos += 1
        elif op == "transpose":
            a, b = args
            pos = b if pos == a else a if pos == b else pos
        elif op == "unflatten":
            d, sizes = args
            if d <= pos < d + len(sizes):
                return None
            if pos >= d + len(sizes):
                pos -= len(sizes) - 1
        elif op == "narrow" and args[0] == pos:
            return None
    return ("axis", pos)


# ---------------------------------------------------------------- the map

class HubMap:
    """Module tensor names/shapes <-> hub file tensor names/shapes, from transformers' conversion tables."""

    def __init__(self, model_type: str, shapes: dict[str, tuple[int, ...]], files: dict[str, FileTensor],
                 tied: dict[str, str], expert_axes: dict[str, int], num_experts: int | None = None,
                 expert_rows: dict[str, int] | None = None):
        self.model_type = model_type
        self.num_experts = num_experts              # the routed experts per layer (the config's count)
        self._rows: dict[str, int] = {}             # file tensor -> rows per expert on its folded expert axis
        self.shapes = shapes                        # module name -> shape (the model's state dict)
        self.files = files                          # file name -> FileTensor
        self.tied = tied                            # tied module name -> the module name whose files hold it
        self._by_module: dict[str, list[str]] = defaultdict(list)
        for f in files.values():
            for m in dict.fromkeys(p.module for p in f.pieces):
                self._by_module[m].append(f.name)
        self._expert: dict[str, tuple[int, int]] = {}
        self._axis: dict[str, int] = {}
        for f in files.values():
            where = {_axis_through(p.module_view, p.file_view, expert_axes[p.module]) if p.module in expert_axes
                     else None for p in f.pieces}
            if len(where) != 1 or None in where:
                continue
            kind, value = where.pop()
            if kind == "axis":
                self._axis[f.name] = value
                rows = (expert_rows or {}).get(f.pieces[0].module, 1)
                if rows > 1:
                    if not f.whole_view or f.pieces[0].module_view:
                        raise MoePruneError(f"{f.name}: a folded expert axis ([E * I, ...]) stored other than as it "
                                            f"is in memory; this {model_type} layout is not supported")
                    self._rows[f.name] = rows
            else:
                m = _LAYER.search(f.pieces[0].module)
                self._expert[f.name] = (int(m.group(1)) if m else -1, value)
        self._check()

    # ------------------------------------------------------------ building

    @classmethod
    def for_model(cls, model, file_names: Iterable[str] | None = None) -> HubMap:
        """The map of `model` (any device, meta included): its state dict's names and shapes, reversed through the
        transforms transformers' save_pretrained reverses for it.

        `file_names`: the tensor names a checkpoint actually holds. A module tensor whose converted file tensors are
        absent but that the checkpoint stores as it is in memory (already fused, as transformers 5 writes with
        `save_original_format=False`; renamings still apply) maps to that one file tensor instead, as transformers'
        loader would read it; one found in neither layout raises MoePruneError. Given as {name: stored shape}, a
        file tensor stored with the two axes of a `Transpose(check_dims=True)` swapped (Qwen3-VL-MoE's published
        [E, H, 2I] experts; save_pretrained writes [E, 2I, H]) is read and written in that stored orientation."""
        model_type = getattr(model.config, "model_type", type(model).__name__)
        state = model.state_dict()
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        for k in set(getattr(model, "_keys_to_ignore_on_save", None) or ()):
            shapes.pop(k, None)
        tied = {t: s for t, s in (getattr(model, "all_tied_weights_keys", None) or {}).items()
                if t in shapes and s in shapes}
        stored = {k: v for k, v in shapes.items() if k not in tied}
        files, plain = cls._reverse(model, model_type, stored)
        if file_names is not None:
            try:
                files = cls._as_stored(model_type, stored, files, plain, set(file_names))
            except MoePruneError:
                # names that lack the base model's prefix (DeepSeek-V4-Flash: layers.*, embed.weight), which
                # transformers' loader adds back: the tables apply to the module names without it
                base = f"{getattr(model, 'base_model_prefix', '') or ''}."
                if base == "." or any(n.startswith(base) for n in file_names) \
                        or not any(k.startswith(base) for k in stored):
                    raise
                files, plain = cls._reverse(model, model_type, stored, base)
                files = cls._as_stored(model_type, stored, files, plain, set(file_names))
            if isinstance(file_names, Mapping):
                files = {name: _stored_swapped(f, file_names.get(name)) for name, f in files.items()}
        E = _expert_count(model.config)
        axes, rows = _module_expert_axes(stored, E, router_slots(model))
        return cls(model_type, shapes, files, tied, axes, E, rows)

    @staticmethod
    def _as_stored(model_type: str, shapes: dict[str, tuple[int, ...]], files: dict[str, FileTensor],
                   plain: dict[str, str], present: set[str]) -> dict[str, FileTensor]:
        """`files` with the module tensors a checkpoint stores unconverted mapped to their one stored tensor."""
        by_module: dict[str, list[str]] = defaultdict(list)
        for f in files.values():
            for m in dict.fromkeys(p.module for p in f.pieces):
                by_module[m].append(f.name)
        fallback = set()
        for m in shapes:
            names = by_module[m]
            if all(n in present for n in names):
                continue
            if any(n in present for n in names) or not ({plain[m], m} & present):
                missing = [n for n in names if n not in present]
                raise MoePruneError(f"{m}: the checkpoint has no {missing[0]} (and {len(missing) - 1} more of the "
                                    f"{len(names)} file tensors this {model_type} tensor is saved as), nor the tensor "
                                    "unconverted; it is not a checkpoint of this model")
            fallback.add(m)
        if not fallback:
            return files
        out = {}
        for name, f in files.items():
            modules = {p.module for p in f.pieces}
            if modules & fallback:
                if modules - fallback:
                    raise MoePruneError(f"{name}: the checkpoint stores some of {sorted(modules)} converted and "
                                        "others not; this layout is not supported")
                continue
            out[name] = f
        for m in sorted(fallback):
            name = plain[m] if plain[m] in present else m
            if name in out:
                raise MoePruneError(f"{name}: two tensors of this {model_type} model map to this file tensor")
            out[name] = FileTensor(name, shapes[m], (Piece(m),))
        return out

    @staticmethod
    def _reverse(model, model_type: str, shapes: dict[str, tuple[int, ...]], strip: str = "") \
            -> tuple[dict[str, FileTensor], dict[str, str]]:
        """The file tensors, and each module tensor's name with the renamings alone (no converter); `strip`, a
        prefix the file names lack, is taken off the module names before the tables apply."""
        def bare(key: str) -> str:
            return key[len(strip):] if strip and key.startswith(strip) else key

        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key
        forward = _conversions(model)
        reverse = [t.reverse_transform() for t in forward[::-1]]
        renamings = [t for t in reverse if isinstance(t, WeightRenaming)]
        converters = [t for t in reverse if isinstance(t, WeightConverter)]

        groups: dict[str, tuple[object, dict[str, list[str]]]] = {}   # renamed key -> (converter, pattern -> keys)
        files: dict[str, FileTensor] = {}

        def add(name: str, sym: _Sym, what: str):
            if name in files:
                raise MoePruneError(f"{what}: two tensors of this {model_type} model map to the file tensor {name}")
            files[name] = FileTensor(name, sym.shape, tuple(sym.pieces), sym.swapped, sym.zeros)

        for key in sorted(shapes, key=dot_natural_key):
            for conv in converters:
                renamed, pattern = conv.rename_source_key(bare(key))
                if pattern is not None:
                    entry = groups.setdefault(renamed, (conv, defaultdict(list)))
                    entry[1][pattern].append(key)
                    break
            else:
                add(_rename(bare(key), renamings), _Sym(shapes[key], [Piece(key)]), key)

        for renamed, (conv, by_pattern) in groups.items():
            first = next(iter(by_pattern.values()))[0]
            data = {p: [_Sym(shapes[k], [Piece(k)]) for k in keys] for p, keys in by_pattern.items()}
            try:
                for op in conv.operations:
                    data = _run_op(op, data, conv.source_patterns, conv.target_patterns, model.config,
                                   shapes.get(renamed) or shapes.get(strip + renamed))
            except _Unsupported as e:
                raise MoePruneError(
                    f"{first}: transformers saves this {model_type} tensor with {type(conv).__name__}"
                    f"({conv.source_patterns} -> {conv.target_patterns}, {conv.operations}), and moeprune cannot map "
                    f"{e}; this model type's hub layout is not supported") from None
            full = renamed.replace("*.", "0.")
            prefix = suffix = None
            for k in data:
                if k in full:
                    prefix, _, suffix = full.partition(k)
                    break
            if prefix is None:
                raise MoePruneError(f"{first}: cannot place the file names {list(data)} of this {model_type} tensor "
                                    f"in {renamed!r}")
            for k, sym in data.items():
                if isinstance(sym, list):
                    if len(sym) != 1:
                        raise MoePruneError(f"{first}: transformers' conversion of this {model_type} tensor leaves "
                                            f"{len(sym)} tensors under one name {k}")
                    sym = sym[0]
                add(_rename(prefix + k + suffix, renamings), sym, first)
        return files, {k: _rename(bare(k), renamings) for k in shapes}

    def _check(self) -> None:
        """Every element of every stored module tensor and every file tensor is covered exactly once (by size)."""
        covered: dict[str, int] = defaultdict(int)
        for f in self.files.values():
            n = 0
            for p in f.pieces:
                size = math.prod(_shape_after(self.shapes[p.module], p.module_view))
                if _shape_after(self.shapes[p.module], p.module_view) != _shape_after(f.shape, p.file_view):
                    raise MoePruneError(f"{f.name}: the map of this {self.model_type} file tensor is inconsistent")
                covered[p.module] += size
                n += size
            if n + f.zeros != math.prod(f.shape):
                raise MoePruneError(f"{f.name}: the {self.model_type} conversion tables cover {n} of its "
                                    f"{math.prod(f.shape)} values")
        for m, shape in self.shapes.items():
            if m not in self.tied and covered.get(m, 0) != math.prod(shape):
                raise MoePruneError(f"{m}: the {self.model_type} conversion tables place {covered.get(m, 0)} of its "
                                    f"{math.prod(shape)} values in the hub files")

    # ------------------------------------------------------------ names

    def file_names(self, module_name: str) -> list[str]:
        """The file tensors that hold a module tensor (a tied tensor: those of the tensor it is tied to)."""
        source = self.tied.get(module_name, module_name)
        if source not in self.shapes:
            raise MoePruneError(f"{module_name} is not a tensor of this {self.model_type} model")
        return list(self._by_module[source])

    def module_names(self, file_name: str) -> list[str]:
        """The module tensors a file tensor is part of (several for a file tensor that transformers splits)."""
        return list(dict.fromkeys(p.module for p in self._file(file_name).pieces))

    def file_shape(self, file_name: str) -> tuple[int, ...]:
        return self._file(file_name).shape

    def all_file_names(self) -> list[str]:
        return list(self.files)

    def expert_of(self, file_name: str) -> tuple[int, int] | None:
        """(decoder layer, expert) for a file tensor that holds one routed expert's tensor, else None."""
        self._file(file_name)
        return self._expert.get(file_name)

    def layer_of(self, file_name: str) -> int | None:
        """The decoder layer a file tensor belongs to (by its module tensors' names), else None."""
        m = _LAYER.search(self._file(file_name).pieces[0].module)
        return int(m.group(1)) if m else None

    def expert_axis(self, file_name: str) -> int | None:
        """The axis of a file tensor that carries the expert index (router weights and biases, correction biases,
        experts stored fused), else None."""
        self._file(file_name)
        return self._axis.get(file_name)

    def expert_rows(self, file_name: str) -> int:
        """Rows per expert along a file tensor's expert axis: 1, or I where it folds the experts' rows one after
        another ([E * I, H], DBRX's w1 / v1 / w2)."""
        self._file(file_name)
        return self._rows.get(file_name, 1)

    def _file(self, file_name: str) -> FileTensor:
        f = self.files.get(file_name)
        if f is None:
            raise MoePruneError(f"{file_name} is not a file tensor of this {self.model_type} model's hub layout")
        return f

    # ------------------------------------------------------------ tensors

    def to_module(self, module_name: str, shape, read: Callable[[str], torch.Tensor],
                  dtype: torch.dtype | None = None) -> torch.Tensor:
        """The module tensor assembled from its file tensors, each read once with `read(file name)` and copied into
        its place in one preallocated tensor (floating tensors in `dtype`; None: the file's dtype); every file
        tensor's shape is checked."""
        source = self.tied.get(module_name, module_name)
        expect = self.shapes.get(source)
        if expect is None:
            raise MoePruneError(f"{module_name} is not a tensor of this {self.model_type} model")
        if tuple(shape) != expect:
            raise MoePruneError(f"{module_name}: asked for shape {list(shape)}, this {self.model_type} model's tensor "
                                f"has {list(expect)}")
        out = None
        for name in self._by_module[source]:
            f = self.files[name]
            t = read(name)
            if f.swapped is not None and tuple(t.shape) != f.shape \
                    and tuple(t.transpose(*f.swapped).shape) == f.shape:
                t = t.transpose(*f.swapped).contiguous()    # stored transposed: transformers' loader transposes it
            if tuple(t.shape) != f.shape:
                raise MoePruneError(f"{name} has shape {list(t.shape)}, its config implies {list(f.shape)}; the "
                                    "checkpoint does not match its config.json")
            want = dtype if dtype is not None and t.is_floating_point() else t.dtype
            if f.whole_view and not f.pieces[0].module_view and f.pieces[0].module == source:
                return t if t.dtype == want else t.to(want)          # the file tensor is the module tensor
            if out is None:
                out = torch.empty(expect, dtype=want)
            for p in f.pieces:
                if p.module == source:
                    _apply(out, p.module_view).copy_(_apply(t, p.file_view))
            del t
        if out is None:
            raise MoePruneError(f"{module_name}: no file tensor holds it")
        return out

    def to_files(self, module_name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """(file name, tensor) for the file tensors of one module tensor, what save_pretrained writes: a view of
        `tensor` where the file tensor is one (possibly not contiguous), else a new tensor. A tied tensor has none
        of its own. A file tensor that also holds other module tensors needs `files_from`."""
        if module_name in self.tied:
            return
        if tuple(tensor.shape) != self.shapes.get(module_name):
            raise MoePruneError(f"{module_name}: shape {list(tensor.shape)}, this {self.model_type} model's tensor "
                                f"has {list(self.shapes.get(module_name, ()))}")
        for name in self._by_module[module_name]:
            f = self.files[name]
            if any(p.module != module_name for p in f.pieces):
                raise MoePruneError(f"{name} holds {self.module_names(name)} together: write it with files_from")
            yield name, self._file_tensor(f, {module_name: tensor})

    def files_from(self, tensors: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """(file name, tensor) for every file tensor whose module tensors are all in `tensors`."""
        done = set()
        for m in tensors:
            for name in self._by_module.get(m, ()):
                f = self.files[name]
                if name not in done and all(p.module in tensors for p in f.pieces):
                    done.add(name)
                    yield name, self._file_tensor(f, tensors)

    @staticmethod
    def _file_tensor(f: FileTensor, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if f.whole_view:
            return _apply(tensors[f.pieces[0].module], f.pieces[0].module_view)
        first = tensors[f.pieces[0].module]
        out = (torch.zeros if f.zeros else torch.empty)(f.shape, dtype=first.dtype, device=first.device)
        for p in f.pieces:
            _apply(out, p.file_view).copy_(_apply(tensors[p.module], p.module_view))
        return out
