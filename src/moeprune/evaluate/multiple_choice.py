"""Multiple-choice tasks scored by log-likelihood, the way lm-evaluation-harness scores them.

A task is a JSONL file, one object per line: {"query": str, "choices": [str, ...], "gold": int}
(gold may also be the text of the right choice). For every choice the model scores the continuation

    target_delimiter + choice         (lm-eval adds the delimiter whatever the query ends with)

given the query, exactly as lm-eval's HFLM does for `output_type: multiple_choice`. The delimiter is
chosen per task file (lm-eval has one per task): "" when every question already carries its separator
(its query ends with whitespace, or all its choices start with whitespace, the convention of the demo
tasks built by scripts/build_tasks.py: the scored text is exactly query + choice), else " ". Then:

  * trailing whitespace of the query is moved to the front of the continuation;
  * the continuation tokens are whole[len(context):] where whole = encode(query + continuation) and
    context = encode(query) (the tokenizer's default special tokens, e.g. a BOS, as lm-eval does);
  * an empty query is replaced by the BOS (else EOS) token as context;
  * over-long inputs keep their last max_length + 1 tokens.

acc: the choice of highest summed log-likelihood is the gold one. acc_norm: the same after dividing
each log-likelihood by the number of characters of the choice (lm-eval's acc_norm). Ties go to the
first choice, like numpy's argmax. chance: the mean of 1 / len(choices) over the questions.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import demo
from ..arch import MoePruneError
from ..text import jsonl_rows
from .sources import named_files

DEFAULT_MAX_LENGTH = 2048       # lm-eval's fallback when neither the config nor the tokenizer says


def load_task(path: str | Path) -> list[dict]:
    """The questions of a JSONL task file, validated: [{"query", "choices", "gold" (int)}]."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MoePruneError(f"multiple-choice task file {str(path)!r} not found")
    docs = [check_doc(row, f"{path}:{n}") for n, row in jsonl_rows(path)]
    if not docs:
        raise MoePruneError(f"multiple-choice task file {path} holds no questions")
    return docs


def check_doc(row, where: str = "") -> dict:
    if not isinstance(row, dict) or not {"query", "choices", "gold"} <= set(row):
        raise MoePruneError(f"{where}: a multiple-choice line needs \"query\", \"choices\" and \"gold\"")
    query, choices, gold = row["query"], row["choices"], row["gold"]
    if not isinstance(query, str) or not isinstance(choices, list) or len(choices) < 2 \
            or not all(isinstance(c, str) and c for c in choices):
        raise MoePruneError(f"{where}: \"query\" must be a string and \"choices\" a list of 2+ non-empty strings")
    if isinstance(gold, str) and not gold.isdigit():
        if gold not in choices:
            raise MoePruneError(f"{where}: gold {gold!r} is not one of the choices")
        gold = choices.index(gold)
    gold = int(gold)
    if not 0 <= gold < len(choices):
        raise MoePruneError(f"{where}: gold {gold} is outside 0..{len(choices) - 1}")
    return {"query": query, "choices": list(choices), "gold": gold}


def task_delimiter(docs: list[dict]) -> str:
    """The task's target delimiter: "" if every question carries its own separator, else " " (lm-eval's default)."""
    def separated(d: dict) -> bool:
        return d["query"][-1:].isspace() or all(c[:1].isspace() for c in d["choices"])
    return "" if docs and all(separated(d) for d in docs) else " "


# ---------------------------------------------------------------- log-likelihood of continuations

def max_length(config, tokenizer) -> int:
    """The context length lm-eval's HFLM would use for a model of this config."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    tok_max = getattr(tokenizer, "model_max_length", None)
    if tok_max and tok_max < 1e12:
        return int(tok_max)
    return DEFAULT_MAX_LENGTH


def _encode(tokenizer, text: str, add_special_tokens: bool | None = None) -> list[int]:
    kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    return list(tokenizer.encode(text, **kwargs))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-eval's HFLM.loglikelihood builds them."""
    if context == "":
        cont = _encode(tokenizer, continuation, add_special_tokens=False)
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise MoePruneError("an empty query needs a BOS or EOS token to condition on")
        return ([prefix], cont) if not cont or prefix != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx):]


