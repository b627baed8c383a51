"""The hub's checkpoint layout, and an output folder that every client reads.

transformers 5 holds a layer's routed experts fused (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj`
[E, H, I]); the hub's files hold most families per expert (`experts.<e>.gate_proj.weight`, Mixtral's
`block_sparse_moe.experts.<e>.w1.weight`, ...) and some name a block or a router tensor differently. The
map between the two is transformers' own conversion table for the model type, run symbolically
(moeprune.hubmap.HubMap): nothing here is written per family, and every tensor is shape-checked.

The output folder is the input folder with only what pruning changes changed: config.json is the input's
text with the expert count (and, when it must, top-k or group routing) edited in place, every non-weight
file is copied byte for byte, and the weights keep the input's shards, names, order and dtypes, less the
dropped experts. transformers 5's own re-save would rename keys (`num_experts` -> `num_local_experts`,
`rope_theta` -> `rope_parameters`, tokenizer class -> TokenizersBackend) and break transformers 4.x,
converters and serving stacks that read the hub's spelling.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights

from .arch import Layout, MoePruneError, set_config_value
from .hubmap import HubMap
from .quant import config_text_without_quantization, role
from .shards import DTYPES, INDEX, Checkpoint, ShardWriter, Slot, tensor_bytes

# files that hold weights (any format): never copied, the pruned weights replace them
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz")
SKIP = {INDEX, "pytorch_model.bin.index.json", "config.json", "plan.json", "report.json", "report.md"}


# ---------------------------------------------------------------- which file tensors pruning rewrites

def _pruned_prefixes(layout: Layout) -> dict[int, tuple[str, ...]]:
    """MoE layer -> the module-name prefixes of its router and routed experts, and the names of the block's own
    per-expert tensors (what pruning rewrites)."""
    f, p = layout.family, layout.layers_prefix
    return {m.index: (f"{p}{m.index}.{f.block}.{f.router}.", f"{p}{m.index}.{f.block}.{f.experts}.",
                      *(f"{p}{m.index}.{f.block}.{name}" for name, _ in f.block_tensors))
            for m in layout.layers}


def extra_layer_tensors(ckpt: Checkpoint, layout: Layout, hub: HubMap | None = None) -> list[str]:
    """The file tensors of decoder layers past the model's num_hidden_layers: the multi-token-prediction (MTP)
    layers DeepSeek-V3, Kimi-K2 and GLM-4.5 ship for speculative decoding, which transformers does not load; and,
    given the key map, the file tensors outside it that transformers' loader drops by name (DeepSeek-V4's mtp.*).
    Their routers were never calibrated and their experts would no longer match the pruned count, so the output
    leaves them out and says num_nextn_predict_layers 0 (CheckpointWriter.finish)."""
    n = getattr(layout.config, "num_hidden_layers", None)
    pattern = re.compile(re.escape(layout.layers_prefix) + r"(\d+)\.")
    past = [name for name in ckpt.tensors if isinstance(n, int) and (m := pattern.match(name)) and int(m.group(1)) >= n]
    dropped = [re.compile(p) for p in layout.ignored_on_load] if hub is not None else []
    unmapped = [name for name in ckpt.tensors if name not in past and name not in hub.files
                and any(p.search(name) for p in dropped)] if dropped else []
    return past + unmapped


@dataclass
class OutputLayout:
    """The pruned checkpoint's tensors, known before the first layer is read."""
    shards: dict[str, list[Slot]]      # the input's shards, names, order and dtypes; dropped experts left out
    touched: set[str]                  # output file tensors the prune rewrites (routed experts, router rows)
    # a quantized input: every output tensor under its plain name, with its plain shape (what the pruned model's
    # key map must name); None: the slots' own names and shapes
    plain: dict[str, tuple[int, ...]] | None = None
    left_out: tuple[str, ...] = ()     # input tensors of layers past num_hidden_layers (extra_layer_tensors)


