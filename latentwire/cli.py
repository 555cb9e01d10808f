"""The `latentwire` command: `sweep`, `list`, `analyze`, `train`, `study`, `screen` and `compare`.

Every flag is a field of an options dataclass, declared once with its help; each subcommand's
parser is built from those fields (options.add_options), so --help shows every default as the
code has it, and needs no torch. The seed's scripts in scripts/ and latentwire/train.py are thin
wrappers over these subcommands. Bad input prints one line and exits 2, with no traceback.
"""

import argparse
import gc
import os
import sys
from dataclasses import dataclass, fields
from typing import Callable

from . import data, experiments, raycluster
from .analysis.insights import AnalyzeOptions
from .errors import StorageError, UsageError
from .memory import keep_freed_memory
from .options import (HelpFormatter, Parser, add_options, from_args, is_option, option,
                      read_config)
from .sweep.options import SweepOptions
from .training.options import (CELL_OPTIONS, SCHEDULE, TRANSFORM, TRIAL_OPTIONS, CompareOptions,
                               ScreenOptions, StudyOptions, TrainOptions)
from .training.registry import ENCODERS

# Each command's own examples; the top-level --help shows one of each.
SWEEP_EXAMPLES = """examples:
  latentwire sweep                                   # all 28 experiments, bundled model, offline data
  latentwire sweep --experiment baseline,rms_scale1.0 --samples 20   # a first run, about a minute
  latentwire sweep --experiment 'nearest_k*,baseline' --dataset squad-dev.json
  latentwire sweep --source text,mismatch --experiment baseline,rms_scale1.0
  latentwire sweep --experiment list                 # every experiment's name
  latentwire sweep --ray                             # on a new local Ray, or at $RAY_ADDRESS
  latentwire sweep --ray 10.0.0.5:6379 --model_id Qwen/Qwen2.5-0.5B-Instruct,./llama-3.2-1b
"""

LIST_EXAMPLES = """examples:
  latentwire list
  latentwire list --grid full                        # the 40 experiments of the Cartesian grid
"""

ANALYZE_EXAMPLES = """examples:
  latentwire analyze --summary runs/embed_sweep_simple/summary.json
  latentwire analyze --summary runs/embed_sweep_simple/summary.json --json --no_plots
"""

TRAIN_EXAMPLES = """examples:
  latentwire train                                   # pool encoder, 4x, no transform, bundled model
  latentwire train --embed_transform rms_matching --target_rms_scale 1.0 --samples 10000 --epochs 10
  latentwire train --encoder attn --compression 4 --output_dir runs/train/attn4
  latentwire train --encoder constant --compression 4 --output_dir runs/train/constant4  # control
  latentwire train --encoder pool --compression 1 --output_dir runs/train/text1  # no compression
  latentwire train --output_dir runs/train/attn4 --encoder attn --resume   # after a kill
  latentwire train --encoder attn --output_dir runs/train/attn4 --report_to tensorboard,mlflow
  WANDB_MODE=offline latentwire train --report_to wandb   # W&B without network
  torchrun --nproc_per_node 2 latentwire/train.py --batch_size 16   # data parallel
  latentwire train --model_id bundled:SmolLM2-135M-Instruct,./qwen.gguf --encoder lm   # one latent, two models
  latentwire train --config recipe.yaml --samples 200   # a recipe file, one of its options changed
"""

STUDY_EXAMPLES = """examples:
  latentwire study --encoders pool,lm --compressions 1,4,8,16
  latentwire study --encoders lm --compressions 4 --settings aware --samples 500
  latentwire study --encoders pool,lm --ray                # cells as tasks on a new local Ray
  latentwire study --encoders lm --ray 10.0.0.5:6379 --ray_gpus_per_worker 1 --output_dir /shared/study
  latentwire study --config study.yaml --only aware/lm_x4   # grid and cell options from a file
"""

SCREEN_EXAMPLES = """examples:
  latentwire screen --experiment 'baseline,rms_*,nearest_k5*,anchor_eps0.1' --max_epochs 10
  latentwire screen --experiment 'rms_*,codebook_256*' --samples 300 --eval_samples 60 \\
      --max_epochs 3 --output_dir runs/screen/small
  latentwire screen --experiment 'rms_*,codebook_256*' --max_epochs 3 --verify   # no stopping
  latentwire screen --experiment 'anchor_eps*' --ray 10.0.0.5:6379 --ray_gpus_per_worker 0.5
  latentwire screen --config configs/squad/aware-4x.yaml --samples 600 --max_epochs 3 --verify \\
      --experiment 'baseline,rms_scale1.0,batch_dist,anchor_eps0.1'   # a recipe's trials
"""

