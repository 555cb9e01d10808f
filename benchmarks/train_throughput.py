#!/usr/bin/env python
"""Training throughput: examples/s and effective GFLOP/s against the machine's fp32 matmul rate,
both measured in this run.

    .venv/bin/python benchmarks/train_throughput.py
    .venv/bin/python benchmarks/train_throughput.py --encoder attn --compression 4 --steps 20

Times full optimizer steps (compressor forward, frozen model forward and backward, AdamW) on the
bundled model and built-in data, after warm-up steps. Work counted: 2 x non-embedding parameters
per token for the forward pass and as much again for the backward pass (activation gradients
only: the frozen model's weights get none), over the real tokens of every row (padding and the
shared prompt prefix, which is computed once, are not counted), plus the LM head at the answer
positions, forward and backward. The same steps with the prefix put into every row are timed too,
so the prefix cache's gain is a ratio from one run; with `--encoder lm`, so are the same steps
with the reader's span and slots in one graph, for the gain of reading the span without one.
The work counted leaves out the lm encoder's reader: its GFLOP/s are the answering model's.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> int:
    from latentwire.memory import keep_freed_memory

    keep_freed_memory()
    import torch

    from latentwire.training.options import TrainOptions, validate
    from latentwire.training.trainer import Trainer
    from throughput import matmul_gflops

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", default="pool")
    p.add_argument("--compression", type=float, default=4.0)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        opts = TrainOptions(encoder=args.encoder, compression=args.compression,
                                     batch_size=args.batch_size,
                                     samples=args.batch_size * (args.steps + args.warmup),
                                     eval_samples=10, output_dir=tmp)
        t = Trainer(opts, validate(opts), log=lambda *a, **k: None)
        model = t.reader.lm.model
        embeddings = {id(model.get_input_embeddings().weight)}
        head = model.get_output_embeddings()
        embeddings.add(id(head.weight))
        body = sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
        batches = t.batches(0)
        peak = matmul_gflops()

        def measure(shared_prefix: bool) -> tuple[float, float]:
            t.reader._prefix_kv = None if shared_prefix else []
            for b in batches[:args.warmup]:
                t.step(b)
            tokens = answers = 0
            start = time.perf_counter()
            for b in batches[args.warmup:args.warmup + args.steps]:
                items = [t.reader.train_items[i] for i in b]
                counts = t.spec.counts([len(i.span) for i in items])
                tokens += sum(c + len(i.question) + len(t.reader.anchor) + len(i.answer) - 1
                              + (0 if shared_prefix else len(t.reader.prefix))
                              for c, i in zip(counts, items))
                answers += sum(len(i.answer) for i in items)
                t.step(b)
            seconds = time.perf_counter() - start
            flops = 4 * body * tokens + 4 * head.weight.numel() * answers
            return args.steps * args.batch_size / seconds, flops / seconds / 1e9

        cached_rate, cached_gflops = measure(True)
        plain_rate, plain_gflops = measure(False)
        one_graph_rate = None
        if args.encoder == "lm":
            encoder = t.compressor.encoder
            encoder.states = encoder._states_in_one_pass
            one_graph_rate, _ = measure(True)

    print(f"{args.encoder} encoder at {args.compression:g}x, batch {args.batch_size}, "
          f"{args.steps} timed steps, {torch.get_num_threads()} threads")
    print(f"fp32 matmul rate, measured now:     {peak:7.1f} GFLOP/s")
    print(f"training, shared prefix cache:      {cached_rate:7.2f} examples/s  "
          f"{cached_gflops:7.1f} GFLOP/s effective = {cached_gflops / peak:.0%} of matmul")
    print(f"training, prefix in every row:      {plain_rate:7.2f} examples/s  "
          f"{plain_gflops:7.1f} GFLOP/s effective = {plain_gflops / peak:.0%} of matmul")
    print(f"prefix cache speed-up:              {cached_rate / plain_rate:.2f}x examples/s")
    if one_graph_rate:
        print(f"lm reader, span and slots in one graph: {one_graph_rate:7.2f} examples/s")
        print(f"span read without a graph, speed-up: {cached_rate / one_graph_rate:.2f}x examples/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
