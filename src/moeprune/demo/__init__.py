"""The embedded demo: small MoE models trained here, and the text shards they were measured on.

    models/<name>/        demo-mixtral (upcycled, 8 experts top-2), demo-fine (from scratch, fine-grained)
    data/calib/<domain>.txt, data/eval/<domain>.txt    calibration and held-out shards, never overlapping
    tasks/<task>.jsonl    multiple-choice tasks {"query", "choices", "gold"}

scripts/build_corpus.py and scripts/train_demo_model.py rebuild all of it.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).parent
DEFAULT_MODEL = "demo-mixtral"


def model_names() -> list[str]:
    folder = ROOT / "models"
    return sorted(p.name for p in folder.iterdir() if (p / "config.json").exists()) if folder.exists() else []


def model_path(name: str) -> Path | None:
    """The embedded model of this name; None for anything else (a path is not a demo model name)."""
    if name not in model_names():
        return None
    path = ROOT / "models" / name
    return path if (path / "config.json").exists() else None


def domains(split: str = "eval") -> list[str]:
    folder = ROOT / "data" / split
    return sorted(p.stem for p in folder.glob("*.txt")) if folder.exists() else []


def shard(split: str, domain: str) -> Path:
    return ROOT / "data" / split / f"{domain}.txt"


def task_files() -> dict[str, Path]:
    folder = ROOT / "tasks"
    return {p.stem: p for p in sorted(folder.glob("*.jsonl"))} if folder.exists() else {}
