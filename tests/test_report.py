"""The report: built from a real tiny prune and a real before/after evaluation; files parse, plots are PNGs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import pytest
import torch
from test_evaluate import word_tokenizer

from moeprune import api
from moeprune.arch import MoePruneError
from moeprune.checkpoint import load
from moeprune.evaluate import evaluate_model, evaluation_section
from moeprune.evaluate.command import add_eval_parser, cmd_eval
from moeprune.plan import LayerPlan
from moeprune.report import _group_order, _roles, jsonable, summary_table, write_report
from moeprune.tiny import tiny_model

PNG = b"\x89PNG\r\n\x1a\n"


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def _assert_png(path):
    import matplotlib.image
    data = path.read_bytes()
    assert data[:8] == PNG, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert float(image[..., :3].std()) > 0.01                   # not a blank canvas


@pytest.fixture
def model_dir(tmp_path):
    """A tiny Mixtral saved with a word-level tokenizer, as a user's local checkpoint would be."""
    path = tmp_path / "model"
    tiny_model("mixtral").save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def texts(tmp_path):
    (tmp_path / "animals.txt").write_text("the cat sat on the mat\n\na big dog ran on the mat\n\nthe fish is red\n")
    (tmp_path / "colours.txt").write_text("red blue green\n\nthe red bird is blue\n\ngreen fish\n")
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in [
        {"query": "the cat sat on the", "choices": ["mat", "dog", "red fish"], "gold": 0},
        {"query": "the bird is", "choices": ["blue", "a cat"], "gold": 0}]))
    return {"domains": [str(tmp_path / "animals.txt"), str(tmp_path / "colours.txt")],
            "tasks": [str(tmp_path / "mc.jsonl")]}


def test_report_from_a_real_prune(tmp_path, model_dir, texts):
    original = load(str(model_dir))
    before = evaluate_model(original.model, original.tokenizer, progress=False, **texts)
    result = api.prune(api.PruneConfig(model=str(model_dir), method="frequency", keep=6, calib="random", samples=2,
                                       seq_len=16, quiet=True, out=str(tmp_path / "pruned"),
                                       eval_domains=",".join(texts["domains"]), eval_tasks=texts["tasks"][0]))
    after = evaluate_model(load(str(tmp_path / "pruned")).model, original.tokenizer, progress=False, **texts)
    # the prune's own evaluation streams both models through one layer at a time: the same numbers
    streamed = result.report.evaluation
    for ours, reference in ((streamed["before"], before), (streamed["after"], after)):
        for d, v in reference["perplexity"].items():
            assert ours["perplexity"][d]["tokens"] == v["tokens"]
            assert ours["perplexity"][d]["nll"] == pytest.approx(v["nll"], rel=1e-5)
        assert {t: r["acc"] for t, r in ours["tasks"].items()} == {t: r["acc"] for t, r in reference["tasks"].items()}
    report = dataclasses.replace(result.report, evaluation=evaluation_section(before, after))

    folder = tmp_path / "report"
    write_report(folder, report, result.stats, result.plan)
    data = _strict_json((folder / "report.json").read_text())
    md = (folder / "report.md").read_text()

    # the numbers went through unchanged
    assert data["method"] == "frequency" and data["keep_per_layer"] == {"0": 6, "1": 6}
    assert data["after"]["parameters"]["total"] == result.report.after["parameters"]["total"]
    comp = data["evaluation"]["comparison"]
    for d in ("animals", "colours"):
        b, a = before["perplexity"][d]["ppl"], after["perplexity"][d]["ppl"]
        assert comp["perplexity"][d] == pytest.approx({"before": b, "after": a, "ratio": a / b})
        assert math.isfinite(a) and a != b                        # two experts fewer changes the model
    ratios = [comp["perplexity"][d]["ratio"] for d in ("animals", "colours")]
    assert comp["mean_ratio"] == pytest.approx(sum(ratios) / 2) and comp["worst"]["ratio"] == max(ratios)
    assert data["evaluation"]["after"]["tasks"]["mc"]["n"] == 2
    assert data["plan"] == {str(i): lp.groups for i, lp in result.plan.layers.items()}
    assert data["stages"]["seconds"]["prune"] >= 0 and data["stages"]["peak_rss_mb"]["prune"] > 0

    # markdown: every section, every domain, images that exist
    total_after = f"{result.report.after['parameters']['total']:,}"
    for text in ("# moeprune report", "## Size", "## Perplexity on held-out text", "animals", "colours",
                 "## Multiple-choice tasks", "## Cost", "## Plan", total_after):
        assert text in md, text
    # frequency reads no expert outputs, so the pass measured no similarity to plot (diverse's report has it)
    assert set(data["images"]) == {"perplexity", "routing"}
    for rel in data["images"].values():
        assert f"]({rel})" in md
        _assert_png(folder / rel)

    table = summary_table(report)
    assert "animals" in table and "colours" in table and "mean" in table and "worst" in table
    assert f"{report.before['parameters']['total']:,}" in table and total_after in table


