"""The field's training-free compressors (latentwire/field.py) on tiny in-process models: each
keeps what it says, at the budget it says, and a run that trains nothing (--samples 0) answers
exactly as the frozen model answers from what was kept, computed directly."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from latentwire import prompts
from latentwire.errors import UsageError
from latentwire.field import (Press, RandomTokens, Sentences, Stride, Truncate, answer_pressed,
                              budget)
from latentwire.generation import StopTokens, generate_reference
from latentwire.scoring import cut_answer
from latentwire.training.loop import run
from latentwire.training.options import validate
from latentwire.training.trainer import Trainer

from .conftest import byte_tokenizer, other_byte_tokenizer, tiny_lm
from .test_training import options, quiet, trainer

kvpress = pytest.importorskip("kvpress")


def test_budget_is_ceil_n_over_r_and_never_empty():
    assert [budget(n, 4) for n in (1, 4, 5, 170)] == [1, 1, 2, 43]
    assert budget(170, 16) == 11 and budget(3, 1) == 3


def test_truncate_and_random_tokens_keep_the_budget_in_order():
    spans = [list(range(100, 100 + n)) for n in (9, 40, 170)]
    assert Truncate().select(spans, [], [], 4, None, "") == [s[:budget(len(s), 4)] for s in spans]
    picked = RandomTokens(seed=3).select(spans, [], [], 4, None, "")
    for span, kept in zip(spans, picked):
        assert len(kept) == budget(len(span), 4) and kept == sorted(kept)
        assert set(kept) <= set(span)
    assert picked == RandomTokens(seed=3).select(spans, [], [], 4, None, "")
    assert picked != RandomTokens(seed=4).select(spans, [], [], 4, None, "")


def test_stride_keeps_one_token_in_every_chunk_of_the_context_ending_at_its_last():
    for n in (1, 3, 9, 40, 170):
        for ratio in (1.0, 4.0, 16.0):
            [at] = Stride().positions([list(range(n))], [], [], ratio, None, "")
            k = budget(n, ratio)
            # The chunks each kept position ends: k of them, covering all n positions, as even
            # as integers allow (sizes differ by at most one), each ending at its kept token.
            sizes = [b - a for a, b in zip([-1] + at, at)]
            assert len(at) == k and sum(sizes) == n and at[-1] == n - 1
            assert set(sizes) <= {n // k, -(-n // k)}


def _sentences(context: str, question: str, keep: int, tokenizer=None) -> str:
    """What `sentences` keeps of a context at a ratio that leaves `keep` of its tokens."""
    tok = tokenizer or byte_tokenizer()
    span = tok(context, add_special_tokens=False).input_ids
    [kept] = Sentences().select([span], [context], [question], len(span) / (keep - 0.5), tok, "")
    assert len(kept) == keep == budget(len(span), len(span) / (keep - 0.5))
    return tok.decode(kept)


def test_sentences_keeps_whole_the_sentences_holding_the_questions_rarest_words():
    # "the" and "is" are in four of five sentences; "river" in one. Counted, the first sentence
    # holds two of the question's words and the river's one; weighted by rarity, the river's
    # sentence outweighs it (2 log(1 + 5/4) < log(1 + 5)).
    context = "The city is big. A river flows here. The cat is small. The sky is blue. The day is long."
    river = " A river flows here."
    assert _sentences(context, "Is the river wide?", len(river)) == river
    # Room for two: the river's, then the next heaviest (the earlier of four level ones), in
    # the context's order.
    assert _sentences(context, "Is the river wide?", len(river) + len("The city is big.")) \
        == "The city is big." + river
    # A sentence longer than what is left gives its window holding the most weight.
    assert _sentences(context, "What flows?", 5) == "flows"
    # Nothing asked is in the context: the first sentences, as truncate would keep.
    assert _sentences(context, "Why?", 10) == context[:10]


def test_sentences_refuses_a_span_that_is_not_the_readers_tokens_of_the_text():
    context = "A river flows here. The cat is small."
    span = byte_tokenizer()(context, add_special_tokens=False).input_ids
    with pytest.raises(UsageError, match="tokenisation"):
        Sentences().select([span], [context], ["river?"], 4, other_byte_tokenizer(), "")


def _prompt(lm, lengths=(9, 40, 7, 3), seed=1):
    g = torch.Generator().manual_seed(seed)
    embed = lm.model.get_input_embeddings()
    with torch.no_grad():
        return tuple(embed(torch.randint(3, 200, (n,), generator=g)) for n in lengths)


def _stops(lm):
    return StopTokens(lm.tokenizer, lm.model, lm.model.get_input_embeddings().weight.shape[0])


@pytest.mark.parametrize("aware", [False, True])
def test_a_press_that_keeps_everything_answers_as_the_model_reads_the_whole_prompt(aware):
    lm = tiny_lm()
    prompt = _prompt(lm)
    [ids] = answer_pressed(lm.model, [prompt], Press(name="knorm"), 1.0, aware, _stops(lm), 8)
    text = cut_answer(lm.tokenizer.decode(ids, skip_special_tokens=True))
    assert text == generate_reference(lm.model, lm.tokenizer, torch.cat(prompt), 8)


@pytest.mark.parametrize("encoder", ["truncate", "kvpress:knorm"])
def test_a_ratio_beyond_the_shortest_context_is_refused_in_one_line(tmp_path, encoder):
    """Keeping at least one token of a context shorter than the ratio is not that ratio."""
    lm = tiny_lm()
    shortest = min(i.text for i in trainer(tmp_path / "ok", lm, encoder=encoder,
                                           compression=2.0, samples=0).answerers[0].eval_items)
    with pytest.raises(UsageError, match=f"shortest context here is {shortest} tokens"):
        trainer(tmp_path / "far", lm, encoder=encoder, compression=float(shortest + 1),
                samples=0)
    trainer(tmp_path / "edge", lm, encoder=encoder, compression=float(shortest), samples=0)


@torch.no_grad()
def _answer_alone(model, cache, position: int, rest, stops, max_new_tokens: int) -> list[int]:
    """Greedy tokens after a cache, directly: `rest` read from `position` on, then one token
    per pass, the stop token kept."""
    embeds, ids = rest, []
    for _ in range(max_new_tokens):
        positions = torch.arange(position, position + embeds.shape[0])
        out = model(inputs_embeds=embeds[None], use_cache=True, position_ids=positions[None],
                    cache=cache)
        position += embeds.shape[0]
        ids.append(int(out.logits[0, -1].argmax()))
        if ids[-1] in stops.ids:
            break
        embeds = model.get_input_embeddings()(torch.tensor([ids[-1]]))
    return ids


@pytest.mark.parametrize("aware", [False, True])
def test_prompts_decoding_together_answer_as_each_alone(aware):
    """Prompts of different lengths, pruned one at a time, then decoding as one left-padded
    batch: each gets the tokens it gets alone, read and decoded one step at a time."""
    from latentwire.field import pressed

    lm = tiny_lm()
    prompts = [_prompt(lm, lengths=lengths, seed=seed) for seed, lengths in
               enumerate([(9, 40, 7, 3), (5, 23, 11, 3), (9, 61, 4, 2)])]
    press, stops = Press(name="knorm"), _stops(lm)
    together = answer_pressed(lm.model, prompts, press, 4.0, aware, stops, 10)
    for (prefix, context, question, anchor), got in zip(prompts, together):
        cache, position = pressed(lm.model, prefix, context, question if aware else None,
                                  press, 4.0)
        rest = torch.cat(([] if aware else [question]) + [anchor])
        assert got == _answer_alone(lm.model, cache, position, rest, stops, 10)
    assert len({tuple(t) for t in together}) > 1  # the rows did not all answer alike


@pytest.mark.parametrize("aware", [False, True])
def test_questions_on_one_paragraph_share_its_pressing_unless_the_press_reads_them(aware,
                                                                                  monkeypatch):
    """A paragraph's questions, query-agnostic: the paragraph is pressed once however its
    questions are spread, and each answers as it does alone; where the question is read under
    the press, once each."""
    from latentwire import field

    lm = tiny_lm()
    prefix, context, first, anchor = _prompt(lm, lengths=(9, 40, 7, 3), seed=0)
    questions = [first] + [_prompt(lm, lengths=(9, 40, n, 3), seed=s)[2]
                           for s, n in ((1, 5), (2, 9))]
    prompts = [(prefix, context.clone(), q, anchor) for q in questions]
    prompts.insert(1, _prompt(lm, lengths=(9, 23, 6, 3), seed=3))  # another paragraph between
    press, stops, passes = Press(name="knorm"), _stops(lm), []
    live = field.pressed
    monkeypatch.setattr(field, "pressed", lambda *a, **k: passes.append(1) or live(*a, **k))
    together = answer_pressed(lm.model, prompts, press, 4.0, aware, stops, 10)
    assert len(passes) == (4 if aware else 2)
    for (p, c, q, a), got in zip(prompts, together):
        cache, position = live(lm.model, p, c, q if aware else None, press, 4.0)
        rest = torch.cat(([] if aware else [q]) + [a])
        assert got == _answer_alone(lm.model, cache, position, rest, stops, 10)
    assert len({tuple(together[n]) for n in (0, 2, 3)}) > 1  # the questions answered apart


@pytest.mark.parametrize("name", ["snapkv", "expected_attention", "tova", "knorm",
                                  "streaming_llm", "random"])
@pytest.mark.parametrize("aware", [False, True])
def test_each_press_prunes_the_context_alone_to_its_budget(name, aware):
    from transformers import DynamicCache

    lm = tiny_lm()
    prefix, context, question, _ = _prompt(lm)
    first = torch.cat([prefix, context] + ([question] if aware else []))
    cache = DynamicCache(config=lm.model.config)
    with Press(name=name).make(len(prefix), len(context), len(question) if aware else 0, 4.0,
                               aware)(lm.model), torch.no_grad():
        lm.model(inputs_embeds=first[None], cache=cache, use_cache=True)
    kept = len(prefix) + budget(len(context), 4.0) + (len(question) if aware else 0)
    full = DynamicCache(config=lm.model.config)
    with torch.no_grad():
        lm.model(inputs_embeds=first[None], cache=full, use_cache=True)
    for pruned, whole in zip(cache.layers, full.layers):
        assert pruned.keys.shape[2] == kept
        # The prefix and the question are kept whole, where they were.
        assert torch.equal(pruned.keys[:, :, :len(prefix)], whole.keys[:, :, :len(prefix)])
        if aware:
            assert torch.equal(pruned.keys[:, :, -len(question):],
                               whole.keys[:, :, -len(question):])


def test_knorm_keeps_the_context_keys_of_lowest_norm_per_head():
    """kvpress's Knorm keeps the keys of smallest norm: computed directly from the full cache."""
    from transformers import DynamicCache

    lm = tiny_lm()
    prefix, context, _, _ = _prompt(lm)
    first = torch.cat([prefix, context])
    cache, full = (DynamicCache(config=lm.model.config) for _ in range(2))
    with Press(name="knorm").make(len(prefix), len(context), 0, 4.0, False)(lm.model), \
            torch.no_grad():
        lm.model(inputs_embeds=first[None], cache=cache, use_cache=True)
    with torch.no_grad():
        lm.model(inputs_embeds=first[None], cache=full, use_cache=True)
    keep, start = budget(len(context), 4.0), len(prefix)
    for pruned, whole in zip(cache.layers, full.layers):
        norms = whole.keys[0, :, start:].norm(dim=-1)  # [heads, context]
        for head in range(norms.shape[0]):
            chosen = sorted((norms[head].argsort()[:keep] + start).tolist())
            expected = whole.keys[0, head, list(range(start)) + chosen]
            assert torch.equal(pruned.keys[0, head], expected)


