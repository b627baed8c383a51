"""moeprune.hubmap against what transformers itself writes and reads, for every MoE model type it can build tiny.

Per model type: a tiny random model is saved with save_pretrained (safetensors, the hub layout); then
(a) the file names HubMap predicts from the meta-device model are exactly the saved file's keys (with shapes),
(b) to_module rebuilds every tensor of a freshly loaded model bit for bit from the saved file tensors,
(c) to_files of the saved model's tensors reproduces every saved file tensor bit for bit,
and for the families moeprune supports, (d) the names and expert axes are those of their published checkpoints.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors import safe_open

from transformers.conversion_mapping import (USER_REGISTERED_MAPPINGS, get_checkpoint_conversion_mapping,
                                             register_checkpoint_conversion_mapping)
from transformers.core_model_loading import ConversionOps, WeightConverter

from moeprune.arch import MoePruneError
from moeprune.discover import router_slots
from moeprune.hubmap import HubMap, _expert_count

torch.set_num_threads(1)

# every MoE model type checked; one per conversion pattern of transformers and every family moeprune supports
MODEL_TYPES = [
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss", "phimoe", "ernie4_5_moe",
    "glm4_moe", "dbrx", "qwen3_next", "llama4_text", "minimax", "minimax_m2", "granitemoe", "granitemoeshared",
    "jetmoe", "hunyuan_v1_moe", "dots1", "flex_olmo", "glm4_moe_lite", "exaone_moe", "cohere2_moe", "afmoe",
    "longcat_flash", "solar_open", "lfm2_moe", "jamba", "bailing_hybrid", "sarvam_moe", "laguna", "mimo_v2_flash",
    "hy_v3", "kimi_linear", "nemotron_h", "aria_text", "deepseek_v32", "glm_moe_dsa", "granitemoehybrid",
    "qwen3_5_moe_text", "axk1", "kolibri1", "flint", "mellum", "beam", "zaya", "deepseek_v4", "hy_v4", "lara_mini",
    "gemma4_text", "axk2", "granitemoe_swa",
    # multimodal: the text tower's tables scoped under the submodel, Transpose(check_dims=True)
    "qwen3_5_moe", "qwen3_vl_moe", "glm4v_moe", "mistral4", "glm5_next", "minimax_m3_vl", "gemma4",
    # PermuteForRope (a vision tower's q/k rows, alone or before Concatenate), Inkling2UnpadVocab (lm_head),
    # Inkling2LoopDequantizeExperts and Inkling2LoopMergeMessageQueries, ErnieSplitAndDecoupleTextVisionExperts
    "mistral_large4", "step3p7", "inkling2_text", "inkling2_loop_text", "ernie4_5_vl_moe",
    # Interleave of the shared experts' gate and up projections, concatenated (shared_w13_weight)
    "inkling_mm_model",
]
# (muse_spark also passes, checked by hand: 12 s of vision tower, left out for speed)

_COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
               head_dim=32, intermediate_size=48, moe_intermediate_size=24, max_position_embeddings=128,
               tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_EXPERT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOPK_FIELDS = ("num_experts_per_tok", "moe_k", "moe_topk")


# model types whose tiny config is built here (moeprune.tiny's generic one does not build them): extra fields
_OWN: dict[str, dict] = {
    "hunyuan_v1_moe": {},
    "dots1": dict(n_shared_experts=1, first_k_dense_replace=0),
    "lfm2_moe": dict(num_dense_layers=1, layer_types=["conv", "full_attention"]),
    "dbrx": dict(d_model=64, n_heads=2, n_layers=2, max_seq_len=128, ffn_config=dict(hidden_size=64, ffn_hidden_size=24, moe_num_experts=6, moe_top_k=2),
                 attn_config=dict(kv_n_heads=1)),
}


def _own_tiny_config(model_type: str):
    """A tiny config from the fields the model type's config has (6 experts, top-2)."""
    from transformers import AutoConfig
    defaults = AutoConfig.for_model(model_type)
    fields = {k: v for k, v in _COMMON.items() if hasattr(defaults, k)}
    fields.update({k: 6 for k in _EXPERT_FIELDS if hasattr(defaults, k)})
    fields.update({k: 2 for k in _TOPK_FIELDS if hasattr(defaults, k)})
    config = AutoConfig.for_model(model_type, **{**fields, **_OWN.get(model_type, {})})
    if model_type == "dbrx":        # modeling_dbrx reads attn_config.rope_theta, which its config class lacks
        object.__setattr__(config.attn_config, "rope_theta", 10000.0)
    return config


