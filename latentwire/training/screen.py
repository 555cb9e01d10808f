"""Screening candidates: which transform is worth ten epochs of training?

Successive halving on Ray Tune's ASHA. Every candidate (one of the sweep's experiments, named or
globbed) is one trial: a training run with that transform inside the graph, evaluated after every
epoch. At epoch 1 ASHA stops each trial whose F1 is below the top 1/R of those that reached the
epoch before it, again at epochs R, R^2, ...; the rest run to --max_epochs. Stopping at epoch 1
bets that the epoch-1 ranking predicts the final one; `--verify` stops nothing and measures that.

Each trial is a trainer run folder, OUTPUT_DIR/trials/<experiment>/, which the trainer resumes
from its checkpoint; Tune's own state is in OUTPUT_DIR/tune/. A rerun of the same command restores
the Tune experiment, and a trial that starts again first replays the epochs its folder holds, so
ASHA decides on them as it would have live and nothing is trained twice. Ray is imported only
inside functions.
"""

import json
import logging
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from .. import experiments, provenance, raycluster, stats
from ..errors import UsageError
from ..files import read_json, write_json, write_text
from ..plots import pyplot, save
from . import checkpoint
from .loop import run as train
from .options import TRIAL_OPTIONS, ScreenOptions, TrainOptions, train_command, validate
from .summary import draw_references, references_sentence
from .trainer import kept_models

TOP = 3  # --verify: would ASHA have stopped a trial that finished this high?


def plan(opts: ScreenOptions) -> list[tuple[experiments.Experiment, TrainOptions]]:
    """Every candidate with its training options, each checked as the trainer checks its own, so
    a mistake costs a second, not a Ray start and a model load."""
    def need(ok: bool, message: str):
        if not ok:
            raise UsageError(message)

    need(bool(opts.experiment.strip()), "--experiment is empty; name the candidates, e.g. "
         "--experiment 'baseline,rms_*,anchor_eps0.1' (`latentwire list` shows every name)")
    need(opts.max_epochs >= 1, f"--max_epochs must be at least 1 (got {opts.max_epochs})")
    need(opts.reduction_factor > 1, f"--reduction_factor must be above 1 (got "
         f"{opts.reduction_factor:g}): ASHA keeps the top 1/R at each rung")
    raycluster.check(opts, on_ray=True)
    trials = []
    for exp in experiments.select(opts.experiment):
        folder = Path(opts.output_dir).resolve() / "trials" / exp.name
        o = replace(opts.base, **experiments.train_settings(exp), epochs=opts.max_epochs,
                    output_dir=str(folder), resume="yes" if _last(folder) else "no")
        if (_summary(folder) or {}).get("status") not in ("finished", "failed"):
            validate(o)  # a trial that ended will not run again
        trials.append((exp, o))
    return trials


def _last(folder: Path) -> Path | None:
    return checkpoint.existing(folder / "checkpoints" / "last")


def _summary(folder: Path) -> dict | None:
    path = folder / "summary.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def tune_name(opts: ScreenOptions, trials) -> str:
    """The Tune experiment of this command: a rerun finds it again, while other candidates or
    flags get one of their own (Tune would otherwise restore the old trials and ignore them)."""
    key = {"verify": opts.verify, "reduction_factor": opts.reduction_factor,
           "trials": {exp.name: {k: v for k, v in o.identity().items() if k != "output_dir"}
                      for exp, o in trials}}
    digest = provenance.sha(key)[:10]
    return f"{'verify' if opts.verify else 'asha'}-{digest}"


def _trial_name(trial) -> str:
    return f"{trial.config['experiment']}-{trial.trial_id}"


def _trial(config: dict, setup: dict) -> None:
    """One Tune trial: the candidate's training run, reported to Tune after every evaluation."""
    from ray import tune

    name = config["experiment"]
    # Tune starts every trial in a folder of its own; the run is the driver's, as it would run it.
    log = raycluster.as_driver(setup["driver"], name)
    opts = TrainOptions(**setup["trials"][name])
    folder = Path(opts.output_dir)

    def report(entry: dict) -> None:
        tune.report({"epoch": entry["epoch"], "f1": entry["eval_f1"], "em": entry["eval_em"]})

    def report_before_the_last(entry: dict) -> None:
        # The last epoch is reported once the trainer has written its final summary: at
        # --max_epochs ASHA answers with a stop, which would end the trial before that.
        if entry["epoch"] < opts.epochs:
            report(entry)

    summary = _summary(folder)
    for entry in summary["epochs"] if summary else []:
        report(entry)  # what an earlier run of this trial trained, for ASHA to decide on again
    if summary and summary["status"] != "running":
        return
    code = train(replace(opts, resume="yes" if _last(folder) else "no"), log, kept_models(opts),
                        on_epoch=report_before_the_last)
    if code == 0:
        report(_summary(folder)["epochs"][-1])


