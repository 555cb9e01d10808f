"""The trainer on tiny random models built in-process: gradients reach the compressor and nothing
else, the transform is the sweep's, the loss is what a direct computation gives, the outputs,
resume after SIGKILL, and torchrun with two processes."""

import copy
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from latentwire import data, embed_experiments, experiments, generation, prompts
from latentwire.analysis import insights as analysis
from latentwire.cli import main, parser
from latentwire.embed_experiments import TransformInputs
from latentwire.errors import UsageError
from latentwire.training import checkpoint
from latentwire.training.encoders import Compressor, Layout, similar_widths
from latentwire.training import loop
from latentwire.training.loop import run
from latentwire.options import from_args
from latentwire.training.options import (RESTARTS, TRANSFORM_OPTIONS, TrainOptions, resume_mode,
                                         validate)
from latentwire.training.summary import render
from latentwire.training.trainer import (CALIBRATION_EXAMPLES, Tally, Trainer,
                                         recompute_layers)
from latentwire.vocab import VocabSpace

from .conftest import ROOT, tiny_lm, unloadable_model


def quiet(*args, **kwargs):
    pass


def options(tmp_path, **kw):
    base = dict(samples=12, eval_samples=4, batch_size=4, epochs=1, save_every=1, lr=1e-2,
                max_new_tokens=4, codebook_size=16, nearest_k=3, output_dir=str(tmp_path / "run"))
    return TrainOptions(**{**base, **kw})


def trainer(tmp_path, lm=None, **kw):
    opts = options(tmp_path, **kw)
    return Trainer(opts, validate(opts), quiet, lm or tiny_lm())


