"""Loading models by name or path, and saving standard checkpoints atomically.

Names: `demo-mixtral`, `demo-fine` (embedded), `tiny:<family>` (a tiny random model built here),
a local folder, or a Hugging Face hub id (when online). The output is written to a temporary
folder beside the destination and renamed into place, so a failure never leaves half a checkpoint,
and the input model is never written to.

A model folder is data, never code: every config goes through `load_config` (transformers' own classes
only, trust_remote_code=False, no prompt), every model class through `causal_lm_class`, and pickle
weights (pytorch_model.bin) are refused, never unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
import transformers
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig
from transformers import dynamic_module_utils
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

try:                                            # transformers 5 configs are strict dataclasses
    from huggingface_hub.errors import StrictDataclassError
except ImportError:                             # pragma: no cover - an older huggingface_hub
    StrictDataclassError = ValueError
CONFIG_ERRORS = (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError, StrictDataclassError)

from . import demo
from .arch import MoePruneError
from .atomic import replaceable

# transformers asks on stdin whether to run a folder's own code when trust_remote_code is left unset, and a
# "y" runs it. With the timeout at 0 it raises instead: no load anywhere in the process can prompt, even one
# that forgets trust_remote_code=False.
dynamic_module_utils.TIME_OUT_REMOTE_CODE = 0

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# config fields that size the model: each, when set, a positive integer (and not absurdly large)
SIZE_FIELDS = ("hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
               "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
               "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
               "n_shared_experts", "n_group", "topk_group", "moe_num_shared_experts", "decoder_sparse_step",
               "moe_layer_interval")
MAX_SIZE = 2**24
# the routed expert count and top-k, under each family's spelling (checked whatever the family)
COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOP_K_FIELDS = ("num_experts_per_tok", "moe_k", "moe_topk", "num_experts_per_token", "moe_top_k")

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
        read_config_json(path)
        return spec, path.resolve()
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise MoePruneError(f"model path {spec!r} not found")
    return spec, hub_snapshot(spec)


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of a Hugging Face hub id, from huggingface_hub's cache, never the network: a
    hub id is then read and written like any folder (one input path, one writer, layer by layer). Not cached:
    one message, at once, with the command that downloads it."""
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except HFValidationError:
        raise MoePruneError(f"model path {repo_id!r} not found, and it is not a valid hub id") from None
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        raise MoePruneError(f"{repo_id!r} is not a local folder and not in the Hugging Face cache "
                            f"({hf_constants.HF_HUB_CACHE}); "
                            f"download it first (hf download {repo_id}, or huggingface-cli download {repo_id}), "
                            "then pass the hub id or the folder") from None
    read_config_json(folder)
    return folder


def resolve_device(device: str | None) -> str:
    """"auto" (the default): the GPU when there is one, else the CPU."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise MoePruneError(f"--device {device!r} is not a torch device; give cpu, cuda, cuda:N or auto") from None
    backend = getattr(torch, kind, None)
    if kind != "cpu" and not (backend is not None and hasattr(backend, "is_available") and backend.is_available()):
        raise MoePruneError(f"--device {device}: this machine has no {kind} device that torch can use; "
                            "give --device cpu (or auto)")
    index = torch.device(device).index
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise MoePruneError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def compute_dtype(dtype: str, device: str) -> torch.dtype | str:
    """dtype "auto": float32 on the CPU (its bfloat16 kernels are slow, and statistics want the precision),
    the checkpoint's own dtype elsewhere."""
    if dtype not in DTYPES:
        raise MoePruneError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if dtype == "auto" and torch.device(device).type == "cpu":
        return torch.float32
    return DTYPES[dtype]


# ---------------------------------------------------------------- configs and model classes, never remote code

def read_config_json(folder: Path) -> dict:
    """config.json of a local model folder as a JSON object, or one clear error naming the file."""
    file = Path(folder) / "config.json"
    if not file.is_file():
        raise MoePruneError(f"{folder} is not a model folder: it has no config.json")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:          # JSONDecodeError, UnicodeDecodeError, absurd nesting
        raise MoePruneError(f"{file} is not valid JSON ({e}); the download is damaged or the file was edited by "
                            "hand: restore it") from None
    except OSError as e:
        raise MoePruneError(f"{file} cannot be read ({e.strerror or e}); check its permissions") from None
    if not isinstance(raw, dict):
        raise MoePruneError(f"{file} holds a JSON {type(raw).__name__}, not an object of config fields; the "
                            "download is damaged or the file was edited by hand: restore it")
    if not isinstance(raw.get("model_type"), str) or not raw["model_type"]:
        raise MoePruneError(f"{file} has no \"model_type\" string, so it is not a transformers model config; "
                            "restore the file")
    return raw


