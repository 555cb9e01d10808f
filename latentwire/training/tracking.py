"""--report_to: a run's steps, evaluations, config and files, sent also to TensorBoard, MLflow
or W&B through accelerate's trackers, named as Hugging Face's Trainer names them
(train/<metric>, eval/<metric>, at the global step), so dashboards built for Trainer runs read
these too.

What is ours is what accelerate's trackers leave to the caller: a resumed run continues each
tracker's run (tracking.json) without sending a step twice; the run's files (summary.json, the
plots) as artifacts; the config written once; a run's end as finished, failed or killed; and a
tracker that raises is dropped with a one-line warning while the run goes on, since
metrics.jsonl and summary.json stay the record of a run. Each backend imports its package when
made: a run without the flag imports none of them.
"""

import importlib.util
import json
import os
from pathlib import Path

from ..errors import UsageError
from ..files import read_json, write_json

STATE = "tracking.json"  # each tracker's run, so that a resumed run continues it


def fenced(text: str) -> str:
    """JSON as TensorBoard's text tab shows it: it renders Markdown, which would run lines
    together."""
    return f"```json\n{text}\n```"


class TensorBoard:
    package = extra = "tensorboard"

    def __init__(self, out: Path, config: dict, step: int, saved: dict):
        from accelerate.tracking import TensorBoardTracker
        from torch.utils.tensorboard.summary import hparams

        # A resumed run trains the steps after its checkpoint again: purge_step hides what a
        # killed process wrote for them, as metrics.jsonl drops its lines for them.
        self.tracker = TensorBoardTracker("tensorboard", out, purge_step=step + 1)
        self.tracker.start()
        writer = self.tracker.writer
        if step == 0:
            # Not store_init_configuration: it files the hyperparameters as a run of their own
            # in a subfolder, where the HParams tab does not set them beside this run's F1.
            writer.add_text("config", fenced(json.dumps(config, indent=2)), 0)
            for summary in hparams(config, {"eval/f1": None, "eval/em": None}):
                writer.file_writer.add_summary(summary)
        self.state = {"log_dir": self.tracker.logging_dir}

    def log(self, metrics: dict, step: int) -> None:
        self.tracker.log(metrics, step)

    def files(self, out: Path, paths: list[Path], step: int) -> None:
        import numpy as np
        from PIL import Image

        for path in paths:
            name = path.relative_to(out).as_posix()
            if path.suffix == ".png":
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))[None]
                self.tracker.log_images({name.removesuffix(".png"): pixels}, step,
                                        dataformats="NHWC")
            else:
                self.tracker.log({name: fenced(path.read_text(encoding="utf-8"))}, step)

    def finish(self, status: str) -> None:
        self.tracker.finish()


class MLflow:
    package = extra = "mlflow"

    def __init__(self, out: Path, config: dict, step: int, saved: dict):
        import mlflow
        from accelerate.tracking import MLflowTracker

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # A folder beside the run's other files, with no server or database to set up:
            # MLflow 3 keeps this file store in maintenance mode, open only to those who opt in.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (out / "mlruns").resolve().as_uri()
        # accelerate's tracker works through MLflow's process-wide run and store.
        mlflow.set_tracking_uri(uri)
        resumed = saved.get("tracking_uri") == uri and saved.get("run_id")
        self.tracker = MLflowTracker(os.environ.get("MLFLOW_EXPERIMENT_NAME", "latentwire"),
                                     run_id=saved["run_id"] if resumed else None,
                                     run_name=out.name)
        self.tracker.start()
        self.run_id = self.tracker.active_run.info.run_id
        client = mlflow.MlflowClient()
        if resumed:
            # The steps a resumed run trains again are not sent twice: MLflow cannot take back
            # what it holds. What it keeps is the same (a resumed run is bitwise the same on
            # CPU) but for the time each of those steps took.
            history = client.get_metric_history
            self.logged = {key: max(m.step for m in history(self.run_id, key))
                           for key in client.get_run(self.run_id).data.metrics}
        else:
            self.tracker.store_init_configuration(config)
            self.logged = {}
        self.state = {"tracking_uri": uri, "run_id": self.run_id}

    def log(self, metrics: dict, step: int) -> None:
        fresh = {k: v for k, v in metrics.items() if step > self.logged.get(k, -1)}
        if fresh:
            self.tracker.log(fresh, step)

    def files(self, out: Path, paths: list[Path], step: int) -> None:
        for path in paths:
            folder = path.parent.relative_to(out).as_posix()
            self.tracker.log_artifact(str(path), None if folder == "." else folder)

    def finish(self, status: str) -> None:
        import mlflow

        # accelerate's finish ends every run as FINISHED.
        mlflow.end_run(status.upper())


