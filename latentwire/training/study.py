"""The compression study: encoder x compression x setting at one training budget, beside the
controls, in one table and one plot.

Every cell is one training run in OUTPUT_DIR/<setting>/<encoder>_x<R>/. Finished runs are read,
interrupted ones resumed, so the same command continues a killed study. Cells run one after
another here, or with --ray side by side as Ray tasks, each the same run folder. The controls are always
in the grid: the `constant` encoder at every compression (a learned prefix that never sees the
context) and `pool` at 1x (the text itself, trained the same way: the uncompressed reference);
the zero-shot text and the question alone are every run's references.
"""

import json
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

from .. import raycluster, stats
from ..models import model_dirname
from ..errors import StorageError, UsageError
from ..files import read_json, write_json, write_text
from ..plots import pyplot, save
from . import checkpoint
from .loop import run as train
from .options import SETTINGS, StudyOptions, TrainOptions, made_otherwise, validate
from .registry import ENCODERS, fitted_presses, token_keepers
from .summary import draw_references, last_answers, references_sentence
from .trainer import kept_models, load_models


@dataclass(frozen=True)
class Cell:
    setting: str
    encoder: str
    compression: float
    model: str | None = None  # trained for this model alone (--dedicated); None: --model_id's

    @property
    def name(self) -> str:
        alone = f"-{model_dirname(self.model)}" if self.model else ""
        return f"{self.setting}/{self.encoder}_x{self.compression:g}{alone}"


def cells(opts: StudyOptions) -> list[Cell]:
    encoders = [e.strip() for e in opts.encoders.split(",") if e.strip()]
    settings = [s.strip() for s in opts.settings.split(",") if s.strip()]
    try:
        ratios = [float(r) for r in opts.compressions.split(",") if r.strip()]
    except ValueError:
        raise UsageError(f"--compressions takes numbers, e.g. 1,4,8,16 (got {opts.compressions!r})")
    for e in encoders:
        if e not in ENCODERS:
            raise UsageError(f"unknown encoder {e!r} in --encoders; use: {', '.join(ENCODERS)}")
    for s in settings:
        if s not in SETTINGS:
            raise UsageError(f"unknown setting {s!r} in --settings; use: {', '.join(SETTINGS)}")
    for name, given in (("--encoders", encoders), ("--settings", settings),
                        ("--compressions", ratios)):
        if not given:
            raise UsageError(f"{name} is empty; a study needs at least one")
    if opts.base.answer_kept and not any(ENCODERS[e].keeps_tokens for e in encoders):
        raise UsageError("--answer_kept cuts the training of the cells whose encoder keeps the "
                         f"context's tokens, and none of --encoders {opts.encoders} does; drop it "
                         f"or add one of: {', '.join(token_keepers())}")
    if opts.base.press_samples and not any(ENCODERS[e].fitted for e in encoders):
        raise UsageError("--press_samples sets the fit of the cells whose press is fitted on "
                         f"the training questions, and none of --encoders {opts.encoders} is "
                         "one; drop it or add one of: "
                         f"{', '.join(fitted_presses())}")
    if min(ratios) < 1:
        raise UsageError(f"--compressions must each be at least 1 (got {min(ratios):g}): a ratio "
                         "is text positions per latent, 1 for none")
    models = opts.base.model_ids()
    if opts.dedicated and len(models) < 2:
        raise UsageError("--dedicated sets runs shared by several models against each model "
                         "alone; pass the models as --model_id A,B")
    alone = models if opts.dedicated else []
    out = []
    for s in settings:
        # A compressor that needs the question (LongLLMLingua) has no query-agnostic cell; one
        # that never reads it answers the same in both settings, so its agnostic cell stands
        # for its aware one (see _rows) instead of repeating it.
        grid = [(e, r) for e in encoders for r in ratios
                if not (SETTINGS[s] and ENCODERS[e].needs_question)
                and not (not SETTINGS[s] and "agnostic" in settings and _question_blind(e))]
        # The learned-prefix control is a control of training: untrained (--samples 0) it is
        # an arbitrary prefix, and the question-alone reference already says what no context
        # gives. pool at 1x untrained is the text itself, the uncompressed reference.
        controls = [("constant", r) for r in ratios] if opts.base.samples else []
        grid += controls + [("pool", 1.0)]
        for m in [None, *alone]:
            for e, r in grid:
                for cell in _per_model(Cell(s, e, r, m), models):
                    if cell not in out:
                        out.append(cell)
    return out


