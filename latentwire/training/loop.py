"""The training loop, in the order a run goes: run() sets the run up (trainer.py's setup_data,
setup_models, setup_compressor), writes its config and references, then fit() takes the epochs
from where the run stands: each batch one optimizer step (Trainer.step) and its log line, now
and then a checkpoint, and at each epoch's end evaluate_epoch(): the held-out F1, the best and
last checkpoints, the summary and plots. Data parallel under torchrun (through accelerate);
resumable after SIGKILL, bitwise on CPU, from checkpoints/last.

What the step computes is in trainer.py; what the run writes about itself in summary.py, and
what it also sends to TensorBoard, MLflow or W&B (--report_to) in tracking.py.
"""

import math
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ..files import read_json, write_json
from . import tracking
from .options import TrainOptions, made_otherwise, resume_mode, validate
from .summary import (MetricsLog, model_lines, plot, reference_lines, render, summary,
                      without_predictions, write_split)
from .trainer import NonFiniteLoss, State, Trainer


def run(opts: TrainOptions, log=print, lm=None, on_epoch=None, references_from=None) -> int:
    """Train (or resume) one run; returns the exit code: 0, or 1 when the loss went non-finite.
    Bad input raises UsageError before the model loads. `on_epoch(entry)` is called after each
    evaluation, once its checkpoints and summary are on disk (a screen reports to Tune there).
    `references_from` is an earlier run's folder whose references this run takes over when they
    are its own (see `earlier_references`)."""
    started = time.time()
    if opts.samples == 0 and opts.resume != "no" and finished(opts):
        log(f"nothing to train: {opts.run_dir()} holds this evaluation, finished")
        return 0
    opts = resume_mode(opts)
    out = validate(opts)
    trainer = Trainer(opts, out, log, lm)
    log = trainer.log  # silent on every rank but 0
    main = trainer.rank == 0
    state = trainer.restore() if opts.resume == "yes" else State()
    if opts.resume == "yes":
        log(f"resumed at step {state.step} (epoch {state.epoch + 1}, {state.batch} batches into "
            f"it) from {out / 'checkpoints' / 'last'}")
    if main and opts.resume != "yes":
        write_json(out / "config.json", {"options": opts.identity(),
                                         "provenance": trainer.provenance,
                                         "split": trainer.split.describe(),
                                         "compressor": trainer.spec.to_json()})
        write_split(trainer.split.eval, out / "eval_split.jsonl")
    if opts.kd_weight > 0:
        log("distillation: the frozen model reads the text of every training example once")
        trainer.distil()
    references_from = references_from or opts.references_from
    if main and state.references is None and references_from is not None:
        state.references, unlike = earlier_references(trainer, Path(references_from))
        if state.references is not None:
            log(f"references: those of {references_from} (the same model, prompt and "
                "evaluation examples)")
            write_json(out / "references.json", state.references)
        elif references_from == opts.references_from:
            log(f"references: those of {references_from} are not this run's ({unlike}), so it "
                "computes its own")
    if main and state.references is None:
        log(f"references on {len(trainer.split.eval)} held-out evaluation examples "
            "(no entity or article of them in training) ...")
        state.references = trainer.references()
        log(reference_lines(state.references))
        write_json(out / "references.json", state.references)
    trackers = tracking.Trackers(tracking.chosen(opts.report_to) if main else [], out,
                                 opts.identity(), state.step, log)
    progress = Progress(trainer, state, log, trackers)
    log(f"training {opts.encoder} ({sum(p.numel() for p in trainer.params):,} parameters) + "
        f"{trainer.spec.transform.name} into {opts.model_id} on {trainer.device}: "
        f"{len(trainer.split.train)} examples x {opts.epochs} epoch(s), {progress.total} steps "
        f"of {opts.batch_size}, {trainer.world} process(es) -> {out}")

    ended = "killed"  # what the trackers are told unless the run gets to its summary
    try:
        code = fit(trainer, state, progress, started, on_epoch)
        if main:
            final = summary(trainer, state, "failed" if code else "finished", time.time() - started)
            write_json(out / "summary.json", final)
            trackers.files([out / "summary.json"], state.step)
            ended = final["status"]
            log(render(final))
    finally:
        trackers.close(ended)
    trainer.accelerator.end_training()
    return code


def finished(opts: TrainOptions) -> bool:
    """The run folder holds this run, finished: its summary says so, made with these flags."""
    done = (read_json(opts.run_dir() / "summary.json") or {}).get("status") == "finished"
    return done and not made_otherwise(opts)


