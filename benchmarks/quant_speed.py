"""Time MXFP4 (and FP8) requantization of one merged expert at GPT-OSS sizes, against an earlier revision's quant.py.

A merged expert of a quantized input is quantized again when it is written (quant.Scheme.quantize), then
dequantized once to record its error (hub.CheckpointWriter._quantize). GPT-OSS-20B and -120B both have hidden
2880 and expert width 2880, so one expert's gate_up_proj is [2880, 5760] and its down_proj [2880, 2880] in the
model's layout. Each function runs on seeded gaussian weights (std 0.02), best of --repeat runs, on the threads
torch is given (--threads, default 1); the baseline revision's quant.py is read from git and must give the same
bytes (checked on every tensor timed).

    python -m benchmarks.quant_speed --baseline 4cc4dab [--threads 1] [--repeat 3] [--profile] \
        [--json docs/data/scale/mxfp4-requant.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from moeprune import quant

SHAPES = {"gate_up_proj": (2880, 5760), "down_proj": (2880, 2880)}
REPO = Path(__file__).resolve().parents[1]


def baseline_module(rev: str):
    """src/moeprune/quant.py at git revision `rev`, imported as moeprune.quant_<rev> (its relative imports resolve
    to today's package: it only needs MoePruneError, DTYPES and Checkpoint)."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:src/moeprune/quant.py"], check=True,
                            capture_output=True, text=True).stdout
    name = f"moeprune.quant_{rev}"
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    module.__package__ = "moeprune"
    sys.modules[name] = module
    exec(compile(source, f"{rev}:src/moeprune/quant.py", "exec"), module.__dict__)
    return module


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else ():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def best_of(fn, repeat: int) -> tuple[float, object]:
    result, times = None, []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def same(a, b) -> bool:
    if isinstance(a, tuple | list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


def top_ops(fn, rows: int = 8) -> list[dict]:
    """The operators taking the most time in one run of fn (torch's profiler, self CPU time)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 1),
             "share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in events[:rows]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", required=True, help="git revision whose quant.py is the baseline")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="also list the top operators of each MXFP4 quantize")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    old = baseline_module(args.baseline)
    rows = []
    for tensor, shape in SHAPES.items():
        w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.02
        blocks = quant.mxfp4_quantize(w)
        for label, new_fn, old_fn in (
                ("mxfp4_quantize", lambda: quant.mxfp4_quantize(w), lambda: old.mxfp4_quantize(w)),
                ("mxfp4_dequantize (float64, the error check)",
                 lambda: quant.mxfp4_dequantize(*blocks, torch.float64),
                 lambda: old.mxfp4_dequantize(*blocks, torch.float64)),
                ("fp8_quantize 128x128", lambda: quant.fp8_quantize(w, (128, 128)),
                 lambda: old.fp8_quantize(w, (128, 128)))):
            t_old, r_old = best_of(old_fn, args.repeat)
            t_new, r_new = best_of(new_fn, args.repeat)
            row = {"tensor": tensor, "shape": list(shape), "function": label, "baseline_s": round(t_old, 4),
                   "now_s": round(t_new, 4), "speedup": round(t_old / t_new, 1), "same_bytes": same(r_old, r_new)}
            if args.profile and label == "mxfp4_quantize":
                row["profile_baseline"], row["profile_now"] = top_ops(old_fn), top_ops(new_fn)
            rows.append(row)
            print(f"{tensor} {shape} {label}: {t_old:.3f} s -> {t_new:.3f} s ({t_old / t_new:.1f}x), "
                  f"same bytes: {row['same_bytes']}", flush=True)
    if not all(r["same_bytes"] for r in rows):
        sys.exit("the output differs from the baseline's")
    if args.json:
        machine = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "threads": args.threads,
                   "torch": torch.__version__}
        args.json.write_text(json.dumps({"command": "python -m benchmarks.quant_speed " + " ".join(sys.argv[1:]),
                                         "baseline": args.baseline, "machine": machine, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
