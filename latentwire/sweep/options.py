"""What a sweep is asked to do, and every check that needs no model: a mistake costs a second,
not a model load. Also where each result goes, so the local runner and the Ray units agree."""

import os
from dataclasses import dataclass, replace
from pathlib import Path

from .. import data, experiments, models, prompts, raycluster
from ..errors import UsageError
from ..files import writable_dir
from ..models import model_dirname
from ..options import option

DEFAULT_OUTPUT = "runs/embed_sweep_simple"


@dataclass
class SweepOptions(raycluster.WorkerShape):
    experiment: str = option(
        "all", metavar="NAMES", help="one name, a comma-separated list, or globs like "
        "'nearest_k*'; 'list' prints every name; all: every experiment of --grid")
    samples: int = option(100, metavar="N", help="examples per experiment, after a seeded shuffle")
    model_id: str = option(
        models.BUNDLED, metavar="ID", help="Hugging Face id, local directory, or .gguf file; "
        "several as A,B, each into OUTPUT_DIR/<model>/")
    dataset: str = option(
        "builtin", metavar="SPEC", help="builtin (offline), squad, squad_v2, hotpot, or a path "
        "to a SQuAD .json or a .jsonl of {context, question, answers}")
    output_dir: str = option(DEFAULT_OUTPUT, metavar="DIR", help="where results go")
    source: str = option(
        "text", metavar="SPECS", help="where the embeddings come from, comma-separated: text, "
        "scaled[:F], noisy[:C], mismatch, shift[:S], rotated, adapter:PATH")
    grid: str = option("default", choices=list(experiments.GRIDS),
                       help="default: the seed's 28 experiments; full: the 40 of the Cartesian grid")
    force: bool = option(False, help="redo every experiment, even those with an up-to-date result")
    prompt: str = option(
        "auto", choices=list(prompts.FORMATS), help="auto: the chat template with a short-answer "
        "instruction when the model has one, else the seed's plain 'Context/Question/Answer:' "
        "format")
    seed: int = option(42, help="sampling and source seed")
    max_new_tokens: int = option(12, metavar="N", help="greedy tokens per answer, as the seed's")
    batch_tokens: int | None = option(None, metavar="N",
                                      help="prompt tokens per batch; unset: chosen for the device")
    device: str | None = option(None, choices=["cpu", "cuda"],
                                help="unset: CUDA when available, else CPU")
    trust_remote_code: bool = option(False, help="allow a hub model's own code to run")
    ray: str | None = option(
        None, group=raycluster.GROUP, metavar="ADDRESS", nargs="?", const="",
        help="run the sweep's units on Ray workers that keep their model loaded: at ADDRESS, "
             "else at $RAY_ADDRESS, else on a new local Ray; unset: here, without Ray")


@dataclass
class Plan:
    experiments: list
    sources: list
    output_dir: Path


def validate(opts: SweepOptions) -> Plan:
    """Every check that needs no model, so a mistake costs seconds, not a model load."""
    from . import sources  # its corruptions and checkpoint replays stand on torch

    chosen = experiments.select(opts.experiment, opts.grid)
    specs = sources.parse(opts.source)
    if opts.samples < 1:
        raise UsageError(f"--samples must be at least 1 (got {opts.samples})")
    if opts.max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens must be at least 1 (got {opts.max_new_tokens})")
    if opts.batch_tokens is not None and opts.batch_tokens < 1:
        raise UsageError(f"--batch_tokens must be at least 1 (got {opts.batch_tokens}); leave it "
                         "out to have it chosen for the device")
    if opts.prompt not in prompts.FORMATS:
        raise UsageError(f"unknown prompt format {opts.prompt!r}; use one of "
                         f"{', '.join(prompts.FORMATS)}")
    data.check_spec(opts.dataset)
    out = writable_dir(Path(opts.output_dir), "--output_dir / OUTPUT_DIR")
    return Plan(chosen, specs, out)


def plan_models(opts: SweepOptions) -> list[tuple[SweepOptions, Plan]]:
    """One (options, plan) per model, all validated before any model loads. A single model keeps
    the layout of a one-model sweep; several get OUTPUT_DIR/<model>/ each."""
    raycluster.check(opts, opts.ray is not None)
    # The seed's script passes MODEL_ID on as the flag: name what the user typed.
    flag = "MODEL_ID" if os.environ.get("MODEL_ID") == opts.model_id else "--model_id"
    ids = models.checked_ids(opts.model_id, flag)
    if len(ids) == 1:
        one = replace(opts, model_id=ids[0])
        return [(one, validate(one))]
    dirs = [model_dirname(m) for m in ids]
    for d in set(dirs):
        same = [m for m, other in zip(ids, dirs) if other == d]
        if len(same) > 1:
            raise UsageError(f"models {', '.join(same)} would share the folder {d}; "
                             "pass them by paths with different final names")
    runs = []
    for m, d in zip(ids, dirs):
        one = replace(opts, model_id=m, output_dir=str(Path(opts.output_dir) / d))
        runs.append((one, validate(one)))
    return runs


def planned_runs(plan: Plan) -> list[tuple[str, str]]:
    return [(s.spec, e.name) for s in plan.sources for e in plan.experiments]


def result_path(plan: Plan, spec, name: str) -> Path:
    """OUTPUT_DIR/<experiment>.json for the seed's text-only sweep; per-source folders otherwise."""
    if [s.spec for s in plan.sources] == ["text"]:
        return plan.output_dir / f"{name}.json"
    return plan.output_dir / spec.dirname / f"{name}.json"
