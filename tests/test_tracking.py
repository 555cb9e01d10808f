"""--report_to: what each tracker received, read back with the tracker's own reader (TensorBoard's
EventAccumulator, MLflow's client on its file store, wandb's reader of an offline run's
transaction log), against what the run's own metrics.jsonl, references.json and summary.json
hold; a resumed run continues each tracker's run; a failing tracker does not stop the run; and
without the flag none of their packages is imported."""

import json
import os
import subprocess
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from latentwire.cli import main
from latentwire.training import tracking
from latentwire.training.loop import run
from latentwire.training.trainer import Trainer

from .conftest import ROOT, tiny_lm, unloadable_model
from .test_training import options, quiet

PACKAGES = ("tensorboard", "mlflow", "wandb")


@pytest.fixture
def mlflow_env(monkeypatch):
    # The machine's own tracking server must not receive test runs; and the file-store opt-in
    # the backend sets for its default store must not outlive the test (setenv first records
    # that it was unset, so the teardown removes it again).
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "false")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """W&B offline, as on a machine without network, keeping its files out of $HOME."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)


def expected(out: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per metric name, as Hugging Face's Trainer names them, from the run's own
    metrics.jsonl and references.json."""
    refs = json.loads((out / "references.json").read_text())
    want = defaultdict(list)
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["type"] == "step":
            values = {f"train/{k}": v for k, v in row.items() if k not in ("type", "step")}
        else:
            values = {f"eval/{k}": v for k, v in row.items()
                      if k not in ("type", "step", "ci", "latent_diagnostics")}
            values["eval/ci_low"], values["eval/ci_high"] = row["ci"]
            values.update({f"eval/latent_diagnostics/{k}": v
                           for k, v in row["latent_diagnostics"].items()})
            for name, ref in refs.items():
                values.update({f"eval/ref_{name}_{k}": ref[k]
                               for k in ("f1", "em", "empty_rate", "num_samples")})
                values[f"eval/ref_{name}_ci_low"], values[f"eval/ref_{name}_ci_high"] = ref["ci"]
        for key, value in values.items():
            want[key].append((row["step"], value))
    # The names a Trainer dashboard looks for are among them.
    assert {"train/loss", "train/lr", "train/grad_norm", "train/examples_per_s", "eval/f1",
            "eval/em", "eval/ci_low", "eval/ci_high", "eval/empty_rate",
            "eval/compression_ratio", "eval/ref_text_f1", "eval/ref_question_only_f1"} <= set(want)
    return dict(want)


def identity(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())["options"]


def tensorboard_scalars(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0,
                                                          "tensors": 0})
    events.Reload()
    return events, {tag: [(e.step, e.value) for e in events.Scalars(tag)]
                    for tag in events.Tags()["scalars"]}


def as_float32(want: dict) -> dict:
    return {k: [(s, float(np.float32(v))) for s, v in rows] for k, rows in want.items()}


def unfenced(text: bytes) -> object:
    return json.loads(text.decode().removeprefix("```json\n").removesuffix("\n```"))


def test_tensorboard_gets_every_step_evaluation_the_config_and_the_files(tmp_path):
    from PIL import Image
    from tensorboard.plugins.hparams import plugin_data_pb2

    opts = options(tmp_path, epochs=2, report_to="tensorboard")
    assert run(opts, quiet, tiny_lm()) == 0
    out = Path(opts.output_dir)
    events, got = tensorboard_scalars(out / "tensorboard")
    assert got == as_float32(expected(out))  # TensorBoard keeps scalars as float32
    config = events.Tensors("config/text_summary")
    assert [c.step for c in config] == [0] and unfenced(
        config[0].tensor_proto.string_val[0]) == identity(out)
    start = plugin_data_pb2.HParamsPluginData.FromString(events.SummaryMetadata(
        "_hparams_/session_start_info").plugin_data.content).session_start_info
    assert start.hparams["lr"].number_value == pytest.approx(0.01)
    assert start.hparams["encoder"].string_value == "pool"
    # The plots at each evaluation's step; summary.json as text, the last one as on disk.
    evals = [s for s, _ in got["eval/f1"]]
    for name in ("loss", "f1"):
        images = events.Images(f"plots/{name}")
        assert [i.step for i in images] == evals
        with Image.open(out / "plots" / f"{name}.png") as png:
            assert (images[-1].width, images[-1].height) == png.size
    summaries = events.Tensors("summary.json/text_summary")
    assert [s.step for s in summaries] == evals + [evals[-1]]
    final = unfenced(summaries[-1].tensor_proto.string_val[0])
    assert final == json.loads((out / "summary.json").read_text()) and final["status"] == "finished"


def mlflow_run(out: Path):
    from mlflow.tracking import MlflowClient

    state = json.loads((out / tracking.STATE).read_text())["mlflow"]
    assert state["tracking_uri"] == (out / "mlruns").resolve().as_uri()  # the default store
    client = MlflowClient(state["tracking_uri"])
    return client, client.get_run(state["run_id"])