@pytest.mark.parametrize("transform", list(experiments.embed_transforms()))
def test_every_transform_passes_a_finite_nonzero_gradient_to_the_encoder_only(tmp_path, transform):
    lm = tiny_lm()
    t = trainer(tmp_path, lm, embed_transform=transform)
    loss, _ = t.loss(range(4))
    loss.backward()
    grads = [p.grad for p in t.compressor.encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    if transform == "soft_codebook":
        assert float(t.compressor.codes.grad.abs().sum()) > 0  # the codes learn too
    assert all(p.grad is None and not p.requires_grad for p in lm.model.parameters())


@pytest.mark.parametrize("encoder", ["pool", "attn", "constant", "lm"])
def test_every_encoder_learns_and_the_answering_model_does_not(tmp_path, encoder):
    lm = tiny_lm()
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    t = trainer(tmp_path, lm, encoder=encoder)
    for _ in range(2):
        t.step(list(range(4)))
    grads = [p.grad for p in t.compressor.encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None and not p.requires_grad for p in lm.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    # A checkpoint holds the encoder alone: the frozen model's weights are never in it.
    assert all(not k.startswith("reader") for k in t.compressor.state_dict())
    assert sum(v.numel() for v in t.compressor.state_dict().values()) < 0.5 * sum(
        v.numel() for v in before.values())


@pytest.mark.parametrize("keep_question", [False, True])
def test_loss_equals_the_answer_cross_entropy_computed_row_by_row(tmp_path, keep_question):
    """Batched, right-padded rows over a shared prefix cache, against each example alone with
    its whole prompt: answer CE + first-token weight + distillation from the model reading text
    + reconstruction (the model reading the whole span again after the latents)."""
    lm = tiny_lm()
    t = trainer(tmp_path, lm, keep_question=keep_question, first_token_ce_weight=0.5,
                kd_weight=0.3, kd_tau=2.0, recon_weight=0.7, embed_transform="rms_matching")
    items = t.reader.train_items[:3]
    t.distil()
    teacher = t.reader.teacher[:3]
    loss, _ = t.loss(range(3))
    assert t.reader.prefix_cache(1) is not None and len(t.reader.prefix) > 0  # the cached path is the one tested
    ((z, offsets, _),) = t.latents(range(3))
    expected = 0.0
    for n, item in enumerate(items):
        question = t.reader.embed_ids(item.question) if item.question else t.reader.anchor[:0]
        row = torch.cat([t.reader.prefix, z[offsets[n]:offsets[n + 1]], question, t.reader.anchor,
                         t.reader.embed_ids(item.answer[:-1])])
        logits = lm.model(inputs_embeds=row[None]).logits[0]
        first = row.shape[0] - len(item.answer)
        answer_logits = logits[first:first + len(item.answer)]
        ce = F.cross_entropy(answer_logits, torch.tensor(item.answer), reduction="none")
        ids, values = teacher[n]
        p = torch.softmax(values / 2.0, -1)
        kd = -(p * torch.log_softmax(answer_logits / 2.0, -1).gather(1, ids)).sum(-1) * 4.0
        expected = expected + ce.mean() + 0.5 * ce[0] + 0.3 * kd.mean()
        again = torch.cat([t.reader.prefix, z[offsets[n]:offsets[n + 1]],
                           t.reader.embed_ids(item.span[:-1])])
        last_latent = len(t.reader.prefix) + int(offsets[n + 1] - offsets[n]) - 1
        recon = F.cross_entropy(lm.model(inputs_embeds=again[None]).logits[0, last_latent:],
                                torch.tensor(item.span))
        expected = expected + 0.7 * recon
        # The teacher is the model reading the text itself, at the same answer positions.
        text = torch.cat([t.reader.prefix, t.reader.embed_ids(prompts.encode_span(
            lm.tokenizer, t.reader.fmt, item.example.context, item.example.question)[0]), t.reader.anchor,
            t.reader.embed_ids(item.answer[:-1])])
        top = lm.model(inputs_embeds=text[None]).logits[0, -len(item.answer):].topk(ids.shape[1])
        assert torch.allclose(top.values, values, atol=1e-5)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_the_training_transform_is_the_sweep_experiment_the_analysis_names(tmp_path):
    """For every experiment of the default grid: the analysis's train command, parsed by the CLI,
    builds the same registry entry with the same config, and gives the sweep's output."""
    lm = tiny_lm()
    checked = set()
    for exp in experiments.grid("default"):
        command = analysis.train_command({"experiment": exp.name, "category": exp.category,
                                          "config": exp.config})
        if exp.category == "baseline":
            assert command is None  # no transform to put in the graph
            continue
        assert command.startswith("latentwire train "), exp.name
        if exp.config.get("size", 0) > len(lm.tokenizer):
            continue  # (the tiny vocabulary has 257 rows: no 512 codes to learn from it)
        parsed = from_args(TrainOptions, parser().parse_args(["train", *shlex.split(command)[2:]]))
        assert (parsed.samples, parsed.epochs) == (10000, 10)  # the seed's full run
        opts = options(tmp_path, **{k: getattr(parsed, k) for k in TRANSFORM_OPTIONS})
        t = Trainer(opts, validate(opts), quiet, lm)
        assert t.spec.transform.to_json() == {"name": exp.transform, "config": exp.config}, exp.name
        items = t.reader.eval_items
        spans = t.reader.embed_ids([x for i in items for x in i.span]).float()
        lengths = [len(i.span) for i in items]
        z = t.compressor.encoder(spans, Layout.of(lengths, t.spec.counts(lengths)))
        ours, offsets, _ = t.compressor(spans, lengths)
        theirs, _ = embed_experiments.apply(exp.transform, TransformInputs(z, offsets, t.reader.vocab),
                                            exp.config)
        assert torch.equal(ours, theirs), exp.name
        checked.add(exp.category)
        (Path(opts.output_dir) / "config.json").unlink(missing_ok=True)
    assert checked == set(experiments.categories()) - {"baseline"}


def test_a_run_trains_only_the_compressor_and_writes_every_output(tmp_path):
    lm = tiny_lm()
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    opts = options(tmp_path, embed_transform="soft_codebook", epochs=2)
    assert run(opts, quiet, lm) == 0
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    assert not lm.model.training
    out = Path(opts.output_dir)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["compression_ratio"] > 3
    assert set(summary["final"]) >= {"f1", "em", "empty_rate", "ci"}
    assert set(summary["references"]) == {"text", "question_only"}
    assert all(set(r) >= {"f1", "em"} for r in summary["references"].values())
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2]
    assert all(set(e) >= {"train_loss", "eval_f1", "seconds"} for e in summary["epochs"])
    assert summary["split"]["shared_groups"] == 0
    held_out = data.load_all(str(out / "eval_split.jsonl"))
    assert [e.id for e in held_out] == [i.example.id for i in Trainer(
        options(tmp_path / "again"), validate(options(tmp_path / "again")), quiet, lm).reader.eval_items]
    config = json.loads((out / "config.json").read_text())
    assert config["options"]["embed_transform"] == "soft_codebook"
    assert config["provenance"]["model"]["class"] == "LlamaForCausalLM"
    # Which examples each count is of, in names that say so (the sweep's `samples` would not).
    counts = {k: v for k, v in config["provenance"].items() if "samples" in k}
    assert counts == {"train_samples": 12, "eval_samples": summary["split"]["eval_examples"]}
    assert summary["split"]["train_examples"] == 12 and summary["split"]["eval_examples"] >= 4
    assert config["provenance"]["dataset"]["eval_spec"] is None
    assert set(config["provenance"]["dataset"]) == {"spec", "eval_spec", "train_examples_sha256",
                                                   "eval_examples_sha256"}
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "step"] == list(range(1, 7))
    assert [r["epoch"] for r in rows if r["type"] == "eval"] == [1, 2]
    assert (out / "plots" / "loss.png").stat().st_size > 0
    assert (out / "plots" / "f1.png").stat().st_size > 0
    for which in ("last", "best"):
        weights, cfg = checkpoint.load(out / "checkpoints" / which)
        assert "codes" in weights and cfg["compressor"]["transform"]["name"] == "soft_codebook"
    assert (out / "checkpoints" / "last" / checkpoint.OPTIMIZER).is_file()
    files = [p.name for p in out.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".pt", ".pkl", ".bin"))]
    # The codes learned, from the sweep's k-means codes.
    weights, _ = checkpoint.load(out / "checkpoints" / "last")
    start, _ = VocabSpace.from_model(lm.model, len(lm.tokenizer)).codebook(16, 0)
    assert not torch.equal(weights["codes"], start)


