"""Every source's measured effect on a tiny model's real token embeddings."""

import pytest
import torch

from latentwire.sweep import sources
from latentwire.errors import UsageError
from latentwire.vocab import VocabSpace

from .conftest import tiny_llama


@pytest.fixture(scope="module")
def inputs():
    model = tiny_llama(hidden=64)
    space = VocabSpace.from_model(model)
    ids = torch.randint(0, 512, (60,), generator=torch.Generator().manual_seed(0))
    text = space.table[ids]
    return sources.SourceInputs(text, ids, torch.tensor([0, 20, 45, 60]), ["a", "b", "c"],
                                float(space.norms.mean()), seed=42)


def build(spec, inp):
    (s,) = sources.parse(spec)
    out = s.build(inp).x
    return out, sources.effect(inp.text, out)


def test_text_is_unchanged(inputs):
    out, eff = build("text", inputs)
    assert torch.equal(out, inputs.text)


def test_scaled_defaults_to_the_logged_120x(inputs):
    _, eff = build("scaled", inputs)
    assert eff["norm_ratio"] == pytest.approx(120, rel=1e-5)
    assert eff["cosine_to_text"] == pytest.approx(1.0, abs=1e-5)
    assert build("scaled:3", inputs)[1]["norm_ratio"] == pytest.approx(3, rel=1e-5)


def test_noisy_hits_the_requested_cosine(inputs):
    _, eff = build("noisy", inputs)
    assert eff["cosine_to_text"] == pytest.approx(0.89, abs=1e-4)
    assert build("noisy:0.5", inputs)[1]["cosine_to_text"] == pytest.approx(0.5, abs=1e-4)


def test_mismatch_is_both_symptoms(inputs):
    _, eff = build("mismatch", inputs)
    assert eff["cosine_to_text"] == pytest.approx(0.89, abs=1e-4)
    assert eff["norm_ratio"] == pytest.approx(120 / 0.89, rel=1e-3)


def test_shift_adds_one_constant_vector(inputs):
    out, eff = build("shift:0.5", inputs)
    delta = out - inputs.text
    assert torch.allclose(delta, delta[0].expand_as(delta), atol=1e-5)
    assert float(delta[0].norm()) == pytest.approx(0.5 * inputs.vocab_mean_norm, rel=1e-4)
    assert eff["cosine_to_text"] < 0.99


def test_rotated_keeps_norms_and_scrambles_directions(inputs):
    _, eff = build("rotated", inputs)
    assert eff["norm_ratio"] == pytest.approx(1.0, rel=1e-4)
    assert abs(eff["cosine_to_text"]) < 0.3


def test_noise_is_per_example_not_per_batch(inputs):
    out, _ = build("noisy", inputs)
    alone = sources.SourceInputs(inputs.text[20:45], inputs.token_ids[20:45],
                                 torch.tensor([0, 25]), ["b"], inputs.vocab_mean_norm, 42)
    assert torch.allclose(build("noisy", alone)[0], out[20:45])
    assert torch.equal(out, build("noisy", inputs)[0])  # and deterministic


def test_a_trained_checkpoint_is_a_sweep_source(tmp_path, tiny_model_dir):
    """Train briefly, sweep the checkpoint beside the text: fewer rows than the text, a question
    kept as text after them, a new checkpoint at the same path swept again, the text kept, and a
    checkpoint for another width refused."""
    from latentwire import models
    from latentwire.cli import run_sweep
    from latentwire.sweep.options import SweepOptions
    from latentwire.training import checkpoint, loop as training
    from latentwire.training.options import TrainOptions

    lm = models.load(str(tiny_model_dir), "cpu")
    opts = TrainOptions(model_id=str(tiny_model_dir), samples=8, eval_samples=3,
                                 batch_size=4, max_new_tokens=3, keep_question=True,
                                 output_dir=str(tmp_path / "run"))
    assert training.run(opts, lambda *a, **k: None, lm) == 0
    best = tmp_path / "run" / "checkpoints" / "best"
    sweep_opts = SweepOptions(model_id=str(tiny_model_dir), source=f"text,adapter:{best}",
                                    experiment="baseline,rms_scale1.0", samples=4,
                                    max_new_tokens=3, output_dir=str(tmp_path / "sweep"))
    summary, code = run_sweep(sweep_opts, log=lambda *a: None)
    assert code == 0 and summary["successful"] == 4
    adapter = [r for r in summary["results"] if r["source"].startswith("adapter")]
    assert adapter[0]["source_effect"]["compression_ratio"] > 3
    assert adapter[0]["source_config"]["checkpoint_sha256"] == checkpoint.digest(best)

    weights, config = checkpoint.load(best)
    checkpoint.save(best, {k: v + 0.01 for k, v in weights.items()}, config)
    lines = []
    run_sweep(sweep_opts, log=lines.append)
    kept = [l for l in lines if "kept from an earlier run" in l]
    assert len(kept) == 2 and all("(text)" in l for l in kept)

    config["compressor"]["d_model"] = 64
    checkpoint.save(tmp_path / "wide", weights, config)
    with pytest.raises(UsageError, match="width 64 but the model reads width 32"):
        run_sweep(SweepOptions(model_id=str(tiny_model_dir), source=f"adapter:{tmp_path / 'wide'}",
                                     experiment="baseline", samples=2,
                                     output_dir=str(tmp_path / "sweep2")), log=lambda *a: None)


@pytest.mark.parametrize("spec, match", [("txt", "unknown source"), ("scaled:x", "needs a number"),
                                         ("adapter", "needs a checkpoint"),
                                         ("adapter:/no/such/run", "does not exist"),
                                         ("adapter:/tmp", "not a checkpoint folder"),
                                         ("rotated:3", "takes no parameter")])
def test_bad_specs(spec, match):
    with pytest.raises(UsageError, match=match):
        sources.parse(spec)


def test_code_version_covers_the_helpers_a_source_calls(monkeypatch):
    before = sources.code_version("mismatch")
    assert before != sources.code_version("scaled")
    monkeypatch.setattr(sources, "_noisy", sources._scaled)  # different code behind the name
    assert sources.code_version("mismatch") != before
