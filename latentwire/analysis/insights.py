"""How results are analysed: ranking with honest uncertainty, the seed's insight sections, the
interpretation, and the next command to run.

Works from `summary.json` alone (no torch), on partial or failed sweeps, single experiments,
summaries from older versions without per-example scores, and sweeps over several sources.
"""

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from .. import experiments, stats
from ..errors import UsageError
from ..experiments import Experiment
from ..files import why_not_a_file
from ..options import option
from ..training.options import experiment_command
from . import report
from .formatting import number, render_text


@dataclass
class AnalyzeOptions:
    summary: str = option(metavar="PATH", help="a sweep's summary.json, or its output folder")
    json: bool = option(False, help="print the insights as JSON")
    plots: bool = option(True, help="write the plots and report.html beside the summary; "
                                    "--no_plots skips them")


def summary_file(path: str) -> Path:
    """The summary.json that --summary names: the file, or the one in a sweep's folder."""
    p = Path(path)
    if p.is_dir():
        if not (p / "summary.json").is_file():
            raise UsageError(f"folder {path} holds no summary.json; pass a sweep's output folder "
                             "or the path of its summary.json")
        return p / "summary.json"
    return p


def load_summary(path: str) -> dict:
    p = summary_file(path)
    if not p.is_file():
        raise UsageError(f"summary file {path} {why_not_a_file(p)}; run a sweep first or pass the "
                         "path of its summary.json")
    try:
        summary = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"summary file {path} is not valid JSON ({err}); rerun the sweep into "
                         "the same directory to rebuild it from the per-experiment files")
    if not isinstance(summary, dict) or not ("results" in summary or "models" in summary):
        raise UsageError(f"summary file {path} has no 'results'; it is not a sweep summary")
    return summary


def normalise(summary: dict) -> tuple[list[dict], list[dict]]:
    """(successful results, failed results) with every field the analysis reads filled in, so
    summaries from older versions (results as a dict, no status/category/source) still work."""
    raw = summary.get("results", [])
    if isinstance(raw, dict):
        raw = [{"experiment": k, **v} for k, v in raw.items()]
    ok, failed = [], []
    for r in raw:
        r = dict(r)
        r.setdefault("source", "text")
        r.setdefault("category", experiments.category_of(r.get("experiment", "")))
        r.setdefault("config", {})
        r.setdefault("diagnostics", {})
        status = r.get("status", "ok" if "f1" in r and "error" not in r else "failed")
        (ok if status == "ok" and r.get("f1") is not None else failed).append(r)
    return ok, failed


def _scores(r: dict) -> dict[str, float] | None:
    preds = r.get("predictions")
    if not preds:
        return None
    return {p["id"]: float(p["f1"]) for p in preds}


def _paired(a: dict, b: dict) -> tuple[list[float], list[float]]:
    ids = sorted(set(a) & set(b))
    return [a[i] for i in ids], [b[i] for i in ids]


