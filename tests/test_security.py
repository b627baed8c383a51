"""A model folder is data: its code never runs, nothing prompts, the input is never written, and bad input is
one `moeprune: error:` line, never a traceback.

Everything here runs on real files and real processes, no mocks: folders that ship their own code (whose
import would leave a marker file), hostile shard names, damaged safetensors headers, pickle weights whose
unpickling would leave a marker, and output folders that are not moeprune's to replace.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from conftest import make
from moeprune.arch import MoePruneError
from moeprune.checkpoint import (build_skeleton, check_output, check_side_path, load, load_config)
from moeprune.cli import main
from moeprune.plan import LayerPlan, Plan
from moeprune.shards import Checkpoint

SMALL = ["--calib", "random", "--samples", "2", "--seq-len", "16", "--quiet", "--no-eval"]
KIMI_WARNING = ("model type 'kimi_k2' is not a transformers model type; using transformers' DeepseekV3ForCausalLM "
                "named in architectures (the folder's own code is never run)")


def digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def add_custom_code(folder: Path, model_type: str, architectures: list[str]) -> Path:
    """Turn a model folder into one that ships its own code: importing either module writes MARKER."""
    marker = folder / "MARKER"
    code = f"from pathlib import Path\nPath({str(marker)!r}).write_text('the folder code ran')\n"
    (folder / "configuration_x.py").write_text(code + "from transformers import PretrainedConfig\n"
                                               "class XConfig(PretrainedConfig):\n    model_type = 'x'\n")
    (folder / "modeling_x.py").write_text(code + "class XForCausalLM:\n    pass\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, architectures=architectures,
                  auto_map={"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return marker


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make("mixtral").save_pretrained(root / "mixtral")
    make("deepseek_v3").save_pretrained(root / "deepseek_v3")
    return root


@pytest.fixture
def custom(models, tmp_path) -> tuple[Path, Path]:
    folder = tmp_path / "custom"
    shutil.copytree(models / "mixtral", folder)
    return folder, add_custom_code(folder, "xmoe", ["XForCausalLM"])


@pytest.fixture
def kimi(models, tmp_path) -> tuple[Path, Path]:
    """Kimi-K2's layout: its own model type and code, but a transformers class named in architectures."""
    folder = tmp_path / "kimi"
    shutil.copytree(models / "deepseek_v3", folder)
    return folder, add_custom_code(folder, "kimi_k2", ["DeepseekV3ForCausalLM"])


