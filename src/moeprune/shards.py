"""Safetensors checkpoints read and written one tensor at a time, so no checkpoint is ever held whole.

Reading (`Checkpoint`): the index (or the single file) maps each tensor name to a shard; each shard's JSON
header gives dtype, shape and byte range. Every header is checked against the file size and the index up
front, so a missing or truncated shard fails before any work. A tensor is read with one positioned read
into its own buffer (no memory map: no file pages stay resident and counted against the process), and a
tensor that pruning does not touch is copied as its raw bytes.

Writing (`ShardWriter`): the names, dtypes and shapes of the output are known before the first layer is
processed, so every output shard is laid out up front and each tensor is written at its offset as soon as
it exists; a shard is never assembled in memory.

    ckpt = Checkpoint(folder)                 # headers only
    w = ckpt.get("model.embed_tokens.weight")  # one tensor, in its stored dtype
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .arch import MoePruneError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
if hasattr(torch, "float8_e8m0fnu"):             # e8m0 block scales (DeepSeek-V4's X.scale)
    DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20


def dtype_size(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def tensor_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor's data in a safetensors file."""
    return math.prod(shape) * dtype_size(dtype)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str                      # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int                      # absolute byte offsets of the data in `file`
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        twice = next(k for k in keys if keys.count(k) > 1)
        raise MoePruneError(f"the key {twice!r} appears twice")
    return dict(pairs)


