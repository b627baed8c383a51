"""Measure the shipped demo models and write docs/DEMO.md (run after training; not part of the tests).

    python scripts/demo_report.py [--eval-tokens 16384] [--task-limit 0]

Per model: size (total and active parameters) and training cost (docs/data/demo_training.json), per-domain
perplexity on the held-out shards next to an add-one unigram model fitted on the calibration shards,
how each domain is routed over the experts of every layer (heatmap docs/data/img/routing_<model>.png and
the mean pairwise Jensen-Shannon divergence between domains, next to the divergence between two
halves of the same domain as a noise floor), and multiple-choice accuracy next to chance.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from moeprune import demo
from moeprune.info import model_info
from moeprune.arch import moe_layout
from moeprune.checkpoint import load
from moeprune.evaluate.multiple_choice import task_accuracy
from moeprune.evaluate.perplexity import perplexity, token_stream

ROOT = Path(__file__).resolve().parents[1]


def docs_of(split: str, domain: str) -> list[str]:
    return [d for d in demo.shard(split, domain).read_text(encoding="utf-8").split("\n\n") if d.strip()]


def unigram_ppl(tokenizer, stream: torch.Tensor, counts: Counter, seq_len: int) -> float:
    total, vocab = sum(counts.values()), len(tokenizer)
    targets = [t for i, t in enumerate(stream.tolist()) if i % seq_len != 0]   # the windows' targets
    return math.exp(-sum(math.log((counts[t] + 1) / (total + vocab)) for t in targets) / len(targets))


@torch.no_grad()
def routing_counts(model, stream: torch.Tensor, seq_len: int) -> dict[int, torch.Tensor]:
    """Top-k selection counts per MoE layer [E] over the stream (windows of seq_len)."""
    layout = moe_layout(model)
    counts = {layer.index: torch.zeros(layer.num_experts, dtype=torch.float64) for layer in layout.layers}
    hooks = []
    for layer in layout.layers:
        def hook(module, args, kwargs, i=layer.index, lay=layer):
            x = (args[0] if args else kwargs["hidden_states"])
            _, _, idx = lay.route(x.reshape(-1, x.shape[-1]))
            counts[i] += torch.bincount(idx.flatten(), minlength=counts[i].numel()).double()
        hooks.append(layer.block.register_forward_pre_hook(hook, with_kwargs=True))
    n = stream.numel() // seq_len
    for batch in stream[: n * seq_len].view(n, seq_len).split(8):
        model(input_ids=batch, use_cache=False)
    for h in hooks:
        h.remove()
    return counts


def js(p: torch.Tensor, q: torch.Tensor) -> float:
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    kl = lambda a, b: float((a * (a.clamp_min(1e-12) / b.clamp_min(1e-12)).log()).sum())  # noqa: E731
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def heatmap(name: str, domains: list[str], dist: dict[int, torch.Tensor], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = sorted(dist)
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers) + 1, 0.35 * len(domains) + 1.6),
                             squeeze=False)
    for ax, i in zip(axes[0], layers):
        m = dist[i].numpy()
        im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0)
        ax.set_title(f"layer {i}", fontsize=9)
        ax.set_yticks(range(len(domains)), domains if i == layers[0] else [""] * len(domains), fontsize=8)
        ax.set_xlabel("expert", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.suptitle(f"{name}: share of each domain's top-k routing slots per expert", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def measure(name: str, args) -> dict:
    loaded = load(name, dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    domains = demo.domains("eval")
    counts = Counter()
    for d in demo.domains("calib"):
        counts.update(token_stream(tok, docs_of("calib", d)).tolist())
    out = {"info": model_info(model), "domains": {}}
    dist, halves = {}, {}
    for d in domains:
        stream = token_stream(tok, docs_of("eval", d), max_tokens=args.eval_tokens)
        p = perplexity(model, None, stream, seq_len=args.seq_len, progress=False)["ppl"]
        out["domains"][d] = {"ppl": p, "unigram_ppl": unigram_ppl(tok, stream, counts, args.seq_len),
                             "tokens": int(stream.numel())}
        half = stream.numel() // 2
        a = routing_counts(model, stream[:half], args.seq_len)
        b = routing_counts(model, stream[half:], args.seq_len)
        for i in a:
            dist.setdefault(i, []).append((a[i] + b[i]) / (a[i] + b[i]).sum())
            halves.setdefault(i, []).append(js(a[i], b[i]))
    out["routing"] = {}
    for i in dist:
        m = torch.stack(dist[i])
        dist[i] = m
        pairs = [js(m[x], m[y]) for x, y in itertools.combinations(range(len(domains)), 2)]
        out["routing"][i] = {"js_between_domains": sum(pairs) / len(pairs),
                             "js_within_domain_halves": sum(halves[i]) / len(halves[i]),
                             "distribution": m.tolist()}
    heatmap(name, domains, dist, ROOT / "docs" / "data" / "img" / f"routing_{name}.png")
    acc = task_accuracy(model, tok, limit=args.task_limit or None, progress=False)
    out["tasks"] = {t: {"acc": v["acc"], "acc_norm": v["acc_norm"], "chance": v["chance"], "n": v["n"]}
                    for t, v in acc.items()}
    return out


def markdown(results: dict, training: dict, args, wall: float) -> str:
    cmd = "python scripts/demo_report.py " + " ".join(sys.argv[1:])
    lines = ["# The embedded demo models", "",
             f"Every number below comes from `{cmd}` ({wall / 60:.1f} min on this 2-core CPU machine), except the "
             "training figures, which `scripts/train_demo_model.py` recorded in docs/data/demo_training.json.", ""]
    for name, r in results.items():
        info, t = r["info"], training.get(name, {})
        p = info["parameters"]
        lines += [f"## {name}", "",
                  f"{info['family']}, {info['decoder_layers']} layers, {info['experts_per_layer'][0]} experts "
                  f"top-{info['top_k']}; {p['total'] / 1e6:.2f} M parameters, {p['active_per_token'] / 1e6:.2f} M "
                  f"active per token, {p['routed_experts'] / 1e6:.2f} M in routed experts.  ",
                  f"Training: {t.get('tokens_seen', 0) / 1e6:.2f} M tokens in {t.get('train_wall_time_s', 0) / 60:.0f} min"
                  f" of CPU ({t.get('hardware', '2 cores')}); loss curve: ![loss](data/img/loss_{name}.png)", "",
                  "| domain | perplexity | unigram perplexity | model / unigram |", "| --- | --- | --- | --- |"]
        for d, v in r["domains"].items():
            lines.append(f"| {d} | {v['ppl']:.1f} | {v['unigram_ppl']:.1f} | {v['ppl'] / v['unigram_ppl']:.3f} |")
        ratios = [v["ppl"] / v["unigram_ppl"] for v in r["domains"].values()]
        lines += ["", f"The model's perplexity is {min(ratios):.2f}-{max(ratios):.2f} times the unigram model's "
                  f"(first {args.eval_tokens} tokens of each held-out shard, windows of {args.seq_len}; the unigram "
                  "model is add-one smoothed and fitted on all calibration shards).", "",
                  "Routing by domain: Jensen-Shannon divergence (nats) between domains' expert-usage distributions, "
                  "against the divergence between two halves of the same domain (noise floor):", "",
                  "| layer | JS between domains (mean over pairs) | JS between halves of one domain |",
                  "| --- | --- | --- |"]
        for i, v in r["routing"].items():
            lines.append(f"| {i} | {v['js_between_domains']:.4f} | {v['js_within_domain_halves']:.4f} |")
        lines += ["", f"![routing](data/img/routing_{name}.png)", "",
                  "| task | n | accuracy | length-normalised | chance |", "| --- | --- | --- | --- | --- |"]
        for task, v in r["tasks"].items():
            lines.append(f"| {task} | {v['n']} | {v['acc']:.3f} | {v['acc_norm']:.3f} | {v['chance']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--task-limit", type=int, default=0, help="questions per task (0: all)")
    ap.add_argument("--md", default=str(ROOT / "docs" / "DEMO.md"))
    args = ap.parse_args()
    start = time.perf_counter()
    results = {name: measure(name, args) for name in (args.models or demo.model_names())}
    training_file = ROOT / "docs" / "data" / "demo_training.json"
    training = json.loads(training_file.read_text()) if training_file.exists() else {}
    (ROOT / "docs" / "data" / "demo_measurements.json").write_text(json.dumps(results, indent=1))
    Path(args.md).write_text(markdown(results, training, args, time.perf_counter() - start))
    print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
