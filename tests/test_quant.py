"""Quantized checkpoints pruned in the precision they ship: FP8 with 128x128 block scales (DeepSeek-V3, Kimi-K2,
Qwen3-FP8) and MXFP4 (gpt-oss).

Each checkpoint is a tiny model written here in its hub's exact layout (names, dtypes, scale shapes, a
quantization_config as published): a tiny bf16 model saved by transformers, its weights quantized into the
published scheme and written with safetensors. The prune keeps a kept expert's stored bytes, drops a dropped
expert's with its scales, quantizes a merged expert afresh, and transformers 5 loads the output (dequantizing
on the CPU) with the logits of the dequantized input pruned in memory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from moeprune import quant as Q
from moeprune.arch import MoePruneError, moe_layout
from moeprune.cli import main
from moeprune.plan import Plan
from moeprune.shards import Checkpoint
from moeprune.sources import CheckpointSource
from moeprune.surgery import apply_plan
from moeprune.tiny import tiny_model

from conftest import char_tokenizer_files

BLOCK = [128, 128]
# widths > 128 are multiples of 128, as in every published FP8 model (transformers' CPU dequantization derives
# the block from the scale grid, which is only right then)
WIDTHS = {"deepseek_v3": dict(hidden_size=256, moe_intermediate_size=128, intermediate_size=256),
          "qwen3_moe": dict(hidden_size=256, moe_intermediate_size=128, intermediate_size=256),
          "gpt_oss": dict(hidden_size=128, intermediate_size=64)}
# DeepSeek-V3 / Kimi-K2: every linear weight of the decoder FP8 (attention, dense and shared MLPs, experts); the
# embeddings, norms, router and lm_head bf16, the router's correction bias float32; no modules_to_not_convert
DEEPSEEK_QCONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": BLOCK}
GPT_OSS_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def _fp8_quantized(name: str, t: torch.Tensor, family: str) -> bool:
    """Which weights the published FP8 checkpoints store in FP8: every linear weight of the decoder layers but
    the router (embeddings, norms and lm_head stay bf16)."""
    return (t.dim() == 2 and name.startswith("model.layers.") and name.endswith(".weight") and "norm" not in name
            and not name.endswith(("mlp.gate.weight", "mlp.router.weight")))


def write_quantized(path: Path, family: str, scheme: str, scale_dtype: str = "F32", seed: int = 0,
                    shards: int = 2) -> Path:
    """A tiny `family` checkpoint in `scheme`'s published layout ("fp8" or "mxfp4"), in `shards` shards."""
    model = tiny_model(family, seed=seed, **WIDTHS[family]).to(torch.bfloat16)
    plain = path.parent / (path.name + "-bf16")
    model.save_pretrained(plain)
    ckpt = Checkpoint(plain)
    stored: dict[str, torch.Tensor] = {}
    for name in ckpt.tensors:
        t = ckpt.get(name).clone()
        if scheme == "fp8" and _fp8_quantized(name, t, family):
            q, s = Q.fp8_quantize(t, tuple(BLOCK), scale_dtype)
            stored[name], stored[name + "_scale_inv"] = q, s
        elif scheme == "mxfp4" and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = Q.mxfp4_quantize(t)
            stored[name + "_blocks"], stored[name + "_scales"] = blocks, scales
        elif name.endswith("e_score_correction_bias"):
            stored[name] = t.float()                       # float32 in DeepSeek-V3's files
        else:
            stored[name] = t
    path.mkdir(parents=True)
    names = sorted(stored)
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: stored[n].contiguous() for n in names[k::shards]}
        save_file(part, path / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in stored.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=2))
    config = json.loads((plain / "config.json").read_text())
    if scheme == "fp8" and family == "qwen3_moe":       # Qwen3-FP8 names what it keeps in bf16
        n = config["num_hidden_layers"]
        skip = ["lm_head"] + [f"model.layers.{i}.{m}" for i in range(n)
                              for m in ("input_layernorm", "mlp.gate", "post_attention_layernorm")]
        config["quantization_config"] = {"activation_scheme": "dynamic", "modules_to_not_convert": skip,
                                         "quant_method": "fp8", "weight_block_size": BLOCK}
    elif scheme == "fp8":
        config["quantization_config"] = dict(DEEPSEEK_QCONFIG)
    else:
        config["quantization_config"] = {"modules_to_not_convert": GPT_OSS_NOT_CONVERTED, "quant_method": "mxfp4"}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (path / "generation_config.json").write_text((plain / "generation_config.json").read_text())
    char_tokenizer_files(path)
    return path


