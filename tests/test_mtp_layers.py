"""DeepSeek-V3 / Kimi-K2 / GLM-4.5 checkpoints ship multi-token-prediction (MTP) layers past num_hidden_layers,
which transformers does not load: the prune leaves them out, says so, and writes num_nextn_predict_layers 0, so
that the output is consistent (no layer whose experts were not pruned) and loads cleanly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from moeprune.cli import main
from moeprune.tiny import tiny_model_any


def test_mtp_layers_are_left_out_and_the_config_says_so(tmp_path):
    model = tiny_model_any("deepseek_v3")
    src = tmp_path / "in"
    model.save_pretrained(src)
    n, d = model.config.num_hidden_layers, model.config.hidden_size
    tensors = load_file(src / "model.safetensors")
    mtp = {k.replace(f"model.layers.{n - 1}.", f"model.layers.{n}."): v.clone()
           for k, v in tensors.items() if k.startswith(f"model.layers.{n - 1}.")}
    mtp[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(d, 2 * d)
    mtp[f"model.layers.{n}.enorm.weight"] = torch.ones(d)
    save_file({**tensors, **mtp}, src / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}, indent=2))

    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=f"{len(mtp)} tensors of layers past num_hidden_layers"):
        assert main(["prune", str(src), "--method", "frequency", "--keep", "4", "--calib", "random", "--samples",
                     "2", "--seq-len", "16", "--self-calib", "0", "--no-eval", "--out", str(out)]) == 0
    written = load_file(out / "model.safetensors")
    assert not any(k.startswith(f"model.layers.{n}.") for k in written)
    assert set(written) == {k for k in tensors if not any(f".experts.{e}." in k for e in range(4, 8))}
    new = json.loads((out / "config.json").read_text())
    assert new["num_nextn_predict_layers"] == 0 and new["n_routed_experts"] == 4
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
