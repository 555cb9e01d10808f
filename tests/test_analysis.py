"""The analysis on summaries made for the purpose: known winners, partial, failed and old ones."""

import json
import random
import re

import pytest

from latentwire.analysis import insights as analysis

N = 100


def result(name, category, config, p_correct, source="text", identical=False, seed=0):
    rng = random.Random(f"{name}{source}{seed}")
    preds = [{"id": f"q{i}", "prediction": "x", "answers": ["x"],
              "f1": 1.0 if rng.random() < p_correct else 0.0, "em": 0.0} for i in range(N)]
    f1 = sum(p["f1"] for p in preds) / N
    return {"experiment": name, "category": category, "config": config, "source": source,
            "status": "ok", "f1": f1, "em": 0.0, "empty_rate": 0.0, "num_samples": N,
            "diagnostics": {"norm_ratio": 1.0 if identical else 0.9, "cosine_to_input": 0.99,
                            "fraction_changed": 0.0 if identical else 1.0, "max_abs_delta": 0.1,
                            "identical_to_input": identical},
            "predictions": preds}


def ten_experiment_summary():
    rows = [result("baseline", "baseline", {}, 0.2),
            result("rms_scale0.8", "rms_matching", {"target_scale": 0.8}, 0.25),
            result("rms_scale1.0", "rms_matching", {"target_scale": 1.0}, 0.7),
            result("batch_dist", "batch_distribution", {}, 0.05),
            result("nearest_k3_a0.5", "nearest_k", {"k": 3, "alpha": 0.5}, 0.2),
            result("nearest_k5_a0.5", "nearest_k", {"k": 5, "alpha": 0.5}, 0.3),
            result("anchor_eps0.1", "anchor_offset", {"eps": 0.1}, 0.2, identical=True),
            result("anchor_eps0.3", "anchor_offset", {"eps": 0.3}, 0.2, identical=True),
            result("codebook_256_t1.0", "soft_codebook", {"size": 256, "tau": 1.0}, 0.0),
            result("codebook_512_t0.7", "soft_codebook", {"size": 512, "tau": 0.7}, 0.01)]
    return {"total_experiments": 10, "successful": 10, "failed": 0, "results": rows,
            "provenance": {"model": {"id": "tiny"}, "samples": N, "seed": 42}}


