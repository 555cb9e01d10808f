"""How a sweep runs and resumes: sources x experiments over one model and one set of examples,
or over several models, each into its own folder (here one after another; on Ray, cluster.py).

Every experiment's result is its own JSON file, written atomically; `summary.json` is rebuilt
from those files. A rerun into the same directory skips every result whose fingerprint (model,
data, samples, seed, prompt, source, config and the transform's code) is unchanged, so a killed
sweep loses at most the experiment in flight, and a changed transform is redone by itself.
"""

import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import __version__, data, experiments, models, prompts, sources
from .errors import UsageError
from .formatting import safe_name

DEFAULT_OUTPUT = "runs/embed_sweep_simple"


@dataclass
class SweepOptions:
    experiment: str = "all"
    grid: str = "default"
    source: str = "text"
    model_id: str = models.BUNDLED
    dataset: str = "builtin"
    samples: int = 100
    seed: int = 42
    output_dir: str = DEFAULT_OUTPUT
    prompt: str = "auto"
    max_new_tokens: int = 12
    batch_tokens: int | None = None
    force: bool = False
    device: str | None = None
    trust_remote_code: bool = False
    # None runs here; "" on Ray at RAY_ADDRESS, or on a new local Ray; else at that address.
    ray: str | None = None
    ray_gpus_per_worker: float | None = None  # None: 1 where the cluster has GPUs, else 0
    ray_cpus_per_worker: float = 1.0


@dataclass
class Plan:
    experiments: list
    sources: list
    output_dir: Path


def validate(opts: SweepOptions) -> Plan:
    """Every check that needs no model, so a mistake costs seconds, not a model load."""
    chosen = experiments.select(opts.experiment, opts.grid)
    specs = sources.parse(opts.source)
    if opts.samples < 1:
        raise UsageError(f"--samples must be at least 1 (got {opts.samples})")
    if opts.max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens must be at least 1 (got {opts.max_new_tokens})")
    if opts.prompt not in prompts.FORMATS:
        raise UsageError(f"unknown prompt format {opts.prompt!r}; use one of "
                         f"{', '.join(prompts.FORMATS)}")
    data.check_spec(opts.dataset)
    out = writable_dir(Path(opts.output_dir), "--output_dir / OUTPUT_DIR")
    return Plan(chosen, specs, out)


def writable_dir(out: Path, flag: str) -> Path:
    """Create the folder and prove it takes a file now, not after an hour of work."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"cannot write to output dir {out} ({err.strerror or err}); "
                         f"pass a writable {flag}")
    return out


def model_ids(spec: str) -> list[str]:
    """`--model_id A,B`: the models of one sweep, in the order given, each once."""
    ids = []
    for m in (part.strip() for part in spec.split(",")):
        if m and m not in ids:
            ids.append(m)
    if not ids:
        raise UsageError("--model_id is empty; pass a model, or several as --model_id A,B")
    return ids


def model_dirname(model_id: str) -> str:
    """A model's folder in a sweep over several: a local directory or file by its own name, a
    hub id with its organisation (Qwen/Qwen2.5-0.5B -> Qwen__Qwen2.5-0.5B)."""
    path = Path(model_id)
    if path.exists():
        return safe_name(path.stem if path.suffix == ".gguf" else path.resolve().name)
    return safe_name(model_id.replace("/", "__"))


def plan_models(opts: SweepOptions) -> list[tuple[SweepOptions, Plan]]:
    """One (options, plan) per model, all validated before any model loads. A single model keeps
    the layout of a one-model sweep; several get OUTPUT_DIR/<model>/ each."""
    if opts.ray is None and (opts.ray_gpus_per_worker is not None or opts.ray_cpus_per_worker != 1.0):
        raise UsageError("--ray_gpus_per_worker and --ray_cpus_per_worker need --ray")
    if opts.ray_cpus_per_worker <= 0 or (opts.ray_gpus_per_worker or 0) < 0:
        raise UsageError("--ray_cpus_per_worker must be above 0 and --ray_gpus_per_worker at "
                         "least 0")
    ids = model_ids(opts.model_id)
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


def write_json(path: Path, obj) -> None:
    """Write, flush to disk, then rename: a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def result_path(plan: Plan, spec, name: str) -> Path:
    """OUTPUT_DIR/<experiment>.json for the seed's text-only sweep; per-source folders otherwise."""
    if [s.spec for s in plan.sources] == ["text"]:
        return plan.output_dir / f"{name}.json"
    return plan.output_dir / spec.dirname / f"{name}.json"


