#!/usr/bin/env python
"""Engine against the seed's per-example loop, side by side in one run, as whole processes.

    .venv/bin/python benchmarks/throughput.py                       # 32 samples, 6 experiments
    .venv/bin/python benchmarks/throughput.py --samples 100 --experiment all --no-loop

Prints the speed-up (whole-process wall times), the engine's effective GFLOP/s
(2 x non-embedding parameters x prompt+generated tokens of every experiment's examples, reused
work included, / the sweep's experiment time) and this machine's fp32 matmul GFLOP/s measured in
the same run, so the gap to the hardware limit is visible.
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared" / "data" / "squad-v2-dev-5-articles.json"
SIX = "baseline,rms_scale1.0,batch_dist,nearest_k5_a0.5,anchor_eps0.1,codebook_256_t1.0"


def matmul_gflops(n: int = 2048, repeats: int = 8) -> float:
    """Best of several fp32 n x n matmuls: the machine's practical peak for dense work."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def per_example_loop(args) -> None:
    """The seed's way: each example transformed alone, then one model.generate for it."""
    import torch

    from latentwire import embed_experiments, experiments
    from latentwire.sweep.options import SweepOptions, validate
    from latentwire.sweep.runner import Sweep
    from latentwire.generation import generate_reference
    from latentwire.scoring import score

    opts = SweepOptions(experiment=args.experiment, samples=args.samples,
                              dataset=args.dataset, model_id=args.model_id,
                              output_dir=args.loop_out)
    plan = validate(opts)
    s = Sweep(opts, plan, log=lambda *a: None)
    inputs, _ = s.source_inputs(plan.sources[0])
    model, tok = s.lm.model, s.lm.tokenizer
    dtype = model.get_input_embeddings().weight.dtype
    out = {}
    for exp in experiments.select(args.experiment):
        f1 = 0.0
        for i, ex in enumerate(s.examples):
            one = embed_experiments.TransformInputs(
                inputs.x[s.offsets[i]:s.offsets[i + 1]],
                torch.tensor([0, int(s.offsets[i + 1] - s.offsets[i])]), s.vocab)
            y, _ = embed_experiments.apply(exp.transform, one, exp.config)
            answer = generate_reference(model, tok, torch.cat([s.prefix, y.to(dtype), s.anchor]),
                                        opts.max_new_tokens)
            f1 += score(answer, list(ex.answers))[1]
        out[exp.name] = f1 / len(s.examples)
    Path(args.loop_out, "loop.json").write_text(json.dumps(out))


def timed(cmd: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--experiment", default=SIX)
    p.add_argument("--dataset", default=str(SHARED) if SHARED.is_file() else "builtin")
    p.add_argument("--model_id", default="bundled:SmolLM2-135M-Instruct")
    p.add_argument("--no-loop", action="store_true", help="time the engine only")
    p.add_argument("--per-example-loop", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--loop-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.per_example_loop:
        # The `latentwire` command's own process tuning (allocator, quick exit), so that the
        # ratio measures the engine and not the process around it.
        from latentwire.memory import keep_freed_memory

        keep_freed_memory()
        per_example_loop(args)
        gc.freeze()
        return

    import torch

    print(f"dataset {args.dataset}, {args.samples} samples, experiments {args.experiment}")
    print(f"torch threads {torch.get_num_threads()}")
    peak = matmul_gflops()
    with tempfile.TemporaryDirectory() as tmp:
        engine_out, loop_out = Path(tmp, "engine"), Path(tmp, "loop")
        loop_out.mkdir()
        common = ["--samples", str(args.samples), "--dataset", args.dataset,
                  "--model_id", args.model_id]
        engine_s = timed([sys.executable, "-m", "latentwire.cli", "sweep", "--experiment",
                          args.experiment, "--output_dir", str(engine_out), "--no-analysis",
                          "--force", *common])
        summary = json.loads((engine_out / "summary.json").read_text())
        loop_s = None
        if not args.no_loop:
            loop_s = timed([sys.executable, str(Path(__file__).resolve()), "--per-example-loop",
                            "--experiment", args.experiment, "--loop-out", str(loop_out), *common])
            loop_f1 = json.loads((loop_out / "loop.json").read_text())
        peak_after = matmul_gflops()
    ok = [r for r in summary["results"] if r.get("status") == "ok"]
    tokens = sum(r["tokens"]["prompt"] + r["tokens"]["generated"] for r in ok)
    params = summary["provenance"]["model"]["non_embedding_parameters"]
    sweep_s = sum(r["time_sec"] for r in ok)
    effective = 2 * params * tokens / sweep_s / 1e9
    reused = sum(1 for r in ok if r.get("reused_generations_from"))
    peak = max(peak, peak_after)
    print(f"fp32 matmul (2048^3, best of 8, before and after): {peak:.1f} GFLOP/s")
    print(f"engine: whole process {engine_s:.1f} s; experiments {sweep_s:.1f} s for "
          f"{len(ok)} experiments ({reused} reused), {tokens} tokens")
    print(f"engine effective throughput: {effective:.1f} GFLOP/s = {effective / peak:.2f} x matmul")
    if loop_s is not None:
        print(f"per-example loop: whole process {loop_s:.1f} s")
        print(f"speed-up (whole processes): {loop_s / engine_s:.2f}x")
        print("F1 engine vs loop: " + ", ".join(
            f"{r['experiment']} {r['f1']:.3f}/{loop_f1[r['experiment']]:.3f}" for r in ok))


if __name__ == "__main__":
    main()
