#!/usr/bin/env python
"""How often a token compressor keeps the answer: of every question in a SQuAD file, the share
whose gold answer still reads in full in what the compressor kept of its context, at each
ratio, in the reader's tokens. No model answers anything, so it runs in seconds for the
compressors without a model, and says what a selector can give a reader before any reading.

    .venv/bin/python benchmarks/answer_kept.py --dataset runs/data/squad-held.json \
        --encoders truncate,random_tokens,sentences --compressions 4,16
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    from latentwire import prompts
    from latentwire.data import squad_json_examples
    from latentwire.errors import UsageError
    from latentwire.field import TokenCompressor
    from latentwire.models import resolve
    from latentwire.scoring import answer_in
    from latentwire.training.registry import ENCODERS
    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True, help="a SQuAD-format JSON file")
    ap.add_argument("--encoders", default="truncate,random_tokens,sentences",
                    help="token compressors, comma-separated (latentwire list)")
    ap.add_argument("--compressions", default="4,16", help="ratios, comma-separated")
    ap.add_argument("--model_id", default="bundled:SmolLM2-135M-Instruct",
                    help="whose tokenizer counts the budget (and scores, for llmlingua)")
    args = ap.parse_args()
    try:
        compressors = {}
        for name in args.encoders.split(","):
            if name not in ENCODERS:
                raise UsageError(f"unknown encoder {name!r}; use: {', '.join(ENCODERS)}")
            compressor = ENCODERS[name].field_compressor()
            if not isinstance(compressor, TokenCompressor):
                raise UsageError(f"{name} is not a token compressor (a learned encoder, or a "
                                 "press, which keeps keys and values); pass token compressors")
            compressors[name] = compressor
        try:
            ratios = [float(r) for r in args.compressions.split(",")]
        except ValueError:
            raise UsageError(f"--compressions takes numbers, e.g. 4,16 (got {args.compressions!r})")
        if min(ratios) < 1:
            raise UsageError(f"--compressions must each be at least 1 (got {min(ratios):g})")
        if not Path(args.dataset).is_file():
            raise UsageError(f"--dataset {args.dataset}: no such file; pass a SQuAD-format JSON "
                             "file, e.g. runs/data/squad-held.json")
        examples = squad_json_examples(Path(args.dataset))
        model = resolve(args.model_id)
        tokenizer = AutoTokenizer.from_pretrained(model)
        fmt = prompts.make_format(tokenizer, "auto")
    except (UsageError, OSError, ValueError) as e:
        print(f"answer_kept: {e}", file=sys.stderr)
        return 2
    contexts = [fmt.context_text(e.context) for e in examples]
    # The context as a training run hands it to a token compressor (question as text after it).
    spans = [prompts.encode_span(tokenizer, fmt, e.context, e.question, True)[0] for e in examples]
    questions = [e.question for e in examples]
    print(f"{len(examples)} questions of {args.dataset}, budgets in {args.model_id}'s tokens\n")
    print("| compressor | ratio | answer kept whole |")
    print("|---|---|---|")
    for name, compressor in compressors.items():
        for ratio in ratios:
            kept = compressor.select(spans, contexts, questions, ratio, tokenizer, model)
            whole = sum(answer_in(tokenizer.decode(k), e.answers) for k, e in zip(kept, examples))
            print(f"| {name} | {ratio:g}x | {whole / len(examples):.1%} |")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # it writes nothing, so nothing is lost
        print("answer_kept: interrupted", file=sys.stderr)
        sys.exit(130)