def test_report_without_evaluation_or_stats(tmp_path):
    result = api.prune(api.PruneConfig(model="tiny:mixtral", method="frequency", keep=6, calib="random", samples=2,
                                       seq_len=16, quiet=True, no_eval=True))
    write_report(tmp_path / "r", result.report)
    data = _strict_json((tmp_path / "r" / "report.json").read_text())
    assert data["images"] == {} and not (tmp_path / "r" / "img").exists()
    assert "## Size" in (tmp_path / "r" / "report.md").read_text()
    assert "parameters" in summary_table(result.report)


def test_group_order_and_roles():
    lp = LayerPlan(8, [[0, 2, 7], [1, 4], [3, 6], [5]], [[1 / 3] * 3, [0.5] * 2, [0.5] * 2, [1.0]], [2, 4, 6, 5])
    order, blocks = _group_order(8, lp)
    assert order == [2, 0, 7, 4, 1, 6, 3, 5]                    # groups contiguous, representative first
    assert blocks == [(0, 3), (3, 2), (5, 2), (7, 1)]
    assert _roles(8, lp) == ["merged", "merged", "target", "merged", "target", "kept", "target", "merged"]
    sel = LayerPlan.selection(4, [3, 1])
    assert _group_order(4, sel) == ([1, 3, 0, 2], [(0, 1), (1, 1)])   # dropped experts last, not outlined
    assert _roles(4, sel) == ["dropped", "kept", "dropped", "kept"]


def test_jsonable_is_strict():
    import numpy as np
    data = jsonable({1: torch.tensor([1.5, float("nan")]), "x": np.float32(2.0), "t": (torch.tensor(3),),
                     "inf": float("inf"), "dtype": torch.bfloat16})
    assert _strict_json(json.dumps(data, allow_nan=False)) == {"1": [1.5, None], "x": 2.0, "t": [3], "inf": None,
                                                                "dtype": "bfloat16"}


def test_eval_command_against_original(tmp_path, model_dir, texts, capsys):
    pruned = tmp_path / "pruned"
    api.prune(api.PruneConfig(model=str(model_dir), method="frequency", keep=4, calib="random", samples=2,
                              seq_len=16, quiet=True, no_eval=True, out=str(pruned)))
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", str(pruned), "--against", str(model_dir), "--domains", *texts["domains"],
                              "--tasks", *texts["tasks"], "--seq-len", "16", "--quiet",
                              "--json", str(tmp_path / "e.json"), "--md", str(tmp_path / "e.md")])
    assert cmd_eval(args) == 0
    out = capsys.readouterr().out
    assert "animals" in out and "mean" in out
    data = _strict_json((tmp_path / "e.json").read_text())
    comp = data["evaluation"]["comparison"]
    assert set(comp["perplexity"]) == {"animals", "colours"}
    assert all(r["ratio"] == pytest.approx(r["after"] / r["before"]) for r in comp["perplexity"].values())
    assert data["before"]["experts_per_layer"] == [8] and data["after"]["experts_per_layer"] == [4]
    md = (tmp_path / "e.md").read_text()
    assert "](e_img/perplexity.png)" in md
    _assert_png(tmp_path / "e_img" / "perplexity.png")
    args = parser.parse_args(["eval", str(pruned), "--domains", "nonsense-domain"])
    with pytest.raises(MoePruneError, match="neither a .txt or .jsonl file nor a demo domain"):
        cmd_eval(args)


def test_single_model_report(tmp_path, texts):
    ev = evaluate_model(tiny_model("mixtral"), word_tokenizer(), domains=texts["domains"], tasks=[], seq_len=8,
                        progress=False)
    report = {"model": "tiny", "evaluation": evaluation_section(None, ev)}
    table = summary_table(report)
    assert "perplexity" in table and "ratio" not in table and f"{ev['perplexity']['animals']['ppl']:.2f}" in table
    write_report(tmp_path / "r", report)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| domain | tokens | perplexity |" in md and "ppl full" not in md
    _assert_png(tmp_path / "r" / "img" / "perplexity.png")
