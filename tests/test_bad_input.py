"""Bad input fails early with a message naming the problem and the fix; nothing is damaged or half-written.

Every check runs on real files and real processes: a CLI run must exit 2, leave no output folder and no
temporary folder, and leave the input model folder byte-identical. Tests marked xfail describe the
final behaviour of `moeprune prune` once the pipeline calls the preflight checks and atomic.AtomicFolder.
"""

from __future__ import annotations

import hashlib
import shutil
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from conftest import make, word_tokenizer
from moeprune.arch import MoePruneError
from moeprune.atomic import MARKER, AtomicFolder, Terminated
from moeprune.cli import main
from moeprune.evaluate import Evaluation
from moeprune.preflight import check_finite, check_free_space, usable_tokenizer

SMALL = ["--calib", "random", "--samples", "2", "--seq-len", "16", "--quiet"]


# ---------------------------------------------------------------- helpers

def check_eval_inputs(tokenizer, domains, tasks, max_tokens=None, limit=None) -> None:
    """The evaluation's own preparation is the check: it reads, tokenises and validates before any model runs."""
    Evaluation(tokenizer, make("mixtral").config, domains, tasks, max_tokens=max_tokens, task_limit=limit)


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def temporaries(parent: Path, name: str = "out") -> list[Path]:
    return sorted(parent.glob(f".{name}.tmp-*"))


def assert_nothing_written(parent: Path, name: str = "out") -> None:
    assert not (parent / name).exists() and not temporaries(parent, name)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "mixtral"
    make("mixtral").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bare_qwen(tmp_path_factory) -> Path:
    """A qwen2_moe folder without tokenizer files: transformers 5 loads an empty Qwen2Tokenizer from it."""
    path = tmp_path_factory.mktemp("models") / "qwen2_moe"
    make("qwen2_moe").save_pretrained(path)
    return path


# ---------------------------------------------------------------- calibration text

BAD_CALIBRATION = {
    "latin1.txt": (b"first document\n\nsecond caf\xe9 au lait\n", "latin1.txt is not UTF-8 text (byte 26, line 3"),
    "broken.jsonl": (b'{"text": "a"}\n\n{"text": "b",}\n', "broken.jsonl:3: not valid JSON"),
    "number.jsonl": (b'{"text": "a"}\n{"text": 42}\n', 'number.jsonl:2: "text" is a number, not a string'),
    "list.jsonl": (b'["text"]\n', 'list.jsonl:1: a .jsonl text file needs a "text" field'),
    "empty.txt": (b"\n\n   \n", "holds no documents"),
}


@pytest.mark.parametrize("name", BAD_CALIBRATION)
def test_bad_calibration_file_stops_the_cli(model_dir, tmp_path, capsys, name):
    data, message = BAD_CALIBRATION[name]
    (tmp_path / name).write_bytes(data)
    before = hashes(model_dir)
    code, err = run(capsys, "prune", model_dir, "--keep", 4, "--out", tmp_path / "out", "--calib", tmp_path / name)
    assert code == 2 and message in err, err
    assert str(tmp_path / name) in err
    assert_nothing_written(tmp_path)
    assert hashes(model_dir) == before


def test_non_utf8_message_says_how_to_convert(tmp_path):
    from moeprune.text import check_spec
    (tmp_path / "calib").mkdir()
    (tmp_path / "calib" / "a.txt").write_text("fine\n")
    (tmp_path / "calib" / "b.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(MoePruneError, match=r"b.txt is not UTF-8 text \(byte 0, line 1.*iconv -f latin1 -t utf-8"):
        check_spec(str(tmp_path / "calib"))


def test_empty_calibration_folder(model_dir, tmp_path, capsys):
    (tmp_path / "calib").mkdir()
    (tmp_path / "calib" / "a.txt").write_text("\n\n")
    (tmp_path / "calib" / "b.jsonl").write_text("\n")
    code, err = run(capsys, "prune", model_dir, "--keep", 4, "--out", tmp_path / "out", "--calib", tmp_path / "calib")
    assert code == 2 and f"calibration text folder {tmp_path / 'calib'} holds no documents" in err, err
    assert_nothing_written(tmp_path)


# ---------------------------------------------------------------- tokenizers

@pytest.mark.parametrize("family,size", [("qwen2_moe", 1), ("olmoe", 2)])
def test_tokenizerless_folder_gives_an_unusable_tokenizer(tmp_path, family, size):
    make(family).save_pretrained(tmp_path / family)
    before = hashes(tmp_path / family)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / family)      # transformers 5: an empty tokenizer
    ok, why = usable_tokenizer(tokenizer)
    assert not ok and f"only {size} token(s)" in why and "no tokenizer files" in why, why
    assert hashes(tmp_path / family) == before
    assert usable_tokenizer(None) == (False, "the model has no tokenizer")
    assert usable_tokenizer(word_tokenizer()) == (True, "")


def test_prune_without_a_usable_tokenizer_saves_and_notes_the_skipped_evaluation(bare_qwen, tmp_path, capsys):
    before = hashes(bare_qwen)
    code, err = run(capsys, "prune", bare_qwen, "--keep", 6, "--out", tmp_path / "out", *SMALL)
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    note = report.get("evaluation_note", "")
    assert "skipped" in note and "tokenizer" in note and "encode text" in note, report
    assert "evaluation" not in report
    assert (tmp_path / "out" / "config.json").exists() and not (tmp_path / "out" / "tokenizer_config.json").exists()
    assert not temporaries(tmp_path) and hashes(bare_qwen) == before


# ---------------------------------------------------------------- evaluation inputs

def write_task(path: Path, questions: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(q) for q in questions) + "\n")
    return path


