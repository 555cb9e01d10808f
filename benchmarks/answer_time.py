#!/usr/bin/env python
"""What compression buys at answer time: the same questions answered from the text and from a
paragraph's cached latents, side by side in one run.

    .venv/bin/python benchmarks/answer_time.py --checkpoint runs/squad/lm4q/checkpoints/best \
        --dataset runs/data/squad-held.json --paragraphs 24

The checkpoint must be query-agnostic (trained with --keep_question): its encoder never sees the
question, so a paragraph's latents are made once and serve every question asked of it (SQuAD
asks about five per paragraph). Over the questions of N paragraphs (a seeded draw):

- text: each question read with its whole paragraph, through the sweep's engine as it is (the
  shared instruction prefix cached once, prompts batched by length);
- latents: each paragraph tokenised and encoded once (timed, and counted against its
  questions), then each question read after the paragraph's latents, through the same engine.

Both passes tokenise what they read inside the timing. The passes alternate text, latents,
latents, text (--repeats times), so drift on a shared machine falls on both; the figure is the
ratio of the summed times. Also reported: key/value positions a paragraph holds in each form
(what a cache of it costs), and F1/EM with 95% bootstrap CIs and the paired difference, from the
first pass of each (greedy decoding gives the same answers every pass; checked).
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    from latentwire.memory import keep_freed_memory

    keep_freed_memory()
    import torch

    from latentwire import data, models, prompts
    from latentwire.errors import UsageError
    from latentwire.files import write_json
    from latentwire.generation import StopTokens, generate
    from latentwire.scoring import score_answers
    from latentwire.stats import bootstrap_ci, paired_comparison
    from latentwire.training import checkpoint
    from latentwire.training.encoders import Compressor
    from latentwire.vocab import VocabSpace

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a query-agnostic checkpoint folder (trained with --keep_question)")
    p.add_argument("--dataset", default="runs/data/squad-held.json",
                   help="questions on paragraphs the checkpoint never trained on")
    p.add_argument("--paragraphs", type=int, default=24, help="paragraphs drawn (seeded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="text/latents/latents/text rounds")
    p.add_argument("--max_new_tokens", type=int, default=12)
    p.add_argument("--out", default="runs/bench/answer_time.json")
    args = p.parse_args()

    try:
        weights, config = checkpoint.load(args.checkpoint)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: cannot read checkpoint {args.checkpoint} ({e}); pass a checkpoint folder "
              "such as runs/train/<run>/checkpoints/best", file=sys.stderr)
        return 2
    if not config["compressor"].get("keep_question"):
        print(f"error: {args.checkpoint} reads the question (trained without --keep_question), "
              "so its latents cannot be reused across questions; pass a --keep_question "
              "checkpoint", file=sys.stderr)
        return 2
    try:
        examples = data.load_all(args.dataset)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    lm = models.load(config["model"]["id"], "cpu")
    model, tok = lm.model, lm.tokenizer
    model.eval().requires_grad_(False)
    fmt = prompts.make_format(tok, config["prompt_format"]["name"])
    embed = model.get_input_embeddings()
    vocab = VocabSpace.from_model(model, len(tok))
    compressor = Compressor(config["compressor"], vocab, model)
    compressor.load_state_dict(weights)
    compressor.eval()
    stops = StopTokens(tok, model, embed.weight.shape[0])
    prefix_ids, _, anchor_ids = prompts.encode(tok, fmt, "", "")

    def embedded(ids):
        return embed(torch.tensor(ids, dtype=torch.long))

    prefix, anchor = embedded(prefix_ids), embedded(anchor_ids)
    by_context: dict[str, list] = {}
    for e in examples:
        by_context.setdefault(e.context, []).append(e)
    contexts = sorted(by_context)
    random.Random(args.seed).shuffle(contexts)
    contexts = contexts[:args.paragraphs]
    questions = [e for c in contexts for e in by_context[c]]

    def ids(text):
        return tok(text, add_special_tokens=False).input_ids

    def text_pass():
        rows = [torch.cat([embedded(prompts.encode_span(tok, fmt, e.context, e.question)[0]),
                           anchor]) for e in questions]
        return generate(model, tok, rows, stops, args.max_new_tokens, prefix=prefix)

    positions = {}

    def latent_pass():
        rows = []
        for c in contexts:
            span = ids(fmt.context_text(c))
            z, _, _ = compressor(embedded(span).float(), [len(span)])
            positions[c] = (len(span), z.shape[0])
            z = z.to(embed.weight.dtype)
            rows += [torch.cat([z, embedded(ids(fmt.question_text(e.question))), anchor])
                     for e in by_context[c]]
        return generate(model, tok, rows, stops, args.max_new_tokens, prefix=prefix)

    timings = {"text": [], "latents": []}
    answers = {}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, run in [("text", text_pass), ("latents", latent_pass),
                              ("latents", latent_pass), ("text", text_pass)]:
                start = time.perf_counter()
                got = run()
                timings[name].append(time.perf_counter() - start)
                if answers.setdefault(name, got) != got:
                    raise AssertionError(f"the {name} pass answered differently on a rerun")

    result = {"checkpoint": str(args.checkpoint), "checkpoint_digest": checkpoint.digest(
        args.checkpoint), "model": config["model"]["id"], "dataset": args.dataset,
        "paragraphs": len(contexts), "questions": len(questions),
        "torch_threads": torch.get_num_threads(), "seconds": timings}
    scores = {}
    for name in ("text", "latents"):
        predictions, means = score_answers(questions, answers[name])
        scores[name] = [p["f1"] for p in predictions]
        total = sum(timings[name])
        result[name] = {**means, "ci": list(bootstrap_ci(scores[name])),
                        "seconds_per_question": total / len(timings[name]) / len(questions)}
    text_kv = [n for n, _ in positions.values()]
    latent_kv = [m for _, m in positions.values()]
    result["text"]["kv_positions_per_paragraph"] = sum(text_kv) / len(text_kv)
    result["latents"]["kv_positions_per_paragraph"] = sum(latent_kv) / len(latent_kv)
    result["shared_prefix_positions"] = len(prefix_ids)
    result["time_ratio_latents_over_text"] = sum(timings["latents"]) / sum(timings["text"])
    result["f1_latents_minus_text"] = paired_comparison(scores["latents"], scores["text"])
    write_json(Path(args.out), result)

    print(f"{len(questions)} questions on {len(contexts)} paragraphs, {config['model']['id']}, "
          f"{torch.get_num_threads()} thread(s), {len(timings['text'])} timed passes each")
    print(f"{'':<8} {'s/question':>10} {'KV positions/paragraph':>23} {'F1 [95% CI]':>24} {'EM':>6}")
    for name in ("text", "latents"):
        r = result[name]
        print(f"{name:<8} {r['seconds_per_question']:>10.4f} {r['kv_positions_per_paragraph']:>23.1f}"
              f" {r['f1']:>8.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] {r['em']:>6.3f}")
    diff = result["f1_latents_minus_text"]
    print(f"time, latents / text: {result['time_ratio_latents_over_text']:.3f} "
          f"(both with the {len(prefix_ids)}-position instruction prefix cached once)")
    print(f"F1, latents - text (paired): {diff['diff']:+.3f} "
          f"[{diff['diff_ci'][0]:+.3f}, {diff['diff_ci'][1]:+.3f}]")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