def fit(trainer: Trainer, state: State, progress: "Progress", started: float,
                 on_epoch) -> int:
    """The epochs from where `state` stands; 0, or 1 when the loss went non-finite. With no
    training split (--samples 0), or nothing to train, one evaluation of the compressor as it
    stands."""
    opts, main = trainer.opts, trainer.rank == 0
    epochs = opts.epochs if trainer.params else 1
    try:
        for epoch in range(state.epoch, epochs):
            # A run resumed after its budget's evaluation has nothing left to do.
            if spent(trainer, state):
                break
            stopped = False
            for batch in trainer.batches(epoch)[state.batch:]:
                t0 = time.time()
                metrics = trainer.step(batch, state.step, state.elapsed)
                seconds = time.time() - t0
                state.step, state.batch, state.elapsed = (state.step + 1, state.batch + 1,
                                                          state.elapsed + seconds)
                progress.step(state, metrics, len(batch), seconds)
                if main and opts.save_every and state.step % opts.save_every == 0:
                    trainer.save("last", state)
                if stopped := spent(trainer, state):
                    break
            if stopped:
                trainer.log(f"--max_minutes {opts.max_minutes:g}: {state.elapsed / 60:.1f} "
                            f"minutes of training spent at step {state.step} of "
                            f"{progress.total}; the evaluation is there")
            state.epoch, state.batch = epoch + 1, 0
            if main:
                evaluate_epoch(trainer, state, progress, started, on_epoch)
            trainer.accelerator.wait_for_everyone()
            if stopped:
                break
    except NonFiniteLoss:
        print(f"error: the loss became non-finite at step {state.step + 1} (epoch "
              f"{state.epoch + 1}); stopped. checkpoints/last (step {state.step} or earlier) is "
              "kept: lower --lr and start a new run (another --output_dir)", file=sys.stderr)
        return 1
    finally:
        progress.close()
    return 0


def spent(trainer: Trainer, state: State) -> bool:
    """Whether --max_minutes of training are spent, agreed by every process: each counts its
    own time, and they stop together at the first step after any one of them is past it."""
    budget = trainer.opts.max_minutes * 60
    if not budget:
        return False
    if state.elapsed >= budget:
        trainer.accelerator.set_trigger()
    return trainer.accelerator.check_trigger()


# What fixes a run's references: the answers of the untrained model to its evaluation examples.
# (With several models, each one's and the reader's record too.)
REFERENCE_KEYS = ("model", "prompt_format", "max_new_tokens", "vocabulary", "device", "versions",
                  "answerers", "reader")


def earlier_references(trainer: Trainer, folder: Path) -> tuple[dict | None, str]:
    """The references an earlier run computed, where they are exactly this run's: the same
    model, vocabulary, prompt format, answer length, device, versions and evaluation examples
    (by digest), so the frozen model's answers are the same. Otherwise None (the run computes
    its own) and what differs."""
    config, refs = read_json(folder / "config.json"), read_json(folder / "references.json")
    if not config or not refs:
        return None, "its config.json or references.json is missing"
    theirs, ours = config.get("provenance", {}), trainer.provenance
    kept, own = reference_record(theirs), reference_record(ours)
    unlike = [k for k in REFERENCE_KEYS if not alike(kept[k], own[k])]
    if (theirs.get("dataset", {}).get("eval_examples_sha256")
            != ours["dataset"]["eval_examples_sha256"]):
        unlike.append("evaluation examples")
    return (None, ", ".join(unlike) + " differ") if unlike else (refs, "")


def reference_record(described: dict) -> dict:
    """A run's provenance under REFERENCE_KEYS, each answering model without its loss weight
    (--model_weights): a weight steers training, not the untrained model's answers."""
    record = {k: described.get(k) for k in REFERENCE_KEYS}
    if record["answerers"] is not None:
        record["answerers"] = [{k: v for k, v in a.items() if k != "weight"}
                               for a in record["answerers"]]
    return record