def output_layout(ckpt: Checkpoint, hub: HubMap, layout: Layout, keep: int, quant=None,
                  dequantize: bool = False) -> OutputLayout:
    """Per input file tensor of a MoE layer's router or experts: an expert >= keep is dropped, an expert axis
    cut to keep (a router's identity slots after the experts, LongCat's, kept: K + Z rows); every other tensor is
    the input's.

    `quant` (a moeprune.quant.Scheme): the input's quantized tensors are decided by their plain names; each keeps
    its stored parts (weight and scale, blocks and scales) with shapes following the cut, or, `dequantize`, is one
    BF16 tensor under its plain name where its first part was."""
    prefixes = _pruned_prefixes(layout)
    shards: dict[str, list[Slot]] = {f: [] for f in ckpt.files}
    touched = set()
    plain: dict[str, tuple[int, ...]] = {}
    left_out = extra_layer_tensors(ckpt, layout, hub)
    extra = set(left_out)
    for t in sorted(ckpt.tensors.values(), key=lambda t: (ckpt.files.index(t.file.name), t.start)):
        if t.name in extra:
            continue
        name = quant.parts.get(t.name, t.name) if quant is not None else t.name
        q = quant.tensors.get(name) if quant is not None else None
        shape, i = (q.shape if q is not None else t.shape), hub.layer_of(name)
        if i in prefixes and any(m.startswith(prefixes[i]) for m in hub.module_names(name)):
            expert = hub.expert_of(name)
            if expert is not None and expert[1] >= keep:
                continue
            axis = hub.expert_axis(name)
            if axis is not None:          # less the dropped experts' entries: a router's identity slots (LongCat)
                # stay; an axis that folds I rows per expert ([E * I, H], DBRX) loses I per dropped expert
                cut = shape[axis] - (hub.num_experts - keep) * hub.expert_rows(name) if hub.num_experts else keep
                shape = shape[:axis] + (cut,) + shape[axis + 1:]
            touched.add(name)
        plain[name] = shape
        if q is None:
            shards[t.file.name].append(Slot(t.name, t.dtype, shape))
        elif dequantize:
            if t.name == q.parts[0]:
                shards[t.file.name].append(Slot(name, "BF16", shape))
        else:
            k = q.parts.index(t.name)
            shards[t.file.name].append(Slot(t.name, t.dtype, quant.part_shapes(name, shape)[k]))
    return OutputLayout({f: slots for f, slots in shards.items() if slots}, touched,
                        plain if quant is not None else None, tuple(left_out))


def output_bytes(source, layout: Layout, keep: int, dequantize: bool = False) -> int:
    """The bytes of the pruned checkpoint's tensors (headers aside), from the input's headers alone: at most the
    input's, except a quantized input written dequantized (FP8 -> BF16 doubles, MXFP4 and DeepSeek-V4's FP4
    experts -> BF16 quadruple)."""
    quant = getattr(source, "quant", None)
    out = output_layout(source.ckpt, source.hub, layout, keep, quant, dequantize and quant is not None)
    return sum(tensor_bytes(s.dtype, s.shape) for slots in out.shards.values() for s in slots)


def pruned_map(model, layout: Layout, changes: dict[str, int], out: OutputLayout) -> HubMap:
    """The key map of the pruned model (a skeleton on the meta device with the edited config), stored as the
    input is; it must name exactly the output's tensors with their shapes, or the prune would write another
    layout than it planned."""
    config = copy.deepcopy(model.config)
    for attr, value in changes.items():
        set_config_value(config.get_text_config(), attr, value)
    with init_empty_weights(include_buffers=False):
        skeleton = type(model)._from_config(config)
    names = out.plain if out.plain is not None else {s.name: s.shape for slots in out.shards.values() for s in slots}
    hub = HubMap.for_model(skeleton, file_names=names)
    missing = sorted(out.touched - set(hub.all_file_names()))
    wrong = missing or sorted(n for n in out.touched if hub.file_shape(n) != tuple(names[n]))
    if wrong:
        raise MoePruneError(f"the pruned {layout.family.model_type} model's layout does not match the planned output "
                            f"at {wrong[0]} (and {len(wrong) - 1} more); please report this as a bug")
    return hub


# ---------------------------------------------------------------- config.json and the other files

def _raw_keys(config, raw: dict, attr: str) -> list[str]:
    """The keys of config.json that hold `attr`, under any of its spellings (transformers' attribute_map)."""
    amap = getattr(type(config), "attribute_map", {}) or {}
    real = amap.get(attr, attr)
    names = {attr, real} | {k for k, v in amap.items() if v == real}
    return [k for k in raw if k in names] or [real]