def _per_model(cell: Cell, models: list[str]) -> list[Cell]:
    """A text relay's cell over several models is one run per model, each reading its own
    tokens of the text the first model's compressed (see field.Relay); any other cell is
    itself."""
    if len(models) < 2 or cell.model is not None or not ENCODERS[cell.encoder].relay:
        return [cell]
    return [replace(cell, model=m) for m in models]


def _question_blind(encoder: str) -> bool:
    """A training-free compressor that never reads the question (truncate, KVzip, LLMLingua):
    the question follows as text in both settings, so its aware run would be its agnostic run
    again, answer for answer."""
    entry = ENCODERS[encoder]
    return entry.field is not None and entry.field_compressor().query_aware is False


def _rows(todo: list[Cell]) -> list[tuple[Cell, Cell]]:
    """(the cell a row shows, the cell whose run it reads), settings in the study's order: each
    cell itself, and a question-blind compressor's agnostic cell once more for the aware
    setting, where the study has both."""
    settings = list(dict.fromkeys(c.setting for c in todo))
    pairs = [(c, c) for c in todo]
    if "aware" in settings:
        pairs += [(replace(c, setting="aware"), c) for c in todo
                  if c.setting == "agnostic" and _question_blind(c.encoder)]
    return sorted(pairs, key=lambda pair: settings.index(pair[0].setting))


def _chosen(opts: StudyOptions, todo: list[Cell]) -> set[str]:
    """The names of the cells --only picks (every cell's when it is empty)."""
    names = [c.name for c in todo]
    picked = [n.strip() for n in opts.only.split(",") if n.strip()]
    for n in picked:
        if n not in names:
            raise UsageError(f"unknown cell {n!r} in --only; this study's cells: {', '.join(names)}")
    return set(picked or names)


def _options(opts: StudyOptions, cell: Cell, resume: bool) -> TrainOptions:
    # --encoder_lora and --encoder_layer describe the lm encoder's reader: the controls and the
    # other encoders of the same study have none, and train as they would alone.
    reads = ENCODERS[cell.encoder].needs_model
    # --answer_kept is a cut of what a token-keeping encoder trains on; the controls and the
    # compressors that keep no text train on the draws as they come, to the same --samples.
    cut = opts.base.answer_kept and ENCODERS[cell.encoder].keeps_tokens
    alone = {"model_id": cell.model, "model_weights": ""} if cell.model else {}
    # A cell trained for one model alone is the same encoder as the shared cell, reader
    # included, so that the two differ by the sharing only; the uncompressed reference is the
    # model reading its own text.
    if cell.model and opts.base.reader_id() != cell.model:
        own = (cell.encoder, cell.compression) == ("pool", 1.0)
        alone["encoder_model"] = None if own else opts.base.reader_id()
    return replace(opts.base, **alone, encoder=cell.encoder, compression=cell.compression, latent_len=None,
                   keep_question=SETTINGS[cell.setting], resume="yes" if resume else "no",
                   output_dir=str(Path(opts.output_dir) / cell.name),
                   answer_kept=cut, encoder_lora=opts.base.encoder_lora if reads else 0,
                   press_samples=opts.base.press_samples if ENCODERS[cell.encoder].fitted else 0,
                   encoder_layer=opts.base.encoder_layer if reads else None)


def _status(path: Path) -> str:
    status = (read_json(path / "summary.json") or {}).get("status")
    if status in ("finished", "failed"):
        return status
    return "resume" if checkpoint.existing(path / "checkpoints" / "last") else "new"


