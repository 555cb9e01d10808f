"""The compression study on a tiny model: its grid with the controls, one table and plot, a
rerun that keeps what is done, and the same on a local Ray (2 CPUs, started for the tests that
ask for it), where the cells are Ray tasks."""

import json
import logging
import sys
from dataclasses import replace

import pytest
import torch

from latentwire import stats
from latentwire.training import study
from latentwire.cli import main
from latentwire.errors import UsageError
from latentwire.training.options import TrainOptions, validate

from .conftest import ROOT
from .ray_hooks import F1_SCRIPT


def test_grid_always_holds_the_controls():
    opts = study.StudyOptions(encoders="attn", compressions="4,8", settings="aware")
    names = [c.name for c in study.cells(opts)]
    assert names == ["aware/attn_x4", "aware/attn_x8", "aware/constant_x4", "aware/constant_x8",
                     "aware/pool_x1"]
    # Nothing trained: no learned-prefix control, the uncompressed reference still.
    zero_shot = study.StudyOptions(encoders="truncate", compressions="4", settings="aware",
                                   base=TrainOptions(samples=0))
    assert [c.name for c in study.cells(zero_shot)] == ["aware/truncate_x4", "aware/pool_x1"]
    # A compressor that never reads the question has one cell for both settings (the
    # agnostic one); one that needs it, only the aware one; a press that reads it where it may,
    # both.
    both = study.StudyOptions(encoders="truncate,sentences,kvpress:snapkv", compressions="4",
                              settings="aware,agnostic", base=TrainOptions(samples=0))
    assert [c.name for c in study.cells(both)] == [
        "aware/sentences_x4", "aware/kvpress:snapkv_x4", "aware/pool_x1",
        "agnostic/truncate_x4", "agnostic/kvpress:snapkv_x4", "agnostic/pool_x1"]
    assert "aware/truncate_x4" in [c.name for c in study.cells(replace(both, settings="aware"))]
    with pytest.raises(UsageError, match="unknown encoder 'mlp'"):
        study.cells(study.StudyOptions(encoders="mlp"))
    with pytest.raises(UsageError, match="unknown setting"):
        study.cells(study.StudyOptions(settings="aware,both"))


def test_the_readers_options_go_to_the_lm_cells_only(tmp_path):
    opts = study.StudyOptions(encoders="lm", compressions="4", settings="agnostic",
                              output_dir=str(tmp_path),
                              base=TrainOptions(encoder_lora=8, encoder_layer=15))
    cells = {c.encoder: study._options(opts, c, False) for c in study.cells(opts)}
    assert (cells["lm"].encoder_lora, cells["lm"].encoder_layer) == (8, 15)
    for control in ("constant", "pool"):
        assert (cells[control].encoder_lora, cells[control].encoder_layer) == (0, None)
        validate(cells[control])  # refused before: --encoder_lora on an encoder with no reader


def test_answer_kept_cuts_the_cells_that_keep_tokens_and_no_other(tmp_path):
    opts = study.StudyOptions(encoders="offset:truncate,truncate,kvpress:knorm", compressions="4",
                              settings="agnostic", output_dir=str(tmp_path),
                              base=TrainOptions(answer_kept=True))
    cells = {c.encoder: study._options(opts, c, False) for c in study.cells(opts)}
    assert {e for e, o in cells.items() if o.answer_kept} == {"offset:truncate", "truncate"}
    for o in cells.values():
        validate(o)  # the controls and the press would be refused with the cut
    with pytest.raises(UsageError, match="none of --encoders kvpress:knorm does"):
        study.cells(replace(opts, encoders="kvpress:knorm"))


def test_press_samples_sets_the_fit_of_the_fitted_cells_and_no_other(tmp_path):
    opts = study.StudyOptions(encoders="offset:kvpress:learned,kvpress:knorm", compressions="4",
                              settings="agnostic", output_dir=str(tmp_path),
                              base=TrainOptions(press_samples=600))
    cells = {c.encoder: study._options(opts, c, False) for c in study.cells(opts)}
    assert {e for e, o in cells.items() if o.press_samples} == {"offset:kvpress:learned"}
    for o in cells.values():
        validate(o)  # the controls and the other press would be refused with the count