def _transformers_class(name) -> type | None:
    """The transformers model class of this name (one with a config class), else None."""
    if not isinstance(name, str) or not name.isidentifier():
        return None
    try:
        cls = getattr(transformers, name, None)
    except Exception:                                  # transformers' lazy module failing to import a name
        return None
    config_class = getattr(cls, "config_class", None)
    ok = isinstance(cls, type) and isinstance(config_class, type) and issubclass(config_class, PretrainedConfig)
    return cls if ok else None


def _config_error(where: str, e: Exception) -> MoePruneError:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    detail = lines[-1] if lines else type(e).__name__
    detail = detail.removeprefix("TypeError: ").removeprefix("ValueError: ")[:300]
    return MoePruneError(f"{where}: {detail}; the file is damaged or was edited by hand: restore it")


def _culprit(config_class: type, fields: dict) -> str | None:
    """The config.json field whose removal lets transformers read the config (for an error that names none)."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for key in fields:
                if key == "model_type":
                    continue
                try:
                    config_class.from_dict({k: v for k, v in fields.items() if k != key})
                except CONFIG_ERRORS:
                    continue
                return key
    finally:
        transformers.logging.set_verbosity(verbosity)
    return None


def _field_kinds(config_class: type) -> tuple[set[str], set[str]]:
    """(fields whose transformers default is 0, fields declared as lists): there 0 means unused (GLM-5-Next's
    NoPE attention has qk_rope_head_dim 0 and head_dim 0) and a list holds one size per part (ERNIE-4.5-VL's
    moe_intermediate_size, [text experts, vision experts]), not a damaged file."""
    if not dataclasses.is_dataclass(config_class):
        return set(), set()
    fields = dataclasses.fields(config_class)
    return ({f.name for f in fields if f.default == 0 and not isinstance(f.default, bool)},
            {f.name for f in fields if "list" in str(f.type)})


def check_config(config, where: str = "config.json") -> None:
    """The fields that size the model: positive integers; top-k within the expert count; whole KV groups (of
    the language model's sub-config in a multimodal wrapper)."""
    top = config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    fields = SIZE_FIELDS + COUNT_FIELDS + TOP_K_FIELDS
    unused, lists = _field_kinds(type(config))
    for name in fields:
        value = getattr(config, name, None)
        if value is None or (value == 0 and name in unused):
            continue
        values = value if name in lists and isinstance(value, list) and value else [value]
        if any(not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= MAX_SIZE for v in values):
            shown = repr(value)[:60]
            raise MoePruneError(f"{where}: field {name!r} is {shown}; it must be a positive integer (at most "
                                f"{MAX_SIZE}). The file is damaged or was edited by hand: restore it")
    count = next((f for f in COUNT_FIELDS if isinstance(getattr(config, f, None), int)), None)
    k_field = next((f for f in TOP_K_FIELDS if isinstance(getattr(config, f, None), int)), None)
    if count and k_field and getattr(config, k_field) > getattr(config, count):
        raise MoePruneError(f"{where}: field {k_field!r} ({getattr(config, k_field)}) exceeds the expert count "
                            f"{count!r} ({getattr(config, count)}); restore the file")
    auto_map, architectures = getattr(top, "auto_map", None), getattr(top, "architectures", None)
    if auto_map is not None and not isinstance(auto_map, dict):
        raise MoePruneError(f"{where}: field 'auto_map' is {repr(auto_map)[:60]}, not an object; restore the file")
    if architectures is not None and not (isinstance(architectures, list)
                                          and all(isinstance(a, str) for a in architectures)):
        raise MoePruneError(f"{where}: field 'architectures' is {repr(architectures)[:60]}, not a list of class "
                            "names; restore the file")
    heads, kv = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        raise MoePruneError(f"{where}: field 'num_attention_heads' ({heads}) is not a multiple of "
                            f"'num_key_value_heads' ({kv}); restore the file")


def load_config(source: str | Path) -> PretrainedConfig:
    """The config of a model folder (or hub id) in one of transformers' own config classes; the folder's own
    code is never imported and nothing prompts. A model type transformers does not know (a folder that ships
    its code, e.g. Kimi-K2's "kimi_k2") is read with the class its `architectures` names when transformers
    has that class (with a warning), else refused. A damaged config.json is one error naming the field."""
    path = Path(source).expanduser()
    if not path.exists():                              # a hub id
        try:
            return AutoConfig.from_pretrained(str(source), trust_remote_code=False)
        except OSError as e:
            raise MoePruneError(f"could not read the config of {str(source)!r}: {e}. Is it a local folder, or is "
                                "the machine online for a hub id?") from None
        except CONFIG_ERRORS as e:
            raise _config_error(f"the config of {str(source)!r}", e) from None
    raw = read_config_json(path)
    file = path / "config.json"
    model_type = raw["model_type"]
    if model_type in CONFIG_MAPPING:
        config_class, fields = CONFIG_MAPPING[model_type], raw
    else:
        names = raw.get("architectures")
        names = names if isinstance(names, list) else []
        cls = next((c for c in map(_transformers_class, names) if c is not None), None)
        if cls is None:
            raise MoePruneError(f"{file}: model type {model_type[:80]!r} is not a transformers model type and its "
                                f"architectures ({str(names)[:120]}) name no transformers class: the folder needs "
                                "its own code (auto_map), which moeprune never runs")
        # one warning location, so a process that reads the config twice warns once
        warnings.warn(f"model type {model_type!r} is not a transformers model type; using transformers' "
                      f"{cls.__name__} named in architectures (the folder's own code is never run)")
        config_class, fields = cls.config_class, {k: v for k, v in raw.items() if k != "model_type"}
    try:
        if model_type in CONFIG_MAPPING:        # transformers' own reader (it decodes {"__float__": "Infinity"})
            config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        else:
            config = config_class.from_dict(fields)
            config._name_or_path = str(path)
    except CONFIG_ERRORS as e:
        culprit = None if "field '" in str(e) else _culprit(config_class, fields)
        raise _config_error(str(file) if culprit is None else f"{file}: field {culprit[:80]!r} is not valid", e) \
            from None
    check_config(config, str(file))
    return config


def causal_lm_class(config: PretrainedConfig) -> type:
    """transformers' own class for a config (never a folder's code): its causal LM, else, for a multimodal MoE
    (Qwen3-VL-MoE, GLM-4.5V, ...), its image-text-to-text model, whose language model is what is pruned; the
    one `architectures` names when transformers maps several to the config's class."""
    classes = []
    for mapping in (MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING):
        try:
            found = mapping[type(config)]
        except KeyError:
            continue
        classes += list(found) if isinstance(found, (list, tuple)) else [found]
    if not classes:
        raise MoePruneError(f"transformers has no causal language model for model type "
                            f"{getattr(config, 'model_type', '?')!r}")
    # Llama 4's checkpoints are the image-text-to-text wrapper, though transformers also maps a causal LM to its config
    named = {c.__name__: c for c in classes}
    return next((named[a] for a in (getattr(config, "architectures", None) or []) if a in named), classes[0])


def build_skeleton(config: PretrainedConfig, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The model of a config with its parameters on the meta device (buffers real), built by transformers' own
    class; a config transformers cannot build the model of is one error, not a traceback."""
    from accelerate import init_empty_weights
    cls = causal_lm_class(config)
    where = f"{getattr(config, '_name_or_path', '') or 'the model'}"
    try:
        with init_empty_weights(include_buffers=False):
            return cls._from_config(config, **({"dtype": dtype} if dtype is not None else {}))
    except MoePruneError:
        raise
    except CONFIG_ERRORS + (ZeroDivisionError, OverflowError, RuntimeError) as e:
        raise MoePruneError(f"{where}: transformers cannot build the model its config.json describes "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}); the file is "
                            "damaged or was edited by hand: restore it") from None


def check_weights(folder: Path) -> None:
    """A local folder must hold safetensors weights: pickle files (pytorch_model.bin, ...) are never unpickled,
    since unpickling runs whatever code the file carries."""
    if any((folder / f).is_file() for f in WEIGHT_FILES):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES)) \
        if folder.is_dir() else []
    if pickles:
        shown = ", ".join(pickles[:3]) + (", ..." if len(pickles) > 3 else "")
        raise MoePruneError(f"{folder} holds its weights only as pickle files ({shown}); moeprune never unpickles "
                            "weights (unpickling can run code the file carries): convert them to safetensors "
                            "(model.safetensors) where you trust the file, then run moeprune on that folder")
    raise MoePruneError(f"{folder} holds no weights: no model.safetensors and no model.safetensors.index.json")


def torch_dtype(own) -> torch.dtype | None:
    own = getattr(torch, own, None) if isinstance(own, str) else own
    return own if isinstance(own, torch.dtype) else None


def load_tokenizer(source: str):
    """The model's tokenizer, or None when the folder has none that can encode text (transformers 5 builds an
    empty placeholder tokenizer for some families when the folder has no tokenizer files)."""
    from .preflight import usable_tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except Exception:           # damaged or foreign tokenizer files (tokenizers raises plain Exception): none
        return None
    return tokenizer if usable_tokenizer(tokenizer)[0] else None


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
    if path is not None:
        check_weights(path)
    config = load_config(source)
    own = torch_dtype(config.dtype)                             # the checkpoint's own dtype, before loading
    try:
        model = causal_lm_class(config).from_pretrained(source, config=config, dtype=compute,
                                                        trust_remote_code=False, use_safetensors=True)
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


def check_writable(path: Path, flag: str = "--out") -> None:
    """Refuse up front a location that cannot be written: a temporary entry is made in the nearest existing
    folder above `path` (where the output's folders will be made) and removed again."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise MoePruneError(f"{flag} {path}: {parent} is a file, not a folder; choose another location")
    try:
        probe = tempfile.mkdtemp(prefix=".moeprune-probe-", dir=parent)
        os.rmdir(probe)
    except OSError as e:
        raise MoePruneError(f"{flag} {path} cannot be written: moeprune cannot create entries in {parent} "
                            f"({e.strerror or e}); choose a folder you can write to") from None


def check_output(out: str | Path, overwrite: bool, source: Path | None) -> Path:
    """Validate the output folder before any work is done. --overwrite replaces only an empty folder or one
    moeprune wrote (with its plan.json); the location must be writable."""
    if out is None or not str(out).strip():
        raise MoePruneError("--out is empty: name the folder to write the pruned checkpoint to")
    out = Path(out).expanduser().resolve()
    if source is not None and (out == source or source in out.parents or out in source.parents):
        raise MoePruneError(f"--out {out} overlaps the input model folder {source}; choose another folder")
    if out.exists() and not out.is_dir():
        raise MoePruneError(f"--out {out} exists and is not a folder; choose another --out")
    if out.exists() and not overwrite:
        raise MoePruneError(f"--out {out} already exists; pass --overwrite to replace it")
    if out.exists() and not replaceable(out):
        raise MoePruneError(f"--out {out} is a folder moeprune did not write (it has no moeprune plan.json); "
                            "--overwrite replaces only an empty folder or an earlier moeprune output, so it is "
                            "left alone: choose another --out, or delete it yourself")
    check_writable(out)
    return out


def check_side_path(flag: str, path: str | Path, input_folder: Path | None, out: Path | None, *,
                    folder_ok: bool) -> Path:
    """A path written beside the output (--plan-out: a file, folder_ok=False; --stats-cache: a folder,
    folder_ok=True), resolved; refused inside the input model folder, equal to or inside --out (replaced when
    the output is moved into place), or of the wrong kind."""
    if path is None or not str(path).strip():
        raise MoePruneError(f"{flag} is empty: name the {'folder' if folder_ok else 'file'} to write")
    p = Path(path).expanduser().resolve()
    if input_folder is not None:
        home = Path(input_folder).expanduser().resolve()
        if p == home or home in p.parents:
            raise MoePruneError(f"{flag} {p} is inside the input model folder {home}, which moeprune never writes "
                                f"into: choose a {flag} outside it")
    if out is not None:
        dest = Path(out).expanduser().resolve()
        if p == dest or dest in p.parents:
            raise MoePruneError(f"{flag} {p} is inside --out {dest}, which the pruned checkpoint replaces: choose a "
                                f"{flag} outside --out")
    if not folder_ok and p.is_dir():
        raise MoePruneError(f"{flag} {p} is a folder; name the file to write, e.g. {flag} {p / 'plan.json'}")
    if folder_ok and p.exists() and not p.is_dir():
        raise MoePruneError(f"{flag} {p} is a file; name a folder (it is made when missing)")
    check_writable(p / "entry" if p.is_dir() else p, flag)     # an existing folder: written inside
    return p


def save_model(model, tokenizer, folder: Path, dtype: torch.dtype | None = None) -> None:
    """A standard checkpoint: transformers writes the experts in the hub's per-expert layout."""
    if dtype is not None and dtype != next(model.parameters()).dtype:
        model = model.to(dtype)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