def _config(model_type: str):
    if model_type in _OWN:
        return _own_tiny_config(model_type)
    try:
        from moeprune.tiny import tiny_config
        config = tiny_config(model_type)
    except (ImportError, MoePruneError):
        config = _own_tiny_config(model_type)
    if hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = False
    return config


def _auto_class(config):
    from transformers import AutoModelForCausalLM
    try:
        from moeprune.tiny import model_class_for
    except ImportError:
        return AutoModelForCausalLM
    return model_class_for(config) or AutoModelForCausalLM


def _build(config, device=None):
    AutoModelForCausalLM = _auto_class(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if device == "meta":
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(config)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():                                   # distinct values everywhere: no all-zero or all-one tensor
        for p in list(model.parameters()) + list(model.buffers()):
            if p.is_floating_point():
                p.normal_()
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache: dict = {}

    def get(model_type: str):
        if model_type not in cache:
            try:
                config = _config(model_type)
                model = _build(config)
            except Exception as e:                          # noqa: BLE001  not buildable tiny here
                pytest.skip(f"{model_type}: no tiny model ({type(e).__name__}: {str(e)[:200]})")
            folder = tmp_path_factory.mktemp(model_type)
            model.save_pretrained(folder, safe_serialization=True)
            with safe_open(str(folder / "model.safetensors"), "pt") as f:
                files = {k: f.get_tensor(k) for k in f.keys()}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = _auto_class(config).from_pretrained(folder, dtype=torch.float32)
            cache[model_type] = (config, files, loaded, model.state_dict())
        return cache[model_type]

    return get


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_hubmap_matches_save_and_load(model_type, saved):
    config, files, loaded, original = saved(model_type)
    hub = HubMap.for_model(_build(config, "meta"))

    # (a) the predicted file names and shapes are the saved file's
    assert set(hub.all_file_names()) == set(files), (sorted(set(hub.all_file_names()) - set(files))[:5],
                                                     sorted(set(files) - set(hub.all_file_names()))[:5])
    for name, t in files.items():
        assert hub.file_shape(name) == tuple(t.shape), name

    # (b) every tensor of the loaded model, rebuilt from the file tensors
    reads = []

    def read(name):
        reads.append(name)
        return files[name]

    state = loaded.state_dict()
    for name, t in state.items():
        del reads[:]
        got = hub.to_module(name, t.shape, read, t.dtype)
        assert got.dtype == t.dtype, name
        # bit for bit; where the model's own loading code rewrites a tensor (zaya's balancing biases), the file's
        assert torch.equal(got, t) or (torch.equal(got, original[name]) and not torch.equal(t, original[name])), name
        assert reads == hub.file_names(name), name             # each file tensor read once
    assert {f for m in state for f in hub.file_names(m)} == set(files)

    # (c) every file tensor, from the tensors of the model that was saved
    written = {}
    state = original
    for name, t in state.items():
        if any(len(hub.module_names(f)) > 1 for f in hub.file_names(name)):
            continue
        for file_name, ft in hub.to_files(name, t):
            written[file_name] = ft
    for file_name, ft in hub.files_from(state):
        written.setdefault(file_name, ft)
    assert set(written) == set(files)
    for file_name, ft in written.items():
        assert ft.dtype == files[file_name].dtype and torch.equal(ft, files[file_name]), file_name

    # routed experts: per layer, the per-expert file tensors name every expert 0..E-1 equally often, and an
    # expert axis has the expert count's length (a router's, plus the identity experts it also scores: LongCat's)
    n_experts = _expert_count(config)
    identity = router_slots(_build(config, "meta"))        # rows a router scores after its experts
    per_layer: dict = {}
    for file_name in files:
        e = hub.expert_of(file_name)
        axis = hub.expert_axis(file_name)
        assert e is None or axis is None
        if e is not None:
            per_layer.setdefault(e[0], []).append(e[1])
        if axis is not None:
            # (a folded one holds I rows per expert: DBRX's [E * I, H])
            rows = hub.expert_rows(file_name)
            assert files[file_name].shape[axis] in (n_experts * rows, n_experts + identity), file_name
    for layer, experts in per_layer.items():
        counts = {e: experts.count(e) for e in experts}
        assert sorted(counts) == list(range(n_experts)) and len(set(counts.values())) == 1, (layer, counts)


# the hub's spelling of layer 0's expert 1 and of its router tensors with their expert axis, as the published
# checkpoints of each family name them (what moeprune's hand-written key map held before the tables replaced it)
_W = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
HUB_NAMES = {
    "mixtral": ("model.layers.{i}.block_sparse_moe.experts.1.", ("w1.weight", "w3.weight", "w2.weight"),
                {"model.layers.{i}.block_sparse_moe.gate.weight": 0}),
    "phimoe": ("model.layers.{i}.block_sparse_moe.experts.1.", ("w1.weight", "w3.weight", "w2.weight"),
               {"model.layers.{i}.block_sparse_moe.gate.weight": 0}),
    "qwen2_moe": ("model.layers.{i}.mlp.experts.1.", _W, {"model.layers.{i}.mlp.gate.weight": 0}),
    "qwen3_moe": ("model.layers.{i}.mlp.experts.1.", _W, {"model.layers.{i}.mlp.gate.weight": 0}),
    "olmoe": ("model.layers.{i}.mlp.experts.1.", _W, {"model.layers.{i}.mlp.gate.weight": 0}),
    "deepseek_v2": ("model.layers.{i}.mlp.experts.1.", _W, {"model.layers.{i}.mlp.gate.weight": 0}),
    "deepseek_v3": ("model.layers.{i}.mlp.experts.1.", _W, {"model.layers.{i}.mlp.gate.weight": 0,
                                                            "model.layers.{i}.mlp.gate.e_score_correction_bias": 0}),
    "glm4_moe": ("model.layers.{i}.mlp.experts.1.", _W, {"model.layers.{i}.mlp.gate.weight": 0,
                                                         "model.layers.{i}.mlp.gate.e_score_correction_bias": 0}),
    "ernie4_5_moe": ("model.layers.{i}.mlp.experts.1.", _W, {"model.layers.{i}.mlp.gate.weight": 0,
                                                             "model.layers.{i}.mlp.moe_statics.e_score_correction_bias": 1}),
    # DBRX: experts folded [E * I, H] under their module names (no conversion), the expert axis 0
    "dbrx": (None, (), {f"transformer.blocks.{{i}}.ffn.{n}": 0 for n in ("router.layer.weight", "experts.mlp.w1",
                                                                          "experts.mlp.v1", "experts.mlp.w2")}),
    # LongCat-Flash: its router's rows (and correction bias) are the experts' then the zero (identity) experts'
    "longcat_flash": ("model.layers.{i}.mlp.experts.1.", _W,
                      {"model.layers.{i}.mlp.router.classifier.weight": 0,
                       "model.layers.{i}.mlp.router.e_score_correction_bias": 0}),
    "gpt_oss": (None, (), {"model.layers.{i}.mlp.router.weight": 0, "model.layers.{i}.mlp.router.bias": 0,
                           "model.layers.{i}.mlp.experts.gate_up_proj": 0, "model.layers.{i}.mlp.experts.down_proj": 0}),
    **{t: (None, (), {f"{p}layers.{{i}}.feed_forward.{n}": 0 for n in ("router.weight", "experts.gate_up_proj",
                                                                         "experts.down_proj")})
       for t, p in (("llama4_text", "model."), ("llama4", "language_model.model."))},
}


@pytest.mark.parametrize("model_type", sorted(HUB_NAMES))
def test_hubmap_names_the_published_layout(model_type, saved):
    config, files, _, _ = saved(model_type)
    hub = HubMap.for_model(_build(config, "meta"))
    expert, names, router = HUB_NAMES[model_type]
    layers = sorted({hub.layer_of(f) for f in hub.all_file_names() if hub.expert_of(f) or hub.expert_axis(f) is not None}
                    - {None})
    assert layers, "no MoE layer found"
    for i in layers:
        if expert is not None:
            for n in names:
                f = expert.format(i=i) + n
                assert f in files and hub.expert_of(f) == (i, 1) and hub.expert_axis(f) is None, f
        for f, axis in router.items():
            f = f.format(i=i)
            assert f in files and hub.expert_axis(f) == axis, f


def test_unknown_operation_is_named():
    """An operation the map cannot describe stops with the tensor and the model type named."""
    from transformers.core_model_loading import ConversionOps, WeightConverter

    class Rotate(ConversionOps):                    # an operation transformers may add: not known here
        def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
            raise NotImplementedError

        @property
        def reverse_op(self):
            return self
    config = _config("olmoe")
    model = _build(config, "meta")
    model._weight_conversions = [WeightConverter("self_attn.q_proj.weight", "self_attn.q_proj.weight",
                                                 operations=[Rotate()])]
    with pytest.raises(MoePruneError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*olmoe"):
        HubMap.for_model(model)


def test_shape_checked(saved):
    config, files, loaded, _ = saved("mixtral")
    hub = HubMap.for_model(_build(config, "meta"))
    name = "model.layers.0.mlp.experts.gate_up_proj"
    shape = loaded.state_dict()[name].shape
    bad = dict(files)
    first = hub.file_names(name)[0]
    bad[first] = bad[first][:-1]
    with pytest.raises(MoePruneError, match="does not match"):
        hub.to_module(name, shape, bad.__getitem__, torch.float32)
    got = hub.to_module(name, shape, files.__getitem__, torch.bfloat16)          # straight into another dtype
    assert got.dtype == torch.bfloat16 and torch.equal(got, loaded.state_dict()[name].to(torch.bfloat16))
    with pytest.raises(MoePruneError, match="asked for shape"):
        hub.to_module(name, (1, *shape[1:]), files.__getitem__, torch.float32)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "granitemoe"])
