"""Text sources, read the same way for calibration and evaluation.

Specs (`--calib`, `--self-text`, evaluation domains):
    demo                    the embedded calibration shards, all domains
    demo:code,math          only these domains of them
    PATH                    a .txt or .jsonl file ("text" field), or a folder of them
    hf:NAME[:CONFIG][:SPLIT]  a `datasets` dataset (online, or a local dataset folder as NAME)
    random                  random token ids (smoke tests; needs no tokenizer)

A document is a blank-line-separated paragraph block of a .txt file or one .jsonl line's "text"; every
reader here names the file and line of what it cannot read.

Files are read as streams of 1 MiB blocks, never whole: memory holds one block and the document being
read. Calibration reads a source of up to LAZY_BYTES (64 MiB) in full and picks its windows exactly as it
always did (all documents shuffled, seeded); a larger source is sampled instead: `samples` seeded byte
offsets, each window the tokens of the whole documents that start after its offset, so only about
samples x seq_len tokens of text are read. check_spec validates the first LAZY_BYTES of each file (the
rest is checked as it is read).
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from . import demo
from .arch import MoePruneError


_JSON_TYPES = {dict: "an object", list: "an array", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


LAZY_BYTES = 64 << 20         # a calibration source up to this size is read whole and sampled as always
BLOCK = 1 << 20               # bytes per read
READ = {"bytes": 0}           # bytes read from text files by this module, for tests and benchmarks


def _not_utf8(path: Path, offset: int, line: int, bad: bytes) -> MoePruneError:
    return MoePruneError(f"{path} is not UTF-8 text (byte {offset}, line {line}: {bad!r}); convert it, "
                         f"e.g. iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}")


def _safe_cut(data: bytes) -> int:
    """Where to cut `data` so that no UTF-8 sequence is split: before an unfinished one at its end."""
    for j in range(len(data) - 1, max(len(data) - 4, -1), -1):
        b = data[j]
        if b & 0xC0 == 0x80:
            continue                    # a continuation byte: look further back for its lead
        need = 2 if b >> 5 == 6 else 3 if b >> 4 == 14 else 4 if b >> 3 == 30 else 1
        return j if j + need > len(data) else len(data)
    return len(data)


def text_blocks(path: Path, start: int = 0, limit: int | None = None) -> Iterator[str]:
    """The text of a UTF-8 file as blocks, newlines normalised to \\n (a leading byte-order mark dropped), from
    byte `start` (a partial character there is skipped) and at most `limit` bytes (a character cut by the
    limit is dropped). Bytes that are not UTF-8 are named with their offset and line, exactly as decoding the
    whole file would name them."""
    with open(path, "rb") as f:
        f.seek(start)
        offset, lines, carry, held, first = start, None if start else 0, b"", "", True
        end = None if limit is None else start + limit
        while True:
            want = BLOCK if end is None else min(BLOCK, end - f.tell())
            data = f.read(want) if want > 0 else b""
            READ["bytes"] += len(data)
            stopped = not data and want <= 0                 # the limit, not the end of the file
            buf = carry + data
            if first and start:
                skip = 0
                while skip < min(3, len(buf)) and buf[skip] & 0xC0 == 0x80:
                    skip += 1
                buf, offset = buf[skip:], offset + skip
            cut = len(buf) if not data and not stopped else _safe_cut(buf)
            chunk, carry = buf[:cut], buf[cut:]
            try:
                text = chunk.decode("utf-8")
            except UnicodeDecodeError as e:
                if lines is None:               # line numbers count from the start of the file
                    lines = _count_lines(path, offset)
                raise _not_utf8(path, offset + e.start, lines + chunk.count(b"\n", 0, e.start) + 1,
                                chunk[e.start:e.start + 1]) from None
            if first and not start:
                text = text.removeprefix("\ufeff")
            first = False
            offset += len(chunk)
            if lines is not None:
                lines += chunk.count(b"\n")
            text = held + text
            held = "\r" if text.endswith("\r") and data else ""       # a \r\n may be split between blocks
            text = text[:-1] if held else text
            if text:
                yield text.replace("\r\n", "\n").replace("\r", "\n")
            if not data:
                return


def _count_lines(path: Path, upto: int) -> int:
    n = 0
    with open(path, "rb") as f:
        while f.tell() < upto:
            n += f.read(min(BLOCK, upto - f.tell())).count(b"\n")
    return n


def _split(blocks: Iterator[str], sep: str) -> Iterator[str]:
    """The pieces of the concatenated blocks between separators, exactly as str.split(sep) gives them."""
    buf = ""
    for text in blocks:
        buf += text
        pieces = buf.split(sep)
        buf = pieces.pop()
        yield from pieces
    yield buf


def read_utf8(path: Path) -> str:
    """The text of a file that must be UTF-8 (a leading byte-order mark is dropped, newlines become \\n).
    Other bytes are named with their offset and line, so the user can find and convert them."""
    return "".join(text_blocks(path))


def _pieces(path: Path, sep: str, start: int, limit: int | None) -> Iterator[tuple[int, str, bool]]:
    """(number, piece, whether it may be cut short) of a file split at `sep`: from `start` the first piece is
    a partial one and is left out; with `limit` the last piece may be cut by it."""
    cut = limit is not None and start + limit < _size(path)
    previous = None
    for n, piece in enumerate(_split(text_blocks(path, start, limit), sep), 1):
        if previous is not None:
            yield previous[0], previous[1], False
        previous = (n, piece) if not (start and n == 1) else None
    if previous is not None:
        yield previous[0], previous[1], cut


def txt_documents(path: Path, start: int = 0, limit: int | None = None) -> Iterator[str]:
    """The documents of a .txt file, one at a time: blank-line separated, blank ones skipped (from byte
    `start`: those that begin after it)."""
    return (d for _, d, _ in _pieces(path, "\n\n", start, limit) if d.strip())


def jsonl_rows(path: Path, start: int = 0, limit: int | None = None) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line of a .jsonl file, read as a stream; a malformed
    line names file:line (from byte `start`: the lines that begin after it, numbered from there)."""
    for n, line, maybe_cut in _pieces(path, "\n", start, limit):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            if maybe_cut:
                return              # the last line of a partial read, cut by its limit: not an error
            where = f"{path}:{n}" if not start else f"{path} (line {n - 1} after byte {start})"
            raise MoePruneError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); every line of a .jsonl "
                                "file must be one complete JSON object") from None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


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
    return list(txt_documents(path))


