"""DeepSeek-V4's published precision: FP8 e4m3 dense linears with e8m0 (ue8m0) 128x128 block scales and routed
experts in FP4 (quantization_config.expert_dtype "fp4"), every scale named `X.scale` beside `X.weight`.

The checkpoint is the tiny DeepSeek-V4 of test_layer_inputs (hash layers 0, 1; top-k layers 2, 3; 4 experts), saved
by transformers and written here in that layout: the experts' w1/w2/w3 as I8 [N, K/2] (two e2m1 codes a byte, low
nibble first) beside F8_E8M0 [N, K/32]; attention (wq_a, wq_b, wkv, wo_a, wo_b, the indexer's wq_b) and the shared
expert as F8_E4M3 beside F8_E8M0 block scales; router, compressors, norms, hyper-connections and embeddings plain,
as V4-Flash's shards hold them, under V4-Flash's names (`layers.*`, `embed.weight`, `hc_head_fn`: no `model.`
prefix; also with the prefix save_pretrained writes). Its config.json is V4-Flash's: quantization_config {fp8,
e4m3, ue8m0, [128, 128], dynamic} with expert_dtype at the top level (or, as transformers' DeepseekV4Config
rewrites it, inside quantization_config).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import test_layer_inputs
import torch
from conftest import char_tokenizer_files
from safetensors.torch import save_file
from test_quant import (PRUNE, _ids, _load, _merged_value, _reference_fp4_codes, _same_bytes,
                        assert_is_the_plan_applied, merged_prune)

from moeprune import quant as Q
from moeprune.arch import MoePruneError, moe_layout
from moeprune.cli import main
from moeprune.hub import output_bytes
from moeprune.plan import Plan
from moeprune.routing import correction_bias
from moeprune.shards import Checkpoint
from moeprune.sources import CheckpointSource
from moeprune.surgery import apply_plan

torch.set_num_threads(1)
V4_QCONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
              "weight_block_size": [128, 128]}
FP8_LINEAR = re.compile(r"\.attn\.(wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)\.weight$|\.shared_experts\.w[123]\.weight$")
FP4_EXPERT = re.compile(r"\.ffn\.experts\.\d+\.w[123]\.weight$")
FLOAT32 = ("hc_", "attn_sink", "gate.bias")          # kept in float32, as V4-Flash keeps them


def deepseek_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] in FP4 as DeepSeek's reference conversion scales it: per 32 values 2^ceil(log2(amax / 6)), each
    value the nearest e2m1 code. moeprune's quantizer may choose the scale below (lower error), so a kept expert
    that were quantized again instead of copied would not keep these bytes."""
    g = w.to(torch.float32).unflatten(-1, (-1, Q.MX_GROUP))
    exp = torch.ceil(torch.log2((g.abs().amax(dim=-1) / 6).clamp(min=torch.finfo(torch.float32).tiny)))
    codes = _reference_fp4_codes(torch.ldexp(g, -exp.unsqueeze(-1))).flatten(-2)
    q = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8).view(torch.int8)
    return q, (exp.to(torch.int32) + Q.E8M0_BIAS).to(torch.uint8).view(torch.float8_e8m0fnu)


def published_name(name: str) -> str:
    """save_pretrained's name of a deepseek_v4 tensor (model.layers.*, model.embed_tokens, model.hc_head.hc_fn) ->
    V4-Flash's (layers.*, embed.weight, hc_head_fn): transformers' loader adds the base model's prefix back."""
    name = name.removeprefix("model.")
    return {"embed_tokens.weight": "embed.weight"}.get(name, name.replace("hc_head.hc_", "hc_head_"))