# ---------------------------------------------------------------- the schemes' arithmetic

def test_fp8_blocks_match_transformers_and_partial_blocks():
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize
    torch.manual_seed(0)
    w = torch.randn(2, 256, 384)
    for scale_dtype in ("F32", "BF16", "U8"):
        q, s = Q.fp8_quantize(w, (128, 128), scale_dtype)
        assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 2, 3) and Q.DTYPES[scale_dtype] == s.dtype
        got = Q.fp8_dequantize(q, s, (128, 128))
        assert torch.equal(got, Fp8Dequantize(None)._dequantize_one(q, s, torch.float32))
        assert (got - w).norm() / w.norm() < 0.04
        blocks = w.unflatten(-1, (3, 128)).unflatten(-3, (2, 128)).abs().amax(dim=(-3, -1))
        assert torch.all(Q._scale_values(s) * 448 >= blocks * (1 - 1e-2))      # no block clipped (bf16 rounding)
    e8m0 = Q.fp8_quantize(w, (128, 128), "F8_E8M0")            # torch's e8m0 dtype: the same bytes as U8
    assert e8m0[1].dtype == torch.float8_e8m0fnu and torch.equal(e8m0[1].view(torch.uint8), s)
    assert torch.equal(Q.fp8_dequantize(*e8m0, (128, 128)), got)
    w = torch.randn(200, 130)                # partial last blocks: each block its own scale, by hand
    q, s = Q.fp8_quantize(w, (128, 128))
    assert s.shape == (2, 2)
    expect = torch.empty_like(w)
    for i in range(2):
        for j in range(2):
            rows, cols = slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1))
            expect[rows, cols] = q[rows, cols].float() * s[i, j]
            assert math.isclose(float(s[i, j]), float(w[rows, cols].abs().max()) / 448, rel_tol=1e-6)
    assert torch.equal(Q.fp8_dequantize(q, s, (128, 128)), expect)


