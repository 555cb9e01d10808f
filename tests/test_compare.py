"""`latentwire compare`: finished runs paired on the questions both answered, per model, each
figure checked against a direct computation from the runs' own evaluation files."""

import json
import shutil

import pytest

from latentwire import models, stats
from latentwire.cli import main

RUN = ["--samples", "8", "--eval_samples", "3", "--batch_size", "4", "--max_new_tokens", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, tiny_qwen_other_dir):
    """A run over both tiny models and a constant-control run over the second alone, on the
    same evaluation questions. The tiny models answer nothing right, so each answer's F1 is then
    set in the runs' own evaluation files (the single run's listed in reverse), to pair figures
    that differ by question and by order."""
    out = tmp_path_factory.mktemp("runs")
    pair, alone = out / "pair", out / "alone"
    assert main(["train", "--model_id", f"{tiny_model_dir},{tiny_qwen_other_dir}", *RUN,
                 "--output_dir", str(pair)]) == 0
    assert main(["train", "--model_id", str(tiny_qwen_other_dir), "--encoder", "constant", *RUN,
                 "--output_dir", str(alone)]) == 0
    qwen = models.model_dirname(str(tiny_qwen_other_dir))
    set_f1s(pair, [1.0, 0.5, 0.25], qwen)
    set_f1s(alone, [0.5, 0.0, 0.25], reverse=True)
    return pair, alone, qwen


def last_eval(run):
    summary = json.loads((run / "summary.json").read_text())
    return run / "eval" / f"epoch{summary['epochs'][-1]['epoch']}.json"


def set_f1s(run, f1s, model=None, reverse=False):
    evaluation = json.loads(last_eval(run).read_text())
    found = evaluation["models"][model] if model else evaluation
    for p, f1 in zip(found["predictions"], f1s):
        p["f1"] = f1
    if reverse:
        found["predictions"].reverse()
    last_eval(run).write_text(json.dumps(evaluation))


def predictions(run, model=None):
    evaluation = json.loads(last_eval(run).read_text())
    found = evaluation["models"][model] if model else evaluation
    return {p["id"]: p["f1"] for p in found["predictions"]}


def test_a_pair_run_meets_a_single_model_run_by_its_model_and_pairs_its_questions(runs, capsys):
    pair, alone, qwen = runs
    assert main(["compare", "--runs", f"{pair},{alone}", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)  # the pair's other model has no answers there
    mine, theirs = predictions(pair, qwen), predictions(alone)
    assert row["model"] == qwen and row["questions"] == len(mine) == len(theirs) == 3
    assert list(mine.values()) == [1.0, 0.5, 0.25] and list(theirs.values()) == [0.25, 0.0, 0.5]
    # question by question: 1.0 - 0.5, 0.5 - 0.0, 0.25 - 0.25
    assert row["paired"]["diff"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    a, b = [1.0, 0.5, 0.25], [0.5, 0.0, 0.25]
    assert row["paired"] == json.loads(json.dumps(stats.paired_comparison(a, b)))
    assert row["f1"] == {"f1": pytest.approx(1.75 / 3), "ci": list(stats.bootstrap_ci(a))}
    assert row["other_f1"]["f1"] == pytest.approx(0.75 / 3)
    assert row["ratio"] == pytest.approx(1.75 / 0.75)
    assert row["ratio_ci"] == list(stats.ratio_ci(a, b)[1])


def test_the_table_names_each_comparison_and_a_share_of_a_reference(runs, capsys):
    pair, alone, qwen = runs
    assert main(["compare", "--runs", f"{alone},{pair}"]) == 0
    table = capsys.readouterr().out
    assert f"| {qwen} | {pair} | 3 |" in table
    assert "| 0.250 [" in table and "| 0.583 [" in table  # each run's F1
    assert "| -0.333 [" in table and "| 43% [" in table  # 0.75 / 1.75 of the pair's


def test_runs_that_share_no_model_are_refused_in_one_line(runs, tmp_path, tiny_model_dir, capsys):
    _, alone, _ = runs
    other = tmp_path / "other"
    assert main(["train", "--model_id", str(tiny_model_dir), "--encoder", "constant", *RUN,
                 "--output_dir", str(other)]) == 0
    capsys.readouterr()
    assert main(["compare", "--runs", f"{alone},{other}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shares no answering model" in err


@pytest.mark.parametrize("runs_flag, said", [("only_one", "at least two"),
                                             ("missing,also_missing", "holds no evaluated"),
                                             ("a,b,a", "names a more than once")])
def test_bad_runs_are_refused_in_one_line(runs_flag, said, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "--runs", runs_flag]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and said in err


def test_a_run_not_finished_is_named_with_the_epoch_compared(runs, tmp_path, capsys):
    pair, alone, _ = runs
    running = tmp_path / "running"
    shutil.copytree(alone, running)
    summary = json.loads((running / "summary.json").read_text())
    (running / "summary.json").write_text(json.dumps({**summary, "status": "running"}))
    assert main(["compare", "--runs", f"{pair},{running}"]) == 0
    out = capsys.readouterr().out
    assert f"note: {running} is running: its epoch 1 is compared" in out and str(pair) + " is" not in out
