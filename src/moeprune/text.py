"""Text sources, read the same way for calibration and evaluation.

Specs (`--calib`, `--self-text`, evaluation domains):
    demo                    the embedded calibration shards, all domains
    demo:code,math          only these domains of them
    PATH                    a .txt or .jsonl file ("text" field), or a folder of them
    hf:NAME[:CONFIG][:SPLIT]  a `datasets` dataset (online, or a local dataset folder as NAME)
    random                  random token ids (smoke tests; needs no tokenizer)

A document is a blank-line-separated paragraph block of a .txt file or one .jsonl line's "text"; every
reader here names the file and line of what it cannot read.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import torch

from . import demo
from .arch import MoePruneError


_JSON_TYPES = {dict: "an object", list: "an array", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


def read_utf8(path: Path) -> str:
    """The text of a file that must be UTF-8 (a leading byte-order mark is dropped, newlines become \\n).
    Other bytes are named with their offset and line, so the user can find and convert them."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        bad = data[e.start:e.start + 1]
        raise MoePruneError(f"{path} is not UTF-8 text (byte {e.start}, line {line}: {bad!r}); convert it, "
                            f"e.g. iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}") from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def jsonl_rows(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line of a .jsonl file; a malformed line names file:line."""
    for n, line in enumerate(read_utf8(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise MoePruneError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); every line of a .jsonl "
                                "file must be one complete JSON object") from None


def _jsonl_text(row, where: str) -> str:
    if not isinstance(row, dict) or "text" not in row:
        raise MoePruneError(f"{where}: a .jsonl text file needs a \"text\" field per line, e.g. {{\"text\": \"...\"}}")
    text = row["text"]
    if not isinstance(text, str):
        raise MoePruneError(f"{where}: \"text\" is {_JSON_TYPES.get(type(text), type(text).__name__)}, not a "
                            "string; write each document as a JSON string")
    return text


def _file_domains(path: Path, default: str) -> dict[str, list[str]]:
    """One file's documents by domain: a .jsonl line's optional "domain" field, else `default`."""
    if path.suffix != ".jsonl":
        return {default: _read_txt(path)}
    out: dict[str, list[str]] = {}
    for n, row in jsonl_rows(path):
        text = _jsonl_text(row, f"{path}:{n}")                  # checks that the row is an object with text
        out.setdefault(str(row.get("domain", default)), []).append(text)
    return out


def split_held_out(domains: dict[str, list[str]], fraction: float, seed: int) -> tuple[list[str], dict[str, list[str]]]:
    """(calibration documents, held-out documents by domain): per domain, a seeded `fraction` of its documents
    (at least one) is held out when it has two or more; nothing is in both."""
    calib, held = [], {}
    for name, docs in domains.items():
        order = list(range(len(docs)))
        random.Random(f"{seed}:{name}").shuffle(order)
        k = max(1, round(len(docs) * fraction)) if len(docs) >= 2 else 0
        held.update({name: [docs[i] for i in sorted(order[:k])]} if k else {})
        calib += [docs[i] for i in sorted(order[k:])]
    return calib, held


def _read_txt(path: Path) -> list[str]:
    """The documents of a .txt file: separated by blank lines."""
    return [d for d in read_utf8(path).split("\n\n") if d.strip()]


def check_spec(spec: str) -> None:
    """Fail early, before any model is loaded: a demo or local source is read and parsed in full here, so a
    missing file, bytes that are not UTF-8, a malformed .jsonl line or a source without text stop the run
    before the heavy work. hf: and random sources are checked when they are used."""
    if spec != "random" and not spec.startswith("hf:"):
        load_texts(spec)


def _with_text(docs: list[str], what: str, source: str) -> list[str]:
    if not any(d.strip() for d in docs):
        raise MoePruneError(f"{what} text {source} holds no documents: it is empty or blank. Give it text: "
                            "paragraphs separated by blank lines (.txt) or one {\"text\": ...} per line (.jsonl)")
    return docs


def load_texts(spec: str, what: str = "calibration") -> list[str]:
    """The documents named by a text spec (see the module docstring); `what` names its use in messages."""
    return [doc for docs in text_domains(spec, what).values() for doc in docs]


def text_domains(spec: str, what: str = "calibration") -> dict[str, list[str]]:
    """The documents of a text spec by domain: a demo shard, a file of a folder (by its stem), a .jsonl line's
    "domain" field, else the whole source as one domain."""
    if spec == "demo" or spec.startswith("demo:"):
        available = demo.domains("calib")
        if not available:
            raise MoePruneError("the embedded demo calibration shards are missing from this installation")
        wanted = spec.split(":", 1)[1].split(",") if ":" in spec else available
        unknown = sorted(set(wanted) - set(available))
        if unknown:
            raise MoePruneError(f"unknown demo domain(s) {unknown}; available: {', '.join(available)}")
        return {d: _read_txt(demo.shard("calib", d)) for d in wanted}
    if spec.startswith("hf:"):
        return {spec[3:]: _load_hf(spec[3:])}
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
        if not files:
            raise MoePruneError(f"{what} folder {path} holds no .txt or .jsonl files")
        out: dict[str, list[str]] = {}
        for f in files:
            for name, docs in _file_domains(f, f.relative_to(path).with_suffix("").as_posix()).items():
                out.setdefault(name, []).extend(docs)
        _with_text([d for docs in out.values() for d in docs], what, f"folder {path}")
        return out
    if path.is_file():
        if path.suffix not in (".txt", ".jsonl"):
            raise MoePruneError(f"{what} file {path} must be .txt or .jsonl")
        out = _file_domains(path, path.stem)
        _with_text([d for docs in out.values() for d in docs], what, f"file {path}")
        return out
    raise MoePruneError(f"{what} source {spec!r} not found: give demo, demo:DOMAINS, a .txt/.jsonl file or "
                        "folder, hf:NAME[:CONFIG][:SPLIT], or random")


def _load_hf(rest: str) -> list[str]:
    try:
        import datasets
    except ImportError as e:        # optional: only hf: specs need it
        raise MoePruneError("hf: calibration needs the `datasets` package: pip install 'moeprune[hf]'") from e
    name, config, split = (rest.split(":") + [None, None])[:3]
    ds = datasets.load_dataset(name, config or None, split=split or "train")
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return [t for t in ds[column] if isinstance(t, str) and t.strip()]


def calibration_tokens(spec: str, tokenizer, samples: int, seq_len: int, seed: int,
                       vocab_size: int | None = None, docs: list[str] | None = None) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens [samples, seq_len], chosen at seeded random from the text
    (`docs` when given: the spec's documents less a held-out part)."""
    if samples < 1 or seq_len < 2:
        raise MoePruneError("--samples must be >= 1 and --seq-len >= 2")
    rng = random.Random(seed)
    if spec == "random":
        if vocab_size is None:
            raise MoePruneError("random calibration needs the model's vocabulary size")
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (samples, seq_len), generator=g)
    if tokenizer is None:
        raise MoePruneError(f"calibration on {spec!r} needs a tokenizer, and the model folder has none; "
                            "add tokenizer files to it or use --calib random")
    docs = list(docs) if docs is not None else load_texts(spec)
    rng.shuffle(docs)
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for doc in docs:
        # whole documents, longer than the model's context on purpose: the windows are cut below
        stream.extend(tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"] + sep)
    windows = len(stream) // seq_len
    if windows < samples:
        raise MoePruneError(f"calibration text {spec!r} has {len(stream)} tokens, enough for {windows} windows of "
                            f"{seq_len}; lower --samples ({samples}) or --seq-len, or give more text")
    picks = sorted(rng.sample(range(windows), samples))
    return torch.tensor([stream[w * seq_len:(w + 1) * seq_len] for w in picks], dtype=torch.long)