def examples_sha(examples) -> str:
    """What the examples say, not how they are grouped: the group was added later, and results
    made on the same examples before then stay valid."""
    return _sha([{k: v for k, v in asdict(e).items() if k != "group"} for e in examples])[:16]


def provenance(opts: SweepOptions, lm, fmt, examples, vocab) -> dict:
    import numpy
    import torch
    import transformers

    device = lm.device
    if device == "cuda":
        device = f"cuda ({torch.cuda.get_device_name()})"
    n_params = sum(p.numel() for p in lm.model.parameters())
    # Embedding tables do lookups, not matmuls: throughput counts 2 x the rest per token.
    embeddings = {id(lm.model.get_input_embeddings().weight)}
    output = lm.model.get_output_embeddings()
    if output is not None:
        embeddings.add(id(output.weight))
    non_embedding = sum(p.numel() for p in lm.model.parameters() if id(p) not in embeddings)
    return {
        "model": {"id": opts.model_id, "class": type(lm.model).__name__, "parameters": n_params,
                  "non_embedding_parameters": non_embedding,
                  "dtype": lm.dtype, "config_sha256": _sha(lm.model.config.to_dict())[:16]},
        "dataset": {"spec": opts.dataset, "examples_sha256": examples_sha(examples)},
        "samples": len(examples), "requested_samples": opts.samples, "seed": opts.seed,
        "prompt_format": fmt.describe(), "max_new_tokens": opts.max_new_tokens,
        "vocabulary": vocab.stats(), "device": device, "torch_threads": torch.get_num_threads(),
        "versions": {"latentwire": __version__, "python": platform.python_version(),
                     "torch": torch.__version__, "transformers": transformers.__version__,
                     "numpy": numpy.__version__},
        "command": sys.argv,
    }


class Sweep:
    """One run: the loaded model, the examples, and the state shared across experiments."""

    def __init__(self, opts: SweepOptions, plan: Plan, log=print, lm=None):
        import torch

        self.opts, self.plan, self.log = opts, plan, log
        self.bar = None  # the progress bar of the experiment in flight, on a terminal
        self.examples = data.sample(data.load_all(opts.dataset), opts.samples, opts.seed)
        self.lm = lm or models.load(opts.model_id, opts.device, opts.trust_remote_code)
        model, tok = self.lm.model, self.lm.tokenizer
        self.fmt = prompts.make_format(tok, opts.prompt)

        from .generation import StopTokens
        from .vocab import VocabSpace

        embed = model.get_input_embeddings()
        self.vocab = VocabSpace.from_model(model, len(tok))
        encoded = [prompts.encode(tok, self.fmt, e.context, e.question) for e in self.examples]
        device = embed.weight.device
        with torch.no_grad():
            self.prefix = embed(torch.tensor(encoded[0][0], dtype=torch.long, device=device))
            self.anchor = embed(torch.tensor(encoded[0][2], dtype=torch.long, device=device))
            ids = torch.tensor([t for _, src, _ in encoded for t in src], device=device)
            self.text = embed(ids).float()
        lengths = torch.tensor([0] + [len(src) for _, src, _ in encoded])
        self.token_ids, self.offsets = ids, lengths.cumsum(0)
        self.stops = StopTokens(tok, model, embed.weight.shape[0])
        self.budget = opts.batch_tokens  # None: chosen for the device by the engine
        self.provenance = provenance(opts, self.lm, self.fmt, self.examples, self.vocab)
        self.identity = {k: self.provenance[k] for k in
                         ("model", "dataset", "samples", "seed", "prompt_format", "max_new_tokens")}
        self.reuse: dict[tuple[str, str], dict] = {}
        self.suffixes: dict[str, list | None] = {}  # per source: text after each example's rows

    def source_inputs(self, spec):
        from .embed_experiments import TransformInputs

        inp = sources.SourceInputs(
            self.text, self.token_ids, self.offsets, [e.id for e in self.examples],
            float(self.vocab.norms.mean()), self.opts.seed, self.examples, self.lm.tokenizer,
            self.fmt, self.lm.model.get_input_embeddings(), self.lm.model, self.vocab,
            self.provenance["model"]["config_sha256"])
        built = spec.build(inp)
        self.suffixes[spec.spec] = built.suffixes
        return TransformInputs(built.x, built.offsets, self.vocab), sources.effect(self.text, built.x)

    def fingerprint(self, spec, exp) -> str:
        from .embed_experiments import code_version

        return _sha({"run": self.identity, "source": spec.config(),
                     "source_code": sources.code_version(spec.source.name),
                     "experiment": exp.name, "transform": exp.transform, "config": exp.config,
                     "transform_code": code_version(exp.transform)})

    def run_experiment(self, spec, exp, inputs, source_effect) -> dict:
        import torch

        from . import embed_experiments
        from .generation import generate
        from .scoring import score_answers

        start = time.time()
        result = {**_head(exp, spec), "source_effect": source_effect}
        y, diagnostics = embed_experiments.apply(exp.transform, inputs, exp.config)
        dtype = self.lm.model.get_input_embeddings().weight.dtype
        fed = y.to(dtype)
        digest = hashlib.sha256(fed.contiguous().view(torch.uint8).cpu().numpy().tobytes()).hexdigest()
        earlier = self.reuse.get((spec.spec, digest))
        if earlier is not None:
            answers = [(p["prediction"], p["generated_tokens"]) for p in earlier["predictions"]]
            reused_from = earlier["experiment"]
        else:
            # The prefix is the same for every prompt: the engine computes it once.
            rows, suffixes = inputs.offsets, self.suffixes.get(spec.spec)
            prompts_ = [torch.cat([fed[rows[i]:rows[i + 1]]]
                                  + ([suffixes[i].to(dtype)] if suffixes else []) + [self.anchor])
                        for i in range(len(self.examples))]
            answers = generate(self.lm.model, self.lm.tokenizer, prompts_, self.stops,
                               self.opts.max_new_tokens, self.budget, self.progress,
                               prefix=self.prefix)
            reused_from = None
        predictions, means = score_answers(self.examples, answers)
        n = len(predictions)
        result.update({
            "status": "ok",
            **means,
            "num_samples": n,
            "time_sec": round(time.time() - start, 3),
            "diagnostics": diagnostics,
            "reused_generations_from": reused_from,
            "inputs_sha256": digest,
            "tokens": {"prompt": int(inputs.offsets[-1]) + n * (len(self.prefix) + len(self.anchor))
                       + sum(len(q) for q in self.suffixes.get(spec.spec) or []),
                       "generated": sum(p["generated_tokens"] for p in predictions)},
            "predictions": predictions,
        })
        return result

    def progress(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)