def test_the_study_recipe_trains_each_recipe_of_record_as_its_cell():
    """configs/squad/study-4x.yaml reproduces the table of docs/results/learned.md: its cells
    for the two recipes of record train exactly as `train --config` with those recipes, so a
    finished `train` run is the study's cell and a study's cell is the recipe's row."""
    from latentwire.cli import parse
    from latentwire.options import from_args
    from latentwire.training.options import StudyOptions

    def same(o):
        return {k: v for k, v in o.identity().items() if k != "output_dir"}

    def recipe_cells(name):
        args = parse(["study", "--config", str(ROOT / "configs/squad" / name)])
        opts = from_args(StudyOptions, args, base=from_args(TrainOptions, args))
        return {c.name: study._options(opts, c, False) for c in study.cells(opts)}

    cells = recipe_cells("study-4x.yaml")
    assert set(cells) == {"aware/offset:sentences:once_x4", "aware/sentences_x4",
                          "aware/constant_x4", "aware/pool_x1", "agnostic/offset:truncate_x4",
                          "agnostic/truncate_x4", "agnostic/constant_x4", "agnostic/pool_x1"}
    for cell, recipe in (("aware/offset:sentences:once_x4", "aware-4x.yaml"),
                         ("agnostic/offset:truncate_x4", "agnostic-4x.yaml")):
        trained = from_args(TrainOptions, parse(
            ["train", "--config", str(ROOT / "configs/squad" / recipe)]))
        assert same(cells[cell]) == same(trained), recipe
    # The query-agnostic study trained only where the answer was kept: its recipe cell is
    # agnostic-kept-4x.yaml's run, and its truncate cell the same cut through the adapter.
    cells = recipe_cells("study-agnostic-kept-4x.yaml")
    trained = from_args(TrainOptions, parse(
        ["train", "--config", str(ROOT / "configs/squad/agnostic-kept-4x.yaml")]))
    assert same(cells["agnostic/offset:truncate_x4"]) == same(trained)
    assert [n for n, o in cells.items() if o.answer_kept] == ["agnostic/offset:truncate_x4",
                                                              "agnostic/truncate_x4"]
    # Qwen's query-agnostic study: its recipe cell is agnostic-offset-learned-press-4x.yaml's run
    # on Qwen, which the study's file names.
    cells = recipe_cells("study-qwen-agnostic-4x.yaml")
    assert set(cells) == {"agnostic/offset:kvpress:learned_x4",
                          "agnostic/kvpress:expected_attention_x4", "agnostic/constant_x4",
                          "agnostic/pool_x1"}
    qwen = ["--model_id", "models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"]
    trained = from_args(TrainOptions, parse(
        ["train", "--config", str(ROOT / "configs/squad/agnostic-offset-learned-press-4x.yaml")]
        + qwen))
    assert same(cells["agnostic/offset:kvpress:learned_x4"]) == same(trained)
    # Qwen's query-aware study: study-4x.yaml's aware half, its recipe cell aware-4x.yaml's run.
    cells = recipe_cells("study-qwen-aware-4x.yaml")
    assert set(cells) == {"aware/offset:sentences:once_x4", "aware/sentences_x4",
                          "aware/constant_x4", "aware/pool_x1"}
    trained = from_args(TrainOptions, parse(
        ["train", "--config", str(ROOT / "configs/squad/aware-4x.yaml")] + qwen))
    assert same(cells["aware/offset:sentences:once_x4"]) == same(trained)


