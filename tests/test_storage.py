"""Storage faults on a real full disk: a small tmpfs filled with ballast at a chosen moment, so
the kernel itself answers ENOSPC. A run stops with exit 1 and one line naming the path, what
was written before stays readable, and once space is back the same command continues.

Mounting needs root; without it these tests skip."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from latentwire.cli import main
from latentwire.errors import StorageError
from latentwire.training import checkpoint
from latentwire.training.loop import run
from latentwire.training.options import TrainOptions

from .conftest import tiny_lm


@pytest.fixture
def disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                       capture_output=True)
    if r.returncode:
        pytest.skip("a small tmpfs cannot be mounted here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """Ballast that leaves about `leave` bytes of the disk free."""
    st = os.statvfs(disk)
    ballast = disk / "ballast"
    with open(ballast, "wb") as fh:
        fh.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return ballast


def options(out: Path, **kw) -> TrainOptions:
    base = {"samples": 48, "eval_samples": 3, "batch_size": 2, "epochs": 2, "lr": 1e-2,
            "max_new_tokens": 3, "output_dir": str(out)}
    return TrainOptions(**{**base, **kw})


def quiet(*args, **kwargs):
    pass


def weights(out: Path) -> dict:
    w, _ = checkpoint.load(out / "checkpoints" / "last")
    return w


@pytest.mark.parametrize("where, leave, save_every", [
    ("checkpoints/last", 8192, 1),   # room for a metrics line, not for a checkpoint
    ("metrics.jsonl", 0, 0),         # no checkpoint inside the epoch: a metrics line fails
])
def test_a_full_disk_during_training_stops_the_run_and_resume_completes_it(
        tmp_path, disk, where, leave, save_every):
    lm = tiny_lm()
    whole = tmp_path / "whole"
    assert run(options(whole, save_every=save_every), quiet, lm) == 0
    out = disk / "run"
    kept = {}

    def full_after_epoch_1(entry):
        kept["weights"] = weights(out)
        kept["metrics"] = (out / "metrics.jsonl").read_text()
        kept["ballast"] = fill(disk, leave)

    with pytest.raises(StorageError) as err:
        run(options(out, save_every=save_every), quiet, lm, on_epoch=full_after_epoch_1)
    message = str(err.value)
    assert message.startswith(f"cannot write {out / where} (No space left on device)")
    assert "\n" not in message
    # The checkpoint of epoch 1 and the lines before the failure are there and load.
    last = weights(out)
    assert last.keys() == kept["weights"].keys()
    if where == "metrics.jsonl":
        assert all(torch.equal(last[k], kept["weights"][k]) for k in last)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert (out / "metrics.jsonl").read_text().startswith(kept["metrics"])
    assert all(json.loads(line) for line in lines[:-1])
    assert json.loads((out / "summary.json").read_text())["status"] == "running"
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    # Space back: the same run with --resume ends where the uninterrupted one did.
    kept["ballast"].unlink()
    assert run(options(out, save_every=save_every, resume="yes"), quiet, lm) == 0
    done, expected = weights(out), weights(whole)
    assert all(torch.equal(done[k], expected[k]) for k in expected)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"type": "step"' in line]
    assert steps == list(range(1, 49))


def test_a_full_disk_at_a_sweep_result_is_one_line_exit_1_and_a_rerun_completes(
        disk, tiny_model_dir, capsys):
    out = disk / "sweep"
    args = ["sweep", "--model_id", str(tiny_model_dir), "--samples", "16", "--output_dir",
            str(out), "--no_analysis"]
    assert main([*args, "--experiment", "baseline"]) == 0
    first = (out / "baseline.json").read_bytes()
    # A page left: the sweep's check that the folder takes a file passes, the result does not.
    ballast = fill(disk, 4096)
    capsys.readouterr()
    assert main([*args, "--experiment", "baseline,rms_scale1.0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot write {out / 'rms_scale1.0.json'} (No space left on "
                          "device)") and len(err.splitlines()) == 1
    assert (out / "baseline.json").read_bytes() == first
    assert not list(out.glob(".*.tmp*"))
    ballast.unlink()
    assert main([*args, "--experiment", "baseline,rms_scale1.0"]) == 0
    assert (out / "baseline.json").read_bytes() == first  # kept, not redone
    assert json.loads((out / "rms_scale1.0.json").read_text())["status"] == "ok"
