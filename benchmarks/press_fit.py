#!/usr/bin/env python
"""The learned press's fit: a paragraph's questions read one at a time after its cache, against
all of them in one batch (latentwire.training.learned_press.TAILS_AT_ONCE), on real training
paragraphs, timed alternately in this run, with the fitted weights of both compared.

    .venv/bin/python benchmarks/press_fit.py --dataset runs/data/squad-train.json
    .venv/bin/python benchmarks/press_fit.py --dataset runs/data/squad-train.json \
        --model_id models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf --paragraphs 20

The paragraphs are the first of --dataset (every question drawn, in the run's order), each with every one of its questions,
read under the run's precision (bf16 autocast where the CPU has it), as `latentwire train
--encoder kvpress:learned` reads them.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    import torch

    from latentwire import data
    from latentwire.errors import UsageError
    from latentwire.training import learned_press
    from latentwire.training.options import TrainOptions, validate
    from latentwire.training.trainer import Trainer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="a SQuAD-format JSON file")
    p.add_argument("--model_id", default="bundled:SmolLM2-135M-Instruct")
    p.add_argument("--paragraphs", type=int, default=40, help="paragraphs timed per arm and round")
    p.add_argument("--rounds", type=int, default=2, help="alternations of the two arms")
    args = p.parse_args()
    if args.paragraphs < 1 or args.rounds < 1:
        p.error("--paragraphs and --rounds must be at least 1")

    with tempfile.TemporaryDirectory() as tmp:
        try:
            # Every question of --dataset trains (the built-in set is the one evaluated), and a
            # press that keeps no tokens leaves each item whole, as the learned one does.
            opts = TrainOptions(model_id=args.model_id, encoder="kvpress:knorm",
                                keep_question=True, compression=4.0, dataset=args.dataset,
                                samples=len(data.load_all(args.dataset)),
                                eval_dataset="builtin", eval_samples=1, output_dir=tmp)
            t = Trainer(opts, validate(opts), log=lambda *a, **k: None)
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        a = t.reader
        paragraphs = learned_press.paragraphs_of(a.train_items, a.embed_ids, a.prefix,
                                                 a.answer_tail)[:args.paragraphs]
        model, autocast = a.lm.model, t.accelerator.autocast
        tails = sum(len(q) for _, _, q in paragraphs)
        print(f"{args.model_id}: {len(paragraphs)} paragraphs, {tails} questions, "
              f"{torch.get_num_threads()} threads")
        batched = learned_press.TAILS_AT_ONCE
        seconds, weights = {1: 0.0, batched: 0.0}, {}
        learned_press.fit(model, paragraphs[:2], autocast)  # warm-up
        for _ in range(args.rounds):
            for at_once in (1, batched):
                start = time.perf_counter()
                weights[at_once], _ = learned_press.fit(model, paragraphs, autocast,
                                                        at_once=at_once)
                seconds[at_once] += time.perf_counter() - start
    per = {k: v / (args.rounds * len(paragraphs)) for k, v in seconds.items()}
    gap = (weights[1] - weights[batched]).abs().max() / weights[1].abs().max()
    print(f"one question at a time: {per[1]:.3f} s per paragraph")
    print(f"up to {batched} at once:     {per[batched]:.3f} s per paragraph")
    print(f"ratio: {per[1] / per[batched]:.2f}x faster; fitted weights differ by at most "
          f"{gap:.1e} of their largest")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # it writes nothing outside its temporary folder
        print("press_fit: interrupted, nothing was written", file=sys.stderr)
        sys.exit(130)
