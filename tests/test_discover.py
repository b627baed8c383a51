"""moeprune.discover finds the routed experts by structure: it agrees with the hand-written arch.FAMILIES for
the 10 supported families, and holds on every model type that scripts/families.py marks as working."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from moeprune.arch import FAMILIES, discovered_family
from moeprune.discover import check_contract, find_moe
from moeprune.tiny import TINY_EXPERTS, TINY_TOP_K, _layer_pattern, tiny_config_any, tiny_model, tiny_model_any

torch.set_num_threads(1)

SURVEY = Path(__file__).resolve().parents[1] / "docs" / "data" / "families.json"
ROWS = {r["model_type"]: r for r in json.loads(SURVEY.read_text())} if SURVEY.exists() else {}
WORKING = sorted(t for t, r in ROWS.items() if r["status"] == "works by structure")

# configs that make the MoE-layer rule of a family visible (some layers dense)
_MIXED = {"qwen2_moe": dict(num_hidden_layers=4, decoder_sparse_step=2),
          "qwen3_moe": dict(num_hidden_layers=4, mlp_only_layers=[1]),
          "deepseek_v2": dict(num_hidden_layers=3, first_k_dense_replace=1),
          "deepseek_v3": dict(num_hidden_layers=3, first_k_dense_replace=1),
          "glm4_moe": dict(num_hidden_layers=3, first_k_dense_replace=1),
          "ernie4_5_moe": dict(num_hidden_layers=4, moe_layer_start_index=1, moe_layer_interval=2)}


def _get(config, dotted: str):
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def _set(config, dotted: str, value) -> None:
    *path, leaf = dotted.split(".")
    for part in path:
        config = getattr(config, part)
    setattr(config, leaf, value)


STANDARD = sorted(t for t, f in FAMILIES.items() if f.read_router is None and f.expert_fn is None)
ADAPTED = sorted(set(FAMILIES) - set(STANDARD))      # entries that adapt another router / experts contract


@pytest.mark.parametrize("model_type", STANDARD)
def test_known_families_agree_with_arch(model_type):
    family = FAMILIES[model_type]
    model = tiny_model(model_type, **_MIXED.get(model_type, {}))
    s = find_moe(model)
    found = discovered_family(s)
    for name in ("top_k_field", "block", "router", "experts", "shared", "router_tensors", "scoring", "gate_up",
                 "group_fields"):
        assert getattr(found, name) == getattr(family, name), name
    # the count field: the config key itself or an attribute_map spelling of it
    spellings = {k.rpartition(".")[2] for k in (*s.n_experts_keys[:1], *s.n_experts_aliases)}
    assert family.n_experts_field in spellings
    assert getattr(model.config, found.n_experts_field) == s.num_experts == 8
    config = model.config
    assert list(s.moe_layers) == [i for i in range(config.num_hidden_layers) if family.is_moe_layer(config, i)]
    assert s.layers_path == "model.layers" and s.axis0 and s.top_k == 2
    assert s.gate_up_evidence == "probe"
    assert s.scoring_evidence == ("guess" if model_type == "phimoe" else "probe")   # sparsemixer: not a plain softmax
    assert check_contract(s, model).ok


@pytest.mark.parametrize("model_type", ADAPTED)
def test_adapted_families_are_found_and_adapted_exactly(model_type):
    """Llama 4: structure finds the block, router, experts and shared expert, and the contract check names what
    the entry adapts; the adapters give exactly what the model computes: the router's own top-k choice and weights,
    and each expert as the experts module computes it (its forward runs every expert on every token)."""
    family = FAMILIES[model_type]
    model = tiny_model_any(model_type)
    s = find_moe(model)
    found = discovered_family(s)
    for name in ("block", "router", "experts", "shared", "router_tensors", "gate_up", "top_k_field"):
        assert getattr(found, name) == getattr(family, name), name
    differences = " ".join(check_contract(s, model).differences)
    assert "forward takes (hidden_states)" in differences and "returns" in differences
    from moeprune.arch import moe_layout
    layer = moe_layout(model).layers[0]
    x = torch.randn(10, model.config.get_text_config().hidden_size, generator=torch.Generator().manual_seed(0))
    logits, weights, indices = layer.route(x)
    scores, raw = layer.router(x)
    assert torch.equal(logits, raw) and torch.equal(indices, raw.topk(layer.router.top_k, dim=-1).indices)
    assert torch.allclose(weights, torch.sigmoid(raw.gather(-1, indices)))
    E = layer.num_experts
    for e in (0, E - 1):
        routed = torch.zeros(E, *x.shape)
        routed[e] = x
        with torch.no_grad():
            want = layer.experts(routed.reshape(-1, x.shape[1])).reshape(E, *x.shape)[e]
            assert torch.allclose(layer.expert(x, e), want, atol=1e-6)


def test_meta_device_needs_no_weights():
    s = find_moe(tiny_model_any("qwen3_moe", device="meta"))
    assert s.num_experts == TINY_EXPERTS and s.n_experts_key == "num_local_experts" and s.gate_up_evidence == "shape"
    assert check_contract(s, tiny_model_any("qwen3_moe", device="meta")).router_returns.startswith("not run")


def test_contract_differences_are_reported():
    s = find_moe(tiny_model_any("jetmoe", device="meta"))
    differences = check_contract(s, tiny_model_any("jetmoe", device="meta")).differences
    assert any("JetMoeParallelExperts.forward takes (inputs, expert_size)" in d for d in differences)


def test_layer_pattern_keeps_every_kind():
    kinds = ["sliding"] * 5 + ["full"] + ["sliding"] * 5 + ["full"]
    assert _layer_pattern(kinds, 4) == ["sliding", "sliding", "sliding", "full"]
    assert _layer_pattern(["dense", "sparse", "sparse", "sparse"], 2) == ["dense", "sparse"]


@pytest.mark.skipif(not WORKING, reason="docs/data/families.json not generated (python scripts/families.py)")
@pytest.mark.parametrize("model_type", WORKING)
def test_working_types_by_structure(model_type):
    """E, the top-k, the expert-count key path, and editing that key to 4 gives experts (and routers) of 4 rows."""
    row = ROWS[model_type]
    model = tiny_model_any(model_type, config=tiny_config_any(model_type), device="meta")
    s = find_moe(model)
    assert s.num_experts == TINY_EXPERTS and s.top_k == TINY_TOP_K
    assert s.n_experts_key == row["n_experts_keys"][0] and s.top_k_key == row["top_k_keys"][0]
    assert _get(model.config, s.n_experts_key) == TINY_EXPERTS and _get(model.config, s.top_k_key) == TINY_TOP_K
    assert s.axis0 and s.moe_layers == tuple(row["moe_layers"])
    edited = copy.deepcopy(model.config)
    _set(edited, s.n_experts_key, 4)
    rebuilt = find_moe(tiny_model_any(model_type, config=edited, device="meta"))
    assert rebuilt.num_experts == 4
    for layer in rebuilt.layers:
        assert all(t.shape[0] == 4 for t in layer.expert_tensors)
        assert all(t.shape[t.expert_axis] == 4 for t in layer.router_tensors)
