"""`latentwire compare`: finished training runs set against one another on the same questions.

Two runs evaluated on the same held-out questions are paired: the first run's F1 minus the
other's, question by question, with a bootstrap interval, and the ratio of their F1s (a share of
a reference run, where the other run is one). A run over several models gives each model's
answers; a run over one model is named by its --model_id, so a pair's run meets each model's
own runs (a relay, a dedicated encoder, a reference) by name.
"""

import json
from pathlib import Path

from .. import stats
from ..errors import UsageError
from ..files import read_json
from ..models import model_dirname
from .options import CompareOptions
from .summary import last_answers


def answers(folder: str) -> dict:
    """The run's last evaluation per model name: (its F1/EM section, {question id: F1})."""
    path = Path(folder)
    found = last_answers(path) if path.is_dir() else None
    if found is None:
        raise UsageError(f"--runs: {folder} holds no evaluated training run (its summary.json, "
                         "config.json or last eval/epochN.json is missing or unreadable); pass "
                         "the --output_dir of a `latentwire train` run that evaluated an epoch")
    if None in found:
        config = read_json(path / "config.json")
        if config is None:
            raise UsageError(f"--runs: {folder}/config.json is missing or unreadable, so the "
                             "model that answered is unknown; pass a whole run's folder")
        found = {model_dirname(config["options"]["model_id"]): found[None]}
    return {name: (section, {p["id"]: p["f1"] for p in predictions})
            for name, (section, predictions) in found.items()}


def unfinished(folders: list[str]) -> list[str]:
    """What the table says of runs not finished: their last evaluated epoch is what it reads."""
    notes = []
    for folder in folders:
        summary = read_json(Path(folder) / "summary.json") or {}
        if summary.get("status") != "finished":
            epoch = summary["epochs"][-1]["epoch"]
            notes.append(f"{folder} is {summary.get('status')}: its epoch {epoch} is compared")
    return notes


def compare(opts: CompareOptions) -> list[dict]:
    """One row per later run and model it shares with the first: both F1s on the questions
    both answered, the paired difference (first - other) and ratio (first / other)."""
    folders = [r for r in opts.runs.split(",") if r]
    if len(folders) < 2:
        raise UsageError(f"--runs takes at least two run folders, comma-separated (got "
                         f"{opts.runs!r}); the first is set against each of the others")
    twice = sorted({f for f in folders if folders.count(f) > 1})
    if twice:
        raise UsageError(f"--runs names {', '.join(twice)} more than once; a run against itself "
                         "differs by nothing: name each run once")
    first, *others = [(folder, answers(folder)) for folder in folders]
    rows = []
    for folder, theirs in others:
        for model, (_, mine) in first[1].items():
            if model not in theirs:
                continue
            ids = [i for i in mine if i in theirs[model][1]]
            if not ids:
                continue
            a, b = [mine[i] for i in ids], [theirs[model][1][i] for i in ids]
            ratio, ratio_ci = stats.ratio_ci(a, b) if sum(b) > 0 else (None, None)
            rows.append({"model": model, "run": first[0], "other": folder, "questions": len(ids),
                         "f1": _mean_ci(a), "other_f1": _mean_ci(b),
                         "paired": stats.paired_comparison(a, b),
                         "ratio": ratio, "ratio_ci": list(ratio_ci) if ratio_ci else None})
    if not rows:
        raise UsageError(f"--runs: {first[0]} shares no answering model and question with "
                         f"{', '.join(f for f, _ in others)} (models {', '.join(first[1])}); "
                         "compare runs evaluated on the same --eval_dataset and --eval_samples")
    return rows


def _mean_ci(f1s: list) -> dict:
    return {"f1": sum(f1s) / len(f1s), "ci": list(stats.bootstrap_ci(f1s))}


def render(rows: list[dict]) -> str:
    def f1(r):
        return f"{r['f1']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]"

    lines = [f"{rows[0]['run']} (the first run) against each other run, paired on the questions "
             "both answered:\n",
             "| model | other run | questions | F1, first [95% CI] | F1, other [95% CI] | "
             "first - other (paired) | first / other (paired) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["paired"]
        ratio = (f"{r['ratio']:.0%} [{r['ratio_ci'][0]:.0%}, {r['ratio_ci'][1]:.0%}]"
                 if r["ratio"] is not None else "-")
        lines.append(f"| {r['model']} | {r['other']} | {r['questions']} | {f1(r['f1'])} | "
                     f"{f1(r['other_f1'])} | {p['diff']:+.3f} [{p['diff_ci'][0]:+.3f}, "
                     f"{p['diff_ci'][1]:+.3f}] {p['label']} | {ratio} |")
    return "\n".join(lines)


def run(opts: CompareOptions) -> int:
    rows = compare(opts)
    if opts.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(render(rows))
    for note in unfinished(list(dict.fromkeys([rows[0]["run"], *(r["other"] for r in rows)]))):
        print(f"note: {note}")
    return 0