def run(opts: StudyOptions, log=print) -> int:
    """Train every cell that has not ended, here or on Ray; write the table of the finished
    ones. Exit code: 0, or 1 when a cell failed (the table holds the others)."""
    raycluster.check(opts, opts.ray is not None)
    todo = cells(opts)
    chosen = _chosen(opts, todo)
    statuses = [_status(Path(opts.output_dir) / c.name) for c in todo]
    plans = [(c, s, _options(opts, c, s == "resume")) for c, s in zip(todo, statuses)]
    for cell, status, o in plans:  # every cell's flags checked before the model loads
        if status not in ("finished", "failed"):
            validate(o)
        elif status == "finished" and (other := made_otherwise(o)):  # kept, it would pass as ours
            raise UsageError(f"{o.output_dir} holds {cell.name} made with other flags ({other}); "
                             "rerun the study with those flags, or pick another --output_dir")
    failed, left = [], []
    for n, (cell, status, o) in enumerate(plans, 1):
        if status == "finished":
            log(f"[{n}/{len(plans)}] {cell.name}: kept from an earlier run")
        elif status == "failed":  # not retried: the same flags would fail the same way
            log(f"[{n}/{len(plans)}] {cell.name}: failed in an earlier run (see its summary.json)")
            failed.append(cell.name)
        elif cell.name not in chosen:
            log(f"[{n}/{len(plans)}] {cell.name}: not in --only, left for a later run")
        else:
            left.append((n, cell, o))
    if left:
        failed += (_here if opts.ray is None else _on_ray)(opts, left, len(plans), log)
    rows, costs = table(opts, todo), sharing(opts, todo)
    if rows:
        _write(opts, rows, costs)
        log("\n" + render(rows) + (f"\n\n{render_sharing(costs)}" if costs else ""))
    if failed:
        log(f"failed cells: {', '.join(failed)} (not in the table)")
    return 1 if failed else 0


def _finished(opts: StudyOptions, cell: Cell) -> str | None:
    """A finished cell's folder, whose references the cell takes over: every cell for the same
    models evaluates the same examples with the same frozen models (the trainer checks that
    they do)."""
    done = [Path(opts.output_dir) / c.name for c in cells(opts) if c.model == cell.model]
    return next((str(p) for p in done if _status(p) == "finished"), None)


def _with_press(opts: StudyOptions, cell: Cell, o: TrainOptions) -> TrainOptions:
    """A cell whose press is fitted on the training questions, given the folder of another such
    cell for the same models that has fitted its press by now (--press_from): the trainer takes
    that fit only where it is the one this cell would make, so kvpress:learned and
    offset:kvpress:learned of one study fit each model's press once (on Qwen2.5-Coder-0.5B, 20
    minutes each)."""
    if not ENCODERS[cell.encoder].fitted or o.samples == 0:
        return o
    fitted = [Path(opts.output_dir) / c.name for c in cells(opts)
              if c.model == cell.model and c.name != cell.name and ENCODERS[c.encoder].fitted]
    done = next((str(p) for p in fitted if (p / "config.json").is_file()
                 and any(p.glob(checkpoint.press_file(p, "*").name))), None)
    return replace(o, press_from=done) if done else o


def _here(opts: StudyOptions, left: list, total: int, log) -> list[str]:
    """The cells one after another in this process, sharing one load of the model; the names
    of those that failed."""
    loaded, failed = {}, []
    for n, cell, o in left:
        log(f"[{n}/{total}] {cell.name}{' (resumed)' if o.resume == 'yes' else ''}")
        loaded.update(load_models(o, loaded))
        if train(_with_press(opts, cell, o), log, loaded, references_from=_finished(opts, cell)):
            # Its summary says failed and why; the cells after it do not depend on it.
            log(f"[{n}/{total}] {cell.name}: failed; the study goes on without it")
            failed.append(cell.name)
    return failed


def train_cell(o: TrainOptions, driver: dict, references_from: str | None) -> int:
    """One cell as a Ray task: its training run, as the driver would run it (see
    raycluster.driver). A task that Ray retries after its worker died continues from the
    checkpoint the dead one left."""
    log = raycluster.as_driver(driver, str(Path(o.output_dir).relative_to(
        Path(o.output_dir).parents[1])))
    resume = "yes" if _status(Path(o.output_dir)) == "resume" else "no"
    return train(replace(o, resume=resume), log, kept_models(o), references_from=references_from)


