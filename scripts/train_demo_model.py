#!/usr/bin/env python
"""Train one of moeprune's two demo Mixture-of-Experts models on CPU.

Models (vocab 8192, attention head_dim 64, tied embeddings, 4 layers):

* ``demo-mixtral`` -- ``MixtralForCausalLM``, hidden 256, 4 heads (2 KV heads),
  8 experts of intermediate 256, top-2.  Built the way Mixtral was: a *dense*
  ``MistralForCausalLM`` of the same shape is trained first (``--dense-frac``
  of the budget), then *upcycled* -- its MLP is copied into every expert with a
  little relative noise, the router is fresh and small, attention, embeddings
  and norms are copied -- and training continues as an MoE so that the
  experts diverge.
* ``demo-fine`` -- ``Qwen3MoeForCausalLM`` trained from scratch as a
  fine-grained MoE: hidden 256, 4 heads (2 KV heads), 32 experts of
  moe_intermediate 64, top-4.

Training: next-token loss on fixed-length windows (``--seq-len`` 256) sampled
from the training split of ``scripts/build_corpus.py`` with the domains equally
weighted, router load-balancing auxiliary loss on (``output_router_logits``),
AdamW, linear warm-up + cosine decay.  The schedule's progress is
``max(step / steps, elapsed / minutes)``, so a run always finishes its decay
inside its time budget.  Everything is seeded; a resumed run continues the
same random streams.

Every ``--ckpt-minutes`` a checkpoint (model, optimizer, RNG, counters) is
written to ``<work>/ckpt/<name>/last.pt``; restarting the same command resumes
from it.  Training loss is logged every ``--log-every`` steps and the
held-out loss on the shipped eval shards every ``--eval-minutes`` to
``<work>/logs/<name>.csv``.  At the end the model is saved in bf16 with
``save_pretrained`` to ``src/moeprune/demo/models/<name>/`` together with the
tokenizer, reloaded and checked, the loss curve is drawn to
``docs/data/img/loss_<name>.png`` and a summary is merged into
``docs/data/demo_training.json``.

Usage::

    python scripts/train_demo_model.py --name demo-mixtral --minutes 75
    python scripts/train_demo_model.py --name demo-fine --minutes 75
    python scripts/train_demo_model.py --name demo-fine --trial 20   # speed check only
    python scripts/train_demo_model.py --name demo-fine --finalize   # only save/plot from last.pt

Prerequisites: ``scripts/build_corpus.py`` and ``scripts/train_tokenizer.py``.

The training loop is driven by a :class:`Spec` (how to build the model, whether it is upcycled, the
domain mix, where it is exported); ``scripts/train_validation_model.py`` reuses it for the validation
models with specs of its own.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "src" / "moeprune" / "demo" / "data"
MODELS = REPO / "src" / "moeprune" / "demo" / "models"
DOCS = REPO / "docs" / "data"     # what training generates: img/loss_<name>.png, demo_training.json
DOMAINS = ["literature", "speeches", "encyclopedic", "technical", "code", "dialogue", "math"]
VOCAB = 8192


# --------------------------------------------------------------------------- configs
def common_kwargs(coef: float) -> dict:
    return dict(
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=1024, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        initializer_range=0.02, rope_theta=10000.0,
    )


def mixtral_config(coef: float = 0.02):
    from transformers import MixtralConfig
    return MixtralConfig(intermediate_size=256, num_local_experts=8, num_experts_per_tok=2,
                         output_router_logits=True, router_aux_loss_coef=coef, sliding_window=None,
                         **common_kwargs(coef))


def dense_config():
    from transformers import MistralConfig
    return MistralConfig(intermediate_size=256, sliding_window=None, **common_kwargs(0.0))


def fine_config(coef: float = 0.01):
    from transformers import Qwen3MoeConfig
    return Qwen3MoeConfig(intermediate_size=256, moe_intermediate_size=64, num_experts=32,
                          num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1,
                          mlp_only_layers=[], output_router_logits=True, router_aux_loss_coef=coef,
                          **common_kwargs(coef))


def build_model(kind: str):
    from transformers import MistralForCausalLM, MixtralForCausalLM, Qwen3MoeForCausalLM
    cls, cfg = {"dense": (MistralForCausalLM, dense_config()),
                "mixtral": (MixtralForCausalLM, mixtral_config()),
                "fine": (Qwen3MoeForCausalLM, fine_config())}[kind]
    return cls(cfg)


@torch.no_grad()
def upcycle(dense, noise: float, gen: torch.Generator, build: Callable | None = None):
    """Mixtral-style sparse upcycling of a trained dense Mistral model into `build()` (default: demo-mixtral)."""
    moe = build() if build is not None else build_model("mixtral")
    dsd = dense.state_dict()
    msd = moe.state_dict()
    for k, v in dsd.items():
        if ".mlp." not in k:
            msd[k].copy_(v)
    for i, layer in enumerate(moe.model.layers):
        mlp = dense.model.layers[i].mlp
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], 0)  # [2I, H]
        down = mlp.down_proj.weight                                          # [H, I]
        ex = layer.mlp.experts
        for e in range(ex.gate_up_proj.shape[0]):
            ex.gate_up_proj[e] = gate_up * (1 + noise * torch.randn(gate_up.shape, generator=gen))
            ex.down_proj[e] = down * (1 + noise * torch.randn(down.shape, generator=gen))
        # fresh, small router: near-uniform routing at the start
        layer.mlp.gate.weight.copy_(torch.randn(layer.mlp.gate.weight.shape, generator=gen) * 1e-3)
    moe.tie_weights()
    return moe


@dataclass
class Spec:
    """What the training loop needs to know about one model."""
    name: str
    build: Callable[[str], torch.nn.Module]     # "dense" (upcycled models only) or "moe" -> a fresh model
    upcycled: bool = False                      # dense phase first, then upcycle()
    weights: dict[str, float] | None = None     # domain sampling weights (None: equal)
    out_root: Path = MODELS                     # the model goes to out_root/<name>
    docs: Path = DOCS                           # img/loss_<name>.png and summary_file go here
    summary_file: str = "demo_training.json"
    tokenizer: Path | None = None               # folder with tokenizer.json/tokenizer_config.json (None: <work>/tokenizer)
    token_cache: str = "tokens"                 # <work>/<token_cache>/{train,eval}_<domain>.npy
    after_step: Callable | None = None          # after_step(model, output) after every optimizer step
    step_schedule: bool = False                 # schedule by steps alone (--minutes then only caps the run):
                                                # the same command gives the same model on any machine
    defaults: dict = field(default_factory=dict)    # argparse defaults of this model
    notes: dict = field(default_factory=dict)       # merged into the training summary


DEMO_SPECS = {
    "demo-mixtral": Spec("demo-mixtral", lambda kind: build_model("dense" if kind == "dense" else "mixtral"),
                         upcycled=True),
    "demo-fine": Spec("demo-fine", lambda kind: build_model("fine")),
}


def count_params(model) -> tuple[int, int]:
    """(total, active per token) parameter counts; tied embeddings counted once."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    n_exp = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    if not n_exp:
        return total, total
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return total, total - expert + expert * cfg.num_experts_per_tok // n_exp