def test_mxfp4_matches_transformers_code_table_and_nibble_order():
    from transformers.integrations.mxfp4 import FP4_VALUES, convert_moe_packed_tensors
    assert tuple(FP4_VALUES) == Q.FP4_VALUES
    torch.manual_seed(0)
    w = torch.randn(3, 64, 48)                                   # the model's [E, K, R]
    blocks, scales = Q.mxfp4_quantize(w)
    assert blocks.shape == (3, 48, 2, 16) and scales.shape == (3, 48, 2) and blocks.dtype == scales.dtype == torch.uint8
    got = Q.mxfp4_dequantize(blocks, scales)
    assert torch.equal(got, convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    assert (got - w).norm() / w.norm() < 0.15
    # byte 0x21 holds element 0 = code 1 (0.5) in the low nibble and element 1 = code 2 (1.0) in the high one
    b = torch.zeros(1, 1, 1, 16, dtype=torch.uint8)
    b[..., 0] = 0x21
    s = torch.full((1, 1, 1), 128, dtype=torch.uint8)          # 2^(128 - 127) = 2
    out = Q.mxfp4_dequantize(b, s)
    assert out.shape == (1, 32, 1) and out[0, :3, 0].tolist() == [1.0, 2.0, 0.0]
    exact = torch.tensor(Q.FP4_VALUES)[torch.randint(0, 16, (2, 64, 8))] * 4.0   # representable: kept exactly
    assert torch.equal(Q.mxfp4_dequantize(*Q.mxfp4_quantize(exact)), exact)


# ---------------------------------------------------------------- MXFP4: the fast code is the reference's bytes

def _reference_mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """quant.mxfp4_dequantize as it was before the table version (int64 codes, ldexp), verbatim."""
    if blocks.dim() > 3:
        *lead, rows, groups, _ = blocks.shape
        out = torch.empty(*lead, groups * Q.MX_GROUP, rows, dtype=dtype)
        for k in range(blocks.shape[0]):
            out[k] = _reference_mxfp4_dequantize(blocks[k], scales[k], dtype)
        return out
    b = blocks.to(torch.int64)
    codes = torch.stack([b & 0x0F, b >> 4], dim=-1).flatten(-2)                  # [R, G, 32]
    values = torch.ldexp(Q._FP4[codes], (scales.to(torch.int32) - Q.E8M0_BIAS).unsqueeze(-1))
    out = values.flatten(-2).transpose(-1, -2).contiguous()
    return out if dtype == torch.float32 else out.to(dtype)


def _reference_fp4_codes(x: torch.Tensor) -> torch.Tensor:
    mag = torch.bucketize(x.abs().contiguous(), Q._FP4_MIDPOINTS, right=False)
    return mag + 8 * ((x < 0) & (mag > 0)).to(torch.int64)


def _reference_mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quant.mxfp4_quantize as it was before the chunked, table-driven version (about 15x slower), verbatim."""
    x = w.to(torch.float32).transpose(-1, -2).contiguous()                       # [..., R, K]
    K = x.shape[-1]
    g = x.unflatten(-1, (K // Q.MX_GROUP, Q.MX_GROUP))                            # [..., R, G, 32]
    amax = g.abs().amax(dim=-1)
    tiny = torch.finfo(torch.float32).tiny
    high = torch.ceil(torch.log2((amax / 6.0).clamp(min=tiny))).clamp(-Q.E8M0_BIAS, 127).to(torch.int32)
    best_codes, best_exp, best_err = None, None, None
    for exp in (high, (high - 1).clamp(min=-Q.E8M0_BIAS)):
        codes = _reference_fp4_codes(torch.ldexp(g, -exp.unsqueeze(-1)))
        err = (torch.ldexp(Q._FP4[codes], exp.unsqueeze(-1)) - g).square().sum(dim=-1)
        if best_err is None:
            best_codes, best_exp, best_err = codes, exp, err
        else:
            better = err < best_err
            best_codes = torch.where(better.unsqueeze(-1), codes, best_codes)
            best_exp = torch.where(better, exp, best_exp)
            best_err = torch.where(better, err, best_err)
    pairs = best_codes.unflatten(-1, (Q.MX_GROUP // 2, 2))
    blocks = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
    return blocks, (best_exp + Q.E8M0_BIAS).to(torch.uint8)


EDGE = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, 3.4028235e38, -3.4028235e38, 1e-45,
                     -1e-45, 1.1754944e-38, 6 * 2.0 ** 126, 6 * 2.0 ** -127])
# the e2m1 grid, its midpoints (a tie rounds down), and values beyond 6 (clipped by the lower scale)
GRID = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, .25, .75, 1.25, 1.75, 2.5, 3.5, 5, 6.5, 12, 5.999])


def _edge_values(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """w [..., K, R] whose groups of 32 (along K) mix gaussians, grid values and midpoints (some nudged by an ulp
    or two) at exponents from subnormal to overflow, both signs, +-0, +-inf, NaN, the largest floats, all-zero
    groups."""
    gen = torch.Generator().manual_seed(seed)
    *lead, K, R = shape
    groups = math.prod(shape) // 32
    kind = torch.randint(0, 6, (groups, 32), generator=gen)
    v = torch.where(kind == 0, torch.randn(groups, 32, generator=gen),
                    GRID[torch.randint(0, len(GRID), (groups, 32), generator=gen)])
    v = v * torch.exp2(torch.randint(-150, 130, (groups, 1), generator=gen).float())
    nudge = torch.randint(-2, 3, (groups, 32), generator=gen, dtype=torch.int32) * (kind == 2)
    v = (v.view(torch.int32) + nudge).view(torch.float32)
    v = torch.where(torch.rand(groups, 32, generator=gen) < 0.5, -v, v)
    special = torch.rand(groups, 32, generator=gen) < 0.01
    v = torch.where(special, EDGE[torch.randint(0, len(EDGE), (groups, 32), generator=gen)], v)
    v = torch.where(torch.rand(groups, 1, generator=gen) < 0.05, 0.0, v)
    return v.reshape(*lead, R, K).transpose(-1, -2)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("chunk", [Q._CHUNK, 100])        # 100: three rows a chunk, a partial last chunk
def test_mxfp4_quantize_gives_the_reference_bytes_on_edge_values(chunk, monkeypatch):
    monkeypatch.setattr(Q, "_CHUNK", chunk)
    for seed, shape in enumerate([(64, 96), (3, 32, 37), (2, 2, 96, 20), (1024, 64)]):
        w = _edge_values(shape, seed)
        for t in (w, w.to(torch.bfloat16), w.to(torch.float64), w.contiguous()):
            got, want = Q.mxfp4_quantize(t), _reference_mxfp4_quantize(t)
            assert all(_same_bytes(a, b) for a, b in zip(got, want)), (shape, t.dtype)
    plain = torch.randn(2, 320, 200, generator=torch.Generator().manual_seed(9))        # ordinary weights as well
    assert all(_same_bytes(a, b) for a, b in zip(Q.mxfp4_quantize(plain), _reference_mxfp4_quantize(plain)))


def test_mxfp4_dequantize_gives_the_reference_values_for_every_byte_and_scale():
    blocks = torch.arange(256, dtype=torch.uint8).repeat(256).view(256, 16, 16)   # every byte, under every scale
    scales = torch.arange(256, dtype=torch.uint8).view(256, 1).expand(256, 16).contiguous()
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert _same_bytes(Q.mxfp4_dequantize(blocks, scales, dtype),
                           _reference_mxfp4_dequantize(blocks, scales, dtype)), dtype
    fused = blocks.view(4, 64, 16, 16), scales.view(4, 64, 16)
    assert _same_bytes(Q.mxfp4_dequantize(*fused), _reference_mxfp4_dequantize(*fused))


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.integers(1, 3).flatmap(lambda groups: st.tuples(
    st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True),
             min_size=32 * groups, max_size=32 * groups), st.integers(1, 3))))
def test_mxfp4_quantize_property_any_float32_is_the_reference(drawn):
    values, columns = drawn
    w = torch.tensor(values, dtype=torch.float32).view(-1, 1).repeat(1, columns)   # [K, R]
    w[:, 1:] *= torch.tensor([2.0 ** -60, 3.0])[: columns - 1]                     # other magnitudes, other rows
    assert all(_same_bytes(a, b) for a, b in zip(Q.mxfp4_quantize(w), _reference_mxfp4_quantize(w)))


# ---------------------------------------------------------------- prune in the precision the input ships

CASES = [("deepseek_v3", "fp8"), ("qwen3_moe", "fp8"), ("gpt_oss", "mxfp4")]
PRUNE = ["--calib", "random", "--samples", "2", "--seq-len", "16", "--no-eval", "--quiet"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("quant")
    return {f"{family}-{scheme}": write_quantized(base / f"{family}-{scheme}", family, scheme)
            for family, scheme in CASES}


def _ids(vocab: int = 256) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(0))


def _load(folder: Path, dtype=torch.float32):
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _expert_parts(ckpt: Checkpoint, layer: int, e: int) -> dict[str, bytes]:
    """The stored bytes of expert e of a layer, per part (per-expert tensors, or expert e of fused ones)."""
    out = {}
    for name, t in ckpt.tensors.items():
        if not name.startswith(f"model.layers.{layer}.mlp.experts."):
            continue
        rest = name[len(f"model.layers.{layer}.mlp.experts."):]
        if rest.startswith(f"{e}."):
            out[rest[len(f"{e}."):]] = bytes(ckpt.raw(name))
        elif not rest[0].isdigit() and not rest.endswith("_bias"):
            out[rest] = ckpt.get(name)[e].contiguous().view(torch.uint8).numpy().tobytes()
    return out


@pytest.mark.parametrize("case", [f"{f}-{s}" for f, s in CASES])
def test_selection_keeps_the_kept_experts_bytes_and_loads_with_the_same_logits(case, folders, tmp_path):
    src, out = folders[case], tmp_path / "out"
    assert main(["prune", str(src), "--method", "frequency", "--keep", "5", *PRUNE, "--out", str(out)]) == 0
    inp, got = Checkpoint(src), Checkpoint(out)
    plan = Plan.load(out / "plan.json")
    # config.json keeps the quantization_config; every tensor keeps its dtype
    assert json.loads((out / "config.json").read_text())["quantization_config"] == \
        json.loads((src / "config.json").read_text())["quantization_config"]
    assert all(got.info(n).dtype == inp.info(n).dtype for n in got.tensors)
    quantized = {"F8_E4M3"} if case.endswith("fp8") else {"U8"}
    assert quantized <= {t.dtype for t in got.tensors.values()}
    for i, lp in plan.layers.items():
        assert all(len(g) == 1 for g in lp.groups)
        for j, (e,) in enumerate(lp.groups):
            kept = _expert_parts(got, i, j)
            assert kept and kept == _expert_parts(inp, i, e), (i, j, e)       # weights and scales, byte for byte
        # the dropped experts are gone with their scales
        assert not [n for n in got.tensors if any(n.startswith(f"model.layers.{i}.mlp.experts.{k}.")
                                                  for k in range(5, 8))]
        head = f"model.layers.{i}.mlp.experts."
        fused = [n for n in got.tensors if n.startswith(head) and not n[len(head)].isdigit()]
        assert all(got.info(n).shape[0] == 5 for n in fused)
    # every tensor outside the routed experts and routers: the input's bytes (attention weights with their scales)
    for name in got.tensors:
        if ".mlp.experts." not in name and ".mlp.gate." not in name and ".mlp.router." not in name:
            assert got.raw(name) == inp.raw(name), name
    # transformers 5 loads it (dequantizing on the CPU): the logits of the dequantized input, pruned in memory
    reference = _load(src)
    apply_plan(reference, moe_layout(reference), plan)
    pruned = _load(out)
    with torch.no_grad():
        assert torch.equal(pruned(_ids()).logits, reference(_ids()).logits)


def merged_prune(src, out, keep: int, monkeypatch):
    """diverse at `keep` from `src` into `out`, recording the writer: (writer, plan, merged (layer, slot) pairs,
    the slots of one expert)."""
    from moeprune import api, hub
    writers = []

    class Recording(hub.CheckpointWriter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            writers.append(self)
    monkeypatch.setattr(api, "CheckpointWriter", Recording)
    api.prune(api.PruneConfig(model=str(src), method="diverse", keep=keep, out=str(out), calib="random", samples=2,
                              seq_len=16, quiet=True, no_eval=True))
    plan = Plan.load(out / "plan.json")
    merged = {(i, j) for i, lp in plan.layers.items() for j, g in enumerate(lp.groups) if len(g) > 1}
    single = {(i, j) for i, lp in plan.layers.items() for j, g in enumerate(lp.groups) if len(g) == 1}
    return writers[0], plan, merged, single


@pytest.mark.parametrize("case", [f"{f}-{s}" for f, s in CASES])
def test_merged_experts_are_quantized_again_with_their_errors_recorded(case, folders, tmp_path, monkeypatch):
    src, out = folders[case], tmp_path / "out"
    writer, plan, merged, single = merged_prune(src, out, 5, monkeypatch)
    assert merged and set(writer.quantization_errors) == {f"layers.{i}.experts.{j}" for i, j in merged}
    bound = 0.05 if case.endswith("fp8") else 0.2
    assert writer.copied_experts == len(single) * (3 if case.endswith("fp8") else 2)    # gate, up, down / gate_up, down
    assert all(0 < err < bound for err in writer.quantization_errors.values()), writer.quantization_errors
    report = json.loads((out / "report.json").read_text())["quantization"]          # the report states them
    assert report["output"] == case.rpartition("-")[2] and report["merged_expert_errors"] == pytest.approx(
        writer.quantization_errors) and report["copied_expert_tensors"] == writer.copied_experts
    assert "## Quantization" in (out / "report.md").read_text()
    inp, got = Checkpoint(src), Checkpoint(out)
    for i, j in single:                                        # an expert of one: still the input's bytes
        assert _expert_parts(got, i, j) == _expert_parts(inp, i, plan.layers[i].groups[j][0])
    # the recorded error is that of the stored tensor against the unquantized merge
    reference = _load(src)
    apply_plan(reference, moe_layout(reference), plan)
    source = CheckpointSource(out, "cpu", torch.float32)
    state = reference.state_dict()
    with source.whole() as model:
        for name, t in model.state_dict().items():          # routers: the merged rows in the file's dtype
            if ".mlp.experts." not in name:
                assert torch.equal(t, state[name]) or torch.equal(t, state[name].to(torch.bfloat16).to(t.dtype)), name
    label, err = next(iter(writer.tensor_quantization_errors.items()))
    name, _, j = label.partition("[")
    stored = source.quant.read(name, torch.float32)
    exact = _merged_value(reference, source, name)
    if j:
        stored, exact = stored[int(j[:-1])], exact[int(j[:-1])]
    assert math.isclose(float((stored - exact).norm() / exact.norm()), err, rel_tol=1e-4)
    pruned = _load(out)                                         # transformers loads it
    with torch.no_grad():
        a, b = pruned(_ids()).logits, reference(_ids()).logits
    assert (a - b).norm() / b.norm() < 2 * bound


def _merged_value(reference, source: CheckpointSource, file_name: str) -> torch.Tensor:
    """The value file tensor `file_name` of the pruned layout has in the model pruned in memory."""
    module = source.hub.module_names(file_name)[0]
    full = reference.state_dict()[module]
    return dict(source.hub.to_files(module, full))[file_name]


@pytest.mark.parametrize("case", [f"{f}-{s}" for f, s in CASES])
def test_dequantize_writes_bf16_without_quantization_config(case, folders, tmp_path, monkeypatch):
    from moeprune import api, hub
    src, out = folders[case], tmp_path / "out"
    result = api.prune(api.PruneConfig(model=str(src), method="frequency", keep=5, out=str(out), calib="random",
                                       samples=2, seq_len=16, quiet=True, no_eval=True, dequantize=True))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    got = Checkpoint(out)
    assert {t.dtype for t in got.tensors.values()} <= {"BF16", "F32"}
    assert not [n for n in got.tensors if n.endswith(("_scale_inv", "_blocks", "_scales"))]
    source = CheckpointSource(src, "cpu", torch.float32)          # the output's size, known from the headers
    assert hub.output_bytes(source, source.layout, 5, dequantize=True) == sum(t.nbytes for t in got.tensors.values())
    assert hub.output_bytes(source, source.layout, 5) < Checkpoint(src).total_bytes()
    assert_is_the_plan_applied(src, out, result.plan)


def assert_is_the_plan_applied(src, out, plan) -> None:
    """The bf16 output `out` is, tensor for tensor, the input `src` loaded by transformers in bf16 (dequantized)
    with `plan` applied in memory."""
    reference = _load(src, torch.bfloat16)
    apply_plan(reference, moe_layout(reference), plan)
    pruned, state = _load(out, torch.bfloat16), reference.state_dict()
    for name, t in pruned.state_dict().items():
        assert torch.equal(t, state[name]), name


# ---------------------------------------------------------------- info, eval, refusals

def test_info_and_eval_read_quantized_folders(folders, capsys):
    for case, dtype in (("deepseek_v3-fp8", "F8_E4M3"), ("gpt_oss-mxfp4", "U8")):
        assert main(["info", str(folders[case]), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["experts_per_layer"] == [8] and dtype in info["dtype"]
    assert main(["eval", str(folders["qwen3_moe-fp8"]), "--domains", "literature", "--tasks", "none",
                 "--max-tokens", "64", "--seq-len", "32", "--quiet"]) == 0
    assert "literature" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "compressed-tensors", "nvfp4"])
def test_other_quantization_methods_are_refused_by_name(method, folders, tmp_path, capsys):
    import shutil
    folder = tmp_path / "model"
    shutil.copytree(folders["deepseek_v3-fp8"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["info", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"quantized checkpoint of method {method!r}" in err and "fp8 and mxfp4" in err


def test_inconsistent_quantized_checkpoints_are_refused(folders, tmp_path):
    import shutil
    folder = tmp_path / "model"
    shutil.copytree(folders["deepseek_v3-fp8"], folder)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoePruneError, match="no quantization_config"):
        CheckpointSource(folder, "cpu", torch.float32)
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": None}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoePruneError, match="weight_block_size"):
        CheckpointSource(folder, "cpu", torch.float32)


@pytest.mark.parametrize("case", ["qwen3_moe-fp8", "gpt_oss-mxfp4"])
def test_layers_read_before_the_writer_existed_are_still_matched_to_their_bytes(case, folders, tmp_path):
    """Nothing indexed while reading: the writer reads the input experts it must match; unpruned, the output is
    the input byte for byte."""
    from moeprune.arch import decoder_layers
    from moeprune.hub import CheckpointWriter
    from moeprune.surgery import config_changes
    src, out = folders[case], tmp_path / "out"
    out.mkdir()
    source = CheckpointSource(src, "cpu", torch.float32)
    layers = [source.layer(i) for i in range(len(decoder_layers(source.model)))]
    changes = config_changes(source.layout, 8)
    writer = CheckpointWriter(out, source, source.layout, 8, changes)
    for i, layer in enumerate(layers):
        writer.write_layer(i, layer)
    writer.finish(src, source.layout.config, changes)
    a, b = Checkpoint(src), Checkpoint(out)
    assert sorted(a.tensors) == sorted(b.tensors) and all(a.raw(n) == b.raw(n) for n in a.tensors)
    assert writer.copied_experts == 2 * 8 * (3 if case.endswith("fp8") else 2) and not writer.quantization_errors
