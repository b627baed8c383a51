"""Survey every transformers model type with a routed *Experts module: can moeprune find its experts by
structure (moeprune.discover), without a hand-written arch.Family entry?

    python scripts/families.py                     # writes docs/FAMILIES.md (and docs/data/families.json)
    python scripts/families.py --only qwen3_moe    # one model type, printed
    python scripts/families.py --page-only         # the page again from docs/data/families.json

Per model type, in a child process (one thread, a time limit each): the generic tiny config
(tiny.tiny_config_any), a seeded CPU build by its causal-LM (or image-text-to-text) auto class,
discover.find_moe with the probes, discover.check_contract, one forward pass, and the expert-count key
checked by editing it to 4 and rebuilding on the meta device.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "python scripts/families.py"

# well-known checkpoints per model type (the config's own docstring checkpoint is added where this has none)
CHECKPOINTS: dict[str, list[str]] = {
    "mixtral": ["mistralai/Mixtral-8x7B-v0.1", "mistralai/Mixtral-8x22B-v0.1"],
    "qwen2_moe": ["Qwen/Qwen1.5-MoE-A2.7B", "Qwen/Qwen2-57B-A14B"],
    "qwen3_moe": ["Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-235B-A22B", "Qwen/Qwen3-Coder-480B-A35B-Instruct"],
    "qwen3_next": ["Qwen/Qwen3-Next-80B-A3B-Instruct"],
    "qwen3_vl_moe": ["Qwen/Qwen3-VL-30B-A3B-Instruct", "Qwen/Qwen3-VL-235B-A22B-Instruct"],
    "qwen3_omni_moe": ["Qwen/Qwen3-Omni-30B-A3B-Instruct"],
    "olmoe": ["allenai/OLMoE-1B-7B-0924"],
    "flex_olmo": ["allenai/FlexOlmo-7x7B-1T"],
    "deepseek_v2": ["deepseek-ai/DeepSeek-V2-Lite", "deepseek-ai/DeepSeek-V2",
                    "deepseek-ai/DeepSeek-Coder-V2-Instruct"],
    "deepseek_v3": ["deepseek-ai/DeepSeek-V3", "deepseek-ai/DeepSeek-R1", "moonshotai/Kimi-K2-Instruct"],
    "deepseek_v32": ["deepseek-ai/DeepSeek-V3.2-Exp"],
    "glm4_moe": ["zai-org/GLM-4.5", "zai-org/GLM-4.5-Air", "zai-org/GLM-4.6"],
    "glm4v_moe": ["zai-org/GLM-4.5V"],
    "ernie4_5_moe": ["baidu/ERNIE-4.5-21B-A3B-PT", "baidu/ERNIE-4.5-300B-A47B-PT"],
    "ernie4_5_vl_moe": ["baidu/ERNIE-4.5-VL-28B-A3B-PT"],
    "phimoe": ["microsoft/Phi-3.5-MoE-instruct"],
    "gpt_oss": ["openai/gpt-oss-20b", "openai/gpt-oss-120b"],
    "dbrx": ["databricks/dbrx-base", "databricks/dbrx-instruct"],
    "jamba": ["ai21labs/AI21-Jamba-Mini-1.5", "ai21labs/AI21-Jamba-Large-1.5"],
    "jetmoe": ["jetmoe/jetmoe-8b"],
    "granitemoe": ["ibm-granite/granite-3.1-3b-a800m-instruct"],
    "granitemoeshared": ["ibm-research/moe-7b-1b-active-shared-experts"],
    "granitemoehybrid": ["ibm-granite/granite-4.0-h-small", "ibm-granite/granite-4.0-h-tiny"],
    "llama4": ["meta-llama/Llama-4-Scout-17B-16E", "meta-llama/Llama-4-Maverick-17B-128E"],
    "minimax": ["MiniMaxAI/MiniMax-Text-01"],
    "minimax_m2": ["MiniMaxAI/MiniMax-M2"],
    "hunyuan_v1_moe": ["tencent/Hunyuan-A13B-Instruct"],
    "dots1": ["rednote-hilab/dots.llm1.inst"],
    "kimi_linear": ["moonshotai/Kimi-Linear-48B-A3B-Instruct"],
    "longcat_flash": ["meituan-longcat/LongCat-Flash-Chat"],
    "lfm2_moe": ["LiquidAI/LFM2-8B-A1B"],
    "nemotron_h": ["nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B"],
    "switch_transformers": ["google/switch-base-8"],
    "nllb-moe": ["facebook/nllb-moe-54b"],
    "aria": ["rhymes-ai/Aria"],
    "exaone_moe": ["LGAI-EXAONE/K-EXAONE-236B-A23B"],
    "glm4_moe_lite": ["zai-org/GLM-4.7-Flash"],
    "mimo_v2_flash": ["XiaomiMiMo/MiMo-V2-Flash"],
    "solar_open": ["upstage/Solar-Open-100B"],
    "afmoe": ["arcee-ai/Trinity-Mini"],
}


# ------------------------------------------------------------------------------------------------ the scan

def moe_model_types() -> list[tuple[str, str]]:
    """(model type, modeling module) of every registered config whose modeling file defines a *Experts class
    and whose config (or a nested sub-config) names a routed expert count."""
    import transformers
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    root = Path(transformers.__file__).parent / "models"
    out = []
    for model_type in CONFIG_MAPPING_NAMES:
        try:
            cls = CONFIG_MAPPING[model_type]
        except Exception:                                   # noqa: BLE001
            continue
        module = cls.__module__.split(".")[2]
        source = root / module / f"modeling_{module}.py"
        if not source.exists() or not re.search(r"^class \w+Experts\(", source.read_text(), re.M):
            continue
        try:
            text = json.dumps(cls().to_dict(), default=str)
        except Exception:                                   # noqa: BLE001  keep it: the survey says why
            text = "expert"
        if re.search(r'"[a-z_]*expert[a-z_]*": [1-9]', text):
            out.append((model_type, module))
    return out


def docstring_checkpoint(model_type: str) -> str | None:
    import transformers
    from transformers import CONFIG_MAPPING
    cls = CONFIG_MAPPING[model_type]
    module = cls.__module__.split(".")[2]
    text = (Path(transformers.__file__).parent / "models" / module / f"configuration_{module}.py").read_text()
    m = re.search(r'auto_docstring\(checkpoint="([^"]+)"\)\s*(?:@\w+\s*)*class ' + cls.__name__ + r"\b", text)
    return m.group(1) if m else None


def _set_path(config, dotted: str, value) -> None:
    *path, leaf = dotted.split(".")
    for part in path:
        config = getattr(config, part)
    setattr(config, leaf, value)


def survey_one(model_type: str) -> dict:
    """Everything the survey records about one model type (run in a child process)."""
    import torch
    import transformers
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    from moeprune.discover import check_contract, find_moe
    from moeprune.tiny import model_class_for, tiny_config_any, tiny_model_any
    from transformers import CONFIG_MAPPING

    row: dict = {"model_type": model_type, "stage": "config"}
    t0 = time.time()
    try:
        config = tiny_config_any(model_type)
    except Exception as e:                                  # noqa: BLE001
        row.update(status="no tiny config", why=f"{type(e).__name__}: {e}")
        return row
    cls = model_class_for(config)
    if cls is None:
        from transformers.models.auto import modeling_auto as ma
        kinds = [n[10:-14].lower() for n in dir(ma) if n.startswith("MODEL_FOR_") and n.endswith("_MAPPING_NAMES")
                 and model_type in getattr(ma, n)]
        parents = [t for t, c in CONFIG_MAPPING.items()
                   if type(config) in (getattr(c, "sub_configs", None) or {}).values()]
        inside = f"the sub-config of {', '.join(parents)}, surveyed in its own row" if parents else "a sub-config"
        row.update(status="not a causal LM", why=", ".join(kinds) or inside)
        return row
    row["auto_class"] = cls.__name__
    row["stage"] = "build"
    try:
        model = tiny_model_any(model_type, config=config)
    except Exception as e:                                  # noqa: BLE001
        row.update(status="no tiny config", why=f"build: {type(e).__name__}: {e}")
        return row
    row["build_s"] = round(time.time() - t0, 2)
    row["stage"] = "find_moe"
    try:
        s = find_moe(model)
    except Exception as e:                                  # noqa: BLE001
        row.update(status="needs a family entry", why=f"find_moe: {e}")
        return row
    first = s.layers[0]
    row.update(
        num_experts=s.num_experts, top_k=s.top_k, n_experts_keys=list(s.n_experts_keys),
        n_experts_aliases=list(s.n_experts_aliases), top_k_keys=list(s.top_k_keys), group_fields=s.group_fields,
        layers_path=s.layers_path, num_layers=s.num_layers, moe_layers=list(s.moe_layers), block=s.block,
        router=s.router, experts=s.experts, shared=list(s.shared) if s.shared is not None else None,
        router_tensors=[list(t) for t in s.router_tensors], gate_up=s.gate_up, gate_up_evidence=s.gate_up_evidence,
        scoring=s.scoring, scoring_evidence=s.scoring_evidence, axis0=s.axis0, other_stacks=list(s.other_stacks),
        experts_class=first.experts_class, router_class=first.router_class,
        expert_tensors=[f"{t.name} {list(t.shape)}" for t in first.expert_tensors], notes=list(s.notes),
        identity_key=s.identity_key, identity_slots=first.identity_slots,
        folded=[t.name for t in first.expert_tensors if t.folded])
    row["stage"] = "contract"
    c = check_contract(s, model)
    row.update(router_returns=c.router_returns, experts_signature=c.experts_signature, contract=list(c.differences))
    row["stage"] = "forward"
    try:
        with torch.no_grad():
            ids = torch.randint(3, config.get_text_config().vocab_size if hasattr(config, "get_text_config")
                                else 256, (1, 8))
            model(input_ids=ids, use_cache=False)
        row["forward"] = "ok"
    except Exception as e:                                  # noqa: BLE001
        row["forward"] = f"{type(e).__name__}: {str(e)[:160]}"
    row["stage"] = "edit"
    if s.n_experts_key:
        try:
            edited = copy.deepcopy(model.config)           # the key is a path in the built model's config
            _set_path(edited, s.n_experts_key, 4)
            rebuilt = find_moe(tiny_model_any(model_type, config=edited, device="meta"), probe=False)
            row["edit_rows"] = rebuilt.num_experts
        except Exception as e:                              # noqa: BLE001
            row["edit_rows"] = f"{type(e).__name__}: {str(e)[:160]}"
    row["stage"] = "done"
    problems = []
    if not s.n_experts_key:
        problems.append("no config key holds the expert count")
    elif row.get("edit_rows") != 4:
        problems.append(f"editing {s.n_experts_key} to 4 gives {row.get('edit_rows')} experts")
    if not s.top_k_key:
        problems.append("no config key holds the top-k")
    if None in (s.block, s.router, s.experts):
        problems.append("the block/router/experts paths differ between layers")
    problems += c.differences
    if row["forward"] != "ok":
        problems.append(f"forward: {row['forward']}")
    row["problems"] = problems
    row["status"] = "works by structure" if not problems else "needs a family entry"
    row["total_s"] = round(time.time() - t0, 2)
    return row


def run_children(model_types: list[str], timeout: int) -> dict[str, dict]:
    """Survey model types in one child process (imports are slow); a model type that crashes or hangs the
    child is retried alone, and recorded as failing if it does so again."""
    rows: dict[str, dict] = {}
    pending = list(model_types)
    while pending:
        alone = len(pending) == 1
        cmd = [sys.executable, __file__, "--json", "--only", *pending]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout * len(pending), cwd=ROOT)
            out, err = p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = f"the build ran past {timeout} s"
        for line in out.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                rows[row["model_type"]] = row
        left = [t for t in pending if t not in rows]
        if left and (alone or len(left) == len(pending) and len(pending) == 1):
            tail = (err.strip().splitlines() or ["no output"])[-1]
            rows[left[0]] = {"model_type": left[0], "status": "no tiny config", "why": f"crashed: {tail[:200]}"}
            left = left[1:]
        elif left:                                    # the first missing one broke the child: retry it alone
            rows.update(run_children(left[:1], timeout))
            left = left[1:]
        pending = left
    return rows


# ------------------------------------------------------------------------------------------------ the page

def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _status(row: dict) -> str:
    status = row["status"]
    if status == "works by structure":
        return "works by structure" + ("" if row.get("family") is None else " (has an arch.Family entry)")
    if status == "works with its family entry":
        return "works with its arch.Family entry, which adapts: " + "; ".join(row.get("problems") or [])
    if status == "needs a family entry":
        why = "; ".join(row.get("problems") or [row.get("why", "")])
        return f"needs a family entry for: {why}"
    if status == "no tiny config":
        return f"cannot build a tiny config because {row.get('why')}"
    return f"not a causal LM ({row.get('why')})"


def pruned(row: dict) -> str:
    """Whether the CLI prunes the type end to end (tests/test_families.py: a tiny hub-layout folder pruned, the
    output loaded with no missing/unexpected keys, keep-all logits equal); the reason where a strict xfail says
    it does not yet."""
    if not row["status"].startswith("works"):
        return "-"
    sys.path.insert(0, str(ROOT / "tests"))
    from test_families import NOT_YET
    return f"not yet: {NOT_YET[row['model_type']]}" if row["model_type"] in NOT_YET else "yes"


def write_page(rows: list[dict], path: Path) -> None:
    import transformers
    import torch
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    lines = [
        "# Every MoE model type transformers ships: found by structure",
        "",
        f"Generated by `{COMMAND}` (transformers {transformers.__version__}, torch {torch.__version__}); "
        "do not edit by hand.",
        "",
        "One row per transformers model type whose modeling file defines a routed `*Experts` module and whose "
        "config names an expert count. For each: the generic tiny config (`moeprune.tiny.tiny_config_any`: "
        "hidden 64, 4 layers, 8 experts, top-k 2), a seeded CPU build, `moeprune.discover.find_moe` (decoder "
        "layers, MoE block, router with E rows, experts tensors with the expert axis, config keys), "
        "`check_contract` (router returns (logits, weights, indices), experts take (hidden, top_k_index, "
        "top_k_weights)), one forward pass, and the expert-count key edited to 4 and rebuilt (4 rows expected).",
        "",
        "Summary: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        + f" ({len(rows)} model types); of those that work (by structure or with their entry), "
        + f"{sum(pruned(r) == 'yes' for r in rows)} are pruned end to end by the CLI and "
        + f"{sum(pruned(r).startswith('not yet') for r in rows)} not yet (last column).",
        "",
        "| model type | status | checkpoints | experts key (E=8) | top-k key | MoE layers / layers "
        "| block . router / experts, other block children | gate_up, scoring | pruned by the CLI (tests/test_families.py) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        keys = ", ".join(row.get("n_experts_keys") or []) or "-"
        if row.get("n_experts_aliases"):
            keys += f" (alias {', '.join(row['n_experts_aliases'])})"
        if row.get("identity_key"):             # the routers also score identity (LongCat) or shared (Inkling) experts
            kind = "shared experts, every token's" if "shared" in row["identity_key"] else "identity experts"
            keys += f"; the routers also score {row['identity_key']} = {row['identity_slots']} {kind}"
        elif row.get("identity_slots"):         # counted by the router alone (Zaya's skip expert)
            keys += (f"; the routers also score {row['identity_slots']} slot(s) they count themselves "
                     f"({row['router_class']})")
        where = "-"
        if row.get("experts"):
            where = f"`{row.get('block')}.{row.get('router')}` / `{row.get('experts')}`"
            if row.get("shared"):
                where += ", " + ", ".join(row["shared"])
        layers = f"{len(row['moe_layers'])}/{row['num_layers']}" if row.get("moe_layers") else "-"
        gu = "-"
        if row.get("experts"):
            gu = (f"{row.get('gate_up')} ({row.get('gate_up_evidence')}), "
                  f"{row.get('scoring')} ({row.get('scoring_evidence')})")
            if row.get("folded"):                # DBRX: [E * I, H], the expert axis folded into axis 0
                gu += f"; {', '.join(row['folded'])} fold the experts into axis 0 ([E * I, ...])"
        lines.append("| " + " | ".join(_cell(x) for x in (
            row["model_type"], _status(row), ", ".join(row.get("checkpoints") or []) or "-", keys,
            ", ".join(row.get("top_k_keys") or []) or "-", layers, where, gu, pruned(row))) + " |")
    lines += ["", "Evidence: *entry* = stated by its arch.FAMILIES entry; *probe* = measured on the tiny model "
              "(zeroing half of the fused gate_up kills an "
              "expert's output exactly when that half is the gate; the router's weights are proportional to "
              "softmax/sigmoid of its logits); *shape* / *guess* = from the tensor shapes / router tensors alone.",
              "", "The raw survey, one JSON object per model type: docs/data/families.json.", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="model types (default: every one with *Experts)")
    ap.add_argument("--json", action="store_true", help="print one JSON line per model type (child mode)")
    ap.add_argument("--timeout", type=int, default=120, help="seconds per model type")
    ap.add_argument("--out", default=str(ROOT / "docs" / "FAMILIES.md"))
    ap.add_argument("--page-only", action="store_true", help="rewrite the page from docs/data/families.json")
    args = ap.parse_args()
    if args.page_only:
        write_page(json.loads((ROOT / "docs" / "data" / "families.json").read_text()), Path(args.out))
        return
    if args.json:
        for model_type in args.only:
            try:
                row = survey_one(model_type)
            except Exception as e:                          # noqa: BLE001
                row = {"model_type": model_type, "status": "no tiny config",
                       "why": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-800:]}
            print(json.dumps(row, default=str))
        return
    from moeprune.arch import FAMILIES
    types = [(t, None) for t in args.only] if args.only else moe_model_types()
    rows = []
    t0 = time.time()
    done = run_children([t for t, _ in types], args.timeout)
    for model_type, _ in types:
        row = done[model_type]
        row["checkpoints"] = CHECKPOINTS.get(model_type) or [c for c in [docstring_checkpoint(model_type)] if c]
        row["family"] = model_type if model_type in FAMILIES else None
        if row["family"]:                       # what the entry states wins over discovery's guess
            entry = FAMILIES[model_type]
            for key in ("gate_up", "scoring"):
                if row.get(key) != getattr(entry, key):
                    row[key], row[f"{key}_evidence"] = getattr(entry, key), "entry"
        if row["family"] and row["status"] == "needs a family entry":     # the entry adapts what differs
            row["status"] = "works with its family entry"
        rows.append(row)
        print(f"{model_type:40s} {row.get('total_s', '-')!s:>6}s  {_status(row)[:150]}", flush=True)
    print(f"{len(rows)} model types in {time.time() - t0:.0f} s")
    if args.only:
        return
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_page(rows, Path(args.out))
    timeless = [{k: v for k, v in row.items() if k not in ("build_s", "total_s")} for row in rows]   # reproducible
    (Path(args.out).parent / "data" / "families.json").write_text(json.dumps(timeless, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
