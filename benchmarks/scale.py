"""Pruning checkpoints larger than memory: peak resident memory, time per stage, and the output checked.

    python -m benchmarks.make_checkpoint olmoe-1b-7b /work/bigckpt/olmoe-1b-7b        # 12.9 GiB, bf16
    python -m benchmarks.scale /work/bigckpt/olmoe-1b-7b --keep 48 --out /work/bigckpt/olmoe-48 \
        --json docs/data/scale/olmoe-1b-7b.json

Runs, each in its own process under benchmarks/memwatch.py (RSS of the whole process tree from /proc):
  1. `moeprune prune CKPT --method M --keep K --calib random --samples S --seq-len L --no-eval --out OUT`;
  2. one plain streamed forward over the same tokens (`scale.py forward`): every decoder layer read from
     the shards and run once, then the logits: the least any layer-by-layer pass over this checkpoint costs;
then checks the output: every tensor's name, shape and dtype against the input's (experts >= K absent,
expert axes cut to K), the untouched tensors byte-identical (sha256 of the raw bytes), config.json
differing from the input's only in the expert count. Prints a Markdown row and writes --json. As root, the
page cache is dropped before each run, so both read the checkpoint from disk.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.memwatch import watch

from moeprune.engine import run, score
from moeprune.sources import CheckpointSource
from moeprune.steps import Evaluate
from moeprune.text import calibration_tokens
from moeprune.hub import output_layout
from moeprune.shards import Checkpoint


def streamed_forward(ckpt: Path, samples: int, seq_len: int, batch_size: int, dtype: str = "float32") -> float:
    """Seconds for one forward of `samples` random windows through the checkpoint, a layer at a time."""
    start = time.perf_counter()
    source = CheckpointSource(ckpt, "cpu", getattr(torch, dtype))
    ids = calibration_tokens("random", None, samples, seq_len, 0, vocab_size=source.model.config.vocab_size)
    step = Evaluate(list(ids.split(batch_size)))
    run(source, [step], progress=False)
    score(source, [(step.before, lambda k, logits: None)])
    return time.perf_counter() - start


def check_output(src: Path, out: Path, keep: int) -> dict:
    """Names, shapes and dtypes against the planned output; untouched tensors byte-identical; config: only the
    count. The plan is moeprune.hub.output_layout, from the input's key map (transformers' conversion tables)."""
    source = CheckpointSource(src, "cpu", torch.float32)                 # headers and the skeleton only
    planned = output_layout(source.ckpt, source.hub, source.layout, keep, source.quant)   # quantized: stored parts
    want = {s.name: s for slots in planned.shards.values() for s in slots}
    a, b = source.ckpt, Checkpoint(out)
    problems, identical = [], 0
    for name in a.tensors:
        if name not in want:
            if name in b:
                problems.append(f"{name}: a dropped expert is still there")
            continue
        if name not in b:
            problems.append(f"{name}: missing")
            continue
        u = b.info(name)
        if tuple(u.shape) != tuple(want[name].shape) or u.dtype != want[name].dtype:
            problems.append(f"{name}: {u.dtype}{list(u.shape)}, expected {want[name].dtype}{list(want[name].shape)}")
        plain = source.quant.parts.get(name, name) if source.quant is not None else name   # a stored part's tensor
        if name not in planned.touched and plain not in planned.touched:
            if hashlib.sha256(a.raw(name)).digest() != hashlib.sha256(b.raw(name)).digest():
                problems.append(f"{name}: untouched but not byte-identical")
            identical += 1
    extra = sorted(set(b.tensors) - set(a.tensors))
    problems += [f"{n}: not in the input" for n in extra]
    diff = [(x, y) for x, y in zip((src / "config.json").read_text().splitlines(),
                                   (out / "config.json").read_text().splitlines()) if x != y]
    return {"tensors_out": len(b.tensors), "untouched_identical": identical, "problems": problems[:20],
            "config_changed_lines": diff, "files_out": sorted(p.name for p in out.iterdir()),
            "gib_in": round(a.total_bytes() / 2**30, 2), "gib_out": round(b.total_bytes() / 2**30, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("--keep", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--method", default="frequency")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--self-calib", default=None,
                        help="passed to moeprune prune (default: its own, 0.5 when the model fits in memory, else 0)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                        help="compute dtype of both runs (default: prune's own, float32 on the CPU; bfloat16 for a "
                             "layer too large for memory in float32)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep-output", action="store_true", help="do not delete --out afterwards")
    args = parser.parse_args()

    bin_dir = Path(sys.executable).parent
    prune = [str(bin_dir / "moeprune"), "prune", str(args.ckpt), "--method", args.method, "--keep", str(args.keep),
             "--calib", "random", "--samples", str(args.samples), "--seq-len", str(args.seq_len),
             "--batch-size", str(args.batch_size), "--no-eval", "--out", str(args.out), "--overwrite", "--quiet"]
    if args.dtype is not None:
        prune += ["--dtype", args.dtype]
    if args.self_calib is not None:
        prune += ["--self-calib", args.self_calib]
    # this module again, as `-m` from the same working directory as this run (the repository root)
    forward = [sys.executable, "-m", "benchmarks.scale", "forward", str(args.ckpt), str(args.samples),
               str(args.seq_len), str(args.batch_size), args.dtype or "float32"]
    result = {"ckpt": str(args.ckpt), "method": args.method, "keep": args.keep, "samples": args.samples,
              "seq_len": args.seq_len, "dtype": args.dtype or "float32",
              "machine": machine()}
    result["page_cache"] = "dropped before each run" if drop_page_cache() else "as it was (not root)"
    result["prune"] = {k: v for k, v in watch(prune, 0.2).items() if k != "samples"}
    if result["prune"]["exit_code"] != 0:
        raise SystemExit(f"prune failed: {result['prune']}")
    report = json.loads((args.out / "report.json").read_text())
    result["prune"]["stages_s"] = report["stages"]["seconds"]
    result["self_calib"] = report["calibration"]["self_calib"]          # what the prune used
    drop_page_cache()
    result["forward"] = {k: v for k, v in watch(forward, 0.2).items() if k != "samples"}
    result["check"] = check_output(args.ckpt, args.out, args.keep)
    p, f = result["prune"], result["forward"]
    result["prune_over_forward"] = round(p["wall_s"] / f["wall_s"], 2)
    print(f"| {args.ckpt.name} | {args.method} keep {args.keep} | {p['peak_rss_gib']} GiB | {p['wall_s']:.0f} s "
          f"| {f['peak_rss_gib']} GiB | {f['wall_s']:.0f} s | {result['prune_over_forward']} | "
          f"{'ok' if not result['check']['problems'] else result['check']['problems'][:3]} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if not args.keep_output:
        subprocess.run(["rm", "-rf", str(args.out)], check=True)


def drop_page_cache() -> bool:
    """Both runs read the checkpoint from disk: otherwise whichever runs second finds it (or the other's
    output) in the page cache, and the comparison measures the cache."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    return {"cpu": cpu, "cores": torch.get_num_threads(), "ram_gib": round(mem / 2**30, 1),
            "torch": torch.__version__}


if __name__ == "__main__":
    if sys.argv[1:2] == ["forward"]:
        seconds = streamed_forward(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
                                   *sys.argv[6:7])
        print(f"streamed forward: {seconds:.1f} s")
    else:
        main()