def run(opts: ScreenOptions, log=print) -> int:
    """Screen the candidates, or continue the screen in OUTPUT_DIR. Exit code: 0; 1 when a trial
    failed (the others are still ranked); 130 when interrupted (rerun to continue)."""
    started = time.time()
    trials = plan(opts)
    # A screen always runs on Ray: without an address, on a local one, which a rerun also is.
    with raycluster.session(opts.ray, opts, opts.output_dir,
                            again="run the same command again to continue it") as shape:
        errors, complete = _tune(opts, trials, shape, log)
    if not complete:
        log(f"interrupted: finished trials are kept in {opts.output_dir}/trials; rerun the same "
            "command to continue the screen")
        return 130
    result = summarize(opts, trials, errors, time.time() - started)
    write(result, Path(opts.output_dir))
    log("\n" + render(result))
    return 1 if any(t["status"] in ("failed", "error") for t in result["trials"]) else 0


def _tune(opts: ScreenOptions, trials, shape, log) -> tuple[dict, bool]:
    """Run (or restore) the Tune experiment; the message of each trial that raised, and whether
    every trial ended (False when interrupted)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    # Its warning lists the trials with no results yet (every one, on a restore): nothing a
    # screen's reader needs, the table says what each trial did.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    cpus, gpus, capacity = shape
    setup = {"driver": raycluster.driver(cpus),
             "trials": {exp.name: asdict(o) for exp, o in trials}}
    trainable = tune.with_resources(tune.with_parameters(_trial, setup=setup),
                                    {"cpu": cpus, "gpu": gpus})
    storage = Path(opts.output_dir).resolve() / "tune"
    name = tune_name(opts, trials)
    schedule = ("no early stopping (--verify)" if opts.verify else
                f"ASHA: grace 1 epoch, reduction factor {opts.reduction_factor:g}")
    if tune.Tuner.can_restore(storage / name):
        log(f"continuing the screen in {storage / name}")
        tuner = tune.Tuner.restore(str(storage / name), trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        scheduler = None if opts.verify else ASHAScheduler(
            time_attr="epoch", metric="f1", mode="max", grace_period=1, max_t=opts.max_epochs,
            reduction_factor=opts.reduction_factor)
        tuner = tune.Tuner(
            trainable, param_space={"experiment": tune.grid_search([e.name for e, _ in trials])},
            tune_config=tune.TuneConfig(scheduler=scheduler, reuse_actors=True,
                                        trial_name_creator=_trial_name,
                                        trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(
                name=name, storage_path=str(storage), verbose=0,
                # A worker that dies (out of memory, a lost node) is restarted and its trial
                # resumes from its checkpoint, as the sweep's workers are.
                failure_config=tune.FailureConfig(max_failures=raycluster.MAX_RESTARTS)))
    log(f"screen: {len(trials)} trials of up to {opts.max_epochs} epochs, {schedule}; at most "
        f"{capacity} at once ({cpus:g} CPU, {gpus:g} GPU each)")
    tuner.fit()
    # Read back from the state Tune saved: after an interrupt it still holds the trials that were
    # running or pending, where the ones fit() returns are all marked terminated by then.
    ended = tune.ExperimentAnalysis(str(storage / name)).trials
    errors = {}
    for trial in ended:
        if trial.status == "ERROR":
            lines = str(trial.get_pickled_error() or trial.get_error()).strip().splitlines()
            errors[trial.config["experiment"]] = lines[-1] if lines else "error"
    return errors, all(t.status in ("TERMINATED", "ERROR") for t in ended)


def would_stop(f1s: list[float], reduction_factor: float) -> list[bool]:
    """ASHA's rule at a rung, as Ray's AsyncHyperBandScheduler applies it: stop a trial whose F1
    is below the (1 - 1/R) quantile of the rung's. Here every trial is at the rung before any
    decision, so it stops the bottom 1 - 1/R (asynchronously, it depends on arrival order)."""
    cutoff = np.nanpercentile(f1s, (1 - 1 / reduction_factor) * 100)
    return [f < cutoff for f in f1s]


def _question_f1(folder: Path, epoch: int) -> list[float]:
    """A trial's F1 on each evaluation question at an epoch, in the split's order (the same in
    every trial); a run over several models: their mean per question, what the screen ranks."""
    record = read_json(folder / "eval" / f"epoch{epoch}.json")
    models = list(record["models"].values()) if "models" in record else [record]
    per_model = [[p["f1"] for p in m["predictions"]] for m in models]
    return [sum(q) / len(q) for q in zip(*per_model)]


def _number(x: float) -> float | None:
    return None if math.isnan(x) else x


def _row(opts: ScreenOptions, exp, o: TrainOptions, error: str | None) -> dict:
    folder = Path(o.output_dir)
    summary = _summary(folder) or {"status": "not run", "epochs": []}
    epochs = summary["epochs"]
    status = "error" if error else summary["status"]
    if status == "running":  # the Tune run is over, so this trial was stopped
        status = "stopped"
    return {"experiment": exp.name, "category": exp.category, "config": exp.config,
            "settings": experiments.train_settings(exp), "status": status, "error": error,
            "epochs_run": len(epochs), "f1_by_epoch": [e["eval_f1"] for e in epochs],
            "final_ci": epochs[-1]["eval_ci"] if epochs else None,
            "stopped_early": status == "stopped" and len(epochs) < opts.max_epochs,
            "checkpoint": (str(Path(opts.output_dir) / "trials" / exp.name / "checkpoints" / "best")
                           if checkpoint.existing(folder / "checkpoints" / "best") else None),
            "train_seconds": summary.get("train_seconds")}


def _order(row: dict) -> tuple:
    """Successive halving's ranking: the furthest a trial got, then its F1 there."""
    ran = row["status"] in ("finished", "stopped") and row["f1_by_epoch"]
    return (not ran, -row["epochs_run"], -(row["f1_by_epoch"][-1] if ran else 0.0))


