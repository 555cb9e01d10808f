#!/usr/bin/env python
"""Trained latents against their controls, at one budget, side by side in one table.

    .venv/bin/python benchmarks/train_controls.py                     # 2000 examples, 1 epoch
    .venv/bin/python benchmarks/train_controls.py --samples 500 --runs pool4,constant4
    .venv/bin/python benchmarks/train_controls.py --output_dir runs/train/kd -- --kd_weight 0.5

Each run is a whole `latentwire train` process on the same entity-disjoint evaluation split:
`--compression 1` (the text itself through the trained pool encoder: the uncompressed trained
reference), `--compression 4` with pool, attn and lm, and the `constant` encoder at 4x, which
never sees the context (what training alone buys). The table gives F1 / EM with 95% bootstrap CIs,
each run's paired difference to the constant control, the references, and wall time.
A finished run in the output folder is read, not trained again, whatever its flags: give other
flags their own --output_dir.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RUNS = {
    "pool1": ["--encoder", "pool", "--compression", "1"],
    "pool4": ["--encoder", "pool", "--compression", "4"],
    "attn4": ["--encoder", "attn", "--compression", "4"],
    "constant4": ["--encoder", "constant", "--compression", "4"],
    "lm4": ["--encoder", "lm", "--compression", "4"],
}


def main() -> int:
    from latentwire import stats

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--runs", default=",".join(RUNS), help=f"some of: {', '.join(RUNS)}")
    p.add_argument("--output_dir", default="runs/train/controls")
    p.add_argument("--keep_question", action="store_true",
                   help="compress only the context (query-agnostic)")
    p.add_argument("extra", nargs="*", help="more `latentwire train` flags, after --")
    args = p.parse_args()
    root = Path(args.output_dir)
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    wall = {}
    for name in names:
        out = root / name
        summary = out / "summary.json"
        if summary.exists() and json.loads(summary.read_text())["status"] == "finished":
            print(f"{name}: kept from an earlier run ({out})", flush=True)
            continue
        cmd = [sys.executable, str(ROOT / "latentwire" / "train.py"), *RUNS[name],
               "--samples", str(args.samples), "--epochs", str(args.epochs),
               "--output_dir", str(out), *(["--keep_question"] if args.keep_question else []),
               *args.extra]
        if (out / "checkpoints" / "last").exists():
            cmd.append("--resume")
        print("$ " + " ".join(cmd[1:]), flush=True)
        start = time.time()
        subprocess.run(cmd, check=True)
        wall[name] = time.time() - start

    results = {n: json.loads((root / n / "summary.json").read_text()) for n in names}
    per_example = {}
    for n in names:
        last = results[n]["epochs"][-1]["epoch"]
        preds = json.loads((root / n / "eval" / f"epoch{last}.json").read_text())["predictions"]
        per_example[n] = [p["f1"] for p in preds]
    refs = results[names[0]]["references"]
    print(f"\n{args.samples} training examples x {args.epochs} epoch(s); "
          f"{results[names[0]]['split']['eval_examples']} entity-disjoint evaluation examples"
          f"{'; question kept as text' if args.keep_question else ''}\n")
    print("| run | positions vs text | F1 [95% CI] | EM | vs constant (paired F1 diff [CI]) "
          "| train wall time |")
    print("|---|---|---|---|---|---|")
    for n in names:
        s = results[n]
        f = s["final"]
        vs = "-"
        if "constant4" in per_example and n != "constant4":
            c = stats.paired_comparison(per_example[n], per_example["constant4"])
            vs = f"{c['diff']:+.3f} [{c['diff_ci'][0]:+.3f}, {c['diff_ci'][1]:+.3f}] {c['label']}"
        took = wall.get(n, s["wall_seconds"])
        print(f"| {n} | {s['compression_ratio']:.2f}x fewer | {f['f1']:.3f} "
              f"[{f['ci'][0]:.3f}, {f['ci'][1]:.3f}] | {f['em']:.3f} | {vs} | {took / 60:.1f} min |")
    for key, label in (("text", "text itself, untrained (zero-shot)"),
                       ("question_only", "question only, untrained")):
        r = refs[key]
        print(f"| {label} | - | {r['f1']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] | "
              f"{r['em']:.3f} | - | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
