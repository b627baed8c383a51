"""Calibration text the model writes itself: token windows sampled from the model's own distribution.

Why: the calibration text covers the domains its author thought of; the model was trained on more. Windows
sampled from the model (ancestral sampling from its start token: temperature 1, no top-k or top-p) hold
its training domains about as often as it expects them, so the statistics see the experts that code or
arithmetic need even when the calibration text has none. On the demo model trained from scratch, a mix
of prose and self-written windows cut the worst held-out domain (math, absent from the prose) at 50% of
the experts from 4.92x to 1.27x the full model's perplexity (docs/ABLATION.md, step 5). The idea is
Williams et al., "Self-calibration for language model quantization and pruning" (arXiv:2410.17170).

Sampling needs the whole model (one forward per token), so it runs here when the model fits in memory;
for a model that does not, the same text sampled with a serving stack (`moeprune sample`, vLLM)
is passed with --self-text and the self-written share is cut from it.
"""

from __future__ import annotations

import inspect
import os
import warnings

import torch
from tqdm.auto import tqdm

from .arch import MoePruneError
from .routing import join_rules
from .sources import ModelSource
from .stats import LayerStats, Stats
from .text import calibration_tokens

# share of the calibration windows the model writes when --self-calib is not given and the model fits
DEFAULT_SHARE = 0.5
FITS = 0.5          # a model fits when its weights in the compute dtype take at most this share of free memory
# for a model that does not fit: the same sampling with a serving stack, its output passed with --self-text
SAMPLE_ELSEWHERE = "`moeprune sample MODEL --out self.jsonl` samples it with vLLM"


def start_token(config, tokenizer) -> int | None:
    """The token a document starts after: BOS, else the end-of-text token that separates documents."""
    for owner in (tokenizer, config):
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(owner, name, None) if owner is not None else None
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if isinstance(value, int):
                return value
    return None


