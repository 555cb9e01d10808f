"""Integration: real sweeps on the bundled model (a few examples each), resume after SIGKILL,
Ctrl-C, failure isolation, and equivalence of the batched engine with the per-example loop."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from latentwire import cli, embed_experiments
from latentwire.generation import generate, generate_reference
from latentwire.sweep import runner
from latentwire.sweep.options import SweepOptions, validate

from .conftest import ROOT

pytestmark = pytest.mark.slow

RESULT_FIELDS = {"experiment", "category", "description", "config", "f1", "em", "empty_rate",
                 "num_samples", "time_sec", "diagnostics", "predictions"}


def run_sweep(tmp_path, experiment, samples=4, **kw):
    opts = SweepOptions(experiment=experiment, samples=samples, output_dir=str(tmp_path), **kw)
    return cli.run_sweep(opts, log=lambda *a: None)


def test_single_experiment_writes_its_result_and_the_summary(tmp_path, bundled):
    summary, code = run_sweep(tmp_path, "rms_scale1.0", samples=8)
    assert code == 0
    result = json.loads((tmp_path / "rms_scale1.0.json").read_text())
    assert RESULT_FIELDS <= set(result)
    assert result["num_samples"] == 8 and len(result["predictions"]) == 8
    assert {"id", "prediction", "answers", "f1", "em"} <= set(result["predictions"][0])
    assert {"norm_ratio", "cosine_to_input", "fraction_changed", "max_abs_delta",
            "identical_to_input"} <= set(result["diagnostics"])
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert {"total_experiments", "successful", "failed", "results", "sorted_by_f1"} <= set(on_disk)
    prov = on_disk["provenance"]
    assert {"model", "dataset", "samples", "seed", "prompt_format", "versions", "device"} <= set(prov)
    assert prov["prompt_format"]["name"] == "chat" and prov["seed"] == 42


def test_anchor_on_text_is_a_reported_no_op_that_reuses_generations(tmp_path, bundled):
    summary, code = run_sweep(tmp_path, "baseline,anchor_eps0.1")
    anchor = json.loads((tmp_path / "anchor_eps0.1.json").read_text())
    base = json.loads((tmp_path / "baseline.json").read_text())
    assert anchor["diagnostics"]["identical_to_input"] is True
    assert anchor["reused_generations_from"] == "baseline"
    assert [p["prediction"] for p in anchor["predictions"]] == \
           [p["prediction"] for p in base["predictions"]]


def test_engine_matches_the_per_example_loop(tmp_path, bundled):
    """Batched, length-sorted, packed, early-stopping generation with a shared prefix cache and
    prefill passes that split prompts across them, against one model.generate per example on the
    full prompt: at least 98% identical predictions and F1 within 0.01, for every experiment."""
    from latentwire.scoring import score

    opts = SweepOptions(samples=10, output_dir=str(tmp_path))
    plan = validate(opts)
    s = runner.Sweep(opts, plan, log=lambda *a: None, lm=bundled)
    inputs, _ = s.source_inputs(plan.sources[0])
    model, tok = bundled.model, bundled.tokenizer
    for name, transform, config in [("baseline", "identity", {}),
                                    ("rms_scale1.0", "rms_matching", {"target_scale": 1.0}),
                                    ("batch_dist", "batch_distribution", {}),
                                    ("nearest_k5_a0.5", "nearest_k", {"k": 5, "alpha": 0.5}),
                                    ("codebook_256_t1.0", "soft_codebook", {"size": 256, "tau": 1.0})]:
        y, _ = embed_experiments.apply(transform, inputs, config)
        prompts = [torch.cat([y[s.offsets[i]:s.offsets[i + 1]], s.anchor])
                   for i in range(len(s.examples))]
        # Small budgets force several decode groups, each prefilled in several packed passes.
        batched = [a for a, _ in generate(model, tok, prompts, s.stops, 12, token_budget=600,
                                          prefix=s.prefix, prefill_tokens=200)]
        single = [generate_reference(model, tok, torch.cat([s.prefix, p]), 12) for p in prompts]
        same = sum(a == b for a, b in zip(batched, single)) / len(single)
        f1 = lambda preds: sum(score(p, list(e.answers))[1] for p, e in zip(preds, s.examples))
        assert same >= 0.98, (name, batched, single)
        assert abs(f1(batched) - f1(single)) / len(single) <= 0.01, name


def test_exception_in_one_experiment_is_recorded_and_the_sweep_goes_on(tmp_path, bundled, monkeypatch):
    def broken(inp):
        raise RuntimeError("deliberately broken for the test")

    monkeypatch.setattr(embed_experiments, "batch_distribution", broken)
    summary, code = run_sweep(tmp_path, "baseline,batch_dist,rms_scale1.0")
    assert code == 1
    failed = json.loads((tmp_path / "batch_dist.json").read_text())
    assert failed["status"] == "failed"
    assert failed["error"] == {"type": "RuntimeError", "message": "deliberately broken for the test"}
    assert summary["successful"] == 2 and summary["failed"] == 1
    assert json.loads((tmp_path / "rms_scale1.0.json").read_text())["status"] == "ok"


def test_non_finite_embeddings_fail_that_experiment_before_generation(tmp_path, bundled, monkeypatch):
    monkeypatch.setattr(embed_experiments, "rms_matching",
                        lambda inp, target_scale: (inp.x / 0.0 * 0.0, {}))
    summary, code = run_sweep(tmp_path, "rms_scale1.0")
    result = json.loads((tmp_path / "rms_scale1.0.json").read_text())
    assert code == 1 and result["status"] == "failed"
    assert result["error"]["type"] == "NonFiniteError" and "non-finite" in result["error"]["message"]
    assert "predictions" not in result


def test_same_command_twice_gives_identical_predictions(tmp_path, bundled):
    preds = []
    for run in ("a", "b"):
        run_sweep(tmp_path / run, "nearest_k5_a0.5,codebook_128_t1.0", samples=6)
        preds.append([json.loads((tmp_path / run / f"{n}.json").read_text())["predictions"]
                      for n in ("nearest_k5_a0.5", "codebook_128_t1.0")])
    assert preds[0] == preds[1]


def _start(out, experiments, stderr=subprocess.STDOUT):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "latentwire.cli", "sweep", "--experiment",
                             experiments, "--samples", "4", "--output_dir", str(out),
                             "--no-analysis"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=stderr, text=True, preexec_fn=_default_sigint)


def _default_sigint():
    """A shell runs background jobs with SIGINT ignored, and a child inherits that: Ctrl-C
    would then never reach the sweep under test. (A suite started with `&` failed so.)"""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(path, proc, timeout=300):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "the first experiment never finished"
        time.sleep(0.05)


def test_sigkill_then_rerun_resumes_without_touching_finished_work(tmp_path):
    experiments = "baseline,rms_scale1.0,batch_dist"
    proc = _start(tmp_path, experiments)
    first = tmp_path / "baseline.json"
    _wait_for(first, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = (first.read_bytes(), first.stat().st_mtime_ns)
    for f in tmp_path.glob("*.json"):
        json.loads(f.read_text())  # every file that exists is whole
    rerun = _start(tmp_path, experiments)
    output = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, output
    assert "baseline (text): kept from an earlier run" in output
    assert (first.read_bytes(), first.stat().st_mtime_ns) == before
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["successful"] == 3 and summary["failed"] == 0 and not summary["not_run"]
    for f in tmp_path.glob("*.json"):
        json.loads(f.read_text())


def test_ctrl_c_writes_the_partial_summary_and_exits_130(tmp_path):
    proc = _start(tmp_path, "baseline,rms_scale1.0,batch_dist,codebook_1024_t1.0",
                  stderr=subprocess.PIPE)
    _wait_for(tmp_path / "baseline.json", proc)
    proc.send_signal(signal.SIGINT)
    output, errors = proc.communicate(timeout=300)
    assert proc.returncode == 130, output + errors
    # What to do next is said where the user looks after a Ctrl-C: on stderr.
    assert "rerun the same command to resume" in errors and "rerun" not in output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["successful"] >= 1
    assert summary["not_run"]


def test_rerun_keeps_unchanged_results_and_redoes_changed_or_forced_ones(tmp_path, bundled):
    def logged(**kw):
        lines = []
        opts = SweepOptions(experiment="baseline", samples=3, output_dir=str(tmp_path), **kw)
        cli.run_sweep(opts, log=lines.append)
        return "\n".join(lines)

    assert "kept from an earlier run" not in logged()
    assert "kept from an earlier run" in logged()
    assert "kept from an earlier run" not in logged(max_new_tokens=6)  # fingerprint changed
    assert "kept from an earlier run" in logged(max_new_tokens=6)
    assert "kept from an earlier run" not in logged(max_new_tokens=6, force=True)
