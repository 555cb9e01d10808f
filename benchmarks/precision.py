#!/usr/bin/env python
"""fp32 against bf16 autocast (--mixed_precision), side by side in one run: training examples/s
of the same steps, and the raw matmul rate of each dtype at the bundled model's shapes.

    .venv/bin/python benchmarks/precision.py
    .venv/bin/python benchmarks/precision.py --encoder lm --encoder_lora 8 --steps 4 --rounds 2
    .venv/bin/python benchmarks/precision.py --fit 496 --out runs/precision   # and final F1
    .venv/bin/python benchmarks/precision.py --dataset runs/data/squad-train.json \
        --eval_dataset runs/data/squad-held.json --steps 2                  # on SQuAD paragraphs

accelerate keeps one precision per process, so each measurement is a process of its own; the
two precisions alternate (fp32, bf16, fp32, bf16, ...) so that a machine shared with other work
slows both alike. Each process times --steps optimizer steps after one warm-up step, on the
built-in data (or --dataset), and reports examples/s. `native bf16` says whether the CPU (or GPU) multiplies
bf16 in hardware: where it does not, bf16 is emulated and far slower.

With --fit N each precision also trains one whole run of N examples (`latentwire train`, the
same seed and flags, one after the other) and the two are compared on the same held-out
questions: each one's F1 with its interval, and bf16 minus fp32, paired.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = """
import json, sys, tempfile, time
sys.path.insert(0, {root!r})
from latentwire.training.options import TrainOptions, validate
from latentwire.training.trainer import Trainer
args = json.loads(sys.argv[1])
with tempfile.TemporaryDirectory() as tmp:
    opts = TrainOptions(encoder=args["encoder"], encoder_lora=args["encoder_lora"],
                        compression=4.0, batch_size=args["batch_size"],
                        samples=args["batch_size"] * (args["steps"] + 1), eval_samples=10,
                        mixed_precision=args["precision"], output_dir=tmp,
                        dataset=args["dataset"], eval_dataset=args["eval_dataset"])
    t = Trainer(opts, validate(opts), log=lambda *a, **k: None)
    batches = t.batches(0)
    t.step(batches[0])
    start = time.perf_counter()
    for b in batches[1:1 + args["steps"]]:
        t.step(b)
    seconds = time.perf_counter() - start
print(json.dumps({{"examples_per_s": args["steps"] * args["batch_size"] / seconds}}))
"""


def matmul_rate(dtype, n: int = 20) -> float:
    import torch

    x, w = torch.randn(1024, 576).to(dtype), torch.randn(576, 1536).to(dtype)
    for _ in range(2):
        x @ w
    start = time.perf_counter()
    for _ in range(n):
        x @ w
    return 2 * 1024 * 576 * 1536 * n / (time.perf_counter() - start) / 1e9


def fit(args) -> None:
    """Both precisions, one whole run each, compared on the same held-out questions."""
    from latentwire.stats import paired_comparison

    runs = {}
    for precision in ("no", "bf16"):
        out = Path(args.out) / precision
        cmd = [sys.executable, "-m", "latentwire.cli", "train", "--encoder", args.encoder,
               "--encoder_lora", str(args.encoder_lora), "--compression", "4",
               "--batch_size", str(args.batch_size), "--samples", str(args.fit),
               "--mixed_precision", precision, "--output_dir", str(out), "--resume", "auto",
               "--dataset", args.dataset, "--eval_samples", str(args.eval_samples)]
        if args.eval_dataset:
            cmd += ["--eval_dataset", args.eval_dataset]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        summary = json.loads((out / "summary.json").read_text())
        last = summary["epochs"][-1]
        f1s = [q["f1"] for q in json.loads(
            (out / "eval" / f"epoch{last['epoch']}.json").read_text())["predictions"]]
        runs[precision] = (summary, f1s)
        print(f"  {precision:>4}: F1 {summary['final']['f1']:.3f} "
              f"[{summary['final']['ci'][0]:.3f}, {summary['final']['ci'][1]:.3f}] in "
              f"{summary['train_seconds'] / 60:.1f} min of training "
              f"({args.fit / summary['train_seconds']:.3f} examples/s) -> {out}", flush=True)
    d = paired_comparison(runs["bf16"][1], runs["no"][1])
    print(f"bf16 - fp32, paired over {len(runs['no'][1])} questions: {d['diff']:+.3f} "
          f"[{d['diff_ci'][0]:+.3f}, {d['diff_ci'][1]:+.3f}] ({d['label']})")


def main() -> int:
    import torch

    from latentwire.training.options import native_bf16

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", default="lm")
    p.add_argument("--encoder_lora", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2, help="fp32/bf16 pairs")
    p.add_argument("--dataset", default="builtin", help="as train's --dataset")
    p.add_argument("--eval_dataset", default=None, help="as train's --eval_dataset")
    p.add_argument("--eval_samples", type=int, default=100, help="--fit's held-out questions")
    p.add_argument("--fit", type=int, default=0, metavar="N",
                   help="also train a whole run of N examples at each precision and compare F1")
    p.add_argument("--out", default="runs/precision", help="where --fit's two runs go")
    args = p.parse_args()
    rates = {"no": [], "bf16": []}
    for _ in range(args.rounds):
        for precision in rates:
            child = {**vars(args), "precision": precision}
            out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)),
                                  json.dumps(child)], capture_output=True, text=True, check=True)
            rates[precision].append(json.loads(out.stdout.strip().splitlines()[-1])["examples_per_s"])
            print(f"  {precision:>4}: {rates[precision][-1]:.3f} examples/s", flush=True)
    fp32, bf16 = (statistics.median(rates[k]) for k in ("no", "bf16"))
    mm32, mm16 = matmul_rate(torch.float32), matmul_rate(torch.bfloat16, n=2)
    print(f"{args.encoder} encoder (LoRA {args.encoder_lora}) at 4x, batch {args.batch_size}, "
          f"{args.dataset}, "
          f"{args.steps} timed steps, {args.rounds} rounds, {torch.get_num_threads()} threads; "
          f"native bf16: {native_bf16('cpu')}")
    print(f"training, fp32:          {fp32:8.3f} examples/s (median)")
    print(f"training, bf16 autocast: {bf16:8.3f} examples/s (median)")
    print(f"bf16 / fp32:             {bf16 / fp32:8.3f}x")
    print(f"matmul 1024x576 @ 576x1536: fp32 {mm32:.1f} GFLOP/s, bf16 {mm16:.1f} GFLOP/s "
          f"({mm16 / mm32:.3f}x)")
    if args.fit:
        fit(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
