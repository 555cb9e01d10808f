"""What a training run writes about itself besides its checkpoints: the evaluation split as a
dataset file, metrics.jsonl, summary.json, the plots, and the summary it prints at the end."""

import json
import os
from pathlib import Path

from ..files import read_json, write_text, writing
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


def last_answers(folder: Path) -> dict | None:
    """A run's last evaluation per answering model, by name (None for a run over one model): (its
    summary section: final, references, compression_ratio; its predictions, each with the
    question's id and F1). None where a file of it is missing or unreadable."""
    summary = read_json(folder / "summary.json")
    if not summary or not summary.get("epochs"):
        return None
    evaluation = read_json(folder / "eval" / f"epoch{summary['epochs'][-1]['epoch']}.json")
    if evaluation is None:
        return None
    if "models" not in summary:
        return {None: (summary, evaluation["predictions"])}
    return {name: (section, evaluation["models"][name]["predictions"])
            for name, section in summary["models"].items()}


def without_predictions(result: dict) -> dict:
    """An evaluation as metrics.jsonl and the trackers get it: every figure, no answers."""
    out = {k: v for k, v in result.items() if k not in ("predictions", "models")}
    if "models" in result:
        out["models"] = {name: without_predictions(r) for name, r in result["models"].items()}
    return out


def _brief(r):
    return {k: r[k] for k in ("f1", "em", "empty_rate", "ci")} if r else None


def summary(trainer, state, status: str, wall: float) -> dict:
    """summary.json: the last evaluation against the references, every epoch, the split; for a
    run over several models, a section per model (its evaluation against its own references)
    and the paired difference between them."""
    refs = state.references or {}
    last = state.epochs[-1]["eval"] if state.epochs else None

    def final(r):
        return {**_brief(r), "latent_diagnostics": r["latent_diagnostics"]} if r else None

    def epoch(e):
        row = {k: v for k, v in e.items() if k != "eval"}
        if "models" in e["eval"]:
            row["eval_f1_by_model"] = {n: r["f1"] for n, r in e["eval"]["models"].items()}
        return row

    out = {
        "status": status,
        "encoder": trainer.opts.encoder, "transform": trainer.spec.transform.to_json(),
        "compression_ratio": last["compression_ratio"] if last else None,
        "latents_per_example": last["latents_per_example"] if last else None,
        "keep_question": trainer.opts.keep_question,
        "final": final(last),
        "best": state.best,
        # A run over several models has each model's references in its own section.
        "references": {k: _brief(v) for k, v in refs.items()} if "text" in refs else {},
        "epochs": [epoch(e) for e in state.epochs],
        "steps": state.step, "train_seconds": round(state.elapsed, 1), "wall_seconds": round(wall, 1),
        "trainable_parameters": sum(p.numel() for p in trainer.params),
        "eval_compress_seconds": round(sum(a.compress_seconds for a in trainer.answerers), 2),
        "split": trainer.split.describe(),
        # Nothing trained (--samples 0, or a compressor fitted before training): nothing to
        # keep but the evaluation.
        "checkpoints": ({"last": "checkpoints/last", "best": "checkpoints/best"}
                        if trainer.params else None),
    }
    if trainer.opts.max_minutes:
        planned = trainer.total_steps()
        out["budget"] = {"max_minutes": trainer.opts.max_minutes, "planned_steps": planned,
                         "stopped_early": state.step < planned}
    if len(trainer.answerers) > 1:
        out["models"] = {a.name: model_section(a, last["models"][a.name] if last else None,
                                               refs.get(a.name, {}), final)
                         for a in trainer.answerers}
        out["paired"] = last["paired"] if last else None
    return out


def model_section(answerer, result: dict | None, refs: dict, final) -> dict:
    return {"model_id": answerer.model_id, "weight": answerer.weight,
            "compression_ratio": result["compression_ratio"] if result else None,
            "latents_per_example": result["latents_per_example"] if result else None,
            "final": final(result), "references": {k: _brief(v) for k, v in refs.items()}}


def _row(name, r):
    if not r:
        return f"  {name:<16} -"
    return (f"  {name:<16} F1 {r['f1']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]  "
            f"EM {r['em']:.3f}")


def _frame(final: dict | None, refs: dict, indent: str = "") -> list[str]:
    """The latents against the text and the question alone, on the same examples."""
    lines = [indent + _row("latents (final)", final), indent + _row("text itself", refs.get("text")),
             indent + _row("question only", refs.get("question_only"))]
    if final and refs.get("question_only"):
        floor = refs["question_only"]["ci"][1]
        if final["ci"][1] <= floor or final["f1"] <= refs["question_only"]["f1"]:
            lines.append(f"{indent}  The latents do no better than the question alone: they "
                         "carry no usable content from the context.")
    return lines


