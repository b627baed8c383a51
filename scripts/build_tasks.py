#!/usr/bin/env python
"""Build the small multiple-choice tasks shipped with moeprune's demo.

Output: ``src/moeprune/demo/tasks/<task>.jsonl``, one JSON object per line::

    {"query": str, "choices": [str, ...], "gold": int, ...extra keys}

The text to score for choice *i* is exactly ``query + choices[i]``: each
choice already starts with its separator (a space, or nothing when the query
ends with a newline), so a scorer simply compares the log-likelihood of the
choice tokens given the query.  Extra keys (``domain``, ``source``,
``canary``) are informational.

Tasks
-----
* ``cloze_next_word`` -- from the held-out *eval* shards
  (``src/moeprune/demo/data/eval/<domain>.txt``, written by
  ``scripts/build_corpus.py``): ~40 words of a document, then the true next
  word against 3 distractor words of the same kind (alphabetic or numeric)
  drawn from the same domain's shard.  50 items per domain.
* ``cloze_next_sentence`` -- from the same shards: ~50 words of context, then
  the true next sentence (prose domains) or line (code, math, dictionary,
  dialogue, reST) against 3 sentences/lines of similar length taken from
  *other* documents of the same domain, within +-25% of its length (to
  limit length bias).  50 items per domain.
* ``bigbench_<name>`` -- a few BIG-bench multiple-choice JSON tasks
  (Apache-2.0), converted: ``choices`` are the keys of ``target_scores`` and
  ``gold`` the index of the highest score; at most 300 items each (seeded
  sample).  The BIG-bench canary string is kept on the first line of every
  such file.  The sdist of PyPI ``bigbench`` 1.0.0 is downloaded with pip
  into ``<work>/raw/pip`` (about 360 MB, once) and only the needed
  ``task.json`` files are read from it.

Usage::

    python scripts/build_tasks.py [--work /work/corpus_build] [--seed 4321] [--no-bigbench]
"""
from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO / "src" / "moeprune" / "demo" / "data" / "eval"
TASKS = REPO / "src" / "moeprune" / "demo" / "tasks"
DOMAINS = ["literature", "speeches", "encyclopedic", "technical", "code", "dialogue", "math"]
LINE_DOMAINS = {"encyclopedic", "technical", "code", "dialogue", "math"}  # units are lines
PER_DOMAIN = 50
BIGBENCH_TASKS = ["social_iqa", "general_knowledge", "phrase_relatedness", "code_line_description",
                  "sports_understanding", "physical_intuition"]
BIGBENCH_CAP = 300
BB_DEFAULT_IN, BB_DEFAULT_OUT = "Q: ", "\nA: "

WORD_KINDS = {"alpha": re.compile(r"[A-Za-z]{3,}"), "num": re.compile(r"\d{1,6}")}


def docs_of(domain: str) -> list[str]:
    text = (EVAL / f"{domain}.txt").read_text("utf-8")
    return [d for d in text.split("\n\n") if d.strip()]


def kind_of(word: str):
    for k, rx in WORD_KINDS.items():
        if rx.fullmatch(word):
            return k
    return None


# --------------------------------------------------------------------------- cloze
def draw_items(rng: random.Random, n_docs: int, draw) -> list[dict]:
    """Up to PER_DOMAIN items, each from a random document: draw(di, seen) returns (key, item), or None to
    try again; a key (document, position) is used once. Gives up after 100000 tries."""
    items, seen = [], set()
    for _ in range(100000):
        if len(items) >= PER_DOMAIN:
            break
        got = draw(rng.randrange(n_docs), seen)
        if got is not None:
            key, item = got
            seen.add(key)
            items.append(item)
    return items


def mc_item(query: str, sep: str, answer: str, distract: list[str], rng: random.Random, dom: str) -> dict:
    """A multiple-choice item with the answer shuffled among the distractors."""
    choices = [answer] + distract
    rng.shuffle(choices)
    return {"query": query, "choices": [sep + c for c in choices], "gold": choices.index(answer), "domain": dom}


def cloze_next_word(rng: random.Random) -> list[dict]:
    items = []
    for dom in DOMAINS:
        docs = docs_of(dom)
        spans = [list(re.finditer(r"\S+", d)) for d in docs]
        pool: dict = {"alpha": [], "num": []}
        for sp in spans:
            for m in sp:
                k = kind_of(m.group())
                if k:
                    pool[k].append(m.group())

        def draw(di, seen):
            sp = spans[di]
            if len(sp) < 45:
                return None
            i = rng.randrange(40, len(sp))
            if (di, i) in seen:
                return None
            word = sp[i].group()
            k = kind_of(word)
            if k is None:
                return None
            start = sp[i - 40].start()
            query = docs[di][start:sp[i - 1].end()]
            sep = docs[di][sp[i - 1].end():sp[i].start()]
            distract: list[str] = []
            while len(distract) < 3:
                w = rng.choice(pool[k])
                if w.lower() != word.lower() and w.lower() not in {x.lower() for x in distract}:
                    distract.append(w)
            return (di, i), mc_item(query, sep, word, distract, rng, dom)
        items += draw_items(rng, len(docs), draw)
    return items


