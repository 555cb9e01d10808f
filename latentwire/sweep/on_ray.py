"""The sweep on a Ray cluster: units of work run by actors that load their model once.

A unit is one model x one source x one category of experiments, which share what is expensive
to build: nearest_k its one exact top-k search, soft_codebook its k-means codes (kept in the
actor's vocabulary for its later units of the same model). The baseline joins anchor_offset:
on text every anchor experiment is a no-op whose generations are the baseline's, and keeping
them in one unit keeps that reuse, so result files say what a local run's say.

One unit per source would leave a one-source sweep (the default) on a single worker and make
its largest unit the whole sweep; by category the largest is nearest_k (10 generations of the
default 28), at the price of a second top-k search (for the anchors), which costs seconds
where a generation costs far more. Workers write the same atomic per-experiment files as a
local run (through runner.run_one), so resume, --force, the summary and the analysis cannot tell
the two apart. A worker whose process dies is restarted by Ray and its unit retried; the retry
keeps every result already written, so nothing is lost. Ray is imported only here, and only
inside functions.
"""

import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from .. import experiments, raycluster
from ..errors import UsageError
from ..files import write_json
from ..memory import keep_freed_memory
from ..raycluster import MAX_RESTARTS
from . import runner
from .options import planned_runs, result_path



@dataclass(frozen=True)
class Unit:
    model: int  # index into the sweep's models
    source: int  # index into that model's plan.sources
    group: str
    names: tuple  # experiment names, in grid order


def units(runs) -> list[Unit]:
    """Every model's units, the largest first within a model, so the longest unit starts early
    and does not finish last on its own."""
    out = []
    for m, (_, plan) in enumerate(runs):
        mine = []
        for s in range(len(plan.sources)):
            groups: dict[str, list] = {}
            for exp in plan.experiments:
                _, t = experiments.of_category(exp.category)
                groups.setdefault(t.ray_group or exp.category, []).append(exp.name)
            mine += [Unit(m, s, g, tuple(names)) for g, names in groups.items()]
        out += sorted(mine, key=lambda u: -len(u.names))
    return out


class Worker:
    """One model, loaded on the first unit and kept for the next ones."""

    def __init__(self, opts, plan, command: list, threads: int):
        keep_freed_memory()  # the same allocator tuning as the command, before torch allocates
        self.opts, self.plan, self.command, self.threads = opts, plan, command, threads
        self.sweep = None

    def run_unit(self, unit: Unit) -> tuple[list, dict]:
        import torch

        if self.sweep is None:
            torch.set_num_threads(self.threads)
            self.sweep = runner.Sweep(self.opts, self.plan, log=lambda line: print(line, flush=True))
            # The worker's own argv is Ray's; the run was asked for by the driver's.
            self.sweep.provenance["command"] = self.command
        spec = self.plan.sources[unit.source]
        # Generations are reused within a unit only, so what a result says it reused does not
        # depend on which units a worker happened to run before.
        self.sweep.reuse = {}
        inputs, effect = self.sweep.source_inputs(spec)
        chosen = [e for e in self.plan.experiments if e.name in unit.names]
        return ([runner.run_one(self.sweep, self.plan, spec, exp, inputs, effect,
                                f"[{spec.spec} {unit.group} {i}/{len(chosen)}]")
                 for i, exp in enumerate(chosen, 1)],
                self.sweep.provenance)


def run(runs, address: str, log=print) -> tuple[list[dict], int]:
    """Every model's sweep on Ray; one summary per model (written to its folder, as a local
    run writes it) and the exit code of a local run."""
    opts = runs[0][0]
    where = opts.output_dir if len(runs) == 1 else str(Path(opts.output_dir).parent)
    with raycluster.session(address, opts, where) as shape:
        return _run(runs, shape, log)


