"""Run in every Ray worker process of a test module (Ray's worker_process_setup_hook):
tests/test_cluster.py kills the worker that runs an experiment, from inside its unit, as a crash
would; tests/test_screen.py scripts the F1 that each trial records."""

import json
import os
import signal
from pathlib import Path

KILL_DIR = "LATENTWIRE_TEST_KILL_DIR"


def arm_kill() -> None:
    """After an experiment's result is written, the first worker to find the `arm` file in
    $LATENTWIRE_TEST_KILL_DIR removes it, notes which file it had just written, and SIGKILLs
    itself. Racing workers: only the one whose unlink succeeds dies."""
    from latentwire.sweep import runner
    from latentwire.sweep.options import result_path

    original = runner.run_one

    def run_one_then_die(sweep_, plan, spec, exp, *args):
        result = original(sweep_, plan, spec, exp, *args)
        folder = Path(os.environ[KILL_DIR])
        try:
            (folder / "arm").unlink()
        except FileNotFoundError:
            return result
        path = result_path(plan, spec, exp.name)
        (folder / "fired.json").write_text(json.dumps(
            {"path": str(path), "mtime_ns": path.stat().st_mtime_ns, "pid": os.getpid()}))
        os.kill(os.getpid(), signal.SIGKILL)

    runner.run_one = run_one_then_die


F1_SCRIPT = "LATENTWIRE_TEST_F1_SCRIPT"


def script_f1() -> None:
    """For tests/test_screen.py: the F1 each trial's evaluation records comes from the JSON file
    at $LATENTWIRE_TEST_F1_SCRIPT, {experiment: [F1 at epoch 1, 2, ...]}, so which trials ASHA
    stops is known in advance (the tiny random model scores 0 everywhere, which ASHA cannot tell
    apart). Training, generation and scoring still run; only the recorded F1 is replaced: the
    mean, and each question's by it. A trial scripted as "diverge" has a NaN loss from its first
    step, which the trainer must catch."""
    from latentwire.training.trainer import Trainer

    def script(trial) -> list | str | None:
        return json.loads(Path(os.environ[F1_SCRIPT]).read_text()).get(trial.out.name)

    evaluate_, loss_ = Trainer.evaluate, Trainer.loss

    def evaluate(self):
        result = evaluate_(self)
        f1s = script(self)
        if isinstance(f1s, list):
            done = len(list((self.out / "eval").glob("epoch*.json")))  # written after this
            result["f1"] = f1s[done]
            result["ci"] = [result["f1"], result["f1"]]
            # Every question scored alike, by every model: the mean's.
            for record in result["models"].values() if "models" in result else [result]:
                for p in record["predictions"]:
                    p["f1"] = result["f1"]
        return result

    def loss(self, rows):
        total, parts = loss_(self, rows)
        return (total * float("nan") if script(self) == "diverge" else total), parts

    Trainer.evaluate, Trainer.loss = evaluate, loss


SLOW = "LATENTWIRE_TEST_SLOW_S"


def slow_down() -> None:
    """For tests/test_cluster.py: every experiment takes $LATENTWIRE_TEST_SLOW_S seconds longer,
    so that a sweep is still running when the test kills its cluster."""
    import time

    from latentwire.sweep import runner

    original = runner.run_one

    def run_one_slowly(*args):
        result = original(*args)
        time.sleep(float(os.environ[SLOW]))
        return result

    runner.run_one = run_one_slowly