# --------------------------------------------------------------------------- data
def load_tokens(work: Path, tok, cache_name: str = "tokens"):
    """Token ids of the train split (per domain) and of the eval shards, cached as .npy."""
    cache = work / cache_name
    cache.mkdir(parents=True, exist_ok=True)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    out = {}
    for split, root in (("train", work / "corpus/train"), ("eval", DATA / "eval")):
        out[split] = {}
        for d in DOMAINS:
            f = cache / f"{split}_{d}.npy"
            if not f.exists():
                docs = (root / f"{d}.txt").read_text("utf-8").split("\n\n")
                ids = []
                for i in range(0, len(docs), 256):
                    for seq in tok(docs[i:i + 256])["input_ids"]:
                        ids.extend(seq)
                        ids.append(eot)
                tmp = f.with_suffix(".tmp.npy")
                np.save(tmp, np.asarray(ids, dtype=np.uint16))
                os.replace(tmp, f)
            out[split][d] = np.load(f)
    return out


def domain_probs(weights: dict[str, float] | None) -> np.ndarray | None:
    """Sampling probabilities over DOMAINS from relative weights (None: equal weights)."""
    if weights is None:
        return None
    w = np.asarray([float(weights.get(d, 0.0)) for d in DOMAINS])
    return w / w.sum()