def alike(a, b) -> bool:
    """Equal, floats to 1e-6 relative: the vocabulary's statistics are sums whose last digits
    follow the thread count, and the same model read with another count is the same model."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(alike(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(alike(x, y) for x, y in zip(a, b))
    return a == b


def evaluate_epoch(trainer: Trainer, state: State, progress: "Progress", started: float,
                 on_epoch) -> None:
    """Evaluate, record the epoch, keep the best and the last checkpoints, and rewrite the
    summary and plots: a run killed after this point loses nothing of the epoch."""
    out = trainer.out
    t0 = time.time()
    # A slow reader (a press on a larger model, on a CPU) can take half an hour here, silently.
    trainer.log(f"evaluating on {len(trainer.split.eval)} held-out examples ...")
    result = trainer.evaluate()
    loss, seconds = progress.end_epoch(state)
    entry = {"epoch": state.epoch, "step": state.step, "train_loss": loss,
             "eval_f1": result["f1"], "eval_em": result["em"], "eval_ci": result["ci"],
             "seconds": round(seconds, 1), "eval_seconds": round(time.time() - t0, 1),
             "eval": result}
    state.epochs.append(entry)
    write_json(out / "eval" / f"epoch{state.epoch}.json", result)
    progress.evaluation(state, result)
    trains = bool(trainer.params)  # a compressor evaluated as it stands has no weights
    if state.best is None or result["f1"] > state.best["f1"]:
        state.best = {"epoch": state.epoch, "f1": result["f1"], "em": result["em"]}
        if trains:
            trainer.save("best", state)
    if trains:
        trainer.save("last", state)
    write_json(out / "summary.json", summary(trainer, state, "running", time.time() - started))
    progress.trackers.files([out / "summary.json", *plot(out)], state.step)
    trained = (f"epoch {state.epoch}/{trainer.opts.epochs}: train loss {loss:.3f}"
               if loss is not None else "not trained (--samples 0):" if not trainer.split.train
               else "nothing trained by gradient:")
    trainer.log(f"{trained}  "
                f"eval F1 {result['f1']:.3f} [{result['ci'][0]:.3f}, {result['ci'][1]:.3f}]  "
                f"EM {result['em']:.3f}  empty {result['empty_rate']:.0%}  "
                f"({result['compression_ratio']:.1f}x fewer positions)")
    for line in model_lines(result):
        trainer.log(line)
    if on_epoch is not None:
        on_epoch(entry)


class Progress:
    """Where a run reports its steps, on rank 0: a line per step and per evaluation in
    metrics.jsonl and to the trackers of --report_to, and a progress bar on a terminal, else a
    line with the ETA ten times an epoch. Also the epoch's mean training loss (kept in the state,
which a checkpoint saves) and its wall time."""

    def __init__(self, trainer: Trainer, state: State, log, trackers: tracking.Trackers):
        main = trainer.rank == 0
        self.trackers = trackers
        per_epoch = len(trainer.batches(0))
        self.total = trainer.total_steps()
        self.budget = trainer.opts.max_minutes * 60
        self.every = max(1, per_epoch // 10)
        self.log = log
        self.metrics = MetricsLog(trainer.out / "metrics.jsonl", state.step) if main else None
        self.bar = (tqdm(total=self.total, initial=state.step, unit="step", dynamic_ncols=True)
                    if main and sys.stderr.isatty() else None)
        self.epoch_started = time.time()

    def step(self, state: State, m: dict, n: int, seconds: float) -> None:
        state.epoch_loss, state.epoch_examples = (state.epoch_loss + m["loss"] * n,
                                                  state.epoch_examples + n)
        if self.metrics is None:
            return
        rate = n / max(seconds, 1e-9)
        row = {"type": "step", "step": state.step, "epoch": state.epoch + 1, **m,
               "examples_per_s": rate}
        self.metrics.write(row)
        self.trackers.step(row)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{m['loss']:.3f}", ex_s=f"{rate:.1f}")
            self.bar.update(1)
        elif state.step % self.every == 0:
            eta = (self.total - state.step) * state.elapsed / max(state.step, 1)
            if self.budget:
                eta = min(eta, max(0.0, self.budget - state.elapsed))
            self.log(f"step {state.step}/{self.total}  epoch {state.epoch + 1}  loss "
                     f"{m['loss']:.3f}  {rate:.1f} ex/s  eta {eta / 60:.1f} min")

    def end_epoch(self, state: State) -> tuple[float | None, float]:
        """(mean training loss, seconds in this process) of the epoch that just ended, the loss
        over all its steps, those before a resume included; the next epoch starts now."""
        loss = state.epoch_loss / state.epoch_examples if state.epoch_examples else None
        seconds = time.time() - self.epoch_started
        state.epoch_loss, state.epoch_examples, self.epoch_started = 0.0, 0, time.time()
        return loss, seconds

    def evaluation(self, state: State, result: dict) -> None:
        row = {"type": "eval", "step": state.step, "epoch": state.epoch,
               **without_predictions(result)}
        self.metrics.write(row)
        self.trackers.evaluation(row, state.references)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
