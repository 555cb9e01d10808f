#!/usr/bin/env python
"""What compression buys at answer time: the same questions answered from the text and from a
paragraph's cached latents, side by side in one run.

    .venv/bin/python benchmarks/answer_time.py --checkpoint runs/squad/lm4q/checkpoints/best \
        --dataset runs/data/squad-held.json --paragraphs 24
    .venv/bin/python benchmarks/answer_time.py --encoder kvpress:snapkv --compression 4 \
        --dataset runs/data/squad-held.json --paragraphs 24     # a field compressor instead

A query-agnostic checkpoint (trained with --keep_question) never sees the question, so a
paragraph's latents are made once and serve every question asked of it (SQuAD asks about five
per paragraph). A checkpoint trained behind a field compressor (`truncate` with the adapter,
`offset:truncate`, `offset:sentences`, ...) compresses as it trained: the selector first, then,
for an encoder that reads the frozen model's states, that model's pass over the paragraph (read
twice, up to the checkpoint's --encoder_layer), all inside the latents' timing. Where the
selector reads the question (`sentences`; a checkpoint trained without --keep_question), every
question's latents are made for it alone, and the latents_kv arm, which shares a paragraph's,
is left out. A checkpoint trained behind a press (`offset:kvpress:expected_attention`;
`offset:kvpress:learned` with the scores its run fitted, kept in the run's folder) has its
latents, every context token plus its offset, read under the press: its one arm is pressed_kv.
Over the questions of N paragraphs (a seeded draw), four arms, each through the sweep's engine
with the instruction prefix cached once:

- text: each question read with its whole paragraph, the engine as it is (prompts batched by
  length across paragraphs);
- latents: each paragraph encoded once (timed, its cost shared by its questions), then every
  question read after its paragraph's latents, batched the same way;
- latents_kv: as latents, and the keys and values of the paragraph's latents are computed once
  too: each paragraph's questions are one batch behind the cached instruction + latents;
- text_kv: the same for the text, each paragraph's keys and values cached once (its context
  tokenised on its own, so its answers can differ slightly from the text arm's): what a server
  that caches documents as text would do, for the fair comparison of time.

With --encoder, a field compressor (latentwire list) takes the latents' place: a token
compressor's kept tokens are the paragraph's "latents" (compressed once per paragraph, or per
question where it reads the question; timed), in the latents arms; a press has no latents,
only its pruned cache, so its one arm, pressed_kv, reads each paragraph under the press once
and answers its questions one at a time behind a copy of the pruned cache (as kvpress's own
pipeline serves several questions on one context).

Every arm tokenises what it reads inside the timing. The arms run in order and then in reverse
(--repeats times), so drift on a shared machine falls on all; each figure is a ratio of summed
times. Also reported: key/value positions a paragraph holds in each form (what a cache of it
costs), and F1/EM with 95% bootstrap CIs and the paired difference to the text, from the first
pass of each arm (greedy decoding gives the same answers every pass; checked).
"""

