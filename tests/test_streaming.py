"""The streamed prune: a checkpoint folder read one layer at a time, written shard by shard.

For every family, a checkpoint in the hub's spelling (config.json keys as the hub has them, tokenizer files
written by hand, per-expert weights, several shards) is pruned; the output is the input folder with only
what pruning changes changed, and its tensors are bit-identical to the same plan applied in memory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ALL_FAMILIES, char_tokenizer_files, make
from moeprune import api
from moeprune.arch import moe_layout
from moeprune.checkpoint import load
from moeprune.cli import main
from moeprune.methods import get_method
from moeprune.shards import Checkpoint
from moeprune.surgery import apply_plan
from moeprune.calibration import collect
from moeprune.text import calibration_tokens

# transformers 5 spelling -> the hub's (what transformers 4.x, converters and servers read)
HUB_KEYS = {"dtype": "torch_dtype"}
EXPERT_KEY = {"qwen3_moe": "num_experts", "mixtral": "num_local_experts"}


def hub_config_text(model) -> str:
    """config.json as the hub spells it: torch_dtype, rope_theta, each family's expert-count key."""
    d = model.config.to_dict()
    rope = d.pop("rope_parameters", None) or {}
    out = {HUB_KEYS.get(k, k): v for k, v in d.items() if k not in ("num_local_experts", "num_experts")}
    field = moe_layout(model).family.n_experts_field
    out[EXPERT_KEY.get(model.config.model_type, field)] = getattr(model.config, field)
    if rope:
        out["rope_theta"] = rope.get("rope_theta", 10000.0)
    out["torch_dtype"] = str(model.dtype).replace("torch.", "")
    return json.dumps(dict(sorted(out.items())), indent=2) + "\n"


