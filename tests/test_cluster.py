"""The sweep on a local Ray (2 CPUs, started once for the module): the same files as a local
run, a worker killed inside a unit and retried with nothing lost, resume, and several models in
one sweep with the cross-model analysis. Tiny in-process models only."""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from latentwire import raycluster
from latentwire.analysis import insights as analysis
from latentwire.cli import run_sweep
from latentwire.sweep.options import SweepOptions, model_dirname
from latentwire.errors import UsageError
from latentwire.analysis.formatting import render_text

from .conftest import ROOT, byte_tokenizer, unloadable_model
from .ray_hooks import KILL_DIR

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray

EXPERIMENTS = "baseline,anchor_eps0.1,rms_scale1.0"  # per source: baseline + anchor, rms
SOURCES = "text,scaled:50"


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """The folder where a test arms the kill hook of tests/ray_hooks.py."""
    kill_dir = tmp_path_factory.mktemp("kill")
    ray.init(num_cpus=2, logging_level=logging.WARNING, runtime_env={
        "worker_process_setup_hook": "tests.ray_hooks.arm_kill",
        # Workers import the hook as tests.ray_hooks: the repository root must be on their path
        # (pytest puts it on the driver's only).
        "env_vars": {KILL_DIR: str(kill_dir), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}})
    yield kill_dir
    ray.shutdown()


def options(out, model_dir, **kw):
    kw = {"experiment": EXPERIMENTS, "source": SOURCES, "model_id": str(model_dir), **kw}
    return SweepOptions(samples=4, output_dir=str(out), device="cpu", **kw)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("local")
    assert run_sweep(options(out, tiny_model_dir), log=lambda *a: None)[1] == 0
    return out


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory, tiny_model_dir, local_ray):
    out = tmp_path_factory.mktemp("ray")
    lines = []
    summary, code = run_sweep(options(out, tiny_model_dir, ray=""), log=lines.append)
    assert code == 0, lines
    return out, summary, lines


def results(folder):
    """Every result file under `folder`, by relative path, without its timing."""
    out = {}
    for path in sorted(folder.rglob("*.json")):
        if path.name != "summary.json":
            r = json.loads(path.read_text())
            r.pop("time_sec", None)
            out[str(path.relative_to(folder))] = r
    return out


def stamps(folder):
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in folder.rglob("*.json") if p.name != "summary.json"}


def test_ray_sweep_writes_what_a_local_sweep_writes(local_run, ray_run):
    out, summary, lines = ray_run
    expected = results(local_run)
    assert len(expected) == 6 and results(out) == expected  # predictions, F1s, fingerprints
    assert json.loads((out / "text" / "anchor_eps0.1.json").read_text())[
        "reused_generations_from"] == "baseline"
    local = json.loads((local_run / "summary.json").read_text())
    assert summary == json.loads((out / "summary.json").read_text())
    for key in ("total_experiments", "successful", "failed", "not_run", "sorted_by_f1"):
        assert summary[key] == local[key], key
    assert [r["experiment"] for r in summary["results"]] == \
           [r["experiment"] for r in local["results"]]
    assert summary["provenance"]["command"] == local["provenance"]["command"]
    assert any(line.startswith("[4/4 units") for line in lines), lines


def test_a_ray_rerun_keeps_everything_and_force_redoes_it(ray_run, tiny_model_dir, tmp_path):
    shutil.copytree(ray_run[0], tmp_path, dirs_exist_ok=True)
    before = stamps(tmp_path)
    summary, code = run_sweep(options(tmp_path, tiny_model_dir, ray=""), log=lambda *a: None)
    assert code == 0 and summary["successful"] == 6 and stamps(tmp_path) == before
    kept = results(tmp_path)
    run_sweep(options(tmp_path, tiny_model_dir, ray="", force=True), log=lambda *a: None)
    after = stamps(tmp_path)
    assert all(after[k][1] != before[k][1] for k in before)  # every file written again
    assert results(tmp_path) == kept


