"""The default method (`auto`) on every family's tiny checkpoint: does it prune, and which candidate does it pick.

    python -m benchmarks.default_every_family [MODEL_TYPE ...] [--json docs/data/default-every-family.json]

Per model type that prunes end to end (docs/data/families.json, tests/test_families.py's tiny models): the tiny
model saved in the hub layout with a character tokenizer, then `moeprune prune` with no --method (auto: the
demo calibration text, a held-out fifth, half the windows written by the model) at keep E / 2. Recorded: the exit
code, seconds, moeprune's warning and error lines, and the candidate auto chose. tests/test_families.py checks
every family with `frequency` (fast); this is the slower check that the default itself runs on each of them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import test_families as TF  # noqa: E402
from conftest import char_tokenizer_files  # noqa: E402

from moeprune.cli import main as moeprune  # noqa: E402


def run(model_type: str) -> dict:
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = TF._model(model_type)
            model.save_pretrained(d / "in")
        char_tokenizer_files(d / "in")
        E = TF.moe_layout(model).layers[0].num_experts
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("always")
            code = moeprune(["prune", str(d / "in"), "--keep", str(E // 2), "--samples", "8", "--seq-len", "32",
                             "--no-eval", "--quiet", "--out", str(d / "out")])
        said = [line for line in err.getvalue().splitlines() if line.startswith("moeprune: ")]
        chosen = None
        if code == 0:
            plan = json.loads((d / "out" / "plan.json").read_text())
            chosen = plan["options"].get("chosen") if plan["method"] == "auto" else plan["method"]
    return {"exit": code, "seconds": round(time.time() - start, 1), "said": said, "chosen": chosen}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("types", nargs="*", help="model types (default: every one that prunes end to end)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    types = args.types or [t for t in TF.WORKING if t not in TF.NOT_YET]
    results = {}
    for t in types:
        results[t] = run(t)
        r = results[t]
        print(f"{t:28s} exit {r['exit']}  {r['seconds']:6.1f} s  {r['chosen']}  {' | '.join(r['said'])[:200]}",
              flush=True)
    failed = [t for t, r in results.items() if r["exit"] != 0]
    print(f"\n{len(results) - len(failed)} of {len(results)} pruned by the default" +
          (f"; not: {', '.join(failed)}" if failed else ""))
    if args.json:
        args.json.write_text(json.dumps({"command": "python -m benchmarks.default_every_family", "results": results},
                                        indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
