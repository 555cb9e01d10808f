"""Run in every Ray worker process of tests/test_cluster.py (Ray's worker_process_setup_hook):
lets a test kill the worker that runs an experiment, from inside its unit, as a crash would."""

import json
import os
import signal
from pathlib import Path

KILL_DIR = "LATENTWIRE_TEST_KILL_DIR"


def arm_kill() -> None:
    """After an experiment's result is written, the first worker to find the `arm` file in
    $LATENTWIRE_TEST_KILL_DIR removes it, notes which file it had just written, and SIGKILLs
    itself. Racing workers: only the one whose unlink succeeds dies."""
    from latentwire import sweep

    original = sweep._run_one

    def run_one_then_die(sweep_, plan, spec, exp, *args):
        result = original(sweep_, plan, spec, exp, *args)
        folder = Path(os.environ[KILL_DIR])
        try:
            (folder / "arm").unlink()
        except FileNotFoundError:
            return result
        path = sweep.result_path(plan, spec, exp.name)
        (folder / "fired.json").write_text(json.dumps(
            {"path": str(path), "mtime_ns": path.stat().st_mtime_ns, "pid": os.getpid()}))
        os.kill(os.getpid(), signal.SIGKILL)

    sweep._run_one = run_one_then_die
