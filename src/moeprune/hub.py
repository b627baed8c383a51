"""The hub's checkpoint layout, and an output folder that every client reads.

transformers 5 holds a layer's routed experts fused (`experts.gate_up_proj` [E, 2I, H] = gate rows then up
rows, `experts.down_proj` [E, H, I]); the hub's files hold them per expert (`experts.<e>.gate_proj.weight`
..., Mixtral/PhiMoE `block_sparse_moe.experts.<e>.w1/w3/w2.weight`) and some families name the MoE block or
a router tensor differently. This module is the one explicit key map between the two, driven by each
Family's `hub_renames` and `hub_expert`; every tensor the map produces is checked against the file's shape.

The output folder is the input folder with only what pruning changes changed: config.json is the input's
text with the expert count (and, when it must, top-k or group routing) edited in place, every non-weight
file is copied byte for byte, and the weights keep the input's shards, names, order and dtypes, less the
dropped experts. transformers 5's own re-save would rename keys (`num_experts` -> `num_local_experts`,
`rope_theta` -> `rope_parameters`, tokenizer class -> TokenizersBackend) and break transformers 4.x,
converters and serving stacks that read the hub's spelling.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .arch import Family, MoePruneError
from .shards import DTYPES, INDEX, Checkpoint, ShardWriter, Slot

_LAYER = re.compile(r"^(model\.layers\.(\d+)\.)(.*)$")
# files that hold weights (any format): never copied, the pruned weights replace them
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz")
SKIP = {INDEX, "pytorch_model.bin.index.json", "config.json", "plan.json", "report.json", "report.md"}


# ---------------------------------------------------------------- names

def hub_name(family: Family, name: str) -> str:
    """The file name of a non-expert tensor from its transformers 5 module name."""
    m = _LAYER.match(name)
    if m is None:
        return name
    prefix, rest = m.group(1), m.group(3)
    for old, new in family.hub_renames:
        if rest.startswith(old):
            return prefix + new + rest[len(old):]
    return name


def experts_prefix(family: Family, i: int) -> str:
    """Module-side prefix of layer i's fused expert tensors."""
    return f"model.layers.{i}.{family.block}.{family.experts}."


def expert_names(family: Family, i: int, e: int) -> tuple[str, str, str]:
    """File names of expert e's (gate, up, down) weights in layer i."""
    base = hub_name(family, experts_prefix(family, i)) + f"{e}."
    return tuple(base + n for n in family.hub_expert)          # type: ignore[return-value]


def router_names(family: Family, i: int) -> dict[str, int]:
    """File name -> expert axis of layer i's router tensors (router weight, biases, correction biases)."""
    base = f"model.layers.{i}.{family.block}.{family.router}."
    return {hub_name(family, base + t): axis for t, axis in family.router_tensors}


def _expert_index(family: Family, i: int, name: str) -> int | None:
    """e if `name` is one of expert e's per-expert tensors in layer i, else None."""
    if family.hub_expert is None:
        return None
    base = hub_name(family, experts_prefix(family, i))
    if not name.startswith(base):
        return None
    e, _, rest = name[len(base):].partition(".")
    return int(e) if e.isdigit() and rest in family.hub_expert else None


def expert_axis(family: Family, i: int, name: str) -> int | None:
    """The expert axis of a layer-i file tensor that pruning cuts to K (router tensors, and the expert tensors
    of a family whose files keep them fused), else None."""
    axis = router_names(family, i).get(name)
    if axis is None and family.hub_expert is None and name.startswith(hub_name(family, experts_prefix(family, i))):
        axis = 0
    return axis


def touched(family: Family, i: int, name: str) -> bool:
    """Whether pruning layer i rewrites this file tensor (routed experts and router); the rest is copied."""
    return expert_axis(family, i, name) is not None or _expert_index(family, i, name) is not None


# ---------------------------------------------------------------- tensors: files <-> modules