def test_kvpress_as_adapted_prunes_a_prefill_and_leaves_a_later_pass_alone():
    """kvpress's own KnormPress, unwrapped, under adapt_kvpress: on transformers 5 it reads the
    cache and the pass's positions as on the transformers it was written for, so it prunes the
    first pass to its ratio and, as kvpress intends, not a pass that extends a cache."""
    from transformers import DynamicCache

    from latentwire.field import adapt_kvpress

    adapt_kvpress()
    lm = tiny_lm()
    first, later = _prompt(lm, lengths=(20, 6))
    cache = DynamicCache(config=lm.model.config)
    with kvpress.KnormPress(compression_ratio=0.5)(lm.model), torch.no_grad():
        lm.model(inputs_embeds=first[None], cache=cache, use_cache=True)
        assert cache.get_seq_length() == 10
        lm.model(inputs_embeds=later[None], cache=cache, use_cache=True,
                 position_ids=torch.arange(20, 26)[None])
    assert cache.get_seq_length() == 16


def _kvzip_scores(lm, prompt_ids: list[int], start: int, repeat_ids: list[int]) -> list:
    """KVzip's score, computed directly: per layer and key/value head, each context position's
    highest attention from the reader's repetition of the context (queries over the first
    n_sink positions, the context and the repetition, causal within it), over the repetition's
    queries and the heads sharing the key."""
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cache, seen = DynamicCache(config=lm.model.config), {}
    with torch.no_grad():
        lm.model(torch.tensor([prompt_ids]), cache=cache, use_cache=True)
        hooks = [layer.self_attn.register_forward_hook(
            lambda m, a, k, o: seen.__setitem__(m.layer_idx, (k["hidden_states"],
                                                              k["position_embeddings"])),
            with_kwargs=True) for layer in lm.model.model.layers]
        lm.model(torch.tensor([repeat_ids]), cache=cache, use_cache=True)
        for h in hooks:
            h.remove()
    scores, n, sink = [], len(repeat_ids), min(4, start)
    for layer in lm.model.model.layers:
        attn = layer.self_attn
        hidden, (cos, sin) = seen[attn.layer_idx]
        q = attn.q_proj(hidden).view(1, n, -1, attn.head_dim).transpose(1, 2)
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        keys = cache.layers[attn.layer_idx].keys
        heads, kv = q.shape[1], keys.shape[1]
        mine = torch.cat([keys[:, :, :sink], keys[:, :, start:len(prompt_ids)],
                          keys[:, :, -n:]], dim=2).repeat_interleave(heads // kv, dim=1)
        logits = q @ mine.transpose(-1, -2) / attn.head_dim ** 0.5
        logits[..., -n:] += torch.full((n, n), float("-inf")).triu(1)
        weights = logits.softmax(-1)[..., sink:sink + len(prompt_ids) - start]
        scores.append(weights.view(1, kv, heads // kv, n, -1).amax(dim=(2, 3)))
    return scores


@pytest.mark.parametrize("aware", [False, True])
def test_kvzip_keeps_the_context_positions_its_repetition_attends_to_most(aware):
    """KVzip (kvpress's, driven through our prompt) keeps ceil(N/R) context positions per head:
    those of highest score computed directly, the prefix whole; it is query-agnostic, so the
    question is read after the pruning in either setting."""
    from kvpress.presses.kvzip_press import KVzipPress
    from transformers import DynamicCache

    from latentwire.field import Repeat

    lm, g = tiny_lm(), torch.Generator().manual_seed(5)
    prefix, context, question, anchor = (torch.randint(3, 200, (n,), generator=g).tolist()
                                         for n in (6, 30, 5, 3))
    prompt = prefix + context
    tok = lm.tokenizer
    press = Press(name="kvzip", query_aware=False)
    repeat = Repeat(prompt, anchor, tok)
    cache = DynamicCache(config=lm.model.config)
    with press.make(len(prefix), len(context), 0, 4.0, False, repeat)(lm.model), torch.no_grad():
        lm.model(torch.tensor([prompt]), cache=cache, use_cache=True)
    full = DynamicCache(config=lm.model.config)
    with torch.no_grad():
        lm.model(torch.tensor([prompt]), cache=full, use_cache=True)
    # What kvpress asks the reader for: its first chunk's request, our anchor, the context.
    ask = tok.encode("\n\nRepeat the previous context exactly.", add_special_tokens=False)
    scores = _kvzip_scores(lm, prompt, len(prefix), ask + anchor + context)
    keep, start = budget(len(context), 4.0), len(prefix)
    assert KVzipPress.chunk_size > len(context)  # one repetition: the request above is its
    for pruned, whole, score in zip(cache.layers, full.layers, scores):
        assert pruned.keys.shape[2] == start + keep
        for head in range(score.shape[1]):
            chosen = sorted((score[0, head].argsort(descending=True)[:keep] + start).tolist())
            assert torch.equal(pruned.keys[0, head], whole.keys[0, head, list(range(start)) + chosen])
            assert torch.equal(pruned.values[0, head],
                               whole.values[0, head, list(range(start)) + chosen])
    # In the query-aware setting too, the question is read after the pruning, as text.
    embed = lm.model.get_input_embeddings()
    with torch.no_grad():
        parts = tuple(embed(torch.tensor(ids)) for ids in (prefix, context, question, anchor))
    answers = [answer_pressed(lm.model, [parts], press, 4.0, a, _stops(lm), 6, [repeat])
               for a in (False, aware)]
    assert answers[0] == answers[1]


def test_zero_shot_truncate_answers_from_the_kept_tokens_as_the_model_reads_them(tmp_path):
    lm = tiny_lm()
    opts = options(tmp_path, encoder="truncate", compression=4.0, samples=0, eval_samples=4)
    assert run(opts, quiet, lm) == 0
    out = Path(opts.output_dir)
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_parameters"] == 0 and summary["steps"] == 0
    assert summary["eval_compress_seconds"] >= 0
    # Nothing trained, nothing kept but the evaluation; a rerun has nothing to do.
    assert summary["checkpoints"] is None and not (out / "checkpoints").exists()
    assert {"summary.json", "config.json", "references.json", "eval"} <= {
        p.name for p in out.iterdir()}
    said = []
    assert run(replace(opts, resume="auto"), lambda *a, **k: said.append(a[0]), lm) == 0
    assert said == [f"nothing to train: {out} holds this evaluation, finished"]
    with pytest.raises(UsageError, match="holds a run already"):
        run(opts, quiet, lm)  # without --resume: refused, as any run's folder
    with pytest.raises(UsageError, match="holds another run"):
        run(replace(opts, resume="auto", compression=2.0), quiet, lm)
    t = Trainer(opts, out, quiet, lm)  # the same split and items, for the direct computation
    a = t.answerers[0]
    predictions = json.loads((out / "eval" / "epoch1.json").read_text())["predictions"]
    for item, got in zip(a.eval_items, predictions):
        ctx = prompts.encode_span(lm.tokenizer, a.fmt, item.example.context,
                                  item.example.question, True)[0]
        assert item.span == ctx[:budget(len(ctx), 4.0)] and item.text == len(ctx)
        row = torch.cat([a.prefix, a.embed_ids(item.span), a.embed_ids(item.question), a.anchor])
        assert got["prediction"] == generate_reference(lm.model, lm.tokenizer, row,
                                                       opts.max_new_tokens)
    assert summary["compression_ratio"] > 1.5


def test_zero_shot_press_answers_through_the_pruned_cache(tmp_path):
    import json

    lm = tiny_lm()
    opts = options(tmp_path, encoder="kvpress:knorm", compression=4.0, samples=0,
                   eval_samples=4, keep_question=True)
    assert run(opts, quiet, lm) == 0
    out = Path(opts.output_dir)
    t = Trainer(opts, out, quiet, lm)
    a = t.answerers[0]
    rows = [(a.prefix, a.embed_ids(i.span), a.embed_ids(i.question), a.anchor)
            for i in a.eval_items]
    direct = [cut_answer(lm.tokenizer.decode(ids, skip_special_tokens=True)) for ids in
              answer_pressed(lm.model, rows, Press(name="knorm"), 4.0, False, a.stops,
                             opts.max_new_tokens)]
    got = json.loads((out / "eval" / "epoch1.json").read_text())["predictions"]
    assert [p["prediction"] for p in got] == direct
    recorded = json.loads((out / "config.json").read_text())["provenance"]["field_compressor"]
    assert recorded["encoder"] == "kvpress:knorm" and recorded["press"] == "KnormPress"
    assert recorded["kvpress"] == "0.5.5"


@pytest.mark.parametrize("press", ["knorm", "kvzip"])
def test_a_press_keeping_everything_trains_as_the_text_is_read(tmp_path, press):
    """The adapter reader on a press: at 1x a press keeps every position, so its loss, read one
    item at a time through the press, equals the loss of the same adapter on the whole context
    read in one batch (truncate at 1x), and so do the gradients."""
    from .test_training import trainer

    lm = tiny_lm()
    losses, grads = [], []
    for n, encoder in enumerate([f"kvpress:{press}", "truncate"]):
        t = trainer(tmp_path / str(n), lm, encoder=encoder, compression=1.0, keep_question=True)
        loss, parts = t.loss(range(4))
        loss.backward()
        losses.append((float(loss.detach()), parts["ce"]))
        grads.append(torch.cat([p.grad.flatten() for p in t.params]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert float(grads[0].abs().sum()) > 0


@pytest.mark.parametrize("aware", [False, True])
def test_the_adapter_reader_trains_through_a_pruning_press_and_is_evaluated_through_it(
        tmp_path, aware):
    """At 4x the gradient reaches the adapter through the positions the press keeps; the run
    trains, and its evaluation is answer_pressed on the trained adapter's output."""
    import json

    from .test_training import trainer

    lm = tiny_lm()
    t = trainer(tmp_path / "one", lm, encoder="kvpress:snapkv", compression=4.0,
                keep_question=not aware)
    loss, _ = t.loss(range(4))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in t.params)
    assert sum(float(p.grad.abs().sum()) for p in t.params) > 0
    opts = options(tmp_path, encoder="kvpress:snapkv", compression=4.0, samples=8,
                   eval_samples=3, batch_size=4, keep_question=not aware)
    assert run(opts, quiet, lm) == 0
    summary = json.loads((Path(opts.output_dir) / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["trainable_parameters"] > 0


@pytest.mark.parametrize("flags, words", [
    (dict(encoder="longllmlingua", samples=0, keep_question=True), "drop --keep_question"),
    (dict(encoder="truncate", samples=0, model_id="a,b"), "pass one --model_id"),
])
def test_what_a_field_compressor_cannot_do_is_one_line_before_the_model_loads(
        tmp_path, flags, words):
    with pytest.raises(UsageError, match=words):
        validate(options(tmp_path, **flags))


def _llmlingua_case(tiny_model_dir):
    pytest.importorskip("llmlingua")
    from latentwire.models import load

    lm = load(str(tiny_model_dir), "cpu")
    # Several of LLMLingua's windows long, so that it reads through its own cache.
    context = "Context: " + " ".join(["the river runs past the old mill"] * 6) + "\n"
    return lm, context, lm.tokenizer(context, add_special_tokens=False).input_ids


@pytest.mark.parametrize("aware", [False, True])
def test_llmlingua_keeps_at_most_the_budget_in_the_readers_tokens(tiny_model_dir, aware):
    from latentwire.field import LLMLingua

    lm, context, span = _llmlingua_case(tiny_model_dir)
    [kept] = LLMLingua(query_aware=aware).select([span], [context], ["where is the mill?"], 4.0,
                                                 lm.tokenizer, str(tiny_model_dir))
    assert 0 < len(kept) <= budget(len(span), 4.0)


def test_llmlinguas_scorer_reads_through_its_cache_as_through_the_whole_text(tiny_model_dir):
    """llmlingua scores a long prompt window by window, handing the model its cache as
    [keys, values] pairs, which transformers 5 no longer takes: the losses read through that
    cache must be those of one pass over the whole text."""
    from latentwire.field import LLMLingua

    lm, context, span = _llmlingua_case(tiny_model_dir)
    scorer = LLMLingua()._load(lm.tokenizer, str(tiny_model_dir))
    ids = torch.tensor([span])
    mask = torch.ones_like(ids)
    whole = scorer.get_ppl("", "token", ids, mask)
    first, cache = scorer.get_ppl("", "token", ids, mask, end=30, return_kv=True)
    rest = scorer.get_ppl("", "token", ids, mask, past_key_values=cache)
    # Its own bookkeeping skips the loss of the token at the seam.
    torch.testing.assert_close(first, whole[:29])
    torch.testing.assert_close(rest, whole[30:], rtol=1e-4, atol=1e-4)


def test_llmlingua_that_does_not_compress_is_refused_not_recorded_as_llmlingua(
        tiny_model_dir, monkeypatch):
    """Cutting an uncompressed context to the budget would be `truncate` under its name."""
    from llmlingua import PromptCompressor

    from latentwire.field import LLMLingua

    lm, context, span = _llmlingua_case(tiny_model_dir)
    monkeypatch.setattr(PromptCompressor, "compress_prompt",
                        lambda self, ctx, **_: {"compressed_prompt": ctx[0]})
    with pytest.raises(UsageError, match="did not compress it"):
        LLMLingua().select([span], [context], ["where?"], 4.0, lm.tokenizer, str(tiny_model_dir))


@pytest.mark.parametrize("encoder,setting,aware", [("offset:sentences", "aware", True),
                                                   ("offset:truncate", "agnostic", False),
                                                   ("offset:truncate", "aware", False),
                                                   ("offset:stride", "agnostic", False),
                                                   ("offset:sentences:once", "aware", True),
                                                   ("attend:sentences:once", "aware", True),
                                                   ("attend:truncate", "agnostic", False)])
def test_an_offset_encoder_starts_as_its_selector_and_reads_the_models_states_at_its_tokens(
        tmp_path, encoder, setting, aware):
    lm = tiny_lm()
    t = trainer(tmp_path, lm, encoder=encoder, compression=4.0,
                keep_question=setting == "agnostic")
    selector = {"offset:sentences": Sentences(), "offset:truncate": Truncate(),
                "offset:stride": Stride(), "offset:sentences:once": Sentences(),
                "attend:sentences:once": Sentences(), "attend:truncate": Truncate()}[encoder]
    readings = 1 if encoder.endswith(":once") else 2
    a = t.answerers[0]
    items = a.train_items[:4]
    # Step 0: the latents are the tokens the selector keeps, exactly.
    for item in items:
        ctx = prompts.encode_span(lm.tokenizer, a.fmt, item.example.context,
                                  item.example.question, True)[0]
        [kept] = selector.select([ctx], [a.fmt.context_text(item.example.context)],
                                 [item.example.question], 4.0, lm.tokenizer, "")
        assert item.context == ctx and item.span == kept == [ctx[p] for p in item.kept_at]
    z, offsets, _ = t.latents(range(4))[0]
    assert torch.equal(z, a.embed_ids([tok for i in items for tok in i.span]).float())
    # Each state is the model's last state at that kept token of the context's last reading
    # (the second, or with `:once` the only one), after the question where the selector reads
    # it (`sentences`; `truncate` never does): computed directly, one prefix at a time.
    model, embed = lm.model, lm.model.get_input_embeddings()
    for row, item in enumerate(items):
        question = item.question if aware else []
        ids = question + item.context * readings
        got = t.context_states(item)[item.kept_at]
        for n, p in enumerate(item.kept_at):
            upto = embed(torch.tensor(ids[:len(question) + len(item.context) * (readings - 1)
                                          + p + 1]))
            direct = model.base_model(inputs_embeds=upto[None]).last_hidden_state[0, -1]
            torch.testing.assert_close(got[n], direct, rtol=1e-4, atol=1e-5)
    # Kept, once per context it read (with the question, once per question): a later epoch,
    # or another question on the same paragraph (query-agnostic), reuses them.
    reads = {(tuple(i.question) if aware else (), tuple(i.context)) for i in items}
    assert len(t._states) == len(reads)
    computed = t._states[next(iter(reads))]
    t.context_states(items[0])
    assert len(t._states) == len(reads) and t._states[next(iter(reads))] is computed
    # It trains: the offset moves the latents away from the selector's tokens.
    loss, _ = t.loss(range(4))
    loss.backward()
    assert t.compressor.encoder.mlp[-1].weight.grad.abs().sum() > 0


def test_an_offset_encoder_on_a_press_starts_as_the_press_and_learns_through_what_it_keeps(
        tmp_path):
    """offset:kvpress:expected_attention: every token of the context is a latent, plus an
    offset from the model's state there (its second reading); the press prunes their keys and
    values after. At step 0 the loss is the press's own with the identity adapter, and the
    gradient reaches the offset through the positions the press kept."""
    import json

    lm = tiny_lm()
    t = trainer(tmp_path / "offset", lm, encoder="offset:kvpress:expected_attention",
                compression=4.0, keep_question=True)
    press = trainer(tmp_path / "press", lm, encoder="kvpress:expected_attention",
                    compression=4.0, keep_question=True)
    a, rows = t.answerers[0], range(4)
    items = a.train_items[:4]
    assert [i.span for i in items] == [i.span for i in press.answerers[0].train_items[:4]]
    z, _, _ = t.latents(rows)[0]
    assert torch.equal(z, a.embed_ids([tok for i in items for tok in i.span]).float())
    embed = lm.model.get_input_embeddings()
    for item in items:
        twice = embed(torch.tensor(item.span * 2))[None]
        direct = lm.model.base_model(inputs_embeds=twice).last_hidden_state[0, len(item.span):]
        torch.testing.assert_close(t.context_states(item), direct, rtol=1e-4, atol=1e-5)
    loss, _ = t.loss(rows)
    expected, _ = press.loss(rows)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    loss.backward()
    assert t.compressor.encoder.mlp[-1].weight.grad.abs().sum() > 0
    opts = options(tmp_path / "run", encoder="offset:kvpress:expected_attention",
                   compression=4.0, samples=8, eval_samples=3, batch_size=4, keep_question=True)
    assert run(opts, quiet, lm) == 0
    summary = json.loads((Path(opts.output_dir) / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["compression_ratio"] > 2


def test_an_attending_encoders_kept_tokens_read_every_state_of_their_own_context(tmp_path):
    """attend:*: each kept token's read is multi-head attention over the states of every token
    of its own context, computed directly one query at a time; a dropped token's state reaches
    the latents, another example's never does."""
    from latentwire.training.encoders import Layout, _sinusoid

    lm = tiny_lm()
    t = trainer(tmp_path, lm, encoder="attend:truncate", compression=4.0, keep_question=True)
    enc, items = t.compressor.encoder, t.answerers[0].train_items[:3]
    contexts = [t.context_states(i) for i in items]
    states = enc.gather(contexts, [i.kept_at for i in items])
    lengths = [len(i.span) for i in items]
    layout = Layout.of(lengths, t.compressor.spec.counts(lengths))
    got = enc.read(states, layout)
    d, heads = contexts[0].shape[1], enc.heads
    row = 0
    for context, item in zip(contexts, items):
        keys = enc.norm_context(context) + _sinusoid(torch.arange(len(context)), d)
        k, v = enc.k(keys), enc.v(keys)
        for p in item.kept_at:
            q = enc.q(enc.norm_state(context[p]) + _sinusoid(torch.tensor([p]), d)[0])
            direct = []
            for h in range(heads):
                cut = slice(h * d // heads, (h + 1) * d // heads)
                w = torch.softmax(k[:, cut] @ q[cut] / (d // heads) ** 0.5, 0)
                direct.append(w @ v[:, cut])
            torch.testing.assert_close(got[row], torch.cat(direct), rtol=1e-4, atol=1e-5)
            row += 1
    assert row == len(got)
    # With the MLP's last layer moved off zero, a dropped token's state moves its own
    # example's latents and no other's.
    torch.nn.init.normal_(enc.mlp[-1].weight, std=0.1)
    x = t.answerers[0].embed_ids([x for i in items for x in i.span]).float()
    before = enc(x, layout, states)
    dropped = max(set(range(len(items[0].context))) - set(items[0].kept_at))
    changed = [c.clone() for c in contexts]
    changed[0][dropped] += torch.randn(d)  # (a constant shift is one LayerNorm removes)
    after = enc(x, layout, enc.gather(changed, [i.kept_at for i in items]))
    mine = len(items[0].kept_at)
    assert not torch.allclose(after[:mine], before[:mine])
    torch.testing.assert_close(after[mine:], before[mine:])


def test_an_offset_encoder_trains_and_is_evaluated_end_to_end(tmp_path):
    import json

    lm = tiny_lm()
    opts = options(tmp_path, encoder="offset:sentences", compression=4.0)
    assert run(opts, quiet, lm) == 0
    summary = json.loads((Path(opts.output_dir) / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["trainable_parameters"] > 0
    assert summary["compression_ratio"] > 1.5


def test_reconstruction_reads_again_the_whole_context_not_the_kept_tokens(tmp_path):
    """--recon_weight after an offset encoder: the target is every token of the context the
    selector read, each predicted after the latents and the context before it."""
    lm = tiny_lm()
    t = trainer(tmp_path, lm, encoder="offset:truncate", compression=4.0, keep_question=True,
                recon_weight=1.0)
    rows = [0, 1]
    items = [t.reader.train_items[r] for r in rows]
    ((z, offsets, _),) = t.latents(rows)
    _, parts = t.reader.loss(z, offsets, items)
    expected = 0.0
    for n, item in enumerate(items):
        assert len(item.context) > 2 * len(item.span)
        row = torch.cat([t.reader.prefix, z[offsets[n]:offsets[n + 1]],
                         t.reader.embed_ids(item.context[:-1])])
        logits = lm.model(inputs_embeds=row[None]).logits[0, -len(item.context):]
        expected += float(F.cross_entropy(logits, torch.tensor(item.context)).detach())
    assert parts["recon"] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(UsageError, match="--recon_weight: --encoder kvpress:snapkv prunes"):
        validate(options(tmp_path, encoder="kvpress:snapkv", recon_weight=1.0))


def test_an_offset_encoders_states_at_a_lower_layer_are_that_layers_output(tmp_path):
    lm = tiny_lm()
    t = trainer(tmp_path, lm, encoder="offset:truncate", compression=4.0, keep_question=True,
                encoder_layer=1)
    item = t.answerers[0].train_items[0]
    got = t.context_states(item)[item.kept_at]
    ids = torch.tensor(item.context + item.context)
    whole = lm.model.base_model(inputs_embeds=lm.model.get_input_embeddings()(ids)[None],
                                output_hidden_states=True)
    at = torch.tensor(item.kept_at) + len(item.context)
    torch.testing.assert_close(got, whole.hidden_states[1][0, at])
    # The cache keeps the context's states alone, not the whole pass they were cut from.
    kept = t._states[((), tuple(item.context))]
    assert kept.untyped_storage().nbytes() == kept.numel() * 4
    assert not torch.allclose(got, whole.last_hidden_state[0, at])


def test_the_sweep_refuses_to_replay_a_checkpoint_trained_behind_a_field_compressor(
        tmp_path, capsys, tiny_model_dir):
    """Its adapter read what the selector kept; the sweep's adapter source gives it whole
    contexts, which would pass uncompressed text off as its latents."""
    from latentwire import models
    from latentwire.cli import main

    lm = models.load(str(tiny_model_dir), "cpu")
    opts = options(tmp_path, model_id=str(tiny_model_dir), encoder="truncate", compression=4.0,
                   keep_question=True, samples=8, eval_samples=3)
    assert run(opts, quiet, lm) == 0
    best = Path(opts.output_dir) / "checkpoints" / "best"
    assert main(["sweep", "--model_id", str(tiny_model_dir), "--source", f"adapter:{best}",
                 "--experiment", "baseline", "--samples", "2", "--output_dir",
                 str(tmp_path / "sweep")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "keeps of each context" in err


def test_answer_kept_trains_on_the_first_samples_whose_answer_the_selector_kept(tmp_path):
    lm = tiny_lm()
    drawn = trainer(tmp_path / "drawn", lm, encoder="truncate", compression=2.0, samples=120)
    cut = trainer(tmp_path / "cut", lm, encoder="truncate", compression=2.0, samples=16,
                  answer_kept=True)
    # Directly: the first half of each training context's tokens, read back as text, over the
    # examples in the order they are drawn.
    fmt, tok = drawn.reader.fmt, lm.tokenizer

    def kept(e):
        span = prompts.encode_span(tok, fmt, e.context, e.question, True)[0]
        return any(a.strip() in tok.decode(span[:-(-len(span) // 2)]) for a in e.answers)

    expected = [e for e in drawn.split.train if kept(e)]
    # The cut has something to cut, and --samples counts what it leaves: the first 16 drawn
    # hold fewer than 16 with their answer kept.
    assert 16 < len(expected) < len(drawn.split.train)
    assert sum(map(kept, drawn.split.train[:16])) < 16
    assert cut.split.train == expected[:16]
    assert [i.example for i in cut.reader.train_items] == expected[:16]
    assert cut.split.eval == drawn.split.eval  # the evaluation is unchanged


@pytest.mark.parametrize("encoder", ["pool", "kvpress:knorm"])
def test_answer_kept_is_refused_for_an_encoder_that_keeps_no_text(tmp_path, encoder):
    with pytest.raises(UsageError, match="--answer_kept needs an encoder that keeps"):
        validate(options(tmp_path, encoder=encoder, answer_kept=True))


def test_answer_kept_is_refused_where_nothing_trains(tmp_path):
    with pytest.raises(UsageError, match="--samples 0 trains on none"):
        validate(options(tmp_path, encoder="truncate", answer_kept=True, samples=0))
