"""One latent, two model families: one encoder whose latents a tiny Llama and a tiny Qwen2 (other
architectures, widths 32 and 48, other vocabularies and chat formats) both answer from, each
through its own adapter. Both models stay bitwise unchanged, gradients reach the encoder and
both adapters and nothing else, the loss is each model's answer loss computed directly, each
adapter starts on its own vocabulary, a checkpoint round-trips, the sweep's adapter source gives
each model its own latents, a model the checkpoint has no adapter for is refused, and a frozen
encoder trains only a new model's adapter."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from latentwire import models, prompts, stats
from latentwire.analysis import insights as analysis
from latentwire.cli import main, run_sweep
from latentwire.errors import UsageError
from latentwire.sweep.options import SweepOptions, plan_models
from latentwire.sweep.runner import Sweep
from latentwire.sweep.sources import parse
from latentwire.training import checkpoint, study
from latentwire.training.encoders import build
from latentwire.training.loop import run
from latentwire.training.options import TrainOptions, validate
from latentwire.training.spec import CompressorSpec
from latentwire.training.summary import render
from latentwire.training.trainer import CALIBRATION_EXAMPLES, State, Trainer
from latentwire.vocab import VocabSpace, shared_tokens, token_anchors, translation

from .conftest import byte_tokenizer, other_byte_tokenizer, tiny_lm, tiny_qwen_lm, unloadable_model


def quiet(*args, **kwargs):
    pass


def options(tmp_path, **kw):
    base = dict(model_id="llama,qwen", samples=12, eval_samples=4, batch_size=4, epochs=1,
                save_every=1, lr=1e-2, max_new_tokens=3, output_dir=str(tmp_path / "run"))
    return TrainOptions(**{**base, **kw})


def pair():
    return {"llama": tiny_lm(), "qwen": tiny_qwen_lm()}


def two(tmp_path, lms=None, **kw) -> Trainer:
    opts = options(tmp_path, **kw)
    return Trainer(opts, validate(opts), quiet, lms or pair())


def states(lms):
    return {m: {k: v.clone() for k, v in lm.model.state_dict().items()} for m, lm in lms.items()}


@pytest.mark.parametrize("encoder, lora", [("pool", 0), ("lm", 0), ("lm", 2)])
def test_gradients_reach_the_encoder_and_both_adapters_and_both_models_stay_unchanged(
        tmp_path, encoder, lora):
    if lora:
        pytest.importorskip("peft")
    lms = pair()
    before = states(lms)
    t = two(tmp_path, lms, encoder=encoder, encoder_lora=lora)
    if lora:  # the reader is the first model's own copy, not either model that answers
        assert t.compressor.encoder.reader[0] not in [lm.model for lm in lms.values()]
        assert t.compressor.encoder.lora
    assert [a.embed.weight.shape[1] for a in t.answerers] == [32, 48]
    assert t.reader is t.answerers[0]
    for step in range(2):
        t.step(list(range(4)), step)
    adapters = t.compressor.adapters
    assert list(adapters) == ["0", "1"]
    trained = {id(p) for p in t.params}
    assert trained == {id(p) for p in t.compressor.parameters()}  # nothing else trains
    for part in (t.compressor.encoder, adapters["0"], adapters["1"]):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
    for m, lm in lms.items():
        assert all(p.grad is None and not p.requires_grad for p in lm.model.parameters())
        assert all(torch.equal(before[m][k], v) for k, v in lm.model.state_dict().items())
        assert not lm.model.training
    widths = [z.shape[1] for z, _, _ in t.latents(range(2))]
    assert widths == [32, 48]


def test_the_loss_is_the_weighted_sum_of_each_models_own_answer_loss(tmp_path):
    """Against each model alone reading its whole prompt, row by row: its own prefix, anchor,
    question and answer in its own tokens, the latents through its own adapter."""
    lms = pair()
    t = two(tmp_path, lms, model_weights="1,0.5", keep_question=True, first_token_ce_weight=0.5)
    rows = [0, 1, 2]
    loss, parts = t.loss(rows)
    assert set(parts) == {f"{k}/{n}" for k in ("ce", "first_token_ce") for n in ("llama", "qwen")}
    llama, qwen = t.answerers
    # The same example in each model's own tokens: another question, another answer and stop.
    assert llama.train_items[0].example is qwen.train_items[0].example
    assert llama.train_items[0].question != qwen.train_items[0].question
    assert qwen.train_items[0].answer[-1] == lms["qwen"].tokenizer.eos_token_id != \
        llama.train_items[0].answer[-1]
    assert llama.fmt.prefix_text != qwen.fmt.prefix_text
    expected = 0.0
    for a, weight, (z, offsets, _) in zip(t.answerers, (1.0, 0.5), t.latents(rows)):
        for n, r in enumerate(rows):
            item = a.train_items[r]
            row = torch.cat([a.prefix, z[offsets[n]:offsets[n + 1]], a.embed_ids(item.question),
                             a.anchor, a.embed_ids(item.answer[:-1])])
            logits = a.lm.model(inputs_embeds=row[None]).logits[0]
            first = row.shape[0] - len(item.answer)
            ce = F.cross_entropy(logits[first:first + len(item.answer)],
                                 torch.tensor(item.answer), reduction="none")
            expected = expected + weight * (ce.mean() + 0.5 * ce[0])
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_each_adapter_starts_on_its_own_vocabularys_distribution_per_dimension(tmp_path):
    t = two(tmp_path, latent_dim=24, samples=40)
    assert t.compressor.latent.weight.shape == (24, 32)
    rows = range(CALIBRATION_EXAMPLES)
    with torch.no_grad():
        outs = t.latents(rows)
    for a, (z, _, _) in zip(t.answerers, outs):
        assert torch.allclose(z.mean(0), a.vocab.mean, atol=1e-4)
        assert torch.allclose(z.std(0), a.vocab.std, rtol=1e-3, atol=1e-5)


def test_a_checkpoint_round_trips_to_identical_latents_for_each_model(tmp_path):
    lms = pair()
    t = two(tmp_path, lms, embed_transform="soft_codebook", codebook_size=16)
    for step in range(2):
        t.step(list(range(4)), step)
    t.save("best", State())
    weights, config = checkpoint.load(Path(t.out) / "checkpoints" / "best")
    assert {k.split(".")[0] for k in weights} == {"encoder", "adapters"}
    assert {"adapters.0.codes", "adapters.1.codes"} <= set(weights)  # each its own codes
    assert [a["name"] for a in config["answerers"]] == ["llama", "qwen"]
    assert [a["model"]["class"] for a in config["answerers"]] == ["LlamaForCausalLM",
                                                                  "Qwen2ForCausalLM"]
    assert [a["prompt_format"] for a in config["answerers"]] == [a.fmt.describe()
                                                                 for a in t.answerers]
    assert config["reader"]["model"]["id"] == "llama"
    assert checkpoint.reader(config) == config["reader"]
    again = build(CompressorSpec.from_json(config["compressor"]), t.reader.vocab,
                  t.reader.lm.model, {i: a.vocab for i, a in enumerate(t.answerers)})
    again.load_state_dict(weights)
    again.eval()
    with torch.no_grad():
        ours = t.latents(range(4), evaluating=True)
        items = t.reader.eval_items[:4]
        theirs = again(t.reader.embed_ids([x for i in items for x in i.span]).float(),
                       [len(i.span) for i in items])
    for (z, offsets, _), (z2, offsets2, _) in zip(ours, theirs, strict=True):
        assert torch.equal(z, z2) and torch.equal(offsets, offsets2)


def test_a_run_evaluates_each_model_against_its_own_references(tmp_path):
    lms = pair()
    opts = options(tmp_path, epochs=2)
    lines = []
    assert run(opts, lambda *a, **k: lines.append(" ".join(map(str, a))), lms) == 0
    out = Path(opts.output_dir)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert list(summary["models"]) == ["llama", "qwen"]
    for name, m in summary["models"].items():
        assert set(m["final"]) >= {"f1", "em", "ci", "latent_diagnostics"}
        assert set(m["references"]) == {"text", "question_only"}
        assert m["compression_ratio"] > 2 and m["model_id"] == name
    p = summary["paired"]
    assert (p["a"], p["b"]) == ("llama", "qwen") and p["label"] in ("better", "worse",
                                                                    "indistinguishable")
    assert all(set(e["eval_f1_by_model"]) == {"llama", "qwen"} for e in summary["epochs"])
    evaluation = json.loads((out / "eval" / "epoch2.json").read_text())
    f1 = {n: [x["f1"] for x in r["predictions"]] for n, r in evaluation["models"].items()}
    assert len(f1["llama"]) == len(f1["qwen"]) == summary["split"]["eval_examples"]
    assert summary["final"]["f1"] == pytest.approx((evaluation["models"]["llama"]["f1"]
                                                    + evaluation["models"]["qwen"]["f1"]) / 2)
    references = json.loads((out / "references.json").read_text())
    assert set(references) == {"llama", "qwen"}
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["type"] == "eval"]
    assert all("predictions" not in m for r in evals for m in r["models"].values())
    assert {"ce/llama", "ce/qwen"} <= set(rows[0])
    assert (out / "plots" / "f1.png").stat().st_size > 0
    text = render(summary)
    assert "llama (llama, weight 1)" in text and "qwen (qwen, weight 1)" in text
    assert "paired, llama - qwen" in text
    assert any(line.startswith("  qwen: F1") for line in lines)
    config = json.loads((out / "config.json").read_text())
    assert [a["name"] for a in config["provenance"]["answerers"]] == ["llama", "qwen"]


def test_the_adapter_source_gives_each_model_its_own_latents_and_the_sweep_compares_them(
        tmp_path, tiny_model_dir, tiny_qwen_other_dir):
    ids = [str(tiny_model_dir), str(tiny_qwen_other_dir)]
    lms = {m: models.load(m, "cpu") for m in ids}
    opts = TrainOptions(model_id=",".join(ids), samples=8, eval_samples=3, batch_size=4,
                        max_new_tokens=3, keep_question=True, output_dir=str(tmp_path / "run"))
    assert run(opts, quiet, lms) == 0
    best = tmp_path / "run" / "checkpoints" / "best"
    sweep = SweepOptions(model_id=",".join(ids), source=f"text,adapter:{best}",
                         experiment="baseline", samples=4, max_new_tokens=3,
                         output_dir=str(tmp_path / "sweep"))
    summary, code = run_sweep(sweep, log=quiet)
    assert code == 0 and [m["summary"]["successful"] for m in summary["models"]] == [2, 2]
    cross = analysis.build(summary)["cross_model"]["sources"]
    assert f"adapter:{best}" in cross

    # Directly: the reader (the Llama) reads each context in its own tokens; each model's
    # latents are its adapter's, and the question follows in its own tokens.
    weights, config = checkpoint.load(best)
    reader = lms[ids[0]]
    reader_fmt = prompts.make_format(reader.tokenizer, "auto")
    vocabs = {}
    for (one, plan), m in zip(plan_models(sweep), ids):
        s = Sweep(one, plan, quiet, lms[m])
        vocabs[m] = s.vocab
        (spec,) = [p for p in parse(one.source) if p.source.name == "adapter"]
        inputs, _ = s.source_inputs(spec)
        compressor = build(CompressorSpec.from_json(config["compressor"]),
                           vocabs[ids[0]] if m != ids[0] else s.vocab, reader.model,
                           {ids.index(m): s.vocab})
        compressor.load_state_dict({k: v for k, v in weights.items() if not k.startswith(
            "adapters.") or k.startswith(f"adapters.{ids.index(m)}.")})
        compressor.eval()
        spans = [prompts.encode_span(reader.tokenizer, reader_fmt, e.context, e.question, True)[0]
                 for e in s.examples]
        embed = reader.model.get_input_embeddings()
        with torch.no_grad():
            ((z, offsets, _),) = compressor(embed(torch.tensor([t for x in spans for t in x]))
                                            .float(), [len(x) for x in spans])
        assert z.shape[1] == lms[m].model.config.hidden_size
        assert torch.allclose(inputs.x, z, atol=1e-6) and torch.equal(inputs.offsets, offsets)
        own = lms[m].model.get_input_embeddings()
        for e, suffix in zip(s.examples, s.suffixes[spec.spec]):
            question = prompts.encode_span(lms[m].tokenizer, s.fmt, e.context, e.question, True)[1]
            assert torch.equal(suffix, own(torch.tensor(question)).float())


def test_a_model_the_checkpoint_has_no_adapter_for_is_refused_in_one_line(
        tmp_path, capsys, tiny_model_dir, tiny_qwen_other_dir):
    ids = [str(tiny_model_dir), str(tiny_qwen_other_dir)]
    opts = TrainOptions(model_id=",".join(ids), samples=8, eval_samples=3, batch_size=4,
                        max_new_tokens=2, output_dir=str(tmp_path / "run"))
    assert run(opts, quiet, {m: models.load(m, "cpu") for m in ids}) == 0
    third = tmp_path / "third"
    lm = tiny_lm(hidden=40)
    lm.model.save_pretrained(third)
    lm.tokenizer.save_pretrained(third)
    best = tmp_path / "run" / "checkpoints" / "best"
    with pytest.raises(UsageError, match="has no adapter for the model loaded"):
        run_sweep(SweepOptions(model_id=str(third), source=f"adapter:{best}",
                               experiment="baseline", samples=2,
                               output_dir=str(tmp_path / "sweep")), log=quiet)
    assert main(["sweep", "--model_id", str(third), "--source", f"adapter:{best}",
                 "--experiment", "baseline", "--samples", "2", "--output_dir",
                 str(tmp_path / "sweep2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no adapter for the model loaded" in err
    assert str(tiny_qwen_other_dir) in err


def test_a_frozen_encoder_trains_only_the_new_models_adapter(tmp_path):
    """Transfer: an encoder trained with the Llama alone, frozen, read by the Qwen2 through an
    adapter that is all that trains."""
    lms = pair()
    alone = TrainOptions(model_id="llama", samples=12, eval_samples=4, batch_size=4,
                         max_new_tokens=2, output_dir=str(tmp_path / "alone"))
    assert run(alone, quiet, lms["llama"]) == 0
    best = tmp_path / "alone" / "checkpoints" / "best"
    weights, _ = checkpoint.load(best)
    t = two(tmp_path, lms, model_id="qwen", encoder_model="llama", freeze_encoder=str(best))
    assert [a.name for a in t.answerers] == ["qwen"] and t.reader.name == "llama"
    assert {id(p) for p in t.params} == {id(p) for p in t.compressor.adapters["0"].parameters()}
    for step in range(2):
        t.step(list(range(4)), step)
    assert all(torch.equal(weights[k], v) for k, v in t.compressor.state_dict().items()
               if k.startswith("encoder."))
    assert float(t.compressor.adapters["0"].proj.weight.grad.abs().sum()) > 0
    with pytest.raises(UsageError, match="--compression 4.0 there, 2.0 now"):
        two(tmp_path / "b", lms, model_id="qwen", encoder_model="llama",
            freeze_encoder=str(best), compression=2.0)
    with pytest.raises(UsageError, match="its encoder reads with llama, not qwen"):
        two(tmp_path / "c", lms, model_id="qwen", freeze_encoder=str(best))


@pytest.mark.parametrize("weights", ["1", "1,x", "0,0", "1,-1"])
def test_model_weights_need_one_weight_per_model(tmp_path, weights):
    with pytest.raises(UsageError, match="--model_weights takes one weight"):
        validate(options(tmp_path, model_weights=weights))


def test_a_study_over_the_pair_has_a_row_per_cell_and_model(tmp_path, tiny_model_dir,
                                                            tiny_qwen_other_dir, capsys):
    ids = [str(tiny_model_dir), str(tiny_qwen_other_dir)]
    names = [models.model_dirname(m) for m in ids]
    args = ["study", "--model_id", ",".join(ids), "--encoders", "pool", "--compressions", "4",
            "--settings", "aware", "--samples", "8", "--eval_samples", "3", "--batch_size", "4",
            "--max_new_tokens", "2", "--output_dir", str(tmp_path)]
    assert main(args) == 0
    assert capsys.readouterr().out.count("references: those of") == 2
    rows = json.loads((tmp_path / "study.json").read_text())["rows"]
    assert [(r["encoder"], r["compression"], r["model"]) for r in rows] == [
        (e, c, n) for e, c in (("pool", 4.0), ("constant", 4.0), ("pool", 1.0)) for n in names]
    for row in rows[:2]:  # each model's against its own control, on the same questions
        control = study_f1s(tmp_path / "aware/constant_x4", row["model"])
        mine = study_f1s(tmp_path / "aware/pool_x4", row["model"])
        diff = sum(a - b for a, b in zip(mine, control)) / len(mine)
        assert row["vs_constant"]["diff"] == pytest.approx(diff)
        assert set(row["references"]) == {"text", "question_only"}
    table = (tmp_path / "study.md").read_text()
    assert f"| aware | pool | {names[1]} |" in table and f"References of {names[0]}" in table


def study_f1s(run_dir, name):
    summary = json.loads((run_dir / "summary.json").read_text())
    epoch = summary["epochs"][-1]["epoch"]
    evaluation = json.loads((run_dir / "eval" / f"epoch{epoch}.json").read_text())
    return [p["f1"] for p in evaluation["models"][name]["predictions"]]


def test_dedicated_sets_the_shared_runs_against_each_model_alone(tmp_path, tiny_model_dir,
                                                                 tiny_qwen_other_dir, capsys):
    """The cost of sharing: every cell also trained for each model alone, and one table per
    model of shared against dedicated (paired, computed here directly) against its own
    uncompressed trained reference."""
    ids = [str(tiny_model_dir), str(tiny_qwen_other_dir)]
    names = [models.model_dirname(m) for m in ids]
    args = ["study", "--model_id", ",".join(ids), "--dedicated", "--encoders", "pool",
            "--compressions", "4", "--settings", "aware", "--samples", "8", "--eval_samples",
            "3", "--batch_size", "4", "--max_new_tokens", "2", "--output_dir", str(tmp_path)]
    assert main(args) == 0
    for n, m in zip(names, ids):
        for cell in ("pool_x4", "constant_x4", "pool_x1"):
            config = json.loads((tmp_path / f"aware/{cell}-{n}" / "config.json").read_text())
            assert config["options"]["model_id"] == m
            assert len(config["provenance"].get("answerers", [m])) == 1
            # The same encoder as the shared cell's, reader included; the reference reads its own.
            reader = config["options"]["encoder_model"] or m
            assert reader == (m if cell == "pool_x1" else ids[0]), (cell, n)
    result = json.loads((tmp_path / "study.json").read_text())
    assert len(result["rows"]) == 6  # the shared cells only, per model
    costs = result["sharing"]
    assert [(r["encoder"], r["compression"], r["model"]) for r in costs] == [
        (e, c, n) for e, c in (("pool", 4.0), ("constant", 4.0), ("pool", 1.0)) for n in names]
    for r in costs:
        cell = f"aware/{r['encoder']}_x{r['compression']:g}"
        shared = study_f1s(tmp_path / cell, r["model"])
        dedicated = [p["f1"] for p in json.loads(
            (tmp_path / f"{cell}-{r['model']}" / "eval" / "epoch1.json").read_text())["predictions"]]
        diff = sum(a - b for a, b in zip(shared, dedicated)) / len(shared)
        assert r["shared_vs_dedicated"]["diff"] == pytest.approx(diff)
    assert "The cost of sharing" in (tmp_path / "study.md").read_text()
    capsys.readouterr()
    assert main(["study", "--model_id", ids[0], "--dedicated", "--output_dir",
                 str(tmp_path / "one")]) == 2
    assert "--dedicated sets runs shared by several models" in capsys.readouterr().err


def test_a_dedicated_cell_reads_as_the_shared_one_and_each_reference_reads_its_own_text():
    opts = study.StudyOptions(encoders="lm", compressions="4", settings="aware", dedicated=True,
                              base=TrainOptions(model_id="a,b", encoder_model="c"))
    readers = {c.name: study._options(opts, c, False).reader_id() for c in study.cells(opts)}
    assert readers == {"aware/lm_x4": "c", "aware/constant_x4": "c", "aware/pool_x1": "c",
                       "aware/lm_x4-a": "c", "aware/constant_x4-a": "c", "aware/pool_x1-a": "a",
                       "aware/lm_x4-b": "c", "aware/constant_x4-b": "c", "aware/pool_x1-b": "b"}


def test_each_share_is_of_the_models_own_reference_on_the_same_questions(tmp_path):
    """Cells written by hand with known per-question F1s (tiny models' references score
    nothing): each model's shared and dedicated shares, with their paired intervals, are of
    the pool 1x cell trained for that model alone, computed here directly."""
    f1s = {"a": {"shared": [1.0, 0.5, 0.0, 1.0], "dedicated": [1.0, 1.0, 0.5, 1.0],
                 "own": [1.0, 1.0, 1.0, 0.5]},
           "b": {"shared": [0.0, 0.5, 0.5, 0.0], "dedicated": [0.5, 0.5, 1.0, 0.0],
                 "own": [0.5, 1.0, 1.0, 1.0]}}

    def finished(folder, sections, scores):
        (tmp_path / folder / "eval").mkdir(parents=True)
        (tmp_path / folder / "eval" / "epoch1.json").write_text(json.dumps(scores))
        (tmp_path / folder / "summary.json").write_text(json.dumps(
            {"status": "finished", "epochs": [{"epoch": 1}], "train_seconds": 1.0, **sections}))

    def section(scores):
        mean = sum(scores) / len(scores)
        return {"final": {"f1": mean, "em": mean, "ci": [mean, mean]}, "references": {},
                "compression_ratio": 4.0}

    for cell in ("pool_x4", "constant_x4", "pool_x1"):
        finished(f"aware/{cell}", {"models": {m: section(f1s[m]["shared"]) for m in f1s}},
                 {"models": {m: {"predictions": [{"f1": f} for f in f1s[m]["shared"]]}
                             for m in f1s}})
        for m in f1s:
            scores = f1s[m]["own" if cell == "pool_x1" else "dedicated"]
            finished(f"aware/{cell}-{m}", section(scores),
                     {"predictions": [{"f1": f} for f in scores]})
    opts = study.StudyOptions(encoders="pool", compressions="4", settings="aware", dedicated=True,
                              output_dir=str(tmp_path), base=TrainOptions(model_id="a,b"))
    costs = [r for r in study.sharing(opts, study.cells(opts)) if r["encoder"] == "pool"
             and r["compression"] == 4.0]
    assert [r["model"] for r in costs] == ["a", "b"]
    for r in costs:
        mine = f1s[r["model"]]
        assert r["shared_of_own_uncompressed"] == pytest.approx(
            sum(mine["shared"]) / sum(mine["own"]))
        assert r["dedicated_of_own_uncompressed"] == pytest.approx(
            sum(mine["dedicated"]) / sum(mine["own"]))
        assert r["shared_of_own_uncompressed_ci"] == list(
            stats.ratio_ci(mine["shared"], mine["own"])[1])
        assert r["dedicated_of_own_uncompressed_ci"] == list(
            stats.ratio_ci(mine["dedicated"], mine["own"])[1])
    assert "| aware | pool | a | 4.00x fewer |" in study.render_sharing(costs)


def test_two_models_named_alike_are_refused_before_they_load(tmp_path):
    for folder in ("a", "b"):
        unloadable_model(tmp_path / folder / "tiny")
    with pytest.raises(UsageError, match=r"--model_id names models alike \(tiny, tiny\)"):
        validate(options(tmp_path, model_id=f"{tmp_path / 'a' / 'tiny'},{tmp_path / 'b' / 'tiny'}"))


def test_the_command_trains_the_pair(tmp_path, tiny_model_dir, tiny_qwen_other_dir, capsys):
    ids = [str(tiny_model_dir), str(tiny_qwen_other_dir)]
    args = ["train", "--model_id", ",".join(ids), "--latent_dim", "16", "--samples", "8",
            "--eval_samples", "3", "--batch_size", "4", "--max_new_tokens", "2"]
    assert main(args + ["--model_weights", "1,2", "--output_dir", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [m["weight"] for m in summary["models"].values()] == [1.0, 2.0]
    _, config = checkpoint.load(tmp_path / "run" / "checkpoints" / "best")
    assert config["compressor"]["latent_dim"] == 16
    assert [a["model"]["id"] for a in config["answerers"]] == ids
    # Other loss weights train otherwise, but the untrained models answer alike: the earlier
    # run's references are taken over.
    capsys.readouterr()
    assert main(args + ["--references_from", str(tmp_path / "run"),
                        "--output_dir", str(tmp_path / "other")]) == 0
    out = capsys.readouterr().out
    assert "references: those of" in out and "not this run's" not in out
    assert (json.loads((tmp_path / "other" / "references.json").read_text())
            == json.loads((tmp_path / "run" / "references.json").read_text()))


def test_the_vocabulary_map_is_the_least_squares_fit_over_the_tokens_both_spell_alike():
    """shared_tokens pairs the ids of one token string in two vocabularies; translation recovers
    an affine map that holds exactly, and on noisy tables is the normal equations' solution."""
    a, b = byte_tokenizer(), other_byte_tokenizer()
    ids_a, ids_b = shared_tokens(a, b, len(a), len(b))
    assert len(ids_a) == 256  # every byte; the merges and each end-of-text token are not shared
    assert [a.convert_ids_to_tokens(i) for i in ids_a] == [b.convert_ids_to_tokens(i)
                                                         for i in ids_b]
    gen = torch.Generator().manual_seed(0)
    source = torch.randn(len(a), 8, generator=gen)
    w, c = torch.randn(12, 8, generator=gen), torch.randn(12, generator=gen)
    exact = torch.randn(len(b), 12, generator=gen)
    exact[ids_b] = source[ids_a] @ w.T + c
    got_w, got_c = translation(VocabSpace(source), VocabSpace(exact), ids_a, ids_b)
    assert torch.allclose(got_w, w, atol=1e-4) and torch.allclose(got_c, c, atol=1e-4)
    noisy = torch.randn(len(b), 12, generator=gen)
    got_w, got_c = translation(VocabSpace(source), VocabSpace(noisy), ids_a, ids_b)
    x = torch.cat([source[ids_a], torch.ones(len(ids_a), 1)], 1).double()
    direct = torch.linalg.solve(x.T @ x, x.T @ noisy[ids_b].double())
    assert torch.allclose(got_w, direct[:-1].T.float(), atol=1e-4)
    assert torch.allclose(got_c, direct[-1].float(), atol=1e-4)
    # Each of b's tokens as a embeds it: its own row where a spells it alike, else the mean of
    # a's rows of its text ("the" -> t, h, e), and a's mean for b's end-of-text token.
    anchors = token_anchors(b, a, VocabSpace(source), len(b))
    for piece in ("a", "th", "the"):
        rows = [a.convert_tokens_to_ids(ch) for ch in piece]
        assert torch.allclose(anchors[b.convert_tokens_to_ids(piece)], source[rows].mean(0))
    assert torch.allclose(anchors[b.convert_tokens_to_ids("<|end|>")], source.mean(0))