def analyse_source(results: list[dict], text_baseline_f1: float | None = None,
                   source: str = "text") -> dict:
    """Everything the report says about one source's experiments; text_baseline_f1 is the
    baseline on the model's own embeddings when this source is another one."""
    scores = {r["experiment"]: _scores(r) for r in results}
    base_scores = scores.get("baseline")
    rows = []
    for r in results:
        s = scores[r["experiment"]]
        row = {"experiment": r["experiment"], "category": r["category"], "config": r["config"],
               "f1": r["f1"], "em": r.get("em"), "empty_rate": r.get("empty_rate"),
               "num_samples": r.get("num_samples"),
               "f1_ci": stats.bootstrap_ci(list(s.values())) if s else None,
               "identical_to_input": bool(r["diagnostics"].get("identical_to_input")),
               "reused_generations_from": r.get("reused_generations_from"),
               "diagnostics": r["diagnostics"], "vs_baseline": None}
        if s and base_scores and r["experiment"] != "baseline":
            row["vs_baseline"] = stats.paired_comparison(*_paired(s, base_scores))
        if row["identical_to_input"] and r["experiment"] != "baseline":
            row["vs_baseline"] = {**(row["vs_baseline"] or {}), "label": "no-op"}
        rows.append(row)
    # Among equal F1s: the baseline first, experiments that changed nothing last.
    rows.sort(key=lambda x: (-x["f1"], x["experiment"] != "baseline",
                             x["identical_to_input"], x["experiment"]))
    out = {"ranked": rows, "baseline_f1": next((r["f1"] for r in results
                                                if r["experiment"] == "baseline"), None),
           "text_baseline_f1": text_baseline_f1, "source": source}

    # Statistical ties with the leader: a paired comparison of each with the top experiment.
    tied = []
    top_scores = scores[rows[0]["experiment"]] if rows else None
    if top_scores:
        for row in rows[1:]:
            s = scores[row["experiment"]]
            if s is None:
                continue
            row["tied_with_top"] = (stats.paired_comparison(*_paired(top_scores, s))["label"]
                                    == "indistinguishable")
            # A no-op only repeats the baseline, so it is not named; the baseline itself is.
            noop = row["identical_to_input"] and row["experiment"] != "baseline"
            if row["tied_with_top"] and not noop:
                tied.append(row["experiment"])
        if tied:
            a, b = _paired(top_scores, scores[tied[0]])
            out["separation"] = {"top": rows[0]["experiment"], "runner_up": tied[0],
                                 "samples_needed": stats.samples_needed(a, b),
                                 "samples_used": len(a)}
    out["tied_with_top"] = tied

    best = {}
    for row in rows:
        best.setdefault(row["category"], row)
    out["best_per_category"] = best
    out["hyperparameters"] = hyperparameters(rows)
    out["interpretation"], out["recommendations"], out["next_command"] = interpret(out)
    return out


def _marginal(rows, category, key):
    groups = defaultdict(list)
    for r in rows:
        if r["category"] == category and key in r["config"]:
            groups[r["config"][key]].append(r["f1"])
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def hyperparameters(rows: list[dict]) -> dict:
    hp = {}
    if any(r["category"] == "nearest_k" for r in rows):
        best = next(r for r in rows if r["category"] == "nearest_k")
        hp["nearest_k"] = {"best": best["config"], "best_experiment": best["experiment"],
                           "mean_f1_by_k": _marginal(rows, "nearest_k", "k"),
                           "mean_f1_by_alpha": _marginal(rows, "nearest_k", "alpha")}
    if any(r["category"] == "anchor_offset" for r in rows):
        by_eps = _marginal(rows, "anchor_offset", "eps")
        values = list(by_eps.values())
        trend = "flat"
        if len(values) > 1 and max(values) - min(values) > 0.01:
            trend = "rising with eps" if values[-1] > values[0] else "falling with eps"
        noop = all(r["identical_to_input"] for r in rows if r["category"] == "anchor_offset")
        hp["anchor_offset"] = {"f1_by_eps": by_eps, "trend": trend, "all_no_op": noop}
    if any(r["category"] == "rms_matching" for r in rows):
        hp["rms_matching"] = {"f1_by_scale": _marginal(rows, "rms_matching", "target_scale")}
    if any(r["category"] == "soft_codebook" for r in rows):
        best = next(r for r in rows if r["category"] == "soft_codebook")
        hp["soft_codebook"] = {"best": best["config"],
                               "mean_f1_by_size": _marginal(rows, "soft_codebook", "size"),
                               "mean_f1_by_tau": _marginal(rows, "soft_codebook", "tau")}
    return hp


# The seed's full training run, and the rate its default encoder (pool, 4x, batch 16) trained at
# on 2 CPU cores (docs/results/performance.md): what the printed next step costs.
FULL_RUN = {"samples": 10000, "epochs": 10}
POOL_EXAMPLES_PER_S = 10.2