def _on_ray(opts: StudyOptions, left: list, total: int, log) -> list[str]:
    """The cells as Ray tasks, as many at once as the cluster holds; each is started with the
    references of a cell finished by then. The names of the cells that failed: a non-finite
    loss, an error inside the run, or a worker that died on every retry (a rerun tries those
    again)."""
    ray = raycluster.require_ray()
    from ray.exceptions import RayError, RayTaskError

    failed = []
    with raycluster.session(opts.ray, opts, opts.output_dir) as (cpus, gpus, capacity):
        task = ray.remote(num_cpus=cpus, num_gpus=gpus,
                          max_retries=raycluster.MAX_RESTARTS)(train_cell)
        queue, pending = deque(left), {}
        driver = raycluster.driver(cpus)

        def launch() -> None:
            n, cell, o = queue.popleft()
            log(f"[{n}/{total}] {cell.name}: started on Ray")
            o = replace(_with_press(opts, cell, o), output_dir=str(Path(o.output_dir).resolve()))
            pending[task.remote(o, driver, _finished(opts, cell))] = (n, cell)

        log(f"Ray: {len(left)} cells as tasks, at most {capacity} at once ({cpus:g} CPU, "
            f"{gpus:g} GPU each)")
        while queue and len(pending) < capacity:
            launch()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            n, cell = pending.pop(ready[0])
            try:
                why = "a non-finite loss" if ray.get(ready[0]) else None
            except RayTaskError as err:
                if isinstance(err.cause, (UsageError, StorageError)):
                    raise err.cause from None  # a run's own one line: it stops the study
                lines = str(err.cause or err).strip().splitlines()
                why = lines[-1] if lines else type(err).__name__
            except RayError as err:
                why = (f"its worker died {raycluster.MAX_RESTARTS + 1} times "
                       f"({type(err).__name__}); a rerun tries it again")
            if why is None and _status(Path(opts.output_dir) / cell.name) != "finished":
                raise UsageError(f"a Ray worker trained {cell.name} where this machine cannot "
                                 "see it: --output_dir must be on storage every node shares")
            if why:
                log(f"[{n}/{total}] {cell.name}: failed ({why}); the study goes on without it")
                failed.append(cell.name)
            else:
                log(f"[{n}/{total}] {cell.name}: finished")
            if queue:
                launch()
    return failed


def results(path: Path) -> dict:
    """A finished run's last evaluation per answering model, by name (None for a run over one
    model): (its summary section: final, references, compression_ratio; its F1 per question)."""
    return {name: (section, [p["f1"] for p in predictions])
            for name, (section, predictions) in last_answers(path).items()}


def _loaded(opts: StudyOptions, todo: list[Cell]) -> dict:
    out = Path(opts.output_dir)
    return {c: results(out / c.name) for c in todo if _status(out / c.name) == "finished"}


def table(opts: StudyOptions, todo: list[Cell]) -> list[dict]:
    """One row per finished cell (per cell and model, for cells trained for several): F1/EM
    with CIs, the paired difference to the constant control at the same compression and
    setting and to the best training-free compressor there, the share of the uncompressed
    reference, `pool` at 1x, trained as the study trains (each where that cell finished too,
    for the same model), and the evaluation's seconds per answer (compressing included). A
    question-blind compressor's agnostic cell is a row of the aware setting too, against that
    setting's control and reference; `run` names the cell it reads."""
    loaded = _loaded(opts, todo)
    rows, scores = [], []
    for c, source in _rows(todo):
        per_model = loaded.get(source)
        relayed = c.model is not None and ENCODERS[c.encoder].relay
        if per_model is None or (c.model is not None and not relayed):
            continue  # the sharing table's: one model alone
        if relayed:  # a row of the model that read its own text
            per_model = {model_dirname(c.model): per_model[None]}
        summary = json.loads((Path(opts.output_dir) / source.name / "summary.json").read_text())
        seconds = summary["train_seconds"]
        per_answer = ((summary["epochs"][-1]["eval_seconds"]
                       + summary.get("eval_compress_seconds", 0.0))
                      / (summary["split"]["eval_examples"] * len(per_model)))
        for name, (own, f1s) in per_model.items():
            control = loaded.get(Cell(c.setting, "constant", c.compression), {}).get(name)
            reference = loaded.get(Cell(c.setting, "pool", 1.0), {}).get(name)
            vs = (stats.paired_comparison(f1s, control[1])
                  if control and c.encoder != "constant" else None)
            share, share_ci = _share(f1s, reference)
            rows.append({"setting": c.setting, "encoder": c.encoder, "compression": c.compression,
                         **({"model": name} if name is not None else {}),
                         **({"run": source.name} if source != c else {}),
                         "measured_compression": own["compression_ratio"],
                         "f1": own["final"]["f1"], "em": own["final"]["em"],
                         "ci": own["final"]["ci"], "vs_constant": vs,
                         "share_of_uncompressed": share, "share_ci": share_ci,
                         "references": own["references"],
                         "train_seconds": seconds, "seconds_per_answer": per_answer})
            scores.append(f1s)
    _against_best_field(rows, scores)
    return rows