def test_ten_experiment_sweep_prints_every_section_and_the_next_command(tmp_path, capsys):
    insights = analysis.analyze(ten_experiment_summary(), tmp_path)
    text = capsys.readouterr().out
    for heading in ["TOP 5 PERFORMERS", "BEST IN EACH CATEGORY", "HYPERPARAMETER INSIGHTS",
                    "KEY INSIGHTS", "RECOMMENDATIONS"]:
        assert heading in text
    rows = {r["experiment"]: r for r in insights["sources"]["text"]["ranked"]}
    assert rows["rms_scale1.0"]["vs_baseline"]["label"] == "better"
    assert rows["codebook_256_t1.0"]["vs_baseline"]["label"] == "worse"
    assert rows["anchor_eps0.1"]["vs_baseline"]["label"] == "no-op"
    lo, hi = rows["rms_scale1.0"]["f1_ci"]
    assert lo < rows["rms_scale1.0"]["f1"] < hi
    assert "Magnitude mismatch" in text
    assert ("latentwire train --embed_transform rms_matching --target_rms_scale 1.0 "
            "--samples 10000 --epochs 10") in text
    hp = insights["sources"]["text"]["hyperparameters"]
    assert hp["nearest_k"]["best"] == {"k": 5, "alpha": 0.5}
    assert hp["anchor_offset"]["all_no_op"] is True
    for name in ["ranked_f1", "nearest_k_heatmap", "anchor_eps", "rms_scale", "codebook",
                 "diagnostics"]:
        png = tmp_path / "plots" / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    report = (tmp_path / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 6 and "rms_scale1.0" in report


def test_statistical_tie_at_the_top_is_reported_with_samples_needed(capsys):
    rows = [result("baseline", "baseline", {}, 0.2), result("rms_scale1.0", "rms_matching",
                                                            {"target_scale": 1.0}, 0.32),
            result("rms_scale1.2", "rms_matching", {"target_scale": 1.2}, 0.30)]
    insights = analysis.analyze({"results": rows}, None, plots=False)
    text = capsys.readouterr().out
    src = insights["sources"]["text"]
    assert src["tied_with_top"]
    assert src["separation"]["samples_needed"] > N
    assert "statistically tied" in text and "samples" in text


def test_a_leader_tied_with_the_baseline_names_the_baseline(capsys):
    base = result("baseline", "baseline", {}, 0.25, identical=True)
    # batch_dist wins three examples the baseline lost and loses two it won: a tie, not a win.
    preds = [dict(p) for p in base["predictions"]]
    wrong = [p for p in preds if p["f1"] == 0.0][:3]
    right = [p for p in preds if p["f1"] == 1.0][:2]
    for p in wrong:
        p["f1"] = 1.0
    for p in right:
        p["f1"] = 0.0
    leader = {**result("batch_dist", "batch_distribution", {}, 0.25), "predictions": preds,
              "f1": sum(p["f1"] for p in preds) / N}
    noop = {**base, "experiment": "anchor_eps0.1", "category": "anchor_offset",
            "config": {"eps": 0.1}}  # the baseline's own predictions
    src = analysis.analyze({"results": [base, leader, noop]}, None, plots=False)["sources"]["text"]
    assert "not significantly better; confirm it first" in capsys.readouterr().out
    assert src["next_command"].startswith("latentwire train --embed_transform "
                                          "batch_distribution")
    assert src["ranked"][0]["experiment"] == "batch_dist"
    assert src["tied_with_top"] == ["baseline"]
    assert src["separation"]["runner_up"] == "baseline"


def test_partial_and_failed_sweep(tmp_path, capsys):
    summary = ten_experiment_summary()
    summary["results"] = summary["results"][:3] + [{
        "experiment": "batch_dist", "source": "text", "status": "failed",
        "error": {"type": "NonFiniteError", "message": "transform produced 5 non-finite values"}}]
    summary["not_run"] = [{"source": "text", "experiment": "codebook_1024_t1.0"}]
    analysis.analyze(summary, tmp_path)
    text = capsys.readouterr().out
    assert "INCOMPLETE SWEEP" in text and "NonFiniteError" in text
    assert "not run: codebook_1024_t1.0" in text
    assert "FAILED" in analysis.ranked_table(summary)


def test_single_experiment_and_old_summary_without_new_fields(capsys):
    old = {"results": {"baseline": {"f1": 0.4, "em": 0.2},
                       "rms_scale1.0": {"f1": 0.5, "em": 0.3}}}
    insights = analysis.analyze(old, None, plots=False)
    text = capsys.readouterr().out
    assert "TOP 5 PERFORMERS" in text and "rms_scale1.0" in text
    assert insights["sources"]["text"]["ranked"][0]["f1_ci"] is None
    single = {"results": [result("rms_scale1.0", "rms_matching", {"target_scale": 1.0}, 0.5)]}
    analysis.analyze(single, None, plots=False)
    assert "rms_scale1.0" in capsys.readouterr().out


def test_sources_are_grouped_with_a_recovery_table(tmp_path, capsys):
    rows = [result("baseline", "baseline", {}, 0.4),
            result("baseline", "baseline", {}, 0.0, source="mismatch"),
            result("rms_scale1.0", "rms_matching", {"target_scale": 1.0}, 0.3, source="mismatch")]
    insights = analysis.analyze({"results": rows}, tmp_path)
    text = capsys.readouterr().out
    assert set(insights["sources"]) == {"text", "mismatch"}
    rec = {r["experiment"]: r for r in insights["recovery"]}
    assert rec["rms_scale1.0"]["recovery"] == pytest.approx(rows[2]["f1"] / rows[0]["f1"])
    assert "RECOVERY" in text and "(source: mismatch)" in text
    assert "breaks the model by itself" in text
    assert (tmp_path / "plots" / "mismatch" / "ranked_f1.png").is_file()
    # The closing line counts the plots of each folder, as they lie.
    line = next(x for x in text.splitlines() if x.startswith("plots and report:"))
    shown = {folder: int(n) for n, folder in re.findall(r"(\d+) in ([^,)]+)", line)}
    assert shown == {str(d): len(list(d.glob("*.png"))) for d in (tmp_path / "plots").iterdir()}
    assert len(shown) == 2


def test_json_output(capsys):
    analysis.analyze(ten_experiment_summary(), None, as_json=True, plots=False)
    doc = json.loads(capsys.readouterr().out)
    assert doc["sources"]["text"]["next_command"].startswith("latentwire train")


def test_no_winner_on_trained_latents_is_explained_as_such_not_as_real_tokens():
    adapter = "adapter:runs/train/lm4/checkpoints/best"
    rows = [result("baseline", "baseline", {}, 0.5, source=adapter),
            result("rms_scale1.0", "rms_matching", {"target_scale": 1.0}, 0.2, source=adapter),
            result("baseline", "baseline", {}, 0.5),
            result("rms_scale1.0", "rms_matching", {"target_scale": 1.0}, 0.2)]
    out = analysis.build({"results": rows})["sources"]
    trained = " ".join(out[adapter]["interpretation"] + out[adapter]["recommendations"])
    assert "learned to read these latents" in trained and "real token" not in trained
    assert "--source mismatch" not in trained
    text = " ".join(out["text"]["interpretation"] + out["text"]["recommendations"])
    assert "On real token embeddings" in text and "--source mismatch" in text
