"""Running decoder layers on cached hidden states: the primitives the per-layer engine is built of.

A batch is (hidden states [B, T, d] entering a decoder layer, the keyword arguments the model's forward gives
that layer: attention mask, position embeddings, ...). The model runs up to its first decoder layer once per
batch (`first_layer_inputs`); from there each layer maps a list of batches to the next (`forward_batches`),
so only one layer boundary's activations are held at a time.
"""

from __future__ import annotations

import torch

from .arch import decoder_layers

Batches = list[tuple[torch.Tensor, dict]]       # per batch: (hidden states [B, T, d], decoder-layer kwargs)


class _Captured(Exception):
    def __init__(self, args, kwargs):
        self.args_, self.kwargs = args, kwargs


def first_layer_inputs(model, batches: list[torch.Tensor], device) -> list[tuple[torch.Tensor, dict]]:
    """Run the model up to decoder layer 0 for every batch of token ids; [(hidden, kwargs)] for the layers.
    Only the embeddings (and rotary tables) are used: the decoder layers may still be on the meta device."""
    layers = decoder_layers(model)

    def stop(module, args, kwargs):
        raise _Captured(args, kwargs)
    handle = layers[0].register_forward_pre_hook(stop, with_kwargs=True)
    cached = []
    try:
        for batch in batches:
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _Captured as c:
                args, kwargs = c.args_, dict(c.kwargs)
                hidden = args[0] if args else kwargs.pop("hidden_states")
                kwargs.pop("past_key_values", None)
                cached.append((hidden, kwargs))
    finally:
        handle.remove()
    return cached


@torch.no_grad()
def forward_batches(decoder_layer, batches: list[tuple[torch.Tensor, dict]]) -> list[tuple[torch.Tensor, dict]]:
    """One decoder layer run on every cached batch: [(its output hidden states, the same kwargs)]."""
    out = []
    for hidden, kwargs in batches:
        h = decoder_layer(hidden, **kwargs)
        out.append((h[0] if isinstance(h, tuple) else h, kwargs))
    return out
