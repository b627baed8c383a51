"""Every transformers MoE family that discovery finds by structure (docs/data/families.json, from
scripts/families.py) is pruned by the CLI from a tiny folder in the hub's layout: the output loads in
transformers with no missing, unexpected or mismatched keys, config.json differs from the input's only in
the expert count, every other file is byte-identical, and a plan that keeps every expert gives the input's
logits. The families that still cannot be pruned are listed with the reason (strict xfail: a fix shows)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moeprune.arch import layers_prefix, moe_layout
from moeprune.cli import main
from moeprune.hubmap import HubMap
from moeprune.tiny import model_class_for, tiny_model_any

import test_layer_inputs                 # explicit tiny configs that keep every layer type of a hybrid family

SURVEY = Path(__file__).resolve().parents[1] / "docs" / "data" / "families.json"
WORKING = [r["model_type"] for r in json.loads(SURVEY.read_text()) if r["status"].startswith("works")]
LOOPED = ("its looped layers: the forward runs decoder layers loop_layer_index_start..end-1 loop_num_passes times, "
          "each later pass restarting from the pre-loop states and fed by message_input from the pass before; the "
          "engine runs each decoder layer once, in order (layer_inputs refuses a layer called again), and its "
          "statistics and plan see one pass. Running them as the forward does needs the loop's layers resident "
          "together (or read once per pass) and statistics over every pass before a plan: steps that run a segment "
          "of layers several times, not one layer at a time")
NOT_YET = {"inkling2_loop": LOOPED, "inkling2_loop_text": LOOPED}


def _flat(config: dict, prefix: str = "") -> dict:
    """config.json as {dotted key: value}, sub-configs ("text_config") flattened."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict) and k.endswith("_config"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _model(model_type: str):
    if model_type in test_layer_inputs.FAMILIES:
        return test_layer_inputs.build(model_type)
    return tiny_model_any(model_type)


def _prune(src: Path, out: Path, keep: int) -> int:
    return main(["prune", str(src), "--method", "frequency", "--keep", str(keep), "--calib", "random", "--samples",
                 "2", "--seq-len", "16", "--self-calib", "0", "--no-eval", "--quiet", "--out", str(out)])


@pytest.mark.parametrize("model_type", [pytest.param(t, marks=pytest.mark.xfail(strict=True, reason=NOT_YET[t]))
                                        if t in NOT_YET else t for t in WORKING])
def test_every_family_is_pruned_into_a_standard_checkpoint(model_type, tmp_path, capsys):
    model = _model(model_type)
    src = tmp_path / "in"
    model.save_pretrained(src)
    raw = _flat(json.loads((src / "config.json").read_text()))
    E = moe_layout(model).layers[0].num_experts            # DBRX folds its experts: [E * I, H]
    keep = E // 2
    assert _prune(src, tmp_path / "half", keep) == 0, capsys.readouterr().err
    auto = model_class_for(model.config)        # a multimodal wrapper loads as image-text-to-text
    pruned, info = auto.from_pretrained(tmp_path / "half", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    new = _flat(json.loads((tmp_path / "half" / "config.json").read_text()))
    changed = {k for k in raw if raw[k] != new.get(k)} | (set(new) - set(raw))
    assert changed and all(raw[k] == E and new[k] == keep for k in changed), changed
    # every tensor outside the language model's decoder layers (embeddings, head, a vision tower and its
    # projector) is the input's, bit for bit
    inside = layers_prefix(model)
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "half" / "model.safetensors")
    hub = HubMap.for_model(model, file_names={k: tuple(v.shape) for k, v in before.items()})
    outside = [k for k in before if not any(m.startswith(inside) for m in hub.module_names(k))]
    assert outside and all(torch.equal(before[k], after[k]) for k in outside)
    for f in src.iterdir():
        if f.name not in ("config.json",) and not f.name.endswith(".safetensors") and f.is_file():
            assert (tmp_path / "half" / f.name).read_bytes() == f.read_bytes(), f.name
    # a plan that keeps every expert: the input's model, logits and all
    assert _prune(src, tmp_path / "all", E) == 0, capsys.readouterr().err
    same = auto.from_pretrained(tmp_path / "all")
    ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(same(ids).logits, model(ids).logits, atol=1e-5)
