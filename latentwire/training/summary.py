"""What a training run writes about itself besides its checkpoints: the evaluation split as a
dataset file, metrics.jsonl, summary.json, the plots, and the summary it prints at the end."""

import json
import os
from pathlib import Path

from ..files import write_text, writing
from ..plots import pyplot, save


def write_split(examples, path: Path) -> None:
    """The evaluation split as a dataset file: sweeping a checkpoint on it (`--dataset`) measures
    the latents on entities the encoder never trained on, as the run's own evaluation does."""
    write_text(path, "".join(json.dumps({"id": e.id, "title": e.group, "context": e.context,
                                         "question": e.question, "answers": list(e.answers)})
                             + "\n" for e in examples))


class MetricsLog:
    """metrics.jsonl: one line per optimizer step and per evaluation, each on disk before the
    next step. Opened without any line written after the checkpoint being resumed (those steps
    are about to run again) or cut off by a kill."""

    def __init__(self, path: Path, keep_until_step: int):
        self.path = path
        with writing(path):
            self.fh = self._open(path, keep_until_step)

    @staticmethod
    def _open(path: Path, keep_until_step: int):
        if path.exists():
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break
                if row.get("step", 0) > keep_until_step:
                    break
                kept.append(line)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
            os.replace(tmp, path)
        return open(path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        # A line cut short by a full disk is dropped when the run is resumed (see _open).
        with writing(self.path):
            self.fh.write(json.dumps(row) + "\n")
            self.fh.flush()
            os.fsync(self.fh.fileno())

    def close(self) -> None:
        try:
            self.fh.close()
        except OSError:  # the flush of a line write() already reported as not written
            pass


def summary(trainer, state, status: str, wall: float) -> dict:
    """summary.json: the last evaluation against the references, every epoch, the split."""
    refs = state.references or {}
    last = state.epochs[-1]["eval"] if state.epochs else None

    def brief(r):
        return {k: r[k] for k in ("f1", "em", "empty_rate", "ci")} if r else None

    return {
        "status": status,
        "encoder": trainer.opts.encoder, "transform": trainer.spec["transform"],
        "compression_ratio": last["compression_ratio"] if last else None,
        "latents_per_example": last["latents_per_example"] if last else None,
        "keep_question": trainer.opts.keep_question,
        "final": {**brief(last), "latent_diagnostics": last["latent_diagnostics"]} if last else None,
        "best": state.best,
        "references": {k: brief(v) for k, v in refs.items()},
        "epochs": [{k: v for k, v in e.items() if k != "eval"} for e in state.epochs],
        "steps": state.step, "train_seconds": round(state.elapsed, 1), "wall_seconds": round(wall, 1),
        "trainable_parameters": sum(p.numel() for p in trainer.params),
        "split": trainer.split.describe(),
        "checkpoints": {"last": "checkpoints/last", "best": "checkpoints/best"},
    }


def render(s: dict) -> str:
    """The run against its frame: the text and the question alone, on the same examples."""
    def row(name, r):
        if not r:
            return f"  {name:<16} -"
        return (f"  {name:<16} F1 {r['f1']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]  "
                f"EM {r['em']:.3f}")
    shape = (f"{s['compression_ratio']:.2f}x fewer positions than the text" if s["final"]
             else "no epoch finished")
    lines = [f"{s['encoder']} + {s['transform']['name']}, {shape}:",
             row("latents (final)", s["final"]),
             row("text itself", s["references"].get("text")),
             row("question only", s["references"].get("question_only"))]
    if s["final"] and s["references"].get("question_only"):
        floor = s["references"]["question_only"]["ci"][1]
        if s["final"]["ci"][1] <= floor or s["final"]["f1"] <= s["references"]["question_only"]["f1"]:
            lines.append("  The latents do no better than the question alone: they carry no "
                         "usable content from the context.")
    if s["encoder"] == "constant":
        lines.append("  This is the control: latents of other encoders count only where they "
                     "beat it at the same budget.")
    else:
        lines.append("  Compare with --encoder constant at the same budget: a trained prefix "
                     "counts only if it beats one that never sees the context.")
    return "\n".join(lines)


def plot(run_dir: Path) -> list[Path]:
    """plots/loss.png, the loss per step, and plots/f1.png, F1 per epoch against the
    references."""
    rows = [json.loads(line) for line in
            (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    steps = [r for r in rows if r["type"] == "step"]
    evals = [r for r in rows if r["type"] == "eval"]
    refs = json.loads((run_dir / "references.json").read_text(encoding="utf-8"))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, color="#1f77b4")
    ax.set(xlabel="optimizer step", ylabel="training loss", title="Loss per step")
    paths = [save(fig, run_dir / "plots" / "loss.png")]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    if evals:
        e = [r["epoch"] for r in evals]
        ax.errorbar(e, [r["f1"] for r in evals],
                    yerr=[[r["f1"] - r["ci"][0] for r in evals], [r["ci"][1] - r["f1"] for r in evals]],
                    marker="o", capsize=3, color="#d62728", label="latents")
    for key, label, colour in (("text", "text itself", "#444444"),
                               ("question_only", "question only", "#8c564b")):
        ax.axhline(refs[key]["f1"], ls="--", color=colour, label=f"{label} ({refs[key]['f1']:.3f})")
    ax.set(xlabel="epoch", ylabel="evaluation F1", title="F1 per epoch against the references",
           ylim=(0, 1))
    ax.legend(fontsize=8)
    paths.append(save(fig, run_dir / "plots" / "f1.png"))
    return paths