def test_a_study_writes_its_table_and_plot_and_a_rerun_keeps_every_run(tmp_path, tiny_model_dir,
                                                                       capsys):
    args = ["study", "--model_id", str(tiny_model_dir), "--encoders", "pool",
            "--compressions", "1,4", "--settings", "aware,agnostic", "--samples", "8",
            "--eval_samples", "3", "--batch_size", "4", "--max_new_tokens", "3",
            "--output_dir", str(tmp_path)]
    assert main(args) == 0
    rows = json.loads((tmp_path / "study.json").read_text())["rows"]
    assert [(r["setting"], r["encoder"], r["compression"]) for r in rows] == [
        ("aware", "pool", 1.0), ("aware", "pool", 4.0), ("aware", "constant", 1.0),
        ("aware", "constant", 4.0), ("agnostic", "pool", 1.0), ("agnostic", "pool", 4.0),
        ("agnostic", "constant", 1.0), ("agnostic", "constant", 4.0)]
    # The uncompressed trained reference is its own 100% (undefined when it scores nothing).
    expected_share = pytest.approx(1.0) if rows[0]["f1"] > 0 else None
    assert rows[0]["share_of_uncompressed"] == expected_share
    assert [r["vs_constant"] is None for r in rows] == [False, False, True, True] * 2
    assert rows[1]["measured_compression"] > 3
    assert (tmp_path / "plots" / "study.png").stat().st_size > 0
    assert "| aware | pool |" in (tmp_path / "study.md").read_text()
    # The first cell computes the references; every other cell takes over the same ones.
    assert capsys.readouterr().out.count("references: those of") == 7
    refs = {p.read_text() for p in tmp_path.glob("*/*/references.json")}
    assert len(refs) == 1
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.count("kept from an earlier run") == 8
    # Other flags would train other cells: the finished ones are not passed off as theirs.
    assert main([*args, "--lr", "0.01"]) == 2
    assert "aware/pool_x1 made with other flags (--lr 0.001 there, 0.01 now)" in capsys.readouterr().err


def _write_cells(root, f1s: dict, eval_seconds: float = 2.0) -> None:
    """Finished cells by hand: each one's per-question F1s, its evaluation's seconds."""
    for name, scores in f1s.items():
        run = root / name
        (run / "eval").mkdir(parents=True)
        mean = sum(scores) / len(scores)
        (run / "eval" / "epoch1.json").write_text(json.dumps(
            {"predictions": [{"f1": f} for f in scores]}))
        (run / "summary.json").write_text(json.dumps({
            "status": "finished", "epochs": [{"epoch": 1, "eval_seconds": eval_seconds}],
            "compression_ratio": 1.0, "split": {"eval_examples": len(scores)},
            "final": {"f1": mean, "em": mean, "ci": [mean, mean]}, "train_seconds": 1.0,
            "references": {"text": {"f1": 0.9}, "question_only": {"f1": 0.1}}}))


def test_the_table_sets_each_row_against_the_best_training_free_compressor(tmp_path):
    """The best training-free compressor is the one with the highest F1 at the same setting
    and compression; every other row's paired difference is against it, computed here
    directly, and each row's seconds per answer is its evaluation's time per question (with a
    token compressor's compressing). An encoder that learns on top of a field compressor
    (offset:*) is not one, whatever its F1."""
    f1s = {"aware/offset:truncate_x4": [1.0, 0.5, 0.5, 1.0], "aware/truncate_x4": [0.5, 0.5, 0.0, 0.5],
           "aware/random_tokens_x4": [0.0, 0.5, 0.0, 0.0], "aware/constant_x4": [0.0] * 4,
           "aware/pool_x1": [1.0] * 4}
    _write_cells(tmp_path, f1s, eval_seconds=2.0)
    # A token compressor compresses before the evaluation: its time counts too.
    truncate = tmp_path / "aware/truncate_x4/summary.json"
    truncate.write_text(json.dumps({**json.loads(truncate.read_text()),
                                    "eval_compress_seconds": 2.0}))
    opts = study.StudyOptions(encoders="offset:truncate,truncate,random_tokens", compressions="4",
                              settings="aware", output_dir=str(tmp_path))
    rows = {f"{r['setting']}/{r['encoder']}_x{r['compression']:g}": r
            for r in study.table(opts, study.cells(opts))}
    # pool at 1x has no training-free compressor at its compression to be set against.
    assert rows.pop("aware/pool_x1")["vs_best_field"] is None
    assert {r["best_field"] for r in rows.values()} == {"truncate"}
    assert rows["aware/truncate_x4"]["vs_best_field"] is None
    for name in ("aware/offset:truncate_x4", "aware/random_tokens_x4", "aware/constant_x4"):
        diff = sum(a - b for a, b in zip(f1s[name], f1s["aware/truncate_x4"])) / 4
        assert rows[name]["vs_best_field"]["diff"] == pytest.approx(diff), name
    assert rows["aware/offset:truncate_x4"]["vs_best_field"]["diff"] == pytest.approx(0.375)
    truncate_row = rows.pop("aware/truncate_x4")
    assert truncate_row["seconds_per_answer"] == 1.0
    assert {r["seconds_per_answer"] for r in rows.values()} == {0.5}
    table = study.render([*rows.values(), truncate_row])
    line = next(line for line in table.splitlines() if line.startswith("| aware | truncate |"))
    assert "| best |" in line and line.endswith("| 1.00 |")
    assert "+0.375" in table and "(truncate)" in table and "| 0.50 |" in table