def test_a_worker_killed_inside_a_unit_is_retried_and_nothing_is_lost(
        local_ray, local_run, tiny_model_dir, tmp_path):
    (local_ray / "arm").write_text("")
    summary, code = run_sweep(options(tmp_path, tiny_model_dir, ray=""), log=lambda *a: None)
    fired = json.loads((local_ray / "fired.json").read_text())
    assert not (local_ray / "arm").exists()  # a worker did die
    assert code == 0 and summary["successful"] == 6 and not summary["not_run"]
    assert results(tmp_path) == results(local_run)
    # The retried unit kept the result its killed worker had written instead of redoing it.
    assert Path(fired["path"]).stat().st_mtime_ns == fired["mtime_ns"]


@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory):
    """A random 2-layer Qwen2 over the same byte tokenizer as the tiny Llama."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = byte_tokenizer()
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=False)).eval()
    path = tmp_path_factory.mktemp("tiny-qwen2")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_two_models_in_one_sweep_get_a_folder_each_and_a_cross_model_section(
        local_ray, tiny_model_dir, tiny_qwen_dir, tmp_path):
    models = f"{tiny_model_dir},{tiny_qwen_dir}"
    names = [model_dirname(str(tiny_model_dir)), model_dirname(str(tiny_qwen_dir))]
    experiments = "baseline,rms_scale0.8,rms_scale1.2,batch_dist,codebook_128_t1.0"
    summary, code = run_sweep(options(tmp_path / "ray", models, ray="", source="text",
                                      experiment=experiments), log=lambda *a: None)
    assert code == 0 and summary["successful"] == 10
    assert [m["dir"] for m in summary["models"]] == names
    for name in names:  # each model's folder is a one-model sweep's layout
        assert (tmp_path / "ray" / name / "baseline.json").is_file()
        assert json.loads((tmp_path / "ray" / name / "summary.json").read_text())["successful"] == 5
    # Without Ray the models run one after another, into the same layout, with the same results.
    run_sweep(options(tmp_path / "local", models, source="text", experiment=experiments),
              log=lambda *a: None)
    assert results(tmp_path / "local") == results(tmp_path / "ray")

    insights = analysis.build(summary)
    cross = insights["cross_model"]["sources"]["text"]
    assert [row["experiment"] for row in cross["table"]] == \
           [r["experiment"] for r in insights["models"][names[0]]["sources"]["text"]["ranked"]]
    f1 = {m["dir"]: {r["experiment"]: r["f1"] for r in m["summary"]["results"]}
          for m in summary["models"]}
    assert all(row["f1"] == {n: f1[n][row["experiment"]] for n in names} for row in cross["table"])
    (pair,) = cross["agreement"]
    assert (pair["a"], pair["b"], pair["n"]) == (names[0], names[1], 5)
    winners = {n: insights["models"][n]["sources"]["text"]["ranked"][0]["experiment"]
               for n in names}
    assert {n: w["experiment"] for n, w in cross["winners"].items()} == winners
    assert cross["same_winner"] == (len(set(winners.values())) == 1)
    table = analysis.ranked_table(summary)
    assert all(f"({n}/)" in table for n in names)
    text = render_text(insights)
    assert "CROSS-MODEL" in text and "Spearman" in text and "Kendall" in text
    written = analysis.analyze(summary, tmp_path / "ray", plots=True)
    assert "cross_model" in written
    assert "Cross-model" in (tmp_path / "ray" / "report.html").read_text()


def test_bad_ray_and_model_flags_are_one_line_errors(local_ray, tiny_model_dir, tmp_path):
    with pytest.raises(UsageError, match="no node of the Ray cluster has 3 CPUs"):
        run_sweep(options(tmp_path, tiny_model_dir, ray="", ray_cpus_per_worker=3))
    with pytest.raises(UsageError, match="cannot reach the Ray cluster at 127.0.0.1:9"):
        raycluster.connect("127.0.0.1:9")  # the discard port: nothing listens there
    with pytest.raises(UsageError, match="need --ray"):
        run_sweep(options(tmp_path, tiny_model_dir, ray_gpus_per_worker=1))
    twin = unloadable_model(tmp_path / "elsewhere" / tiny_model_dir.name)
    with pytest.raises(UsageError, match="would share the folder"):
        run_sweep(options(tmp_path, f"{tiny_model_dir},{twin}"))


# The sweep's driver in a process of its own, run in the repository's root and joined to the
# cluster at argv[1] with the hook that slows every experiment down; the rest of argv is the
# command.
DRIVER = """
import logging, os, sys
import ray
ray.init(address=sys.argv[1], logging_level=logging.WARNING, runtime_env={
    "worker_process_setup_hook": "tests.ray_hooks.slow_down",
    "env_vars": {"LATENTWIRE_TEST_SLOW_S": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.getcwd()}})