import argparse
import copy
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def trained(path: str):
    """A checkpoint's compressor, to build once the model is loaded, its config, and the field
    compressor it was trained behind (None for a learned encoder; a fitted press as its run
    fitted it)."""
    from latentwire.errors import UsageError
    from latentwire.field import Press, TokenCompressor
    from latentwire.files import read_json
    from latentwire.models import model_dirname
    from latentwire.training import checkpoint
    from latentwire.training.encoders import Compressor
    from latentwire.training.registry import ENCODERS
    from latentwire.training.spec import CompressorSpec

    try:
        weights, config = checkpoint.load(path)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"cannot read checkpoint {path} ({e}); pass a checkpoint folder such "
                         "as runs/train/<run>/checkpoints/best")
    spec = CompressorSpec.from_json(config["compressor"])
    if not spec.keep_question and not spec.field:
        raise UsageError(f"{path} reads the question inside its span (trained without "
                         "--keep_question); pass a --keep_question checkpoint, or one trained "
                         "behind a field compressor")
    answerers, reader = checkpoint.answerers(config), checkpoint.reader(config)
    if len(answerers) > 1 or reader["model"] != answerers[0]["model"]:
        names = ", ".join(a["model"]["id"] for a in answerers)
        raise UsageError(f"{path} answers with {names}, reading the text with "
                         f"{reader['model']['id']}; this benchmark times one model that reads "
                         "its own text: pass a checkpoint trained with one --model_id and no "
                         "--encoder_model")

    selector = None
    if spec.field:
        # A selector that draws at random draws with the run's seed, kept in the run's folder;
        # a press fitted by the run, with the scores it kept there.
        run = Path(path).resolve().parent.parent
        recorded = run / "config.json"
        seed = read_json(recorded)["options"]["seed"] if recorded.exists() else None
        entry = ENCODERS[spec.encoder]
        selector = entry.field_compressor(seed or 0)
        unknown_draw = seed is None and "seed" in selector.describe()
        if isinstance(selector, Press):
            if selector.reads_question(not spec.keep_question):
                raise UsageError(f"{path} was trained behind --encoder {spec.encoder} reading "
                                 "the question before it prunes; this benchmark times presses "
                                 "query-agnostic: pass a --keep_question checkpoint")
            if entry.fitted:
                fit = checkpoint.press_file(run, model_dirname(answerers[0]["model"]["id"]))
                kept = checkpoint.load_tensors(fit)
                if kept is None or not selector.restore(*kept):
                    raise UsageError(f"{path} was trained behind a press its run fitted, and "
                                     f"{fit} does not hold that fit (a run before the fit was "
                                     "kept has none); train it again to time it")
        elif not isinstance(selector, TokenCompressor) or unknown_draw:
            raise UsageError(f"{path} was trained behind --encoder {spec.encoder}, which this "
                             "benchmark cannot replay from a checkpoint alone; time the "
                             f"compressor itself with --encoder {spec.encoder}")

    def build(vocab, model):
        compressor = Compressor(spec, vocab, model)
        compressor.load_state_dict(weights)
        return compressor.eval()

    return build, config, selector


def field(name: str):
    """A field compressor by its encoder name."""
    from latentwire.errors import UsageError
    from latentwire.training.registry import ENCODERS

    entry = ENCODERS[name] if name in ENCODERS else None
    if entry is None or entry.field is None:
        fields = ", ".join(n for n in ENCODERS if ENCODERS[n].field is not None)
        raise UsageError(f"--encoder {name} is not a field compressor (one of: {fields}); "
                         "pass a learned encoder's checkpoint as --checkpoint")
    return entry.field_compressor()