COMPARE_EXAMPLES = """examples:
  latentwire compare --runs runs/train/attn4,runs/train/constant4   # the encoder against its control
  latentwire compare --runs runs/squad/pair/aware,runs/squad/smol/relay,runs/squad/qwen/relay
  latentwire compare --runs runs/train/attn4,runs/train/text1 --json   # a share of the reference
"""

OVERVIEW = """examples:
  latentwire sweep --experiment baseline,rms_scale1.0 --samples 20   # a first run, about a minute
  latentwire sweep                                   # all 28 experiments on the bundled model
  latentwire list
  latentwire analyze --summary runs/embed_sweep_simple/summary.json
  latentwire train --encoder pool --compression 4 --samples 2000 --epochs 1
  latentwire study --encoders pool,lm --compressions 1,4
  latentwire screen --experiment 'baseline,rms_*,anchor_eps0.1' --max_epochs 10
  latentwire compare --runs runs/train/attn4,runs/train/constant4

`latentwire COMMAND --help` shows a command's flags and its own examples.
"""


@dataclass
class AfterSweep:
    analysis: bool = option(True, help="print the analysis and write the plots at the end")


def options_of(cls, skip: tuple = (), only: tuple = ()) -> list:
    """The option fields of an options dataclass, less `skip`, or only `only`."""
    return [f for f in fields(cls) if is_option(f) and f.name not in skip
            and (not only or f.name in only)]


# The commands import what they run when they run: parsing, --help and the refusal of bad input
# never wait for torch and transformers.
def cmd_sweep(args) -> int:
    from .analysis import insights

    opts = from_args(SweepOptions, args)
    if opts.experiment == "list":
        print(experiments.listing(opts.grid))
        return 0
    summary, code = run_sweep(opts)
    print()
    print(insights.ranked_table(summary))
    if args.analysis and summary.get("successful"):
        print()
        insights.analyze(summary, opts.output_dir)
    return code


def run_sweep(opts: SweepOptions, log=print) -> tuple[dict, int]:
    """Run (or resume) the sweep, here or on Ray; the summary and the exit code (0, 1 if any
    experiment failed, 130 if interrupted). Bad input raises UsageError before any model loads.
    Several models run one after another here, side by side on Ray."""
    from .sweep import on_ray, runner
    from .sweep.options import plan_models

    runs = plan_models(opts)
    if opts.ray is None:
        summaries, code = runner.run(runs, log)
    else:
        summaries, code = on_ray.run(runs, opts.ray, log)
    return runner.finish(opts, runs, summaries, code)


def cmd_list(args) -> int:
    from .sweep.sources import SOURCES

    print(experiments.listing(args.grid))
    print("\nsources (--source, comma-separated; name or name:param):")
    print("\n".join(f"  {name:<10} {s.description}" for name, s in SOURCES.items()))
    print("\ndatasets (--dataset; or a path to a SQuAD .json or a .jsonl file):")
    print("\n".join(f"  {name:<10} {desc}" for name, (desc, _) in data.NAMED.items()))
    print("\nencoders (latentwire train --encoder):")
    width = max(map(len, ENCODERS))  # the names run from `lm` to `relay:longllmlingua`
    print("\n".join(f"  {name:<{width}}  {e.description}" for name, e in ENCODERS.items()))
    return 0


def cmd_analyze(args) -> int:
    from .analysis import insights

    opts = from_args(AnalyzeOptions, args)
    summary = insights.load_summary(opts.summary)
    insights.analyze(summary, None, as_json=opts.json, plots=opts.plots,
                     summary_path=str(insights.summary_file(opts.summary)))
    return 0


def cmd_train(args) -> int:
    from .training import loop

    return loop.run(from_args(TrainOptions, args))


def cmd_study(args) -> int:
    from .training import study

    return study.run(from_args(StudyOptions, args, base=from_args(TrainOptions, args)))


def cmd_screen(args) -> int:
    from .training import screen

    return screen.run(from_args(ScreenOptions, args, base=from_args(TrainOptions, args)))


def cmd_compare(args) -> int:
    from .training import compare

    return compare.run(from_args(CompareOptions, args))


@dataclass
class Recipe:
    config: str | None = option(
        None, metavar="FILE",
        help="read the options from this recipe file (YAML, or JSON by its suffix: option name "
             "-> value, e.g. `encoder: lm`); flags on the command line override it")


@dataclass
class Command:
    run: Callable
    options: Callable[[], list]  # the option fields its parser has
    help: str
    description: str
    epilog: str
    regroup: dict | None = None  # --help section -> the one its options show in