class EmptyContinuation(MoePruneError):
    """A continuation that encodes to no tokens cannot be scored; `index` is its request's."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


def ll_batches(tokenizer, requests: list[tuple[str, str]], batch_size: int, limit: int) -> list[tuple]:
    """The forward passes of log-likelihood requests: (token ids [B, W], rows [(request index, input length,
    continuation tokens)]), longest first like lm-eval, right-padded (causal, so harmless)."""
    items = []
    for i, (context, continuation) in enumerate(requests):
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not cont:
            raise EmptyContinuation(f"continuation {continuation!r} encodes to no tokens", i)
        if len(cont) > limit:
            raise MoePruneError(f"continuation of {len(cont)} tokens is longer than the model's {limit}")
        inp = (ctx + cont)[-(limit + 1):][:-1]
        items.append((i, inp, cont))
    items.sort(key=lambda it: (-len(it[1]), it[0]))          # order restored by the request index
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for s in range(0, len(items), batch_size):
        batch = items[s:s + batch_size]
        ids = torch.full((len(batch), max(len(inp) for _, inp, _ in batch)), pad, dtype=torch.long)
        for row, (_, inp, _) in enumerate(batch):
            ids[row, :len(inp)] = torch.tensor(inp)
        out.append((ids, [(i, len(inp), cont) for i, inp, cont in batch]))
    return out


def batch_ll(logits: torch.Tensor, rows: list[tuple]) -> list[tuple[int, float]]:
    """(request index, summed log p(continuation)) per row of one batch, from its logits."""
    logp = F.log_softmax(logits.float(), dim=-1)
    out = []
    for row, (i, n_inp, cont) in enumerate(rows):
        # the continuation's tokens are the last len(cont) targets: logits at positions n_inp - len(cont) .. n_inp - 1
        pos = torch.arange(n_inp - len(cont), n_inp, device=logp.device)
        out.append((i, float(logp[row, pos, torch.tensor(cont, device=logp.device)].double().sum())))
    return out


@torch.no_grad()
def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 8,
                   progress: bool = True, desc: str = "choices") -> list[float]:
    """Summed log p(continuation | context) in nats for each (context, continuation), in request order."""
    device = next(model.parameters()).device
    out = [0.0] * len(requests)
    was_training = model.training
    model.eval()
    try:
        for ids, rows in tqdm(ll_batches(tokenizer, requests, batch_size, max_length(model.config, tokenizer)),
                              desc=desc, unit="batch", disable=not progress, leave=False):
            for i, value in batch_ll(model(input_ids=ids.to(device), use_cache=False).logits, rows):
                out[i] = value
    finally:
        model.train(was_training)
    return out


# ---------------------------------------------------------------- tasks

def _argmax(values: list[float]) -> int:
    best = 0
    for j, v in enumerate(values):
        if v > values[best]:
            best = j
    return best


def task_questions(task, target_delimiter: str | None = None, limit: int | None = None):
    """(questions, requests): a task's questions (a JSONL path or a list of dicts, the first `limit`) and
    the (context, continuation) log-likelihood requests that score them, in order."""
    docs = load_task(task) if isinstance(task, (str, Path)) else [check_doc(d, f"question {i}")
                                                                 for i, d in enumerate(task)]
    if target_delimiter is None:
        target_delimiter = task_delimiter(docs)             # decided on the whole file, as the YAML does
    if limit is not None:
        docs = docs[:limit]
    return docs, [(d["query"], f"{target_delimiter}{c}") for d in docs for c in d["choices"]]


def task_scores(docs: list[dict], lls: list[float]) -> dict:
    """acc, acc_norm, their standard errors, n and chance from each choice's log-likelihood."""
    acc, acc_norm, k = [], [], 0
    for d in docs:
        ll = lls[k:k + len(d["choices"])]
        k += len(d["choices"])
        acc.append(float(_argmax(ll) == d["gold"]))
        acc_norm.append(float(_argmax([v / len(c) for v, c in zip(ll, d["choices"])]) == d["gold"]))
    n = len(docs)
    return {"acc": sum(acc) / n, "acc_norm": sum(acc_norm) / n, "acc_stderr": _stderr(acc),
            "acc_norm_stderr": _stderr(acc_norm), "n": n,
            "chance": sum(1 / len(d["choices"]) for d in docs) / n}


def multiple_choice(model, tokenizer, task, batch_size: int = 8, target_delimiter: str | None = None,
                    limit: int | None = None, progress: bool = True, desc: str = "choices") -> dict:
    """{"acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "n", "chance"} on a task: a JSONL path or a list
    of {"query", "choices", "gold"} dicts. limit: only the first `limit` questions. target_delimiter: put
    between query and choice; None: task_delimiter(questions) (see the module docstring)."""
    if tokenizer is None:
        raise MoePruneError("multiple-choice tasks need a tokenizer, and the model has none")
    docs, requests = task_questions(task, target_delimiter, limit)
    return task_scores(docs, loglikelihoods(model, tokenizer, requests, batch_size, progress, desc))


def _stderr(xs: list[float]) -> float:
    """lm-eval's mean_stderr: sample standard deviation / sqrt(n)."""
    n = len(xs)
    if n < 2:
        return float("nan")
    mu = sum(xs) / n
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1) / n)


def resolve_tasks(tasks=None) -> dict[str, Path]:
    """name -> JSONL file. None: the embedded demo tasks (may be none). Items: a demo task name, a .jsonl
    file (named by stem), a folder of .jsonl files, or NAME=PATH; a dict name -> path is used as given."""
    available = demo.task_files()
    if tasks is None:
        return dict(available)
    return named_files(tasks, (".jsonl",), available, "task")


def task_accuracy(model, tokenizer, tasks=None, batch_size: int = 8, limit: int | None = None,
                  progress: bool = True) -> dict[str, dict]:
    """{task: multiple_choice(...)} over the tasks (see resolve_tasks; default: the demo tasks)."""
    return {name: multiple_choice(model, tokenizer, path, batch_size, limit=limit, progress=progress,
                                  desc=f"task {name}")
            for name, path in resolve_tasks(tasks).items()}