def mlflow_history(client, run) -> dict:
    return {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
            for key in run.data.metrics}


def test_mlflow_gets_every_step_evaluation_the_params_and_the_artifacts(tmp_path, mlflow_env):
    opts = options(tmp_path, epochs=2, report_to="mlflow")
    assert run(opts, quiet, tiny_lm()) == 0
    out = Path(opts.output_dir)
    client, mlrun = mlflow_run(out)
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == out.name
    assert client.get_experiment(mlrun.info.experiment_id).name == "latentwire"
    assert mlflow_history(client, mlrun) == expected(out)
    assert mlrun.data.params == {k: str(v) for k, v in identity(out).items()}
    run_id = mlrun.info.run_id
    assert {a.path for a in client.list_artifacts(run_id)} == {"summary.json", "plots"}
    assert {a.path for a in client.list_artifacts(run_id, "plots")} == {"plots/loss.png",
                                                                        "plots/f1.png"}
    got = client.download_artifacts(run_id, "summary.json", str(tmp_path / "download"))
    assert Path(got).read_bytes() == (out / "summary.json").read_bytes()


def wandb_records(run_dir: Path) -> list[dict]:
    """The offline run's transaction log, as wandb's own reader prints it."""
    reader = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect",
                             "--json", str(run_dir)], capture_output=True, text=True, timeout=60)
    assert reader.returncode == 0, reader.stderr
    return [json.loads(line) for line in reader.stdout.splitlines() if line.strip()]


def wandb_history(records: list[dict]) -> dict:
    got = defaultdict(list)
    for r in records:
        if r["type"] == "history":
            for key, value in r["history"]["item"].items():
                if not key.startswith("_"):  # wandb's own: _step, _runtime, _timestamp
                    got[key].append((r["history"]["step"]["num"], value))
    return dict(got)


def offline_runs(out: Path) -> list[Path]:
    return sorted((out / "wandb").glob("offline-run-*"))


def test_wandb_offline_gets_every_step_evaluation_the_config_and_the_files(tmp_path, wandb_env):
    opts = options(tmp_path, epochs=2, report_to="wandb")
    assert run(opts, quiet, tiny_lm()) == 0
    out = Path(opts.output_dir)
    [run_dir] = offline_runs(out)
    records = wandb_records(run_dir)
    [start] = [r["run"] for r in records if r["type"] == "run"]
    run_id = json.loads((out / tracking.STATE).read_text())["wandb"]["run_id"]
    assert start["run_id"] == run_id and start["project"] == "latentwire"
    assert {k: v for k, v in start["config"]["update"].items() if k != "_wandb"} == identity(out)
    assert wandb_history(records) == expected(out)
    saved = {f["path"] for r in records if r["type"] == "files" for f in r["files"]["files"]}
    assert {"summary.json", "plots/loss.png", "plots/f1.png"} <= saved
    assert (run_dir / "files" / "summary.json").read_bytes() == (out / "summary.json").read_bytes()
    assert [r["exit"].get("exit_code", 0) for r in records if r["type"] == "exit"] == [0]


class Killed(Exception):
    pass


