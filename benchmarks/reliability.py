"""Bad input and faults, tried the way a user meets them: the message, the exit status, and what was left.

    python -m benchmarks.reliability [--md FILE] [--json docs/data/reliability.json] [--big-text-mb 2048]
    python -m benchmarks.reliability --only-big-text --big-text-mb 2048        (the 2 GB calibration text alone)

Each case builds its input in a temporary folder (copies of the embedded demo-mixtral, tiny models of the
transformers families, damaged files), runs `moeprune prune ...` in a subprocess, and records the last
line of stderr, the exit status, whether an output or a temporary folder was left, and whether the input
folder is byte-identical afterwards (and, for folders that ship code, that the code never ran). The signal
cases send SIGINT/SIGTERM to a running prune (and time how long it takes to stop); the full-disk case writes
--out to a small tmpfs (needs root; skipped with a note otherwise) and fills it mid-run; the big-text case
calibrates on a generated .txt of --big-text-mb MiB (default 256, a stand-in for 2 GB) and records the peak
memory of the run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moeprune import demo
from moeprune.tiny import tiny_model

MOEPRUNE = str(Path(sys.executable).parent / "moeprune")
QUICK = ["--calib", "random", "--samples", "4", "--seq-len", "32", "--quiet", "--no-eval"]


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def demo_copy(work: Path, name: str = "model") -> Path:
    dst = work / name
    shutil.copytree(demo.model_path("demo-mixtral"), dst)
    return dst


def left_over(out: Path) -> tuple[bool, list[str]]:
    """Whether --out exists, and what else of the run lies beside it (temporary folders, error logs)."""
    if not out.parent.is_dir():
        return False, []
    beside = sorted(p.name for p in out.parent.iterdir()
                    if p.name.startswith(f".{out.name}.tmp-") or p.name == f"{out.name}.moeprune-error.log")
    return out.exists(), beside


def _default_sigint() -> None:
    """In the child: Ctrl-C acts as in a terminal even when this benchmark runs in the background (where
    SIGINT is ignored, and an ignored signal stays ignored in every process started from it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_case(name: str, argv: list[str], model: Path | None, out: Path, expect_ok: bool = False,
             interrupt: tuple[int, float] | None = None, during=None, stdin: str | None = None, expect: int | None = None,
             check=None) -> dict:
    """One command as a user runs it. `expect`: the exit status that counts as right (default 0 with expect_ok,
    else 2); `check(row) -> (ok, note)`: a case's own extra condition (e.g. the folder's code never ran)."""
    before = digest(model) if model is not None and model.exists() else None
    expect = expect if expect is not None else (0 if expect_ok else 2)
    start = time.monotonic()
    proc = subprocess.Popen([MOEPRUNE, *argv], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            preexec_fn=_default_sigint)
    stopped_after = None
    if interrupt is not None:
        signum, delay = interrupt
        while not left_over(out)[1] and proc.poll() is None and time.monotonic() - start < 300:
            time.sleep(0.02)                # the signal comes once the run is writing its temporary folder
        time.sleep(delay)
        mid_write = bool(left_over(out)[1])
        sent = time.monotonic()
        proc.send_signal(signum)
    elif during is not None:
        mid_write = during(out)
    else:
        mid_write = None
    _, err = proc.communicate(input=stdin, timeout=3600)
    if interrupt is not None:
        stopped_after = round(time.monotonic() - sent, 2)
    exists, temps = left_over(out)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    message = next((line for line in reversed(lines) if line.startswith("moeprune")), lines[-1] if lines else "")
    warned = " / ".join(line for line in lines if line.startswith("moeprune: warning"))
    message = warned if warned and proc.returncode == 0 else message
    row = {"case": name, "command": "moeprune " + " ".join(argv), "exit": proc.returncode, "message": message,
           "output_left": exists, "temporary_left": temps, "input_unchanged": None if before is None else
           digest(model) == before, "mid_write_when_stopped": mid_write, "traceback": "Traceback" in err,
           "seconds": round(time.monotonic() - start, 1)}
    if stopped_after is not None:
        row["stopped_after_s"] = stopped_after
    row["ok"] = proc.returncode == expect and not temps and exists == (expect == 0) \
        and row["input_unchanged"] in (None, True) and not row["traceback"]
    if check is not None:
        good, note = check(row)
        row["ok"] = row["ok"] and good
        if note:
            row["message"] = f"{row['message']} [{note}]"
    return row


def add_custom_code(folder: Path, model_type: str, architectures: list[str]) -> Path:
    """A model folder that ships its own code: importing either module would write MARKER beside the folder."""
    marker = folder.parent / f"{folder.name}-CODE-RAN"
    code = f"from pathlib import Path\nPath({str(marker)!r}).write_text('the folder code ran')\n"
    (folder / "configuration_x.py").write_text(code + "from transformers import PretrainedConfig\n"
                                               "class XConfig(PretrainedConfig):\n    model_type = 'x'\n")
    (folder / "modeling_x.py").write_text(code + "class XForCausalLM:\n    pass\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, architectures=architectures,
                  auto_map={"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return marker


def never_ran(marker: Path):
    return lambda row: (not marker.exists(), "the folder's code never ran" if not marker.exists() else "CODE RAN")


def safetensors_bytes(header, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def cases(work: Path) -> list[dict]:
    rows = []
    out = work / "out"

    def fresh():
        if out.exists():
            shutil.rmtree(out)

    # tokenizer-less folder: saved, evaluation skipped with a note
    bare = work / "bare-qwen2"
    tiny_model("qwen2_moe").save_pretrained(bare)
    fresh()
    row = run_case("Qwen2-MoE folder without tokenizer files, evaluation on", ["prune", str(bare), "--keep", "6",
                   "--out", str(out), "--calib", "random", "--samples", "2", "--seq-len", "16", "--quiet"],
                   bare, out, expect_ok=True)
    note = json.loads((out / "report.json").read_text()).get("evaluation_note") if out.exists() else None
    row["message"] = f"exit 0; report.json: evaluation_note = {note!r}"
    rows.append(row)

    # damaged checkpoints
    model = demo_copy(work, "truncated")
    f = model / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-4096])
    fresh()
    rows.append(run_case("one safetensors shard truncated", ["prune", str(model), "--keep", "6", "--out", str(out),
                                                              *QUICK], model, out))
    model = demo_copy(work, "nan")
    weights = load_file(model / "model.safetensors")
    key = "model.layers.2.block_sparse_moe.experts.5.w1.weight"
    weights[key] = weights[key] * float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    fresh()
    rows.append(run_case("one expert weight set to NaN", ["prune", str(model), "--keep", "6", "--out", str(out),
                                                           *QUICK], model, out))
    model = demo_copy(work, "badconfig")
    (model / "config.json").write_text('{"model_type": "mixtral", "hidden_size": 256,')
    fresh()
    rows.append(run_case("config.json that does not parse", ["prune", str(model), "--keep", "6", "--out", str(out),
                                                              *QUICK], model, out))
    dense = work / "dense-llama"
    from transformers import LlamaConfig, LlamaForCausalLM
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=1, num_key_value_heads=1, head_dim=64)).save_pretrained(dense)
    fresh()
    rows.append(run_case("a folder of non-MoE weights (Llama)", ["prune", str(dense), "--keep", "2", "--out",
                                                                  str(out), *QUICK], dense, out))

    # calibration text
    model = demo_copy(work, "model")
    texts = {"calibration .txt that is not UTF-8": ("latin1.txt", "Caf\xe9 au lait.\n\nUne phrase.\n".encode("latin1")),
             "calibration .jsonl with a malformed line": ("bad.jsonl", b'{"text": "one"}\n{"text": "two"\n'),
             "empty calibration file": ("empty.txt", b"\n\n")}
    for case, (fname, data) in texts.items():
        (work / fname).write_bytes(data)
        fresh()
        rows.append(run_case(case, ["prune", str(model), "--keep", "6", "--out", str(out), "--calib",
                                    str(work / fname), "--quiet", "--no-eval"], model, out))

    # a plan and a stats cache from another model
    other = work / "other"
    tiny_model("mixtral", num_experts=16).save_pretrained(other)
    fresh()
    subprocess.run([MOEPRUNE, "prune", str(other), "--keep", "6", "--out", str(work / "other-out"), *QUICK],
                   check=True, capture_output=True)
    rows.append(run_case("a plan.json from another model", ["prune", str(model), "--plan",
                         str(work / "other-out" / "plan.json"), "--out", str(out), "--quiet", "--no-eval"], model, out))
    cache = work / "cache"
    subprocess.run([MOEPRUNE, "prune", str(other), "--keep", "6", "--out", str(work / "other-out2"), "--stats-cache",
                    str(cache), *QUICK], check=True, capture_output=True)
    fresh()
    row = run_case("a stats cache from another model", ["prune", str(model), "--keep", "6", "--out", str(out),
                   "--stats-cache", str(cache), *QUICK], model, out, expect_ok=True)
    rows.append(row)

    rows += security_cases(work, model, out, fresh)
    rows += input_cases(work, model, out, fresh)

    # interrupted runs: a slower prune (diverse, demo calibration) so that each signal lands mid-run
    slow = ["prune", str(model), "--method", "diverse", "--keep", "6", "--out", str(out), "--samples", "64",
            "--seq-len", "256", "--quiet"]
    for case, sig, delay in (("Ctrl-C during calibration (SIGINT 1 s into the run's temporary folder)", signal.SIGINT, 1.0),
                             ("Ctrl-C later (SIGINT 8 s into it)", signal.SIGINT, 8.0),
                             ("SIGTERM later (8 s into it)", signal.SIGTERM, 8.0)):
        fresh()
        rows.append(run_case(case, slow, model, out, interrupt=(sig, delay), expect=130 if sig == signal.SIGINT else 143))
    heavy = ["prune", str(model), "--method", "diverse", "--keep", "6", "--out", str(out), "--calib", "random",
             "--samples", "64", "--seq-len", "256", "--sample-tokens", "4096", "--self-calib", "0", "--quiet", "--no-eval"]
    for delay in (0.5, 2.0, 5.0):
        fresh()
        row = run_case(f"SIGTERM timing: {delay} s into the work of a heavy prune (sample-tokens 4096)", heavy, model,
                       out, interrupt=(signal.SIGTERM, delay), expect=143,
                       check=lambda r: (r["stopped_after_s"] < 10, f"stopped {r['stopped_after_s']} s after the signal"))
        rows.append(row)
    # a killed run's stray folder, removed by the next run
    fresh()
    proc = subprocess.Popen([MOEPRUNE, *slow], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    start = time.monotonic()
    while not left_over(out)[1] and proc.poll() is None and time.monotonic() - start < 300:
        time.sleep(0.02)
    time.sleep(2)
    proc.kill()
    proc.wait()
    stray = left_over(out)[1]
    row = run_case("SIGKILL, then the same command again", ["prune", str(model), "--keep", "6", "--out", str(out),
                   *QUICK], model, out, expect_ok=True)
    row["message"] = f"the killed run left {stray}; the next run removed it, exit {row['exit']}"
    rows.append(row)
    rows.append(full_disk(work, model))
    return rows


def security_cases(work: Path, model: Path, out: Path, fresh) -> list[dict]:
    """A model folder is data: its code never runs; nothing is written inside the input; names stay inside it."""
    rows = []
    custom = demo_copy(work, "custom")
    marker = add_custom_code(custom, "xmoe", ["XForCausalLM"])
    for command in ("info", "prune"):
        fresh()
        argv = [command, str(custom)] + (["--keep", "6", "--out", str(out), *QUICK] if command == "prune" else [])
        rows.append(run_case(f"custom-code folder (auto_map), 'y' on stdin: {command}", argv, custom, out,
                             stdin="y\n" * 4, check=never_ran(marker)))
    kimi = work / "kimi"
    tiny_model("deepseek_v3").save_pretrained(kimi)
    kimi_marker = add_custom_code(kimi, "kimi_k2", ["DeepseekV3ForCausalLM"])
    fresh()
    rows.append(run_case("Kimi-K2 style folder (own model type and code, a transformers class in architectures)",
                         ["prune", str(kimi), "--keep", "6", "--out", str(out), *QUICK], kimi, out, expect_ok=True,
                         stdin="y\n", check=never_ran(kimi_marker)))
    for flag, value in (("--out", model / "pruned"), ("--plan-out", model / "plan.json"),
                        ("--stats-cache", model / "stats")):
        fresh()
        argv = ["prune", str(model), "--keep", "6", *QUICK] + (["--out", str(out)] if flag != "--out" else [])
        rows.append(run_case(f"{flag} inside the input folder", argv + [flag, str(value)], model, out))
    foreign = work / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    rows.append(run_case("--overwrite on a folder moeprune did not write", ["prune", str(model), "--keep", "6", "--out",
                         str(foreign), "--overwrite", *QUICK], model, foreign / "never",
                         check=lambda r: ((foreign / "thesis.tex").read_text() == "years of work"
                                          and sorted(os.listdir(foreign)) == ["thesis.tex"], "the folder is untouched")))
    good = safetensors_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8))
    (work / "outside.safetensors").write_bytes(good)
    for case, name in (("an index naming a ../ shard", "../outside.safetensors"),
                       ("an index naming an absolute shard path", str(work / "outside.safetensors"))):
        folder = demo_copy(work, f"shard-{len(rows)}")
        weights = folder / "model.safetensors"
        weights.rename(folder / "model-00001-of-00001.safetensors")
        names = load_file(folder / "model-00001-of-00001.safetensors").keys()
        weight_map = {k: "model-00001-of-00001.safetensors" for k in names}
        weight_map[sorted(names)[0]] = name
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        fresh()
        rows.append(run_case(case, ["prune", str(folder), "--keep", "6", "--out", str(out), *QUICK], folder, out))
    headers = {
        "overlapping header offsets": {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                       "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
        "a header that is a list": [1, 2],
        "a header entry without dtype": {"a": {"shape": [2], "data_offsets": [0, 8]}},
        "a header with string offsets": {"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}},
        "a header with negative offsets": {"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}},
    }
    for case, header in headers.items():
        folder = demo_copy(work, f"header-{len(rows)}")
        (folder / "model.safetensors").write_bytes(safetensors_bytes(header, bytes(12)))
        fresh()
        rows.append(run_case(f"safetensors: {case}", ["prune", str(folder), "--keep", "6", "--out", str(out), *QUICK],
                             folder, out))
    for case, text in (("config.json {}", "{}"), ("config.json []", "[]"), ("config.json hidden_size \"abc\"", None)):
        folder = demo_copy(work, f"config-{len(rows)}")
        if text is None:
            config = json.loads((folder / "config.json").read_text())
            config["hidden_size"] = "abc"
            text = json.dumps(config)
        (folder / "config.json").write_text(text)
        fresh()
        rows.append(run_case(case, ["prune", str(folder), "--keep", "6", "--out", str(out), *QUICK], folder, out))
    pickled = work / "pickle-only"
    pickled.mkdir()
    shutil.copy(model / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    fresh()
    rows.append(run_case("a pytorch_model.bin folder (pickle, no safetensors)", ["prune", str(pickled), "--keep", "6",
                         "--out", str(out), *QUICK], pickled, out))
    return rows


def input_cases(work: Path, model: Path, out: Path, fresh) -> list[dict]:
    """Plans, flags and paths a user can get wrong."""
    rows = []
    base_out = work / "base-out"
    subprocess.run([MOEPRUNE, "prune", str(model), "--keep", "6", "--out", str(base_out), *QUICK], check=True,
                   capture_output=True)
    base = json.loads((base_out / "plan.json").read_text())
    layer0 = base["layers"]["0"]

    def with_layer0(**change):
        plan = json.loads(json.dumps(base))
        plan["layers"]["0"].update(change)
        return json.dumps(plan)

    def changed(**change):
        plan = json.loads(json.dumps(base))
        plan.update(change)
        return json.dumps(plan)
    missing = json.loads(json.dumps(base))
    del missing["layers"]["0"]["weights"]
    one = json.loads(json.dumps(base))
    for lp in one["layers"].values():
        lp.update(groups=[list(range(8))], weights=[[0.125] * 8], representatives=[0])
    twice = [layer0["groups"][0] + layer0["groups"][0][:1]] + layer0["groups"][1:]
    plans = {
        "string expert ids": with_layer0(groups=[[str(e) for e in g] for g in layer0["groups"]]),
        "null for a group": with_layer0(groups=[None] + layer0["groups"][1:]),
        "1.0 as an expert id": with_layer0(groups=[[1.0]] + layer0["groups"][1:]),
        "true as an expert id": with_layer0(groups=[[True]] + layer0["groups"][1:]),
        "groups as a number": with_layer0(groups=6),
        "layers as a list": changed(layers=[base["layers"]["0"]]),
        "a missing field (weights)": json.dumps(missing),
        "a top-level array": json.dumps([base]),
        "not JSON": "{\"method\": \"diverse\",",
        "an expert twice in a group": with_layer0(groups=twice, weights=[[1 / len(g)] * len(g) for g in twice]),
        "keeping 1 expert (below top-k 2)": json.dumps(one),
    }
    for case, text in plans.items():
        (work / "plan.json").write_text(text)
        fresh()
        rows.append(run_case(f"plan.json: {case}", ["prune", str(model), "--plan", str(work / "plan.json"), "--out",
                             str(out), "--quiet", "--no-eval"], model, out))
    qwen = work / "qwen3"
    tiny_model("qwen3_moe", num_experts=8).save_pretrained(qwen)
    subprocess.run([MOEPRUNE, "prune", str(qwen), "--keep", "6", "--out", str(work / "qwen3-out"), *QUICK], check=True,
                   capture_output=True)
    fresh()
    rows.append(run_case("a Qwen3-MoE plan applied to a Mixtral", ["prune", str(model), "--plan",
                         str(work / "qwen3-out" / "plan.json"), "--out", str(out), "--quiet", "--no-eval"], model, out))
    fresh()
    rows.append(run_case("--plan with --keep and --method", ["prune", str(model), "--plan", str(base_out / "plan.json"),
                         "--keep", "6", "--method", "frequency", "--out", str(out), "--quiet", "--no-eval"], model, out))
    flags = {"--samples 0": ["--samples", "0"], "--batch-size 0": ["--batch-size", "0"],
             "--sample-tokens 0": ["--sample-tokens", "0"], "--seq-len 100000": ["--seq-len", "100000"],
             "--tau 0": ["--tau", "0"], "--device tpu9": ["--device", "tpu9"]}
    if not torch.cuda.is_available():
        flags["--device cuda without a GPU"] = ["--device", "cuda"]
    for case, extra in flags.items():
        fresh()
        rows.append(run_case(case, ["prune", str(model), "--keep", "6", "--out", str(out), *QUICK, *extra], model, out))
    fresh()
    rows.append(run_case("--out \"\"", ["prune", str(model), "--keep", "6", "--out", "", *QUICK], model, out))
    rows.append(run_case("read-only --out (/proc/moeprune-out)", ["prune", str(model), "--keep", "6", "--out",
                         "/proc/moeprune-out", *QUICK], model, Path("/proc/moeprune-out")))
    fresh()
    rows.append(run_case("--stats-cache equal to --out", ["prune", str(model), "--keep", "6", "--out", str(out),
                         "--stats-cache", str(out), *QUICK], model, out))
    fresh()
    rows.append(run_case("--plan-out naming a folder", ["prune", str(model), "--keep", "6", "--out", str(out),
                         "--plan-out", str(work), *QUICK], model, out))
    cache = work / "tampered-cache"
    subprocess.run([MOEPRUNE, "prune", str(model), "--keep", "6", "--out", str(work / "cache-out"), "--stats-cache",
                    str(cache), *QUICK], check=True, capture_output=True)
    layer = sorted(cache.glob("layer-*.safetensors"))[0]
    data = bytearray(layer.read_bytes())
    data[-5] ^= 0xFF
    layer.write_bytes(bytes(data))
    fresh()
    rows.append(run_case("a tampered --stats-cache (one byte of a layer file changed)", ["prune", str(model), "--keep",
                         "6", "--out", str(out), "--stats-cache", str(cache), *QUICK], model, out, expect_ok=True,
                         check=lambda r: ("is not used" in r["message"], "")))
    flat = demo_copy(work, "zero-layers")
    config = json.loads((flat / "config.json").read_text())
    config["num_hidden_layers"] = 0
    (flat / "config.json").write_text(json.dumps(config))
    rows.append(run_case("eval on a config with 0 layers", ["eval", str(flat), "--quiet", "--max-tokens", "64"], flat,
                         work / "no-output"))
    return rows


def big_text_case(work: Path, model: Path, out: Path, megabytes: int) -> dict:
    """Calibration on a generated .txt of `megabytes` MiB: read only as far as needed (peak memory recorded)."""
    path = work / "big.txt"
    with open(path, "w") as f:
        n = 0
        while f.tell() < megabytes << 20:
            f.write("".join(f"Paragraph {n + i} of a very large calibration file. It says the same kind of thing "
                            f"again and again, numbered {n + i}.\n\n" for i in range(1000)))
            n += 1000
    if out.exists():
        shutil.rmtree(out)
    argv = ["prune", str(model), "--keep", "6", "--out", str(out), "--calib", str(path), "--samples", "64",
            "--seq-len", "256", "--self-calib", "0", "--quiet", "--no-eval"]
    before = digest(model)
    start = time.monotonic()
    proc = subprocess.Popen([MOEPRUNE, *argv], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - start
    exists, temps = left_over(out)
    warned = " / ".join(line for line in err.splitlines() if line.startswith("moeprune"))
    size = path.stat().st_size
    path.unlink()
    row = {"case": f"calibration on a {size / 2**20:,.0f} MiB .txt (stand-in for 2 GB: --big-text-mb 2048)",
           "command": "moeprune " + " ".join(argv), "exit": proc.returncode,
           "message": f"{warned or 'no message'} [peak memory {usage.ru_maxrss / 1024:,.0f} MiB, {seconds:.0f} s]",
           "output_left": exists, "temporary_left": temps, "input_unchanged": digest(model) == before,
           "peak_rss_mib": round(usage.ru_maxrss / 1024), "seconds": round(seconds, 1), "text_bytes": size,
           "traceback": "Traceback" in err}
    row["ok"] = proc.returncode == 0 and exists and not temps and row["input_unchanged"] and not row["traceback"] \
        and usage.ru_maxrss * 1024 < size + (2 << 30)
    return row


def full_disk(work: Path, model: Path) -> dict:
    """--out on a 96 MiB tmpfs: enough for the up-front check, then filled while the layers are written."""
    mnt = work / "small-disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mnt)]).returncode:
        return {"case": "full disk while writing", "message": "skipped: mounting a tmpfs needs root", "ok": None}
    try:
        out = mnt / "out"

        def fill(out: Path) -> bool:
            for _ in range(600):
                if left_over(out)[1]:
                    break
                time.sleep(0.05)
            subprocess.run(["dd", "if=/dev/zero", f"of={mnt / 'filler'}", "bs=1M"], capture_output=True)
            return bool(left_over(out)[1])
        argv = ["prune", str(model), "--method", "diverse", "--keep", "6", "--out", str(out), "--samples", "64",
                "--seq-len", "256", "--quiet", "--no-eval"]
        return run_case("full disk while writing (tmpfs filled mid-run)", argv, model, out, during=fill)
    finally:
        subprocess.run(["umount", str(mnt)])


def markdown(rows: list[dict]) -> str:
    lines = ["| case | exit | what the user sees (stderr) | output / left beside it | input unchanged | as expected |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.get("ok") is None and "exit" not in r:
            lines.append(f"| {r['case']} | - | {r['message']} | - | - | - |")
            continue
        left = f"{'yes' if r['output_left'] else 'no'} / {', '.join(r['temporary_left']) or 'none'}"
        msg = re.sub(r"/tmp/reliability-[^/ ]+", "/tmp/case", r["message"]).replace("|", "\\|")
        lines.append(f"| {r['case']} | {r['exit']} | {msg} | {left} | {r['input_unchanged']} | "
                     f"{'yes' if r['ok'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--md", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--big-text-mb", type=int, default=256, help="size of the generated calibration text")
    parser.add_argument("--only-big-text", action="store_true", help="run only the big-text case")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        if args.only_big_text:
            rows = [big_text_case(Path(tmp), demo_copy(Path(tmp), "model"), Path(tmp) / "out", args.big_text_mb)]
        else:
            rows = cases(Path(tmp))
            rows.append(big_text_case(Path(tmp), Path(tmp) / "model", Path(tmp) / "out", args.big_text_mb))
    table = markdown(rows)
    print(table)
    if args.md:
        args.md.write_text(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    bad = [r["case"] for r in rows if r.get("ok") is False]
    if bad:
        raise SystemExit(f"not as expected: {bad}")


if __name__ == "__main__":
    main()