def _head(exp, spec) -> dict:
    """What every result says about itself, whether it succeeded or failed."""
    return {"experiment": exp.name, "category": exp.category, "description": exp.description,
            "config": exp.config, "source": spec.spec, "source_config": spec.config()}


def _failed(exp, spec, err: BaseException, fingerprint: str) -> dict:
    return {**_head(exp, spec), "status": "failed",
            "error": {"type": type(err).__name__, "message": str(err)}, "fingerprint": fingerprint}


def build_summary(results: list[dict], planned: list[tuple[str, str]], prov: dict,
                  interrupted: bool = False) -> dict:
    ok = [r for r in results if r.get("status") == "ok"]
    done = {(r["source"], r["experiment"]) for r in results}
    ranked = sorted(ok, key=lambda r: (-r["f1"], -r["em"], r["experiment"]))
    return {
        "total_experiments": len(planned),
        "successful": len(ok),
        "failed": len(results) - len(ok),
        "not_run": [{"source": s, "experiment": e} for s, e in planned if (s, e) not in done],
        "interrupted": interrupted,
        "results": results,
        "sorted_by_f1": [{"experiment": r["experiment"], "source": r["source"], "f1": r["f1"],
                          "em": r["em"]} for r in ranked],
        "provenance": prov,
    }


def run(opts: SweepOptions, log=print) -> tuple[dict, int]:
    """Run (or resume) the sweep, here or on Ray; return the summary and the exit code (0, 1 if
    any experiment failed, 130 if interrupted). Bad input raises UsageError before any model is
    loaded. Several models run one after another here, side by side on Ray."""
    runs = plan_models(opts)
    if opts.ray is not None:
        from . import cluster

        summaries, code = cluster.run(runs, opts.ray, log)
    else:
        summaries, code = [], 0
        for one, plan in runs:
            summary, one_code = run_model(one, plan, log)
            summaries.append(summary)
            code = max(code, one_code)
            if one_code == 130:
                break
    if len(runs) == 1:
        return summaries[0], code
    combined = combine_summaries(runs, summaries, code == 130)
    write_json(Path(opts.output_dir) / "summary.json", combined)
    return combined, code


def planned_runs(plan: Plan) -> list[tuple[str, str]]:
    return [(s.spec, e.name) for s in plan.sources for e in plan.experiments]