def test_an_offset_encoder_shared_by_two_models_starts_as_each_ones_own_kept_tokens(tmp_path):
    """One latent for both: at step 0 the reader (the Llama) reads exactly the tokens its
    selector kept, and the Qwen2 reads its own embedding of each (the same byte, its own id);
    then each model's latent is that plus its map of the offset, which starts as the map
    between the vocabularies, and the offset and both maps train from the two answer losses."""
    lms = pair()
    t = two(tmp_path, lms, encoder="offset:truncate", compression=4.0, keep_question=True)
    llama, qwen = t.answerers
    assert t.reader is llama and t.spec.shared
    rows = [0, 1, 2]
    kept = [x for r in rows for x in llama.train_items[r].span]
    ltok, qtok = lms["llama"].tokenizer, lms["qwen"].tokenizer
    theirs = qtok.convert_tokens_to_ids(ltok.convert_ids_to_tokens(kept))
    with torch.no_grad():
        (z_llama, offsets, _), (z_qwen, _, _) = t.latents(rows)
    sizes = [len(llama.train_items[r].span) for r in rows]
    assert offsets.tolist() == [0, *torch.tensor(sizes).cumsum(0).tolist()]
    assert torch.allclose(z_llama, llama.embed_ids(kept), atol=1e-5)
    assert torch.allclose(z_qwen, qwen.embed_ids(theirs), atol=1e-5)
    ids = shared_tokens(ltok, qtok, llama.vocab.size, qwen.vocab.size)
    w, _ = translation(llama.vocab, qwen.vocab, *ids)
    qwens = t.compressor.adapters["1"]
    assert torch.allclose(qwens.gain * qwens.proj.weight, w)
    # What the optimiser moves has an identity's norm, as the reader's map (the identity) has:
    # Adam's steps are the same fraction of either, whatever the two embedding scales.
    for a in t.compressor.adapters.values():
        width = a.proj.weight.shape[1]
        assert float(a.proj.weight.detach().norm()) == pytest.approx(width ** 0.5, rel=1e-5)
    assert float(t.compressor.adapters["0"].gain) == pytest.approx(1.0)
    for step in range(2):
        t.step(list(range(4)), step)
    for part in (t.compressor.encoder, t.compressor.adapters["0"], t.compressor.adapters["1"]):
        assert sum(float(p.grad.abs().sum()) for p in part.parameters()) > 0
    with torch.no_grad():
        (z_llama, _, _), (z_qwen, _, _) = t.latents(rows)
        x = llama.embed_ids(kept)
        states = torch.cat([t.context_states(i)[i.kept_at]
                            for i in (llama.train_items[r] for r in rows)])
        z, _ = t.compressor.shared(x, sizes, states)
        assert not torch.allclose(z, x, atol=1e-3)  # the offset moved
        for a, mine, own in ((t.compressor.adapters["0"], z_llama, x),
                             (t.compressor.adapters["1"], z_qwen, qwen.embed_ids(theirs))):
            assert torch.allclose(mine, own + a.offset_map(z - x), atol=1e-5)