def test_checkpoint_stored_fused(model_type, tmp_path):
    """A checkpoint written unconverted (save_original_format=False: the experts fused, as in memory) is mapped
    tensor by tensor from the names it holds."""
    config = _config(model_type)
    model = _build(config)
    model.save_pretrained(tmp_path, safe_serialization=True, save_original_format=False)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        files = {k: f.get_tensor(k) for k in f.keys()}
    meta = _build(config, "meta")
    hub = HubMap.for_model(meta, file_names=files)
    assert set(hub.all_file_names()) == set(files)
    for name, t in model.state_dict().items():
        assert torch.equal(hub.to_module(name, t.shape, files.__getitem__, t.dtype), t), name
    with pytest.raises(MoePruneError, match="not a checkpoint of this model"):
        HubMap.for_model(meta, file_names=[n for n in files if "layers.1." not in n])


class _Rescale(ConversionOps):
    """An operation a user's own conversion table may hold (transformers' register_checkpoint_conversion_mapping):
    it scales the tensor, which no view of the file tensor can describe."""

    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        return {target_patterns[0]: [2 * t for t in next(iter(input_dict.values()))]}

    @property
    def reverse_op(self):
        return self


def test_refused_with_the_tensor_named():
    """A conversion table with an operation the map does not know (every table transformers 5.25 ships maps: this one
    is registered through transformers' public API) is refused with a MoePruneError naming the tensor, the model type
    and the operation, before anything is read."""
    own = get_checkpoint_conversion_mapping("mixtral")
    table = [*own, WeightConverter(source_patterns=".self_attn.o_proj.weight",
                                   target_patterns=".self_attn.o_proj.weight", operations=[_Rescale()])]
    register_checkpoint_conversion_mapping("mixtral", table, overwrite=True)
    try:
        model = _build(_config("mixtral"), "meta")
        with pytest.raises(MoePruneError, match=r"^model\.layers\.0\.self_attn\.o_proj\.weight: transformers saves "
                                                r"this mixtral tensor .*_Rescale.* and moeprune cannot map the "
                                                r"operation _Rescale"):
            HubMap.for_model(model)
    finally:
        register_checkpoint_conversion_mapping("mixtral", own, overwrite=True)
        USER_REGISTERED_MAPPINGS.discard("mixtral")
    HubMap.for_model(_build(_config("mixtral"), "meta"))          # the shipped table maps again