GOOD_Q = {"query": "the cat sat on the", "choices": ["mat", "dog"], "gold": 0}
EMPTY_CHOICE_Q = {"query": "the dog is a", "choices": ["big dog", "   "], "gold": 0}    # "   " encodes to nothing


def test_eval_inputs_accept_good_input(tmp_path):
    (tmp_path / "text.txt").write_text("the cat sat on the mat\n\nthe dog ran\n")
    task = write_task(tmp_path / "task.jsonl", [GOOD_Q])
    check_eval_inputs(word_tokenizer(), [str(tmp_path / "text.txt")], [str(task)], max_tokens=64, limit=10)
    check_eval_inputs(word_tokenizer(), [], [], max_tokens=None, limit=None)       # nothing to evaluate


def test_eval_task_with_a_choice_that_encodes_to_nothing(tmp_path):
    task = write_task(tmp_path / "blank.jsonl", [GOOD_Q, EMPTY_CHOICE_Q])
    with pytest.raises(MoePruneError, match=r"task 'blank' .*blank.jsonl\), question 2 \('the dog is a'\): choice "
                                            r"'   ' encodes to no tokens.*--eval-tasks"):
        check_eval_inputs(word_tokenizer(), [], [str(task)], max_tokens=None, limit=None)
    check_eval_inputs(word_tokenizer(), [], [str(task)], max_tokens=None, limit=1)    # outside the limit: fine


@pytest.mark.parametrize("content,max_tokens,message", [
    (b"the cat sat\n", 1, "gives 1 token(s) with this tokenizer and perplexity needs at least 2; raise --eval-max"),
    (b"the caf\xe9\n", None, "not UTF-8 text (byte 7, line 1"),
    (b"\n\n", None, "evaluation text file"),
])
def test_eval_domain_errors(tmp_path, content, max_tokens, message):
    (tmp_path / "dom.txt").write_bytes(content)
    with pytest.raises(MoePruneError) as e:
        check_eval_inputs(word_tokenizer(), [str(tmp_path / "dom.txt")], [], max_tokens=max_tokens, limit=None)
    assert message in str(e.value) and "dom" in str(e.value)


def test_eval_task_file_errors_name_the_line(tmp_path):
    (tmp_path / "t.jsonl").write_bytes(json.dumps(GOOD_Q).encode() + b"\n{oops\n")
    with pytest.raises(MoePruneError, match=r"t.jsonl:2: not valid JSON"):
        check_eval_inputs(word_tokenizer(), [], [str(tmp_path / "t.jsonl")])
    (tmp_path / "t.jsonl").write_bytes(b'{"query": "caf\xe9", "choices": ["a", "b"], "gold": 0}\n')
    with pytest.raises(MoePruneError, match=r"t.jsonl is not UTF-8 text \(byte 14, line 1"):
        check_eval_inputs(word_tokenizer(), [], [str(tmp_path / "t.jsonl")])


def test_eval_inputs_need_a_usable_tokenizer(bare_qwen):
    with pytest.raises(MoePruneError, match=r"Qwen2Tokenizer has only 1 token.*--no-eval"):
        check_eval_inputs(AutoTokenizer.from_pretrained(bare_qwen), [], [])


def test_prune_refuses_an_unscorable_task_before_the_heavy_work(tmp_path, capsys):
    model = tmp_path / "model"
    make("mixtral").save_pretrained(model)
    word_tokenizer().save_pretrained(model)
    (tmp_path / "text.txt").write_text("the cat sat on the mat\n")
    task = write_task(tmp_path / "blank.jsonl", [EMPTY_CHOICE_Q])
    before = hashes(model)
    code, err = run(capsys, "prune", model, "--keep", 4, "--out", tmp_path / "out", *SMALL,
                    "--eval-domains", tmp_path / "text.txt", "--eval-tasks", task, "--eval-max-tokens", 64)
    assert code == 2 and "question 1" in err and "encodes to no tokens" in err, err
    assert_nothing_written(tmp_path)
    assert hashes(model) == before


