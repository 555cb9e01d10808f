"""The compression study on a tiny model: its grid with the controls, one table and plot, and a
rerun that keeps what is done."""

import json

import pytest

from latentwire import study
from latentwire.cli import main
from latentwire.errors import UsageError
from latentwire.training import TrainOptions


def test_grid_always_holds_the_controls():
    opts = study.StudyOptions(encoders="attn", compressions="4,8", settings="aware")
    names = [c.name for c in study.cells(opts)]
    assert names == ["aware/attn_x4", "aware/attn_x8", "aware/constant_x4", "aware/constant_x8",
                     "aware/pool_x1"]
    with pytest.raises(UsageError, match="unknown encoder 'mlp'"):
        study.cells(study.StudyOptions(encoders="mlp"))
    with pytest.raises(UsageError, match="unknown setting"):
        study.cells(study.StudyOptions(settings="aware,both"))


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
    assert rows[1]["vs_constant"]["label"] in ("better", "worse", "indistinguishable")
    assert rows[1]["measured_compression"] > 3
    assert (tmp_path / "plots" / "study.png").stat().st_size > 0
    assert "| aware | pool |" in (tmp_path / "study.md").read_text()
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.count("kept from an earlier run") == 8