def test_a_checkpoint_holding_the_whole_offset_map_is_refused_on_resume_not_misread(tmp_path):
    """Before the gain, `last/` held Qwen's map itself (the gain times the matrix): read as
    the matrix it would be scaled twice. Refused in one line; a checkpoint of today resumes."""
    lms = pair()
    opts = options(tmp_path, encoder="offset:truncate", compression=4.0, keep_question=True)
    t = Trainer(opts, validate(opts), quiet, lms)
    t.step(list(range(4)), 0)
    t.save("last", State(step=1))
    again = Trainer(opts, tmp_path / "run", quiet, lms)
    assert again.restore().step == 1
    folder = tmp_path / "run" / "checkpoints" / "last"
    weights, config, optimizer, state = checkpoint.load_training(folder)
    qwens = t.compressor.adapters["1"]
    assert float(qwens.gain) < 0.6  # far enough from 1 for the two readings to differ
    weights["adapters.1.proj.weight"] = qwens.gain * weights["adapters.1.proj.weight"]
    checkpoint.save(folder, weights, {k: v for k, v in config.items()
                                      if k not in ("format", "version")}, optimizer, state)
    again = Trainer(opts, tmp_path / "run", quiet, lms)
    with pytest.raises(UsageError, match="holds qwen's offset map as one matrix"):
        again.restore()


