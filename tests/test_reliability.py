"""No traceback for any input, a stopped run leaves nothing, text read only as far as needed, and a
--stats-cache used only when it is intact and made with the same settings.

Real files and real processes: a prune stopped by SIGTERM in the middle of its work, caches damaged in
generated ways (hypothesis, bounded), and text files read through a counter of the bytes taken.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import make
from moeprune import cli
from moeprune.pipeline import cached_stats
from moeprune.stats import LayerStats, check_cache, file_sha256, _self_sha256

SMALL = ["--calib", "random", "--samples", "2", "--seq-len", "16", "--quiet", "--no-eval"]


def run_main(*argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, err.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "mixtral"
    make("mixtral").save_pretrained(path)
    return path


# ---------------------------------------------------------------- an internal error is one line and a log

def test_an_internal_error_is_one_line_and_the_traceback_goes_to_the_log(model_dir, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug\nover two lines")
    monkeypatch.setattr(cli, "prune", broken)
    out = tmp_path / "out"
    code, err = run_main("prune", model_dir, "--keep", "4", "--out", out, *SMALL)
    log = tmp_path / "out.moeprune-error.log"
    assert code == cli.INTERNAL_ERROR == 3
    assert err.strip() == (f"moeprune: error: internal error (ZeroDivisionError: a bug over two lines); please "
                           f"report it with the log at {log}")
    assert "Traceback" in log.read_text() and "ZeroDivisionError" in log.read_text()
    assert sorted(os.listdir(tmp_path)) == ["out.moeprune-error.log"]
    code, err = run_main("--log", tmp_path / "mine.log", "prune", model_dir, "--keep", "4", "--out", out, *SMALL)
    assert code == 3 and str(tmp_path / "mine.log") in err and "Traceback" not in err
    assert "Traceback" in (tmp_path / "mine.log").read_text()


def test_an_internal_error_without_out_logs_to_the_temp_folder(monkeypatch, tmp_path):
    def broken(args):
        raise KeyError("x")
    monkeypatch.setattr(cli, "cmd_methods", broken)
    code, err = run_main("methods")
    assert code == 3 and err.count("\n") == 1 and "Traceback" not in err
    log = Path(err.strip().rsplit("the log at ", 1)[1])
    try:
        assert log.name.startswith("moeprune-error-") and "KeyError" in log.read_text()
    finally:
        log.unlink()


def test_a_log_beside_out_never_goes_inside_the_input(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "prune", lambda *a, **k: 1 / 0)
    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    before = sorted(os.listdir(folder))
    code, err = run_main("prune", folder, "--keep", "4", "--out", folder / "out", *SMALL)
    assert code == 3 and sorted(os.listdir(folder)) == before
    Path(err.strip().rsplit("the log at ", 1)[1]).unlink()
    code, err = run_main("--log", folder / "error.log", "prune", folder, "--keep", "4", "--out", tmp_path / "o", *SMALL)
    assert code == 3 and sorted(os.listdir(folder)) == before         # not even where --log says
    Path(err.strip().rsplit("the log at ", 1)[1]).unlink()


def test_argparse_errors_are_one_moeprune_error_line():
    code, err = run_main("prune", "--samples", "many")
    assert code == 2 and err.startswith("moeprune: error:") and err.count("\n") == 1 and "invalid int" in err


# ---------------------------------------------------------------- SIGTERM in the middle of real work

def test_sigterm_in_the_middle_of_a_prune_is_honoured_within_seconds(model_dir, tmp_path):
    """A real prune with enough calibration work to last well beyond the signal; SIGTERM is sent once its
    temporary output folder exists (its marker written), and the process must be gone within 10 s."""
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "moeprune.cli", "prune", str(model_dir), "--method", "diverse", "--keep", "4",
            "--out", str(out), "--calib", "random", "--samples", "64", "--seq-len", "256", "--sample-tokens", "4096",
            "--self-calib", "0", "--quiet", "--no-eval"]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240           # generous: importing torch under load takes a while
        while not list(tmp_path.glob(".out.tmp-*/.moeprune-owner")):
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "the prune never created its temporary folder"
            time.sleep(0.02)
        time.sleep(0.5)                             # inside the work, not at its first line
        assert process.poll() is None, "the prune finished before the signal: give it more work"
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    err = process.stderr.read()
    assert code == 128 + signal.SIGTERM, err
    assert took < 10, f"SIGTERM took {took:.1f} s to stop the prune"
    assert "Traceback" not in err and "stopped by signal 15" in err
    assert sorted(os.listdir(tmp_path)) == []


# ---------------------------------------------------------------- the statistics cache

@pytest.fixture(scope="module")
def real_cache(model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    code, err = run_main("prune", model_dir, "--keep", "4", "--out", root / "out", "--stats-cache", root / "stats",
                         *SMALL)
    assert code == 0, err
    return root / "stats"


def header_of(cache: Path) -> dict:
    return json.loads((cache / "stats.json").read_text())


def test_an_intact_cache_is_used_and_reused_by_the_cli(model_dir, real_cache, tmp_path):
    header = header_of(real_cache)
    assert set(header["files"]) == {f"layer-{i}.safetensors" for i in header["layers"]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        files = cached_stats(str(real_cache), header["calibration"], header["layers"])
    assert sorted(files) == header["layers"]
    cache = tmp_path / "stats"
    shutil.copytree(real_cache, cache)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        code, err = run_main("prune", model_dir, "--keep", "2", "--out", tmp_path / "out", "--stats-cache", cache,
                             *SMALL)
    assert code == 0 and "stats-cache" not in err + " ".join(str(w.message) for w in seen), err


def test_the_cache_key_holds_the_weight_similarity_need(real_cache):
    header = header_of(real_cache)
    files, why = check_cache(real_cache, header["calibration"], header["layers"], weight_similarity=True)
    has_weight = any(k.endswith("/weight") for k in safe_open(str(next(iter(files.values()))), "pt").keys()) \
        if files else False
    assert (files and has_weight) or (not files and "weight similarity" in why)


def test_changed_calibration_text_is_a_reason(tmp_path):
    text = tmp_path / "c.txt"
    text.write_text("one two three\n")
    from moeprune.stats import input_fingerprint
    before = input_fingerprint({"spec": str(text), "model": "demo-mixtral"})
    text.write_text("one two three four\n")
    assert input_fingerprint({"spec": str(text), "model": "demo-mixtral"}) != before


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings, strategies as st  # noqa: E402

FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def rehash(cache: Path) -> None:
    """Make stats.json agree with the files again: a tampering that a checksum alone would not catch."""
    header = header_of(cache)
    header["files"] = {name: file_sha256(cache / name) for name in header["files"] if (cache / name).is_file()}
    header["sha256"] = _self_sha256(header)
    (cache / "stats.json").write_text(json.dumps(header))


def rewrite_layer(path: Path, change) -> None:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(path), metadata=meta)


TENSOR_DAMAGE = {
    "nan counts": lambda t: t["counts"].__setitem__(0, float("nan")),
    "negative counts": lambda t: t["counts"].__setitem__(1, -3.0),
    "infinite outputs": lambda t: t["outputs"].view(-1).__setitem__(0, float("inf")),
    "short prob_sum": lambda t: t.__setitem__("prob_sum", t["prob_sum"][:-1].clone()),
    "wrong logits shape": lambda t: t.__setitem__("logits", t["logits"][:, :-1].clone()),
    "int counts": lambda t: t.__setitem__("counts", t["counts"].long()),
    "no reap_sum": lambda t: t.pop("reap_sum"),
    "3-d inputs": lambda t: t.__setitem__("inputs", t["inputs"][None].clone()),
}


@st.composite
def tamperings(draw):
    kind = draw(st.sampled_from(["bytes", "truncate", "delete", "header", "tensor", "extra"]))
    return kind, draw(st.integers(0, 2**31)), draw(st.booleans())


@FUZZ
@given(tamper=tamperings())
def test_a_tampered_cache_is_never_used(real_cache, tmp_path_factory, tamper):
    kind, n, again = tamper
    cache = tmp_path_factory.mktemp("t") / "stats"
    shutil.copytree(real_cache, cache)
    header = header_of(cache)
    names = sorted(header["files"]) + ["stats.json"]
    target = cache / names[n % len(names)]
    if kind == "bytes":
        data = bytearray(target.read_bytes())
        data[n % len(data)] ^= 1 + n % 255
        target.write_bytes(bytes(data))
    elif kind == "truncate":
        target.write_bytes(target.read_bytes()[:n % max(1, target.stat().st_size)])
    elif kind == "delete":
        target.unlink()
    elif kind == "header":
        field = sorted(header)[n % len(header)]
        header[field] = [None, 1.5, "x", {}, [], -1, True][n % 7]
        (cache / "stats.json").write_text(json.dumps(header))
    elif kind == "tensor":
        target = cache / sorted(header["files"])[n % len(header["files"])]
        rewrite_layer(target, list(TENSOR_DAMAGE.values())[n % len(TENSOR_DAMAGE)])
    elif kind == "extra":
        (cache / "stats.json").write_text((cache / "stats.json").read_text() + "\n" + "}" * (n % 3))
    if again and kind in ("bytes", "truncate", "tensor") and target.name != "stats.json":
        rehash(cache)
    event(f"{kind}{' rehashed' if again else ''}")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        files = cached_stats(str(cache), header_of(real_cache)["calibration"], header_of(real_cache)["layers"])
    messages = [str(w.message) for w in seen]
    if files:          # only a change that left valid statistics behind (the checksums redone): they load
        assert not messages
        for path in files.values():
            ls = LayerStats.load(path)
            assert bool((ls.counts >= 0).all()) and bool(ls.counts.isfinite().all())
        event("used: still valid statistics")
    else:
        assert len(messages) == 1 and "is not used: " in messages[0] and "recollected" in messages[0], messages
        event(messages[0].split("is not used: ")[1][:40])


def test_a_tampered_cache_through_the_cli_is_recollected(model_dir, real_cache, tmp_path):
    cache = tmp_path / "stats"
    shutil.copytree(real_cache, cache)
    layer = cache / sorted(header_of(cache)["files"])[0]
    rewrite_layer(layer, TENSOR_DAMAGE["nan counts"])
    rehash(cache)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        code, err = run_main("prune", model_dir, "--keep", "4", "--out", tmp_path / "out", "--stats-cache", cache,
                             *SMALL)
    messages = " ".join(str(w.message) for w in seen)
    assert code == 0, err
    assert "counts holds NaN" in messages and "recollected" in messages
    assert check_cache(cache, header_of(cache)["calibration"], header_of(cache)["layers"])[1] is None


# ---------------------------------------------------------------- text read as a stream, only as far as needed

from conftest import char_tokenizer  # noqa: E402
from moeprune import text as textmod  # noqa: E402
from moeprune.arch import MoePruneError  # noqa: E402


def whole_file_reference(data: bytes, path: Path, sep: str) -> list[str] | str:
    """What the reader did before it streamed: decode the whole file, normalise the newlines, split."""
    try:
        decoded = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return f"{path} is not UTF-8 text (byte {e.start}, line {line}: {data[e.start:e.start + 1]!r})"
    return decoded.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n").split(sep)


pieces = st.sampled_from(["a", "b c", "\n", "\n\n", "\r\n", "\r", " ", "é", "漢", "😀", "\ufeff", "{\"text\": \"x\"}"])
raw = st.one_of(st.lists(pieces, max_size=30).map(lambda p: "".join(p).encode()),
                st.binary(max_size=40),
                st.tuples(st.lists(pieces, max_size=10), st.binary(min_size=1, max_size=3)).map(
                    lambda t: "".join(t[0]).encode() + t[1] + b"tail\n"))


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=raw, block=st.integers(1, 9))
def test_the_stream_reads_what_the_whole_file_read(tmp_path_factory, monkeypatch, data, block):
    """Tiny blocks, so that characters, \\r\\n pairs and separators fall across block boundaries."""
    monkeypatch.setattr(textmod, "BLOCK", block)
    path = tmp_path_factory.mktemp("s") / "t.txt"
    path.write_bytes(data)
    expected = whole_file_reference(data, path, "\n\n")
    try:
        docs = textmod._read_txt(path)
        lines = [line for _, line, _ in textmod._pieces(path, "\n", 0, None)]
    except MoePruneError as e:
        assert isinstance(expected, str) and str(e).startswith(expected), (str(e), expected)
        return
    assert docs == [d for d in expected if d.strip()]
    assert lines == whole_file_reference(data, path, "\n")


def reference_windows(docs: list[str], tok, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """calibration_tokens as it was for every input: all documents shuffled, cut into windows, seeded picks."""
    import random
    rng = random.Random(seed)
    docs = list(docs)
    rng.shuffle(docs)
    stream = []
    for doc in docs:
        stream.extend(tok(doc, add_special_tokens=False, verbose=False)["input_ids"] + [tok.eos_token_id])
    picks = sorted(rng.sample(range(len(stream) // seq_len), samples))
    return torch.tensor([stream[w * seq_len:(w + 1) * seq_len] for w in picks])


def test_windows_of_a_source_under_the_threshold_are_unchanged(tmp_path):
    tok = char_tokenizer()
    docs = [f"document {i}: the cat sat on mat {i % 7}.\r\nsecond line {i}" for i in range(200)]
    (tmp_path / "a.txt").write_bytes(("\ufeff" + "\n\n\n".join(docs[:120])).encode())
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[120:]) + "\n")
    for spec in (tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path):
        want = textmod.load_texts(str(spec))
        got = textmod.calibration_tokens(str(spec), tok, samples=8, seq_len=24, seed=3)
        assert torch.equal(got, reference_windows(want, tok, 8, 24, 3))
    assert textmod.load_texts(str(tmp_path / "a.txt"))[1].startswith("\n")     # "\n\n\n" splits as it did


def big_text(path: Path, megabytes: int) -> Path:
    """Distinct numbered paragraphs, `megabytes` MiB of them."""
    with open(path, "w") as f:
        n = 0
        while f.tell() < megabytes << 20:
            f.write(f"{n} is the number of this paragraph of the big file.\nit has a second line, {n}.\n\n")
            n += 1
    return path


def test_a_source_over_the_threshold_is_sampled_reading_only_what_it_needs(tmp_path, monkeypatch):
    import tracemalloc
    monkeypatch.setattr(textmod, "LAZY_BYTES", 1 << 20)
    monkeypatch.setattr(textmod, "BLOCK", 16 << 10)
    path = big_text(tmp_path / "big.txt", 24)
    size = path.stat().st_size
    tok = char_tokenizer()
    textmod.READ["bytes"] = 0
    tracemalloc.start()
    try:
        a = textmod.calibration_tokens(str(path), tok, samples=16, seq_len=64, seed=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    read = textmod.READ["bytes"]
    assert a.shape == (16, 64) and read <= 16 * 2 * (16 << 10), read      # a block or two per window
    assert peak < 4 << 20, peak                                            # not the 24 MiB file
    b = textmod.calibration_tokens(str(path), tok, samples=16, seq_len=64, seed=0)
    c = textmod.calibration_tokens(str(path), tok, samples=16, seq_len=64, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    text = tok.decode(a[0])
    assert "paragraph" in text and "<unk>" not in text
    textmod.READ["bytes"] = 0
    with pytest.warns(UserWarning, match=r"only its first 1 MiB were checked"):
        textmod.check_spec(str(path))
    assert textmod.READ["bytes"] <= (1 << 20) + (16 << 10) < size


def test_a_bad_line_beyond_the_checked_part_is_one_error_when_reached(tmp_path, monkeypatch):
    monkeypatch.setattr(textmod, "LAZY_BYTES", 64 << 10)
    path = tmp_path / "big.jsonl"
    good = json.dumps({"text": "some words here and there"}) + "\n"
    path.write_text(good * 8000 + "{broken\n" + good * 10)
    with pytest.warns(UserWarning, match="only its first"):
        textmod.check_spec(str(path))               # the bad line lies beyond the checked part
    with pytest.raises(MoePruneError, match=r"big.jsonl:8001: not valid JSON"):
        list(textmod.iter_texts(str(path)))


def test_iter_texts_stops_where_the_caller_stops(tmp_path, monkeypatch):
    monkeypatch.setattr(textmod, "BLOCK", 4096)
    path = big_text(tmp_path / "big.txt", 4)
    textmod.READ["bytes"] = 0
    first = [d for d, _ in zip(textmod.iter_texts(str(path)), range(3))]
    assert len(first) == 3 and textmod.READ["bytes"] <= 2 * 4096