def test_a_question_blind_compressors_agnostic_cell_is_its_aware_row_too(tmp_path):
    """truncate never reads the question: the aware setting's row reads its agnostic run, set
    against the aware setting's reference and best training-free compressor, computed here
    directly, and says which run it reads."""
    f1s = {"agnostic/truncate_x4": [0.5, 0.5, 0.0, 0.5], "agnostic/pool_x1": [1.0] * 4,
           "aware/sentences_x4": [1.0, 0.5, 0.5, 0.5], "aware/pool_x1": [1.0, 1.0, 0.5, 0.5]}
    _write_cells(tmp_path, f1s)
    opts = study.StudyOptions(encoders="truncate,sentences", compressions="4",
                              settings="aware,agnostic", output_dir=str(tmp_path),
                              base=TrainOptions(samples=0))
    rows = study.table(opts, study.cells(opts))
    assert [(r["setting"], r["encoder"]) for r in rows] == [
        ("aware", "sentences"), ("aware", "pool"), ("aware", "truncate"),
        ("agnostic", "truncate"), ("agnostic", "pool")]
    aware, agnostic = rows[2], rows[3]
    assert aware["run"] == "agnostic/truncate_x4" and "run" not in agnostic
    assert aware["f1"] == agnostic["f1"] == pytest.approx(0.375)
    assert aware["share_of_uncompressed"] == pytest.approx(0.375 / 0.75)
    assert agnostic["share_of_uncompressed"] == pytest.approx(0.375)
    assert aware["best_field"] == "sentences" and aware["vs_best_field"]["diff"] == pytest.approx(
        -0.25)
    assert agnostic["vs_best_field"] is None and agnostic["best_field"] == "truncate"
    assert "| aware | truncate (reads no question: agnostic/truncate_x4) |" in study.render(rows)


def test_the_table_pairs_each_cell_with_its_own_control_and_reference(tmp_path):
    """Cells written by hand with known per-example F1s: each row's paired difference is against
    the constant control of its own compression and setting, and its share is of the pool 1x
    reference of its setting, each computed here directly."""
    f1s = {"aware/pool_x1": [1.0, 1.0, 0.5, 1.0], "aware/pool_x4": [1.0, 0.5, 0.5, 1.0],
           "aware/constant_x1": [0.0, 0.0, 0.5, 0.0], "aware/constant_x4": [0.0, 0.5, 0.5, 0.0],
           "agnostic/pool_x1": [0.5, 0.5, 0.5, 0.5], "agnostic/pool_x4": [0.0, 0.5, 0.5, 0.5],
           "agnostic/constant_x1": [0.0] * 4, "agnostic/constant_x4": [0.5, 0.5, 0.5, 0.5]}
    _write_cells(tmp_path, f1s)
    opts = study.StudyOptions(encoders="pool", compressions="1,4", output_dir=str(tmp_path))
    rows = {f"{r['setting']}/{r['encoder']}_x{r['compression']:g}": r
            for r in study.table(opts, study.cells(opts))}
    assert set(rows) == set(f1s)
    for name, row in rows.items():
        setting, cell = name.split("/")
        ratio = cell.split("_")[1]
        control = f1s[f"{setting}/constant_{ratio}"]
        if cell.startswith("constant"):
            assert row["vs_constant"] is None
        else:
            diff = sum(a - b for a, b in zip(f1s[name], control)) / 4
            assert row["vs_constant"]["diff"] == pytest.approx(diff), name
        reference = sum(f1s[f"{setting}/pool_x1"]) / 4
        assert row["share_of_uncompressed"] == pytest.approx(sum(f1s[name]) / 4 / reference)
        # Its interval pairs the cell's questions with the reference's.
        assert row["share_ci"] == list(stats.ratio_ci(f1s[name], f1s[f"{setting}/pool_x1"])[1])
    assert rows["aware/pool_x1"]["share_ci"] == [1.0, 1.0]
    assert rows["aware/pool_x4"]["share_ci"][0] < rows["aware/pool_x4"]["share_of_uncompressed"]
    assert rows["agnostic/pool_x4"]["vs_constant"]["label"] == "indistinguishable"
    assert rows["aware/pool_x4"]["vs_constant"]["diff"] == pytest.approx(0.5)


