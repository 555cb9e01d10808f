#!/usr/bin/env python
"""What --ray costs: the same sweep as two whole processes, one local and one on a new local
Ray, side by side in one run.

    .venv/bin/python benchmarks/ray_overhead.py             # the default 28 experiments, 100 samples
    .venv/bin/python benchmarks/ray_overhead.py --samples 16 --ray_cpus_per_worker 2

Both runs use --force and --no-analysis and write into temporary folders; every experiment's F1
must come out the same. Prints both wall times and their ratio. The Ray process pays for
starting Ray, starting its workers and loading the model once per worker; what it can win back
is running units side by side (on 2 cores: two 1-thread workers against one 2-thread process).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(args: list[str], out: Path) -> tuple[float, dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)  # a new local Ray, not whatever cluster this shell points at
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "latentwire.cli", "sweep", *args, "--output_dir",
                    str(out), "--force", "--no-analysis"], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    return seconds, {(r["source"], r["experiment"]): r["f1"] for r in summary["results"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", default="100")
    p.add_argument("--experiment", default="all")
    p.add_argument("--dataset", default="builtin")
    p.add_argument("--ray_cpus_per_worker", default="1")
    args = p.parse_args()
    sweep = ["--samples", args.samples, "--experiment", args.experiment, "--dataset", args.dataset]
    with tempfile.TemporaryDirectory() as tmp:
        local_s, local_f1 = timed(sweep, Path(tmp) / "local")
        ray_s, ray_f1 = timed(sweep + ["--ray", "--ray_cpus_per_worker", args.ray_cpus_per_worker],
                              Path(tmp) / "ray")
    if ray_f1 != local_f1:
        print("F1 differs between the two runs:", file=sys.stderr)
        for key in sorted(set(local_f1) | set(ray_f1)):
            if local_f1.get(key) != ray_f1.get(key):
                print(f"  {key}: local {local_f1.get(key)}, ray {ray_f1.get(key)}", file=sys.stderr)
        return 1
    print(f"{len(local_f1)} experiments x {args.samples} samples, identical F1: local {local_s:.1f} s, "
          f"--ray (local Ray, {args.ray_cpus_per_worker} CPU per worker) {ray_s:.1f} s: "
          f"ratio {ray_s / local_s:.3f} ({(ray_s / local_s - 1) * 100:+.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
