"""Bad input: one line on stderr, exit code 2, no traceback, and before any model is loaded."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT


def cli(*args, cwd=ROOT, timeout=120):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "latentwire.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_usage_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_unknown_experiment_lists_names_and_suggests(tmp_path):
    r = cli("sweep", "--experiment", "rms_scale1", "--output_dir", str(tmp_path))
    assert_usage_error(r, "unknown experiment 'rms_scale1'", "did you mean", "valid names:")


def test_unknown_source(tmp_path):
    assert_usage_error(cli("sweep", "--source", "txet", "--output_dir", str(tmp_path)),
                       "unknown source 'txet'")


def test_missing_dataset_file(tmp_path):
    assert_usage_error(cli("sweep", "--dataset", "nope/missing.json", "--output_dir", str(tmp_path)),
                       "nope/missing.json", "does not exist")


def test_malformed_dataset_file_fails_before_the_model_loads(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    r = cli("sweep", "--dataset", str(bad), "--output_dir", str(tmp_path / "out"))
    assert_usage_error(r, str(bad), "not valid JSON")
    assert not (tmp_path / "out").exists()


def test_empty_dataset(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert_usage_error(cli("sweep", "--dataset", str(empty), "--output_dir", str(tmp_path / "o")),
                       "holds no answerable questions")


@pytest.mark.parametrize("n", ["0", "-3"])
def test_samples_must_be_positive(tmp_path, n):
    assert_usage_error(cli("sweep", "--samples", n, "--output_dir", str(tmp_path)),
                       "--samples must be at least 1")


def test_a_model_folder_that_does_not_exist_is_refused_before_any_load(tmp_path):
    missing = tmp_path / "no-such-model"
    r = cli("sweep", "--model_id", str(missing), "--experiment", "baseline", "--samples", "1",
            "--output_dir", str(tmp_path / "out"))
    assert_usage_error(r, f"model folder '{missing}' (--model_id) does not exist")


def test_a_hub_id_that_cannot_be_loaded_offline_says_so(tmp_path):
    r = cli("sweep", "--model_id", "nobody/no-such-model", "--experiment", "baseline",
            "--samples", "1", "--output_dir", str(tmp_path / "out"))
    assert_usage_error(r, "could not load model 'nobody/no-such-model'", "offline", "--model_id")


def test_output_dir_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_usage_error(cli("sweep", "--output_dir", str(blocker / "sub")),
                       "cannot write to output dir")


def test_ray_worker_flags_need_ray(tmp_path):
    assert_usage_error(cli("sweep", "--ray_cpus_per_worker", "2", "--output_dir", str(tmp_path)),
                       "need --ray")


def test_analysis_of_missing_or_corrupt_summary(tmp_path):
    assert_usage_error(cli("analyze", "--summary", str(tmp_path / "summary.json")),
                       "does not exist")
    corrupt = tmp_path / "summary.json"
    corrupt.write_text('{"results": [')
    assert_usage_error(cli("analyze", "--summary", str(corrupt)), "not valid JSON")


def test_experiment_list_and_help():
    r = cli("sweep", "--experiment", "list")
    assert r.returncode == 0 and "28 experiments" in r.stdout and "codebook_1024_t1.0" in r.stdout
    r = cli("list")
    assert r.returncode == 0 and "mismatch" in r.stdout and "squad_v2" in r.stdout
    assert "constant" in r.stdout and "learned-prefix control" in r.stdout
    r = cli("--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "analyze" in r.stdout
    assert "train" in r.stdout and "study" in r.stdout
    r = subprocess.run([sys.executable, "latentwire/train.py", "--help"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0 and "--embed_transform" in r.stdout and "--resume" in r.stdout


def test_seed_scripts_are_thin_wrappers(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "scripts/run_embed_sweep_simple.py", "--experiment", "list"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "nearest_k10_a0.9" in r.stdout
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"results": [{"experiment": "baseline", "f1": 0.3, "em": 0.1}]}))
    r = subprocess.run([sys.executable, str(ROOT / "scripts/analyze_sweep_results.py"), "--summary",
                        str(summary), "--no-plots"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "TOP 5 PERFORMERS" in r.stdout


@pytest.mark.parametrize("command", ["sweep", "list", "analyze", "train", "study", "screen"])
def test_every_flag_shows_the_default_its_field_declares(command, monkeypatch, capsys):
    from latentwire.cli import COMMANDS, main

    monkeypatch.setenv("COLUMNS", "250")  # each option and its help on one line
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    entries, entry = {}, None  # each option's lines: its flags, then its help
    for line in out.splitlines():
        if line.startswith("  -"):
            entry = entries.setdefault(line.split()[0].rstrip(","), [])
        elif not line.startswith("    "):
            entry = None
        if entry is not None:
            entry.append(line.strip())
    options = COMMANDS[command].options()
    assert options
    for f in options:
        text = " ".join(entries.get(f"--{f.name}", []))
        assert text, f"--{f.name} missing from `latentwire {command} --help`"
        if f.default is dataclasses.MISSING or f.metadata.get("required"):
            assert "(required)" in text and "(default" not in text, text
        elif isinstance(f.default, bool):
            assert text.startswith(f"--{f.name} / --no_{f.name} "), text
            assert f"(default: {'on' if f.default else 'off'})" in text, text
        elif f.default in (None, ""):
            assert "(default" not in text, text
        else:
            shown = f"{f.default:g}" if isinstance(f.default, float) else f.default
            assert text.endswith(f"(default: {shown})") and text.count("(default") == 1, text
    # No Python in the tool's words, and each flag once.
    assert "None" not in out and "[FORCE]" not in out.upper() and "--no-" not in out


def test_the_command_reference_in_the_docs_is_the_parsers_own():
    r = subprocess.run([sys.executable, "scripts/cli_reference.py", "--check"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_analyze_takes_a_sweeps_folder_as_well_as_its_summary(tmp_path, capsys):
    from latentwire.cli import main

    (tmp_path / "summary.json").write_text(json.dumps(
        {"results": [{"experiment": "baseline", "f1": 0.3, "em": 0.1}]}))
    assert main(["analyze", "--summary", str(tmp_path)]) == 0
    assert "TOP 5 PERFORMERS" in capsys.readouterr().out
    assert (tmp_path / "report.html").is_file()  # beside the summary, not above its folder


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_a_recipe_sets_the_options_and_the_command_line_overrides_it(tmp_path, suffix):
    from latentwire.cli import parse
    from latentwire.options import from_args
    from latentwire.training.options import TrainOptions

    recipe = {"encoder": "lm", "encoder_lora": 8, "compression": 4, "keep_question": True,
              "lr": 0.0003, "samples": 600}
    path = tmp_path / f"recipe.{suffix}"
    path.write_text(json.dumps(recipe) if suffix == "json"
                    else "".join(f"{k}: {str(v).lower() if v is True else v}\n"
                                 for k, v in recipe.items()))
    opts = from_args(TrainOptions, parse(["train", "--config", str(path), "--samples", "40",
                                          "--no_keep_question"]))
    assert (opts.encoder, opts.encoder_lora, opts.compression, opts.lr) == ("lm", 8, 4.0, 0.0003)
    assert isinstance(opts.compression, float)
    assert (opts.samples, opts.keep_question) == (40, False)  # the command line's
    assert from_args(TrainOptions, parse(["train"])) == TrainOptions()


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs/squad").glob("*.yaml")
                                           if not p.name.startswith("study")))
def test_every_training_recipe_of_record_is_a_valid_run(recipe, tmp_path, tiny_qwen_other_dir):
    """Each recipe file's options are train's and pass its checks (its data replaced by the
    built-in set, which is here offline, and a model file not installed here, the second
    family of scripts/install_second_model.py, by a tiny model of another family)."""
    from latentwire.cli import parse
    from latentwire.options import from_args
    from latentwire.training.options import TrainOptions, validate

    opts = from_args(TrainOptions, parse(["train", "--config", str(ROOT / "configs/squad" / recipe)]))
    assert opts.eval_dataset == "runs/data/squad-held.json"
    models = ",".join(m if not m.endswith(".gguf") or os.path.exists(m) else str(tiny_qwen_other_dir)
                      for m in opts.model_ids())
    validate(dataclasses.replace(opts, dataset="builtin", eval_dataset=None, model_id=models,
                                 output_dir=str(tmp_path / "run")))


def test_a_training_recipe_sets_the_options_every_screen_trial_trains_with():
    from latentwire.cli import parse
    from latentwire.options import from_args
    from latentwire.training.options import ScreenOptions, TrainOptions

    args = parse(["screen", "--config", str(ROOT / "configs/squad/aware-4x.yaml"), "--experiment",
                  "baseline,rms_scale1.0", "--samples", "400", "--verify"])
    opts = from_args(ScreenOptions, args, base=from_args(TrainOptions, args))
    assert (opts.base.encoder, opts.base.encoder_layer, opts.base.compression,
            opts.base.samples) == ("offset:sentences:once", 8, 4.0, 400)
    assert opts.verify and opts.experiment == "baseline,rms_scale1.0"


def test_a_study_recipe_sets_the_grid_and_every_cells_training_options(tmp_path, capsys):
    """`study --config`: the grid's options and the training options its cells share; a cell's
    own option (the encoder) is the grid's, refused in a study recipe in one line."""
    from latentwire.cli import main, parse
    from latentwire.options import from_args
    from latentwire.training.options import StudyOptions, TrainOptions

    path = tmp_path / "study.yaml"
    path.write_text("encoders: offset:sentences:once,sentences\ncompressions: 4,16\n"
                    "settings: aware\nencoder_layer: 8\nsamples: 2400\n")
    args = parse(["study", "--config", str(path), "--compressions", "4"])
    opts = from_args(StudyOptions, args, base=from_args(TrainOptions, args))
    assert (opts.encoders, opts.compressions, opts.settings) == (
        "offset:sentences:once,sentences", "4", "aware")
    assert (opts.base.encoder_layer, opts.base.samples) == (8, 2400)
    path.write_text("encoder: lm\n")
    assert main(["study", "--config", str(path), "--output_dir", str(tmp_path / "s")]) == 2
    assert "'encoder' is not an option of `latentwire study`" in capsys.readouterr().err