def units(doc: str, dom: str) -> list[str]:
    if dom in LINE_DOMAINS:
        return [ln for ln in doc.split("\n") if ln.strip()]
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[\"'A-Z])", doc.replace("\n", " ")) if s.strip()]


def cloze_next_sentence(rng: random.Random) -> list[dict]:
    items = []
    for dom in DOMAINS:
        docs = [units(d, dom) for d in docs_of(dom)]
        sep = "\n" if dom in LINE_DOMAINS else " "
        pool = [(di, u) for di, us in enumerate(docs) for u in us if 20 <= len(u) <= 300]

        def draw(di, seen):
            us = docs[di]
            if len(us) < 3:
                return None
            j = rng.randrange(1, len(us))
            true = us[j]
            if (di, j) in seen or not 20 <= len(true) <= 300:
                return None
            # context: preceding units, about 50 words
            k, words = j, 0
            while k > 0 and words < 50:
                k -= 1
                words += len(us[k].split())
            query = sep.join(us[k:j])
            cands = [u for d2, u in pool if d2 != di and 0.8 <= len(u) / len(true) <= 1.25 and u != true]
            if len(set(cands)) < 3:
                return None
            distract = rng.sample(sorted(set(cands)), 3)
            return (di, j), mc_item(query, sep, true, distract, rng, dom)
        items += draw_items(rng, len(docs), draw)
    return items


# --------------------------------------------------------------------------- BIG-bench
def bigbench_archive(work: Path) -> Path:
    pipdir = work / "raw" / "pip"
    found = sorted(pipdir.glob("bigbench-1.0.0.tar.gz"))
    if not found:
        pipdir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "-d", str(pipdir), "bigbench==1.0.0"], check=True)
        found = sorted(pipdir.glob("bigbench-1.0.0.tar.gz"))
    return found[0]


def convert_bigbench(task: dict, name: str, rng: random.Random) -> list[dict]:
    in_pre = task.get("example_input_prefix", BB_DEFAULT_IN)
    out_pre = task.get("example_output_prefix", BB_DEFAULT_OUT)
    head = task.get("task_prefix", "").strip()
    exs = [e for e in task["examples"] if e.get("target_scores")]
    if len(exs) > BIGBENCH_CAP:
        exs = rng.sample(exs, BIGBENCH_CAP)
    items = []
    for e in exs:
        q = (head + "\n" if head else "") + in_pre.lstrip("\n") + e["input"].strip() + out_pre.rstrip(" ")
        keys = list(e["target_scores"])
        scores = [e["target_scores"][k] for k in keys]
        sep = "" if q.endswith("\n") else " "
        items.append({"query": q, "choices": [sep + str(k).strip() for k in keys],
                      "gold": max(range(len(keys)), key=lambda i: scores[i]), "source": f"bigbench/{name}"})
    if items:
        items[0]["canary"] = task.get("canary", "")
    return items


def write(name: str, items: list[dict]) -> None:
    TASKS.mkdir(parents=True, exist_ok=True)
    with open(TASKS / f"{name}.jsonl", "w", encoding="utf-8") as f:
        for it in items:
            assert it["choices"] and 0 <= it["gold"] < len(it["choices"])
            f.write(json.dumps(it, ensure_ascii=False) + "\n")
    print(f"{name}: {len(items)} items, {(TASKS / f'{name}.jsonl').stat().st_size // 1024} KB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/work/corpus_build", type=Path)
    ap.add_argument("--seed", default=4321, type=int)
    ap.add_argument("--no-bigbench", action="store_true")
    args = ap.parse_args()

    write("cloze_next_word", cloze_next_word(random.Random(f"{args.seed}/word")))
    write("cloze_next_sentence", cloze_next_sentence(random.Random(f"{args.seed}/sentence")))
    if args.no_bigbench:
        return
    archive = bigbench_archive(args.work)
    wanted = {f"bigbench-1.0.0/bigbench/benchmark_tasks/{t}/task.json": t for t in BIGBENCH_TASKS}
    with tarfile.open(archive) as tf:
        for member in tf:
            if member.name in wanted:
                t = wanted[member.name]
                task = json.load(tf.extractfile(member))
                write(f"bigbench_{t}", convert_bigbench(task, t, random.Random(f"{args.seed}/{t}")))


if __name__ == "__main__":
    main()
