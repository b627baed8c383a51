"""Bad input and faults, tried the way a user meets them: the message, the exit status, and what was left.

    python -m benchmarks.reliability [--md docs/RELIABILITY.md] [--json docs/data/reliability.json]

Each case builds its input in a temporary folder (copies of the embedded demo-mixtral, tiny models of the
transformers families, damaged files), runs `moeprune prune ...` in a subprocess, and records the last
line of stderr, the exit status, whether an output or a temporary folder was left, and whether the input
folder is byte-identical afterwards. The signal cases send SIGINT/SIGTERM to a running prune; the full-disk
case writes --out to a small tmpfs (needs root; skipped with a note otherwise) and fills it mid-run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
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
    return out.exists(), sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-"))


def run_case(name: str, argv: list[str], model: Path | None, out: Path, expect_ok: bool = False,
             interrupt: tuple[int, float] | None = None, during=None) -> dict:
    before = digest(model) if model is not None and model.exists() else None
    proc = subprocess.Popen([MOEPRUNE, *argv], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    if interrupt is not None:
        signum, delay = interrupt
        time.sleep(delay)
        mid_write = bool(left_over(out)[1])
        proc.send_signal(signum)
    elif during is not None:
        mid_write = during(out)
    else:
        mid_write = None
    _, err = proc.communicate(timeout=900)
    exists, temps = left_over(out)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    message = next((line for line in reversed(lines) if line.startswith("moeprune")), lines[-1] if lines else "")
    message = " / ".join(line for line in lines if line.startswith("moeprune: warning")) or message
    row = {"case": name, "command": "moeprune " + " ".join(argv), "exit": proc.returncode, "message": message,
           "output_left": exists, "temporary_left": temps, "input_unchanged": None if before is None else
           digest(model) == before, "mid_write_when_stopped": mid_write}
    row["ok"] = (proc.returncode == 0) == expect_ok and not temps and exists == expect_ok \
        and row["input_unchanged"] in (None, True)
    return row


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

    # interrupted runs: a slower prune (diverse, demo calibration) so that each signal lands mid-run
    slow = ["prune", str(model), "--method", "diverse", "--keep", "6", "--out", str(out), "--samples", "64",
            "--seq-len", "256", "--quiet"]
    for case, sig, delay in (("Ctrl-C during calibration (SIGINT at 4 s)", signal.SIGINT, 4.0),
                             ("Ctrl-C while the output is being written (SIGINT at 12 s)", signal.SIGINT, 12.0),
                             ("SIGTERM while the output is being written (at 12 s)", signal.SIGTERM, 12.0)):
        fresh()
        rows.append(run_case(case, slow, model, out, interrupt=(sig, delay)))
    # a killed run's stray folder, removed by the next run
    fresh()
    proc = subprocess.Popen([MOEPRUNE, *slow], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    time.sleep(8)
    proc.kill()
    proc.wait()
    stray = left_over(out)[1]
    row = run_case("SIGKILL, then the same command again", ["prune", str(model), "--keep", "6", "--out", str(out),
                   *QUICK], model, out, expect_ok=True)
    row["message"] = f"the killed run left {stray}; the next run removed it, exit {row['exit']}"
    rows.append(row)
    rows.append(full_disk(work, model))
    return rows


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
    lines = ["| case | exit | what the user sees (stderr) | output / temp folder left | input unchanged |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.get("ok") is None and "exit" not in r:
            lines.append(f"| {r['case']} | - | {r['message']} | - | - |")
            continue
        left = f"{'yes' if r['output_left'] else 'no'} / {', '.join(r['temporary_left']) or 'none'}"
        msg = r["message"].replace("|", "\\|").replace(str(Path(tempfile.gettempdir())), "/tmp")
        lines.append(f"| {r['case']} | {r['exit']} | {msg} | {left} | {r['input_unchanged']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--md", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        rows = cases(Path(tmp))
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