def train_command(row: dict) -> str | None:
    """The seed's full training run with this result's transform in the graph; None for the
    baseline, which has no transform to train with."""
    if (row["category"] not in experiments.categories()
            or not experiments.of_category(row["category"])[1].trainable):
        return None
    exp = Experiment(row.get("experiment", row["category"]), row["category"], "", row["config"])
    return experiment_command(exp, **FULL_RUN)


def duration() -> str:
    """What the full training run takes, at the measured rate."""
    hours = FULL_RUN["samples"] * FULL_RUN["epochs"] / POOL_EXAMPLES_PER_S / 3600
    first = 2000 / POOL_EXAMPLES_PER_S / 60
    return (f"trains for about {hours:.1f} h on 2 CPU cores at the measured "
            f"{POOL_EXAMPLES_PER_S} examples/s, less on a GPU; --samples 2000 --epochs 1 trains "
            f"for about {first:.0f} min")


def interpret(out: dict) -> tuple[list[str], list[str], str | None]:
    rows, base = out["ranked"], out["baseline_f1"]
    insights, recs = [], []
    real = [r for r in rows if not r["identical_to_input"] or r["experiment"] == "baseline"]
    if rows and max(r["f1"] for r in rows) < 0.02:
        insights.append("Everything fails (best F1 < 0.02): the inputs_embeds path or the "
                        "generation setup is likely broken.")
        recs.append("Debug generation: check the baseline's predictions, the prompt format and "
                    "that inputs_embeds reach the model unchanged.")
        return insights, recs, None
    text_base = out.get("text_baseline_f1")
    if base is not None and text_base is not None:
        verdict = ("breaks the model by itself" if base < 0.5 * text_base
                   else "leaves the model mostly able to answer")
        insights.append(f"Untransformed, this source scores F1 {base:.3f} against {text_base:.3f} "
                        f"on the model's own embeddings: it {verdict}; transforms are judged by "
                        "how much of that they recover.")
    elif base is not None:
        if base > 0.5:
            insights.append(f"Baseline F1 {base:.3f} > 0.5: the model can use embeddings; the "
                            "problem is the encoder's distribution.")
        else:
            insights.append(f"Baseline F1 {base:.3f} is the reference (the seed's 0.5 bar is for "
                            "larger models); transforms are judged against it, not against 1.0.")
    noops = [r["experiment"] for r in rows if r["identical_to_input"] and r["experiment"] != "baseline"]
    if noops:
        insights.append(f"{len(noops)} experiment(s) changed nothing and only repeat the baseline: "
                        f"{', '.join(noops)}. On real token embeddings anchor_offset is a no-op; "
                        "test it on an off-distribution source (--source mismatch).")
    better = [r for r in real if (r.get("vs_baseline") or {}).get("label") == "better"]
    worse = [r for r in real if (r.get("vs_baseline") or {}).get("label") == "worse"]
    same = [r for r in real if (r.get("vs_baseline") or {}).get("label") == "indistinguishable"]
    if any(r.get("vs_baseline") for r in rows):
        insights.append(f"Against the baseline (paired bootstrap, 95%): {len(better)} better, "
                        f"{len(worse)} worse, {len(same)} indistinguishable.")
    if out.get("tied_with_top"):
        sep = out.get("separation") or {}
        need = sep.get("samples_needed")
        msg = (f"{rows[0]['experiment']} ranks first but is statistically tied with "
               f"{len(out['tied_with_top'])} other(s) ({', '.join(out['tied_with_top'][:5])}"
               f"{', ...' if len(out['tied_with_top']) > 5 else ''}).")
        if need:
            msg += (f" Separating it from {sep['runner_up']} at the observed variance needs about "
                    f"{need} samples (used {sep['samples_used']}).")
        insights.append(msg)
    winner = better[0] if better else None
    if winner is None:
        best = next((r for r in real if r["experiment"] != "baseline"), None)
        trained = out.get("source", "text").startswith("adapter:")
        if best is not None and base is not None:
            why = ("The model learned to read these latents as they are; a transform added after "
                   "training only moves them away from that." if trained else
                   "On real token embeddings a transform can only keep or lose; whether one "
                   "repairs an encoder's distribution is tested with off-distribution sources.")
            insights.append(f"No transform beats the baseline: the best, {best['experiment']} "
                            f"(F1 {best['f1']:.3f}), is not significantly better. {why}")
        recs.append("Keep training without a transform after the encoder, or screen them inside "
                    "the graph (latentwire screen)." if trained else
                    "Keep the plain embeddings for this source; rerun with --source mismatch "
                    "(or your adapter) to see which transform repairs a broken distribution.")
        command = train_command(best) if best is not None else None
        if command:
            recs.append(f"If one must be tried now, the leading candidate is {best['experiment']} "
                        f"(not significantly better; confirm it first): {command} ({duration()})")
        return insights, recs, command
    known = winner["category"] in experiments.categories()
    t = experiments.of_category(winner["category"])[1] if known else None
    meaning, action = (t.meaning, t.action) if t else ("", "")
    insights.append(f"{winner['experiment']} wins ({winner['category']}, F1 {winner['f1']:.3f} vs "
                    f"baseline {number(base)}). {meaning}")
    recs.append(action)
    command = train_command(winner)
    if command:
        recs.append(f"Next: {command} ({duration()})")
    return insights, recs, command


