#!/usr/bin/env python
"""Two training recipes' examples per second, side by side in one process on the same machine
load: each trains in turn for a block of steps, block after block, so that a change in the
machine's load hits both alike.

    .venv/bin/python benchmarks/train_race.py configs/squad/aware-4x.yaml \
        configs/squad/lm-lora-aware-4x.yaml --dataset runs/data/squad-train.json

Each recipe is a `latentwire train --config` file; --dataset replaces both recipes' dataset.
Times whole optimizer steps (what each recipe computes once per example, such as a field
compressor's selection or the frozen model's states, included: within one epoch every example
is new). Prints each recipe's examples/s (median of the blocks) and the ratio. No evaluation:
the recipes' F1 comes from their own runs.
"""

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipes", nargs=2, metavar="RECIPE", help="two train --config files")
    p.add_argument("--dataset", help="replaces both recipes' --dataset")
    p.add_argument("--steps", type=int, default=5, help="timed steps per block (default: 5)")
    p.add_argument("--blocks", type=int, default=3, help="blocks per recipe (default: 3)")
    args = p.parse_args()
    if args.steps < 1 or args.blocks < 1:
        print(f"error: --steps and --blocks must be at least 1 (got {args.steps} and "
              f"{args.blocks})", file=sys.stderr)
        return 2

    from latentwire import cli
    from latentwire.errors import StorageError, UsageError
    from latentwire.memory import keep_freed_memory
    from latentwire.options import from_args
    from latentwire.training.options import TrainOptions, validate
    from latentwire.training.trainer import Trainer

    keep_freed_memory()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            racers = []
            for n, recipe in enumerate(args.recipes):
                words = ["train", "--config", recipe, "--output_dir", f"{tmp}/{n}"]
                opts = from_args(TrainOptions, cli.parse(
                    words + (["--dataset", args.dataset] if args.dataset else [])))
                # One warm-up step, then the timed blocks; the evaluation split is never read.
                opts = replace(opts, samples=opts.batch_size * (1 + args.steps * args.blocks),
                               eval_samples=1, epochs=1, report_to="none")
                t = Trainer(opts, validate(opts), log=lambda *a, **k: None)
                racers.append((recipe, t, t.batches(0)))
            for _, t, batches in racers:
                t.step(batches[0])
            rates = [[] for _ in racers]
            for block in range(args.blocks):
                for mine, (_, t, batches) in zip(rates, racers):
                    todo = batches[1 + block * args.steps:1 + (block + 1) * args.steps]
                    start = time.perf_counter()
                    for b in todo:
                        t.step(b)
                    mine.append(sum(map(len, todo)) / (time.perf_counter() - start))
    except (UsageError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    import torch

    print(f"{args.blocks} blocks of {args.steps} steps per recipe, alternating, "
          f"{torch.get_num_threads()} threads")
    medians = [statistics.median(r) for r in rates]
    for (recipe, t, _), r, m in zip(racers, rates, medians):
        print(f"{recipe}: {m:6.2f} examples/s (blocks: {', '.join(f'{x:.2f}' for x in r)}; "
              f"--encoder {t.opts.encoder}, batch {t.opts.batch_size})")
    print(f"ratio, first / second: {medians[0] / medians[1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