def main() -> int:
    from latentwire.memory import keep_freed_memory

    keep_freed_memory()
    import torch

    from latentwire import data, models, prompts
    from latentwire.errors import UsageError
    from latentwire.field import Extractive, Press, Repeat, TokenCompressor, pressed, reads_question
    from latentwire.files import write_json
    from latentwire.generation import StopTokens, answer_from_caches, generate
    from latentwire.scoring import cut_answer, score_answers
    from latentwire.stats import bootstrap_ci, paired_comparison
    from latentwire.training import checkpoint
    from latentwire.training.options import TrainOptions
    from latentwire.training.registry import ENCODERS
    from latentwire.training.spec import CompressorSpec
    from latentwire.vocab import VocabSpace

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint",
                       help="a checkpoint folder: query-agnostic (--keep_question) or trained "
                       "behind a field compressor")
    which.add_argument("--encoder", help="or a field compressor, by name")
    p.add_argument("--model_id", default="bundled:SmolLM2-135M-Instruct",
                   help="with --encoder: the reader")
    p.add_argument("--compression", type=float, default=4.0, help="with --encoder: its ratio")
    p.add_argument("--dataset", default="runs/data/squad-held.json",
                   help="questions on paragraphs the checkpoint never trained on")
    p.add_argument("--paragraphs", type=int, default=24, help="paragraphs drawn (seeded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="text/latents/latents/text rounds")
    p.add_argument("--max_new_tokens", type=int, default=12)
    p.add_argument("--out", default="runs/bench/answer_time.json")
    args = p.parse_args()

    try:
        examples = data.load_all(args.dataset)
        if args.checkpoint:
            compressor, config, selector = trained(args.checkpoint)
            model_id, prompt = config["model"]["id"], config["prompt_format"]["name"]
            ratio = CompressorSpec.from_json(config["compressor"]).compression
            source = {"checkpoint": str(args.checkpoint),
                      "checkpoint_digest": checkpoint.digest(args.checkpoint)}
        else:
            compressor, model_id, prompt = field(args.encoder), args.model_id, TrainOptions.prompt
            selector, ratio = None, args.compression
            source = {"encoder": args.encoder, "compression": args.compression,
                      "field_compressor": compressor.describe()}
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    lm = models.load(model_id, "cpu")
    model, tok = lm.model, lm.tokenizer
    model.eval().requires_grad_(False)
    fmt = prompts.make_format(tok, prompt)
    embed = model.get_input_embeddings()
    if args.checkpoint:
        compressor = compressor(VocabSpace.from_model(model, len(tok)), model)
    stops = StopTokens(tok, model, embed.weight.shape[0])
    prefix_ids, _, anchor_ids = prompts.encode(tok, fmt, "", "")

    def embedded(ids):
        return embed(torch.tensor(ids, dtype=torch.long))

    prefix, anchor = embedded(prefix_ids), embedded(anchor_ids)
    by_context = data.grouped(examples, lambda e: e.context)
    contexts = sorted(by_context)
    random.Random(args.seed).shuffle(contexts)
    contexts = contexts[:args.paragraphs]
    questions = [e for c in contexts for e in by_context[c]]

    def ids(text):
        return tok(text, add_special_tokens=False).input_ids

    positions = {}
    # Query-aware (a selector that reads the question, and a checkpoint trained reading it):
    # what is kept differs per question, so each question's latents are made for it alone, and
    # there is no paragraph's latents to cache for its questions (no latents_kv arm).
    if args.checkpoint:
        aware = reads_question(selector, config["compressor"].get("keep_question"))
    else:
        aware = compressor.query_aware is True
    # A press prunes the cache as the model reads the context: a checkpoint trained behind one
    # has its latents (every context token plus its offset) read under it.
    press = next((c for c in (compressor, selector) if isinstance(c, Press)), None)
    units = ([((c, n), c, e.question) for c in contexts for n, e in enumerate(by_context[c])]
             if aware else [(c, c, "") for c in contexts])

    def key(c, n):
        return (c, n) if aware else c

    def encoded():
        """Every paragraph's latents (query-aware: every question's), encoded together in
        batches as a server would encode the documents it holds (a token compressor's: its
        kept tokens)."""
        out = {}
        for s in range(0, len(units), 16):
            chunk = units[s:s + 16]
            spans = [ids(fmt.context_text(c)) for _, c, _ in chunk]
            texts = [fmt.context_text(c) for _, c, _ in chunk]
            asked = [q for _, _, q in chunk]
            if isinstance(compressor, TokenCompressor):
                kept = compressor.select(spans, texts, asked, ratio, tok, model_id)
                latents = [embedded(k) for k in kept]
            else:
                kept, states = spans, None
                at = [list(range(len(span))) for span in spans]  # a press prunes after
                if isinstance(selector, Extractive):
                    at = selector.positions(spans, texts, asked, ratio, tok, model_id)
                    kept = [[span[p] for p in ps] for span, ps in zip(spans, at)]
                elif isinstance(selector, TokenCompressor):
                    kept = selector.select(spans, texts, asked, ratio, tok, model_id)
                if ENCODERS[compressor.spec.encoder].reads_states:
                    # As the trainer reads them: after the question where it is read.
                    states = compressor.encoder.gather([compressor.encoder.states(
                        ids(fmt.question_text(q)) if aware else [], span)
                        for span, q in zip(spans, asked)], at)
                z, offsets, _ = compressor(embedded([t for k in kept for t in k]).float(),
                                           [len(k) for k in kept], states)
                latents = [z[offsets[n]:offsets[n + 1]] for n in range(len(chunk))]
            for (k, _, _), span, z in zip(chunk, spans, latents):
                out[k] = z.to(embed.weight.dtype)
                positions[k] = (len(span), out[k].shape[0])
        return out

    def question(e):
        return torch.cat([embedded(ids(fmt.question_text(e.question))), anchor])

    def text():
        rows = [torch.cat([embedded(prompts.encode_span(tok, fmt, e.context, e.question)[0]),
                           anchor]) for e in questions]
        return generate(model, tok, rows, stops, args.max_new_tokens, prefix=prefix)

    def latents():
        z = encoded()
        rows = [torch.cat([z[key(c, n)], question(e)])
                for c in contexts for n, e in enumerate(by_context[c])]
        return generate(model, tok, rows, stops, args.max_new_tokens, prefix=prefix)

    def per_paragraph(heads):
        """Each paragraph's questions as one batch behind a cached prefix: the instruction and
        the paragraph's head (its latents or its text), computed once for all of them."""
        out = []
        for c in contexts:
            out += generate(model, tok, [question(e) for e in by_context[c]], stops,
                            args.max_new_tokens, prefix=torch.cat([prefix, heads[c]]))
        return out

    def pressed_kv():
        """Each paragraph read once under the press (a checkpoint's latents, else its tokens);
        its questions answered as one batch, each behind its own copy of what the press kept."""
        out = []
        heads = encoded() if args.checkpoint else {}
        for c in contexts:
            span = ids(fmt.context_text(c))
            head = heads[c] if args.checkpoint else embedded(span)
            cache, position = pressed(model, prefix, head, None, press, ratio,
                                      Repeat(prefix_ids + span, anchor_ids, tok))
            positions[c] = (len(span), cache.layers[0].keys.shape[2] - len(prefix_ids))
            questions = [question(e) for e in by_context[c]]
            for got in answer_from_caches(model, [copy.deepcopy(cache) for _ in questions],
                                          [position] * len(questions), questions, stops,
                                          args.max_new_tokens):
                out.append((cut_answer(tok.decode(got, skip_special_tokens=True)), len(got)))
        return out

    arms = {"text": text,
            **({"pressed_kv": pressed_kv} if press is not None else
               {"latents": latents} if aware else
               {"latents": latents, "latents_kv": lambda: per_paragraph(encoded())}),
            "text_kv": lambda: per_paragraph(
                {c: embedded(ids(fmt.context_text(c))) for c in contexts})}
    timings = {name: [] for name in arms}
    answers = {}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name in [*arms, *reversed(arms)]:  # each arm's drift cancels against the others'
                start = time.perf_counter()
                got = arms[name]()
                timings[name].append(time.perf_counter() - start)
                if answers.setdefault(name, got) != got:
                    raise AssertionError(f"the {name} pass answered differently on a rerun")

    result = {**source, "model": model_id, "dataset": args.dataset,
        "paragraphs": len(contexts), "questions": len(questions),
        "torch_threads": torch.get_num_threads(), "seconds": timings}
    scores = {}
    for name in arms:
        predictions, means = score_answers(questions, answers[name])
        scores[name] = [p["f1"] for p in predictions]
        total = sum(timings[name])
        result[name] = {**means, "ci": list(bootstrap_ci(scores[name])),
                        "seconds_per_question": total / len(timings[name]) / len(questions),
                        "new_tokens_per_question":
                            sum(n for _, n in answers[name]) / len(questions),
                        "predictions": [{"id": p["id"], "prediction": p["prediction"]}
                                        for p in predictions]}
    text_kv = [n for n, _ in positions.values()]
    latent_kv = [m for _, m in positions.values()]
    for name in arms:
        held = text_kv if name.startswith("text") else latent_kv
        result[name]["kv_positions_per_paragraph"] = sum(held) / len(held)
        result[name]["time_over_text"] = sum(timings[name]) / sum(timings["text"])
        result[name]["f1_minus_text"] = paired_comparison(scores[name], scores["text"])
    result["shared_prefix_positions"] = len(prefix_ids)
    write_json(Path(args.out), result)

    print(f"{len(questions)} questions on {len(contexts)} paragraphs, {model_id}, "
          f"{torch.get_num_threads()} thread(s), {len(timings['text'])} timed passes each; the "
          f"{len(prefix_ids)}-position instruction prefix is cached once in every arm")
    print(f"{'':<11} {'s/question':>10} {'x text':>7} {'KV/paragraph':>13} {'F1 [95% CI]':>22} "
          f"{'EM':>6} {'F1 - text, paired':>26} {'new tokens':>10}")
    for name in arms:
        r = result[name]
        d = r["f1_minus_text"]
        print(f"{name:<11} {r['seconds_per_question']:>10.4f} {r['time_over_text']:>7.3f} "
              f"{r['kv_positions_per_paragraph']:>13.1f} {r['f1']:>7.3f} [{r['ci'][0]:.3f}, "
              f"{r['ci'][1]:.3f}] {r['em']:>6.3f} {d['diff']:>+8.3f} [{d['diff_ci'][0]:+.3f}, "
              f"{d['diff_ci'][1]:+.3f}] {r['new_tokens_per_question']:>10.2f}")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