class WandB:
    package = extra = "wandb"

    def __init__(self, out: Path, config: dict, step: int, saved: dict):
        from accelerate.tracking import WandBTracker

        # WANDB_MODE, WANDB_ENTITY and the rest are wandb's own to read.
        self.tracker = WandBTracker(os.environ.get("WANDB_PROJECT", "latentwire"),
                                    name=out.name, id=saved.get("run_id"), resume="allow",
                                    dir=str(out), config=config)
        self.tracker.start()
        self.linked: set[Path] = set()
        self.state = {"run_id": self.tracker.run.id}

    def log(self, metrics: dict, step: int) -> None:
        self.tracker.log(metrics, step)

    def files(self, out: Path, paths: list[Path], step: int) -> None:
        # Linked into the run's folder once and uploaded whenever they change ("live"), which
        # accelerate's tracker has no call for.
        for path in paths:
            if path not in self.linked:
                self.tracker.run.save(str(path), base_path=str(out), policy="live")
                self.linked.add(path)

    def finish(self, status: str) -> None:
        # accelerate's finish reports every end as a success.
        self.tracker.run.finish(exit_code=0 if status == "finished" else 1)


BACKENDS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}


def chosen(report_to: str) -> list[str]:
    """The trackers --report_to names, each installed; UsageError otherwise."""
    names = list(dict.fromkeys(n.strip() for n in report_to.split(",") if n.strip()))
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise UsageError(f"unknown --report_to {', '.join(unknown) or report_to!r}; use none "
                         f"or one or more of {', '.join(BACKENDS)}, comma-separated")
    for name in names:
        backend = BACKENDS[name]
        if importlib.util.find_spec(backend.package) is None:
            raise UsageError(f"--report_to {name} needs {backend.package}, which is not "
                             f"installed: pip install 'latentwire[{backend.extra}]'")
    return names


def flat(prefix: str, row: dict) -> dict:
    """Every number of a metrics row under `prefix`: nested records joined with "/", a
    confidence interval as its two bounds."""
    out = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out.update(flat(f"{prefix}{key}/", value))
        elif key == "ci":
            out[f"{prefix}ci_low"], out[f"{prefix}ci_high"] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out


class Trackers:
    """The trackers of one run, on rank 0 (elsewhere, and without --report_to, none)."""

    def __init__(self, names: list[str], out: Path, config: dict, step: int, warn):
        self.out, self.warn, self.backends = out, warn, {}
        saved = (read_json(out / STATE) or {}) if names else {}
        for name in names:
            self._guard(name, lambda: self.backends.__setitem__(
                name, BACKENDS[name](out, config, step, saved.get(name, {}))))
        if self.backends:
            write_json(out / STATE, {**saved, **{n: b.state for n, b in self.backends.items()}})

    def _guard(self, name: str, call, finish: bool = True) -> None:
        try:
            call()
        except Exception as err:  # whatever a tracker raises, the run itself is unharmed
            backend = self.backends.pop(name, None)
            lines = str(err).strip().splitlines()
            self.warn(f"warning: --report_to {name} stopped ({type(err).__name__}: "
                      f"{lines[0] if lines else 'no message'}); the run goes on without it, "
                      "and metrics.jsonl and summary.json hold everything")
            if backend is not None and finish:
                try:
                    backend.finish("failed")
                except Exception:  # it has failed already: its first error is the one shown
                    pass

    def _each(self, method: str, *args) -> None:
        for name, backend in list(self.backends.items()):
            self._guard(name, lambda: getattr(backend, method)(*args), method != "finish")

    def step(self, row: dict) -> None:
        """A metrics.jsonl step line, as train/<metric>."""
        self._each("log", flat("train/", {k: v for k, v in row.items() if k != "step"}),
                   row["step"])

    def evaluation(self, row: dict, references: dict) -> None:
        """A metrics.jsonl evaluation line as eval/<metric>, with the references beside it
        (eval/ref_text_f1, eval/ref_question_only_f1, ...) to read its F1 against."""
        metrics = flat("eval/", {k: v for k, v in row.items() if k != "step"})
        for name, reference in references.items():
            metrics.update(flat(f"eval/ref_{name}_", reference))
        self._each("log", metrics, row["step"])

    def files(self, paths: list[Path], step: int) -> None:
        """Files of the run folder (summary.json, the plots) as the run's artifacts."""
        self._each("files", self.out, paths, step)

    def close(self, status: str) -> None:
        """finished, failed (the loss went non-finite) or killed (anything else that ended it)."""
        self._each("finish", status)
        self.backends.clear()
