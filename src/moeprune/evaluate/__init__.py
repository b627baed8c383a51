"""Evaluation: perplexity per domain, multiple-choice accuracy, and (optionally) lm-evaluation-harness.

    evaluate_model(model, tokenizer)        -> {"perplexity": {domain: {ppl, nll, tokens}}, "tasks": {...}, ...}
    compare(before, after)                  -> per-domain ratio pruned / full, mean and worst domain, task deltas

Defaults are the embedded demo evaluation shards (held out from calibration) and the demo tasks.
See perplexity.py, multiple_choice.py and lm_eval_bridge.py for what each number means.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..arch import MoePruneError
from ..preflight import usable_tokenizer

from .multiple_choice import (EmptyContinuation, batch_ll, ll_batches, load_task, max_length, multiple_choice,
                              resolve_tasks, task_accuracy, task_questions, task_scores)
from .perplexity import _as_stream, batch_nll, domain_perplexity, nll_batches, perplexity, resolve_domains

__all__ = ["Evaluation", "compare", "domain_perplexity", "evaluate_model", "evaluation_section", "lm_eval_tasks",
           "load_task", "multiple_choice", "perplexity", "resolve_domains", "resolve_tasks", "task_accuracy",
           "write_task_yaml"]


def lm_eval_tasks(*args, **kwargs):
    """See lm_eval_bridge.lm_eval_tasks (imported lazily: lm-eval is an optional extra)."""
    from .lm_eval_bridge import lm_eval_tasks as run
    return run(*args, **kwargs)


def write_task_yaml(*args, **kwargs):
    """See lm_eval_bridge.write_task_yaml."""
    from .lm_eval_bridge import write_task_yaml as write
    return write(*args, **kwargs)


def _split(names) -> list[str]:
    if names is None:
        return []
    if isinstance(names, str):
        names = [names]
    return [n.strip() for item in names for n in str(item).split(",") if n.strip()]


def _run_lm_eval(model, tokenizer, names: list[str], task_dir, batch_size: int, limit) -> dict:
    """lm-eval tasks by name; a name that is one of our JSONL tasks (demo name or .jsonl path) gets a YAML."""
    ours, theirs = {}, []
    for name in names:
        try:
            ours.update(resolve_tasks([name]))
        except MoePruneError:
            theirs.append(name)
    dirs = [str(Path(task_dir).expanduser())] if task_dir else []
    with tempfile.TemporaryDirectory(prefix="moeprune-lmeval-") as tmp:
        for name, path in ours.items():
            write_task_yaml(path, tmp, name=name)
        if ours:
            dirs.append(tmp)
        return lm_eval_tasks(model, tokenizer, [*ours, *theirs], task_dir=dirs or None, limit=limit,
                             batch_size=batch_size)


class Evaluation:
    """Every forward pass an evaluation needs, prepared (read, tokenised, checked) before any model runs,
    and scored afterwards from each batch's logits: by a model in memory (`run`) or by the per-layer
    engine on a model that does not fit (moeprune.engine streams the batches through one layer at a time).

        ev = Evaluation(tokenizer, config)        # domains, tasks: as evaluate_model takes them
        tally = ev.tally(); tally.score(k, logits) for each ev.batches[k]; tally.result()
    """

    def __init__(self, tokenizer, config, domains=None, tasks=None, seq_len: int = 256, stride: int | None = None,
                 batch_size: int = 8, max_tokens: int | None = None, task_limit: int | None = None,
                 texts: dict[str, list[str]] | None = None):
        """`texts`: documents per domain, scored instead of `domains` (e.g. held-out calibration text)."""
        ok, why = usable_tokenizer(tokenizer)
        if not ok:
            raise MoePruneError(f"evaluation needs a tokenizer that encodes text, and {why}; add tokenizer files to "
                                "the model folder, or skip the evaluation (--no-eval)")
        self.settings = {"seq_len": seq_len, "stride": stride or seq_len, "max_tokens": max_tokens,
                         "task_limit": task_limit}
        self.batches: list[torch.Tensor] = []
        self._owner: list[tuple[str, str, object]] = []          # per batch: ("ppl" | "task", name, extra)
        files = texts if texts is not None else resolve_domains(domains) if domains is None or len(domains) else {}
        for name, path in files.items():
            stream = _as_stream(tokenizer, path, max_tokens)
            if stream.numel() < 2:
                fix = "raise --eval-max-tokens" if max_tokens is not None and max_tokens < 2 else "give it more text"
                raise MoePruneError(f"evaluation domain {name!r} ({path if texts is None else 'text'}) gives {stream.numel()} token(s) with this "
                                    f"tokenizer and perplexity needs at least 2; {fix}, or leave the domain out "
                                    "(--eval-domains)")
            for ids, starts in nll_batches(stream, seq_len, stride, batch_size):
                self._add(ids, ("ppl", name, starts))
        self.questions: dict[str, tuple[list[dict], int]] = {}
        limit = max_length(config, tokenizer)
        for name, path in (resolve_tasks(tasks) if tasks is None or len(tasks) else {}).items():
            docs, requests = task_questions(path, limit=task_limit)
            self.questions[name] = (docs, len(requests))
            try:
                for ids, rows in ll_batches(tokenizer, requests, batch_size, limit):
                    self._add(ids, ("task", name, rows))
            except EmptyContinuation as e:
                q, seen = 0, 0
                while seen + len(docs[q]["choices"]) <= e.index:
                    seen, q = seen + len(docs[q]["choices"]), q + 1
                query = docs[q]["query"] if len(docs[q]["query"]) <= 40 else docs[q]["query"][:40] + "..."
                raise MoePruneError(f"task {name!r} ({path}), question {q + 1} ({query!r}): choice "
                                    f"{docs[q]['choices'][e.index - seen]!r} encodes to no tokens with this tokenizer, "
                                    "so it cannot be scored; edit or drop the question, or leave the task out "
                                    "(--eval-tasks)") from None
        self.domains = list(files)

    def _add(self, ids: torch.Tensor, owner: tuple) -> None:
        self.batches.append(ids)
        self._owner.append(owner)

    def tally(self) -> "Tally":
        return Tally(self)

    @torch.no_grad()
    def run(self, model, progress: bool = True, desc: str = "evaluation") -> dict:
        """Score a model in memory, batch by batch."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        tally = self.tally()
        try:
            for k, ids in enumerate(tqdm(self.batches, desc=desc, unit="batch", disable=not progress, leave=False)):
                tally.score(k, model(input_ids=ids.to(device), use_cache=False).logits)
        finally:
            model.train(was_training)
        return tally.result()