COMMANDS = {
    "sweep": Command(
        cmd_sweep, lambda: options_of(SweepOptions) + options_of(AfterSweep),
        "run (or resume) a sweep",
        "Run every chosen experiment (a transformation of the input embeddings) through the "
        "frozen model's inputs_embeds and score the answers with SQuAD EM/F1; a rerun into the "
        "same folder redoes only what changed.", SWEEP_EXAMPLES),
    "list": Command(
        cmd_list, lambda: options_of(SweepOptions, only=("grid",)),
        "print every experiment, source, named dataset and encoder",
        "Print the names the other commands take: every experiment of the grid (--experiment), "
        "source (--source), named dataset (--dataset) and encoder (--encoder, --encoders), "
        "each with what it does.", LIST_EXAMPLES),
    "analyze": Command(
        cmd_analyze, lambda: options_of(AnalyzeOptions),
        "analyse a finished or partial sweep",
        "Read a sweep's summary.json and print the ranked table with intervals, what won, what "
        "failed and the command to run next; write the plots and report.html beside it.",
        ANALYZE_EXAMPLES),
    "train": Command(
        cmd_train, lambda: options_of(Recipe) + options_of(TrainOptions),
        "train an encoder whose latents the frozen model reads",
        "Train an encoder that turns text into a few latent vectors read by the frozen model, "
        "with a sweep transform inside the graph; every epoch is evaluated beside the text "
        "itself and the question alone.", TRAIN_EXAMPLES),
    "study": Command(
        cmd_study, lambda: (options_of(Recipe) + options_of(StudyOptions)
                            + options_of(TrainOptions, skip=CELL_OPTIONS)),
        "encoder x compression x setting, with the controls: one table, one plot",
        "Train every encoder at every compression, query-aware and query-agnostic, beside the "
        "controls, at one budget; a rerun continues where it stopped.", STUDY_EXAMPLES),
    "screen": Command(
        cmd_screen, lambda: (options_of(Recipe) + options_of(ScreenOptions)
                             + options_of(TrainOptions, skip=TRIAL_OPTIONS)),
        "successive halving (ASHA on Ray Tune): which transform is worth training for "
        "--max_epochs",
        "Train one run per candidate transform, evaluate every epoch, and let ASHA stop the "
        "weak ones after the first; the strong ones run to --max_epochs. A rerun of the same "
        "command continues where it stopped.", SCREEN_EXAMPLES,
        # Each candidate sets its own transform; what is left of that section applies to them all.
        regroup={TRANSFORM: SCHEDULE}),
    "compare": Command(
        cmd_compare, lambda: options_of(CompareOptions),
        "set finished training runs against one another, paired on the same questions",
        "Read training runs' last evaluations and set the first run against each of the "
        "others, per model both answered with, on the questions both answered: each F1 with its "
        "interval, the paired difference with its interval and the ratio (a share, where the "
        "other is a reference).", COMPARE_EXAMPLES),
}


def parser(defaults: dict | None = None) -> argparse.ArgumentParser:
    """The whole command line; `defaults`: a command's options set by its --config."""
    top = Parser(
        prog="latentwire",
        description="Which transformation of input embeddings keeps a frozen LLM answering "
                    "questions? Runs a grid of transformations through inputs_embeds and "
                    "scores the answers with SQuAD EM/F1, then trains encoders whose latents the "
                    "frozen model reads.",
        epilog=OVERVIEW, formatter_class=HelpFormatter)
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND",
                             parser_class=Parser)
    for name, c in COMMANDS.items():
        # Every flag is listed below the usage line, with its help: the line itself stays short.
        p = sub.add_parser(name, help=c.help, description=c.description, epilog=c.epilog,
                           usage=f"latentwire {name} [options]", formatter_class=HelpFormatter)
        add_options(p, c.options(), last_group=raycluster.GROUP, regroup=c.regroup)
        if defaults and name in defaults:
            p.set_defaults(**defaults[name])
    return top


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, over its --config recipe where it names one."""
    args = parser().parse_args(argv)
    if getattr(args, "config", None) is not None:  # an empty --config is refused, not ignored
        recipe = read_config(args.config, COMMANDS[args.command].options(), args.command)
        args = parser({args.command: recipe}).parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    try:
        args = parse(argv)
        return COMMANDS[args.command].run(args)
    except (UsageError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # outside the sweep loop (loading): nothing computed yet
        print("interrupted", file=sys.stderr)
        return 130


def console() -> None:
    """The `latentwire` command: main(), then a quick exit."""
    try:
        code = main()
    except BrokenPipeError:  # the reader went away (`latentwire list | head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
        code = 1
    # Only the process's end is left: frozen objects are skipped by the interpreter's final
    # garbage collections, which otherwise walk every object torch and transformers made
    # (measured: exit 0.70 s -> 0.14 s). Not in main(), which tests call in-process.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    console()