def _against_best_field(rows: list[dict], scores: list[list]) -> None:
    """Each row's paired difference to the training-free compressor with the highest F1 at its
    setting, compression and model (`vs_best_field`; None for that compressor itself and where
    none finished), and that compressor's name (`best_field`)."""
    groups = {}
    for row, f1s in zip(rows, scores):
        if ENCODERS[row["encoder"]].training_free:
            key = (row["setting"], row["compression"], row.get("model"))
            if key not in groups or row["f1"] > groups[key][0]["f1"]:
                groups[key] = (row, f1s)
    for row, f1s in zip(rows, scores):
        best = groups.get((row["setting"], row["compression"], row.get("model")))
        row["best_field"] = best[0]["encoder"] if best else None
        row["vs_best_field"] = (stats.paired_comparison(f1s, best[1])
                                if best and best[0] is not row else None)


def sharing(opts: StudyOptions, todo: list[Cell]) -> list[dict]:
    """The cost of sharing (--dedicated): per shared cell and model, where the cell finished
    for that model alone too, the shared run's F1 against the dedicated one's (paired, on the
    same questions), and each as a share of the model's own uncompressed trained reference
    (pool at 1x trained for it alone)."""
    loaded = _loaded(opts, todo)
    rows = []
    for c, per_model in loaded.items():
        if c.model is not None:
            continue
        for m in opts.base.model_ids():
            name = model_dirname(m)
            shared = per_model.get(name)
            dedicated = loaded.get(Cell(c.setting, c.encoder, c.compression, m), {}).get(None)
            if shared is None or dedicated is None:
                continue
            own = loaded.get(Cell(c.setting, "pool", 1.0, m), {}).get(None)
            shared_share, shared_ci = _share(shared[1], own)
            dedicated_share, dedicated_ci = _share(dedicated[1], own)
            rows.append({"setting": c.setting, "encoder": c.encoder, "compression": c.compression,
                         "model": name, "measured_compression": shared[0]["compression_ratio"],
                         "shared": _brief(shared[0]["final"]),
                         "dedicated": _brief(dedicated[0]["final"]),
                         "shared_vs_dedicated": stats.paired_comparison(shared[1], dedicated[1]),
                         "shared_of_own_uncompressed": shared_share,
                         "shared_of_own_uncompressed_ci": shared_ci,
                         "dedicated_of_own_uncompressed": dedicated_share,
                         "dedicated_of_own_uncompressed_ci": dedicated_ci})
    return rows


def _share(f1s: list, reference) -> tuple:
    """F1 as a share of a reference run's (its results() entry) on the same questions, with a
    paired bootstrap interval: the targets are shares, and a point ratio near one hides which
    side of it a run is. (None, None) without a reference or when it scored nothing."""
    if not reference or reference[0]["final"]["f1"] <= 0:
        return None, None
    share, ci = stats.ratio_ci(f1s, reference[1])
    return share, list(ci)


def _brief(final: dict) -> dict:
    return {k: final[k] for k in ("f1", "em", "ci")}