def cli(*args: str, stdin: str = "y\n") -> subprocess.CompletedProcess:
    """moeprune in its own process, answering "y" to any prompt (none may appear)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "moeprune.cli", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=300)


def one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("moeprune: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


# ---------------------------------------------------------------- a folder's own code never runs

def test_a_custom_code_folder_is_refused_without_running_or_prompting(custom):
    folder, marker = custom
    before = digest(folder)
    done = cli("info", str(folder))
    assert done.returncode == 2, done.stderr
    line = one_error_line(done.stderr)
    assert "needs its own code" in line and "never runs" in line and "config.json" in line
    assert "[y/N]" not in done.stdout + done.stderr
    assert not marker.exists() and digest(folder) == before


def test_no_transformers_load_prompts_once_moeprune_is_imported(custom):
    """transformers itself asks on stdin when trust_remote_code is unset; after moeprune is imported even such a
    call (one that forgot trust_remote_code=False) raises instead of prompting, and "y" runs nothing."""
    folder, marker = custom
    code = f"import moeprune.checkpoint\nfrom transformers import AutoConfig\nAutoConfig.from_pretrained({str(folder)!r})"
    done = subprocess.run([sys.executable, "-c", code], input="y\n", capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode != 0 and "[y/N]" not in done.stdout + done.stderr
    assert not marker.exists()


def test_load_config_refuses_custom_code_in_one_line(custom):
    folder, marker = custom
    with pytest.raises(MoePruneError) as e:
        load_config(folder)
    assert "\n" not in str(e.value) and "'xmoe'" in str(e.value) and "never runs" in str(e.value)
    assert not marker.exists()


def test_a_kimi_k2_style_folder_loads_with_the_transformers_class_its_architectures_name(kimi):
    folder, marker = kimi
    before = digest(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_config(folder)
    assert [str(w.message) for w in caught] == [KIMI_WARNING]
    assert type(config) is DeepseekV3Config and config.model_type == "deepseek_v3"
    assert type(build_skeleton(config, torch.float32)) is DeepseekV3ForCausalLM
    with pytest.warns(UserWarning, match="kimi_k2"):
        loaded = load(str(folder))                          # in memory, through the same config
    assert type(loaded.model) is DeepseekV3ForCausalLM
    ckpt = Checkpoint(folder)
    name = "model.layers.0.mlp.gate.weight"
    assert torch.equal(loaded.model.state_dict()[name], ckpt.get(name).float())
    assert not marker.exists() and digest(folder) == before


def test_info_on_a_kimi_k2_style_folder(kimi):
    folder, marker = kimi
    done = cli("info", str(folder))
    assert not marker.exists()
    assert done.returncode == 0, done.stderr
    assert "deepseek_v3" in done.stdout and "kimi_k2" in done.stderr


@pytest.mark.parametrize("text,message", [
    ("{}", 'has no "model_type"'),
    ("[]", "holds a JSON list, not an object"),
    ("{nope", "is not valid JSON"),
    ('{"model_type": 5}', 'has no "model_type" string'),
])
def test_a_config_json_that_is_not_a_config_is_one_error(models, tmp_path, capsys, text, message):
    folder = tmp_path / "m"
    shutil.copytree(models / "mixtral", folder)
    (folder / "config.json").write_text(text)
    assert main(["info", str(folder)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert message in line and "config.json" in line


@pytest.mark.parametrize("field,value,message", [
    ("hidden_size", "abc", "'hidden_size' expected int, got str"),
    ("hidden_size", -3, "'hidden_size' is -3; it must be a positive integer"),
    ("num_local_experts", 0, "'num_local_experts' is 0"),
    ("num_experts_per_tok", 9, "exceeds the expert count"),
])
def test_a_bad_config_field_is_named(models, tmp_path, capsys, field, value, message):
    folder = tmp_path / "m"
    shutil.copytree(models / "mixtral", folder)
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["info", str(folder)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert message in line and "config.json" in line, line


# ---------------------------------------------------------------- pickle weights are never unpickled

class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_pickle_only_folder_is_refused_without_unpickling(models, tmp_path, capsys):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(models / "mixtral" / "config.json", folder / "config.json")
    marker = tmp_path / "UNPICKLED"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": _Payload(marker)}))
    before = digest(folder)
    assert main(["info", str(folder)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "pytorch_model.bin" in line and "never unpickles" in line and "safetensors" in line
    with pytest.raises(MoePruneError, match="never unpickles"):
        load(str(folder))
    assert not marker.exists() and digest(folder) == before


# ---------------------------------------------------------------- --out and the side paths

def test_overwrite_refuses_a_folder_moeprune_did_not_write(models, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("years of work")
    code = main(["prune", str(models / "mixtral"), "--keep", "4", "--out", str(out), "--overwrite", *SMALL])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and str(out) in line and "did not write" in line
    assert (out / "precious.txt").read_text() == "years of work" and sorted(os.listdir(out)) == ["precious.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_overwrite_replaces_an_empty_folder_or_an_earlier_output(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_output(empty, True, None) == empty.resolve()
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    Plan("frequency", {"keep": 1}, {0: LayerPlan.selection(2, [0])}).save(earlier / "plan.json")
    assert check_output(earlier, True, None) == earlier.resolve()
    (earlier / "plan.json").write_text('{"method": "frequency"}')      # not a plan: not moeprune's
    with pytest.raises(MoePruneError, match="did not write"):
        check_output(earlier, True, None)


def test_an_empty_or_unwritable_out_is_refused_up_front(tmp_path):
    with pytest.raises(MoePruneError, match="--out is empty"):
        check_output("", False, None)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(MoePruneError, match="is a file, not a folder"):
        check_output(tmp_path / "a_file" / "out", False, None)
    with pytest.raises(MoePruneError, match="cannot be written"):
        check_output("/proc/moeprune-out", False, None)              # not writable, even for root
    before = sorted(os.listdir(tmp_path))
    assert check_output(tmp_path / "new" / "out", False, None) == (tmp_path / "new" / "out").resolve()
    assert sorted(os.listdir(tmp_path)) == before                   # the probe left nothing behind


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into folders without write permission")
def test_a_parent_without_write_permission_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(MoePruneError, match="cannot be written"):
            check_output(locked / "out", False, None)
    finally:
        locked.chmod(0o755)


def test_side_paths_stay_out_of_the_input_and_the_output(models, tmp_path):
    src, out = models / "mixtral", tmp_path / "out"
    for flag, folder_ok in (("--plan-out", False), ("--stats-cache", True)):
        with pytest.raises(MoePruneError, match=f"^{flag} .* is inside the input model folder"):
            check_side_path(flag, src / "x", src, out, folder_ok=folder_ok)
        with pytest.raises(MoePruneError, match=f"^{flag} .* is inside --out"):
            check_side_path(flag, out / "x", src, out, folder_ok=folder_ok)
        with pytest.raises(MoePruneError, match=f"^{flag} .* is inside --out"):
            check_side_path(flag, out, src, out, folder_ok=folder_ok)
        with pytest.raises(MoePruneError, match=f"^{flag} is empty"):
            check_side_path(flag, "", src, out, folder_ok=folder_ok)
    with pytest.raises(MoePruneError, match=r"^--plan-out .* is a folder; name the file"):
        check_side_path("--plan-out", tmp_path, src, out, folder_ok=False)
    (tmp_path / "f").write_text("x")
    with pytest.raises(MoePruneError, match=r"^--stats-cache .* is a file"):
        check_side_path("--stats-cache", tmp_path / "f", src, out, folder_ok=True)
    assert check_side_path("--plan-out", tmp_path / "plan.json", src, out, folder_ok=False) == tmp_path / "plan.json"
    assert check_side_path("--stats-cache", tmp_path / "cache", src, out, folder_ok=True) == tmp_path / "cache"


# ---------------------------------------------------------------- shard names and safetensors headers

def safetensors_bytes(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def write_index(folder: Path, weight_map: dict) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


GOOD = safetensors_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "nested_dotdot"])
def test_a_shard_outside_the_model_folder_is_refused(tmp_path, kind):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(GOOD)
    folder = tmp_path / "model"
    folder.mkdir()
    name = {"dotdot": "../outside.safetensors", "absolute": str(outside), "symlink": "link.safetensors",
            "nested_dotdot": "sub/../../outside.safetensors"}[kind]
    if kind == "symlink":
        (folder / name).symlink_to(outside)
    write_index(folder, {"a": name})
    with pytest.raises(MoePruneError, match="outside the model folder") as e:
        Checkpoint(folder)
    assert name in str(e.value)


def test_a_hub_cache_snapshot_may_link_into_its_blobs(tmp_path):
    blobs, snapshot = tmp_path / "models--x" / "blobs", tmp_path / "models--x" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (blobs / "0123").write_bytes(GOOD)
    (snapshot / "model.safetensors").symlink_to("../../blobs/0123")
    assert Checkpoint(snapshot).get("a").tolist() == [0.0, 0.0]


HEADERS = {
    "overlap": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "overlaps"),
    "gap": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
             "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, 12, "gap of 4 bytes"),
    "not_at_zero": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8, "gap of 4 bytes"),
    "trailing": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 12, "8 bytes after the last"),
    "truncated": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8, "truncated"),
    "size": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, "needs 12 bytes"),
    "dtype": ({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, 1, "dtype 'Q4'"),
    "negative_shape": ({"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}, 0, "non-negative"),
    "bool_shape": ({"a": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, 1, "non-negative"),
    "reversed": ({"a": {"dtype": "U8", "shape": [0], "data_offsets": [4, 0]}}, 4, "0 <= start <= end"),
    "three_offsets": ({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 2]}}, 2, "data_offsets"),
    "entry": ({"a": [1, 2]}, 0, "is not a JSON object"),
    "metadata": ({"__metadata__": {"format": 1}, "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, 1,
                 "__metadata__"),
}


@pytest.mark.parametrize("kind", HEADERS)
def test_a_damaged_header_is_refused_naming_the_file_and_tensor(tmp_path, kind):
    header, data, message = HEADERS[kind]
    (tmp_path / "model.safetensors").write_bytes(safetensors_bytes(header, bytes(data)))
    with pytest.raises(MoePruneError) as e:
        Checkpoint(tmp_path)
    assert message in str(e.value) and "model.safetensors" in str(e.value)
    if kind not in ("trailing", "truncated", "metadata"):
        assert "'a'" in str(e.value) or "'b'" in str(e.value)


def test_headers_that_are_not_json_objects_are_refused(tmp_path):
    for text in (b"[1, 2]", b'"abc"', b'{"a": 1, "a": 2}', b"\xff\xfe{}"):
        (tmp_path / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text)
        with pytest.raises(MoePruneError, match="unreadable safetensors header|not a JSON object"):
            Checkpoint(tmp_path)


@pytest.mark.parametrize("index", [[], {"weight_map": []}, {"weight_map": {"a": 3}}, {"weight_map": {"a": None}}])
def test_an_index_whose_weight_map_is_not_names_to_files_is_refused(tmp_path, index):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MoePruneError, match="weight_map"):
        Checkpoint(tmp_path)


def test_files_written_by_the_safetensors_library_pass(tmp_path):
    from safetensors.torch import save_file
    tensors = {"e": torch.zeros(0, 3), "b": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
               "i": torch.tensor([1, 2], dtype=torch.int64), "s": torch.tensor(1.5)}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt", "note": "x"})
    ckpt = Checkpoint(tmp_path)
    assert all(torch.equal(ckpt.get(k), v) for k, v in tensors.items())
    assert ckpt.metadata["model.safetensors"] == {"format": "pt", "note": "x"}


def test_atomic_folder_never_replaces_a_foreign_folder(tmp_path):
    from moeprune.atomic import AtomicFolder
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(MoePruneError, match="did not write"), AtomicFolder(out, overwrite=True):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    out2 = tmp_path / "out2"
    with pytest.raises(MoePruneError, match="did not write.*kept in") as e, AtomicFolder(out2, overwrite=True) as tmp:
        (tmp / "weights.bin").write_bytes(b"w")
        out2.mkdir()                                            # someone else's folder appears meanwhile
        (out2 / "precious.txt").write_text("mine")
    assert (out2 / "precious.txt").read_text() == "mine" and (tmp / "weights.bin").exists()
    assert str(tmp) in str(e.value)