def write_v4(path: Path, prefixed: bool = False) -> Path:
    """The tiny DeepSeek-V4 in V4-Flash's quantized layout (one shard), under V4-Flash's names, or, `prefixed`,
    save_pretrained's."""
    model = test_layer_inputs.build("deepseek_v4")
    plain = path.parent / (path.name + "-plain")
    model.save_pretrained(plain)
    ckpt = Checkpoint(plain)
    stored: dict[str, torch.Tensor] = {}
    for name in ckpt.tensors:
        t = ckpt.get(name)
        base = name[: -len(".weight")]
        if FP4_EXPERT.search(name):
            stored[name], stored[base + ".scale"] = deepseek_fp4(t.to(torch.bfloat16))
        elif FP8_LINEAR.search(name):
            stored[name], stored[base + ".scale"] = Q.fp8_quantize(t.to(torch.bfloat16), (128, 128), "F8_E8M0")
        elif any(k in name for k in FLOAT32) or t.dtype == torch.int64:
            stored[name] = t
        else:
            stored[name] = t.to(torch.bfloat16)
    path.mkdir(parents=True)
    save_file({(n if prefixed else published_name(n)): t.contiguous() for n, t in stored.items()},
              path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((plain / "config.json").read_text())
    config.update(quantization_config=dict(V4_QCONFIG), expert_dtype="fp4", dtype="bfloat16")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    char_tokenizer_files(path)
    return path


# ---------------------------------------------------------------- the arithmetic: MXFP4's, in V4's layout

def test_fp4_values_are_transformers_for_every_byte_and_scale():
    """Every byte under every e8m0 scale (255, e8m0's NaN, aside) dequantizes to what transformers' Fp8Dequantize
    gives an int8 FP4 weight with float8_e8m0fnu scales; the layout is [N, K] as stored, element 2k in the low
    nibble of byte k (0x21: 0.5 then 1.0)."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize
    q = torch.arange(256, dtype=torch.uint8).repeat(255).view(255, 256).view(torch.int8)      # [N, K/2]
    s = torch.arange(255, dtype=torch.uint8).view(255, 1).expand(255, 16).contiguous()     # [N, K/32]
    want = Fp8Dequantize(None)._dequantize_one(q, s.view(torch.float8_e8m0fnu), torch.float32)
    for scales in (s, s.view(torch.float8_e8m0fnu)):
        assert _same_bytes(Q.fp4_dequantize(q, scales), want)
    assert _same_bytes(Q.fp4_dequantize(q.view(5, 51, 256), s.view(5, 51, 16)), want.view(5, 51, 512))   # fused
    one = Q.fp4_dequantize(torch.tensor([[0x21] + [0] * 15], dtype=torch.uint8).view(torch.int8),
                           torch.tensor([[128]], dtype=torch.uint8))
    assert one[0, :3].tolist() == [1.0, 2.0, 0.0]


def test_fp4_quantize_is_mxfp4_quantize_in_v4_layout():
    """The codes and scales are those mxfp4_quantize chooses for the transposed tensor, only laid out [N, K/2]."""
    w = torch.randn(3, 40, 96, generator=torch.Generator().manual_seed(0))
    q, s = Q.fp4_quantize(w)
    blocks, scales = Q.mxfp4_quantize(w.transpose(-1, -2))
    assert q.dtype == torch.int8 and q.shape == (3, 40, 48) and s.dtype == torch.float8_e8m0fnu and s.shape == (3, 40, 3)
    assert _same_bytes(q.view(torch.uint8), blocks.flatten(-2)) and _same_bytes(s.view(torch.uint8), scales)
    back = Q.fp4_dequantize(q, s)
    assert torch.equal(back, Q.mxfp4_dequantize(blocks, scales).transpose(-1, -2))
    assert (back - w).norm() / w.norm() < 0.15
    assert Q.fp4_quantize(w, "U8")[1].dtype == torch.uint8


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings
from hypothesis import strategies as st


@st.composite
def canonical_fp4(draw):
    """FP4 rows as a quantizer writes them: each group of 32 holds a magnitude of 4 or 6 (a group whose largest is
    3 or less is held exactly by a smaller scale, which the quantizer takes) or is all zero; zero is +0 (code 8,
    -0, dequantizes to -0.0 and is written back as +0); scale bytes 1..252: the quantizer's exponents start at
    2^-126, float32's smallest normal (a group below it, all-zero ones too, gets byte 1: at byte 0 a largest 6 is
    also 3 at byte 1, and the tie goes to the larger scale), and 4 * 2^126 is no float32 (255 is e8m0's NaN)."""
    rows, groups = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    n = rows * groups
    raw = torch.tensor(list(draw(st.binary(min_size=n * 32, max_size=n * 32))), dtype=torch.int64).view(n, 32)
    per_group = torch.tensor(list(draw(st.binary(min_size=n * 3, max_size=n * 3))), dtype=torch.int64).view(n, 3)
    codes = raw & 7                                                           # magnitude codes 0..7
    codes[torch.arange(n), per_group[:, 0] % 32] = 6 + (per_group[:, 1] & 1)  # a 4 or a 6 in every group
    codes = codes | torch.where((raw & 8).bool() & (codes > 0), 8, 0)         # signs; zero stays +0
    zero = (per_group[:, 1] & 2).bool() & (per_group[:, 2] < 32)              # about 1 group in 16 all zero
    codes = torch.where(zero.unsqueeze(-1), 0, codes)
    scales = torch.where(zero, 1, 1 + per_group[:, 2] % 252).view(rows, groups).to(torch.uint8)
    pairs = codes.view(rows, groups * 16, 2)
    q = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8).view(torch.int8)
    return q, scales.view(torch.float8_e8m0fnu)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(canonical_fp4())