def sample_batch(tokens: dict, bs: int, seq: int, rng: np.random.Generator,
                 probs: np.ndarray | None = None) -> torch.Tensor:
    rows = []
    for _ in range(bs):
        # equal weights keep the original draw, so the demo models' random stream is unchanged
        d = rng.integers(len(DOMAINS)) if probs is None else rng.choice(len(DOMAINS), p=probs)
        arr = tokens[DOMAINS[d]]
        s = rng.integers(0, len(arr) - seq - 1)
        rows.append(arr[s:s + seq + 1])
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def eval_batches(tokens: dict, seq: int, per_domain: int) -> dict:
    out = {}
    for d, arr in tokens.items():
        n = min(per_domain, (len(arr) - 1) // (seq + 1))
        out[d] = torch.from_numpy(arr[: n * (seq + 1)].astype(np.int64).reshape(n, seq + 1))
    return out


@torch.no_grad()
def heldout_loss(model, batches: dict) -> dict:
    model.eval()
    res = {}
    for d, x in batches.items():
        losses = []
        for i in range(0, len(x), 8):
            xb = x[i:i + 8]
            logits = model(input_ids=xb[:, :-1]).logits
            losses.append(torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), xb[:, 1:].reshape(-1), reduction="sum").item())
        res[d] = sum(losses) / (x.shape[0] * (x.shape[1] - 1))
    res["mean"] = float(np.mean([res[d] for d in batches]))
    model.train()
    return res


# --------------------------------------------------------------------------- schedule
def lr_at(progress: float, step_in_phase: int, base: float, warmup: int, floor: float = 0.1) -> float:
    if step_in_phase < warmup:
        return base * (step_in_phase + 1) / warmup
    p = min(max(progress, 0.0), 1.0)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def make_optimizer(model, lr: float, wd: float):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in n else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8)


