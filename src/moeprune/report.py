"""The pruning report: report.json (plain JSON), report.md (Markdown) and img/*.png, plus a terminal summary.

    write_report(folder, report, stats=None, plan=None)    -> folder/report.json, report.md, img/*.png
    summary_table(report)                                   -> a short plain-text table

`report` is a Report (what a prune or `moeprune eval` found; every part optional, so the same functions
report both) or the JSON of one read back from report.json. The renderers read its JSON form, the one
report.json holds, so a report can be re-rendered from its file. Plots (matplotlib, headless): perplexity per domain full vs pruned; for up to
three MoE layers the expert similarity matrix ordered by the plan's groups with each group outlined,
and the routing frequency per expert marked kept / merged / dropped.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .evaluate import compare
from .similarity import cka_matrix

PLOT_LAYERS = 3
# a prune's report.json always holds these, null when empty (the calibration of a --plan run, ...)
_PRUNE_KEYS = ("calibration", "calibration_note")


@dataclass
class Report:
    """What a prune (or `moeprune eval`) found: the one object that report.json, report.md and the CLI read.
    The parts are JSON-shaped: model_info (before, after), the evaluation section, the trade-off table."""
    model: str
    method: str | None = None                 # a prune: how it planned
    options: dict | None = None
    router: str | None = None
    align: str | None = None
    keep_per_layer: dict[str, int] | None = None
    experts_before: int | None = None
    against: str | None = None                # `moeprune eval --against`: the original
    before: dict | None = None                # model_info of the original, and of the result
    after: dict | None = None
    calibration: dict | None = None
    calibration_note: str | None = None       # why the model wrote no calibration windows
    bytes_on_disk: dict | None = None
    stages: dict | None = None                # {"seconds": {stage: s}, "peak_rss_mb": {stage: MB}}
    evaluation: dict | None = None            # {"before", "after", "comparison"}: evaluate.evaluation_section
    tradeoff: dict | None = None
    evaluation_error: str | None = None       # the evaluation failed after the checkpoint was written
    evaluation_note: str | None = None        # why there is no evaluation
    quantization: dict | None = None          # a quantized input: scheme, output, merged experts' errors

    def to_json(self) -> dict:
        """The report as report.json holds it (unset parts left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None or (self.method is not None and f.name in _PRUNE_KEYS)}


def _data(report) -> dict:
    return report.to_json() if isinstance(report, Report) else report
COLORS = {"full": "#9aa5b1", "pruned": "#d9534f", "kept": "#2b6cb0", "target": "#2f855a", "merged": "#ed8936",
          "dropped": "#cbd5e0"}


# ---------------------------------------------------------------- JSON

