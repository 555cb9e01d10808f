"""The `latentwire` command: `sweep`, `list` and `analyze`.

The seed's scripts in scripts/ are thin wrappers over these subcommands, so every flag works the
same whichever way it is called. Bad input prints one line and exits 2, with no traceback.
"""

import argparse
import ctypes
import gc
import sys

from .errors import UsageError

EXAMPLES = """examples:
  latentwire sweep                                   # all 28 experiments, bundled model, offline data
  latentwire sweep --experiment rms_scale1.0 --samples 8
  latentwire sweep --experiment 'nearest_k*,baseline' --dataset squad-dev.json
  latentwire sweep --source text,mismatch --experiment baseline,rms_scale1.0
  latentwire list
  latentwire analyze --summary runs/embed_sweep_simple/summary.json
"""


def _add_sweep_args(p: argparse.ArgumentParser) -> None:
    from .models import BUNDLED
    from .sweep import DEFAULT_OUTPUT

    p.add_argument("--experiment", default="all", metavar="NAMES",
                   help="one name, a comma-separated list, or globs like 'nearest_k*'; "
                        "'list' prints every name (default: all in the grid)")
    p.add_argument("--samples", type=int, default=100, metavar="N",
                   help="examples per experiment, after a seeded shuffle (default: 100)")
    p.add_argument("--model_id", default=BUNDLED, metavar="ID",
                   help="Hugging Face id, local directory, or .gguf file "
                        "(default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--dataset", default="builtin", metavar="SPEC",
                   help="builtin (offline), squad, squad_v2, hotpot, or a path to a SQuAD .json "
                        "or a .jsonl of {context, question, answers} (default: builtin)")
    p.add_argument("--output_dir", default=DEFAULT_OUTPUT, metavar="DIR",
                   help=f"where results go (default: {DEFAULT_OUTPUT})")
    p.add_argument("--source", default="text", metavar="SPECS",
                   help="where the embeddings come from, comma-separated: text, scaled[:F], "
                        "noisy[:C], mismatch, shift[:S], rotated, adapter:PATH (default: text)")
    p.add_argument("--grid", default="default", choices=["default", "full"],
                   help="default: the seed's 28 experiments; full: the 40 of the Cartesian grid")
    p.add_argument("--force", action="store_true",
                   help="redo every experiment, even those with an up-to-date result")
    p.add_argument("--prompt", default="auto", choices=["auto", "chat", "plain"],
                   help="auto: the chat template with a short-answer instruction when the model "
                        "has one, else the seed's plain 'Context/Question/Answer:' format")
    p.add_argument("--seed", type=int, default=42, help="sampling and source seed (default: 42)")
    p.add_argument("--max_new_tokens", type=int, default=12, metavar="N",
                   help="greedy tokens per answer (default: 12, as the seed)")
    p.add_argument("--batch_tokens", type=int, default=None, metavar="N",
                   help="prompt tokens per batch (default: chosen for the device)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: CUDA when available, else CPU")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="allow a hub model's own code to run (off unless you ask)")
    p.add_argument("--no-analysis", dest="analysis", action="store_false",
                   help="skip the analysis and plots at the end")


def _add_analyze_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--summary", required=True, metavar="PATH", help="a sweep's summary.json")
    p.add_argument("--json", action="store_true", help="print the insights as JSON")
    p.add_argument("--no-plots", dest="plots", action="store_false",
                   help="skip the plots and the report")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="latentwire",
        description="Which transformation of input embeddings keeps a frozen LLM answering "
                    "questions? Runs a grid of transformations through inputs_embeds and "
                    "scores the answers with SQuAD EM/F1.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_sweep_args(sub.add_parser("sweep", help="run (or resume) a sweep",
                                   epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    lister = sub.add_parser("list", help="print every experiment, source and named dataset")
    lister.add_argument("--grid", default="default", choices=["default", "full"])
    _add_analyze_args(sub.add_parser("analyze", help="analyse a finished or partial sweep"))
    return top


def cmd_sweep(args) -> int:
    from . import analysis, experiments
    from .sweep import SweepOptions, run

    if args.experiment == "list":
        print(experiments.listing(args.grid))
        return 0
    opts = SweepOptions(**{k: v for k, v in vars(args).items()
                           if k in SweepOptions.__dataclass_fields__})
    summary, code = run(opts)
    print()
    print(analysis.ranked_table(summary))
    if args.analysis and summary.get("successful"):
        print()
        analysis.analyze(summary, opts.output_dir)
    return code


def cmd_list(args) -> int:
    from . import data, experiments, sources

    print(experiments.listing(args.grid))
    print("\nsources (--source, comma-separated; name or name:param):")
    print("\n".join(f"  {name:<10} {s.description}" for name, s in sources.SOURCES.items()))
    print("\ndatasets (--dataset; or a path to a SQuAD .json or a .jsonl file):")
    print("\n".join(f"  {name:<10} {desc}" for name, (desc, _) in data.NAMED.items()))
    return 0


def cmd_analyze(args) -> int:
    from . import analysis

    summary = analysis.load_summary(args.summary)
    analysis.analyze(summary, None, as_json=args.json, plots=args.plots,
                     summary_path=args.summary)
    return 0


COMMANDS = {"sweep": cmd_sweep, "list": cmd_list, "analyze": cmd_analyze}


def keep_freed_memory() -> None:
    """Stop glibc from handing large freed blocks back to the OS after every batch.

    Each prefill allocates activations of a few MB; by default glibc maps them fresh and unmaps
    them on free, so every batch page-faults its memory in again. On a 2-core CPU that cost 15%
    of a sweep (system time 15 s -> 4 s, wall time 58 s -> 50 s for 6 experiments x 32 SQuAD
    samples). It must run before torch starts its threads, hence here and not in the library.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)
    libc.mallopt(m_top_pad, 256 << 20)


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # outside the sweep loop (loading): nothing computed yet
        print("interrupted", file=sys.stderr)
        return 130


def console() -> None:
    """The `latentwire` command: main(), then a quick exit."""
    code = main()
    # Only the process's end is left: frozen objects are skipped by the interpreter's final
    # garbage collections, which otherwise walk every object torch and transformers made
    # (measured: exit 0.70 s -> 0.14 s). Not in main(), which tests call in-process.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    console()
