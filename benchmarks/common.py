"""Shared pieces of the benchmarks: the task-agnostic protocol on the embedded demo data.

Calibration uses a mix that leaves two domains out (UNSEEN); every domain is evaluated on its
held-out shard. For choosing options, each seen domain's calibration shard is split by document
into a calibration part and a validation part, so nothing is tuned on the evaluation shards.
"""

from __future__ import annotations

import copy
import random
import time
from pathlib import Path

import torch

from moeprune import demo
from moeprune.arch import moe_layout
from moeprune.calibration import collect
from moeprune.evaluate.perplexity import domain_perplexity
from moeprune.selfcalib import DEFAULT_SHARE, calibration_windows
from moeprune.surgery import apply_plan

UNSEEN = ["code", "math"]
KEEPS = {"demo-mixtral": [6, 4], "demo-fine": [0.75, 0.5]}     # experts kept: a count, or a fraction of E


def keeps_for(name: str, num_experts: int) -> list[int]:
    """The benchmark's two sparsities for a model, as expert counts (75% and 50% kept unless listed)."""
    return [k if isinstance(k, int) else round(num_experts * k) for k in KEEPS.get(name, [0.75, 0.5])]


def seen_domains() -> list[str]:
    return [d for d in demo.domains("calib") if d not in UNSEEN]


def split_calibration(work: Path, valid_fraction: float = 0.2, seed: int = 0,
                      domains: list[str] | None = None, suffix: str = "") -> tuple[Path, dict[str, Path]]:
    """Write calib<suffix>/<d>.txt and valid<suffix>/<d>.txt for the seen domains, or `domains` (split by
    document, seeded; a domain's split does not depend on which other domains are split with it)."""
    calib, valid = work / f"calib{suffix}", work / f"valid{suffix}"
    calib.mkdir(parents=True, exist_ok=True)
    valid.mkdir(parents=True, exist_ok=True)
    out = {}
    for d in domains or seen_domains():
        docs = [x for x in demo.shard("calib", d).read_text(encoding="utf-8").split("\n\n") if x.strip()]
        idx = list(range(len(docs)))
        random.Random(seed).shuffle(idx)
        cut = max(1, int(len(docs) * valid_fraction))
        (valid / f"{d}.txt").write_text("\n\n".join(docs[i] for i in sorted(idx[:cut])), encoding="utf-8")
        (calib / f"{d}.txt").write_text("\n\n".join(docs[i] for i in sorted(idx[cut:])), encoding="utf-8")
        out[d] = valid / f"{d}.txt"
    return calib, out


def split_all(work: Path) -> tuple[Path, dict[str, Path]]:
    """The same split over all seven calibration shards, code and math included (calib-all/, valid-all/)."""
    return split_calibration(work, domains=demo.domains("calib"), suffix="-all")


def domain_out_folds(work: Path, calib: Path, domains: list[str] | None = None,
                     name: str = "folds") -> dict[str, Path]:
    """For each domain d (default: the seen ones), a calibration folder holding the other domains' parts.

    Validating a configuration calibrated without d on d's validation part simulates, on calibration
    data alone, what the benchmark asks of a task-agnostic method: to hold up on domains it never saw.
    """
    domains = domains or seen_domains()
    folds = {}
    for d in domains:
        fold = work / name / d
        fold.mkdir(parents=True, exist_ok=True)
        for other in domains:
            if other != d:      # rewritten every time, so a fold never holds another split's text
                (fold / f"{other}.txt").write_bytes((calib / f"{other}.txt").read_bytes())
        folds[d] = fold
    return folds


def eval_domains() -> dict[str, Path]:
    return {d: demo.shard("eval", d) for d in demo.domains("eval")}


def stats_for(model, tokenizer, calib_spec: str, samples: int, seq_len: int, seed: int, sample_tokens: int,
              self_calib: float = DEFAULT_SHARE):
    """Statistics on `samples` windows, as `moeprune prune` makes them: a `self_calib` share written by the
    model itself (moeprune.selfcalib), the rest from the text. The time returned is the statistics pass."""
    layout = moe_layout(model)
    tokens = calibration_windows(calib_spec, model, tokenizer, samples, seq_len, seed, self_calib)
    start = time.perf_counter()
    stats = collect(model, layout, tokens, sample_tokens=sample_tokens, seed=seed, progress=False)
    return stats, tokens, time.perf_counter() - start


def pruned_copy(model, plan, stats):
    pruned = copy.deepcopy(model)
    start = time.perf_counter()
    apply_plan(pruned, moe_layout(pruned), plan, stats)
    return pruned, time.perf_counter() - start


def ppl(model, tokenizer, domains: dict[str, Path], max_tokens: int) -> dict[str, float]:
    with torch.no_grad():
        res = domain_perplexity(model, tokenizer, domains, max_tokens=max_tokens, progress=False)
    return {d: r["ppl"] for d, r in res.items()}


def ratios(pruned: dict[str, float], full: dict[str, float]) -> dict[str, float]:
    return {d: pruned[d] / full[d] for d in full}


def summarise(r: dict[str, float]) -> dict[str, float]:
    seen = [v for d, v in r.items() if d not in UNSEEN]
    unseen = [v for d, v in r.items() if d in UNSEEN]
    return {"mean": sum(r.values()) / len(r), "worst": max(r.values()),
            "seen": sum(seen) / max(1, len(seen)), "unseen": sum(unseen) / max(1, len(unseen))}
