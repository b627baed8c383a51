"""Peak resident memory of a whole process tree, sampled from /proc (Linux).

    python -m benchmarks.memwatch [--interval 0.1] [--json out.json] -- CMD ARGS...

Runs CMD and, every interval seconds, sums the resident set (RSS, as VmRSS; from /proc/PID/statm) of the process and
all its descendants (found through the parent ids in /proc/*/stat). Pages shared between processes count once per
process, and a peak shorter than the interval can be missed. Prints the peak, writes {"cmd", "exit_code", "wall_s",
"peak_rss_bytes", "peak_rss_gib", "samples": [[t, rss_bytes], ...]} to --json, and exits with CMD's exit code.
From Python: `watch(cmd, interval)` returns the same dict.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, for every process in /proc."""
    kids = defaultdict(list)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:     # exited meanwhile
                continue
            kids[int(stat.rpartition(")")[2].split()[1])].append(int(entry.name))   # comm may hold ") "
    return kids


def tree_rss(pid: int) -> int:
    """Resident bytes of pid and all its descendants."""
    kids, todo, total = _children(), [pid], 0
    while todo:
        p = todo.pop()
        todo += kids.get(p, [])
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError):
            pass
    return total


def watch(cmd: list[str], interval: float = 0.1) -> dict:
    """Run cmd to its end, sampling its tree's RSS every interval seconds."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd)
    samples = []
    while True:
        samples.append((round(time.monotonic() - start, 3), tree_rss(proc.pid)))
        try:
            exit_code = proc.wait(timeout=interval)
            break
        except subprocess.TimeoutExpired:
            pass
    peak = max(rss for _, rss in samples)
    return {"cmd": cmd, "exit_code": exit_code, "wall_s": round(time.monotonic() - start, 3), "peak_rss_bytes": peak,
            "peak_rss_gib": round(peak / 2**30, 3), "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between samples (default 0.1)")
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = parser.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no command given")
    result = watch(cmd, args.interval)
    if args.json:
        args.json.write_text(json.dumps(result) + "\n")
    print(f"memwatch: peak {result['peak_rss_gib']} GiB, {result['wall_s']} s, exit {result['exit_code']}",
          file=sys.stderr)
    sys.exit(result["exit_code"] if result["exit_code"] >= 0 else 128 - result["exit_code"])


if __name__ == "__main__":
    main()
