"""How a sweep runs and resumes in this process: sources x experiments over one model and one set
of examples, or over several models one after another, each into its own folder (on Ray, the
units of on_ray.py run the same `run_one`).

Every experiment's result is its own JSON file, written atomically; `summary.json` is rebuilt
from those files. A rerun into the same directory skips every result whose fingerprint (model,
data, samples, seed, prompt, source, config and the transform's code) is unchanged, so a killed
sweep loses at most the experiment in flight, and a changed transform is redone by itself.
"""

import hashlib
import sys
import time
from pathlib import Path

import torch

from .. import data, embed_experiments, models, prompts, provenance
from ..files import read_json, write_json
from ..generation import StopTokens, generate
from ..scoring import score_answers
from ..vocab import VocabSpace
from . import sources
from .options import Plan, SweepOptions, planned_runs, result_path


class Sweep:
    """One run: the loaded model, the examples, and the state shared across experiments."""

    def __init__(self, opts: SweepOptions, plan: Plan, log=print, lm=None):
        self.opts, self.plan, self.log = opts, plan, log
        self.bar = None  # the progress bar of the experiment in flight, on a terminal
        self.examples = data.sample(data.load_all(opts.dataset), opts.samples, opts.seed)
        self.lm = lm or models.load(opts.model_id, opts.device, opts.trust_remote_code)
        model, tok = self.lm.model, self.lm.tokenizer
        self.fmt = prompts.make_format(tok, opts.prompt)
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
        self.provenance = provenance.describe(
            opts.model_id, self.lm, self.fmt, self.vocab,
            {"spec": opts.dataset, "examples_sha256": provenance.examples_sha(self.examples)},
            {"samples": len(self.examples), "requested_samples": opts.samples},
            opts.seed, opts.max_new_tokens)
        self.identity = {k: self.provenance[k] for k in
                         ("model", "dataset", "samples", "seed", "prompt_format", "max_new_tokens")}
        self.reuse: dict[tuple[str, str], dict] = {}
        self.suffixes: dict[str, list | None] = {}  # per source: text after each example's rows

    def source_inputs(self, spec):
        inp = sources.SourceInputs(
            self.text, self.token_ids, self.offsets, [e.id for e in self.examples],
            float(self.vocab.norms.mean()), self.opts.seed, self.examples, self.lm.tokenizer,
            self.fmt, self.lm.model.get_input_embeddings(), self.lm.model, self.vocab,
            self.provenance["model"]["config_sha256"])
        built = spec.build(inp)
        self.suffixes[spec.spec] = built.suffixes
        return (embed_experiments.TransformInputs(built.x, built.offsets, self.vocab),
                sources.effect(self.text, built.x))

    def fingerprint(self, spec, exp) -> str:
        return provenance.sha({"run": self.identity, "source": spec.config(),
                               "source_code": sources.code_version(spec.source.name),
                               "experiment": exp.name, "transform": exp.transform,
                               "config": exp.config,
                               "transform_code": embed_experiments.code_version(exp.transform)})

    def run_experiment(self, spec, exp, inputs, source_effect) -> dict:
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


def run(runs, log=print) -> tuple[list[dict], int]:
    """Every model's sweep here, one after another: one summary per model (written to its
    folder) and the exit code (0, 1 if any experiment failed, 130 if interrupted)."""
    summaries, code = [], 0
    for one, plan in runs:
        summary, one_code = run_model(one, plan, log)
        summaries.append(summary)
        code = max(code, one_code)
        if one_code == 130:
            break
    return summaries, code


def finish(opts: SweepOptions, runs, summaries: list[dict], code: int) -> tuple[dict, int]:
    """The sweep's summary: the one model's, or for several models the combined one, written to
    OUTPUT_DIR/summary.json beside each model's folder."""
    if len(runs) == 1:
        return summaries[0], code
    combined = combine_summaries(runs, summaries, code == 130)
    write_json(Path(opts.output_dir) / "summary.json", combined)
    return combined, code


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
                results.append(run_one(sweep, plan, spec, exp, inputs, effect,
                                       f"[{step}/{len(planned)}]"))
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
    summary = build_summary(results, planned, sweep.provenance if sweep else {}, interrupted)
    write_json(summary_path, summary)
    if interrupted:
        # On stderr, where a Ctrl-C's user looks for it, as every other stop of the tool.
        print(f"interrupted: {len(results)} of {len(planned)} runs kept; partial summary in "
              f"{summary_path}; rerun the same command to resume", file=sys.stderr)
        return summary, 130
    return summary, 1 if summary["failed"] else 0


def run_one(sweep: Sweep, plan: Plan, spec, exp, inputs, effect, tag: str) -> dict:
    """One experiment on one source: kept from an earlier run when its fingerprint is unchanged,
    else run, isolated (a failure becomes a failed result), and written to its own file."""
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
