"""Perplexity on held-out text: token-weighted over fixed-length windows of one token stream.

The documents are tokenised without special tokens and concatenated, each followed by EOS (the
calibration pass builds its stream the same way). The stream is cut into windows of `seq_len`
tokens starting every `stride` tokens (default: `seq_len`, i.e. non-overlapping windows). In a
window every token that has context inside the window and was not scored by an earlier window is
scored, so with non-overlapping windows each window scores `seq_len - 1` tokens and the first token
of each window is never a target; with a smaller stride, the windows overlap and only the new
`stride` tokens of each window are scored (the sliding-window evaluation of the Hugging Face
perplexity guide). A final shorter window scores the rest of the stream.

    nll = sum over scored tokens of -log p(token | window context) / scored tokens   (float64)
    ppl = exp(nll)

Nothing is random: the same model and text give the same number.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import demo
from ..arch import MoePruneError
from ..text import iter_texts
from .sources import named_files

# ---------------------------------------------------------------- text -> token stream

def read_documents(path: str | Path) -> Iterator[str]:
    """The documents of a .txt file (blank-line separated), a .jsonl file ("text" field) or a folder of them, read
    as they are taken: evaluation stops reading at --eval-max-tokens, whatever the file's size."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MoePruneError(f"evaluation text {str(path)!r} not found")
    if path.is_file() and path.suffix not in (".txt", ".jsonl"):
        raise MoePruneError(f"evaluation file {path} must be .txt or .jsonl")
    return iter_texts(str(path), what="evaluation")


def token_stream(tokenizer, docs: Iterable[str], max_tokens: int | None = None) -> torch.Tensor:
    """1-D LongTensor: each document's tokens (no special tokens) followed by EOS, cut at max_tokens."""
    if tokenizer is None:
        raise MoePruneError("perplexity on text needs a tokenizer, and the model has none; add tokenizer files "
                            "to the model folder")
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    docs = iter(docs)
    while chunk := list(itertools.islice(docs, 64)):  # tokenise in chunks so that max_tokens can stop early
        for ids in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
            stream.extend(ids + sep)
        if max_tokens is not None and len(stream) >= max_tokens:
            break
    if max_tokens is not None:
        stream = stream[:max_tokens]
    return torch.tensor(stream, dtype=torch.long)


def _as_stream(tokenizer, source, max_tokens: int | None) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        if source.dim() != 1 or source.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
            raise MoePruneError("a token stream must be a 1-D integer tensor")
        return source.long()[:max_tokens] if max_tokens is not None else source.long()
    if isinstance(source, (str, Path)):
        return token_stream(tokenizer, read_documents(source), max_tokens)
    if isinstance(source, (list, tuple)) and all(isinstance(d, str) for d in source):
        return token_stream(tokenizer, list(source), max_tokens)
    raise MoePruneError("texts_or_path must be a path, a list of documents, or a 1-D tensor of token ids")


# ---------------------------------------------------------------- windows

def windows(n: int, seq_len: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) per window over a stream of n tokens; positions are absolute.

    With stride < seq_len every position 1..n-1 is scored exactly once; with stride == seq_len every
    position except the first of each window (which has no context inside its window).
    """
    if seq_len < 2:
        raise MoePruneError(f"seq_len {seq_len} must be at least 2")
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise MoePruneError(f"stride {stride} must be in 1..seq_len ({seq_len})")
    out, prev_end, begin = [], 0, 0
    while begin < n - 1:
        end = min(begin + seq_len, n)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n:
            break
        begin += stride
    return out


def _device(model) -> torch.device:
    return next(model.parameters()).device


def nll_batches(stream: torch.Tensor, seq_len: int = 256, stride: int | None = None,
                batch_size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The forward passes of a stream's perplexity: (token ids [B, T], first scored column per row [B])."""
    spans = windows(int(stream.numel()), seq_len, stride)
    if not spans:
        raise MoePruneError(f"the text has {stream.numel()} tokens; perplexity needs at least 2")
    # batches of windows of equal length (all but possibly the last have length seq_len), in stream order
    groups: list[list[tuple[int, int, int]]] = []
    for span in spans:
        if groups and len(groups[-1]) < batch_size and groups[-1][0][1] - groups[-1][0][0] == span[1] - span[0]:
            groups[-1].append(span)
        else:
            groups.append([span])
    # target at local position p (p >= 1) sits at column p - 1: score columns first - begin - 1 onwards
    return [(torch.stack([stream[b:e] for b, e, _ in g]), torch.tensor([f - b - 1 for b, _, f in g])) for g in groups]