def test_nothing_hard_wires_two_readers_a_run_over_three_has_a_section_per_model(tmp_path):
    """One offset latent for three models (two Llamas of other widths and seeds, and the
    Qwen2): every model's own section, each against its own references, and each model starts
    reading its own embeddings of the kept tokens."""
    lms = {**pair(), "llama2": tiny_lm(hidden=40, seed=2)}
    opts = options(tmp_path, model_id="llama,qwen,llama2", encoder="offset:truncate",
                   compression=4.0, keep_question=True)
    t = Trainer(opts, validate(opts), quiet, lms)
    kept = t.reader.train_items[0].span
    with torch.no_grad():
        latents = t.latents([0])
    assert [z.shape[1] for z, _, _ in latents] == [32, 48, 40]
    assert torch.allclose(latents[2][0], t.answerers[2].embed_ids(kept), atol=1e-5)
    assert run(opts, quiet, lms) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert list(summary["models"]) == ["llama", "qwen", "llama2"]
    for section in summary["models"].values():
        assert set(section["references"]) == {"text", "question_only"}
        assert 0 <= section["final"]["f1"] <= 1


def test_an_offset_encoder_made_for_one_model_is_read_by_another_through_its_own_tokens(
        tmp_path):
    """Transfer on tokens: the Llama's own offset encoder, frozen; the Qwen2 reads its latents as
    its own embeddings of the kept tokens plus its map of the frozen offsets, and only that map
    trains."""
    lms = pair()
    alone = TrainOptions(model_id="llama", encoder="offset:truncate", compression=4.0,
                         keep_question=True, samples=12, eval_samples=4, batch_size=4,
                         max_new_tokens=2, output_dir=str(tmp_path / "alone"))
    assert run(alone, quiet, lms["llama"]) == 0
    best = tmp_path / "alone" / "checkpoints" / "best"
    t = two(tmp_path, lms, model_id="qwen", encoder_model="llama", freeze_encoder=str(best),
            encoder="offset:truncate", compression=4.0, keep_question=True)
    adapter = t.compressor.adapters["0"]
    assert {id(p) for p in t.params} == {id(p) for p in adapter.parameters()}
    llama, (qwen,) = t.reader, t.answerers
    kept = llama.train_items[0].span
    theirs = qwen.lm.tokenizer.convert_tokens_to_ids(
        llama.lm.tokenizer.convert_ids_to_tokens(kept))
    with torch.no_grad():
        ((z_qwen, _, _),) = t.latents([0])
        x = llama.embed_ids(kept)
        item = llama.train_items[0]
        z, _ = t.compressor.shared(x, [len(kept)], t.context_states(item)[item.kept_at])
    assert torch.allclose(z_qwen, qwen.embed_ids(theirs) + adapter.offset_map(z - x), atol=1e-5)
    t.step(list(range(4)), 0)
    assert float(adapter.proj.weight.grad.abs().sum()) > 0


def test_each_model_of_a_pair_prunes_its_own_cache_with_the_press_it_fitted(tmp_path):
    """offset:kvpress:learned over two families: each model fits its own press on its own
    reading of the training questions (its own layers, width and key-value heads), kept in the
    run folder under its name, and the one offset encoder trains through both presses."""
    from latentwire.training.learned_press import LearnedPress

    lms = pair()
    opts = options(tmp_path, encoder="offset:kvpress:learned", compression=4.0,
                   keep_question=True, samples=8, eval_samples=3)
    assert run(opts, quiet, lms) == 0
    for name, lm in lms.items():
        press, config = LearnedPress(), lm.model.config
        assert press.restore(*checkpoint.load_tensors(
            checkpoint.press_file(tmp_path / "run", name)))
        assert tuple(press.weights.shape) == (config.num_hidden_layers, config.hidden_size,
                                              config.num_key_value_heads)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and list(summary["models"]) == ["llama", "qwen"]
