"""The learned press: what it observes equals a direct reading of the whole prompt, its fit is
the ridge regression computed directly, it keeps per head the positions its weights score
best, and a run fits it on the training questions and evaluates through it."""

import itertools
import json
from types import SimpleNamespace
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from latentwire.errors import UsageError
from latentwire.field import budget, pressed
from latentwire.training import checkpoint
from latentwire.training.learned_press import (RIDGE, LearnedPress, fit, observed,
                                                  paragraphs_of, target)
from latentwire.training.loop import run
from latentwire.training.options import validate
from latentwire.training.trainer import Trainer

from .conftest import tiny_lm
from .test_training import options, quiet


def _paragraphs(lm, shapes=((5, 30, (6, 9)), (5, 24, (7,))), seed=3):
    g = torch.Generator().manual_seed(seed)
    embed = lm.model.get_input_embeddings()
    with torch.no_grad():
        def some(n):
            return embed(torch.randint(3, 200, (n,), generator=g))
        return [(some(p), some(c), [some(t) for t in tails]) for p, c, tails in shapes]


def _direct(lm, prefix, context, tails):
    """Features and attention from one whole pass per tail, the attention inputs taken where
    the model computes them, no cache."""
    model, config = lm.model, lm.model.config
    groups, heads = config.num_key_value_heads, config.num_attention_heads
    start, end = len(prefix), len(prefix) + len(context)
    paid, features = 0, None
    for tail in tails:
        got = []
        hooks = [layer.self_attn.register_forward_pre_hook(
            lambda m, a, k: got.append(k["hidden_states"]), with_kwargs=True)
            for layer in model.model.layers]
        model.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                out = model(inputs_embeds=torch.cat([prefix, context, tail])[None],
                            output_attentions=True)
        finally:
            model.set_attn_implementation("sdpa")
            for h in hooks:
                h.remove()
        features = torch.stack([g[0, start:end] for g in got])
        a = torch.stack([w[0, :, end:, start:end].mean(1) for w in out.attentions])
        paid = paid + a.view(len(a), groups, heads // groups, -1).mean(2)
    return features, paid / len(tails)


def test_what_the_press_observes_equals_one_whole_pass_per_question():
    lm = tiny_lm()
    for prefix, context, tails in _paragraphs(lm):
        features, attention = observed(lm.model, prefix, context, tails)
        want_features, want_attention = _direct(lm, prefix, context, tails)
        torch.testing.assert_close(features, want_features, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(attention, want_attention, rtol=1e-5, atol=1e-6)
    assert lm.model.config._attn_implementation == "sdpa"  # restored after


def test_tails_read_in_several_batches_observe_what_one_pass_per_question_does():
    """More tails than one batch holds, of unequal lengths: the batches' padding and their
    sum over tails give the direct reading's attention."""
    lm = tiny_lm()
    for prefix, context, tails in _paragraphs(lm, shapes=((4, 20, (3, 8, 5, 11, 2)),)):
        features, attention = observed(lm.model, prefix, context, tails, at_once=2)
        want_features, want_attention = _direct(lm, prefix, context, tails)
        torch.testing.assert_close(features, want_features, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(attention, want_attention, rtol=1e-5, atol=1e-6)


def test_the_fit_is_the_ridge_regression_over_every_position_computed_directly():
    lm = tiny_lm()
    paragraphs = _paragraphs(lm)
    weights, questions = fit(lm.model, paragraphs)
    assert questions == 3
    xs, ys = [], []
    for prefix, context, tails in paragraphs:
        f, a = _direct(lm, prefix, context, tails)
        xs.append((f - f.mean(1, keepdim=True)).double())
        ys.append(target(a).double().transpose(1, 2))  # [layers, positions, heads]
    x, y = torch.cat(xs, 1), torch.cat(ys, 1)
    for layer in range(x.shape[0]):
        # Ridge as least squares over rows augmented with sqrt(ridge) * I.
        width = x.shape[2]
        a = torch.cat([x[layer], RIDGE ** 0.5 * torch.eye(width, dtype=x.dtype)])
        b = torch.cat([y[layer], torch.zeros(width, y.shape[2], dtype=y.dtype)])
        want = torch.linalg.lstsq(a, b).solution
        torch.testing.assert_close(weights[layer].double(), want, rtol=1e-4, atol=1e-6)


def test_the_press_keeps_per_head_the_context_positions_its_weights_score_best():
    from transformers import DynamicCache

    lm = tiny_lm()
    prefix, context, _ = _paragraphs(lm)[0]
    width = lm.model.config.hidden_size
    groups = lm.model.config.num_key_value_heads
    weights = torch.randn(len(lm.model.model.layers), width, groups,
                          generator=torch.Generator().manual_seed(0))
    press = LearnedPress(weights=weights)
    with torch.no_grad():
        cache, position = pressed(lm.model, prefix, context, None, press, 4.0)
        features, _ = _direct(lm, prefix, context, [context[:1]])
        full = DynamicCache(config=lm.model.config)
        lm.model(inputs_embeds=torch.cat([prefix, context])[None], cache=full, use_cache=True)
    keep, start = budget(len(context), 4.0), len(prefix)
    assert position == start + len(context)
    for layer, (pruned, whole) in enumerate(zip(cache.layers, full.layers)):
        scores = features[layer] @ weights[layer]  # [positions, heads]
        for head in range(groups):
            chosen = sorted((scores[:, head].argsort(descending=True)[:keep] + start).tolist())
            assert torch.equal(pruned.keys[0, head], whole.keys[0, head, list(range(start)) + chosen])


def test_an_unfitted_press_and_a_run_with_nothing_to_fit_on_are_refused():
    with pytest.raises(UsageError, match="has not been fitted"):
        LearnedPress().make(3, 20, 0, 4.0, False)
    with pytest.raises(UsageError, match="--samples 0 gives it none"):
        validate(options(Path("/tmp/never"), encoder="kvpress:learned", samples=0,
                         keep_question=True, compression=4.0))


def test_a_run_fits_the_press_on_its_training_questions_then_evaluates_through_it(tmp_path):
    lm = tiny_lm()
    opts = options(tmp_path, encoder="kvpress:learned", compression=4.0, samples=12,
                   eval_samples=4, keep_question=True, epochs=3)
    assert run(opts, quiet, lm) == 0
    out = Path(opts.output_dir)
    summary = json.loads((out / "summary.json").read_text())
    # Nothing trains: one evaluation, however many epochs were asked for.
    assert summary["steps"] == 0 and len(summary["epochs"]) == 1
    assert summary["checkpoints"] is None and not (out / "checkpoints").exists()
    assert summary["compression_ratio"] > 2
    recorded = json.loads((out / "config.json").read_text())["provenance"]["field_compressor"]
    assert recorded["encoder"] == "kvpress:learned"
    assert recorded["settings"]["questions"] == 12 and recorded["settings"]["ridge"] == RIDGE
    # A tiny model's fit can round to 0.0 seconds: the record's presence is what is checked.
    assert isinstance(recorded["settings"]["seconds"], float)


def test_offsets_on_the_learned_press_start_as_the_fitted_press_and_learn_through_it(tmp_path):
    """offset:kvpress:learned: the press is fitted as `kvpress:learned` fits it (the same
    weights from the same questions); at step 0 the loss is the fitted press's own, and the
    gradient reaches the offsets through the positions it kept."""
    from .test_training import trainer

    lm = tiny_lm()
    kw = dict(compression=4.0, keep_question=True, samples=12)
    t = trainer(tmp_path / "offset", lm, encoder="offset:kvpress:learned", **kw)
    press = trainer(tmp_path / "press", lm, encoder="kvpress:learned", **kw)
    torch.testing.assert_close(t.answerers[0].field.weights, press.answerers[0].field.weights)
    rows = range(4)
    loss, _ = t.loss(rows)
    expected, _ = press.loss(rows)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    loss.backward()
    assert t.compressor.encoder.mlp[-1].weight.grad.abs().sum() > 0
    opts = options(tmp_path / "run", encoder="offset:kvpress:learned", compression=4.0,
                   samples=8, eval_samples=3, batch_size=4, keep_question=True)
    assert run(opts, quiet, lm) == 0
    summary = json.loads((Path(opts.output_dir) / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["checkpoints"] is not None


def _never_fit(*args, **kwargs):
    raise AssertionError("the press was fitted again")


def _killed(*args, **kwargs):
    raise KeyboardInterrupt


def test_a_resumed_run_reads_the_press_it_fitted_instead_of_fitting_again(tmp_path, monkeypatch):
    """The fit is kept in the run folder as soon as it is made: a run killed after it and
    resumed reads the same weights back and does not fit again."""
    from latentwire.training import learned_press

    lm = tiny_lm()
    opts = options(tmp_path, encoder="offset:kvpress:learned", compression=4.0, samples=8,
                   eval_samples=3, batch_size=4, epochs=2, keep_question=True)
    with pytest.raises(KeyboardInterrupt):
        run(opts, quiet, lm, on_epoch=_killed)
    [saved] = Path(opts.output_dir).glob("press-*.safetensors")
    weights = learned_press.LearnedPress()
    assert weights.restore(*checkpoint.load_tensors(saved))
    assert weights.fitted["questions"] == 8
    assert not learned_press.LearnedPress().restore({"other": weights.weights}, {})
    monkeypatch.setattr(learned_press, "fit", _never_fit)
    said = []
    assert run(replace(opts, resume="yes"), lambda *a, **k: said.append(a[0]), lm) == 0
    assert any("as this run fitted them" in line for line in said)
    summary = json.loads((Path(opts.output_dir) / "summary.json").read_text())
    assert summary["status"] == "finished" and len(summary["epochs"]) == 2


def test_a_press_run_killed_before_it_finished_reads_its_fit_back_when_started_again(
        tmp_path, monkeypatch):
    """kvpress:learned writes no checkpoint (nothing trains): killed in its evaluation, the same
    command started again finds the fit it made, not another run's."""
    from latentwire.training import learned_press

    lm = tiny_lm()
    opts = options(tmp_path, encoder="kvpress:learned", compression=4.0, samples=12,
                   eval_samples=4, keep_question=True)
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "evaluate", _killed)
        with pytest.raises(KeyboardInterrupt):
            run(opts, quiet, lm)
    monkeypatch.setattr(learned_press, "fit", _never_fit)
    said = []
    assert run(opts, lambda *a, **k: said.append(a[0]), lm) == 0
    assert any("as this run fitted them" in line for line in said)
    # Another run started in a folder a killed run left (other flags): its own fit.
    killed_too = replace(opts, output_dir=str(tmp_path / "again"))
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "evaluate", _killed)
        patch.setattr(learned_press, "fit", fit)
        with pytest.raises(KeyboardInterrupt):
            run(killed_too, quiet, lm)
    with pytest.raises(AssertionError, match="fitted again"):
        run(replace(killed_too, seed=7), quiet, lm)


def test_press_from_takes_an_earlier_runs_fit_where_it_is_this_runs_and_fits_otherwise(
        tmp_path, monkeypatch):
    """--press_from: a run with another budget and encoder, on the same model and training
    questions, reads the earlier run's fitted weights (not a refit) and keeps them in its own
    folder; on other training questions it says what differs and fits its own."""
    from latentwire.training import learned_press

    lm = tiny_lm()
    first = options(tmp_path / "first", encoder="kvpress:learned", compression=4.0, samples=12,
                    eval_samples=4, keep_question=True)
    assert run(first, quiet, lm) == 0
    [fitted] = Path(first.output_dir).glob("press-*.safetensors")
    with monkeypatch.context() as patch:
        patch.setattr(learned_press, "fit", _never_fit)
        said = []
        later = replace(first, encoder="offset:kvpress:learned", batch_size=4, max_minutes=5.0,
                        press_from=first.output_dir, output_dir=str(tmp_path / "later"))
        assert run(later, lambda *a, **k: said.append(a[0]), lm) == 0
    assert any(f"fitted by {first.output_dir}" in line for line in said)
    recorded = json.loads((Path(later.output_dir) / "config.json").read_text())["provenance"]
    assert recorded["field_compressor"]["settings"]["fitted_by"] == first.output_dir
    mine = checkpoint.load_tensors(Path(later.output_dir) / fitted.name)
    torch.testing.assert_close(mine[0]["weights"], checkpoint.load_tensors(fitted)[0]["weights"])
    said = []
    other = replace(first, samples=8, press_from=first.output_dir,
                    output_dir=str(tmp_path / "other"))
    assert run(other, lambda *a, **k: said.append(a[0]), lm) == 0
    assert any("is not this run's (training examples)" in line for line in said)
    summary = json.loads((Path(other.output_dir) / "config.json").read_text())
    assert summary["provenance"]["field_compressor"]["settings"]["questions"] == 8


def test_press_samples_takes_whole_paragraphs_in_first_seen_order_until_enough_questions():
    spans = [[1, 2], [3], [1, 2], [4, 5], [3], [6], [1, 2]]
    items = [SimpleNamespace(span=s, tag=n) for n, s in enumerate(spans)]
    embed, prefix = torch.tensor, torch.zeros(1)

    def read(questions):
        return [(c.tolist(), tails) for _, c, tails in
                paragraphs_of(items, embed, prefix, lambda i: i.tag, questions)]

    every = [([1, 2], [0, 2, 6]), ([3], [1, 4]), ([4, 5], [3]), ([6], [5])]
    assert read(0) == every
    assert read(3) == every[:1]  # the first paragraph holds three questions: enough
    assert read(4) == every[:2]  # one more than it holds: the next paragraph, whole
    assert read(99) == every


def test_a_run_fits_its_press_on_press_samples_and_press_from_refits_on_another_count(
        tmp_path, monkeypatch):
    """--press_samples: the run's fit reads whole paragraphs until it has that many questions,
    and records how many; a later run with another count does not take that fit."""
    lm = tiny_lm()
    first = options(tmp_path / "first", encoder="kvpress:learned", compression=4.0, samples=12,
                    eval_samples=4, keep_question=True, press_samples=5)
    assert run(first, quiet, lm) == 0
    settings = json.loads((Path(first.output_dir) / "config.json").read_text())[
        "provenance"]["field_compressor"]["settings"]
    assert 5 <= settings["questions"] < 12
    said = []
    other = replace(first, press_samples=0, press_from=first.output_dir,
                    output_dir=str(tmp_path / "other"))
    assert run(other, lambda *a, **k: said.append(a[0]), lm) == 0
    assert any("is not this run's (--press_samples)" in line for line in said)
    settings = json.loads((Path(other.output_dir) / "config.json").read_text())[
        "provenance"]["field_compressor"]["settings"]
    assert settings["questions"] == 12


def _one_context_twice(t):
    """The trainer's first three training items with the second asking its own question of the
    first's context, as SQuAD's questions of one paragraph do."""
    for a in {id(a): a for a in (*t.answerers, t.reader)}.values():
        first = a.train_items[0]
        a.train_items[1] = replace(a.train_items[1], span=first.span, context=first.context,
                                   kept_at=first.kept_at)
    assert t.answerers[0].train_items[1].question != t.answerers[0].train_items[0].question


def test_questions_of_one_context_read_its_pruned_cache_once_as_each_alone_reads_it(tmp_path):
    """A press that reads no question prunes a context's prompt once for all its questions in
    the micro-batch; their loss and gradient are what reading each question alone gives."""
    from .test_training import trainer

    t = trainer(tmp_path, tiny_lm(), encoder="offset:kvpress:learned", compression=4.0,
                keep_question=True, samples=12)
    _one_context_twice(t)
    alone = []
    for r in range(3):
        t.optimizer.zero_grad(set_to_none=True)
        loss, _ = t.loss([r])
        loss.backward()
        alone.append((float(loss.detach()), [p.grad.clone() for p in t.params]))
    t.optimizer.zero_grad(set_to_none=True)
    loss, _ = t.loss([0, 1, 2])
    loss.backward()
    assert float(loss.detach()) == pytest.approx(sum(l for l, _ in alone), rel=1e-5)
    for n, p in enumerate(t.params):
        torch.testing.assert_close(p.grad, sum(g[n] for _, g in alone), rtol=1e-4, atol=1e-6)


def test_by_paragraph_orders_each_paragraphs_questions_together_and_steps_per_paragraph(tmp_path):
    from latentwire.data import Example

    from .test_training import trainer

    t = trainer(tmp_path, tiny_lm(), encoder="offset:kvpress:learned", compression=4.0,
                keep_question=True, samples=12, batch_size=5, by_paragraph=True)
    contexts = [f"context {n % 4}" for n in range(12)]
    t.split = replace(t.split, train=[Example(str(n), c, f"q{n}", ("a",))
                                      for n, c in enumerate(contexts)])
    for epoch in (0, 1):
        order = [r for b in t.batches(epoch) for r in b]
        assert sorted(order) == list(range(12))
        runs = [c for c, _ in itertools.groupby(contexts[r] for r in order)]
        assert len(runs) == 4  # each paragraph's questions together
        assert t.batches(epoch) == t.batches(epoch)  # seeded by the epoch alone
        for batch in t.batches(epoch):
            parts = t.micro_batches(batch)
            assert [r for p in parts for r in p] == batch
            assert all(len({contexts[r] for r in p}) == 1 for p in parts)
            assert len(parts) == len({contexts[r] for r in batch})
    assert t.batches(0) != t.batches(1)