# ---------------------------------------------------------------- disk space and NaN

def test_free_space_check_names_both_sizes_and_the_folder(tmp_path):
    with pytest.raises(MoePruneError, match=r"not enough free space in .*not/yet/made for the pruned checkpoint: it "
                                            r"needs about [\d,.]+ GiB \(931,322,574.62 GiB plus a margin\) and the "
                                            r"filesystem has [\d,.]+ GiB free"):
        check_free_space(tmp_path / "not" / "yet" / "made", 10**18)
    check_free_space(tmp_path, 1)
    absurd = AtomicFolder(tmp_path / "out", needs_bytes=10**18)
    with pytest.raises(MoePruneError, match="not enough free space"), absurd:
        pass
    assert_nothing_written(tmp_path)


def test_check_finite_names_the_tensor():
    check_finite("fine", torch.ones(3))
    check_finite("ints", torch.arange(3))
    bad = torch.ones(5)
    bad[1], bad[3] = float("nan"), float("-inf")
    with pytest.raises(MoePruneError, match=r"^model.layers.3.mlp.experts.5.w1.weight holds 1 NaN and 1 infinite "
                                            r"value\(s\) of 5; .*--dtype float32"):
        check_finite("model.layers.3.mlp.experts.5.w1.weight", bad)


def test_prune_refuses_a_checkpoint_with_nan_weights(model_dir, tmp_path, capsys):
    bad = tmp_path / "nan"
    bad.mkdir()
    for f in model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = load_file(bad / "model.safetensors")
    weights["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("nan")
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    before = hashes(bad)
    code, err = run(capsys, "prune", bad, "--keep", 4, "--out", tmp_path / "out", *SMALL, "--no-eval")
    assert code == 2 and "model.layers.1.self_attn.o_proj.weight" in err and "NaN" in err, err
    assert_nothing_written(tmp_path)
    assert hashes(bad) == before


# ---------------------------------------------------------------- atomic output folder

def test_atomic_folder_success_error_and_handlers(tmp_path):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(RuntimeError), AtomicFolder(tmp_path / "out") as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")
    assert_nothing_written(tmp_path)
    with AtomicFolder(tmp_path / "out") as tmp:
        assert json.loads((tmp / MARKER).read_text()) == {"pid": os.getpid(), "host": socket.gethostname()}
        if handlers[signal.SIGTERM] is signal.SIG_DFL:
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        (tmp / "weights.bin").write_bytes(b"w")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["weights.bin"] and not temporaries(tmp_path)
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_a_finished_output_is_kept_when_out_appears_meanwhile(tmp_path):
    kept = r"appeared while pruning; not replacing it. The finished output is kept in .*\.out\.tmp-"
    with pytest.raises(MoePruneError, match=kept), AtomicFolder(tmp_path / "out") as tmp:
        (tmp / "weights.bin").write_bytes(b"w")
        (tmp_path / "out").mkdir()
    assert (tmp / "weights.bin").read_bytes() == b"w" and not (tmp / MARKER).exists()
    with pytest.warns(UserWarning, match="no moeprune owner marker"), AtomicFolder(tmp_path / "out", True) as new:
        (new / "x").write_text("x")
    assert (tmp / "weights.bin").exists() and (tmp_path / "out" / "x").exists()


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def stray(parent: Path, name: str, pid: int | None, host: str | None = None) -> Path:
    folder = parent / name
    folder.mkdir()
    (folder / "half.safetensors").write_bytes(b"\0" * 64)
    if pid is not None:
        (folder / MARKER).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname()}))
    return folder


def test_strays_of_a_killed_run_are_removed_and_live_ones_kept(tmp_path):
    dead = stray(tmp_path, ".out.tmp-deadbeef", dead_pid())
    live = stray(tmp_path, ".out.tmp-0badc0de", os.getpid())
    remote = stray(tmp_path, ".out.tmp-12345678", dead_pid(), host="another-host")
    other_output = stray(tmp_path, ".other.tmp-deadbeef", dead_pid())
    not_ours = stray(tmp_path, ".out.tmp-notes", dead_pid())
    with pytest.warns(UserWarning) as seen, AtomicFolder(tmp_path / "out") as tmp:
        (tmp / "w").write_text("w")
    messages = " | ".join(str(w.message) for w in seen)
    assert f"removed {dead}: the unfinished output of a killed run" in messages
    assert "a running process" in messages and "another-host" in messages
    assert not dead.exists() and live.exists() and remote.exists() and other_output.exists() and not_ours.exists()
    assert (tmp_path / "out" / "w").exists()