def free_memory(device: torch.device) -> int:
    """Bytes the compute device can still take: free GPU memory, or the kernel's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def windows_for(share: float, samples: int) -> int:
    """How many of the `samples` calibration windows the model writes."""
    if not 0.0 <= share <= 1.0:
        raise MoePruneError(f"--self-calib {share} must be a share between 0 and 1 (0: the calibration text alone, "
                            "1: only windows the model writes)")
    return round(share * samples)


@torch.no_grad()
def sample_windows(model, start: int, samples: int, seq_len: int, seed: int, batch_size: int = 64,
                   progress: bool = True) -> torch.Tensor:
    """[samples, seq_len] token ids: each window is `start` and seq_len - 1 tokens sampled from the model.

    Sampling is seeded and done in float64 on the CPU from the model's probabilities, so the same seed
    gives the same windows. Sequences are sampled `batch_size` at a time (one forward per token for all:
    a large batch costs about what one sequence does). An end-of-text token does not stop a window: the
    next document begins, as in the text the model was trained on."""
    device = next(p.device for p in model.parameters() if not p.is_meta)
    # transformers renamed the key-value cache argument (past_key_values -> cache) within 5.x
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    g = torch.Generator().manual_seed(seed)
    out = []
    bar = tqdm(total=samples * (seq_len - 1), desc="self-calibration", unit="tok", disable=not progress)
    for first in range(0, samples, batch_size):
        n = min(batch_size, samples - first)
        tokens = [torch.full((n, 1), start, dtype=torch.long)]
        cache = None
        for _ in range(seq_len - 1):
            res = model(input_ids=tokens[-1].to(device), use_cache=True, **{key: cache})
            cache = getattr(res, key)
            probs = torch.softmax(res.logits[:, -1].double().cpu(), dim=-1)
            tokens.append(torch.multinomial(probs, 1, generator=g))
            bar.update(n)
        out.append(torch.cat(tokens, dim=1))
        del cache
    bar.close()
    return torch.cat(out)


def resolve_share(requested: float | None, source, start: int | None,
                  sampled_elsewhere: bool = False) -> tuple[float, str | None]:
    """(the share of calibration windows the model writes, why it writes none by default or None).

    --self-calib as given (checked), or by default DEFAULT_SHARE when the model fits in memory and has a
    start token (or its text was sampled elsewhere: --self-text), else 0 with a warning that says why (the
    reason also goes into the report)."""
    if sampled_elsewhere:
        share = DEFAULT_SHARE if requested is None else requested
        windows_for(share, 1)
        return share, None
    need, free = source.weight_bytes(), free_memory(source.device)
    fits = need <= FITS * free
    gib = lambda b: f"{b / 2**30:.1f} GiB"
    if requested is not None:
        windows_for(requested, 1)
        if requested > 0 and start is None:
            raise MoePruneError("--self-calib samples text from the model, but neither its tokenizer nor its config "
                                "names a BOS or end-of-text token to start from; use --self-calib 0")
        if requested > 0 and not fits:
            raise MoePruneError(f"--self-calib samples from the whole model: it needs {gib(need)} and {gib(free)} are "
                                f"free on {source.device} (at most {FITS:.0%} may be used). Sample the text with your "
                                f"serving stack and pass it with --self-text ({SAMPLE_ELSEWHERE}), or use --self-calib 0")
        return requested, None
    if start is None:
        why = "the model names no BOS or end-of-text token, so it cannot write calibration text itself"
    elif not fits:
        why = (f"the whole model ({gib(need)}) does not fit in {FITS:.0%} of the {gib(free)} free on "
               f"{source.device}, so it cannot write calibration text itself here; domains the text lacks may lose more: sample the text "
               f"with your serving stack and pass it with --self-text ({SAMPLE_ELSEWHERE})")
    else:
        return DEFAULT_SHARE, None
    warnings.warn(f"{why}: the calibration text alone is used (--self-calib 0)", stacklevel=3)
    return 0.0, why


def mixed_windows(user_windows, source, start: int | None, share: float, samples: int, seq_len: int, seed: int,
                  progress: bool, self_windows=None) -> torch.Tensor:
    """The calibration windows: samples - n from the text (`user_windows(count)`), n written by the model:
    sampled from it here, or cut from text it wrote elsewhere (`self_windows(count)`, --self-text)."""
    own = windows_for(share, samples)
    parts = [user_windows(samples - own)] if own < samples else []
    if own and self_windows is not None:
        parts.append(self_windows(own))
    elif own:
        with source.whole() as model:
            parts.append(sample_windows(model, start, own, seq_len, seed, progress=progress))
    return torch.cat(parts)


def calibration_windows(spec: str, model, tokenizer, samples: int = 64, seq_len: int = 256, seed: int = 0,
                        self_calib: float = DEFAULT_SHARE, progress: bool = False) -> torch.Tensor:
    """The in-memory API's calibration windows, as `moeprune prune` makes them: a `self_calib` share sampled
    from `model`, the rest cut from the text `spec` (moeprune.text.calibration_tokens)."""
    text_config = model.config.get_text_config()
    start = start_token(text_config, tokenizer)
    if self_calib and start is None:
        raise MoePruneError("the model names no BOS or end-of-text token to start sampling from; use self_calib=0")
    return mixed_windows(lambda n: calibration_tokens(spec, tokenizer, n, seq_len, seed,
                                                      vocab_size=text_config.vocab_size),
                         ModelSource(model), start, self_calib, samples, seq_len, seed, progress)


def combine_layer(text: LayerStats, own: LayerStats) -> LayerStats:
    """One layer's statistics over the text windows and the self-written windows together, from the two kept apart:
    the sums add (they are sums over tokens) and the token samples are joined. Weight similarity (a property of
    the weights, the same in both) is kept; similarities of the outputs are derived again from the joined sample."""
    if (text.layer, text.top_k, text.num_experts) != (own.layer, own.top_k, own.num_experts):
        raise ValueError(f"statistics of layer {text.layer} and layer {own.layer} cannot be combined")
    return LayerStats(layer=text.layer, top_k=text.top_k, tokens=text.tokens + own.tokens,
                      counts=text.counts + own.counts, prob_sum=text.prob_sum + own.prob_sum,
                      weight_sum=text.weight_sum + own.weight_sum, reap_sum=text.reap_sum + own.reap_sum,
                      inputs=torch.cat([text.inputs, own.inputs]), logits=torch.cat([text.logits, own.logits]),
                      outputs=torch.cat([text.outputs, own.outputs], dim=1),
                      cache={k: v for k, v in text.cache.items() if k.endswith("/weight")},
                      routing=join_rules(text.routing, own.routing),
                      surplus=torch.cat([text.surplus, own.surplus]) if text.surplus.numel() else own.surplus)


def combine(text: Stats, own: Stats) -> Stats:
    """The statistics of text + self-written windows from the two passes' (or one pass's two sums)."""
    if sorted(text.layers) != sorted(own.layers):
        raise ValueError("the two statistics cover different layers")
    calibration = {**text.calibration, "self_written": own.calibration,
                   "samples": text.calibration.get("samples", 0) + own.calibration.get("samples", 0)}
    return Stats(text.model_type, text.model, calibration,
                 {i: combine_layer(text.layers[i], own.layers[i]) for i in sorted(text.layers)})