def test_experts_stored_transposed(saved):
    """Transpose(check_dims=True): a checkpoint holding the experts transposed is read transposed, as transformers'
    loader does; the map itself predicts what save_pretrained writes (untransposed)."""
    config, files, loaded, _ = saved("qwen3_vl_moe")
    hub = HubMap.for_model(_build(config, "meta"))
    state = loaded.state_dict()
    names = [n for n in state if n.endswith("experts.down_proj")]
    assert names
    for name in names:
        stored = {f: files[f].transpose(1, 2).contiguous() for f in hub.file_names(name)}
        got = hub.to_module(name, state[name].shape, stored.__getitem__, torch.float32)
        assert torch.equal(got, state[name]), name


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3", "gpt_oss", "ernie4_5_moe"])
def test_pruned_layout_from_the_pruned_config(model_type, saved):
    """The map of the skeleton with K experts is the pruned output's layout: the input's file names less the
    experts >= K, expert axes cut to K, everything else unchanged."""
    config, files, _, _ = saved(model_type)
    hub = HubMap.for_model(_build(config, "meta"))
    n = _expert_count(config)
    keep = n - 2
    field = next(f for f in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
                 if getattr(config, f, None) == n)
    small = type(config).from_dict({**config.to_dict(), field: keep})
    pruned = HubMap.for_model(_build(small, "meta"))
    want = {}
    for f in files:
        e, axis = hub.expert_of(f), hub.expert_axis(f)
        if e is not None and e[1] >= keep:
            continue
        shape = list(files[f].shape)
        if axis is not None:
            assert hub.layer_of(f) is not None
            shape[axis] = keep
        want[f] = tuple(shape)
    assert {f: pruned.file_shape(f) for f in pruned.all_file_names()} == want