def edit_config(text: str, config, changes: dict[str, int], key: str = "") -> str:
    """config.json's text with only `changes` edited: same keys, spelling, order and formatting elsewhere.
    `key` names the sub-config the changes belong to ("text_config" of a multimodal wrapper), "" the top level; a
    dotted change edits a nested object of it (DBRX's "ffn_config.moe_num_experts")."""
    raw = json.loads(text)
    if key and not isinstance(raw.get(key), dict):
        raise MoePruneError(f"config.json has no {key!r} object, although its model keeps the language model's "
                            "config there; restore the file")
    groups: dict[tuple[str, ...], dict[str, int]] = {}
    for attr, value in changes.items():
        *sub, leaf = attr.split(".")
        groups.setdefault(tuple(sub), {})[leaf] = value
    new, whole, added = text, copy.deepcopy(raw), []
    for sub, leaves in groups.items():
        path = ((key,) if key else ()) + sub
        inner, obj = raw, config
        for part in path:
            inner = inner.get(part) if isinstance(inner, dict) else None
        for part in sub:
            obj = getattr(obj, part, None)
        if not isinstance(inner, dict):
            raise MoePruneError(f"config.json has no {'.'.join(path)!r} object, although its model keeps the expert "
                                "count there; restore the file")
        want = dict(inner)
        for attr, value in leaves.items():
            for name in _raw_keys(obj, inner, attr):
                want[name] = value
        start = 0
        for part in path:                          # the nested object's text: after each of its keys in turn
            found = re.compile(r'"%s"\s*:\s*\{' % re.escape(part)).search(new, start)
            start = found.end() if found else start
        for name, value in want.items():
            if name in inner and inner[name] != value:
                pattern = re.compile(r'("%s"\s*:\s*)%s' % (re.escape(name), re.escape(json.dumps(inner[name]))))
                new = new[:start] + pattern.sub(lambda m: m.group(1) + json.dumps(value), new[start:], count=1)
        target = whole
        for part in path:
            target = target[part]
        target.update({k: want[k] for k in inner})
        added += [(path, k, v) for k, v in want.items() if k not in inner]
    if json.loads(new) != whole:                                           # duplicates: edit structurally
        new = json.dumps(whole, indent=2) + "\n"
    if added:                                                              # a default the file left out
        whole = json.loads(new)
        for path, k, v in added:
            target = whole
            for part in path:
                target = target[part]
            target[k] = v
        new = json.dumps(whole, indent=2) + "\n"
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