def test_only_trains_the_named_cells_and_a_rerun_without_it_trains_the_rest(
        tmp_path, tiny_model_dir, capsys):
    args = ["study", "--model_id", str(tiny_model_dir), "--encoders", "pool",
            "--compressions", "1,4", "--settings", "aware", "--samples", "8",
            "--eval_samples", "3", "--batch_size", "4", "--max_new_tokens", "3",
            "--output_dir", str(tmp_path)]
    assert main([*args, "--only", "aware/pool_x4"]) == 0
    out = capsys.readouterr().out
    assert out.count("not in --only, left for a later run") == 3
    assert [p.parent.name for p in tmp_path.glob("aware/*/summary.json")] == ["pool_x4"]
    # The cells left for later have no folder yet: checking one writes nothing.
    assert [p.name for p in (tmp_path / "aware").iterdir()] == ["pool_x4"]
    rows = json.loads((tmp_path / "study.json").read_text())["rows"]
    assert [(r["encoder"], r["compression"]) for r in rows] == [("pool", 4.0)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("kept from an earlier run") == 1 and "not in --only" not in out
    assert len(json.loads((tmp_path / "study.json").read_text())["rows"]) == 4
    assert main([*args, "--only", "aware/pool_x4,aware/lm_x4"]) == 2
    assert "unknown cell 'aware/lm_x4' in --only; this study's cells: aware/pool_x1, " \
        "aware/pool_x4, aware/constant_x1, aware/constant_x4" in capsys.readouterr().err


def test_the_fitted_press_cells_of_a_study_fit_each_models_press_once(
        tmp_path, tiny_model_dir, capsys, monkeypatch):
    """kvpress:learned and offset:kvpress:learned fit the same press on the same questions:
    the second cell reads the first one's (the trainer checks it is the same fit)."""
    from latentwire.training import learned_press

    fits = []
    real = learned_press.fit
    monkeypatch.setattr(learned_press, "fit", lambda *a, **k: fits.append(1) or real(*a, **k))
    args = ["study", "--model_id", str(tiny_model_dir), "--encoders",
            "kvpress:learned,offset:kvpress:learned", "--compressions", "4", "--settings",
            "agnostic", "--samples", "8", "--eval_samples", "3", "--batch_size", "4",
            "--max_new_tokens", "3", "--output_dir", str(tmp_path),
            "--only", "agnostic/kvpress:learned_x4,agnostic/offset:kvpress:learned_x4"]
    assert main(args) == 0
    assert len(fits) == 1
    assert "the press's scores fitted by" in capsys.readouterr().out
    later = json.loads((tmp_path / "agnostic/offset:kvpress:learned_x4/config.json").read_text())
    assert later["provenance"]["field_compressor"]["settings"]["fitted_by"].endswith(
        "agnostic/kvpress:learned_x4")


def test_a_failed_cell_is_recorded_and_the_others_finish(tmp_path, tiny_model_dir, capsys,
                                                          monkeypatch):
    """One cell's loss is made to diverge (a huge learning rate, no clipping): the study goes
    on, writes the table of the cells that finished, exits 1, and a rerun neither retrains
    anything nor forgets the failure."""
    real = study.train

    def diverging_pool_x4(o, *args, **kwargs):
        if o.output_dir.endswith("pool_x4"):
            o = replace(o, lr=1e30, max_grad_norm=0.0)
        return real(o, *args, **kwargs)

    monkeypatch.setattr(study, "train", diverging_pool_x4)
    args = ["study", "--model_id", str(tiny_model_dir), "--encoders", "pool",
            "--compressions", "1,4", "--settings", "aware", "--samples", "8",
            "--eval_samples", "3", "--batch_size", "4", "--max_new_tokens", "3",
            "--output_dir", str(tmp_path)]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "aware/pool_x4: failed; the study goes on without it" in out
    assert json.loads((tmp_path / "aware/pool_x4/summary.json").read_text())["status"] == "failed"
    rows = json.loads((tmp_path / "study.json").read_text())["rows"]
    assert [(r["encoder"], r["compression"]) for r in rows] == [
        ("pool", 1.0), ("constant", 1.0), ("constant", 4.0)]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert out.count("kept from an earlier run") == 3
    assert "aware/pool_x4: failed in an earlier run" in out


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A local Ray whose workers make the pool_x4 cell's loss diverge (tests/ray_hooks.py)."""
    ray = pytest.importorskip("ray")
    script = tmp_path_factory.mktemp("script") / "f1.json"
    script.write_text(json.dumps({"pool_x4": "diverge"}))
    ray.init(num_cpus=2, logging_level=logging.WARNING, runtime_env={
        "worker_process_setup_hook": "tests.ray_hooks.script_f1",
        "env_vars": {F1_SCRIPT: str(script), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}})
    yield ray
    ray.shutdown()


def stamps(folder):
    """Every file of every cell's run, with its bytes and mtime: what retraining would change."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.glob("aware/*/**/*")) if p.is_file()}


@pytest.mark.ray
def test_a_study_on_ray_runs_its_cells_as_tasks_and_goes_on_past_a_failed_one(
        local_ray, tmp_path, tiny_model_dir, capsys):
    args = ["study", "--model_id", str(tiny_model_dir), "--encoders", "pool",
            "--compressions", "1,4", "--settings", "aware", "--samples", "8",
            "--eval_samples", "3", "--batch_size", "4", "--max_new_tokens", "3",
            "--output_dir", str(tmp_path), "--ray"]
    assert main(args) == 1  # pool_x4 diverged
    out = capsys.readouterr().out
    assert "Ray: 4 cells as tasks, at most 2 at once (1 CPU, 0 GPU each)" in out
    assert "aware/pool_x4: failed (a non-finite loss); the study goes on without it" in out
    assert out.count(": finished") == 3
    assert json.loads((tmp_path / "aware/pool_x4/summary.json").read_text())["status"] == "failed"
    rows = json.loads((tmp_path / "study.json").read_text())["rows"]
    assert [(r["encoder"], r["compression"]) for r in rows] == [
        ("pool", 1.0), ("constant", 1.0), ("constant", 4.0)]
    for cell in ("pool_x1", "constant_x1", "constant_x4"):
        config = json.loads((tmp_path / "aware" / cell / "config.json").read_text())
        # Trained in a Ray worker: with one thread, as its one CPU (this process has 2), and
        # under the driver's command line.
        assert torch.get_num_threads() == 2 and config["provenance"]["torch_threads"] == 1
        assert config["provenance"]["command"] == sys.argv

    before = stamps(tmp_path)
    assert main(args) == 1  # a rerun trains nothing and still reports the failed cell
    out = capsys.readouterr().out
    assert out.count("kept from an earlier run") == 3
    assert "aware/pool_x4: failed in an earlier run" in out and "started on Ray" not in out
    assert stamps(tmp_path) == before


def test_the_ray_worker_flags_need_ray(tmp_path):
    opts = study.StudyOptions(encoders="pool", compressions="1", settings="aware",
                              output_dir=str(tmp_path), ray_cpus_per_worker=2)
    with pytest.raises(UsageError, match="need --ray"):
        study.run(opts)