def recovery(ok: list[dict]) -> list[dict]:
    """F1(source + transform) / F1(text baseline), with paired bootstrap intervals."""
    text_base = next((r for r in ok if r["source"] == "text" and r["experiment"] == "baseline"), None)
    if text_base is None or not text_base.get("f1"):
        return []
    base = _scores(text_base)
    rows = []
    for r in ok:
        if r["source"] == "text":
            continue
        s = _scores(r)
        if s and base:
            a, b = _paired(s, base)
            ratio, ci = stats.ratio_ci(a, b)
        else:
            ratio, ci = r["f1"] / text_base["f1"], None
        rows.append({"source": r["source"], "experiment": r["experiment"], "f1": r["f1"],
                     "recovery": ratio, "recovery_ci": ci})
    rows.sort(key=lambda x: (x["source"], -x["recovery"]))
    return rows


def build(summary: dict) -> dict:
    """The analysis of a sweep; of each model and across them for a sweep over several."""
    if "models" in summary:
        per = {m["dir"]: build(m["summary"]) for m in summary["models"]}
        return {"models": per, "model_ids": {m["dir"]: m["model_id"] for m in summary["models"]},
                "cross_model": cross_model(per), "interrupted": bool(summary.get("interrupted"))}
    ok, failed = normalise(summary)
    by_source = defaultdict(list)
    for r in ok:
        by_source[r["source"]].append(r)
    text_base = next((r["f1"] for r in by_source.get("text", []) if r["experiment"] == "baseline"),
                     None)
    return {
        "sources": {src: analyse_source(rs, None if src == "text" else text_base, src)
                    for src, rs in by_source.items()},
        "recovery": recovery(ok),
        "failed": [{"experiment": r.get("experiment"), "source": r.get("source"),
                    "error": r.get("error")} for r in failed],
        "not_run": summary.get("not_run", []),
        "interrupted": bool(summary.get("interrupted")),
        "provenance": summary.get("provenance", {}),
    }