def write_hub_folder(path: Path, family: str, dtype=torch.bfloat16, shard: str | None = "40KB") -> Path:
    model = make(family).to(dtype)
    model.save_pretrained(path, max_shard_size=shard) if shard else model.save_pretrained(path)
    (path / "config.json").write_text(hub_config_text(model))
    char_tokenizer_files(path)
    (path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a tiny model\n")
    (path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    return path


def digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(folder)
    return {name: ckpt.get(name) for name in ckpt.tensors}


def prune(src: Path, out: Path, method: str = "frequency", keep: int = 6, **kw):
    return api.prune(api.PruneConfig(model=str(src), method=method, keep=keep, out=str(out), calib="random",
                                     samples=4, seq_len=16, quiet=True, no_eval=True, **kw))


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_output_is_the_input_folder_with_only_the_expert_count_changed(family, tmp_path):
    src = write_hub_folder(tmp_path / "src", family)
    before = digest(src)
    result = prune(src, tmp_path / "out", method="diverse", keep=5)
    out = tmp_path / "out"
    assert digest(src) == before                                          # the input is untouched
    # config.json: the input's text, only the expert count (and a top-k/group value that must follow) edited
    a, b = (src / "config.json").read_text().splitlines(), (out / "config.json").read_text().splitlines()
    changed = [(x, y) for x, y in zip(a, b) if x != y]
    assert len(a) == len(b) and changed
    n_key = EXPERT_KEY.get(family, moe_layout(make(family)).family.n_experts_field)
    assert any(f'"{n_key}": 8' in x and f'"{n_key}": 5' in y for x, y in changed)
    edited = {"n_group", "topk_group"}                                     # 5 experts cannot form 2 groups
    assert all(x.split(":")[0].strip().strip('"') in {n_key} | edited for x, _ in changed), changed
    # every other non-weight file byte for byte
    after = digest(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "README.md", "chat_template.jinja",
                 "generation_config.json"):
        assert after[name] == before[name], name
    # the input's shards and index, the hub's names, experts >= 5 gone, untouched tensors byte-identical
    inp, got = Checkpoint(src), Checkpoint(out)
    assert got.files == inp.files and (out / "model.safetensors.index.json").exists()
    reference = make(family, num_experts=5)
    reference.save_pretrained(tmp_path / "ref")
    assert sorted(got.tensors) == sorted(Checkpoint(tmp_path / "ref").tensors)
    expert_or_router = {n for n in got.tensors if ".experts." in n or got.info(n).shape != inp.info(n).shape}
    assert expert_or_router
    for name in got.tensors:
        assert got.info(name).dtype == inp.info(name).dtype == "BF16"
        if name not in expert_or_router and "gate" not in name.split(".")[-2] and "router" not in name:
            assert got.raw(name) == inp.raw(name), name
    # the same plan applied in memory gives the same tensors, bit for bit in the saved dtype
    in_memory = load(str(src)).model
    apply_plan(in_memory, moe_layout(in_memory), result.plan)
    in_memory.to(torch.bfloat16).save_pretrained(tmp_path / "mem")
    mem = tensors(tmp_path / "mem")
    for name, t in tensors(out).items():
        assert torch.equal(t, mem[name]), name
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert moe_layout(reloaded).layers[0].num_experts == 5
    assert (out / "img" / "similarity.png").exists()      # kept of the streamed statistics: the plotted CKA


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_streamed_statistics_and_plan_equal_the_in_memory_ones(family, tmp_path):
    src = write_hub_folder(tmp_path / "src", family, dtype=torch.float32, shard=None)
    loaded = load(str(src))
    layout = moe_layout(loaded.model)
    ids = calibration_tokens("random", None, 4, 16, 0, vocab_size=loaded.model.config.vocab_size)
    stats = collect(loaded.model, layout, ids, sample_tokens=512, progress=False)
    for method in ("frequency", "naee", "diverse"):
        expected = get_method(method).plan(stats, 5)
        streamed = prune(src, tmp_path / method, method=method, keep=5, self_calib=0.0).plan
        for i, lp in expected.layers.items():
            got = streamed.layers[i]
            assert (got.groups, got.weights, got.representatives) == (lp.groups, lp.weights, lp.representatives)


@pytest.mark.parametrize("name", ["demo-mixtral", "demo-fine"])
def test_demo_models_streamed_equal_in_memory(name, tmp_path):
    result = api.prune(api.PruneConfig(model=name, method="diverse", ratio=0.5, out=str(tmp_path / "out"),
                                       samples=4, seq_len=64, quiet=True, no_eval=True))
    in_memory = load(name).model
    apply_plan(in_memory, moe_layout(in_memory), result.plan)
    in_memory.to(torch.bfloat16).save_pretrained(tmp_path / "mem")
    mem = tensors(tmp_path / "mem")
    got = tensors(tmp_path / "out")
    assert sorted(got) == sorted(k for k in mem if k != "lm_head.weight")          # tied: no lm_head in the file
    for k, t in got.items():
        assert torch.equal(t, mem[k]), k
    src = load(name).model.config
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out" / f).read_bytes() == (Path(load(name).path) / f).read_bytes()
    assert src.model_type == json.loads((tmp_path / "out" / "config.json").read_text())["model_type"]


def test_info_on_an_output_folder_names_where_each_kept_expert_came_from(tmp_path, capsys):
    src = write_hub_folder(tmp_path / "src", "mixtral")
    prune(src, tmp_path / "out", method="diverse", keep=5)
    assert main(["info", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "routed experts     [5] per MoE layer" in out and "merged from" in out


@pytest.mark.parametrize("damage,message", [
    ("missing_shard", "not in"),
    ("truncated", "truncated"),
    ("wrong_shape", "its config implies"),
    ("no_config", "no config.json"),
    ("nan", "layers.0.block_sparse_moe.experts.3.w1.weight holds 2048 NaN"),
    ("quantized", "is a quantized checkpoint"),
])
def test_bad_checkpoints_fail_before_writing(damage, message, tmp_path, capsys):
    src = write_hub_folder(tmp_path / "src", "mixtral")
    files = sorted(src.glob("model-*.safetensors"))
    if damage == "missing_shard":
        files[-1].unlink()
    elif damage == "truncated":
        files[0].write_bytes(files[0].read_bytes()[:-100])
    elif damage == "no_config":
        (src / "config.json").unlink()
    elif damage == "quantized":
        config = json.loads((src / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
        (src / "config.json").write_text(json.dumps(config))
    else:
        from safetensors.torch import load_file, save_file
        path = next(f for f in files if any(".experts.3.w1" in k for k in load_file(f)))
        data = load_file(path)
        key = next(k for k in data if ".experts.3.w1" in k)
        data[key] = data[key][:, :-1].contiguous() if damage == "wrong_shape" else data[key] * float("nan")
        save_file(data, path, metadata={"format": "pt"})
    before = digest(src)
    code = main(["prune", str(src), "--keep", "6", "--out", str(tmp_path / "out"), "--calib", "random",
                 "--samples", "2", "--seq-len", "16", "--quiet", "--no-eval"])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert digest(src) == before


def test_a_plan_from_another_model_fails_before_any_layer(tmp_path, capsys):
    src = write_hub_folder(tmp_path / "src", "mixtral")
    other = write_hub_folder(tmp_path / "other", "qwen3_moe")
    plan = prune(other, tmp_path / "o1", keep=6).plan
    for lp in plan.layers.values():
        lp.num_experts = 16                                     # the same layers, another expert count
    plan.save(tmp_path / "plan.json")
    before = digest(src)
    code = main(["prune", str(src), "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "out"),
                 "--quiet", "--no-eval"])
    assert code == 2 and "the plan was made for another model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and digest(src) == before


def test_a_stats_cache_of_other_settings_is_recollected_with_a_warning(tmp_path):
    src = write_hub_folder(tmp_path / "src", "mixtral")
    prune(src, tmp_path / "a", stats_cache=str(tmp_path / "stats"))
    with pytest.warns(UserWarning, match=r"other settings \(seed differ\); they are recollected"):
        prune(src, tmp_path / "b", stats_cache=str(tmp_path / "stats"), seed=1)
    assert json.loads((tmp_path / "stats" / "stats.json").read_text())["calibration"]["seed"] == 1


def test_a_stats_cache_without_weight_similarity_is_recollected_for_it(tmp_path):
    """A streamed run collects no weight similarity unless asked; reusing its cache for --representation weight
    must recollect (it once ended in an internal error)."""
    src = write_hub_folder(tmp_path / "src", "mixtral")
    prune(src, tmp_path / "a", method="diverse", stats_cache=str(tmp_path / "stats"))
    with pytest.warns(UserWarning, match="recollected"):
        result = api.prune(api.PruneConfig(model=str(src), method="diverse", keep=6, out=str(tmp_path / "b"),
                                           calib="random", samples=4, seq_len=16, quiet=True, no_eval=True,
                                           stats_cache=str(tmp_path / "stats")), representation="weight")
    assert result.plan.options["representation"] == "weight" and (tmp_path / "b" / "plan.json").exists()


def test_a_full_disk_while_writing_leaves_nothing(tmp_path, capsys, monkeypatch):
    import errno

    from moeprune.shards import ShardWriter
    src = write_hub_folder(tmp_path / "src", "mixtral")
    calls = []

    def full(self, name, data):
        calls.append(name)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, name, data)
    original = ShardWriter.write
    monkeypatch.setattr(ShardWriter, "write", full)
    code = main(["prune", str(src), "--keep", "6", "--out", str(tmp_path / "out"), "--calib", "random",
                 "--samples", "2", "--seq-len", "16", "--quiet", "--no-eval"])
    assert code == 2 and "no space left on the device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_config_that_does_not_parse_is_named(tmp_path, capsys):
    src = write_hub_folder(tmp_path / "src", "mixtral")
    (src / "config.json").write_text('{"model_type": "mixtral",')
    code = main(["prune", str(src), "--keep", "6", "--out", str(tmp_path / "out"), "--calib", "random", "--no-eval"])
    assert code == 2 and "config.json is not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_evaluation_error_after_pruning_keeps_the_checkpoint(tmp_path, monkeypatch):
    from moeprune.evaluate import Tally
    src = write_hub_folder(tmp_path / "src", "mixtral")
    (tmp_path / "text.txt").write_text("a cat sat on a mat.\n\nthe dog ran to the red ball.\n")

    def broken(self, k, logits):
        raise RuntimeError("out of memory in the evaluation")
    monkeypatch.setattr(Tally, "score", broken)
    with pytest.warns(UserWarning, match="the evaluation failed .*out of memory.*checkpoint is saved"):
        result = api.prune(api.PruneConfig(model=str(src), keep=6, method="frequency", out=str(tmp_path / "out"),
                                           calib="random", samples=2, seq_len=16, quiet=True,
                                           eval_domains=str(tmp_path / "text.txt"), eval_tasks=""))
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert "out of memory" in report["evaluation_error"] and "evaluation" not in report
    assert (out / "model.safetensors.index.json").exists() and result.plan.keep_per_layer()[0] == 6