def _run(runs, shape, log) -> tuple[list[dict], int]:
    ray = raycluster.require_ray()
    from ray.exceptions import RayActorError, RayTaskError

    cpus, gpus, capacity = shape
    todo = units(runs)
    queues = [deque(u for u in todo if u.model == m) for m in range(len(runs))]
    remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=MAX_RESTARTS,
                        max_task_retries=MAX_RESTARTS)(Worker)
    log(f"Ray: {len(todo)} units (model x source x category) of {len(runs)} model(s), at most "
        f"{capacity} at once ({cpus:g} CPU, {gpus:g} GPU per worker)")
    pending: dict = {}  # ObjectRef -> (actor, unit)
    results: list[dict] = [{} for _ in runs]  # per model: (source, experiment) -> result
    provenance: list[dict] = [{} for _ in runs]
    lost, done, start = [], 0, time.time()

    workers = [0] * len(runs)  # live workers per model

    def launch(m: int) -> None:
        one, plan = runs[m]
        workers[m] += 1
        give(remote.remote(one, plan, sys.argv, max(1, int(cpus))), m)

    def give(actor, m: int) -> None:
        unit = queues[m].popleft()
        pending[actor.run_unit.remote(unit)] = (actor, unit)

    def short_of_workers() -> int | None:
        """The model whose queue most exceeds its workers, each of which takes one more unit
        when it is done: a new worker pays a model load, so it starts only for units that the
        model's own workers would not reach next."""
        short = [m for m in range(len(runs)) if len(queues[m]) > workers[m]]
        return max(short, key=lambda m: len(queues[m]) - workers[m]) if short else None

    # Start with one worker per model in turn, until the cluster is full or every unit has one.
    while len(pending) < capacity and any(queues):
        for m in range(len(runs)):
            if queues[m] and len(pending) < capacity:
                launch(m)
    interrupted = False
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            actor, unit = pending.pop(ready[0])
            one, plan = runs[unit.model]
            spec = plan.sources[unit.source]
            try:
                unit_results, prov = ray.get(ready[0])
            except RayTaskError as err:
                if isinstance(err.cause, UsageError):
                    raise UsageError(str(err.cause)) from None
                raise
            except RayActorError as err:
                # Restarted MAX_RESTARTS times and died again: give up on this unit only.
                lost.append(unit)
                log(f"worker for {one.model_id} died {MAX_RESTARTS + 1} times in unit "
                    f"{spec.spec} {unit.group} ({type(err).__name__}); its experiments are not run")
                actor, unit_results = None, []
                workers[unit.model] -= 1
            else:
                for r in unit_results:
                    path = result_path(plan, spec, r["experiment"])
                    if not path.exists():
                        raise UsageError(f"a worker wrote {path} where this machine cannot see "
                                         "it: --output_dir must be on storage every node shares")
                    results[unit.model][(r["source"], r["experiment"])] = r
                provenance[unit.model] = provenance[unit.model] or prov
            done += 1
            ok = [r for r in unit_results if r["status"] == "ok"]
            best = max(ok, key=lambda r: r["f1"], default=None)
            log(f"[{done}/{len(todo)} units, {time.time() - start:.0f}s] {one.model_id} "
                f"{spec.spec} {unit.group}: {len(ok)}/{len(unit.names)} ok"
                + (f", best {best['experiment']} F1 {best['f1']:.3f}" if best else ""))
            if actor is not None and queues[unit.model]:
                give(actor, unit.model)
                continue
            if actor is not None:
                ray.kill(actor)  # frees its CPU/GPU for a model that still has units
                workers[unit.model] -= 1
            nxt = short_of_workers()
            if nxt is not None:
                launch(nxt)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        for actor, _ in pending.values():
            ray.kill(actor)
    summaries = []
    for m, (one, plan) in enumerate(runs):
        planned = planned_runs(plan)
        ordered = [results[m][key] for key in planned if key in results[m]]
        summary = runner.build_summary(ordered, planned, provenance[m], interrupted)
        summary_path = plan.output_dir / "summary.json"
        write_json(summary_path, summary)
        if interrupted:
            print(f"interrupted: {len(ordered)} of {len(planned)} runs of {one.model_id} kept; "
                  f"partial summary in {summary_path}; rerun the same command to resume",
                  file=sys.stderr)
        summaries.append(summary)
    if interrupted:
        return summaries, 130
    return summaries, 1 if lost or any(s["failed"] for s in summaries) else 0