def _nonneg_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entry(path: Path, name: str, v, fix: str) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, start, end) of one header entry, checked as the safetensors library checks it."""
    bad = f"{path}: the header entry of tensor {name!r}"
    if not isinstance(v, dict):
        raise MoePruneError(f"{bad} is not a JSON object; {fix}")
    dtype, shape, offsets = v.get("dtype"), v.get("shape"), v.get("data_offsets")
    if not isinstance(dtype, str):
        raise MoePruneError(f"{bad} has no dtype string; {fix}")
    if dtype not in DTYPES:
        raise MoePruneError(f"{path}: tensor {name!r} has dtype {dtype[:40]!r}, which moeprune cannot read "
                            f"(it reads {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_nonneg_int(d) for d in shape):
        raise MoePruneError(f"{bad} has shape {str(shape)[:80]}, not a list of non-negative integers; {fix}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_nonneg_int(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise MoePruneError(f"{bad} has data_offsets {str(offsets)[:80]}, not [start, end] with "
                            f"0 <= start <= end; {fix}")
    start, end = offsets
    shape = tuple(shape)
    if end - start != tensor_bytes(dtype, shape):
        raise MoePruneError(f"{path}: tensor {name!r} {dtype}{list(shape)} needs {tensor_bytes(dtype, shape)} "
                            f"bytes, its data_offsets give {end - start}; {fix}")
    return dtype, shape, start, end


def read_header(path: Path) -> tuple[list[TensorInfo], dict]:
    """The tensors of one safetensors file, in data order, validated as the safetensors library validates a
    file: the header is a JSON object of tensor entries (a known dtype, a shape of non-negative integers,
    data_offsets [start, end] holding exactly the tensor's bytes) and an optional `__metadata__` of strings;
    sorted by offset the tensors tile the data section, no gap and no overlap, up to the end of the file."""
    fix = "re-download or re-copy the checkpoint"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > _MAX_HEADER or 8 + n > size:
                raise MoePruneError(f"{path} is not a complete safetensors file (header cut off at {size} bytes); "
                                    f"{fix}")
            text = f.read(n)
    except OSError as e:
        raise MoePruneError(f"{path} cannot be read ({e.strerror or e}); check the file's permissions") from None
    try:
        if not text.lstrip().startswith(b"{"):
            raise MoePruneError("it is not a JSON object")
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:          # JSONDecodeError, UnicodeDecodeError, MoePruneError
        raise MoePruneError(f"{path}: unreadable safetensors header ({e}); {fix}") from None
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise MoePruneError(f"{path}: the header's __metadata__ is not a map of strings to strings; {fix}")
    infos = []
    for name, v in header.items():
        dtype, shape, start, end = _entry(path, name, v, fix)
        infos.append(TensorInfo(name, path, dtype, shape, 8 + n + start, 8 + n + end))
    infos.sort(key=lambda t: (t.start, t.end))
    at = 8 + n
    for t in infos:
        if t.start != at:
            what = "overlaps the tensor before it" if t.start < at else f"leaves a gap of {t.start - at} bytes before it"
            raise MoePruneError(f"{path}: tensor {t.name!r} (data_offsets {t.start - 8 - n}..{t.end - 8 - n}) {what}; "
                                f"the header is damaged: {fix}")
        at = t.end
    if at > size:
        raise MoePruneError(f"{path} is truncated: {size} bytes, its header needs {at}; {fix}")
    if at < size:
        raise MoePruneError(f"{path} has {size - at} bytes after the last tensor's data, which its header does not "
                            f"account for; {fix}")
    return infos, meta


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:                 # a name too long for the filesystem, ...
        return False


def shard_path(folder: Path, name: object, index: Path) -> Path:
    """The file a shard name of the index stands for, refused unless it lies inside the model folder: no
    absolute path, no "..", no symlink leading out (except, in a hub cache snapshot, to the repository's own
    blobs/ folder, where the hub keeps every file)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise MoePruneError(f"{index} names a shard {str(name)[:80]!r}, which is not a file name; the index is "
                            "damaged")
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts:
        raise MoePruneError(f"{index} names the shard {name[:200]!r}, which lies outside the model folder {folder}; "
                            "moeprune reads shards only from inside the folder: the index is damaged or hostile")
    path = folder / name
    try:
        real, home = path.resolve(), folder.resolve()
    except (OSError, RuntimeError) as e:           # a symlink loop
        raise MoePruneError(f"{index}: the shard {name[:200]!r} cannot be resolved ({e})") from None
    inside = real.is_relative_to(home)
    if not inside and home.parent.name == "snapshots":
        inside = real.is_relative_to(home.parent.parent / "blobs")
    if not inside:
        raise MoePruneError(f"{index}: the shard {name[:200]!r} is a link to {real}, outside the model folder "
                            f"{folder}; moeprune reads shards only from inside the folder")
    return path


class Checkpoint:
    """The safetensors tensors of a model folder, by name; headers read once, data on demand."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.index: dict | None = None
        index = self.folder / INDEX
        if index.is_file():
            try:
                self.index = json.loads(index.read_text(encoding="utf-8"))
            except (ValueError, RecursionError) as e:           # JSONDecodeError, UnicodeDecodeError
                raise MoePruneError(f"{index} is not a valid safetensors index ({e}); re-download it") from None
            except OSError as e:
                raise MoePruneError(f"{index} cannot be read ({e.strerror or e})") from None
            weight_map = self.index.get("weight_map") if isinstance(self.index, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise MoePruneError(f"{index} is not a valid safetensors index: it needs a \"weight_map\" object "
                                    "mapping each tensor name to its shard file name; re-download it")
            files = list(dict.fromkeys(weight_map.values()))
            paths = {f: shard_path(self.folder, f, index) for f in files}
        elif (self.folder / SINGLE).is_file():
            weight_map, files = {}, [SINGLE]
            paths = {SINGLE: shard_path(self.folder, SINGLE, self.folder / SINGLE)}
        else:
            raise MoePruneError(f"{self.folder} holds no {SINGLE} and no {INDEX}")
        missing = [f for f in files if not _is_file(paths[f])]
        if missing:
            raise MoePruneError(f"{index} names shard(s) {missing} that are not in {self.folder}; "
                                "the download is incomplete: fetch the missing files")
        self.files = files
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, dict] = {}
        for f in files:
            infos, self.metadata[f] = read_header(paths[f])
            for t in infos:
                if weight_map and weight_map.get(t.name) != f:
                    continue            # a stray copy: the index decides where a tensor lives
                self.tensors[t.name] = t
        absent = sorted(set(weight_map) - set(self.tensors))
        if absent:
            raise MoePruneError(f"{index} lists {len(absent)} tensor(s) that its shards do not hold, e.g. "
                                f"{absent[0]}; the checkpoint is incomplete")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise MoePruneError(f"tensor {name} is not in the checkpoint {self.folder}; "
                                "it is incomplete or of another architecture than its config.json says")
        return self.tensors[name]

    def raw(self, name: str) -> bytearray:
        t = self.info(name)
        buf = bytearray(t.nbytes)
        with open(t.file, "rb") as f:
            f.seek(t.start)
            if f.readinto(memoryview(buf)) != t.nbytes:
                raise MoePruneError(f"{t.file} ended while reading {name}; the shard is truncated")
        return buf

    def get(self, name: str) -> torch.Tensor:
        """One tensor in its stored dtype, in its own memory."""
        t = self.info(name)
        if t.nbytes == 0:
            return torch.empty(t.shape, dtype=DTYPES[t.dtype])
        return torch.frombuffer(self.raw(name), dtype=torch.uint8).view(DTYPES[t.dtype]).reshape(t.shape)

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


@dataclass(frozen=True)
class Slot:
    name: str
    dtype: str
    shape: tuple[int, ...]


class ShardWriter:
    """Safetensors shards whose headers are fixed up front; tensors are written at their offsets, in any order."""

    def __init__(self, folder: Path, shards: dict[str, list[Slot]], metadata: dict[str, dict] | None = None,
                 index: bool = True):
        self.folder, self.index = Path(folder), index
        self.where: dict[str, tuple[Path, int, Slot]] = {}
        self.written: set[str] = set()
        self.shards = shards
        self._files: dict[Path, object] = {}            # open output shards, closed by finish()
        for file, slots in shards.items():
            header, offset = {}, 0
            for s in slots:
                nbytes = tensor_bytes(s.dtype, s.shape)
                header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            meta = (metadata or {}).get(file) or {"format": "pt"}
            text = json.dumps({"__metadata__": meta, **header}, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)
            base = 8 + len(text)
            path = self.folder / file
            with open(path, "wb") as f:
                f.write(len(text).to_bytes(8, "little") + text)
                f.truncate(base + offset)
            for s in slots:
                self.where[s.name] = (path, base + header[s.name]["data_offsets"][0], s)

    def write(self, name: str, data: torch.Tensor | bytes | bytearray) -> None:
        path, offset, slot = self.where[name]
        if isinstance(data, torch.Tensor):
            if tuple(data.shape) != slot.shape or DTYPE_NAMES.get(data.dtype) != slot.dtype:
                raise RuntimeError(f"{name}: {data.dtype}{list(data.shape)} does not fit its slot "
                                   f"{slot.dtype}{list(slot.shape)}")
            data = data.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data
        f = self._files.get(path) or self._files.setdefault(path, open(path, "r+b"))
        f.seek(offset)
        f.write(data)
        self.written.add(name)

    def finish(self) -> None:
        """Every slot must have been written; then the index (when sharded) is written."""
        unwritten = [n for n in self.where if n not in self.written]
        if unwritten:
            raise RuntimeError(f"{len(unwritten)} tensors were never written, e.g. {unwritten[0]}")
        if self.index:
            total = sum(tensor_bytes(s.dtype, s.shape) for _, _, s in self.where.values())
            weight_map = {s.name: file for file, slots in self.shards.items() for s in slots}
            (self.folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                         "weight_map": weight_map}, indent=2) + "\n")
        for path in {p for p, _, _ in self.where.values()}:
            f = self._files.pop(path, None) or open(path, "r+b")
            try:
                f.flush()
                os.fsync(f.fileno())
            finally:
                f.close()