def test_fp4_round_trip_gives_the_same_bytes(stored):
    """dequantize -> quantize of FP4 values with e8m0 scales: the same weight bytes and scale bytes, from float32
    and from bfloat16 (every e2m1 value times a power of two is a bfloat16)."""
    q, s = stored
    for dtype in (torch.float32, torch.bfloat16):
        again = Q.fp4_quantize(Q.fp4_dequantize(q, s, dtype))
        assert _same_bytes(again[0], q) and _same_bytes(again[1], s), dtype


# ---------------------------------------------------------------- prune in the precision V4 ships

@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    return write_v4(tmp_path_factory.mktemp("v4fp4") / "v4")


def _v4_ids() -> torch.Tensor:
    return _ids(256)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_v4_ids(), use_cache=False).logits


def _prefix(ckpt: Checkpoint) -> str:
    return "model." if "model.norm.weight" in ckpt.tensors else ""


def _expert_bytes(ckpt: Checkpoint, layer: int, e: int) -> dict[str, bytes]:
    head = f"{_prefix(ckpt)}layers.{layer}.ffn.experts.{e}."
    return {n[len(head):]: bytes(ckpt.raw(n)) for n in ckpt.tensors if n.startswith(head)}


@pytest.mark.parametrize("prefixed, top_level", [(False, True), (False, False), (True, True)])
def test_selection_keeps_the_fp4_experts_bytes_and_loads_with_the_same_logits(prefixed, top_level, v4, tmp_path):
    """Each kept expert's I8 weights and e8m0 scales are the input's, byte for byte (w1, w2, w3 with their .scale);
    every other tensor too (the FP8 attention and shared expert with their scales), but the routers and the hash
    tables; config.json keeps quantization_config and expert_dtype where the input has it. transformers 5 loads
    the output (dequantizing FP8 and FP4 on the CPU) with no missing, unexpected or mismatched key, and its logits
    are those of the input, dequantized by transformers, pruned in memory by the same plan."""
    src = write_v4(tmp_path / "in", prefixed=True) if prefixed else v4
    if not top_level:                                      # V4.1 / transformers' own: expert_dtype in the qconfig
        src = tmp_path / "in"
        shutil.copytree(v4, src)
        config = json.loads((src / "config.json").read_text())
        config["quantization_config"]["expert_dtype"] = config.pop("expert_dtype")
        (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert main(["prune", str(src), "--method", "frequency", "--keep", "3", *PRUNE, "--out", str(out)]) == 0
    inp, got, plan = Checkpoint(src), Checkpoint(out), Plan.load(out / "plan.json")
    a, b = json.loads((src / "config.json").read_text()), json.loads((out / "config.json").read_text())
    assert b["quantization_config"] == a["quantization_config"] and b.get("expert_dtype") == a.get("expert_dtype")
    assert b["n_routed_experts"] == 3 and sorted(got.tensors) == sorted(n for n in inp.tensors if ".experts.3." not in n)
    source = CheckpointSource(src, "cpu", torch.float32)
    assert output_bytes(source, source.layout, 3) == sum(t.nbytes for t in got.tensors.values())
    assert all(got.info(n).dtype == inp.info(n).dtype for n in got.tensors)
    assert {"I8", "F8_E8M0", "F8_E4M3"} <= {t.dtype for t in got.tensors.values()}
    experts = [n for n in inp.tensors if FP4_EXPERT.search(n)]       # quantized again, some would differ: a copy
    assert any(not _same_bytes(Q.fp4_quantize(Q.fp4_dequantize(inp.get(n), inp.get(n[:-6] + "scale")))[0], inp.get(n))
               for n in experts)
    for i, lp in plan.layers.items():
        assert all(len(g) == 1 for g in lp.groups)
        for j, (e,) in enumerate(lp.groups):
            kept = _expert_bytes(got, i, j)
            assert sorted(kept) == [f"w{k}.{p}" for k in (1, 2, 3) for p in ("scale", "weight")]
            assert kept == _expert_bytes(inp, i, e), (i, j, e)
        assert not _expert_bytes(got, i, 3)                                  # the dropped expert, scales and all
    for name in got.tensors:
        if ".ffn.experts." not in name and ".ffn.gate." not in name:
            assert got.raw(name) == inp.raw(name), name
    reference = _load(src)
    apply_plan(reference, moe_layout(reference), plan)
    assert torch.equal(_logits(_load(out)), _logits(reference))


def test_merged_fp4_experts_are_quantized_again_with_their_errors_recorded(v4, tmp_path, monkeypatch):
    """A merge (diverse, 4 -> 2) writes each merged expert as FP4 with fresh e8m0 scales (MXFP4's rounding), an
    expert of one as the input's bytes; the report holds each merged expert's quantization error, which is the
    stored tensor's against the unquantized merge; transformers loads the output."""
    out = tmp_path / "out"
    writer, plan, merged, single = merged_prune(v4, out, 2, monkeypatch)
    assert merged and set(writer.quantization_errors) == {f"layers.{i}.experts.{j}" for i, j in merged}
    assert all(0 < err < 0.2 for err in writer.quantization_errors.values()), writer.quantization_errors
    assert writer.copied_experts == 3 * len(single)                                          # w1, w2, w3
    report = json.loads((out / "report.json").read_text())["quantization"]
    assert report["output"] == "fp8" and report["input"]["expert_dtype"] == "fp4"
    assert report["merged_expert_errors"] == pytest.approx(writer.quantization_errors)
    inp, got = Checkpoint(v4), Checkpoint(out)
    for i, j in single:
        assert _expert_bytes(got, i, j) == _expert_bytes(inp, i, plan.layers[i].groups[j][0])
    for i, j in merged:                                     # FP4 again: I8 beside e8m0 scales of the input's shapes
        assert {p: got.info(f"layers.{i}.ffn.experts.{j}.{p}").dtype for p in ("w1.weight", "w1.scale")} == \
            {"w1.weight": "I8", "w1.scale": "F8_E8M0"}
    reference = _load(v4)
    apply_plan(reference, moe_layout(reference), plan)
    source = CheckpointSource(out, "cpu", torch.float32)
    i, j = min(merged)
    for k in (1, 2, 3):
        name = f"layers.{i}.ffn.experts.{j}.w{k}.weight"
        stored, exact = source.quant.read(name, torch.float32), _merged_value(reference, source, name)
        assert math.isclose(float((stored - exact).norm() / exact.norm()), writer.tensor_quantization_errors[name],
                            rel_tol=1e-4)
    a, b = _logits(_load(out)), _logits(reference)
    assert (a - b).norm() / b.norm() < 0.4


def test_dequantize_writes_bf16_without_quantization_config_or_expert_dtype(v4, tmp_path):
    from moeprune import api
    out = tmp_path / "out"
    result = api.prune(api.PruneConfig(model=str(v4), method="frequency", keep=3, out=str(out), calib="random",
                                       samples=2, seq_len=16, quiet=True, no_eval=True, dequantize=True))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and "expert_dtype" not in config
    got = Checkpoint(out)
    assert {t.dtype for t in got.tensors.values()} <= {"BF16", "F32", "I64"}
    assert not [n for n in got.tensors if n.endswith(".scale")]
    assert got.info("layers.0.ffn.experts.0.w1.weight").shape == (32, 64)
    source = CheckpointSource(v4, "cpu", torch.float32)             # the output's size, known from the headers
    assert output_bytes(source, source.layout, 3, dequantize=True) == sum(t.nbytes for t in got.tensors.values())
    assert_is_the_plan_applied(v4, out, result.plan)


def test_quantized_multi_token_prediction_tensors_are_left_out(v4, tmp_path):
    """V4-Flash's mtp.* layer holds FP4 experts and FP8 linears with their scales too; transformers' loader drops
    it by name, and so does the prune (with its warning): the output has none of it and loads cleanly."""
    from safetensors.torch import load_file
    src = tmp_path / "in"
    shutil.copytree(v4, src)
    mtp = {"mtp.0.ffn.gate.tid2eid": torch.zeros(256, 2, dtype=torch.long)}
    for e in range(4):
        mtp[f"mtp.0.ffn.experts.{e}.w1.weight"], mtp[f"mtp.0.ffn.experts.{e}.w1.scale"] = \
            Q.fp4_quantize(torch.randn(32, 64))
    mtp["mtp.0.attn.wq_a.weight"], mtp["mtp.0.attn.wq_a.scale"] = \
        Q.fp8_quantize(torch.randn(16, 64), (128, 128), "F8_E8M0")
    save_file({**load_file(src / "model.safetensors"), **mtp}, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=f"{len(mtp)} tensors .* transformers does not load"):
        assert main(["prune", str(src), "--method", "frequency", "--keep", "3", *PRUNE,
                     "--out", str(tmp_path / "out")]) == 0
    assert not [n for n in Checkpoint(tmp_path / "out").tensors if n.startswith("mtp.")]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 0
    _load(tmp_path / "out")


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("damage, message", [
    (lambda t: {"layers.2.ffn.experts.1.w1.scale": torch.zeros(32, 4, dtype=torch.uint8)},
     (r"experts\.1\.w1\.weight I8\[32, 32\] with .*w1\.scale U8\[32, 4\] is not the FP4 expert layout .* expected "
      r".*w1\.scale F8_E8M0 \[32, 2\]")),
    (lambda t: {"layers.2.ffn.experts.1.w1.scale": torch.ones(32, 2)},
     r"w1\.scale F32\[32, 2\] is not the FP4 expert layout"),
    (lambda t: {"layers.2.ffn.experts.1.w2.weight": torch.zeros(64, 15, dtype=torch.int8)},
     r"w2\.weight I8\[64, 15\] .* expected .*a weight whose last axis is a multiple of 16"),
])
def test_a_bad_fp4_layout_is_refused_naming_the_tensor(damage, message, v4, tmp_path, capsys):
    from safetensors.torch import load_file
    folder = tmp_path / "bad"
    shutil.copytree(v4, folder)
    tensors = load_file(folder / "model.safetensors")
    save_file({**tensors, **damage(tensors)}, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MoePruneError, match=message):
        CheckpointSource(folder, "cpu", torch.float32)
    assert main(["info", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert "FP4 expert layout" in err and len(err.splitlines()) == 1


def test_fp4_experts_without_expert_dtype_are_refused(v4, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(v4, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["expert_dtype"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoePruneError, match=r"experts\.0\.w1\.weight is I8 beside .*w1\.scale \(FP4 experts\) but "
                                            r"quantization_config\.expert_dtype is 'fp8'"):
        CheckpointSource(folder, "cpu", torch.float32)
    config["expert_dtype"] = "fp6"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoePruneError, match="expert_dtype is 'fp6'"):
        CheckpointSource(folder, "cpu", torch.float32)


def test_experts_stored_in_different_precisions_are_refused_before_the_work(v4, tmp_path, capsys):
    """One expert's e8m0 scales stored as uint8 beside the others' F8_E8M0 (the same values) read fine, but a kept
    expert is written into another's file slot: refused by name before any layer runs (it was an internal error at
    the write), nothing written; --dequantize writes bf16 and does not care."""
    from safetensors.torch import load_file
    folder = tmp_path / "mixed"
    shutil.copytree(v4, folder)
    tensors = load_file(folder / "model.safetensors")
    name = "layers.3.ffn.experts.2.w2.scale"
    tensors[name] = tensors[name].view(torch.uint8)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert main(["info", str(folder)]) == 0
    out = tmp_path / "out"
    assert main(["prune", str(folder), "--method", "frequency", "--keep", "3", *PRUNE, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"experts\.0\.w2\.scale is F8_E8M0 but layers\.3\.ffn\.experts\.2\.w2\.scale "
                                       r"is U8: the experts of one tensor differ in precision", err[0]), err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["mixed"]
    assert main(["prune", str(folder), "--method", "frequency", "--keep", "3", *PRUNE, "--out", str(out),
                 "--dequantize"]) == 0


def test_float32_tensors_stay_float32_when_computing_in_bfloat16(v4, tmp_path):
    """--dtype bfloat16 (one V4-Flash layer's experts do not fit this machine in float32): the tensors the model
    declares float32 (the learned gate's bias, the hyper-connections) are read and kept in float32, as transformers
    keeps them, so the pruned gate bias is the input's kept rows bit for bit (read in bfloat16 they were off by up
    to 1e-4)."""
    out = tmp_path / "out"
    assert main(["prune", str(v4), "--method", "frequency", "--keep", "3", *PRUNE, "--dtype", "bfloat16",
                 "--out", str(out)]) == 0
    inp, got, plan = Checkpoint(v4), Checkpoint(out), Plan.load(out / "plan.json")
    biases = [n for n in got.tensors if n.endswith("ffn.gate.bias")]
    assert biases and all(got.info(n).dtype == "F32" for n in biases)
    for name in biases:
        layer = int(name.split(".")[1])
        kept = [g[0] for g in plan.layers[layer].groups]
        assert _same_bytes(got.get(name), inp.get(name)[kept]), name
    source = CheckpointSource(v4, "cpu", torch.bfloat16)
    source.layer(3)
    moe = source.layout.by_index()[3]
    assert correction_bias(moe).dtype == torch.float32 and moe.experts.gate_up_proj.dtype == torch.bfloat16