def test_a_resumed_run_continues_each_trackers_run_and_sends_each_step_once(
        tmp_path, monkeypatch, mlflow_env, wandb_env):
    """Killed at step 6 of 6 with its checkpoint at step 4: step 5 is trained again after the
    resume, and each tracker ends with every step once, as metrics.jsonl does."""
    lm = tiny_lm()
    opts = options(tmp_path, epochs=2, save_every=2, report_to="tensorboard,mlflow,wandb")
    step = Trainer.step

    def dies_at_step_6(self, batch, n=0, elapsed=0.0):
        if n == 5:
            raise Killed
        return step(self, batch, n, elapsed)

    monkeypatch.setattr(Trainer, "step", dies_at_step_6)
    with pytest.raises(Killed):
        run(opts, quiet, lm)
    out = Path(opts.output_dir)
    first = json.loads((out / tracking.STATE).read_text())
    client, mlrun = mlflow_run(out)
    assert mlrun.info.status == "KILLED"
    before = mlflow_history(client, mlrun)
    assert before == expected(out) and [s for s, _ in before["train/loss"]] == [1, 2, 3, 4, 5]
    monkeypatch.setattr(Trainer, "step", step)
    assert run(replace(opts, resume="yes"), quiet, lm) == 0
    assert json.loads((out / tracking.STATE).read_text()) == first  # the same runs, continued
    want = expected(out)
    assert [s for s, _ in want["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert tensorboard_scalars(out / "tensorboard")[1] == as_float32(want)
    client, mlrun = mlflow_run(out)
    assert mlrun.info.status == "FINISHED"
    assert len(client.search_runs([mlrun.info.experiment_id])) == 1
    # MLflow cannot take a value back: for step 5 it keeps what it got first, the same but for
    # the time the step took.
    kept = {k: [(s, before[k][4][1] if s == 5 and k == "train/examples_per_s" else v)
                for s, v in rows] for k, rows in want.items()}
    assert kept["train/loss"] == want["train/loss"]
    assert mlflow_history(client, mlrun) == kept
    # Offline, each process writes a run folder of its own, under the same run id: the second
    # starts at the step after the checkpoint, and `wandb sync` puts them together.
    killed, resumed = (wandb_records(d) for d in offline_runs(out))
    assert {r["run"]["run_id"] for r in killed + resumed if r["type"] == "run"} == {
        first["wandb"]["run_id"]}
    assert [s for s, _ in wandb_history(killed)["train/loss"]] == [1, 2, 3, 4, 5]
    later = wandb_history(resumed)
    assert later == {k: [(s, v) for s, v in rows if s > 4] for k, rows in want.items()
                     if any(s > 4 for s, _ in rows)}


@pytest.mark.slow
def test_under_torchrun_only_rank_0_sends(tmp_path, tiny_model_dir, mlflow_env, monkeypatch):
    out = tmp_path / "two"
    torchrun = Path(sys.executable).parent / "torchrun"
    done = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2",
         str(ROOT / "latentwire" / "train.py"), "--model_id", str(tiny_model_dir), "--samples",
         "8", "--eval_samples", "3", "--batch_size", "4", "--max_new_tokens", "3",
         "--output_dir", str(out), "--report_to", "tensorboard,mlflow"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    want = expected(out)
    assert tensorboard_scalars(out / "tensorboard")[1] == as_float32(want)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as the run's own process had it
    client, mlrun = mlflow_run(out)
    assert len(client.search_runs([mlrun.info.experiment_id])) == 1
    assert mlflow_history(client, mlrun) == want


def test_a_tracker_that_fails_is_dropped_with_a_warning_and_the_run_goes_on(
        tmp_path, monkeypatch, mlflow_env):
    lines = []
    sent = tracking.MLflow.log

    def full_disk_after_two_steps(self, metrics, step):
        if step > 2:
            raise OSError(28, "No space left on device")
        sent(self, metrics, step)

    monkeypatch.setattr(tracking.MLflow, "log", full_disk_after_two_steps)
    opts = options(tmp_path, epochs=2, report_to="mlflow,tensorboard")
    assert run(opts, lambda *a: lines.append(" ".join(map(str, a))), tiny_lm()) == 0
    out = Path(opts.output_dir)
    warnings = [line for line in lines if line.startswith("warning:")]
    assert warnings == ["warning: --report_to mlflow stopped (OSError: [Errno 28] No space left "
                        "on device); the run goes on without it, and metrics.jsonl and "
                        "summary.json hold everything"]
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"
    want = expected(out)
    assert [s for s, _ in want["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert tensorboard_scalars(out / "tensorboard")[1] == as_float32(want)
    client, mlrun = mlflow_run(out)
    assert mlrun.info.status == "FAILED"
    assert [s for s, _ in mlflow_history(client, mlrun)["train/loss"]] == [1, 2]


def test_a_bad_report_to_is_one_line_and_exit_2_before_the_model_loads(tmp_path, capsys,
                                                                         monkeypatch):
    base = ["train", "--model_id", unloadable_model(tmp_path / "m"), "--output_dir",
            str(tmp_path / "out")]
    for value, needle in [("tensorbaord", "unknown --report_to 'tensorbaord'; use none or one or"
                                          " more of tensorboard, mlflow, wandb, comma-separated"),
                          ("none,wandb", "unknown --report_to 'none'"),
                          (",", "unknown --report_to ','")]:
        assert main([*base, "--report_to", value]) == 2, value
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, (value, err)
    monkeypatch.setattr(tracking.WandB, "package", "latentwire_no_such_package")
    assert main([*base, "--report_to", "tensorboard,wandb"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --report_to wandb needs latentwire_no_such_package, which is not "
                   "installed: pip install 'latentwire[wandb]'")
    assert tracking.chosen("none") == [] and tracking.chosen(" mlflow, tensorboard,mlflow") == [
        "mlflow", "tensorboard"]


def test_without_report_to_no_tracker_package_is_imported(tmp_path, tiny_model_dir):
    """A whole training run in a fresh process, then one with --report_to tensorboard there as
    a check that the test sees an import when there is one."""
    script = (
        "import json, sys\n"
        "from latentwire.cli import main\n"
        "seen = []\n"
        "for out, extra in (('plain', []), ('tb', ['--report_to', 'tensorboard'])):\n"
        "    code = main(['train', *sys.argv[1:], '--output_dir', out, *extra])\n"
        f"    seen.append([code, [p for p in {PACKAGES!r} if p in sys.modules]])\n"
        "print(json.dumps(seen))\n")
    args = ["--model_id", str(tiny_model_dir), "--samples", "8", "--eval_samples", "3",
            "--batch_size", "4", "--max_new_tokens", "3"]
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=tmp_path, text=True,
                          capture_output=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == [[0, []], [0, ["tensorboard"]]]
