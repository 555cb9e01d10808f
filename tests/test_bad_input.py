"""The front door: every bad input, across the six commands, is refused before any work with one
line on stderr that says what is wrong and what to do, exit code 2, no traceback, and nothing
written. Run in-process (a refusal loads no model), so the whole table takes seconds."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

B = "bundled:SmolLM2-135M-Instruct"

# (command line, a fragment the one line must hold). Relative paths are inside the test's own
# folder, which holds fake.gguf (text, not GGUF), emptymodel/ (no config.json), datadir/, a
# file named blocker and a corrupt summary.json.
CASES = [
    # sweep
    (["sweep", "--model_id", f"{B},fake.gguf"], "not a GGUF file"),
    (["sweep", "--model_id", "fake.gguf"], "not a GGUF file"),
    (["sweep", "--experiment", ""], "--experiment is empty"),
    (["sweep", "--experiment", ","], "--experiment is empty"),
    (["sweep", "--model_id", f"{B},{B}"], f"--model_id names {B} twice"),
    (["sweep", "--model_id", f"{B},/nonexistent/b.gguf"], "'/nonexistent/b.gguf' (--model_id) does not exist"),
    (["sweep", "--model_id", "/nonexistent/model"], "model folder '/nonexistent/model' (--model_id) does not exist"),
    (["sweep", "--model_id", "bundled:Nope"], f"the bundled model is {B}"),
    (["sweep", "--model_id", "emptymodel"], "holds no model (no config.json)"),
    (["sweep", "--model_id", ""], "--model_id is empty"),
    (["sweep", "--model_id", f"{B},"], "has an empty name between its commas"),
    (["sweep", "--dataset", "datadir"], "dataset datadir is a folder"),
    (["sweep", "--dataset", "missing.json"], "does not exist"),
    (["sweep", "--dataset", "/dev/null"], "/dev/null is not a regular file"),
    (["sweep", "--batch_tokens", "0"], "--batch_tokens must be at least 1"),
    (["sweep", "--samples", "0"], "--samples must be at least 1"),
    (["sweep", "--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
    (["sweep", "--source", "txet"], "unknown source 'txet'"),
    (["sweep", "--experiment", "rms_scale1"], "did you mean"),
    (["sweep", "--experiment", "zzz*"], "`latentwire list` shows every name"),
    (["sweep", "--grid", "huge"], "invalid choice: 'huge'"),
    (["sweep", "--samples", "many"], "--samples: invalid int value"),
    (["sweep", "--ray_cpus_per_worker", "2"], "need --ray"),
    (["sweep", "--output_dir", "blocker/sub"], "cannot write to output dir"),
    (["sweep", "--force", "maybe"], "--force: takes yes or no"),
    # list and analyze
    (["list", "--grid", "huge"], "invalid choice: 'huge'"),
    (["list", "--verbose"], "unrecognized arguments: --verbose"),
    (["analyze"], "the following arguments are required: --summary"),
    (["analyze", "--summary", "nowhere/summary.json"], "does not exist"),
    (["analyze", "--summary", "/dev/null"], "/dev/null is not a regular file"),
    (["analyze", "--summary", "summary.json"], "not valid JSON"),
    (["analyze", "--summary", "datadir"], "folder datadir holds no summary.json"),
    # train
    (["train", "--model_id", f"{B},fake.gguf"], "not a GGUF file"),
    (["train", "--model_id", f"{B},{B}"], "twice"),
    (["train", "--model_id", f"{B},,{B}"], "has an empty name between its commas"),
    (["train", "--by_paragraph", "--grad_accum_steps", "2"], "--grad_accum_steps 2 cannot apply: pass --grad_accum_steps 1"),
    (["train", "--model_id", "/nonexistent/model"], "does not exist"),
    (["train", "--encoder_model", "/nonexistent/m"], "(--encoder_model) does not exist"),
    (["train", "--model_id", f"{B},nowhere/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"],
     "does not exist; `make second-model` assembles it"),
    (["train", "--resume", "yes", "--output_dir", "never/made"], "holds no checkpoint to resume"),
    (["train", "--compression", "abc"], "--compression: invalid float value: 'abc'"),
    (["train", "--resume", "maybe"], "--resume: invalid choice: 'maybe'"),
    (["train", "--references_from", "datadir"], "datadir holds no references.json"),
    (["train", "--references_from", ""], "--references_from is empty"),
    (["train", "--encoder", "kvpress:learned", "--press_from", "datadir"],
     "datadir holds no run (no config.json)"),
    (["train", "--press_from", "datadir"], "--press_from applies to an encoder whose press is fitted"),
    (["train", "--press_from", ""], "--press_from is empty"),
    (["train", "--press_samples", "600"], "--press_samples applies to an encoder whose press"),
    (["train", "--encoder", "kvpress:learned", "--press_samples", "-1"],
     "--press_samples must be >= 0"),
    (["train", "--compression", "0"], "--compression must be at least 1"),
    (["train", "--batch_size", "0"], "--batch_size must be at least 1"),
    (["train", "--encoder", "mlp"], "--encoder: invalid choice: 'mlp'"),
    (["train", "--lr", "-1"], "--lr must be a positive number"),
    (["train", "--dataset", "datadir"], "is a folder"),
    (["train", "--encoder_lora", "8"], "--encoder_lora adapts the reader of --encoder lm"),
    (["train", "--encoder", "kvpress:learned", "--keep_question", "--kd_weight", "1"],
     "trains nothing by gradient"),
    (["train", "--encoder", "lm", "--encoder_layer", "99"], "--encoder_layer must be between 1 and 30"),
    (["train", "--report_to", "nowhere"], "nowhere"),
    (["train", "--samples", "4", "--batch_size", "8"], "smaller than --batch_size"),
    (["train", "--config", "missing.yaml"], "cannot read --config missing.yaml"),
    (["screen", "--config", "", "--experiment", "baseline"], "cannot read --config"),
    (["train", "--config", "broken.yaml"], "--config broken.yaml is not valid YAML"),
    (["train", "--config", "unknown.yaml"], "'lrr' is not an option of `latentwire train`"),
    (["train", "--config", "typed.yaml"], "samples takes int (got 'many')"),
    (["train", "--config", "blank.yaml"], "answer_kept is empty; give it a bool"),
    (["study", "--config", "blank.yaml"], "answer_kept is empty; give it a bool"),
    (["train", "--config", "choice.yaml"], "encoder 'mlp' is not one of"),
    (["train", "--config", "listed.yaml"], "must map option names to values"),
    (["train", "--config", "small.yaml"], "smaller than --batch_size"),
    (["train", "--config", "twice.yaml"], "names lr more than once"),
    (["train", "--config", "twice.json"], "names lr more than once"),
    # study
    (["study", "--compressions", "0"], "--compressions must each be at least 1"),
    (["study", "--compressions", "abc"], "--compressions takes numbers"),
    (["study", "--encoders", "mlp"], "unknown encoder 'mlp'"),
    (["study", "--settings", "both"], "unknown setting 'both'"),
    (["study", "--encoders", ""], "--encoders is empty"),
    (["study", "--encoders", "pool", "--press_samples", "600"],
     "none of --encoders pool is one"),
    (["study", "--only", "aware/zzz_x4"], "unknown cell 'aware/zzz_x4'"),
    (["study", "--model_id", "fake.gguf"], "not a GGUF file"),
    # screen
    (["screen"], "the following arguments are required: --experiment"),
    (["screen", "--experiment", ""], "--experiment is empty"),
    (["screen", "--experiment", "zzz*"], "`latentwire list` shows every name"),
    (["screen", "--experiment", "baseline", "--max_epochs", "0"], "--max_epochs must be at least 1"),
    (["screen", "--experiment", "baseline", "--reduction_factor", "1"], "--reduction_factor must be above 1"),
    # the command itself
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: COMMAND"),
]


def tree(folder: Path) -> set:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture
def door(tmp_path, monkeypatch):
    """A folder with the bad files the cases name, as the current directory."""
    (tmp_path / "fake.gguf").write_text("not a model\n")
    (tmp_path / "emptymodel").mkdir()
    (tmp_path / "datadir").mkdir()
    (tmp_path / "blocker").write_text("a file where a folder should be\n")
    (tmp_path / "summary.json").write_text('{"results": [')
    for name, text in {"broken": "encoder: [pool,\n", "unknown": "lrr: 0.1\n",
                       "typed": "samples: many\n", "blank": "answer_kept:\n", "choice": "encoder: mlp\n",
                       "listed": "- encoder\n", "small": "samples: 4\nbatch_size: 8\n"}.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    (tmp_path / "twice.yaml").write_text("lr: 0.1\nsamples: 8\nlr: 0.2\n")
    (tmp_path / "twice.json").write_text('{"lr": 0.1, "lr": 0.2}')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LATENTWIRE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MODEL_ID", raising=False)
    return tmp_path


@pytest.mark.parametrize("argv,fragment", CASES, ids=[" ".join(a) or "(none)" for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(door, capsys, argv, fragment):
    from latentwire.cli import main

    before = tree(door)
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own refusals
        code = stop.code
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err and out == ""
    assert tree(door) == before  # no folder made, no file written


def test_there_are_at_least_forty_cases_across_the_six_commands():
    assert len(CASES) >= 40
    assert {a[0] for a, _ in CASES if a} >= {"sweep", "list", "analyze", "train", "study", "screen"}


def test_the_seed_script_names_the_variable_the_user_set(tmp_path):
    env = {**os.environ, "MODEL_ID": "/nonexistent/model", "OUTPUT_DIR": str(tmp_path / "out"),
           "PYTHONPATH": str(ROOT), "PYTHON": sys.executable}
    r = subprocess.run(["bash", "scripts/run_embed_sweep_simple.sh"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "'/nonexistent/model' (MODEL_ID) does not exist" in r.stderr
    assert not (tmp_path / "out").exists()


def test_help_refusals_and_the_analysis_import_neither_torch_nor_transformers(tmp_path):
    """--help answers in a fraction of a second because the command parses before it imports
    the libraries that run the work; the same holds for a refusal of a bad flag value, and the
    analysis of a summary (its next command included) needs neither."""
    summary = tmp_path / "summary.json"
    summary.write_text('{"results": [{"experiment": "baseline", "f1": 0.3, "em": 0.1}, '
                       '{"experiment": "rms_scale1.0", "f1": 0.5, "em": 0.2, '
                       '"config": {"target_scale": 1.0}}]}')
    code = ("import sys, contextlib, io\n"
            "from latentwire.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['study', '--help'], "
            "['screen', '--help'], ['sweep', '--help'], ['train', '--compression', 'abc'], "
            f"['analyze', '--summary', {str(summary)!r}, '--no_plots']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            "        try: main(argv)\n"
            "        except SystemExit: pass\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_a_yes_no_flag_is_on_off_and_takes_yes_or_no():
    from latentwire.cli import parser
    from latentwire.options import from_args
    from latentwire.training.options import TrainOptions

    def parsed(*words):
        return from_args(TrainOptions, parser().parse_args(["train", *words])).keep_question

    assert parsed() is False and parsed("--keep_question") is True
    assert parsed("--keep_question", "no") is False and parsed("--keep-question", "yes") is True
    assert parsed("--keep_question", "--no_keep_question") is False
    assert parsed("--no-keep-question") is False


def test_a_reader_that_goes_away_gets_no_traceback():
    """`latentwire list | head -1`: the pipe closes under the command, which stops quietly."""
    code = "from latentwire.cli import console; console()"
    proc = subprocess.Popen([sys.executable, "-c", code, "list", "--grid", "full"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    proc.stdout.close()  # before the command has written a line
    _, err = proc.communicate(timeout=60)
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err