@pytest.mark.parametrize("encoder", ["truncate", "kvpress:knorm"])
def test_a_slow_evaluation_says_how_far_it_has_answered_and_a_quick_one_stays_quiet(
        tmp_path, monkeypatch, encoder):
    lines = []
    opts = options(tmp_path, encoder=encoder, compression=4.0, samples=0, eval_samples=8,
                   keep_question=True)
    assert run(opts, lines.append, tiny_lm()) == 0
    assert not [l for l in lines if re.search(r"\d+ of \d+ in", l)]
    monkeypatch.setattr(Tally, "QUIET_SECONDS", 0)
    monkeypatch.setattr(generation, "MAX_DECODE_ROWS", 2)  # several decode groups, not one
    lines.clear()
    assert run(replace(opts, output_dir=str(tmp_path / "slow")), lines.append, tiny_lm()) == 0
    told = [l for l in lines if re.search(r"\d+ of \d+ in", l)]
    n = json.loads((tmp_path / "slow" / "summary.json").read_text())["split"]["eval_examples"]
    # Each of the three evaluations (two references, then the compressor) at its quarters,
    # never its end: its result line says that.
    counts = [int(re.search(r"(\d+) of (\d+) in", l)[1]) for l in told]
    assert all(f" of {n} in" in l for l in told)
    assert len(told) >= 3 and all(0 < c < n for c in counts)
    pressed = [l for l in told if "contexts pressed" in l]
    assert bool(pressed) == encoder.startswith("kvpress")
    assert sum("text reference" in l for l in told) >= 1


def test_bad_input_is_one_line_and_exit_2_before_the_model_loads(tmp_path, capsys):
    base = ["train", "--model_id", unloadable_model(tmp_path / "m"), "--output_dir",
            str(tmp_path / "out")]
    for extra, needle in [(["--latent_len", "0"], "--latent_len must be at least 1"),
                          (["--compression", "0.5"], "--compression must be at least 1"),
                          (["--samples", "4", "--batch_size", "8"], "smaller than --batch_size"),
                          (["--eval_samples", "0"], "--eval_samples must be at least 1"),
                          (["--nearest_alpha", "2"], "--nearest_alpha must be in [0, 1]"),
                          (["--lr", "-1"], "--lr must be a positive number"),
                          (["--resume"], "holds no checkpoint to resume"),
                          (["--dataset", "nope"], "unknown dataset"),
                          (["--max_minutes", "-1"], "--max_minutes must be a number of minutes"),
                          (["--max_minutes", "nan"], "--max_minutes must be a number of minutes")]:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, (extra, err)
    assert main(["train", "--output_dir", "/proc/latentwire-cannot-write"]) == 2
    assert "cannot write to output dir" in capsys.readouterr().err


