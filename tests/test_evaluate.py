"""Evaluation: perplexity and multiple-choice scores against values computed by hand, and lm-eval agreement.

The hand-set model is a tiny Mixtral reduced to a bigram model by construction: every weight except the
embeddings and lm_head is zero, so attention and the experts add nothing to the residual stream, and the
final hidden state is RMSNorm(embedding). Token i < 64 embeds as 100 * e_i, which the norm maps to
8 * e_i; with lm_head[:, i] = table[i] / 8 the logits after token i are exactly table[i].
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys

import pytest
import torch

from moeprune import demo
from moeprune.arch import MoePruneError
from moeprune.evaluate import (
    compare,
    domain_perplexity,
    evaluate_model,
    multiple_choice,
    perplexity,
    resolve_domains,
    write_task_yaml,
)
from moeprune.evaluate.multiple_choice import encode_pair, loglikelihoods, task_delimiter
from moeprune.evaluate.perplexity import windows
from moeprune.tiny import tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from conftest import CHARS, V, VOCAB, WORDS, char_tokenizer, word_tokenizer  # noqa: E402,F401


def bigram_model(table: dict[int, dict[int, float]] | None = None):
    """A tiny Mixtral whose logits after token i are table[i] (a dict token -> logit, others 0)."""
    model = tiny_model("mixtral")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.zero_()
        emb = model.get_input_embeddings().weight
        for i in range(64):
            emb[i, i] = 100.0
        for prev, row in (table or {}).items():
            for tok, logit in row.items():
                model.lm_head.weight[tok, prev] = logit / 8.0
    return model


def log_probs(table: dict[int, dict[int, float]], prev: int) -> torch.Tensor:
    """By hand: log softmax over the VOCAB logits after token prev (float64)."""
    logits = torch.zeros(VOCAB, dtype=torch.float64)
    for tok, logit in table.get(prev, {}).items():
        logits[tok] = logit
    return logits - torch.logsumexp(logits, 0)


# ---------------------------------------------------------------- perplexity

def test_uniform_model_has_perplexity_vocab_size():
    model = tiny_model("mixtral")
    with torch.no_grad():
        model.lm_head.weight.zero_()                  # every logit 0: uniform over the 256 tokens
    stream = torch.randint(0, VOCAB, (50,), generator=torch.Generator().manual_seed(0))
    r = perplexity(model, None, stream, seq_len=16, batch_size=2, progress=False)
    assert r["ppl"] == pytest.approx(VOCAB, rel=1e-6)
    assert r["nll"] == pytest.approx(math.log(VOCAB), rel=1e-7)
    assert r["tokens"] == 15 + 15 + 15 + 1          # windows [0,16) [16,32) [32,48) [48,50), first of each unscored


def test_window_layout():
    assert windows(50, 16) == [(0, 16, 1), (16, 32, 17), (32, 48, 33), (48, 50, 49)]
    assert windows(49, 16) == [(0, 16, 1), (16, 32, 17), (32, 48, 33)]      # a 1-token tail predicts nothing
    assert windows(40, 16, stride=8) == [(0, 16, 1), (8, 24, 16), (16, 32, 24), (24, 40, 32)]
    with pytest.raises(MoePruneError):
        windows(40, 16, stride=17)


@pytest.mark.parametrize("stride", [None, 4])
def test_bigram_perplexity_equals_hand_computation(stride):
    g = torch.Generator().manual_seed(3)
    ids = list(range(4, 20))
    table = {i: {j: float(torch.randn(1, generator=g)) * 3 for j in ids} for i in ids}
    model = bigram_model(table)
    stream = torch.tensor(ids)[torch.randint(0, len(ids), (43,), generator=g)]
    L = 8
    # by hand: non-overlapping windows score every position but the first of each window; stride 4 scores all
    positions = [t for t in range(1, 43) if stride is not None or t % L != 0]
    nll = -sum(float(log_probs(table, int(stream[t - 1]))[stream[t]]) for t in positions) / len(positions)
    r = perplexity(model, None, stream, seq_len=L, stride=stride, batch_size=3, progress=False)
    assert r["tokens"] == len(positions)
    assert r["nll"] == pytest.approx(nll, rel=1e-6)
    assert r["ppl"] == pytest.approx(math.exp(nll), rel=1e-6)


def test_text_stream_separates_documents_with_eos(tmp_path):
    table = {V["sat"]: {V["<eos>"]: 5.0}, V["<eos>"]: {V["a"]: 5.0}, V["the"]: {V["cat"]: 2.0}}
    model, tok = bigram_model(table), word_tokenizer()
    docs = ["the cat sat", "a dog ran"]                     # stream: the cat sat <eos> a dog ran <eos>
    stream = [V[w] for w in ("the", "cat", "sat", "<eos>", "a", "dog", "ran", "<eos>")]
    nll = -sum(float(log_probs(table, a)[b]) for a, b in itertools.pairwise(stream)) / 7
    r = perplexity(model, tok, docs, seq_len=64, progress=False)
    assert r["tokens"] == 7 and r["nll"] == pytest.approx(nll, rel=1e-6)
    # the same documents from a .txt (blank-line separated) and a .jsonl file, and per domain
    (tmp_path / "a.txt").write_text("the cat sat\n\na dog ran\n")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    per = domain_perplexity(model, tok, [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], seq_len=64,
                            progress=False)
    assert set(per) == {"a", "b"}
    assert per["a"] == per["b"] == r
    capped = perplexity(model, tok, docs, seq_len=64, max_tokens=4, progress=False)
    assert capped["tokens"] == 3


def test_perplexity_is_deterministic_and_batch_independent():
    model = tiny_model("mixtral")
    stream = torch.randint(0, VOCAB, (100,), generator=torch.Generator().manual_seed(5))
    a = perplexity(model, None, stream, seq_len=16, batch_size=1, progress=False)
    b = perplexity(model, None, stream, seq_len=16, batch_size=8, progress=False)
    assert a["tokens"] == b["tokens"] and a["nll"] == pytest.approx(b["nll"], rel=1e-6)
    assert perplexity(model, None, stream, seq_len=16, batch_size=8, progress=False) == b


def test_domains_errors(tmp_path, monkeypatch):
    with pytest.raises(MoePruneError, match="neither a .txt or .jsonl file nor a demo domain"):
        resolve_domains(["no-such-domain"])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(MoePruneError, match=".txt or .jsonl"):
        resolve_domains([str(tmp_path / "x.csv")])
    (tmp_path / "x.txt").write_text("the cat")
    assert resolve_domains([f"mine={tmp_path / 'x.txt'}"]) == {"mine": tmp_path / "x.txt"}
    monkeypatch.setattr(demo, "ROOT", tmp_path / "nowhere")
    with pytest.raises(MoePruneError, match="evaluation shards .* are missing"):
        resolve_domains(None)
    with pytest.raises(MoePruneError, match="needs a tokenizer"):
        perplexity(tiny_model("mixtral"), None, ["some text"], progress=False)


def test_demo_eval_shards_are_the_default():
    names = demo.domains("eval")
    if not names:
        pytest.skip("demo evaluation shards not built")
    assert resolve_domains(None) == {d: demo.shard("eval", d) for d in names}


# ---------------------------------------------------------------- multiple choice

MC_TABLE = {V["is"]: {V["dog"]: 3.0, V["elephant"]: 2.5, V["big"]: 1.0},
            V["big"]: {V["dog"]: 4.0},
            V["on"]: {V["mat"]: 2.0, V["fish"]: 1.0}}


def test_choice_loglikelihoods_and_accuracy_by_hand():
    model, tok = bigram_model(MC_TABLE), word_tokenizer()
    lp_is, lp_big, lp_on = log_probs(MC_TABLE, V["is"]), log_probs(MC_TABLE, V["big"]), log_probs(MC_TABLE, V["on"])
    requests = [("the cat is", " dog"), ("the cat is", " elephant"), ("the cat is", " big dog"),
                ("the cat is ", " cat"), ("sat on", " mat")]
    expected = [lp_is[V["dog"]], lp_is[V["elephant"]], lp_is[V["big"]] + lp_big[V["dog"]], lp_is[V["cat"]],
                lp_on[V["mat"]]]
    got = loglikelihoods(model, tok, requests, batch_size=2, progress=False)
    assert got == pytest.approx([float(e) for e in expected], abs=1e-5)

    # "dog" has the highest log-likelihood; per character "elephant" wins (8 chars vs 3)
    assert float(lp_is[V["dog"]]) > float(lp_is[V["elephant"]])
    assert float(lp_is[V["dog"]]) / 3 < float(lp_is[V["elephant"]]) / 8
    docs = [{"query": "the cat is", "choices": ["elephant", "dog", "cat"], "gold": 1},       # acc 1, acc_norm 0
            {"query": "a bird is", "choices": ["dog", "elephant"], "gold": 1},              # acc 0, acc_norm 1
            {"query": "the fish is", "choices": ["cat", "elephant"], "gold": "elephant"},    # both 1
            {"query": "it sat on", "choices": ["fish", "mat", "bird"], "gold": 1}]          # acc 1, acc_norm 0
    # the last: ll(mat) = 2 - logZ, ll(fish) = 1 - logZ with logZ = log(254 + e^2 + e) ~ 5.58, and per character
    # (1 - logZ) / 4 > (2 - logZ) / 3
    lz = math.log(254 + math.exp(2) + math.exp(1))
    assert (1 - lz) / 4 > (2 - lz) / 3
    r = multiple_choice(model, tok, docs, batch_size=3, progress=False)
    assert r["n"] == 4
    assert r["acc"] == pytest.approx(3 / 4) and r["acc_norm"] == pytest.approx(2 / 4)
    r1 = multiple_choice(model, tok, docs[:2], progress=False)
    assert (r1["acc"], r1["acc_norm"]) == (0.5, 0.5)
    assert multiple_choice(model, tok, docs[:1], progress=False)["acc_norm"] == 0.0
    assert multiple_choice(model, tok, docs[1:2], progress=False)["acc"] == 0.0
    assert multiple_choice(model, tok, docs[1:2], progress=False)["acc_norm"] == 1.0
    assert r["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2 + 1 / 3) / 4)


def test_encode_pair_follows_lm_eval():
    tok = word_tokenizer(bos=True)
    ctx, cont = encode_pair(tok, "the cat is ", " dog")     # trailing space moves to the continuation
    assert ctx == [V["<bos>"], V["the"], V["cat"], V["is"]] and cont == [V["dog"]]
    ctx, cont = encode_pair(tok, "", "the dog")              # empty query: BOS is the context
    assert ctx == [V["<bos>"]] and cont == [V["the"], V["dog"]]
    chars = char_tokenizer()
    c = {ch: i for i, ch in enumerate(CHARS)}
    ctx, cont = encode_pair(chars, "ab:\n ", "cd")          # the query's trailing whitespace is scored
    assert ctx == [c["a"], c["b"], c[":"]] and cont == [c["\n"], c[" "], c["c"], c["d"]]


def test_batching_does_not_change_scores():
    model, tok = tiny_model("mixtral", seed=4), word_tokenizer(bos=True)
    requests = [("the cat sat on", " the mat"), ("a dog", " ran"), ("the big red fish is on the", " blue mat"),
                ("bird", " is green"), ("the", " cat sat on the red mat")]
    one = loglikelihoods(model, tok, requests, batch_size=1, progress=False)
    many = loglikelihoods(model, tok, requests, batch_size=5, progress=False)
    assert many == pytest.approx(one, abs=1e-4)


def test_task_file_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "q", "choices": ["a"], "gold": 0}) + "\n")
    with pytest.raises(MoePruneError, match="2\\+ non-empty strings"):
        multiple_choice(bigram_model(), word_tokenizer(), bad, progress=False)
    bad.write_text(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 2}) + "\n")
    with pytest.raises(MoePruneError, match="outside 0..1"):
        multiple_choice(bigram_model(), word_tokenizer(), bad, progress=False)


# ---------------------------------------------------------------- lm-evaluation-harness

def _random_task(n: int, seed: int, words=WORDS[4:], style: str = "bare") -> list[dict]:
    """Questions over `words`; style "bare": choices without separator; "spaced": choices start with a space;
    "newline": queries end with a newline."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda k: " ".join(words[int(i)] for i in torch.randint(0, len(words), (k,), generator=g))
    docs = []
    for q in range(n):
        k = 2 + q % 3
        choices = [pick(1 + int(torch.randint(0, 3, (1,), generator=g))) for _ in range(k)]
        query = pick(3 + q % 4) + (" " if style == "bare" and q % 5 == 0 else "")
        if style == "spaced":
            choices = [" " + c for c in choices]
        elif style == "newline":
            query += "\n"
        docs.append({"query": query, "choices": choices, "gold": int(torch.randint(0, k, (1,), generator=g))})
    return docs