def batch_nll(logits: torch.Tensor, ids: torch.Tensor, starts: torch.Tensor) -> tuple[float, int]:
    """(summed negative log-likelihood as float64, scored tokens) of one batch of windows from its logits."""
    logits = logits[:, :-1].float()
    ids = ids.to(logits.device)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                          reduction="none").view(ids.shape[0], -1).double()
    mask = torch.arange(nll.shape[1], device=nll.device)[None, :] >= starts.to(nll.device)[:, None]
    return float(nll[mask].sum()), int(mask.sum())


@torch.no_grad()
def stream_nll(model, stream: torch.Tensor, seq_len: int = 256, stride: int | None = None, batch_size: int = 8,
               progress: bool = True, desc: str = "perplexity") -> tuple[float, int]:
    """(summed negative log-likelihood in nats as float64, scored tokens) of a token stream."""
    device = _device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for ids, starts in tqdm(nll_batches(stream, seq_len, stride, batch_size), desc=desc, unit="batch",
                                disable=not progress, leave=False):
            t, c = batch_nll(model(input_ids=ids.to(device), use_cache=False).logits, ids, starts)
            total, count = total + t, count + c
    finally:
        model.train(was_training)
    return total, count


def perplexity(model, tokenizer, texts_or_path, seq_len: int = 256, stride: int | None = None, batch_size: int = 8,
               max_tokens: int | None = None, progress: bool = True, desc: str = "perplexity") -> dict:
    """{"ppl", "nll", "tokens"} of the model on a text: a .txt/.jsonl path or folder, a list of documents,
    or a 1-D tensor of token ids (then tokenizer may be None). See the module docstring for the windows."""
    stream = _as_stream(tokenizer, texts_or_path, max_tokens)
    total, count = stream_nll(model, stream, seq_len, stride, batch_size, progress, desc)
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count}


# ---------------------------------------------------------------- domains

def resolve_domains(domains=None) -> dict[str, Path]:
    """name -> text file. None: every embedded demo evaluation shard. A dict name -> path is used as given.
    A list of items, each: a demo domain name, a .txt/.jsonl file (named by its stem), a folder (each
    .txt/.jsonl in it, named by stem), or NAME=PATH."""
    if domains is None:
        names = demo.domains("eval")
        if not names:
            raise MoePruneError("the embedded demo evaluation shards (moeprune/demo/data/eval/*.txt) are missing "
                                "from this installation; name evaluation text with --domains FILE [FILE ...]")
        return {d: demo.shard("eval", d) for d in names}
    return named_files(domains, (".txt", ".jsonl"), {d: demo.shard("eval", d) for d in demo.domains("eval")},
                       "domain")


def domain_perplexity(model, tokenizer, domains=None, seq_len: int = 256, stride: int | None = None,
                      batch_size: int = 8, max_tokens: int | None = None, progress: bool = True) -> dict[str, dict]:
    """{domain: {"ppl", "nll", "tokens"}} over the domains (see resolve_domains; default: the demo eval shards).
    max_tokens caps each domain's stream (the first max_tokens tokens of its documents, in file order)."""
    files = resolve_domains(domains)
    return {name: perplexity(model, tokenizer, path, seq_len, stride, batch_size, max_tokens, progress,
                             desc=f"ppl {name}")
            for name, path in files.items()}
