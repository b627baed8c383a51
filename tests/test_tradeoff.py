"""--report-tradeoff: alternatives planned from one statistics pass, scored on held-out calibration text.

The numbers are checked against the plain in-memory evaluation of the written checkpoints: the chosen plan's
row equals the written model's held-out perplexity ratio, and an alternative's saved plan, applied with
--plan, gives exactly the ratio its row reports (the engine ran it on a copy of each layer's block).
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import char_tokenizer, make
from moeprune import api
from moeprune.text import split_held_out, text_domains
from moeprune.checkpoint import load
from moeprune.cli import main
from moeprune.evaluate import Evaluation
from moeprune.tradeoff import HELD_OUT

ANIMALS = ["the cat sat on the mat.", "a dog ran to the park.", "the bird sang a song.", "fish swim in the sea.",
           "the cow ate the grass.", "a fox hid in the woods.", "the owl woke at night.", "bees make honey.",
           "the horse ran fast.", "a mouse ate the cheese."]
NUMBERS = ["12 + 30 = 42.", "7 times 6 is 42.", "100 - 58 = 42.", "84 / 2 = 42.", "40 + 2 = 42.", "6 * 7 = 42.",
           "21 + 21 = 42.", "50 - 8 = 42.", "14 * 3 = 42.", "126 / 3 = 42."]


@pytest.fixture
def folder(tmp_path):
    model = tmp_path / "model"
    make("mixtral").save_pretrained(model)
    char_tokenizer().save_pretrained(model)
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "animals.txt").write_text("\n\n".join(ANIMALS * 3) + "\n")
    (calib / "numbers.txt").write_text("\n\n".join(NUMBERS * 3) + "\n")
    return model, calib


def held_out_ratio(original, pruned, calib) -> dict[str, float]:
    _, held = split_held_out(text_domains(str(calib)), HELD_OUT, 0)
    a, b = load(str(original)), load(str(pruned))
    ev = Evaluation(a.tokenizer, a.model.config, tasks=[], texts=held, max_tokens=4096)
    before, after = ev.run(a.model, progress=False)["perplexity"], ev.run(b.model, progress=False)["perplexity"]
    return {d: math.exp(after[d]["nll"] - before[d]["nll"]) for d in before}


def test_tradeoff_rows_equal_the_written_checkpoints(folder, tmp_path):
    model, calib = folder
    result = api.prune(api.PruneConfig(model=str(model), method="frequency", keep=5, calib=str(calib), samples=4,
                                       seq_len=32, out=str(tmp_path / "out"), quiet=True, no_eval=True,
                                       report_tradeoff=True))
    t = result.report.tradeoff
    assert t["chosen"] == "frequency" and list(t["rows"])[0] == "frequency"
    assert {"diverse", "diverse-prune agglomerative", "reap", "msmoe"} <= set(t["rows"])
    assert set(t["held_out_tokens"]) == {"animals", "numbers"}
    written = held_out_ratio(model, tmp_path / "out", calib)
    for d, r in t["rows"]["frequency"]["ratio"].items():
        assert r == pytest.approx(written[d], rel=1e-5)
    # an alternative's saved plan, applied with --plan, is the model its row scored
    plan = tmp_path / "out" / t["rows"]["diverse"]["plan"]
    assert json.loads(plan.read_text())["method"] == "diverse"
    api.prune(api.PruneConfig(model=str(model), plan=str(plan), out=str(tmp_path / "div"), quiet=True, no_eval=True))
    applied = held_out_ratio(model, tmp_path / "div", calib)
    for d, r in t["rows"]["diverse"]["ratio"].items():
        assert r == pytest.approx(applied[d], rel=1e-5)
    r = t["rows"]["diverse"]
    assert r["worst"]["ratio"] == max(r["ratio"].values()) and r["mean"] == pytest.approx(sum(r["ratio"].values()) / 2)
    assert "## Trade-off on held-out calibration text" in (tmp_path / "out" / "report.md").read_text()


def test_tradeoff_needs_text(folder, tmp_path, capsys):
    model, _ = folder
    code = main(["prune", str(model), "--keep", "5", "--calib", "random", "--report-tradeoff", "--out",
                 str(tmp_path / "out"), "--quiet", "--no-eval"])
    assert code == 2 and "held-out calibration text" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_held_out_split_is_by_document_and_disjoint(tmp_path):
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i}", "domain": "ab"[i % 2]})
                                                for i in range(10)) + "\n")
    domains = text_domains(str(tmp_path / "t.jsonl"))
    assert sorted(domains) == ["a", "b"] and len(domains["a"]) == 5
    calib, held = split_held_out(domains, 0.2, 0)
    assert {d: len(v) for d, v in held.items()} == {"a": 1, "b": 1} and len(calib) == 8
    assert not set(calib) & {doc for docs in held.values() for doc in docs}
    assert split_held_out(domains, 0.2, 0) == (calib, held)          # seeded