def test_max_minutes_stops_every_epoch_loop_evaluates_there_and_a_resume_adds_nothing(
        tmp_path, monkeypatch):
    # Each step is made to take 40 s of the clock the loop reads, so a budget of 1.5 minutes
    # is spent after the third step, in the first of two epochs of three steps each.
    now, real_step = [0.0], Trainer.step

    def slow_step(self, batch, step=0, elapsed=0.0):
        now[0] += 40
        return real_step(self, batch, step, elapsed)

    monkeypatch.setattr(Trainer, "step", slow_step)
    monkeypatch.setattr(loop, "time", SimpleNamespace(time=lambda: now[0]))
    lm = tiny_lm()
    opts = options(tmp_path, epochs=2, max_minutes=1.5, save_every=0)
    assert run(opts, quiet, lm) == 0
    out = Path(opts.output_dir)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 3
    assert summary["budget"] == {"max_minutes": 1.5, "planned_steps": 6, "stopped_early": True}
    assert [e["epoch"] for e in summary["epochs"]] == [1]
    steps = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["type"] == "step"] == [1, 2, 3]
    # Resumed from the checkpoint its evaluation left: the budget is spent, nothing more runs.
    assert run(options(tmp_path, epochs=2, max_minutes=1.5, save_every=0, resume="yes"),
               quiet, lm) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["steps"] == 3 and len(again["epochs"]) == 1
    # A budget the run never reaches changes nothing.
    whole = options(tmp_path, epochs=2, max_minutes=1000, save_every=0,
                    output_dir=str(tmp_path / "whole"))
    assert run(whole, quiet, lm) == 0
    summary = json.loads((Path(whole.output_dir) / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["budget"]["stopped_early"] is False
    # Cosine over a budget of 2 minutes: the steps start 0, 40 and 80 s into it.
    cosine = options(tmp_path, epochs=2, max_minutes=2, save_every=0, schedule="cosine",
                     output_dir=str(tmp_path / "cosine"))
    assert run(cosine, quiet, lm) == 0
    rows = [json.loads(l) for l in (Path(cosine.output_dir) / "metrics.jsonl").read_text()
            .splitlines()]
    assert ([r["lr"] for r in rows if r["type"] == "step"]
            == pytest.approx([cosine.lr, cosine.lr * 0.75, cosine.lr * 0.25]))


def test_resume_refuses_other_flags_and_a_run_is_not_overwritten(tmp_path, capsys):
    lm = tiny_lm()
    assert run(options(tmp_path), quiet, lm) == 0
    with pytest.raises(UsageError, match="--lr 0.01 there, 0.5 now"):
        validate(options(tmp_path, lr=0.5, resume="yes"))
    with pytest.raises(UsageError, match="holds a run already; add --resume"):
        validate(options(tmp_path))
    validate(options(tmp_path, resume="yes"))


def test_resume_auto_starts_continues_or_refuses(tmp_path, monkeypatch):
    lm = tiny_lm()
    monkeypatch.delenv(RESTARTS, raising=False)
    assert resume_mode(options(tmp_path, resume="auto")).resume == "no"  # nothing there: start
    assert run(options(tmp_path, resume="auto"), quiet, lm) == 0
    folder = Path(options(tmp_path).output_dir)
    assert resume_mode(options(tmp_path, resume="auto")).resume == "yes"  # its checkpoint
    validate(options(tmp_path, resume="auto"))
    with pytest.raises(UsageError, match="--lr 0.01 there, 0.5 now"):
        validate(options(tmp_path, lr=0.5, resume="auto"))
    # A start killed before its first checkpoint left only config.json: the same run starts
    # again, whatever folder that config names (a study's Ray task records it absolute, a
    # rerun here spells it as typed); another run's folder is refused.
    early = tmp_path / "early"
    early.mkdir()
    (early / "config.json").write_bytes((folder / "config.json").read_bytes())
    moved = options(tmp_path, resume="auto", output_dir=str(early))
    assert json.loads((early / "config.json").read_text())["options"]["output_dir"] != str(early)
    assert resume_mode(moved).resume == "no"
    validate(moved)
    # ... and a checkpointed run continues in a folder named another way.
    monkeypatch.chdir(tmp_path)
    validate(options(tmp_path, resume="auto", output_dir="run"))
    with pytest.raises(UsageError, match="--resume auto: .* holds another run"):
        validate(options(tmp_path, resume="auto", output_dir=str(early), seed=7))
    # torchrun restarts every process with the first command: that is --resume auto.
    monkeypatch.setenv(RESTARTS, "1")
    assert resume_mode(options(tmp_path)).resume == "yes"
    monkeypatch.setenv(RESTARTS, "0")
    with pytest.raises(UsageError, match="holds a run already"):
        validate(options(tmp_path))


def test_torchrun_restarts_into_a_shared_store_are_warned_of_at_the_start(tmp_path,
                                                                           monkeypatch):
    """torchrun's default store keeps a killed round's addresses, where a restart fails to
    join: a run that may be restarted into it says so before it trains."""
    def warnings():
        lines = []
        opts = options(tmp_path, output_dir=str(tmp_path / f"run{len(seen)}"))
        Trainer(opts, validate(opts), lambda *a: lines.append(" ".join(map(str, a))), lm)
        return [line for line in lines if line.startswith("warning:")]

    lm, seen = tiny_lm(), []
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    for restarts, shared, warned in (("1", "True", True), ("0", "True", False),
                                     ("1", "False", False)):
        monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", restarts)
        monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", shared)
        seen.append(warnings())
        assert bool(seen[-1]) == warned, (restarts, shared, seen[-1])
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in seen[0][0]


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    lm = tiny_lm()
    opts = options(tmp_path, lr=1e30, max_grad_norm=0, embed_transform="none", epochs=3)
    assert run(opts, quiet, lm) == 1
    err = capsys.readouterr().err
    assert "non-finite at step" in err
    step = int(err.split("non-finite at step ")[1].split()[0])
    state = json.loads((Path(opts.output_dir) / "checkpoints/last/trainer_state.json").read_text())
    assert state["step"] == step - 1


def test_a_run_that_diverges_in_its_first_epoch_is_recorded_as_failed(tmp_path, capsys):
    """Before any epoch ends there is no evaluation, but the run still says it failed (a screen
    reads its trials' status there), and the same folder is not silently trained over."""
    lm = tiny_lm()
    opts = options(tmp_path, lr=1e30, max_grad_norm=0, save_every=0, samples=16, epochs=2)
    assert run(opts, quiet, lm) == 1
    summary = json.loads((Path(opts.output_dir) / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["epochs"] == [] and summary["final"] is None
    assert 1 <= summary["steps"] < 4  # stopped inside epoch 1 (4 batches)
    capsys.readouterr()
    with pytest.raises(UsageError, match="holds a run that failed"):
        validate(opts)


@pytest.mark.parametrize("encoder", ["pool", "kvpress:snapkv"])
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, encoder):
    """Also where a press prunes each example's cache as it is written (on CUDA checkpointing is
    always on): a layer that writes a cache is not recomputed, which would write it twice."""
    grads = []
    for on in (False, True):
        flags = {"compression": 4.0, "keep_question": True} if encoder != "pool" else {}
        t = trainer(tmp_path / str(on), tiny_lm(), gradient_checkpointing=on, encoder=encoder,
                    **flags)
        loss, _ = t.loss(range(4))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in t.params]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def _command(model_dir, out, *extra):
    return [sys.executable, str(ROOT / "latentwire" / "train.py"), "--model_id", str(model_dir),
            "--samples", "24", "--eval_samples", "3", "--batch_size", "4", "--epochs", "2",
            "--save_every", "1", "--max_new_tokens", "3", "--output_dir", str(out), *extra]


def _weights(out):
    return load_file(Path(out) / "checkpoints" / "last" / checkpoint.WEIGHTS)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_resume_after_sigkill_ends_bitwise_identical(tmp_path, tiny_model_dir, precision):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = ["--mixed_precision", precision]
    subprocess.run(_command(tiny_model_dir, tmp_path / "full", *flags), check=True, env=env,
                   capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_command(tiny_model_dir, killed, *flags), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 120
    # Killed in the second epoch, between checkpoints written every step.
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count('"type": "step"') >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists() or json.loads(
        (killed / "summary.json").read_text())["status"] == "running"
    done = subprocess.run(_command(tiny_model_dir, killed, *flags, "--resume"), env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert re.search(r"resumed at step \d+ \(epoch 2, \d+ batches into it\)", done.stdout)
    # The epoch cut by the kill reports the loss of all its steps, as the uninterrupted run does.
    summaries = [json.loads((out / "summary.json").read_text()) for out in (tmp_path / "full", killed)]
    assert ([e["train_loss"] for e in summaries[0]["epochs"]]
            == [e["train_loss"] for e in summaries[1]["epochs"]])
    full, resumed = _weights(tmp_path / "full"), _weights(killed)
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    steps = [json.loads(l)["step"] for l in (killed / "metrics.jsonl").read_text().splitlines()
             if '"type": "step"' in l]
    assert steps == list(range(1, 13))  # no step logged twice, none missing
    config = json.loads((killed / "config.json").read_text())
    assert config["options"]["mixed_precision"] == precision


@pytest.mark.slow
def test_two_processes_under_torchrun_reach_the_weights_of_one(tmp_path, tiny_model_dir):
    torchrun = Path(sys.executable).parent / "torchrun"
    # A budget never reached: the processes agree on it at every step, and it changes nothing;
    # the cosine over its 600 minutes (the processes' mean time) stays at --lr to 1e-8.
    flags = ("--epochs", "1", "--max_minutes", "600", "--schedule", "cosine")
    one = subprocess.run(_command(tiny_model_dir, tmp_path / "one", *flags),
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    cmd = _command(tiny_model_dir, tmp_path / "two", *flags)
    two = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", *cmd[1:]],
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # A budget spent by the first step: both processes stop there together (one going on
    # alone would wait for the other forever), and the run evaluates and ends.
    cmd = _command(tiny_model_dir, tmp_path / "spent", "--epochs", "2", "--max_minutes", "1e-9")
    spent = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", *cmd[1:]],
                           capture_output=True, text=True, timeout=300)
    assert spent.returncode == 0, spent.stderr[-3000:]
    summary = json.loads((tmp_path / "spent" / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["budget"]["stopped_early"]


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_the_run_finishes_as_if_never_killed(
        tmp_path, tiny_model_dir):
    """Elastic training: torchrun --max-restarts 1 starts both processes again with the first
    command after one is SIGKILLed mid-epoch; they continue from checkpoints/last (a restart is
    --resume auto) and reach the weights of an uninterrupted run."""
    torchrun = Path(sys.executable).parent / "torchrun"
    # As the docs tell users: a restart needs a store of its own (pytorch/pytorch#135712).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    one = subprocess.run(_command(tiny_model_dir, tmp_path / "one"), capture_output=True,
                         text=True, env=env)
    assert one.returncode == 0, one.stderr
    out = tmp_path / "elastic"
    cmd = _command(tiny_model_dir, out)
    job = subprocess.Popen([str(torchrun), "--standalone", "--nproc_per_node", "2",
                            "--max-restarts", "1", *cmd[1:]], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and job.poll() is None:  # killed in the second epoch
        if metrics.exists() and metrics.read_text().count('"type": "step"') >= 8:
            break
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True,
                             text=True).stdout.split()
    assert workers and job.poll() is None
    os.kill(int(workers[-1]), signal.SIGKILL)
    _, err = job.communicate(timeout=300)
    assert job.returncode == 0, err[-3000:]
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"
    a, b = _weights(tmp_path / "one"), _weights(out)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()
             if '"type": "step"' in line]
    assert steps == list(range(1, 13))


def test_learning_rate_warms_up_then_follows_its_schedule(tmp_path):
    t = trainer(tmp_path, tiny_lm(), lr=0.1, warmup_steps=2, schedule="cosine", epochs=2)
    total = len(t.batches(0)) * 2  # 3 steps an epoch
    rates = [t.learning_rate(s) for s in range(total)]
    assert rates[:2] == pytest.approx([0.05, 0.1])
    assert rates[2] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(rates[2:], rates[3:]))  # cosine: falling to zero
    assert rates[-1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))
    flat = trainer(tmp_path / "flat", tiny_lm(), lr=0.1)
    assert {flat.learning_rate(s) for s in range(total)} == {0.1}
    # With a budget the cosine runs over its seconds, whatever the step: 0 once it is spent.
    timed = trainer(tmp_path / "timed", tiny_lm(), lr=0.1, schedule="cosine", max_minutes=2)
    assert [timed.learning_rate(5, s) for s in (0, 60, 120, 150)] == pytest.approx(
        [0.1, 0.05, 0.0, 0.0])


def test_the_lm_reader_starts_on_the_vocabularys_distribution_per_dimension(tmp_path):
    t = trainer(tmp_path, tiny_lm(), encoder="lm", samples=40, eval_samples=4)
    items = t.reader.train_items[:CALIBRATION_EXAMPLES]
    with torch.no_grad():
        ((z, _, _),) = t.latents(range(len(items)))
    # Directly: over the calibration spans, each dimension has the vocabulary's mean and spread.
    assert torch.allclose(z.mean(0), t.reader.vocab.mean, atol=1e-4)
    assert torch.allclose(z.std(0), t.reader.vocab.std, rtol=1e-3, atol=1e-5)
    # ... and the calibration is saved: a reloaded compressor gives the same latents.
    again = Compressor(t.spec, t.reader.vocab, t.reader.lm.model)
    again.load_state_dict(t.compressor.state_dict())
    with torch.no_grad():
        z_again, _, _ = again(t.reader.embed_ids([tok for i in items for tok in i.span]),
                              [len(i.span) for i in items])
    assert torch.equal(z, z_again)


@pytest.mark.parametrize("layer", [None, 1])
def test_the_lm_reader_reading_the_span_once_without_a_graph_gives_the_same_states(tmp_path, layer):
    t = trainer(tmp_path, tiny_lm(), encoder="lm", encoder_layer=layer)
    encoder = t.compressor.encoder
    items = t.reader.train_items[:4]
    assert len({len(i.span) for i in items}) > 1  # padding is exercised
    spans = t.reader.embed_ids([tok for i in items for tok in i.span]).float()
    layout = Layout.of([len(i.span) for i in items],
                       t.spec.counts([len(i.span) for i in items]))
    split = encoder._states_after_span(spans, layout)
    split.pow(2).sum().backward()
    split_grad, encoder.slots.grad = encoder.slots.grad, None
    whole = encoder._states_in_one_pass(spans, layout)
    whole.pow(2).sum().backward()
    assert torch.allclose(split, whole, atol=1e-5, rtol=1e-4)
    assert torch.allclose(split_grad, encoder.slots.grad, atol=1e-5, rtol=1e-4)
    assert float(split_grad.abs().sum()) > 0


def test_lora_trains_the_readers_copy_and_the_answering_model_stays_the_original(tmp_path):
    pytest.importorskip("peft")
    lm = tiny_lm()
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    t = trainer(tmp_path, lm, encoder="lm", encoder_lora=2)
    reader = t.compressor.encoder.reader[0]
    assert reader is not lm.model
    adapters = dict(t.compressor.encoder.lora.items())
    assert adapters and all(p.requires_grad for p in adapters.values())
    assert {id(p) for p in adapters.values()} <= {id(p) for p in t.params}
    for step in range(3):  # B starts at zero, so A's gradient is zero until B has moved
        t.step(list(range(4)), step)
    assert all(float(p.grad.abs().sum()) > 0 for p in adapters.values())
    assert any(float(p.detach().abs().sum()) > 0 for k, p in adapters.items() if "lora_B" in k)
    # The answering model: no adapters in it, no gradient, every weight bitwise as it was.
    assert not any("lora" in name for name, _ in lm.model.named_modules())
    assert all(p.grad is None and not p.requires_grad for p in lm.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    # The reader's own base weights are frozen too: only its adapters moved.
    frozen = {k.replace(".base_layer", ""): v for k, v in reader.state_dict().items()
              if "lora_" not in k}
    assert frozen.keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in frozen.items())
    # A checkpoint carries the adapters, not the copy; reloaded, it gives the same latents.
    weights = t.compressor.state_dict()
    assert any(".lora." in k for k in weights)
    assert sum(v.numel() for v in weights.values()) < 0.5 * sum(v.numel() for v in before.values())
    again = Compressor(t.spec, t.reader.vocab, lm.model)
    again.load_state_dict(weights)
    items = t.reader.eval_items[:2]
    spans = t.reader.embed_ids([tok for i in items for tok in i.span]).float()
    t.compressor.eval()
    with torch.no_grad():
        z, _, _ = t.compressor(spans, [len(i.span) for i in items])
        z_again, _, _ = again.eval()(spans, [len(i.span) for i in items])
    assert torch.equal(z, z_again)
    with pytest.raises(UsageError, match="--encoder_lora adapts the reader"):
        validate(options(tmp_path / "pool", encoder="pool", encoder_lora=2))


def test_the_lm_encoder_can_read_out_a_middle_layer(tmp_path):
    lm = tiny_lm()
    last = trainer(tmp_path / "last", lm, encoder="lm")
    middle = trainer(tmp_path / "middle", lm, encoder="lm", encoder_layer=1)
    items = last.reader.eval_items[:2]
    ((z_last, _, _),) = last.latents(range(2), evaluating=True)
    ((z_middle, _, _),) = middle.latents(range(2), evaluating=True)
    assert z_last.shape == z_middle.shape and not torch.allclose(z_last, z_middle)
    loss, _ = middle.loss(range(2))
    loss.backward()
    assert float(middle.compressor.encoder.slots.grad.abs().sum()) > 0
    with pytest.raises(UsageError, match="--encoder_layer must be between 1 and 2"):
        trainer(tmp_path / "bad", lm, encoder="lm", encoder_layer=3)


def test_a_lora_reader_of_a_middle_layer_runs_only_the_layers_up_to_it(tmp_path):
    peft = pytest.importorskip("peft")
    lm = tiny_lm()
    t = trainer(tmp_path, lm, encoder="lm", encoder_layer=1, encoder_lora=2)
    encoder = t.compressor.encoder
    assert len(encoder.reader[0].base_model.layers) == 1 and len(lm.model.model.layers) == 2
    assert encoder.lora and all(k.startswith("model__layers__0__")
                                for k in encoder.lora.keys())
    for step in range(2):  # moves the adapters off their zero start
        t.step(list(range(4)), step)
    items = t.reader.eval_items[:3]
    lengths = [len(i.span) for i in items]
    spans = t.reader.embed_ids([tok for i in items for tok in i.span]).float()
    layout = Layout.of(lengths, t.spec.counts(lengths))
    with torch.no_grad():
        got = encoder.states(spans, layout)
        # Directly: the whole adapted model over each example alone, the state after layer 1.
        whole = copy.deepcopy(lm.model)
        peft.inject_adapter_in_model(peft.LoraConfig(r=2, lora_alpha=2, lora_dropout=0.0), whole)
        whole.load_state_dict({k.replace("__", "."): v for k, v in encoder.lora.items()},
                              strict=False)
        want = []
        for span, m in zip(spans.split(lengths), layout.counts.tolist()):
            row = torch.cat([span, encoder.slots[:m]])[None]
            states = whole.model(inputs_embeds=row, output_hidden_states=True).hidden_states[1]
            want.append(states[0, len(span):])
    assert torch.allclose(got, torch.cat(want), atol=1e-5, rtol=1e-4)


def test_the_lm_reader_reads_spans_of_unlike_lengths_in_groups_as_each_alone(tmp_path):
    lm = tiny_lm()
    encoder = trainer(tmp_path, lm, encoder="lm").compressor.encoder
    lengths = [30, 4, 28, 11, 12, 5]
    layout = Layout.of(lengths, [math.ceil(n / 4) for n in lengths])
    counts = layout.counts.tolist()
    groups = similar_widths([n + m for n, m in zip(lengths, counts)])
    assert sorted(i for g in groups for i in g) == list(range(len(lengths))) and len(groups) > 2
    assert all(len(g) > 1 for g in groups[:2])  # padding inside a group is exercised too
    spans = torch.randn(sum(lengths), lm.model.config.hidden_size,
                        generator=torch.Generator().manual_seed(0))
    got = encoder._states_in_one_pass(spans, layout)
    got.pow(2).sum().backward()
    got_grad, encoder.slots.grad = encoder.slots.grad, None
    # Directly: each example alone, unpadded, through the whole model.
    want = []
    for span, m in zip(spans.split(lengths), counts):
        row = torch.cat([span, encoder.slots[:m]])[None]
        want.append(lm.model.model(inputs_embeds=row).last_hidden_state[0, len(span):])
    want = torch.cat(want)
    want.pow(2).sum().backward()
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert torch.allclose(got_grad, encoder.slots.grad, atol=1e-5, rtol=1e-4)


def test_a_model_reused_by_another_run_is_wrapped_for_recomputation_once():
    model = tiny_lm().model
    recompute_layers(model)
    once = [layer.forward for layer in model.model.layers]
    recompute_layers(model)
    assert [layer.forward for layer in model.model.layers] == once


def test_the_summary_points_other_encoders_at_the_control_and_the_control_at_itself():
    r = {"f1": 0.3, "em": 0.2, "ci": [0.2, 0.4]}
    s = {"transform": {"name": "identity"}, "compression_ratio": 4.0, "final": r,
         "references": {"text": r, "question_only": {"f1": 0.0, "em": 0.0, "ci": [0.0, 0.0]}}}
    assert "Compare with --encoder constant" in render({**s, "encoder": "lm"})
    control = render({**s, "encoder": "constant"})
    assert "This is the control" in control and "Compare with" not in control


@pytest.mark.parametrize("keep_question", [False, True])
def test_the_compression_ratio_counts_the_question_on_both_sides_or_neither(tmp_path, keep_question):
    t = trainer(tmp_path, tiny_lm(), keep_question=keep_question, compression=4)
    result = t.evaluate()
    items = t.reader.eval_items
    counts = t.spec.counts([len(i.span) for i in items])
    q = [len(i.question) for i in items]
    assert (sum(q) > 0) == keep_question
    expected = sum((len(i.span) + n) / (m + n) for i, m, n in zip(items, counts, q)) / len(items)
    assert result["compression_ratio"] == pytest.approx(expected)
    assert result["latents_per_example"] == pytest.approx(sum(counts) / len(items))


def qa_file(path, titles, per_title=4):
    """A .jsonl dataset in the tiny vocabulary: `per_title` questions on each title's context
    (a title's context is the same in every file)."""
    rows = [{"id": f"{t}-{q}", "title": t, "context": f"w{100 + len(t)} w{ord(t[0])} w40 w41 w42",
             "question": f"w{50 + q} w{ord(t[0])}", "answers": [f"w{40 + q % 3}"]}
            for t in titles for q in range(per_title)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_run_takes_over_an_earlier_runs_references_only_when_they_are_its_own(tmp_path):
    lm = tiny_lm()
    lines = []

    def log(*args, **kwargs):
        lines.append(" ".join(map(str, args)))

    first = options(tmp_path / "a", encoder="pool", output_dir=str(tmp_path / "a"))
    assert run(first, quiet, lm) == 0
    # Another encoder and compression, the same model and evaluation examples: taken over.
    same = options(tmp_path, encoder="constant", compression=2.0, output_dir=str(tmp_path / "b"))
    assert run(same, log, lm, references_from=tmp_path / "a") == 0
    assert any(line.startswith("references: those of") for line in lines)
    # ... and they are what the run would have computed itself.
    own = options(tmp_path, encoder="constant", compression=2.0, output_dir=str(tmp_path / "c"))
    assert run(own, quiet, lm) == 0
    refs = [json.loads((tmp_path / n / "references.json").read_text()) for n in "abc"]
    assert refs[0] == refs[1] == refs[2]
    # The vocabulary's statistics in their last digits (as another thread count sums them):
    # the same model, taken over; further off, another model, computed afresh.
    config = tmp_path / "a" / "config.json"
    saved = json.loads(config.read_text())
    for n, factor, taken in [("f", 1 + 1e-9, True), ("g", 1 + 1e-3, False)]:
        vocabulary = {**saved["provenance"]["vocabulary"]}
        vocabulary["mean_rms"] *= factor
        config.write_text(json.dumps({**saved, "provenance": {**saved["provenance"],
                                                              "vocabulary": vocabulary}}))
        lines.clear()
        assert run(options(tmp_path, output_dir=str(tmp_path / n)), log, lm,
                   references_from=tmp_path / "a") == 0
        assert any(line.startswith("references: those of") for line in lines) == taken
    config.write_text(json.dumps(saved))
    # Other evaluation examples, or another answer length: computed afresh.
    for n, changed in [("d", {"eval_samples": 3}), ("e", {"max_new_tokens": 3})]:
        lines.clear()
        other = options(tmp_path, output_dir=str(tmp_path / n), **changed)
        assert run(other, log, lm, references_from=tmp_path / "a") == 0
        assert not any(line.startswith("references: those of") for line in lines)
        assert any(line.startswith("references on") for line in lines)
        # Before the evaluation, which is silent and can be long, a line says what it does.
        held = next(line.split()[2] for line in lines if line.startswith("references on"))
        assert f"evaluating on {held} held-out examples ..." in lines
    # Asked for by the flag, and not this run's: it says what differs, and computes its own.
    lines.clear()
    asked = options(tmp_path, output_dir=str(tmp_path / "h"), max_new_tokens=3,
                    references_from=str(tmp_path / "a"))
    assert run(asked, log, lm) == 0
    assert any("are not this run's (max_new_tokens differ)" in line for line in lines)
    assert any(line.startswith("references on") for line in lines)
    # ... and when they are, taken over with no folder passed in by a study.
    lines.clear()
    assert run(options(tmp_path, output_dir=str(tmp_path / "i"),
                       references_from=str(tmp_path / "a")), log, lm) == 0
    assert any(line.startswith("references: those of") for line in lines)


def test_eval_dataset_evaluates_on_another_dataset_drawn_across_its_articles(tmp_path):
    lm = tiny_lm()
    train = qa_file(tmp_path / "train.jsonl", ["alpha", "beta", "gamma"])
    held = qa_file(tmp_path / "held.jsonl", ["delta", "epsilon", "zeta"])
    opts = options(tmp_path, dataset=train, eval_dataset=held, samples=8, eval_samples=6)
    assert run(opts, quiet, lm) == 0
    out = Path(opts.output_dir)
    split = json.loads((out / "summary.json").read_text())["split"]
    assert split["shared_groups"] == 0 and split["shared_contexts"] == 0
    assert (split["train_examples"], split["eval_examples"]) == (8, 6)
    evaluated = data.load_all(str(out / "eval_split.jsonl"))
    assert {e.id for e in evaluated} <= {e.id for e in data.load_all(held)}
    # Six questions over three articles (seeded), not the first article whole.
    assert len({e.group for e in evaluated}) > 1
    assert [e.id for e in evaluated] == [e.id for e in data.sample(data.load_all(held), 6, 42)]
    config = json.loads((out / "config.json").read_text())
    assert config["provenance"]["dataset"]["eval_spec"] == held


def test_eval_dataset_that_shares_an_article_or_a_context_is_refused(tmp_path):
    train = qa_file(tmp_path / "train.jsonl", ["alpha", "beta", "gamma"])
    overlap = qa_file(tmp_path / "overlap.jsonl", ["gamma", "delta"])
    with pytest.raises(UsageError, match=r"shares 1 article\(s\) \(e.g. 'gamma'\)"):
        data.split_apart(data.load_all(train), data.load_all(overlap), 8, 4, 42)
    renamed = tmp_path / "renamed.jsonl"  # the same paragraphs under other titles
    renamed.write_text(Path(train).read_text().replace('"title": "', '"title": "other-'))
    with pytest.raises(UsageError, match=r"0 article\(s\) and 3 context\(s\)"):
        data.split_apart(data.load_all(train), data.load_all(str(renamed)), 8, 4, 42)
    # From the command: one line, exit 2, before the model (here, none) is loaded.
    r = subprocess.run([sys.executable, str(ROOT / "latentwire" / "train.py"), "--model_id",
                        unloadable_model(tmp_path / "m"), "--dataset", train, "--eval_dataset", overlap,
                        "--samples", "8", "--batch_size", "4", "--output_dir",
                        str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith("error: --eval_dataset shares 1 article")
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.slow
def test_bf16_autocast_runs_the_graph_in_bf16_and_a_process_keeps_one_precision(
        tmp_path, tiny_model_dir):
    """The same first step in fp32 and under bf16 autocast (each a process: accelerate keeps one
    precision per process): the losses differ by bf16's rounding, not more."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    losses = {}
    for precision in ("no", "bf16"):
        out = tmp_path / precision
        subprocess.run(_command(tiny_model_dir, out, "--mixed_precision", precision, "--epochs",
                                "1"), check=True, env=env, capture_output=True)
        first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        losses[precision] = first["loss"]
    assert losses["no"] != losses["bf16"]
    assert losses["bf16"] == pytest.approx(losses["no"], rel=0.05)
    # In this process the tests train in fp32; asked for bf16, it says so in one line.
    assert run(options(tmp_path / "fp32"), quiet, tiny_lm()) == 0
    with pytest.raises(UsageError, match="this process has trained at another precision"):
        run(options(tmp_path / "bf16", mixed_precision="bf16"), quiet, tiny_lm())