def test_delimiter_follows_the_task_files_convention():
    model, tok = tiny_model("mixtral", seed=2), char_tokenizer()
    bare = _random_task(12, seed=3, words=["cat", "dog", "sat", "on", "mat", "big", "red"])
    spaced = [{**d, "query": d["query"].rstrip(), "choices": [" " + c for c in d["choices"]]} for d in bare]
    assert task_delimiter(bare) == " " and task_delimiter(spaced) == ""
    assert task_delimiter(_random_task(4, 0, style="newline")) == ""
    # the same scored text either way: query + " " + choice
    a = multiple_choice(model, tok, [{**d, "query": d["query"].rstrip()} for d in bare], progress=False)
    b = multiple_choice(model, tok, spaced, progress=False)
    assert a["acc"] == b["acc"]
    requests = [(d["query"], c) for d in spaced for c in d["choices"]]
    assert loglikelihoods(model, tok, requests, progress=False) == pytest.approx(
        loglikelihoods(model, tok, [(q, " " + c.lstrip()) for q, c in requests], progress=False))
    doubled = multiple_choice(model, tok, spaced, target_delimiter=" ", progress=False)     # "  choice": not the same
    assert doubled != b


def test_lm_eval_bridge_agrees_with_own_scorer(tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    from moeprune.evaluate.lm_eval_bridge import lm_eval_tasks
    tasks = tmp_path / "tasks"
    # full transformers (context matters): word-level with a BOS, and char-level (whitespace is scored)
    word_model, word_tok = tiny_model("mixtral", seed=2), word_tokenizer(bos=True)
    char_model, char_tok = tiny_model("mixtral", seed=5), char_tokenizer()
    files = {"moeprune_rand": _random_task(24, seed=1)}
    small = ["cat", "dog", "sat", "on", "mat", "big", "red", "a", "the"]
    for style in ("bare", "spaced", "newline"):
        files[f"moeprune_chars_{style}"] = _random_task(16, seed=7, words=small, style=style)
    for name, docs in files.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        path = write_task_yaml(tmp_path / f"{name}.jsonl", tasks, name=name)
        assert f'target_delimiter: "{task_delimiter(docs)}"' in path.read_text()
    (tmp_path / "hand.jsonl").write_text("".join(json.dumps(d) + "\n" for d in [
        {"query": "the cat is", "choices": ["elephant", "dog", "cat"], "gold": 1},
        {"query": "a bird is", "choices": ["dog", "elephant"], "gold": 1},
        {"query": "sat on", "choices": ["fish", "mat", "bird"], "gold": 0}]))
    write_task_yaml(tmp_path / "hand.jsonl", tasks, name="moeprune_hand")

    def agree(model, tok, names):
        theirs = lm_eval_tasks(model, tok, names, task_dir=tasks, batch_size=4)
        for name in names:
            ours = multiple_choice(model, tok, tmp_path / f"{name}.jsonl", batch_size=4, progress=False)
            assert theirs[name]["n"] == ours["n"] == len(files[name]), name
            assert 0 < ours["acc"] < 1, name                                   # not a degenerate case
            for metric in ("acc", "acc_norm", "acc_stderr"):
                assert theirs[name][metric] == pytest.approx(ours[metric]), (name, metric)
        return theirs

    agree(word_model, word_tok, ["moeprune_rand"])
    assert multiple_choice(word_model, word_tok, tmp_path / "moeprune_rand.jsonl", progress=False)["acc"] != \
        multiple_choice(word_model, word_tok, tmp_path / "moeprune_rand.jsonl", progress=False)["acc_norm"]
    agree(char_model, char_tok, [f"moeprune_chars_{s}" for s in ("bare", "spaced", "newline")])

    bigram = bigram_model(MC_TABLE)
    ours = multiple_choice(bigram, word_tokenizer(), tmp_path / "hand.jsonl", progress=False)
    theirs = lm_eval_tasks(bigram, word_tokenizer(), ["moeprune_hand"], task_dir=tasks)["moeprune_hand"]
    assert (ours["acc"], ours["acc_norm"]) == pytest.approx((1 / 3, 2 / 3))
    assert (theirs["acc"], theirs["acc_norm"]) == pytest.approx((1 / 3, 2 / 3))


def test_lm_eval_missing_is_a_clear_error(monkeypatch):
    from moeprune.evaluate.lm_eval_bridge import lm_eval_tasks
    monkeypatch.setitem(sys.modules, "lm_eval", None)          # import lm_eval now raises ImportError
    with pytest.raises(MoePruneError, match="pip install 'moeprune\\[eval\\]'"):
        lm_eval_tasks(bigram_model(), word_tokenizer(), ["x"])


# ---------------------------------------------------------------- one model, before vs after

def test_evaluate_model_and_compare(tmp_path):
    (tmp_path / "animals.txt").write_text("the cat sat on the mat\n\na big dog ran\n")
    (tmp_path / "colours.txt").write_text("red blue green\n\nthe red fish is blue\n")
    (tmp_path / "mc.jsonl").write_text(json.dumps({"query": "the cat is", "choices": ["elephant", "dog"],
                                                   "gold": 1}) + "\n")
    tok = word_tokenizer()
    full, pruned = bigram_model(MC_TABLE), bigram_model({})
    kw = {"domains": [str(tmp_path / "animals.txt"), str(tmp_path / "colours.txt")],
          "tasks": [str(tmp_path / "mc.jsonl")], "seq_len": 32, "progress": False}
    before, after = evaluate_model(full, tok, **kw), evaluate_model(pruned, tok, **kw)
    assert set(after["perplexity"]) == {"animals", "colours"} and set(after["tasks"]) == {"mc"}
    assert after["perplexity"]["animals"]["ppl"] == pytest.approx(VOCAB, rel=1e-6)      # all-zero table: uniform
    c = compare(before, after)
    for d in ("animals", "colours"):
        ratio = after["perplexity"][d]["ppl"] / before["perplexity"][d]["ppl"]
        assert c["perplexity"][d]["ratio"] == pytest.approx(ratio)
    ratios = {d: r["ratio"] for d, r in c["perplexity"].items()}
    assert c["mean_ratio"] == pytest.approx(sum(ratios.values()) / 2)
    assert c["worst"] == {"domain": max(ratios, key=ratios.get), "ratio": max(ratios.values())}
    # the uniform model ties every choice and so picks the first, which is wrong here
    assert c["tasks"]["mc"]["acc_before"] == 1.0 and c["tasks"]["mc"]["acc_after"] == 0.0


def test_evaluation_text_is_read_only_as_far_as_max_tokens(tmp_path):
    """A large evaluation file is read as it is tokenised: bytes past what --eval-max-tokens needs are never read
    (here, bytes that are not UTF-8 after 8 MB of text would stop a whole-file read with an error)."""
    from moeprune.evaluate.perplexity import read_documents, token_stream
    path = tmp_path / "big.txt"
    with open(path, "wb") as f:
        for _ in range(80_000):
            f.write(b"the cat sat on the mat " * 4 + b"\n\n")
        f.write(b"\xff\xfe not utf-8 \n")
    stream = token_stream(word_tokenizer(), read_documents(path), max_tokens=500)
    assert stream.numel() == 500
    with pytest.raises(MoePruneError, match="not UTF-8"):
        token_stream(word_tokenizer(), read_documents(path))
