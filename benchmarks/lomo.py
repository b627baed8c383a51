"""Step 6 of docs/ABLATION.md: the leave-one-model-out choice of the default, from benchmarks.defaults' runs.

    python -m benchmarks.lomo docs/data/defaults/*-s?.json --held docs/data/defaults/held/*.json \
        --md docs/data/defaults.md --json docs/data/defaults-summary.json

Per setting (model, keep) and candidate: the mean and the worst domain ratio on `validation` and on `evaluation`,
each averaged over the seeds, with the seed standard deviation. The rule (fixed before the runs): regret(c, s) =
the larger of c's validation mean / the best candidate's and c's validation worst / the best candidate's at s;
on a set of models, the chosen candidate has the lowest largest regret over their settings (ties within 0.0005:
the lower geometric mean of the validation worst). Each model is left out in turn and the candidate chosen on the
other four is scored on its evaluation shards; the default is the candidate chosen on all five.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from benchmarks.defaults import AUTO, FIXED, MODELS

CANDIDATES = [label for label, *_ in FIXED] + AUTO
TIE = 0.0005


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def load(paths: list[str], seeds: list[int] | None = None) -> dict:
    """(model, keep) -> candidate -> seed -> {"valid": (mean, worst), "eval": (mean, worst), "picked"}."""
    out = defaultdict(lambda: defaultdict(dict))
    experts = {}
    for path in paths:
        res = json.loads(Path(path).read_text())
        if seeds is not None and res["seed"] not in seeds:
            continue
        experts[res["model"]] = res["experts"]
        for row in res["rows"]:
            cell = {k: (statistics.fmean(row[k].values()), max(row[k].values())) for k in ("valid", "eval")}
            cell["picked"] = row.get("picked")
            cell["eval_ratio"] = row["eval"]
            out[(res["model"], row["keep"])][row["candidate"]][res["seed"]] = cell
    return out, experts


# step 6b (after step 6's runs, docs/ABLATION.md): other pick rules over auto's eight plans, from the held-out ratios
# of every text domain and every held-out self-written window (benchmarks.auto_held); reported as post hoc
def _scores(held: dict[str, float], windows: str) -> tuple[float, float]:
    """(mean, worst) of held-out ratios: text domains and the self-written windows as one group (its geometric
    mean over windows, what auto scores), or with `windows` "worst" the worst over text domains and every window,
    or "each" every window a group of its own for both."""
    text = {g: r for g, r in held.items() if not g.startswith("self-")}
    own = [r for g, r in held.items() if g.startswith("self-")]
    group = geomean(own)
    if windows == "each":
        values = list(text.values()) + own
        return statistics.fmean(values), max(values)
    mean = statistics.fmean(list(text.values()) + [group])
    return mean, max(list(text.values()) + (own if windows == "worst" else [group]))


PICK_RULES = {"auto[window-worst]": ("worst", 0.02), "auto[windows]": ("each", 0.02),
              "auto[lowest-mean]": ("group", 0.0), "auto[lowest-worst]": ("group", math.inf)}


def add_pick_rules(data: dict, paths: list[str]) -> list[str]:
    """Rows of the post-hoc pick rules, from benchmarks.auto_held files; returns their names."""
    for path in paths:
        res = json.loads(Path(path).read_text())
        if (res["model"], min(r["keep"] for r in res["rows"])) not in data:
            continue
        for keep in sorted({r["keep"] for r in res["rows"]}):
            rows = [r for r in res["rows"] if r["keep"] == keep]
            setting = data[(res["model"], keep)]
            for rule, (windows, within) in PICK_RULES.items():
                scores = {r["plan"]: _scores(r["held"], windows) for r in rows}
                best = min(m for m, _ in scores.values())
                eligible = [p for p, (m, _) in scores.items() if m <= (1 + within) * best]
                chosen = min(eligible, key=lambda p: scores[p][1])
                recorded = setting.get(f"plan: {chosen}", {}).get(res["seed"])
                if recorded is not None:
                    setting[rule][res["seed"]] = {**recorded, "picked": chosen}
    return list(PICK_RULES)


def aggregate(by_seed: dict) -> dict:
    agg = {}
    for which in ("valid", "eval"):
        for i, name in enumerate(("mean", "worst")):
            values = [c[which][i] for c in by_seed.values()]
            agg[f"{which}_{name}"] = statistics.fmean(values)
            agg[f"{which}_{name}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    agg["seeds"] = sorted(by_seed)
    return agg


def table(data: dict) -> dict:
    """(model, keep) -> candidate -> aggregate, for the settings where every candidate has the same seeds."""
    out = {}
    for setting, cands in data.items():
        seeds = [set(cands[c]) for c in CANDIDATES if c in cands and cands[c]]
        if len(seeds) < len(CANDIDATES) or not set.intersection(*seeds):
            continue
        common = set.intersection(*seeds)
        out[setting] = {c: aggregate({s: cands[c][s] for s in common}) for c in CANDIDATES}
    return out


def regrets(agg: dict, which: str = "valid") -> dict:
    """candidate -> setting -> regret (the larger of the mean and the worst relative to the best candidate's)."""
    out = defaultdict(dict)
    for setting, cands in agg.items():
        best_mean = min(c[f"{which}_mean"] for c in cands.values())
        best_worst = min(c[f"{which}_worst"] for c in cands.values())
        for name, c in cands.items():
            out[name][setting] = max(c[f"{which}_mean"] / best_mean, c[f"{which}_worst"] / best_worst)
    return out


def choose(agg: dict, models: list[str]) -> tuple[str, dict]:
    """The rule: the lowest largest validation regret over the settings of `models`; ties within TIE by the lower
    geometric mean of the validation worst. Returns (candidate, candidate -> its largest regret)."""
    sub = {s: v for s, v in agg.items() if s[0] in models}
    reg = regrets(sub)
    largest = {c: max(reg[c].values()) for c in CANDIDATES}
    low = min(largest.values())
    tied = [c for c in CANDIDATES if largest[c] <= low + TIE]
    return min(tied, key=lambda c: geomean(sub[s][c]["valid_worst"] for s in sub)), largest


def verdict(agg: dict, setting, chosen: str, key: str) -> tuple[str, str, float]:
    """(the best candidate on evaluation by `key`, the verdict for `chosen`, its gap)."""
    cands = agg[setting]
    best = min(CANDIDATES, key=lambda c: cands[c][f"eval_{key}"])
    mine, theirs = cands[chosen][f"eval_{key}"], cands[best][f"eval_{key}"]
    noise = max(cands[chosen][f"eval_{key}_sd"], cands[best][f"eval_{key}_sd"])
    if best == chosen or round(mine, 3) == round(theirs, 3):
        return best, "best", 0.0
    return best, ("within the seed spread" if mine - theirs <= noise else "loses"), mine - theirs


def fmt(c: dict, which: str) -> str:
    return (f"{c[f'{which}_mean']:.3f} +- {c[f'{which}_mean_sd']:.3f} / "
            f"{c[f'{which}_worst']:.3f} +- {c[f'{which}_worst_sd']:.3f}")


def render(data: dict, agg: dict, experts: dict) -> tuple[str, dict]:
    models = [m for m in MODELS if any(s[0] == m for s in agg)]
    lines = ["# Step 6: every candidate default on five models (generated by benchmarks/lomo.py)", "",
             "Cells: mean / worst-domain perplexity ratio (pruned / full), mean +- standard deviation over the "
             "calibration seeds. `validation`: held-out 20% of the seven calibration shards (chooses); `evaluation`: "
             "the seven evaluation shards (scores). Code and math are in neither calibration text.", ""]
    summary = {"settings": {}, "lomo": {}, "chosen_on_all": None}
    for model in models:
        for keep in sorted({s[1] for s in agg if s[0] == model}, reverse=True):
            cands = agg[(model, keep)]
            seeds = cands[CANDIDATES[0]]["seeds"]
            lines += [f"## {model}, keep {keep} of {experts[model]} (seeds {', '.join(map(str, seeds))})", "",
                      "| candidate | evaluation | validation | auto's pick per seed |", "| --- | --- | --- | --- |"]
            for c in sorted(CANDIDATES, key=lambda c: cands[c]["eval_mean"]):
                picks = ", ".join(str(data[(model, keep)][c][s]["picked"]) for s in seeds) \
                    if c.startswith("auto") else ""
                lines.append(f"| {c} | {fmt(cands[c], 'eval')} | {fmt(cands[c], 'valid')} | {picks} |")
            oracle = []
            for s in seeds:
                plans = {k: v[s] for k, v in data[(model, keep)].items() if k.startswith("plan: ") and s in v}
                best = min(plans, key=lambda k: plans[k]["eval"][0])
                oracle.append(f"seed {s}: {best[6:]} {plans[best]['eval'][0]:.3f} / {plans[best]['eval'][1]:.3f}")
            lines += ["", "Oracle (the best of auto's eight plans by evaluation mean, for reference): "
                      + "; ".join(oracle), ""]
            summary["settings"][f"{model} {keep}"] = cands
    lines += ["## Leave one model out", "",
              "Chosen on the other models' validation scores (lowest largest regret), scored on the left-out model's "
              "evaluation shards. Verdict against the best candidate there: best, within the seed spread (gap at most "
              "the larger seed standard deviation), or loses (gap).", "",
              "| left out | chosen on the others (largest regret) | keep | evaluation mean / worst | best mean | "
              "verdict | best worst | verdict |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model in models:
        others = [m for m in models if m != model]
        if not others:
            continue
        chosen, largest = choose(agg, others)
        summary["lomo"][model] = {"chosen": chosen, "largest_regret": largest}
        for keep in sorted({s[1] for s in agg if s[0] == model}, reverse=True):
            s = (model, keep)
            c = agg[s][chosen]
            bm, vm, gm = verdict(agg, s, chosen, "mean")
            bw, vw, gw = verdict(agg, s, chosen, "worst")
            word = lambda v, g: v if v != "loses" else f"loses by {g:.3f}"        # noqa: E731
            lines.append(f"| {model} | {chosen} ({largest[chosen]:.3f}) | {keep} | {fmt(c, 'eval')} | "
                         f"{bm} {agg[s][bm]['eval_mean']:.3f} | {word(vm, gm)} | {bw} {agg[s][bw]['eval_worst']:.3f} | "
                         f"{word(vw, gw)} |")
    chosen, largest = choose(agg, models)
    summary["chosen_on_all"] = {"chosen": chosen, "largest_regret": largest}
    lines += ["", f"Chosen on all {len(models)} models: **{chosen}**. Largest validation regret of each candidate: "
              + ", ".join(f"{c} {v:.3f}" for c, v in sorted(largest.items(), key=lambda kv: kv[1])), ""]
    lines += [f"## {chosen} against the best other candidate, every setting (evaluation)", "",
              "| model | keep | metric | " + chosen + " | best other candidate | verdict |",
              "| --- | --- | --- | --- | --- | --- |"]
    for s in sorted(agg, key=lambda s: (MODELS.index(s[0]), -s[1])):
        for key in ("mean", "worst"):
            mine = agg[s][chosen]
            best = min((c for c in CANDIDATES if c != chosen), key=lambda c: agg[s][c][f"eval_{key}"])
            gap = mine[f"eval_{key}"] - agg[s][best][f"eval_{key}"]
            noise = max(mine[f"eval_{key}_sd"], agg[s][best][f"eval_{key}_sd"])
            word = ("**best**" if gap < 0 else "tie" if round(gap, 3) == 0 else
                    "within the seed spread" if gap <= noise else f"loses by {gap:.3f}")
            lines.append(f"| {s[0]} | {s[1]} | {key} | {mine[f'eval_{key}']:.3f} +- {mine[f'eval_{key}_sd']:.3f} | "
                         f"{best} {agg[s][best][f'eval_{key}']:.3f} +- {agg[s][best][f'eval_{key}_sd']:.3f} | {word} |")
    lines.append("")
    reg = regrets(agg, "eval")
    lines += ["Largest *evaluation* regret over all settings (for reference, never used to choose): "
              + ", ".join(f"{c} {max(v.values()):.3f}"
                          for c, v in sorted(reg.items(), key=lambda kv: max(kv[1].values())))
              , ""]
    return "\n".join(lines), summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", metavar="JSON", help="benchmarks.defaults runs: MODEL-sSEED.json")
    ap.add_argument("--held", nargs="*", default=[], metavar="JSON",
                    help="benchmarks.auto_held runs: add step 6b's post-hoc pick rules as candidates")
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="these calibration seeds only")
    ap.add_argument("--md", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    data, experts = load(args.paths, args.seeds)
    if args.held:
        CANDIDATES.extend(add_pick_rules(data, args.held))
    agg = table(data)
    text, summary = render(data, agg, experts)
    print(text)
    if args.md:
        Path(args.md).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"cmd": "python -m benchmarks.lomo " + " ".join(args.paths),
                                               "settings": {k: v for k, v in summary["settings"].items()},
                                               "lomo": summary["lomo"], "chosen_on_all": summary["chosen_on_all"]},
                                              indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