def summarize(opts: ScreenOptions, trials, errors: dict, wall: float) -> dict:
    rows = sorted((_row(opts, exp, o, errors.get(exp.name)) for exp, o in trials), key=_order)
    best = rows[0] if rows[0]["status"] == "finished" else None
    command = None
    if best:
        name = best["experiment"]
        winner = {exp.name: o for exp, o in trials}[name]
        command = train_command(replace(winner, output_dir=f"runs/train/{name}"),
                                spelled=tuple(best["settings"]))
    # Every trial evaluates on the same split, so one trial's references are every trial's.
    refs = next((s["references"] for _, o in trials
                 if (s := _summary(Path(o.output_dir))) and s.get("references")), None)
    return {"trials": rows, "best": best["experiment"] if best else None,
            "next_command": command, "max_epochs": opts.max_epochs,
            "reduction_factor": opts.reduction_factor,
            "verify": (verification(rows, opts.reduction_factor,
                                    {exp.name: Path(o.output_dir) for exp, o in trials})
                       if opts.verify else None),
            "references": refs,
            "options": {k: v for k, v in opts.base.identity().items()
                        if k not in TRIAL_OPTIONS},
            "wall_seconds": round(wall, 1)}


def verification(rows: list[dict], reduction_factor: float, folders: dict) -> dict | None:
    """How well the epoch-1 ranking predicted the final one, over the trials that finished: rank
    correlations (Kendall's with a bootstrap interval over the evaluation questions, which every
    trial shares), which trials ASHA's rule would stop at epoch 1, and which of those ended in
    the top 3 (what stopping them would have lost)."""
    done = [r for r in rows if r["status"] == "finished"]
    if not done:
        return None
    first = [r["f1_by_epoch"][0] for r in done]
    final = [r["f1_by_epoch"][-1] for r in done]
    stop = would_stop(first, reduction_factor)
    place = [1 + sum(g > f for g in final) for f in final]
    scores = [(_question_f1(folders[r["experiment"]], 1),
               _question_f1(folders[r["experiment"]], r["epochs_run"])) for r in done]
    lo, hi = stats.kendall_tau_ci([a for a, _ in scores], [b for _, b in scores])
    return {"trials": len(done),
            "spearman": _number(stats.spearman(first, final)),
            "kendall": _number(stats.kendall_tau(first, final)),
            "kendall_ci": [_number(lo), _number(hi)],
            "would_stop": [r["experiment"] for r, s in zip(done, stop) if s],
            "would_stop_in_top3": [r["experiment"] for r, s, p in zip(done, stop, place)
                                   if s and p <= TOP]}