def combine_summaries(runs, summaries: list[dict], interrupted: bool) -> dict:
    """OUTPUT_DIR/summary.json of a sweep over several models: each model's own summary (also
    in its folder), in the order given, and the totals. A model never reached (Ctrl-C) is there
    with all its runs not run."""
    entries = []
    for i, (one, plan) in enumerate(runs):
        summary = (summaries[i] if i < len(summaries) else
                   build_summary([], planned_runs(plan), {}, interrupted=True))
        entries.append({"model_id": one.model_id, "dir": plan.output_dir.name,
                        "summary": summary})
    return {
        "total_experiments": sum(e["summary"]["total_experiments"] for e in entries),
        "successful": sum(e["summary"]["successful"] for e in entries),
        "failed": sum(e["summary"]["failed"] for e in entries),
        "interrupted": interrupted,
        "models": entries,
    }


def run_model(opts: SweepOptions, plan: Plan, log=print) -> tuple[dict, int]:
    """One model's sweep in this process."""
    planned = planned_runs(plan)
    results: list[dict] = []
    sweep = None
    summary_path = plan.output_dir / "summary.json"
    try:
        sweep = Sweep(opts, plan, log)
        log(f"model {opts.model_id} on {sweep.lm.device} ({sweep.lm.dtype}); "
            f"{len(sweep.examples)} examples from {opts.dataset}; prompt format "
            f"{sweep.fmt.name}; {len(planned)} runs -> {plan.output_dir}")
        step = 0
        for spec in plan.sources:
            inputs, effect = sweep.source_inputs(spec)
            if spec.spec != "text":
                shape = (f"cosine to text {effect['cosine_to_text']:.3f}"
                         if effect["cosine_to_text"] is not None else
                         f"{effect['compression_ratio']:.2f}x fewer positions than the text")
                log(f"source {spec.spec}: norm ratio {effect['norm_ratio']:.3g}, {shape}")
            for exp in plan.experiments:
                step += 1
                results.append(_run_one(sweep, plan, spec, exp, inputs, effect,
                                        f"[{step}/{len(planned)}]"))
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
    summary = build_summary(results, planned, sweep.provenance if sweep else {}, interrupted)
    write_json(summary_path, summary)
    if interrupted:
        log(f"interrupted: {len(results)} of {len(planned)} runs kept; partial summary in "
            f"{summary_path}; rerun the same command to resume")
        return summary, 130
    return summary, 1 if summary["failed"] else 0


def _run_one(sweep: Sweep, plan: Plan, spec, exp, inputs, effect, tag: str) -> dict:
    path = result_path(plan, spec, exp.name)
    fingerprint = sweep.fingerprint(spec, exp)
    existing = read_json(path) if path.exists() else None
    if (existing and not sweep.opts.force and existing.get("status") == "ok"
            and existing.get("fingerprint") == fingerprint):
        sweep.reuse.setdefault((spec.spec, existing["inputs_sha256"]), existing)
        sweep.log(f"{tag} {exp.name} ({spec.spec}): kept from an earlier run, F1 {existing['f1']:.3f}")
        return existing
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=len(sweep.examples), desc=f"{tag} {exp.name}", leave=False, unit="ex")
    sweep.bar = bar
    try:
        result = sweep.run_experiment(spec, exp, inputs, effect)
        result["fingerprint"] = fingerprint
    except KeyboardInterrupt:
        raise
    except Exception as err:  # isolation: one broken experiment must not cost the sweep
        result = _failed(exp, spec, err, fingerprint)
    finally:
        if bar is not None:
            bar.close()
        sweep.bar = None
    write_json(path, result)
    if result["status"] == "ok":
        if result["reused_generations_from"] is None:
            sweep.reuse.setdefault((spec.spec, result["inputs_sha256"]), result)
        note = ""
        if result["diagnostics"]["identical_to_input"] and exp.transform != "identity":
            note = "  [transform changed nothing]"
        if result["reused_generations_from"]:
            note += f"  [inputs identical to {result['reused_generations_from']}: generations reused]"
        sweep.log(f"{tag} {exp.name} ({spec.spec}): F1 {result['f1']:.3f}  EM {result['em']:.3f}  "
                  f"empty {result['empty_rate']:.0%}  {result['time_sec']:.1f}s{note}")
    else:
        sweep.log(f"{tag} {exp.name} ({spec.spec}): FAILED {result['error']['type']}: "
                  f"{result['error']['message']}")
    return result