def cross_model(per_model: dict[str, dict]) -> dict:
    """Per source every model ran: each experiment's F1 on each model, how far the models agree
    on the order of the experiments (every pair: Spearman and Kendall over the experiments all
    of them ran), and each model's winner. The winner is the analysis's first-ranked experiment,
    with the baseline first among equal F1s, so models that all keep the baseline agree."""
    names = list(per_model)
    shared = [src for src in per_model[names[0]]["sources"]
              if all(src in per_model[n]["sources"] for n in names)]
    out = {"models": names, "sources": {}}
    for src in shared:
        f1 = {n: {r["experiment"]: r["f1"] for r in per_model[n]["sources"][src]["ranked"]}
              for n in names}
        common = [e for e in f1[names[0]] if all(e in f1[n] for n in names)]
        agreement = [{"a": a, "b": b, "n": len(common),
                      "spearman": stats.spearman([f1[a][e] for e in common],
                                                 [f1[b][e] for e in common]),
                      "kendall": stats.kendall_tau([f1[a][e] for e in common],
                                                   [f1[b][e] for e in common])}
                     for i, a in enumerate(names) for b in names[i + 1:]]
        winners = {}
        for n in names:
            top = per_model[n]["sources"][src]["ranked"][0]
            winners[n] = {"experiment": top["experiment"], "category": top["category"],
                          "f1": top["f1"], "vs_baseline": (top.get("vs_baseline") or {}).get(
                              "label", "reference" if top["experiment"] == "baseline" else None)}
        out["sources"][src] = {
            "table": [{"experiment": e, "f1": {n: f1[n][e] for n in names}} for e in common],
            "agreement": agreement, "winners": winners,
            "same_winner": len({w["experiment"] for w in winners.values()}) == 1,
            "same_winning_category": len({w["category"] for w in winners.values()}) == 1}
    return out


# ---------------------------------------------------------------------------------------------
# Text output.

def ranked_table(summary: dict) -> str:
    if "models" in summary:
        return "\n\n".join(f"model {m['model_id']} ({m['dir']}/):\n" + ranked_table(m["summary"])
                           for m in summary["models"])
    ok, failed = normalise(summary)
    if not ok and not failed:
        return "no results"
    lines = [f"{'rank':>4}  {'experiment':<20} {'source':<12} {'F1':>6} {'95% CI':>15} "
             f"{'EM':>6} {'empty':>6}  note"]
    ok.sort(key=lambda r: (r["source"] != "text", r["source"], -r["f1"],
                           r["experiment"] != "baseline",
                           bool(r["diagnostics"].get("identical_to_input")), r["experiment"]))
    rank, current = 0, None
    for r in ok:
        if r["source"] != current:
            rank, current = 0, r["source"]
        rank += 1
        s = _scores(r)
        ci = stats.bootstrap_ci(list(s.values())) if s else None
        ci_text = f"[{ci[0]:.3f},{ci[1]:.3f}]" if ci else "n/a"
        note = []
        if r["diagnostics"].get("identical_to_input") and r["experiment"] != "baseline":
            note.append("no-op")
        if r.get("reused_generations_from"):
            note.append(f"= {r['reused_generations_from']}")
        lines.append(f"{rank:>4}  {r['experiment']:<20} {r['source']:<12} {r['f1']:>6.3f} "
                     f"{ci_text:>15} {r.get('em', 0):>6.3f} {r.get('empty_rate', 0) or 0:>6.0%}  "
                     f"{' '.join(note)}")
    for r in failed:
        err = r.get("error") or {}
        lines.append(f"   -  {r.get('experiment', '?'):<20} {r.get('source', 'text'):<12} FAILED "
                     f"{err.get('type', '')}: {err.get('message', '')}")
    return "\n".join(lines)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def analyze(summary: dict, output_dir, as_json: bool = False, plots: bool = True,
            summary_path: str | None = None) -> dict:
    """Print the analysis; write plots and a report beside the summary unless told not to."""
    insights = build(summary)
    if output_dir is None and summary_path is not None:
        output_dir = Path(summary_path).parent
    written = []
    analysed = insights["models"].values() if "models" in insights else [insights]
    if plots and output_dir is not None and any(a["sources"] for a in analysed):
        written = report.write(insights, summary, Path(output_dir))
    if as_json:
        print(json.dumps(_jsonable(insights), indent=2))
    else:
        print(render_text(insights))
        if written:
            folders = Counter(str(Path(p).parent) for p in written[:-1])
            where = ", ".join(f"{n} in {folder}" for folder, n in folders.items())
            print(f"\nplots and report: {written[-1]}"
                  + (f" (+{len(written) - 1} plots: {where})" if folders else ""))
    return insights