OUTCOMES = {"finished": lambda r: "finished",
            "stopped": lambda r: f"stopped by ASHA after epoch {r['epochs_run']}",
            "failed": lambda r: f"failed (non-finite loss) in epoch {r['epochs_run'] + 1}",
            "error": lambda r: f"error: {r['error']}",
            "not run": lambda r: "not run"}


def render(result: dict) -> str:
    """The ranked table, the winner and the command that trains it, and for --verify whether
    epoch 1 predicted the end."""
    verify = result["verify"]
    stopping = set(verify["would_stop"]) if verify else set()
    lines = ["| rank | experiment | epochs | F1 by epoch | final F1 [95% CI] | outcome |"
             + (" ASHA's rule at epoch 1 |" if verify else ""),
             "|---|---|---|---|---|---|" + ("---|" if verify else "")]
    for n, r in enumerate(result["trials"], 1):
        f1s = r["f1_by_epoch"]
        final = (f"{f1s[-1]:.3f} [{r['final_ci'][0]:.3f}, {r['final_ci'][1]:.3f}]" if f1s else "-")
        lines.append(f"| {n} | {r['experiment']} | {r['epochs_run']}/{result['max_epochs']} | "
                     f"{' '.join(f'{f:.3f}' for f in f1s) or '-'} | {final} | "
                     f"{OUTCOMES[r['status']](r)} |"
                     + ((" would stop |" if r["experiment"] in stopping else " would keep |")
                        if verify else ""))
    if result["references"]:
        lines.append("\n" + references_sentence(result["references"]))
    if result["best"]:
        top = result["trials"][0]
        lines.append(f"\nWinner: {result['best']}, F1 {top['f1_by_epoch'][-1]:.3f} after "
                     f"{top['epochs_run']} epochs. To train it (add --samples for a larger "
                     f"budget):\n\n    {result['next_command']}")
    else:
        lines.append("\nNo trial reached --max_epochs: no winner.")
    if verify:
        def corr(x):
            return "n/a" if x is None else f"{x:.2f}"

        lost = verify["would_stop_in_top3"]
        lo, hi = verify["kendall_ci"]
        interval = "" if lo is None else f" [{lo:.2f}, {hi:.2f}] (95%, questions resampled)"
        lines.append(
            f"\nDid epoch 1 predict epoch {result['max_epochs']}? Over {verify['trials']} trials,"
            f" Spearman {corr(verify['spearman'])}, Kendall {corr(verify['kendall'])}{interval}."
            " ASHA's "
            f"rule (reduction factor {result['reduction_factor']:g}) would stop "
            f"{', '.join(verify['would_stop']) or 'none'} at epoch 1; "
            + (f"of those, {', '.join(lost)} finished in the top {TOP}: stopping at epoch 1 "
               "would have lost them." if lost else
               f"none of those finished in the top {TOP}."))
    return "\n".join(lines)


def write(result: dict, out: Path) -> None:
    """screen.json, screen.md and plots/screen.png (F1 per epoch of every trial)."""
    write_json(out / "screen.json", result)
    write_text(out / "screen.md",
               f"# Screen: {len(result['trials'])} candidates, up to {result['max_epochs']} "
               f"epochs\n\n" + render(result) + "\n\n![F1 per epoch](plots/screen.png)\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    for r in result["trials"]:
        if not r["f1_by_epoch"]:
            continue
        epochs = range(1, r["epochs_run"] + 1)
        line, = ax.plot(epochs, r["f1_by_epoch"], marker="o", label=r["experiment"],
                        ls="--" if r["stopped_early"] else "-")
        if r["stopped_early"]:
            ax.plot(r["epochs_run"], r["f1_by_epoch"][-1], marker="x", ms=12, mew=2,
                    color=line.get_color())
    if result["references"]:
        draw_references(ax, result["references"])
    ax.set(xlabel="epoch", ylabel="evaluation F1", xticks=range(1, result["max_epochs"] + 1),
           title="F1 per epoch (x: stopped by ASHA)" if not result["verify"] else
           "F1 per epoch, every trial to the end (--verify)")
    ax.legend(fontsize=7, loc="best")
    save(fig, out / "plots" / "screen.png")