# --------------------------------------------------------------------------- main
def main(specs: dict[str, Spec] | None = None, description: str | None = None) -> None:
    specs = specs or DEMO_SPECS
    ap = argparse.ArgumentParser(description=description or __doc__.split("\n\n")[0])
    ap.add_argument("--name", required=True, choices=list(specs))
    ap.add_argument("--work", default="/work/corpus_build", type=Path)
    ap.add_argument("--minutes", type=float, default=75.0, help="wall-time budget of the whole run")
    ap.add_argument("--steps", type=int, default=100000, help="step budget (whichever ends first)")
    ap.add_argument("--dense-frac", type=float, default=0.33, help="demo-mixtral: share of the budget spent dense")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--moe-lr", type=float, default=1.5e-3, help="demo-mixtral: peak LR after upcycling")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--upcycle-noise", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-minutes", type=float, default=4.0)
    ap.add_argument("--eval-minutes", type=float, default=6.0)
    ap.add_argument("--eval-seqs", type=int, default=16, help="eval windows per domain")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--trial", type=int, default=0, help="run N steps, print tokens/s, save nothing")
    ap.add_argument("--finalize", action="store_true", help="only export/plot from the last checkpoint")
    known, _ = ap.parse_known_args()
    ap.set_defaults(**specs[known.name].defaults)     # the model's own defaults; the command line still wins
    args = ap.parse_args()
    spec = specs[args.name]

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(spec.tokenizer or args.work / "tokenizer")
    data = load_tokens(args.work, tok, spec.token_cache)
    probs = domain_probs(spec.weights)
    ev = eval_batches(data["eval"], args.seq_len, args.eval_seqs)

    ckdir = args.work / "ckpt" / args.name
    ckdir.mkdir(parents=True, exist_ok=True)
    log_csv = args.work / "logs" / f"{args.name}.csv"
    log_csv.parent.mkdir(parents=True, exist_ok=True)
    is_mixtral = spec.upcycled

    # ---- state
    st = dict(phase="dense" if is_mixtral else "moe", step=0, phase_step=0, tokens=0, elapsed=0.0,
              phase_start_elapsed=0.0, phase_start_step=0, dense_tokens=0, dense_elapsed=0.0)
    model = spec.build("dense" if is_mixtral else "moe")
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    base_lr = args.lr
    opt = make_optimizer(model, base_lr, args.weight_decay)
    last = ckdir / "last.pt"
    if last.exists() and not args.trial:
        ck = torch.load(last, weights_only=False)
        st = ck["state"]
        if st["phase"] == "moe" and is_mixtral:
            model = spec.build("moe")
        model.load_state_dict(ck["model"])
        base_lr = args.moe_lr if (is_mixtral and st["phase"] == "moe") else args.lr
        opt = make_optimizer(model, base_lr, args.weight_decay)
        opt.load_state_dict(ck["opt"])
        rng.bit_generator.state = ck["np_rng"]
        gen.set_state(ck["gen"])
        torch.set_rng_state(ck["torch_rng"])
        print(f"resumed from step {st['step']} ({st['phase']}), {st['elapsed'] / 60:.1f} min done", flush=True)

    def save_ckpt():
        tmp = ckdir / "last.tmp"
        torch.save(dict(state=st, model=model.state_dict(), opt=opt.state_dict(), np_rng=rng.bit_generator.state,
                        gen=gen.get_state(), torch_rng=torch.get_rng_state(), args=vars(args)), tmp)
        os.replace(tmp, last)

    budget = args.minutes * 60
    dense_budget = budget * args.dense_frac if is_mixtral else 0.0
    dense_steps = int(args.steps * args.dense_frac) if is_mixtral else 0

    def progress():
        if st["phase"] == "dense":
            by_steps, by_time = st["step"] / max(dense_steps, 1), st["elapsed"] / dense_budget
        else:
            t0, s0 = st["phase_start_elapsed"], st["phase_start_step"]
            by_steps, by_time = (st["step"] - s0) / max(args.steps - s0, 1), (st["elapsed"] - t0) / max(budget - t0, 1)
        if spec.step_schedule:
            if st["elapsed"] >= budget:
                print(f"--minutes {args.minutes} reached before --steps {args.steps}: stopping early", flush=True)
                return 1.0
            return by_steps
        return max(by_steps, by_time)

    if not args.finalize:
        new_file = not log_csv.exists() or args.trial
        fcsv = open(os.devnull if args.trial else log_csv, "a", newline="")
        w = csv.writer(fcsv)
        if new_file:
            w.writerow(["step", "phase", "tokens", "elapsed_s", "lr", "train_loss", "aux_loss", "heldout_loss"]
                       + [f"heldout_{d}" for d in DOMAINS])
        model.train()
        t_last = time.time()
        last_ck = last_ev = st["elapsed"]
        if st["step"] == 0 and not args.trial:
            h = heldout_loss(model, ev)
            w.writerow([0, st["phase"], 0, 0, 0, "", "", f"{h['mean']:.4f}"] + [f"{h[d]:.4f}" for d in DOMAINS])
        acc_loss, acc_aux, acc_n = 0.0, 0.0, 0
        trial_t0 = time.time()
        while True:
            if args.trial and st["step"] >= args.trial:
                dt = time.time() - trial_t0
                print(f"trial {args.name}: {st['step']} steps in {dt:.1f}s -> "
                      f"{st['tokens'] / dt:.0f} tokens/s, {dt / st['step']:.2f} s/step", flush=True)
                return
            if progress() >= 1.0:
                if st["phase"] == "dense":
                    # ---- upcycle dense -> MoE
                    save_ckpt()
                    shutil.copy(last, ckdir / "dense_final.pt")
                    h = heldout_loss(model, ev)
                    print(f"dense phase done at step {st['step']}: held-out {h['mean']:.3f}; upcycling", flush=True)
                    model = upcycle(model, args.upcycle_noise, gen, lambda: spec.build("moe"))
                    model.train()
                    base_lr = args.moe_lr
                    opt = make_optimizer(model, base_lr, args.weight_decay)
                    st.update(phase="moe", phase_step=0, phase_start_elapsed=st["elapsed"],
                              phase_start_step=st["step"], dense_tokens=st["tokens"], dense_elapsed=st["elapsed"])
                    h = heldout_loss(model, ev)
                    w.writerow([st["step"], "moe", st["tokens"], f"{st['elapsed']:.1f}", 0, "", "",
                                f"{h['mean']:.4f}"] + [f"{h[d]:.4f}" for d in DOMAINS])
                    print(f"upcycled model held-out {h['mean']:.3f}", flush=True)
                    save_ckpt()
                    t_last = time.time()  # upcycling and evaluation are not training time
                    continue
                break
            lr = lr_at(progress(), st["phase_step"], base_lr, args.warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            x = sample_batch(data["train"], args.batch_size, args.seq_len, rng, probs)
            out = model(input_ids=x, labels=x)  # the model shifts labels internally
            loss = out.loss
            aux = getattr(out, "aux_loss", None)
            lm = loss.item() - (model.config.router_aux_loss_coef * aux.item() if aux is not None else 0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if spec.after_step is not None:
                spec.after_step(model, out)
            now = time.time()
            st["elapsed"] += now - t_last
            t_last = now
            st["step"] += 1
            st["phase_step"] += 1
            st["tokens"] += x.numel()
            acc_loss += lm
            acc_aux += aux.item() if aux is not None else 0.0
            acc_n += 1
            if st["step"] % args.log_every == 0:
                w.writerow([st["step"], st["phase"], st["tokens"], f"{st['elapsed']:.1f}", f"{lr:.6f}",
                            f"{acc_loss / acc_n:.4f}", f"{acc_aux / acc_n:.4f}", ""] + [""] * len(DOMAINS))
                fcsv.flush()
                if st["step"] % (args.log_every * 10) == 0 or args.trial:
                    print(f"step {st['step']} {st['phase']} lr {lr:.2e} loss {acc_loss / acc_n:.3f} "
                          f"aux {acc_aux / acc_n:.3f} tok {st['tokens']} {st['elapsed'] / 60:.1f}min", flush=True)
                acc_loss, acc_aux, acc_n = 0.0, 0.0, 0
            if args.trial:
                continue
            if st["elapsed"] - last_ev >= args.eval_minutes * 60:
                h = heldout_loss(model, ev)
                w.writerow([st["step"], st["phase"], st["tokens"], f"{st['elapsed']:.1f}", f"{lr:.6f}", "", "",
                            f"{h['mean']:.4f}"] + [f"{h[d]:.4f}" for d in DOMAINS])
                fcsv.flush()
                print(f"step {st['step']} held-out {h['mean']:.3f}", flush=True)
                last_ev = st["elapsed"]
                t_last = time.time()  # evaluation time is not training time
            if st["elapsed"] - last_ck >= args.ckpt_minutes * 60:
                save_ckpt()
                last_ck = st["elapsed"]
                t_last = time.time()
        h = heldout_loss(model, ev)
        w.writerow([st["step"], st["phase"], st["tokens"], f"{st['elapsed']:.1f}", "", "", "",
                    f"{h['mean']:.4f}"] + [f"{h[d]:.4f}" for d in DOMAINS])
        fcsv.close()
        st["done"] = True
        save_ckpt()
        print(f"training done: step {st['step']}, held-out {h['mean']:.3f}", flush=True)
    elif st["phase"] == "dense" and is_mixtral:
        raise SystemExit("last checkpoint is still dense; nothing to export")

    export(args, model, tok, st, ev, spec)


def export(args, model, tok, st, ev, spec: Spec | None = None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    spec = spec or DEMO_SPECS[args.name]
    out = spec.out_root / args.name
    if out.exists():
        shutil.rmtree(out)
    model.config.use_cache = True
    model.generation_config.bos_token_id = model.generation_config.eos_token_id = 0
    model.generation_config.pad_token_id = 0
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    if spec.tokenizer is None:
        shutil.copy(args.work / "tokenizer" / "tokenizer_config.json", out / "tokenizer_config.json")
    else:       # the very files of the tokenizer it was trained with
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(spec.tokenizer / f, out / f)

    # reload check
    m2 = AutoModelForCausalLM.from_pretrained(out)
    t2 = AutoTokenizer.from_pretrained(out)
    m2.float().eval()
    ids = t2("The state of the Union is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = m2(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    h = heldout_loss(m2, ev)
    total, active = count_params(m2)
    print(f"exported {out}: {total} params ({active} active), reloaded held-out loss {h['mean']:.3f}", flush=True)

    # loss curve
    rows = list(csv.DictReader(open(args.work / "logs" / f"{args.name}.csv")))
    tr = [(int(r["tokens"]), float(r["train_loss"])) for r in rows if r["train_loss"]]
    he = [(int(r["tokens"]), float(r["heldout_loss"])) for r in rows if r["heldout_loss"]]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        t, l = zip(*tr)
        k = 5
        sm = np.convolve(l, np.ones(k) / k, mode="valid") if len(l) > k else np.asarray(l)
        ax.plot(np.asarray(t[len(t) - len(sm):]) / 1e6, sm, label="train (LM loss)", lw=1)
    if he:
        t, l = zip(*he)
        ax.plot(np.asarray(t) / 1e6, l, "o-", label="held-out (eval shards)", ms=3)
    if st.get("dense_tokens"):
        ax.axvline(st["dense_tokens"] / 1e6, color="gray", ls="--", lw=1)
        ax.text(st["dense_tokens"] / 1e6, ax.get_ylim()[1] * 0.95, " upcycled to MoE", fontsize=8, color="gray")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"{args.name}: {type(m2).__name__}, {total / 1e6:.1f}M params ({active / 1e6:.1f}M active)")
    ax.set_ylim(top=min(ax.get_ylim()[1], 9.5))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    (spec.docs / "img").mkdir(parents=True, exist_ok=True)
    fig.savefig(spec.docs / "img" / f"loss_{args.name}.png", dpi=110)

    # summary
    cfg = m2.config
    summary_path = spec.docs / spec.summary_file
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    final_train = float(np.mean([l for _, l in tr[-20:]])) if tr else None
    summary[args.name] = {
        "architecture": type(m2).__name__,
        "num_hidden_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        "num_experts": getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None),
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "expert_intermediate_size": getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "router_aux_loss_coef": getattr(cfg, "router_aux_loss_coef", None),
        "params_total": total,
        "params_active_per_token": active,
        "train_steps": st["step"],
        "tokens_seen": st["tokens"],
        "train_wall_time_s": round(st["elapsed"], 1),
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "final_train_loss": round(final_train, 4) if final_train else None,
        "final_heldout_loss": round(h["mean"], 4),
        "final_heldout_loss_per_domain": {d: round(h[d], 4) for d in DOMAINS},
        "heldout_eval_tokens_per_domain": args.eval_seqs * args.seq_len,
        "weights_dtype": "bfloat16",
        "hardware": "1 CPU thread",
    }
    if spec.weights is not None:
        probs = domain_probs(spec.weights)
        summary[args.name]["training_mix"] = {d: round(float(p), 4) for d, p in zip(DOMAINS, probs)}
    summary[args.name].update(spec.notes)
    if spec.upcycled:
        summary[args.name]["dense_phase"] = {
            "architecture": "MistralForCausalLM", "tokens": st.get("dense_tokens"),
            "wall_time_s": round(st.get("dense_elapsed", 0.0), 1), "upcycle_noise_rel": args.upcycle_noise}
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