class Tally:
    """One model's running scores over an Evaluation's batches."""

    def __init__(self, evaluation: Evaluation):
        self.ev = evaluation
        self.start = time.perf_counter()
        self.nll = {d: [0.0, 0] for d in evaluation.domains}
        self.lls = {t: [0.0] * n for t, (_, n) in evaluation.questions.items()}

    def score(self, k: int, logits: torch.Tensor) -> None:
        kind, name, extra = self.ev._owner[k]
        if kind == "ppl":
            total, count = batch_nll(logits, self.ev.batches[k], extra)
            self.nll[name][0] += total
            self.nll[name][1] += count
        else:
            for i, value in batch_ll(logits, extra):
                self.lls[name][i] = value

    def result(self) -> dict:
        ppl = {d: {"ppl": math.exp(t / c), "nll": t / c, "tokens": c} for d, (t, c) in self.nll.items()}
        acc = {t: task_scores(self.ev.questions[t][0], lls) for t, lls in self.lls.items()}
        return {"perplexity": ppl, "tasks": acc, "settings": dict(self.ev.settings),
                "seconds": round(time.perf_counter() - self.start, 3)}


def evaluate_model(model, tokenizer, domains=None, tasks=None, lm_eval=None, lm_eval_dir=None, seq_len: int = 256,
                   stride: int | None = None, batch_size: int = 8, max_tokens: int | None = None,
                   task_limit: int | None = None, progress: bool = True) -> dict:
    """Everything the report needs about one model in memory.

    domains: None = the demo evaluation shards; [] = no perplexity; else see perplexity.resolve_domains.
    tasks: None = the demo multiple-choice tasks (none if absent); [] = none; else see resolve_tasks.
    lm_eval: lm-eval task names (list or comma-separated); our JSONL task names/paths are run through lm-eval
    too via a generated YAML. lm_eval_dir: a folder of extra local lm-eval YAML tasks.
    Returns {"perplexity": {...}, "tasks": {...}, "lm_eval": {...} (when asked), "settings": {...}, "seconds": s}.
    """
    ev = Evaluation(tokenizer, model.config, domains, tasks, seq_len, stride, batch_size, max_tokens, task_limit)
    out = ev.run(model, progress)
    names = _split(lm_eval)
    if names:
        out["lm_eval"] = _run_lm_eval(model, tokenizer, names, lm_eval_dir, batch_size, task_limit)
    return out


def compare(before: dict | None, after: dict) -> dict:
    """Per domain ppl before/after and ratio after/before; mean (arithmetic and geometric) and worst ratio;
    per task acc and acc_norm before/after; lm-eval metrics before/after. Without `before`, after only."""
    before = before or {}
    out: dict = {"perplexity": {}, "tasks": {}}
    ratios = {}
    for d, a in after.get("perplexity", {}).items():
        row = {"before": None, "after": a["ppl"], "ratio": None}
        b = before.get("perplexity", {}).get(d)
        if b is not None:
            row["before"] = b["ppl"]
            row["ratio"] = ratios[d] = a["ppl"] / b["ppl"]
        out["perplexity"][d] = row
    if ratios:
        worst = max(ratios, key=ratios.get)
        out["mean_ratio"] = sum(ratios.values()) / len(ratios)
        out["geomean_ratio"] = math.exp(sum(math.log(r) for r in ratios.values()) / len(ratios))
        out["worst"] = {"domain": worst, "ratio": ratios[worst]}
    pa = [v["ppl"] for v in after.get("perplexity", {}).values()]
    if pa:
        out["mean_ppl_after"] = sum(pa) / len(pa)
    pb = [before["perplexity"][d]["ppl"] for d in ratios]
    if pb:
        out["mean_ppl_before"] = sum(pb) / len(pb)
    for t, a in after.get("tasks", {}).items():
        b = before.get("tasks", {}).get(t, {})
        out["tasks"][t] = {"acc_before": b.get("acc"), "acc_after": a["acc"], "acc_norm_before": b.get("acc_norm"),
                           "acc_norm_after": a["acc_norm"], "n": a["n"], "chance": a["chance"]}
    if "lm_eval" in after:
        out["lm_eval"] = {}
        for t, metrics in after["lm_eval"].items():
            b = before.get("lm_eval", {}).get(t, {})
            out["lm_eval"][t] = {m: {"before": b.get(m), "after": v} for m, v in metrics.items()
                                 if m != "n" and not m.endswith("_stderr")}
    return out


def evaluation_section(before: dict | None, after: dict) -> dict:
    """The report's "evaluation" entry: {"before", "after", "comparison"}."""
    return {"before": before, "after": after, "comparison": compare(before, after)}