def render_sharing(rows: list[dict]) -> str:
    def f1(r):
        return f"{r['f1']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]"

    def share(r, key):
        return _percent(r[key], r[f"{key}_ci"])

    lines = ["The cost of sharing: each model's F1 from the latents shared by all, against the "
             "same encoder trained for it alone (dedicated), with the same flags and budget.\n",
             "| setting | encoder | model | positions vs text | shared F1 [95% CI] | dedicated "
             "F1 [95% CI] | shared - dedicated (paired) | shared, dedicated of its own "
             "uncompressed trained |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['encoder']} | {r['model']} | "
                     f"{r['measured_compression']:.2f}x fewer | {f1(r['shared'])} | "
                     f"{f1(r['dedicated'])} | {_paired(r['shared_vs_dedicated'])} | "
                     f"{share(r, 'shared_of_own_uncompressed')}, "
                     f"{share(r, 'dedicated_of_own_uncompressed')} |")
    return "\n".join(lines)


def _paired(vs) -> str:
    if not vs:
        return "-"
    return f"{vs['diff']:+.3f} [{vs['diff_ci'][0]:+.3f}, {vs['diff_ci'][1]:+.3f}] {vs['label']}"


def _percent(share, ci) -> str:
    return f"{share:.0%} [{ci[0]:.0%}, {ci[1]:.0%}]" if share is not None else "-"


def render(rows: list[dict]) -> str:
    several = "model" in rows[0]
    lines = ["| setting | encoder |" + (" model |" if several else "") + " positions vs text | "
             "F1 [95% CI] | EM | vs constant (paired) | vs best training-free (paired) | "
             "of uncompressed (pool 1x, paired) | s per answer |",
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if several else "")]
    for r in rows:
        best = (_paired(r["vs_best_field"]) + f" ({r['best_field']})" if r["vs_best_field"]
                else "best" if r["best_field"] == r["encoder"] else "-")
        share = _percent(r["share_of_uncompressed"], r["share_ci"])
        model = f" {r['model']} |" if several else ""
        encoder = r["encoder"] + (f" (reads no question: {r['run']})" if "run" in r else "")
        lines.append(f"| {r['setting']} | {encoder} |{model} {r['measured_compression']:.2f}x fewer "
                     f"| {r['f1']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] | {r['em']:.3f} "
                     f"| {_paired(r['vs_constant'])} | {best} | {share} "
                     f"| {r['seconds_per_answer']:.2f} |")
    for r in {r.get("model"): r for r in rows}.values():
        whose = f" of {r['model']}" if several else ""
        lines.append("\n" + references_sentence(r["references"], whose))
    return "\n".join(lines)


def _write(opts: StudyOptions, rows: list[dict], costs: list[dict]) -> None:
    out = Path(opts.output_dir)
    write_json(out / "study.json", {"rows": rows, **({"sharing": costs} if costs else {})})
    write_text(out / "study.md", render(rows) + (f"\n\n{render_sharing(costs)}" if costs else "")
               + "\n")
    plt = pyplot()
    settings = sorted({r["setting"] for r in rows}, key=list(SETTINGS).index)
    fig, axes = plt.subplots(1, len(settings), figsize=(6.4 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        mine = [r for r in rows if r["setting"] == setting]
        # A line per encoder (per encoder and model, for cells trained for several).
        for encoder, model in dict.fromkeys((r["encoder"], r.get("model")) for r in mine):
            pts = sorted((r for r in mine if (r["encoder"], r.get("model")) == (encoder, model)),
                         key=lambda r: r["measured_compression"])
            ax.errorbar([r["measured_compression"] for r in pts], [r["f1"] for r in pts],
                        yerr=[[r["f1"] - r["ci"][0] for r in pts], [r["ci"][1] - r["f1"] for r in pts]],
                        marker="o", capsize=3,
                        label=encoder if model is None else f"{encoder} ({model})")
        for r in {r.get("model"): r for r in mine}.values():
            draw_references(ax, r["references"], "" if "model" not in r else f" of {r['model']}")
        ax.set(xscale="log", xlabel="text positions per latent (measured)", ylabel="evaluation F1",
               title=f"query-{setting}", ylim=(0, 1))
        ax.legend(fontsize=8)
    save(fig, out / "plots" / "study.png")