@pytest.fixture
def default_sigint():
    """Python's own SIGINT handler and the default SIGHUP for the test (a background test run may start with SIGINT
    ignored, one under nohup with SIGHUP ignored, which AtomicFolder rightly leaves ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler), signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGINT, previous[0])
    signal.signal(signal.SIGHUP, previous[1])


@pytest.mark.parametrize("signum,raised", [(signal.SIGTERM, Terminated), (signal.SIGHUP, Terminated),
                                           (signal.SIGINT, KeyboardInterrupt)])
def test_signal_inside_the_block_removes_the_temporary_folder(tmp_path, default_sigint, signum, raised):
    before = signal.getsignal(signum)
    with pytest.raises(raised) as e, AtomicFolder(tmp_path / "out") as tmp:
        (tmp / "weights.bin").write_bytes(bytes(4096))
        # installed by AtomicFolder, else the kill below would end pytest itself
        assert signal.getsignal(signum) not in (signal.SIG_DFL, signal.default_int_handler)
        os.kill(os.getpid(), signum)
        time.sleep(10)                      # interrupted by the handler
    assert raised is KeyboardInterrupt or e.value.code == 128 + signum
    assert_nothing_written(tmp_path)
    assert signal.getsignal(signum) is before


CHILD = textwrap.dedent("""
    import sys, time
    from moeprune.atomic import AtomicFolder
    with AtomicFolder(sys.argv[1]) as tmp:
        (tmp / "weights.bin").write_bytes(bytes(4096))
        (tmp / "ready").touch()
        time.sleep(120)
""")


@pytest.fixture(scope="module")
def children(tmp_path_factory):
    """Two child processes, started together (each spends seconds importing torch), each inside a
    `with AtomicFolder(...)` block, writing, then sleeping: one for SIGTERM, one for SIGKILL."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = {}
    for name in ("SIGTERM", "SIGKILL"):
        parent = tmp_path_factory.mktemp(name)
        started[name] = (parent, subprocess.Popen([sys.executable, "-c", CHILD, str(parent / "out")], env=env,
                                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    yield started
    for _, process in started.values():
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_until_ready(parent: Path, process: subprocess.Popen, timeout: float = 300) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = list(parent.glob(".out.tmp-*/ready"))
        if ready:
            return ready[0].parent
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.05)
    raise AssertionError(f"the child never entered its AtomicFolder block in {timeout} s")


def test_sigterm_to_a_process_removes_its_temporary_folder(children):
    parent, process = children["SIGTERM"]
    tmp = wait_until_ready(parent, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM, process.stderr.read().decode()
    assert not tmp.exists() and not (parent / "out").exists() and not temporaries(parent)


def test_sigkill_leaves_a_stray_that_the_next_run_removes(children):
    parent, process = children["SIGKILL"]
    tmp = wait_until_ready(parent, process)
    process.kill()
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert tmp.exists() and json.loads((tmp / MARKER).read_text())["pid"] == process.pid
    with pytest.warns(UserWarning, match="unfinished output of a killed run"), AtomicFolder(parent / "out") as new:
        (new / "weights.bin").write_bytes(b"new")
    assert not tmp.exists() and not temporaries(parent) and (parent / "out" / "weights.bin").read_bytes() == b"new"


def test_prune_cleans_the_stray_of_a_killed_run(model_dir, tmp_path, capsys):
    dead = stray(tmp_path, ".out.tmp-deadbeef", dead_pid())
    with pytest.warns(UserWarning, match=f"removed {dead}: the unfinished output of a killed run"):
        code, err = run(capsys, "prune", model_dir, "--keep", 4, "--out", tmp_path / "out", *SMALL, "--no-eval")
    assert code == 0, err
    assert not dead.exists() and not temporaries(tmp_path) and (tmp_path / "out" / "plan.json").exists()


@pytest.mark.parametrize("field,value,message", [
    ("architectures", "MixtralForCausalLM", "field 'architectures' is 'MixtralForCausalLM', not a list of class names"),
    ("auto_map", ["modeling.Model"], "field 'auto_map' is ['modeling.Model'], not an object"),
    ("num_experts_per_tok", 9, "field 'num_experts_per_tok' (9) exceeds the expert count 'num_local_experts' (8)"),
    ("num_local_experts", 0, "field 'num_local_experts' is 0; it must be a positive integer"),
])
def test_damaged_config_fields_are_named(model_dir, tmp_path, capsys, field, value, message):
    """Fields of config.json that decide what is built and how many experts it has, checked before any model work
    (a string `architectures` once slipped through when a name shadowed the top-level config)."""
    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    code, err = run(capsys, "prune", folder, "--keep", 4, "--calib", "random", "--no-eval", "--out", tmp_path / "out")
    assert code == 2 and message in err, err
    assert_nothing_written(tmp_path)
