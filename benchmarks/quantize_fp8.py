"""Quantize a bf16 hub-layout checkpoint to FP8 with 128x128 block scales, as the published -FP8 releases are
(Qwen3-30B-A3B-FP8, DeepSeek-V3): every linear weight of the decoder layers but the router in float8_e4m3fn
beside its float32 `weight_scale_inv`; embeddings, norms, routers and lm_head stay bf16. Shard by shard, so
it needs one shard in memory; the input's shard files and order are kept.

    python -m benchmarks.make_checkpoint qwen3-30b-a3b /work/bigckpt/qwen3-4l --layers 4
    python -m benchmarks.quantize_fp8 /work/bigckpt/qwen3-4l /work/bigckpt/qwen3-4l-fp8
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from moeprune.quant import fp8_quantize
from moeprune.shards import INDEX, Checkpoint

BLOCK = (128, 128)


def quantized(name: str, dim: int) -> bool:
    return (dim == 2 and name.startswith("model.layers.") and name.endswith(".weight") and "norm" not in name
            and not name.endswith(("mlp.gate.weight", "mlp.router.weight")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    ckpt = Checkpoint(args.src)
    args.out.mkdir(parents=True)
    weight_map, total = {}, 0
    for file in ckpt.files:
        part = {}
        for t in sorted((t for t in ckpt.tensors.values() if t.file.name == file), key=lambda t: t.start):
            w = ckpt.get(t.name)
            if quantized(t.name, w.dim()):
                part[t.name], part[t.name + "_scale_inv"] = fp8_quantize(w, BLOCK)
            else:
                part[t.name] = w
        save_file({k: v.contiguous() for k, v in part.items()}, args.out / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
        total += sum(v.numel() * v.element_size() for v in part.values())
        print(f"{file}: {len(part)} tensors", flush=True)
    (args.out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = json.loads((args.src / "config.json").read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": list(BLOCK)}
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in args.src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("config.json", INDEX):
            shutil.copy2(f, args.out / f.name)


if __name__ == "__main__":
    main()