def write_config(source: Path, dest: Path, config, changes: dict[str, int], key: str = "") -> None:
    text = (source / "config.json").read_text(encoding="utf-8")
    (dest / "config.json").write_text(edit_config(text, config, changes, key), encoding="utf-8")


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

    Layer i's routed experts and router rows come from the pruned module, split into the hub's files by the
    pruned model's key map and cast to each file tensor's own dtype; every other tensor is copied from the
    input shards as raw bytes (byte-identical).

    A quantized input (FP8 block scales, MXFP4; `source.quant`) is written in its own scheme: config.json keeps
    its quantization_config and every tensor its dtype. A pruned expert tensor that is still, bit for bit, an
    input expert's (a kept, unmerged expert) is the input's stored bytes and scales; any other (a merged expert)
    is quantized again with fresh scales, and its relative Frobenius error against its unquantized value is kept
    in `quantization_errors` (per pruned expert, "layers.<i>.experts.<j>") and `tensor_quantization_errors` (per
    file tensor; "name[j]" for an expert of a fused one); the layer is left holding the stored value (its
    dequantization), so a step after the write sees what the file holds. `dequantize=True` writes the quantized
    tensors in bfloat16 under their plain names instead, and config.json without its quantization_config.
    """

    def __init__(self, folder: Path, source, layout: Layout, keep: int, changes: dict[str, int],
                 dequantize: bool = False):
        self.folder, self.ckpt, self.prefixes = Path(folder), source.ckpt, _pruned_prefixes(layout)
        self.layout = layout
        self.source, self.quant = source, getattr(source, "quant", None)
        self.dequantize = dequantize and self.quant is not None
        self.out = output_layout(source.ckpt, source.hub, layout, keep, self.quant, self.dequantize)
        extra = self.out.left_out
        if extra:
            warnings.warn(f"the checkpoint's {len(extra)} tensors of layers past num_hidden_layers "
                          f"({layout.config.num_hidden_layers}) or that transformers does not load (multi-token "
                          f"prediction, {extra[0]}, ...) are left out of the output: their experts were not pruned; "
                          "the output says num_nextn_predict_layers 0")
        self.hub = pruned_map(source.model, layout, changes, self.out)
        self.dtypes = {s.name: s.dtype for ss in self.out.shards.values() for s in ss}
        self.shards = ShardWriter(self.folder, self.out.shards, source.ckpt.metadata,
                                  index=source.ckpt.index is not None)
        self.quantization_errors: dict[str, float] = {}
        self.tensor_quantization_errors: dict[str, float] = {}
        self._sums: dict[tuple[int, int], list[float]] = {}        # (layer, expert) -> [error^2, norm^2]
        self.copied_experts = 0                                      # expert tensors written as the input's bytes
        if self.quant is not None and not self.dequantize:
            source.experts.check_alike()
            source.experts.enabled = True                            # the reads index the experts' values

    def write_layer(self, i: int, layer: torch.nn.Module) -> None:
        prefix = f"{self.layout.layers_prefix}{i}."
        if i in self.prefixes:
            pruned = {name: t for name, t in layer.state_dict(prefix=prefix).items()
                      if name.startswith(self.prefixes[i])}
            for file_name, t in self.hub.files_from(pruned):
                q = self.quant.tensors.get(file_name) if self.quant is not None else None
                if q is None:
                    self.shards.write(file_name, t.to(DTYPES[self.dtypes[file_name]]))
                elif self.dequantize:
                    self.shards.write(file_name, t.to(torch.bfloat16))
                else:
                    self._write_quantized(i, file_name, t)
        for name in self.dtypes:
            if name.startswith(prefix) and name not in self.shards.written:
                self._copy(name)

    def _copy(self, name: str) -> None:
        """An untouched tensor: the input's bytes (dequantized to bfloat16 when the output is)."""
        if self.dequantize and name in self.quant.tensors:
            self.shards.write(name, self.quant.read(name, torch.bfloat16))
        else:
            self.shards.write(name, self.ckpt.raw(name))

    # ------------------------------------------------------------ quantized output

    def _write_quantized(self, i: int, name: str, t: torch.Tensor) -> None:
        q, experts = self.quant.tensors[name], self.source.experts
        expert = self.hub.expert_of(name)
        if expert is not None:                                       # one expert's tensor: copied, or quantized
            j, r = expert[1], role(name, expert[1])
            match = self._match(r, t, lambda e: [self.ckpt.get(p)
                                                 for p in self.quant.tensors[experts.units[r][e]].parts])
            parts = match if match is not None else self._quantize(name, t, (i, j), name)
            for part, value in zip(q.parts, parts):
                self.shards.write(part, value)
            return
        if name in experts.fused:                                    # all experts in one tensor: expert by expert
            stored = None

            def input_parts(e: int) -> list[torch.Tensor]:
                nonlocal stored
                if stored is None:
                    stored = [self.ckpt.get(p) for p in q.parts]
                return [p[e] for p in stored]
            rows = []
            for j in range(t.shape[0]):
                match = self._match(experts.fused[name], t[j], input_parts)
                rows.append(match if match is not None else self._quantize(name, t[j], (i, j), f"{name}[{j}]"))
            for k, part in enumerate(q.parts):
                dtype = DTYPES[self.dtypes[part]]
                self.shards.write(part, torch.stack([r[k].view(torch.uint8) for r in rows]).view(dtype))
            return
        parts = self._quantize(name, t, None, name)                  # a router-like tensor cut along its experts
        for part, value in zip(q.parts, parts):
            self.shards.write(part, value)

    def _match(self, r: str, t: torch.Tensor, input_parts) -> list[torch.Tensor] | None:
        """The stored parts of the input expert whose dequantized value is exactly `t`, else None."""
        experts = self.source.experts

        def read(plain: str, e: int) -> torch.Tensor:
            return self.quant.dequantize(plain, input_parts(e), self.source.dtype)
        for e in experts.candidates(r, t, read):
            parts = input_parts(e)
            if torch.equal(self.quant.dequantize(experts.units[r][e], parts, t.dtype), t):
                self.copied_experts += 1
                return parts
        return None

    def _quantize(self, name: str, t: torch.Tensor, expert: tuple[int, int] | None, label: str) -> list[torch.Tensor]:
        """`t` quantized afresh in the input's scheme; its relative error recorded."""
        parts = self.quant.quantize(name, t)
        back = self.quant.dequantize(name, parts, torch.float64).to(torch.float64)
        ref = t.to(torch.float64)
        err, norm = float((back - ref).square().sum()), float(ref.square().sum())
        t.copy_(back)        # a view of the layer's tensor (every expert layout): the layer holds what the file stores
        self.tensor_quantization_errors[label] = math.sqrt(err / norm) if norm > 0 else 0.0
        if expert is not None:
            acc = self._sums.setdefault(expert, [0.0, 0.0])
            acc[0] += err
            acc[1] += norm
            self.quantization_errors[f"layers.{expert[0]}.experts.{expert[1]}"] = \
                math.sqrt(acc[0] / acc[1]) if acc[1] > 0 else 0.0
        return parts

    def finish(self, source: Path, config, changes: dict[str, int]) -> list[str]:
        """Copy the tensors outside the decoder layers, close the shards, write config.json (edited in place;
        without quantization_config for a dequantized output) and every non-weight file; returns the files
        copied."""
        for name in self.dtypes:
            if name not in self.shards.written:
                self._copy(name)
        self.shards.finish()
        if self.out.left_out and getattr(config, "num_nextn_predict_layers", 0):
            changes = {**changes, "num_nextn_predict_layers": 0}
        write_config(source, self.folder, config, changes, self.layout.config_key)
        if self.dequantize:
            path = self.folder / "config.json"
            path.write_text(config_text_without_quantization(path.read_text(encoding="utf-8")), encoding="utf-8")
        return copy_folder_files(source, self.folder)