def test_padded_vocabulary(tmp_path):
    """Inkling-2 stores its unembedding padded to vocab_size (Inkling2UnpadVocab): the map reads the first
    unpadded_vocab_size rows, whatever the padding holds (as the loader does), and writes zeros there (as
    save_pretrained does)."""
    config = _config("inkling2_text")
    config.unpadded_vocab_size = config.vocab_size - 6
    model = _build(config)
    model.save_pretrained(tmp_path, safe_serialization=True)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        files = {k: f.get_tensor(k) for k in f.keys()}
    hub = HubMap.for_model(_build(config, "meta"), file_names=files)
    head = model.lm_head.weight
    [name] = hub.file_names("lm_head.weight")
    assert hub.file_shape(name) == (config.vocab_size, head.shape[1]) and head.shape[0] == config.vocab_size - 6
    assert torch.equal(files[name][-6:], torch.zeros(6, head.shape[1]))
    [(written_name, written)] = hub.to_files("lm_head.weight", head)
    assert written_name == name and torch.equal(written, files[name])
    noisy = dict(files)
    noisy[name] = files[name].clone()
    noisy[name][-6:] = 1.0                          # the padding is never read
    assert torch.equal(hub.to_module("lm_head.weight", head.shape, noisy.__getitem__, torch.float32), head)


def test_experts_stored_transposed_are_written_as_stored(tmp_path):
    """Qwen3-VL-MoE's published checkpoints store the fused experts [E, H, 2I] / [E, I, H]; transformers 5 builds
    [E, 2I, H] and transposes what it reads (Transpose(check_dims=True)), and save_pretrained writes its own
    orientation. The pruned output keeps the input's: the experts cut to K in the stored orientation (what
    transformers 4.57 reads), a keep-all prune byte for byte the input, a half prune the in-memory prune's logits."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText

    from moeprune.cli import main
    from moeprune.plan import Plan
    from moeprune.arch import moe_layout
    from moeprune.surgery import apply_plan
    from moeprune.tiny import tiny_model_any

    model = tiny_model_any("qwen3_vl_moe")
    src = tmp_path / "in"
    model.save_pretrained(src)
    weights = load_file(src / "model.safetensors")
    fused = [k for k in weights if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert fused
    save_file({k: (v.transpose(1, 2).contiguous() if k in fused else v) for k, v in weights.items()},
              src / "model.safetensors", metadata={"format": "pt"})

    def prune(out, keep):
        argv = ["prune", str(src), "--method", "frequency", "--keep", str(keep), "--calib", "random", "--samples",
                "2", "--seq-len", "16", "--self-calib", "0", "--no-eval", "--quiet", "--out", str(tmp_path / out)]
        assert main(argv) == 0

    prune("all", 8)
    assert (tmp_path / "all" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    prune("half", 4)
    with safe_open(str(tmp_path / "half" / "model.safetensors"), "pt") as f:
        for k in fused:
            E, a, b = weights[k].shape
            assert tuple(f.get_slice(k).get_shape()) == (4, b, a), k
    pruned, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "half", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    apply_plan(model, moe_layout(model), Plan.load(tmp_path / "half" / "plan.json"))
    ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(pruned(ids).logits, model(ids).logits, atol=1e-5)