def jsonable(obj):
    """A strictly JSON-serialisable copy: tensors and numpy values become numbers or lists, paths strings,
    dataclasses dicts, dict keys strings, and NaN / infinity None."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.detach().cpu().tolist())
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):           # numpy arrays and scalars
        return jsonable(obj.tolist())
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    return str(obj)


# ---------------------------------------------------------------- formatting helpers

def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if not math.isfinite(x):
            return "–"
        return f"{x:,.{digits}f}" if abs(x) < 1e5 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _pct(a, b) -> str:
    return f"{a / b:.1%}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "–"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _comparison(report: dict) -> dict | None:
    ev = report.get("evaluation") or {}
    if ev.get("comparison") is not None:
        return ev["comparison"]
    if ev.get("after") is not None:
        return compare(ev.get("before"), ev["after"])
    return None


def _keep(report: dict):
    kpl = report.get("keep_per_layer") or {}
    values = sorted(set(kpl.values()))
    return values[0] if len(values) == 1 else (values or None)


def pick_layers(indices, k: int = PLOT_LAYERS) -> list[int]:
    indices = sorted(indices)
    if len(indices) <= k:
        return indices
    picks = [indices[round(i * (len(indices) - 1) / (k - 1))] for i in range(k)]
    return sorted(set(picks))


def _roles(num_experts: int, lp) -> list[str]:
    """Per original expert: kept (alone), target (representative of a merged group), merged, or dropped."""
    roles = ["dropped"] * num_experts
    if lp is None:
        return ["kept"] * num_experts
    for group, rep in zip(lp.groups, lp.representatives):
        for e in group:
            roles[e] = "merged"
        roles[rep] = "kept" if len(group) == 1 else "target"
    return roles


def _group_order(num_experts: int, lp) -> tuple[list[int], list[tuple[int, int]]]:
    """Expert order with each group contiguous (representative first), dropped experts last; and the
    (start, size) block of each group in that order."""
    if lp is None:
        return list(range(num_experts)), []
    order, blocks = [], []
    for group, rep in zip(lp.groups, lp.representatives):
        members = [rep] + sorted(e for e in group if e != rep)
        blocks.append((len(order), len(members)))
        order.extend(members)
    order += [e for e in range(num_experts) if e not in set(order)]
    return order, blocks


# ---------------------------------------------------------------- plots

def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def plot_perplexity(path: Path, comparison: dict) -> Path | None:
    rows = comparison.get("perplexity") or {}
    if not rows:
        return None
    plt = _pyplot()
    names = list(rows)
    before = [rows[d]["before"] for d in names]
    after = [rows[d]["after"] for d in names]
    has_before = any(b is not None for b in before)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2), 4.2))
    x = list(range(len(names)))
    w = 0.4 if has_before else 0.6
    if has_before:
        ax.bar([i - w / 2 for i in x], [b or 0 for b in before], w, label="full", color=COLORS["full"])
        bars = ax.bar([i + w / 2 for i in x], after, w, label="pruned", color=COLORS["pruned"])
        for bar, d in zip(bars, names):
            r = rows[d]["ratio"]
            if r is not None:
                ax.annotate(f"×{r:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                            va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    else:
        ax.bar(x, after, w, label="model", color=COLORS["pruned"])
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("perplexity")
    title = "Held-out perplexity per domain"
    if comparison.get("mean_ratio") is not None:
        title += f" (mean ratio {comparison['mean_ratio']:.3f}, worst {comparison['worst']['domain']} " \
                 f"{comparison['worst']['ratio']:.3f})"
    ax.set_title(title, fontsize=10)
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _similarity(ls) -> torch.Tensor:
    cached = ls.cache.get("similarity/cka/output") if ls.cache else None
    if cached is not None:
        return cached.double()
    return cka_matrix(ls.outputs)


def plot_similarity(path: Path, stats, plan=None, layers: list[int] | None = None) -> Path | None:
    """Expert-output CKA per layer, experts ordered by the plan's groups, each group outlined."""
    if stats is None or not stats.layers:
        return None
    plt = _pyplot()
    from matplotlib.patches import Rectangle
    layers = layers or pick_layers(stats.layers)
    fig, axes = plt.subplots(1, len(layers), figsize=(4.4 * len(layers) + 0.8, 4.4), squeeze=False)
    image = None
    for ax, i in zip(axes[0], layers):
        ls = stats.layers[i]
        lp = plan.layers.get(i) if plan is not None else None
        E = ls.num_experts
        order, blocks = _group_order(E, lp)
        sim = _similarity(ls).float()[order][:, order]
        image = ax.imshow(sim.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
        for start, size in blocks:
            ax.add_patch(Rectangle((start - 0.5, start - 0.5), size, size, fill=False, lw=1.6 if size > 1 else 0.8,
                                   edgecolor="white" if size > 1 else "#f6e05e"))
        if E <= 64:
            roles = _roles(E, lp)
            ax.set_xticks(range(E))
            ax.set_yticks(range(E))
            fs = 7 if E <= 16 else 5 if E <= 32 else 3
            ax.set_xticklabels(order, fontsize=fs, rotation=90)
            ax.set_yticklabels(order, fontsize=fs)
            for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
                for lab, e in zip(labels, order):
                    lab.set_color("#a0aec0" if roles[e] == "dropped" else "black")
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_title(f"layer {i}: expert CKA" + (f", {len(blocks)} groups" if blocks else ""), fontsize=9)
    fig.colorbar(image, ax=list(axes[0]), fraction=0.025, pad=0.02)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_routing(path: Path, stats, plan=None, layers: list[int] | None = None) -> Path | None:
    """Routing frequency per expert, each bar coloured by what the plan made of the expert."""
    if stats is None or not stats.layers:
        return None
    plt = _pyplot()
    from matplotlib.patches import Patch
    layers = layers or pick_layers(stats.layers)
    fig, axes = plt.subplots(len(layers), 1, figsize=(8.0, 2.3 * len(layers) + 0.6), squeeze=False)
    used = set()
    for ax, i in zip(axes[:, 0], layers):
        ls = stats.layers[i]
        lp = plan.layers.get(i) if plan is not None else None
        E = ls.num_experts
        roles = _roles(E, lp)
        used |= set(roles)
        freq = ls.frequency.double().tolist()
        ax.bar(range(E), freq, color=[COLORS[r] for r in roles], width=0.85)
        dropped = [e for e in range(E) if roles[e] == "dropped"]
        if dropped:
            ax.scatter(dropped, [0.0] * len(dropped), marker="x", s=14, color="#718096", zorder=3, clip_on=False)
        ax.axhline(1.0 / E, color="#4a5568", lw=0.8, ls="--")
        ax.set_xlim(-0.7, E - 0.3)
        ax.set_ylabel("routing share", fontsize=8)
        ax.set_title(f"layer {i}: routing frequency per expert (dashed: uniform)", fontsize=9)
        if E <= 64:
            ax.set_xticks(range(E))
            ax.tick_params(axis="x", labelsize=6 if E > 16 else 8)
    labels = {"kept": "kept", "target": "kept, merge target", "merged": "merged into another", "dropped": "dropped"}
    handles = [Patch(color=COLORS[r], label=labels[r]) for r in labels if r in used]
    axes[-1, 0].set_xlabel("expert")
    top = 1 - 0.35 / fig.get_figheight()
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.legend(handles=handles, fontsize=8, frameon=False, loc="upper center", ncol=len(handles),
               bbox_to_anchor=(0.5, 1.0))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(img: Path, report: Report | dict, stats=None, plan=None) -> dict[str, Path]:
    """Write the plots that the inputs allow into img/; {name: path}."""
    img.mkdir(parents=True, exist_ok=True)
    report = _data(report)
    out = {}
    comparison = _comparison(report)
    if comparison and (p := plot_perplexity(img / "perplexity.png", comparison)):
        out["perplexity"] = p
    if stats is not None and stats.layers:
        layers = pick_layers(stats.layers)
        if plan is not None:
            layers = [i for i in layers if i in plan.layers] or layers
        shown = [i for i in layers if "similarity/cka/output" in stats.layers[i].cache
                 or stats.layers[i].outputs.numel()]
        if shown and (p := plot_similarity(img / "similarity.png", stats, plan, shown)):
            out["similarity"] = p
        if p := plot_routing(img / "routing.png", stats, plan, layers):
            out["routing"] = p
    if not out and not any(img.iterdir()):
        img.rmdir()
    return out


# ---------------------------------------------------------------- text

def _params_rows(report: dict) -> list[tuple[str, object, object]]:
    b = (report.get("before") or {}).get("parameters") or {}
    a = (report.get("after") or {}).get("parameters") or {}
    rows = [("parameters", b.get("total"), a.get("total")),
            ("in routed experts", b.get("routed_experts"), a.get("routed_experts")),
            ("active per token", b.get("active_per_token"), a.get("active_per_token"))]
    disk = report.get("bytes_on_disk") or {}
    if disk.get("before") or disk.get("after"):
        rows.append(("bytes on disk", disk.get("before"), disk.get("after")))
    return [r for r in rows if r[1] is not None or r[2] is not None]


def render_markdown(report: Report | dict, images: dict[str, str] | None = None) -> str:
    """report.md: what was done, size, quality per domain, tasks, cost, plan; images as relative links."""
    images, report = images or {}, _data(report)
    out = [f"# moeprune report: {report.get('model', 'model')}", ""]
    if report.get("method"):
        opts = ", ".join(f"{k}={v}" for k, v in (report.get("options") or {}).items())
        kpl = report.get("keep_per_layer") or {}
        keep = _keep(report)
        line = f"Method **{report['method']}**" + (f" ({opts})" if opts else "")
        if report.get("experts_before") is not None and keep is not None:
            line += f": {report['experts_before']} → {keep} routed experts in each of {len(kpl)} MoE layers"
        line += f"; router rule `{report.get('router', '')}`, alignment `{report.get('align', '')}`."
        out += [line, ""]
    elif report.get("against"):
        out += [f"Evaluated against `{report['against']}`.", ""]
    rows = _params_rows(report)
    if rows:
        out += ["## Size", "", _md_table(["", "full", "pruned", "pruned / full"],
                                           [[n, _fmt(b), _fmt(a), _pct(a, b)] for n, b, a in rows]), ""]
    comparison = _comparison(report)
    ev = report.get("evaluation") or {}
    if comparison and comparison.get("perplexity"):
        settings = (ev.get("after") or {}).get("settings") or {}
        tokens = {d: v["tokens"] for d, v in ((ev.get("after") or {}).get("perplexity") or {}).items()}
        out += ["## Perplexity on held-out text", ""]
        if settings:
            out += [f"Windows of {settings.get('seq_len')} tokens (stride {settings.get('stride')})"
                    + (f", at most {settings['max_tokens']:,} tokens per domain" if settings.get("max_tokens") else "")
                    + ". Ratio = pruned / full; 1.0 is no loss.", ""]
        if ev.get("before") is None:                                  # one model, nothing to compare
            table = [[d, _fmt(tokens.get(d)), _fmt(r["after"])] for d, r in comparison["perplexity"].items()]
            out += [_md_table(["domain", "tokens", "perplexity"], table), ""]
        else:
            table = [[d, _fmt(tokens.get(d)), _fmt(r["before"]), _fmt(r["after"]), _fmt(r["ratio"])]
                     for d, r in comparison["perplexity"].items()]
            if comparison.get("mean_ratio") is not None:
                table.append(["**mean**", "", _fmt(comparison.get("mean_ppl_before")),
                              _fmt(comparison.get("mean_ppl_after")), f"**{_fmt(comparison['mean_ratio'])}**"])
            out += [_md_table(["domain", "tokens", "ppl full", "ppl pruned", "ratio"], table), ""]
        if comparison.get("worst"):
            w = comparison["worst"]
            out += [(f"Worst domain: **{w['domain']}** (ratio {_fmt(w['ratio'])}); geometric-mean ratio "
                     f"{_fmt(comparison.get('geomean_ratio'))}."), ""]
        if "perplexity" in images:
            out += [f"![perplexity per domain]({images['perplexity']})", ""]
    if comparison and comparison.get("tasks"):
        table = [[t, _fmt(r["n"]), _fmt(r["chance"]), _fmt(r["acc_before"]), _fmt(r["acc_after"]),
                  _fmt(r["acc_norm_before"]), _fmt(r["acc_norm_after"])] for t, r in comparison["tasks"].items()]
        out += ["## Multiple-choice tasks", "",
                _md_table(["task", "n", "chance", "acc full", "acc pruned", "acc_norm full", "acc_norm pruned"],
                          table), ""]
    if comparison and comparison.get("lm_eval"):
        table = [[t, m, _fmt(v["before"]), _fmt(v["after"])]
                 for t, metrics in comparison["lm_eval"].items() for m, v in metrics.items()]
        out += ["## lm-evaluation-harness", "", _md_table(["task", "metric", "full", "pruned"], table), ""]
    if report.get("tradeoff"):
        out += ["## Trade-off on held-out calibration text", "",
                "Perplexity ratio pruned / full per domain on a held-out fifth of the calibration text, for the "
                "written plan and the alternatives planned from the same statistics (their plans: tradeoff/).", "",
                tradeoff_table(report["tradeoff"]), ""]
    if report.get("evaluation_error"):
        out += ["## Evaluation", "", f"The evaluation failed after the checkpoint was written: "
                f"{report['evaluation_error']}", ""]
    stages = report.get("stages") or {}
    if stages.get("seconds"):
        peak = stages.get("peak_rss_mb") or {}
        table = [[s, _fmt(t), _fmt(peak.get(s), 1)] for s, t in stages["seconds"].items()]
        timed = any(s.startswith("eval") for s in stages["seconds"])      # evaluation already a stage
        for side in ("before", "after"):
            if not timed and (ev.get(side) or {}).get("seconds") is not None:
                table.append([f"evaluate ({'full' if side == 'before' else 'pruned'})", _fmt(ev[side]["seconds"]), ""])
        out += ["## Cost", "", _md_table(["stage", "seconds", "peak RSS (MB)"], table), ""]
    quant = report.get("quantization")
    if quant:
        errors = quant.get("merged_expert_errors") or {}
        out += ["## Quantization", "", f"Input: {quant['input']['method']}; output: {quant['output']}."
                + (f" {quant['copied_expert_tensors']} kept expert tensors copied as the input's bytes." if
                   "copied_expert_tensors" in quant else "")]
        if errors:
            worst = max(errors, key=errors.get)
            out += [f"{len(errors)} merged experts quantized again with fresh scales: relative error against "
                    f"the unquantized merge {min(errors.values()):.4f}-{errors[worst]:.4f} (worst {worst})."]
        out.append("")
    calib = report.get("calibration")
    if calib:
        keys = ("spec", "samples", "self_calib", "seq_len", "sample_tokens", "seed")
        out += ["## Calibration", "", ", ".join(f"{k} = {calib[k]}" for k in keys if k in calib) + "."]
        if calib.get("self_calib"):
            own = round(calib["self_calib"] * calib["samples"])
            how = f"cut from {calib['self_text']}" if calib.get("self_text") else "sampled from it here, seeded"
            out += [(f"{own} of the {calib['samples']} windows were written by the model itself ({how}), the rest "
                     "cut from the calibration text.")]
        if report.get("calibration_note"):
            out += [f"No window was written by the model: {report['calibration_note']}."]
        out.append("")
    plan = report.get("plan")
    if plan:
        out += ["## Plan", "", _md_table(["layer", "output experts (original ids; a+b = merged)"],
                                          [[i, ", ".join("+".join(map(str, g)) for g in groups)]
                                           for i, groups in plan.items()]), ""]
    if "similarity" in images:
        note = ("Linear CKA of the experts' outputs on calibration tokens, experts ordered by the plan's groups "
                "(outlined); grey labels: dropped experts.")
        out += ["## Expert similarity", "", note, "",
                f"![expert similarity]({images['similarity']})", ""]
    if "routing" in images:
        out += ["## Routing", "", f"![routing frequency]({images['routing']})", ""]
    return "\n".join(out).rstrip() + "\n"


def summary_table(report: Report | dict) -> str:
    """A short plain-text table for the terminal: per-domain perplexity full / pruned / ratio, mean and worst,
    task accuracy, parameters."""
    lines, report = [], _data(report)
    comparison = _comparison(report)
    if comparison and comparison.get("perplexity"):
        rows = comparison["perplexity"]
        w = max(8, *(len(d) for d in rows))
        if all(r["before"] is None for r in rows.values()):          # one model, nothing to compare
            lines.append(f"{'domain':<{w}}  {'perplexity':>10}")
            lines += [f"{d:<{w}}  {_fmt(r['after'], 2):>10}" for d, r in rows.items()]
            rows = {}
        elif rows:
            lines.append(f"{'domain':<{w}}  {'ppl full':>10}  {'ppl pruned':>10}  {'ratio':>7}")
        for d, r in rows.items():
            lines.append(f"{d:<{w}}  {_fmt(r['before'], 2):>10}  {_fmt(r['after'], 2):>10}  {_fmt(r['ratio']):>7}")
        if comparison.get("mean_ratio") is not None:
            lines.append(f"{'mean':<{w}}  {_fmt(comparison.get('mean_ppl_before'), 2):>10}  "
                         f"{_fmt(comparison.get('mean_ppl_after'), 2):>10}  {_fmt(comparison['mean_ratio']):>7}")
            worst = comparison["worst"]
            lines.append(f"{'worst':<{w}}  {worst['domain']:>22}  {_fmt(worst['ratio']):>7}")
    if comparison and comparison.get("tasks"):
        rows = comparison["tasks"]
        w = max(8, *(len(t) for t in rows))
        lines.append(f"{'task':<{w}}  {'acc full':>10}  {'acc pruned':>10}  {'chance':>7}")
        for t, r in rows.items():
            lines.append(f"{t:<{w}}  {_fmt(r['acc_before']):>10}  {_fmt(r['acc_after']):>10}  {_fmt(r['chance']):>7}")
    if comparison and comparison.get("lm_eval"):
        for t, metrics in comparison["lm_eval"].items():
            for m, v in metrics.items():
                lines.append(f"lm-eval {t} {m}: {_fmt(v['before'])} -> {_fmt(v['after'])}")
    for name, b, a in _params_rows(report)[:1]:
        lines.append(f"{name}: {_fmt(b)} -> {_fmt(a)} ({_pct(a, b)})")
    return "\n".join(lines)


def tradeoff_table(tradeoff: dict) -> str:
    """The trade-off as a Markdown table: one row per plan, the chosen one first; ratios pruned / full."""
    rows = tradeoff["rows"]
    domains = list(next(iter(rows.values()))["ratio"])
    lines = ["| plan (held-out calibration text) | mean | worst | " + " | ".join(domains) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in domains) + " |"]
    for label, r in rows.items():
        name = f"**{label}** (written)" if label == tradeoff["chosen"] else label
        lines.append(f"| {name} | {r['mean']:.3f} | {r['worst']['ratio']:.3f} {r['worst']['domain']} | "
                     + " | ".join(f"{r['ratio'][d]:.3f}" for d in domains) + " |")
    for label, why in tradeoff.get("left_out", {}).items():
        lines.append(f"\nLeft out: {label}, whose method refuses this model ({why}).")
    return "\n".join(lines)


# ---------------------------------------------------------------- the folder

def write_report(folder, report: Report | dict, stats=None, plan=None) -> None:
    """Write report.json, report.md and img/*.png into `folder` (created if needed).

    stats (moeprune.stats.Stats) and plan (moeprune.plan.Plan) feed the similarity and routing plots and the
    plan table; both are optional. report.json is strictly JSON (no tensors, NaN written as null).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = dict(_data(report))
    if plan is not None:
        data.setdefault("plan", {str(i): lp.groups for i, lp in sorted(plan.layers.items())})
    comparison = _comparison(data)
    if comparison is not None:
        data["evaluation"] = {**data["evaluation"], "comparison": comparison}
    paths = make_plots(folder / "img", data, stats, plan)
    images = {k: p.relative_to(folder).as_posix() for k, p in paths.items()}
    data["images"] = images
    data = jsonable(data)
    (folder / "report.json").write_text(json.dumps(data, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    (folder / "report.md").write_text(render_markdown(data, images), encoding="utf-8")