def module_tensors(family: Family, i: int, expected: dict[str, tuple[int, ...]], read: Callable[[str], torch.Tensor],
                   dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(module name, tensor) for decoder layer i's parameters (name -> the shape its config implies), from the
    files, floating tensors in `dtype`. Fused experts are assembled expert by expert straight into `dtype`
    (never a second full copy in the stored dtype), each part shape-checked."""
    prefix = experts_prefix(family, i)

    def part(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = read(name)
        if tuple(t.shape) != tuple(shape):
            raise MoePruneError(f"{name} has shape {list(t.shape)}, its config implies {list(shape)}; the "
                                "checkpoint does not match its config.json")
        return t

    for name, shape in expected.items():
        param = name[len(prefix):] if name.startswith(prefix) else None
        if family.hub_expert is None or param not in ("gate_up_proj", "down_proj"):
            t = read(hub_name(family, name))
            yield name, t.to(dtype) if t.is_floating_point() else t
            continue
        fused = torch.empty(shape, dtype=dtype)
        half = (shape[1] // 2, shape[2])
        for e in range(shape[0]):
            gate, up, down = expert_names(family, i, e)
            if param == "down_proj":
                fused[e] = part(down, shape[1:])
            else:
                fused[e, :half[0]] = part(gate, half)
                fused[e, half[0]:] = part(up, half)
        yield name, fused


def file_tensors(family: Family, i: int, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """(file name, tensor) for one module tensor of decoder layer i: fused experts split per expert."""
    prefix = experts_prefix(family, i)
    param = name[len(prefix):] if name.startswith(prefix) else None
    if family.hub_expert is None or param not in ("gate_up_proj", "down_proj"):
        yield hub_name(family, name), tensor
        return
    for e in range(tensor.shape[0]):
        gate, up, down = expert_names(family, i, e)
        if param == "down_proj":
            yield down, tensor[e]
        else:
            half = tensor.shape[1] // 2
            yield gate, tensor[e, :half]
            yield up, tensor[e, half:]


def output_slots(ckpt: Checkpoint, family: Family, moe_layers: list[int], keep: int) -> dict[str, list[Slot]]:
    """The output's shards: the input's files, names, order and dtypes; experts >= keep dropped, expert axes cut."""
    moe = set(moe_layers)
    shards: dict[str, list[Slot]] = {f: [] for f in ckpt.files}
    for t in sorted(ckpt.tensors.values(), key=lambda t: (ckpt.files.index(t.file.name), t.start)):
        shape = t.shape
        m = _LAYER.match(t.name)
        i = int(m.group(2)) if m else -1
        if i in moe:
            e = _expert_index(family, i, t.name)
            if e is not None and e >= keep:
                continue
            axis = expert_axis(family, i, t.name)
            if axis is not None:
                shape = shape[:axis] + (keep,) + shape[axis + 1:]
        shards[t.file.name].append(Slot(t.name, t.dtype, shape))
    return {f: slots for f, slots in shards.items() if slots}


# ---------------------------------------------------------------- config.json and the other files

def _raw_keys(config, raw: dict, attr: str) -> list[str]:
    """The keys of config.json that hold `attr`, under any of its spellings (transformers' attribute_map)."""
    amap = getattr(type(config), "attribute_map", {}) or {}
    real = amap.get(attr, attr)
    names = {attr, real} | {k for k, v in amap.items() if v == real}
    return [k for k in raw if k in names] or [real]


def edit_config(text: str, config, changes: dict[str, int]) -> str:
    """config.json's text with only `changes` edited: same keys, spelling, order and formatting elsewhere."""
    raw = json.loads(text)
    want = dict(raw)
    for attr, value in changes.items():
        for key in _raw_keys(config, raw, attr):
            want[key] = value
    new = text
    for key, value in want.items():
        if key in raw and raw[key] != value:
            pattern = re.compile(r'("%s"\s*:\s*)%s' % (re.escape(key), re.escape(json.dumps(raw[key]))))
            new = pattern.sub(lambda m: m.group(1) + json.dumps(value), new, count=1)
    if json.loads(new) != {**raw, **{k: want[k] for k in raw}}:          # nested duplicates: edit structurally
        new = json.dumps({k: want[k] for k in raw}, indent=2) + "\n"
    added = {k: v for k, v in want.items() if k not in raw}
    if added:                                                              # a default the file left out
        new = json.dumps({**json.loads(new), **added}, indent=2) + "\n"
    return new


def copy_folder_files(source: Path, dest: Path) -> list[str]:
    """Copy every non-weight file of the input folder byte for byte (tokenizer, generation config, chat
    template, README, licence, code ...); returns the relative paths copied."""
    copied = []
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if not path.is_file() or rel.parts[0].startswith(".") or rel.as_posix() in SKIP \
                or path.name.endswith(WEIGHT_SUFFIXES):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / rel)
        copied.append(rel.as_posix())
    return copied


def write_config(source: Path, dest: Path, config, changes: dict[str, int]) -> None:
    text = (source / "config.json").read_text(encoding="utf-8")
    (dest / "config.json").write_text(edit_config(text, config, changes), encoding="utf-8")


def check_shapes(expected: dict[str, tuple[int, ...]], got: dict[str, torch.Tensor], where: str) -> None:
    """Every parameter present, with the shape the config implies (a wrong-shape tensor fails here, named)."""
    missing = sorted(set(expected) - set(got))
    if missing:
        raise MoePruneError(f"{where}: no tensor for {missing[0]} (and {len(missing) - 1} more)")
    for name, shape in expected.items():
        if tuple(got[name].shape) != tuple(shape):
            raise MoePruneError(f"{where}: {name} has shape {list(got[name].shape)}, its config implies "
                                f"{list(shape)}; the checkpoint does not match its config.json")


# ---------------------------------------------------------------- the writer

class CheckpointWriter:
    """The pruned checkpoint of a safetensors folder, written layer by layer as the engine goes.

    Layer i's routed experts and router rows come from the pruned module, cast to each file tensor's own
    dtype; every other tensor is copied from the input shards as raw bytes (byte-identical).
    """

    def __init__(self, folder: Path, ckpt: Checkpoint, family: Family, moe_layers: list[int], keep: int):
        self.folder, self.ckpt, self.family, self.moe = Path(folder), ckpt, family, set(moe_layers)
        slots = output_slots(ckpt, family, moe_layers, keep)
        self.dtypes = {s.name: s.dtype for ss in slots.values() for s in ss}
        self.shards = ShardWriter(self.folder, slots, ckpt.metadata, index=ckpt.index is not None)

    def write_layer(self, i: int, layer: torch.nn.Module) -> None:
        prefix = f"model.layers.{i}."
        if i in self.moe:
            for name, tensor in layer.state_dict(prefix=prefix).items():
                for file_name, t in file_tensors(self.family, i, name, tensor):
                    if touched(self.family, i, file_name):
                        self.shards.write(file_name, t.to(DTYPES[self.dtypes[file_name]]))
        for name in self.dtypes:
            if name.startswith(prefix) and name not in self.shards.written:
                self.shards.write(name, self.ckpt.raw(name))

    def finish(self, source: Path, config, changes: dict[str, int]) -> list[str]:
        """Copy the tensors outside the decoder layers, close the shards, write config.json (edited in place)
        and every non-weight file; returns the files copied."""
        for name in self.dtypes:
            if name not in self.shards.written:
                self.shards.write(name, self.ckpt.raw(name))
        self.shards.finish()
        write_config(source, self.folder, config, changes)
        return copy_folder_files(source, self.folder)
