"""A bridge to lm-evaluation-harness for a model held in memory (e.g. just pruned, not yet saved).

    pip install 'moeprune[eval]'

`lm_eval_tasks(model, tokenizer, ["arc_easy"])` runs lm-eval's own tasks through its HFLM wrapper
around the in-memory transformers model. `write_task_yaml(jsonl, folder)` writes an lm-eval task for
one of moeprune's JSONL multiple-choice files ({"query", "choices", "gold"}), so that the same
questions can also be scored by lm-eval offline: pass the folder as task_dir (CLI: --lm-eval-dir).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from ..arch import MoePruneError
from .multiple_choice import load_task, task_delimiter

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def require_lm_eval():
    try:
        import lm_eval
        import lm_eval.models.huggingface  # HFLM; it also needs accelerate
    except ImportError as e:
        raise MoePruneError("lm-evaluation-harness is not installed: pip install 'moeprune[eval]' "
                            "(or pip install lm-eval)") from e
    return lm_eval


def write_task_yaml(jsonl: str | Path, folder: str | Path, name: str | None = None,
                    target_delimiter: str | None = None) -> Path:
    """Write <folder>/<name>.yaml, an lm-eval multiple_choice task reading the local JSONL file; returns its path.

    The task scores exactly what moeprune.evaluate.multiple_choice scores (same delimiter, acc and acc_norm);
    target_delimiter None: the file's own convention (multiple_choice.task_delimiter).
    """
    jsonl = Path(jsonl).expanduser().resolve()
    if not jsonl.is_file():
        raise MoePruneError(f"task file {jsonl} not found")
    if target_delimiter is None:
        target_delimiter = task_delimiter(load_task(jsonl))
    name = name or jsonl.stem
    if not _NAME.match(name):
        raise MoePruneError(f"task name {name!r} may hold only letters, digits, _, . and -")
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    q = json.dumps         # a JSON string is a valid YAML scalar, which keeps paths and delimiters exact
    text = "\n".join([
        f"# written by moeprune: multiple-choice task over {jsonl.name}",
        f"task: {q(name)}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {q(str(jsonl))}",
        "test_split: test",
        "output_type: multiple_choice",
        'doc_to_text: "{{query}}"',
        'doc_to_choice: "{{choices}}"',
        'doc_to_target: "{{gold}}"',
        f"target_delimiter: {q(target_delimiter)}",
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
        "",
    ])
    path = folder / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _task_manager(tasks: list[str], task_dir):
    from lm_eval.tasks import TaskManager
    if task_dir is not None:
        dirs = [Path(d).expanduser() for d in ([task_dir] if isinstance(task_dir, (str, Path)) else task_dir)]
        for d in dirs:
            if not d.is_dir():
                raise MoePruneError(f"lm-eval task folder {d} not found")
        include = [str(d) for d in dirs]
        local = TaskManager(include_path=include, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local                       # indexing lm-eval's thousands of built-in tasks takes seconds
        manager = TaskManager(include_path=include)
    else:
        manager = TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in {', '.join(include)}" if task_dir is not None else ""
        raise MoePruneError(f"unknown lm-eval task(s) {unknown}: not among lm-eval's tasks{where}")
    return manager


def _number(v):
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, (int, float)):
        return None if isinstance(v, float) and not math.isfinite(v) else v
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def lm_eval_tasks(model, tokenizer, tasks: list[str], task_dir: str | Path | list | None = None,
                  limit: float | None = None, batch_size: int = 8, num_fewshot: int | None = None,
                  seed: int = 1234, bootstrap_iters: int = 1000) -> dict:
    """Run lm-eval tasks on an in-memory model: {task: {"acc", "acc_norm", "acc_stderr", ..., "n"}}.

    Metric names are lm-eval's with the filter suffix removed (",none"); values are plain floats (None where
    lm-eval reports N/A). task_dir: a folder (or list of folders) of local YAML tasks (see write_task_yaml).
    Offline-safe for local tasks; lm-eval's hub tasks need their datasets in the local Hugging Face cache.
    limit: at most this many questions per task (a float in (0, 1): that fraction). bootstrap_iters: lm-eval's
    resampling for the stderr of metrics without a closed form (0: no stderr at all).
    """
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    if tokenizer is None:
        raise MoePruneError("lm-eval needs the model's tokenizer, and the model has none")
    tasks = [t for t in tasks if t]
    if not tasks:
        raise MoePruneError("no lm-eval tasks named")
    manager = _task_manager(tasks, task_dir)
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=bootstrap_iters,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed)
    finally:
        model.train(was_training)
    results = {}
    for task, metrics in out["results"].items():
        clean = {}
        for key, value in metrics.items():
            if key in ("alias", "name", "sample_len") or (isinstance(value, str) and value.strip() != "N/A"):
                continue
            metric, _, filt = key.partition(",")
            metric = metric if filt in ("", "none") else f"{metric},{filt}"
            clean[metric] = _number(value)
        n = out.get("n-samples", {}).get(task, {})
        clean["n"] = n.get("effective", n.get("original")) if isinstance(n, dict) else None
        results[task] = clean
    return results