def _documents(path: Path, start: int = 0, limit: int | None = None) -> Iterator[str]:
    """The documents of one .txt or .jsonl file, one at a time."""
    if path.suffix != ".jsonl":
        yield from txt_documents(path, start, limit)
        return
    for n, row in jsonl_rows(path, start, limit):
        yield _jsonl_text(row, f"{path}:{n}" if not start else f"{path} (line {n - 1} after byte {start})")


def check_spec(spec: str, what: str = "calibration") -> None:
    """Fail early, before any model is loaded: a demo or local source is read and parsed here, so a missing
    file, bytes that are not UTF-8, a malformed .jsonl line or a source without text stop the run before the
    heavy work. Of a file larger than LAZY_BYTES only the first LAZY_BYTES are checked (with a warning saying
    so); the rest is checked as it is read. hf: and random sources are checked when they are used."""
    if spec == "random" or spec.startswith("hf:"):
        return
    files = source_files(spec, what)
    if files is None:                               # demo
        load_texts(spec, what)
        return
    found = False
    for f in files:
        partial = _size(f) > LAZY_BYTES
        for _ in _documents(f, 0, LAZY_BYTES if partial else None):
            found = True
        if partial:
            warnings.warn(f"{what} text {f} is {_size(f) / 2**30:.1f} GiB: only its first {LAZY_BYTES >> 20} MiB "
                          "were checked before the run; the rest is read as needed, and a bad line there stops the "
                          "run when it is reached", stacklevel=2)
    where = f"folder {spec}" if Path(spec).is_dir() else f"file {spec}"
    if not found:
        _with_text([], what, where)


def source_files(spec: str, what: str = "calibration") -> list[Path] | None:
    """The .txt/.jsonl files of a local spec, in reading order (None for demo specs); errors as text_domains."""
    if spec == "demo" or spec.startswith("demo:"):
        return None
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
        if not files:
            raise MoePruneError(f"{what} folder {path} holds no .txt or .jsonl files")
        return files
    if path.is_file():
        if path.suffix not in (".txt", ".jsonl"):
            raise MoePruneError(f"{what} file {path} must be .txt or .jsonl")
        return [path]
    raise MoePruneError(f"{what} source {spec!r} not found: give demo, demo:DOMAINS, a .txt/.jsonl file or "
                        "folder, hf:NAME[:CONFIG][:SPLIT], or random")


def iter_texts(spec: str, what: str = "calibration") -> Iterator[str]:
    """The documents of a local or demo spec one at a time, in load_texts' order, reading no further than the
    caller takes (e.g. evaluation text up to --eval-max-tokens)."""
    files = source_files(spec, what)
    if files is None:
        yield from load_texts(spec, what)
        return
    found = False
    for f in files:
        for doc in _documents(f):
            found = True
            yield doc
    if not found:
        _with_text([], what, f"folder {spec}" if Path(spec).is_dir() else f"file {spec}")


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
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    files = source_files(spec) if docs is None and not spec.startswith("hf:") else None
    if files is not None and sum(_size(f) for f in files) > LAZY_BYTES:
        return _sampled_windows(spec, files, tokenizer, sep, samples, seq_len, rng)
    docs = list(docs) if docs is not None else load_texts(spec)
    rng.shuffle(docs)
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


def _sampled_windows(spec: str, files: list[Path], tokenizer, sep: list[int], samples: int, seq_len: int,
                     rng: random.Random) -> torch.Tensor:
    """Windows of a source larger than LAZY_BYTES without reading it whole: `samples` seeded byte offsets over
    the files' concatenated bytes (sorted); each window is the first seq_len tokens of the whole documents that
    start after its offset (the source read on from its start when one runs out). Reads about one window's text
    per window."""
    sizes = [_size(f) for f in files]
    total = sum(sizes)
    offsets = sorted(rng.randrange(total) for _ in range(samples))
    rows = []
    for offset in offsets:
        window: list[int] = []
        for doc in _documents_after(files, sizes, offset):
            window.extend(tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"] + sep)
            if len(window) >= seq_len:
                break
        if len(window) < seq_len:
            raise MoePruneError(f"calibration text {spec!r} has too few tokens for one window of {seq_len} (it is "
                                "mostly blank); lower --seq-len or give more text")
        rows.append(window[:seq_len])
    return torch.tensor(rows, dtype=torch.long)


def _documents_after(files: list[Path], sizes: list[int], offset: int) -> Iterator[str]:
    """The documents that start after byte `offset` of the files' concatenation, then on from the first file
    once (so a window near the end is completed from the start)."""
    first, skip = 0, offset
    while first < len(files) and skip >= sizes[first]:
        skip, first = skip - sizes[first], first + 1
    order = list(range(first, len(files))) + list(range(0, first + 1))
    for k, i in enumerate(order):
        start = skip if k == 0 else 0
        yield from _documents(files[i], start)      # from the first document that starts after `start`