from latentwire.cli import main
sys.exit(main(sys.argv[2:]))
"""


def node_processes(marker: str) -> list[int]:
    """The pids of every process of the Ray node whose files are under `marker`: its head, its
    raylet, its workers and helpers all name their session folder on their command line."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_text(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            pass
    return [p for p in pids if p != os.getpid()]


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_sweep_whose_cluster_dies_exits_1_in_a_minute_and_a_local_rerun_finishes_it(
        tiny_model_dir, tmp_path):
    """A real head node started with `ray start`, killed whole (head, raylet, workers) under a
    running `sweep --ray`: the driver says so in one line and exits 1 well within a minute, the
    results its workers wrote stay, and the same command without --ray completes from them."""
    ray_dir = Path(tempfile.mkdtemp(prefix="lw-ray-", dir="/tmp"))  # short: Ray's sockets live there
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Token authentication, one way for the head and the driver alike: Ray turns it on for a
    # head started where a token file exists (~/.ray/auth_token, written by the first local Ray)
    # but not for a driver joining it, unless this process's environment already says so.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    ray_cli = Path(sys.executable).with_name("ray")
    out = tmp_path / "sweep"
    args = ["sweep", "--model_id", str(tiny_model_dir), "--experiment",
            "baseline,rms_scale*,batch_dist,nearest_k5*", "--source", "text", "--samples", "4",
            "--device", "cpu", "--output_dir", str(out), "--no-analysis"]
    try:
        subprocess.run([str(ray_cli), "start", "--head", "--port", str(port), "--num-cpus", "2",
                        "--temp-dir", str(ray_dir), "--include-dashboard", "false"],
                       env=env, check=True, capture_output=True, timeout=120)
        driver = subprocess.Popen([sys.executable, "-c", DRIVER, f"127.0.0.1:{port}", *args,
                                   "--ray", f"127.0.0.1:{port}"], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 180
        while not list(out.glob("*.json")) and driver.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert driver.poll() is None, driver.communicate()
        killed = time.time()
        kill_all(node_processes(str(ray_dir)))
        stdout, err = driver.communicate(timeout=120)
        took = time.time() - killed
    finally:
        kill_all(node_processes(str(ray_dir)))
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert driver.returncode == 1, (stdout[-2000:], err[-2000:])
    last = err.strip().splitlines()[-1]
    assert took < 60, took
    assert last.startswith("error: lost the Ray cluster: its head at ") and str(out) in last, last
    assert "Traceback" not in err
    written = stamps(out)
    assert written  # the test killed it after the first result
    summary, code = run_sweep(options(out, tiny_model_dir, experiment=args[4], source="text"),
                              log=lambda *a: None)
    assert code == 0 and summary["successful"] == summary["total_experiments"] == 8
    assert {k: v for k, v in stamps(out).items() if k in written} == written
