"""moeprune.discover finds the routed experts by structure: on the hand-set families the tests run every method on
(the same on the meta skeleton a streamed checkpoint is read with, but for what the few arch.FAMILIES entries
state), and on every model type that scripts/families.py marks as working."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from moeprune.arch import FAMILIES, discovered_family, moe_layout
from moeprune.discover import check_contract, find_moe
from moeprune.tiny import (TINY_EXPERTS, TINY_FAMILIES, TINY_TOP_K, _layer_pattern, tiny_config_any, tiny_model,
                           tiny_model_any)

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


# which layers those configs make MoE, by each family's own rule (decoder_sparse_step, mlp_only_layers,
# first_k_dense_replace, moe_layer_start_index / interval)
_MOE_LAYERS = {"qwen2_moe": [1, 3], "qwen3_moe": [0, 2, 3], "deepseek_v2": [1, 2], "deepseek_v3": [1, 2],
               "glm4_moe": [1, 2], "ernie4_5_moe": [1, 3]}
STANDARD = sorted(t for t in TINY_FAMILIES if t not in FAMILIES or FAMILIES[t].read_router is None)
ADAPTED = sorted(t for t, f in FAMILIES.items() if f.read_router is not None)   # another router / experts contract
EXPERTS_ADAPTED = sorted(t for t in ADAPTED if FAMILIES[t].expert_fn is not None)   # Llama 4; DBRX: test_dbrx.py
HASH_ROUTED = sorted(t for t, f in FAMILIES.items() if f.hash_table)   # routers choosing by token id: test_hash_routing


def _meta(model):
    with torch.device("meta"):
        return type(model)._from_config(copy.deepcopy(model.config))


@pytest.mark.parametrize("model_type", STANDARD)
def test_hand_set_families_are_found_by_structure(model_type):
    """The families moeprune's tests run every method on: their MoE layers, block, router, experts, shared experts,
    count and top-k fields, scoring and gate/up layout found by structure, the same on the live model and on the
    meta-device skeleton a streamed checkpoint is read with, unless an arch entry says what the skeleton cannot."""
    model = tiny_model(model_type, **_MIXED.get(model_type, {}))
    s = find_moe(model)
    found = discovered_family(s)
    config = model.config
    assert list(s.moe_layers) == _MOE_LAYERS.get(model_type, list(range(config.num_hidden_layers)))
    assert [m.index for m in moe_layout(model).layers] == list(s.moe_layers)
    assert getattr(model.config, found.n_experts_field) == s.num_experts == 8
    assert s.layers_path == "model.layers" and s.axis0 and s.top_k == 2
    assert s.gate_up_evidence == "probe"
    assert s.scoring_evidence == ("guess" if model_type == "phimoe" else "probe")   # sparsemixer: not a plain softmax
    assert check_contract(s, model).ok
    fields = ("top_k_field", "block", "router", "experts", "shared", "router_tensors", "scoring", "gate_up",
              "group_fields")
    family = FAMILIES.get(model_type, found)
    for name in fields:
        assert getattr(found, name) == getattr(family, name), name
    spellings = {k.rpartition(".")[2] for k in (*s.n_experts_keys[:1], *s.n_experts_aliases)}
    assert family.n_experts_field in spellings     # the config key itself or an attribute_map spelling of it
    skeleton = discovered_family(find_moe(_meta(model)))
    differ = [name for name in fields if getattr(skeleton, name) != getattr(found, name)]
    assert differ == _NOT_ON_THE_SKELETON.get(model_type, []), differ


# what each arch entry holds that the meta skeleton does not show (an entry with nothing here is not needed)
_NOT_ON_THE_SKELETON = {"gpt_oss": ["gate_up"], "ernie4_5_moe": ["scoring"]}


def test_every_entry_is_needed():
    """arch.FAMILIES holds only exceptions: each entry states what discovery on the skeleton gets wrong, or adapts
    a contract discovery refuses."""
    assert set(FAMILIES) == set(_NOT_ON_THE_SKELETON) | set(ADAPTED) | set(HASH_ROUTED)
    for model_type in ADAPTED:                         # the router's contract shows on a live model
        model = tiny_model_any(model_type)
        assert not check_contract(find_moe(model), model).ok


@pytest.mark.parametrize("model_type", EXPERTS_ADAPTED)
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


def test_a_layer_with_two_experts_modules_is_refused_by_name():
    """ERNIE-4.5-VL's decoder layers hold text_moe.experts and vision_moe.experts under one expert count: the vision
    experts see image tokens only (mm_token_type_ids), so each would need its own plan; discovery says so, on the
    skeleton and the live model, and moeprune refuses the model with that reason instead of pruning the text
    experts alone (a config.json that no longer matches the vision experts)."""
    from moeprune.arch import family_of
    from moeprune.errors import MoePruneError
    for device in ("meta", None):
        model = tiny_model_any("ernie4_5_vl_moe", device=device)
        s = find_moe(model)
        assert s.layers[0].other_experts == ("mlp.vision_moe.experts",)
        differences = " ".join(check_contract(s, model).differences)
        assert "holds 2 routed-experts modules (mlp.text_moe.experts, mlp.vision_moe.experts)" in differences
        assert "text_config.moe_num_experts" in differences
        with pytest.raises(MoePruneError, match="mlp.vision_moe.experts"):
            family_of(model)


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
    # (Zaya routes every token to one expert: its config refuses another top-k)
    assert s.num_experts == TINY_EXPERTS and s.top_k == (1 if model_type == "zaya" else TINY_TOP_K)
    assert s.n_experts_key == row["n_experts_keys"][0] and s.top_k_key == row["top_k_keys"][0]
    assert _get(model.config, s.n_experts_key) == TINY_EXPERTS and _get(model.config, s.top_k_key) == s.top_k
    assert s.axis0 and s.moe_layers == tuple(row["moe_layers"])
    edited = copy.deepcopy(model.config)
    _set(edited, s.n_experts_key, 4)
    rebuilt = find_moe(tiny_model_any(model_type, config=edited, device="meta"))
    assert rebuilt.num_experts == 4
    for layer in rebuilt.layers:       # (not shared norms; a folded tensor [E * I, H] per expert: DBRX)
        assert all(t.view_shape[0] == 4 for t in layer.expert_tensors if t.expert_axis is not None)
        # a router's slots after the experts (LongCat-Flash's zero experts, Inkling's shared experts) are not experts:
        # they stay, in its weight (and in LongCat's correction bias; Inkling's biases the routed experts only)
        assert layer.router_tensors[0].shape[layer.router_tensors[0].expert_axis] == 4 + layer.identity_slots
        assert all(t.shape[t.expert_axis] in (4, 4 + layer.identity_slots) for t in layer.router_tensors)