def render(s: dict) -> str:
    """The run against its frame: the text and the question alone, on the same examples; for
    several models, each against its own, and the two on the same questions."""
    shape = (f"{s['compression_ratio']:.2f}x fewer positions than the text" if s["final"]
             else "no epoch finished")
    if "models" in s:
        lines = [f"{s['encoder']} + {s['transform']['name']}, one latent sequence read by "
                 f"{len(s['models'])} models:"]
        for name, m in s["models"].items():
            ratio = (f"{m['compression_ratio']:.2f}x fewer positions than its text"
                     if m["final"] else "no epoch finished")
            lines += [f"  {name} ({m['model_id']}, weight {m['weight']:g}), {ratio}:",
                      *_frame(m["final"], m["references"], "  ")]
        p = s.get("paired")
        if p:
            lines.append(f"  paired, {p['a']} - {p['b']} on the same questions: F1 "
                         f"{p['diff']:+.3f} [{p['diff_ci'][0]:+.3f}, {p['diff_ci'][1]:+.3f}] "
                         f"({p['label']})")
    else:
        lines = [f"{s['encoder']} + {s['transform']['name']}, {shape}:",
                 *_frame(s["final"], s["references"])]
    if s["encoder"] == "constant":
        lines.append("  This is the control: latents of other encoders count only where they "
                     "beat it at the same budget.")
    else:
        lines.append("  Compare with --encoder constant at the same budget: a trained prefix "
                     "counts only if it beats one that never sees the context.")
    return "\n".join(lines)


# The two references every evaluation is read against: (key, name, line style, colour alone).
REFERENCES = (("text", "text itself", "--", "#444444"), ("question_only", "question only", ":",
                                                         "#8c564b"))


def references_sentence(refs: dict, whose: str = "") -> str:
    """One model's references as the sentence under a table (a study's, a screen's)."""
    return (f"References{whose} (untrained, the same evaluation examples): text itself F1 "
            f"{refs['text']['f1']:.3f}, question only F1 {refs['question_only']['f1']:.3f}.")


def draw_references(ax, refs: dict, whose: str = "", colour: str | None = None) -> None:
    """One model's references as horizontal lines, in grey and brown, or all in its `colour`."""
    for key, name, style, alone in REFERENCES:
        ax.axhline(refs[key]["f1"], ls=style, color=colour or alone,
                   label=f"{name}{whose} ({refs[key]['f1']:.3f})")


def reference_lines(refs: dict) -> str:
    """The references as the run prints them when it has computed them."""
    def line(r, lead=""):
        return f"  {lead}text F1 {r['text']['f1']:.3f}   question only F1 {r['question_only']['f1']:.3f}"
    if "text" in refs:
        return line(refs)
    return "\n".join(line(r, f"{name}: ") for name, r in refs.items())


def model_lines(result: dict) -> list[str]:
    """Each model's line of an evaluation over several, and their paired difference."""
    if "models" not in result:
        return []
    lines = [f"  {name}: F1 {r['f1']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]  EM {r['em']:.3f}"
             f"  empty {r['empty_rate']:.0%}  ({r['compression_ratio']:.1f}x fewer positions)"
             for name, r in result["models"].items()]
    p = result["paired"]
    return lines + [f"  {p['a']} - {p['b']}: F1 {p['diff']:+.3f} [{p['diff_ci'][0]:+.3f}, "
                    f"{p['diff_ci'][1]:+.3f}] {p['label']}"]


COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd")


def plot(run_dir: Path) -> list[Path]:
    """plots/loss.png, the loss per step, and plots/f1.png, F1 per epoch against the
    references: each model's against its own, for a run over several."""
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
    # One model: its curve and references, as (label, its evaluations, its references).
    curves = ([("latents", evals, refs)] if "text" in refs else
              [(name, [r["models"][name] | {"epoch": r["epoch"]} for r in evals], refs[name])
               for name in refs])
    for n, (label, points, own) in enumerate(curves):
        colour = COLOURS[n % len(COLOURS)]
        if points:
            ax.errorbar([r["epoch"] for r in points], [r["f1"] for r in points],
                        yerr=[[r["f1"] - r["ci"][0] for r in points],
                              [r["ci"][1] - r["f1"] for r in points]],
                        marker="o", capsize=3, color=colour, label=label)
        # One model's references in their own colours; several models' in each model's.
        if len(curves) == 1:
            draw_references(ax, own)
        else:
            draw_references(ax, own, f" of {label}", colour)
    ax.set(xlabel="epoch", ylabel="evaluation F1", title="F1 per epoch against the references",
           ylim=(0, 1))
    ax.legend(fontsize=8)
    paths.append(save(fig, run_dir / "plots" / "f1.png"))
    return paths
