"""What a training run, a study and a screen are asked to do: their options, declared once with
their help (the parsers of `train`, `study` and `screen` are built from them), every check that
needs no model, and the `latentwire train` command line for a set of options or for one of the
sweep's experiments. Imports no torch: `--help` and every refusal of bad input come before it."""

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .. import data, experiments, models, prompts, raycluster
from ..errors import UsageError
from ..files import read_json, writable_dir
from ..options import command_line, option
from . import checkpoint, tracking
from .registry import ENCODERS, fitted_presses, token_keepers

SCHEDULES = ("constant", "cosine")
PRECISIONS = ("no", "bf16")
RESUME = ("no", "yes", "auto")
# torchrun sets it in every process it starts: 0 at first, then the number of restarts.
RESTARTS = "TORCHELASTIC_RESTART_COUNT"

TRANSFORM = "transform inside the training graph (the sweep's, by name)"
ENCODER = "encoder"
DATA = "data and model"
OPTIMISATION = "optimisation"
RUN = "run"


@dataclass
class TrainOptions:
    embed_transform: str = option(
        "none", group=TRANSFORM, choices=lambda: list(experiments.embed_transforms()),
        help="applied to the latents before the model reads them")
    target_rms_scale: float = option(
        1.0, group=TRANSFORM, metavar="S",
        help="rms_matching: RMS as a multiple of the vocabulary's")
    nearest_k: int = option(5, group=TRANSFORM, metavar="K",
                            help="nearest_k: vocabulary neighbours mixed in")
    nearest_alpha: float = option(0.5, group=TRANSFORM, metavar="A",
                                  help="nearest_k: weight kept on the latent itself")
    anchor_eps: float = option(0.1, group=TRANSFORM, metavar="E",
                               help="anchor_offset: residual bound, x the anchor's norm")
    codebook_size: int = option(512, group=TRANSFORM, metavar="N",
                                help="soft_codebook: k-means codes")
    codebook_tau: float = option(1.0, group=TRANSFORM, metavar="T",
                                 help="soft_codebook: temperature")
    codebook_trainable: bool = option(
        True, group=TRANSFORM, help="soft_codebook: learn the codes, from the sweep's k-means "
        "codes; --no_codebook_trainable keeps them fixed")
    encoder: str = option(
        "pool", group=ENCODER, choices=list(ENCODERS),
        help="; ".join(f"{k}: {v.description}" for k, v in ENCODERS.items()))
    compression: float | None = option(
        4.0, group=ENCODER, metavar="R",
        help="text positions per latent: M = ceil(N / R) per example")
    latent_len: int | None = option(
        None, group=ENCODER, metavar="M",
        help="a fixed number of latents per example; replaces --compression")
    keep_question: bool = option(
        False, group=ENCODER,
        help="compress only the context; the question follows the latents as text")
    press_samples: int = option(
        0, group=ENCODER, metavar="N",
        help="kvpress:learned, offset:kvpress:learned: fit the press on whole training "
             "paragraphs, in the order the training questions first name them, until they hold "
             "N questions (a paragraph's target averages all its questions, so none is cut "
             "short; 330 paragraphs fitted as well as 1,406 on Qwen2.5-Coder-0.5B); 0: every "
             "training question. The minutes a smaller fit saves go to training")
    encoder_layer: int | None = option(
        None, group=ENCODER, metavar="L",
        help="lm: the layer (1 to the model's count) whose states the slots hand over; "
             "unset: the last")
    encoder_lora: int = option(
        0, group=ENCODER, metavar="R",
        help="lm: rank-R LoRA adapters on the reader's own copy of the model, trained with it; "
             "the model that answers stays frozen (0: none; needs peft: pip install "
             "'latentwire[lora]')")
    latent_dim: int | None = option(
        None, group=ENCODER, metavar="D",
        help="the width of the latents every model is given, each through its own adapter; "
             "unset: the reader's width (a run over one model read by itself has no adapter)")
    freeze_encoder: str | None = option(
        None, group=ENCODER, metavar="PATH",
        help="a checkpoint folder whose encoder is loaded and kept fixed: only the adapters of "
             "--model_id train (a latent made for one model, read by another); its reader must "
             "be this run's (--encoder_model), its encoder flags the same")
    model_id: str = option(
        models.BUNDLED, group=DATA, metavar="ID",
        help="the frozen model, loaded as the sweep loads it; several as A,B: one encoder, an "
             "adapter per model into its own width, and every model answers from the same "
             "latents (the loss: the weighted sum of their answer losses)")
    model_weights: str = option(
        "", group=DATA, metavar="W",
        help="with several --model_id: each model's weight on its answer loss, comma-separated "
             "in the same order (empty: 1 each)")
    encoder_model: str | None = option(
        None, group=DATA, metavar="ID",
        help="the model whose copy reads the text (its tokens, embeddings and, for lm, its "
             "layers), if not the first --model_id; it need not answer. For relay:<compressor>, "
             "the model in whose tokens the text is compressed")
    dataset: str = option("builtin", group=DATA, metavar="SPEC",
                          help="as the sweep's --dataset; split by entity or article")
    samples: int = option(2000, group=DATA, metavar="N",
                         help="training examples; 0 trains nothing and evaluates the compressor "
                              "as it stands (a field compressor: as the frozen model reads it)")
    eval_samples: int = option(100, group=DATA, metavar="N",
                               help="evaluation examples: whole entities or articles of "
                                    "--dataset, or questions across all of --eval_dataset")
    answer_kept: bool = option(
        False, group=DATA,
        help="train only on the examples whose answer the token compressor kept (one gold "
             "answer, word for word, in the kept text): --samples counts the examples left, "
             "drawn in the seeded order until there are that many; the evaluation is unchanged. "
             "In a study, the cells whose encoder keeps tokens")
    eval_dataset: str | None = option(
        None, group=DATA, metavar="SPEC",
        help="evaluate on this dataset (same forms as --dataset) instead of a held-out part of "
             "--dataset; refused when the two share an article or a context")
    prompt: str = option("auto", group=DATA, choices=list(prompts.FORMATS),
                         help="prompt format, as the sweep's")
    max_new_tokens: int = option(12, group=DATA, metavar="N",
                                 help="greedy tokens per evaluated answer")
    epochs: int = option(1, group=OPTIMISATION, metavar="N", help="passes over the training split")
    batch_size: int = option(16, group=OPTIMISATION, metavar="N",
                             help="global batch, over all processes")
    grad_accum_steps: int = option(1, group=OPTIMISATION, metavar="N",
                                   help="micro-batches per step on each process")
    by_paragraph: bool = option(
        False, group=OPTIMISATION,
        help="each epoch's seeded order with every paragraph's questions together, and a "
             "step's micro-batches one paragraph each: a press that reads no question then "
             "prunes each paragraph's cache once for all its questions in the step, not once "
             "per question (with --grad_accum_steps 1)")
    lr: float = option(1e-3, group=OPTIMISATION, help="AdamW learning rate")
    schedule: str = option("constant", group=OPTIMISATION, choices=list(SCHEDULES),
                           help="learning rate after warm-up: constant, or cosine to 0 over "
                                "the run's steps (with --max_minutes, over its minutes)")
    warmup_steps: int = option(0, group=OPTIMISATION, metavar="N",
                               help="linear warm-up from 0 to --lr over N steps")
    max_minutes: float = option(
        0.0, group=OPTIMISATION, metavar="M",
        help="a training budget: after M minutes of training steps (evaluations, loading and a "
             "fitted press's fit not counted, a resumed run's earlier steps counted) stop where "
             "the run stands and evaluate there; 0 for none. --schedule cosine then falls "
             "to 0 over these minutes")
    max_grad_norm: float = option(1.0, group=OPTIMISATION, metavar="X",
                                  help="gradient clipping, 0 for none")
    first_token_ce_weight: float = option(1.0, group=OPTIMISATION, metavar="W",
                                          help="extra weight on the first answer token's loss")
    kd_weight: float = option(0.0, group=OPTIMISATION, metavar="W",
                              help="distillation from the model reading the text (0: off)")
    kd_tau: float = option(1.0, group=OPTIMISATION, metavar="T", help="distillation temperature")
    recon_weight: float = option(
        0.0, group=OPTIMISATION, metavar="W",
        help="a label-free loss beside the answer's: the model reads the whole context again "
             "after the latents and predicts each of its tokens, with this weight (0: off)")
    seed: int = option(42, group=OPTIMISATION, help="data order, split and init")
    output_dir: str | None = option(None, group=RUN, metavar="DIR",
                                    help="where the run goes; unset: runs/train/<embed_transform>")
    save_every: int = option(50, group=RUN, metavar="STEPS",
                             help="write checkpoints/last every N steps, 0 for epoch ends only")
    resume: str = option(
        "no", group=RUN, choices=RESUME, nargs="?", const="yes", metavar="WHEN",
        help="yes (also a bare --resume): continue the run in --output_dir from "
             "checkpoints/last, with the same flags; auto: continue it when there is one, "
             "start when the folder holds none, refuse a folder holding another run (what a "
             "torchrun restart does)")
    references_from: str | None = option(
        None, group=RUN, metavar="DIR",
        help="take the untrained model's answers to the evaluation examples (the text and the "
             "question alone, the references every run computes first) from an earlier run's "
             "folder, where they are exactly this run's: the same model, prompt, answer length "
             "and evaluation examples; else compute them. Saves their minutes on a big model")
    press_from: str | None = option(
        None, group=RUN, metavar="DIR",
        help="take each model's fitted press (kvpress:learned, offset:kvpress:learned) from an "
             "earlier run's folder, where it was fitted exactly as this run would fit it: the "
             "same model, prompt, precision, device, versions, training examples and "
             "--press_samples; else fit it. Saves the fit's minutes (on Qwen2.5-Coder-0.5B, "
             "20-30 on two cores)")
    device: str | None = option(None, group=RUN, choices=["cpu", "cuda"],
                                help="unset: CUDA when available, else CPU")
    mixed_precision: str | None = option(
        None, group=RUN, choices=list(PRECISIONS),
        help="the precision of the training graph: no (fp32), or bf16 autocast (accelerate); "
             "evaluation reads in the model's own dtype. Unset: bf16 where the device computes it "
             "natively (a GPU with bf16, a CPU with AVX512-BF16 or AMX), else no; the value used "
             "is recorded in config.json")
    gradient_checkpointing: bool = option(
        False, group=RUN, help="recompute the frozen model's activations in backward (always "
                               "on on CUDA)")
    trust_remote_code: bool = option(False, group=RUN, help="allow a hub model's own code to run")
    report_to: str = option(
        "none", group=RUN, metavar="TRACKERS",
        help="also send every step and evaluation, the config, the plots and summary.json to "
             "these trackers, comma-separated: tensorboard, mlflow, wandb (each needs its extra, "
             "e.g. pip install 'latentwire[wandb]'; WANDB_MODE=offline without network); none: "
             "only the run's own files")

    def __post_init__(self):
        if self.latent_len is not None:
            self.compression = None  # a fixed count replaces the ratio

    def model_ids(self) -> list[str]:
        """The models that answer, in the order given, each once."""
        return list(dict.fromkeys(m.strip() for m in self.model_id.split(",") if m.strip()))

    def reader_id(self) -> str:
        return self.encoder_model or self.model_ids()[0]

    def needed_models(self) -> list[str]:
        """Every model the run loads: those that answer, and the reader."""
        return list(dict.fromkeys([*self.model_ids(), self.reader_id()]))

    def weights(self) -> list[float]:
        """Each answering model's weight on its loss (validate checks the flag)."""
        given = [float(w) for w in self.model_weights.split(",") if w.strip()]
        return given or [1.0] * len(self.model_ids())

    def shared(self) -> bool:
        """Whether the latents go through an adapter per model: several models, another
        reader, a latent width or a frozen encoder. One model read by itself has none, and
        trains, saves and replays exactly as it always has. A text relay has none: its one
        model reads its own tokens of the relayed text."""
        entry = ENCODERS.get(self.encoder)
        if entry is not None and entry.relay:
            return False
        return (len(self.model_ids()) > 1 or self.reader_id() != self.model_ids()[0]
                or self.latent_dim is not None or self.freeze_encoder is not None)

    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/train/{self.embed_transform}")

    def identity(self) -> dict:
        """The flags a resumed run must share with the run it continues. Where its metrics are
        also sent is not one of them: a tracker can be added when resuming; nor where its
        references or its press came from, which are the same either way."""
        return {k: v for k, v in asdict(self).items()
                if k not in ("resume", "device", "report_to", "references_from", "press_from")}


def with_precision(opts: TrainOptions) -> TrainOptions:
    """opts with --mixed_precision as the run uses it: unset becomes bf16 where the device
    multiplies bf16 natively, else no. Resolved when a run starts or is compared with another,
    not when options are made: the analysis builds them without torch."""
    if opts.mixed_precision is not None:
        return opts
    return replace(opts, mixed_precision="bf16" if native_bf16(opts.device) else "no")


def native_bf16(device: str | None) -> bool:
    """Whether the device the run will use multiplies bf16 natively. Elsewhere bf16 is emulated:
    on an AVX2 CPU a bf16 matmul of the bundled model's shapes ran about 1 GFLOP/s against
    fp32's 56-136 (docs/results/performance.md)."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


# The options that put a transform, with its config, into the graph: what a screen's candidate
# sets, and what the command for an experiment always spells out.
TRANSFORM_OPTIONS = ("embed_transform", *experiments.train_fields())


SETTINGS = {"aware": False, "agnostic": True}  # setting -> keep_question


GRID = "the grid: every encoder x compression x setting"


@dataclass
class StudyOptions(raycluster.WorkerShape):
    encoders: str = option(
        "pool,attn,lm", group=GRID, metavar="NAMES",
        help=f"comma-separated, of: {', '.join(ENCODERS)}; constant at every compression and "
             "pool at 1x always run as controls")
    compressions: str = option("1,4,8,16", group=GRID, metavar="RATIOS",
                               help="comma-separated text positions per latent")
    settings: str = option("aware,agnostic", group=GRID, metavar="NAMES",
                           help=f"comma-separated, of: {', '.join(SETTINGS)}")
    dedicated: bool = option(
        False, group=GRID,
        help="with several --model_id: also train every cell for each model alone, with the "
             "same flags, reader and budget, and set the shared runs against them per model (the "
             "cost of sharing, in study.md's second table); each model's pool 1x reads its own text")
    only: str = option(
        "", group=GRID, metavar="NAMES",
        help="comma-separated cells by the names study.md gives them (e.g. aware/lm_x4): train "
             "only these now and leave the others for a later run; the table holds every "
             "finished cell. Empty: every cell")
    output_dir: str = option("runs/study", group="run", metavar="DIR",
                             help="where the cells' runs go; a rerun continues the study")
    ray: str | None = option(
        None, group=raycluster.GROUP, metavar="ADDRESS", nargs="?", const="",
        help="run the cells as Ray tasks, side by side: on the cluster at ADDRESS, else at "
             "$RAY_ADDRESS, else on a new local Ray (a bare --ray); the folder must be on "
             "storage every node shares")
    base: TrainOptions = field(default_factory=TrainOptions)


# The training options each cell sets itself: the grid's, and where its run goes; and one no
# grid shares (a press fitted for one cell is another cell's only where the cell names it).
CELL_OPTIONS = ("encoder", "compression", "latent_len", "keep_question", "resume", "output_dir",
                "press_from")


SCHEDULE = "the candidates and the schedule"


@dataclass
class ScreenOptions(raycluster.WorkerShape):
    experiment: str = option(
        "", group=SCHEDULE, metavar="NAMES", required=True,
        help="the sweep's experiment names or globs, comma-separated, e.g. "
             "'rms_*,nearest_k5*,anchor_eps0.1'; each is one trial")
    max_epochs: int = option(10, group=SCHEDULE, metavar="N",
                             help="epochs of the trials ASHA never stops")
    reduction_factor: float = option(
        3.0, group=SCHEDULE, metavar="R",
        help="ASHA keeps the top 1/R at each rung (epochs 1, R, R^2, ...) and stops the rest")
    verify: bool = option(False, group=SCHEDULE,
                          help="stop nothing: run every trial to --max_epochs and report how "
                               "well the epoch-1 ranking predicted the final one")
    output_dir: str = option("runs/screen", group="run", metavar="DIR",
                             help="where the trials go; a rerun continues the screen")
    ray: str = option("", group=raycluster.GROUP, metavar="ADDRESS", nargs="?", const="",
                      help="the Ray cluster the trials run on (always): at ADDRESS, else at "
                           "$RAY_ADDRESS, else on a new local Ray")
    base: TrainOptions = field(default_factory=TrainOptions)


@dataclass
class CompareOptions:
    runs: str = option(
        metavar="DIRS",
        help="comma-separated training runs' folders (`latentwire train --output_dir`, or a "
             "study's cells): the first is set against each of the others, per model that both "
             "answered with, on the questions both answered")
    json: bool = option(False, help="print the comparisons as JSON")


# The training options each trial sets itself: its candidate's transform, its epochs and folder.
TRIAL_OPTIONS = (*TRANSFORM_OPTIONS, "epochs", "resume", "output_dir")


def train_command(opts: TrainOptions, spelled: tuple = ()) -> str:
    """`latentwire train` (the same as the seed's `python latentwire/train.py`, but runnable from
    any folder) with these options: every flag that differs from its default, and the
    `spelled` ones always."""
    return command_line(["latentwire", "train"], opts, spelled=spelled, skip=("resume",))


def experiment_command(exp: experiments.Experiment, **options) -> str:
    """The command that trains with this experiment's transform inside the graph."""
    settings = experiments.train_settings(exp)
    return train_command(replace(TrainOptions(), **settings, **options),
                         spelled=tuple(settings))


def _changed(opts: TrainOptions, config: dict) -> list[tuple[str, object]]:
    """(flag, its value there) for each flag that differs from the run a config.json records.
    A flag added after that run was made counts as its default there. The folder is not
    compared: the config was read from it, and the same folder is spelled differently by a
    study's Ray task (absolute) and by a rerun here (as typed), or moved."""
    saved, default = config.get("options", {}), asdict(with_precision(TrainOptions()))
    return sorted((k, saved.get(k, default[k])) for k, v in with_precision(opts).identity().items()
                  if k != "output_dir" and saved.get(k, default[k]) != v)


def _listed(opts: TrainOptions, changed) -> str:
    opts = with_precision(opts)
    return ", ".join(f"--{k} {there} there, {getattr(opts, k)} now" for k, there in changed)


def made_otherwise(opts: TrainOptions) -> str | None:
    """The flags in which the run in opts' folder differs from opts, listed as a refusal names
    them; None where they agree or the folder records no run."""
    saved = read_json(opts.run_dir() / "config.json")
    changed = _changed(opts, saved) if saved is not None else []
    return _listed(opts, changed) if changed else None


def shared_store_restarts() -> bool:
    """Whether torchrun may restart this process into the store it shares with the processes
    (its default): there a restarted round finds the killed round's addresses, and joining
    fails (pytorch/pytorch#135712). TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives each round its
    own store."""
    return (int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True")


def resume_mode(opts: TrainOptions) -> TrainOptions:
    """--resume auto as yes or no for this folder, and a torchrun restart as auto: torchrun
    starts every process again with the first command, which must then continue the run.
    Also resolves --mixed_precision (with_precision)."""
    opts = with_precision(opts)
    mode = opts.resume
    if mode == "no" and int(os.environ.get(RESTARTS, "0") or 0) > 0:
        mode = "auto"
    if mode != "auto":
        return opts
    out = opts.run_dir()
    if checkpoint.existing(out / "checkpoints" / "last") is not None:
        return replace(opts, resume="yes")  # validate refuses it if it is another run's
    # No checkpoint yet: start, unless the folder holds another run (a start of this one,
    # killed before its first checkpoint, is simply started again).
    if other := made_otherwise(opts):
        raise UsageError(f"--resume auto: {out} holds another run ({other}); "
                         "pick another --output_dir")
    return replace(opts, resume="no")


def validate(opts: TrainOptions) -> Path:
    """Every check that needs no model: a mistake costs a second, not a model load."""
    def need(ok: bool, message: str):
        if not ok:
            raise UsageError(message)

    transforms = experiments.embed_transforms()
    need(opts.embed_transform in transforms, f"unknown --embed_transform "
         f"{opts.embed_transform!r}; use one of: {', '.join(transforms)}")
    need(opts.encoder in ENCODERS, f"unknown --encoder {opts.encoder!r}; use one of: "
         f"{', '.join(ENCODERS)}")
    need(opts.latent_len is None or opts.latent_len >= 1,
         f"--latent_len must be at least 1 (got {opts.latent_len})")
    need(opts.latent_len is not None or (opts.compression or 0) >= 1,
         f"--compression must be at least 1 (got {opts.compression}): it is text positions "
         "per latent")
    models.checked_ids(opts.model_id)
    if opts.encoder_model is not None:
        models.check(opts.encoder_model, "--encoder_model")
    if opts.encoder_layer is not None:
        reader = opts.encoder_model or opts.model_ids()[0]
        layers = models.layer_count(reader)
        need(layers is None or 1 <= opts.encoder_layer <= layers, f"--encoder_layer must be "
             f"between 1 and {layers}, the layers of {reader} (got {opts.encoder_layer})")
    names = [models.model_dirname(m) for m in opts.model_ids()]
    need(len(set(names)) == len(names), f"--model_id names models alike ({', '.join(names)}); "
         "pass them by paths with different final names")
    try:
        weights = opts.weights()
    except ValueError:
        weights = []
    need(len(weights) == len(opts.model_ids()) and all(w >= 0 for w in weights) and any(weights),
         f"--model_weights takes one weight >= 0 per --model_id, comma-separated, not all 0 "
         f"(got {opts.model_weights!r} for {len(opts.model_ids())} model(s))")
    need(opts.latent_dim is None or opts.latent_dim >= 1,
         f"--latent_dim must be at least 1 (got {opts.latent_dim})")
    if opts.freeze_encoder is not None:
        checkpoint.read_config(opts.freeze_encoder)
    entry = ENCODERS.get(opts.encoder)
    if entry is not None and entry.relay:
        need(len(opts.model_ids()) == 1, f"--encoder {opts.encoder} gives each model its own "
             "text: train one --model_id per run, the text's model as --encoder_model (a study "
             "over several models runs it once per model)")
        need(not opts.freeze_encoder and opts.latent_dim is None, f"--encoder {opts.encoder} "
             "is text: it takes no --freeze_encoder or --latent_dim")
    elif entry is not None and entry.field is not None and not entry.reads_states:
        need(len(opts.model_ids()) == 1 and opts.reader_id() == opts.model_ids()[0],
             f"--encoder {opts.encoder} compresses for the one model that reads it; pass one "
             "--model_id and no --encoder_model")
    need(not (entry is not None and entry.fitted and opts.samples == 0),
         f"--encoder {opts.encoder} learns from the training questions and --samples 0 gives "
         "it none: pass --samples N, the questions it fits on")
    need(not (opts.kd_weight and entry is not None and not entry.trains),
         f"--kd_weight: --encoder {opts.encoder} trains nothing by gradient, so nothing can "
         "learn from the teacher; drop --kd_weight")
    if entry is not None and entry.field is not None:
        need(not (opts.recon_weight and not entry.keeps_tokens),
             f"--recon_weight: --encoder {opts.encoder} prunes a cache, which has no context "
             "to read again; use it with an encoder that gives latents")
        need(not (entry.needs_question and opts.keep_question),
             f"--encoder {opts.encoder} reads the question (query-aware): drop --keep_question")
    need(not opts.answer_kept or (entry is not None and entry.keeps_tokens),
         f"--answer_kept needs an encoder that keeps the context's tokens, one of: "
         f"{', '.join(token_keepers())}; --encoder {opts.encoder} keeps no text to look for the "
         "answer in")
    need(not (opts.answer_kept and opts.samples == 0), "--answer_kept chooses the examples to "
         "train on and --samples 0 trains on none: drop one of them")
    need(opts.encoder_lora >= 0, f"--encoder_lora must be >= 0, 0 for none (got {opts.encoder_lora})")
    need(not opts.encoder_lora or opts.encoder == "lm", "--encoder_lora adapts the reader of "
         f"--encoder lm; --encoder {opts.encoder} has none")
    need(opts.target_rms_scale > 0, f"--target_rms_scale must be > 0 (got {opts.target_rms_scale})")
    need(opts.nearest_k >= 1, f"--nearest_k must be at least 1 (got {opts.nearest_k})")
    need(0 <= opts.nearest_alpha <= 1, f"--nearest_alpha must be in [0, 1] (got {opts.nearest_alpha})")
    need(opts.anchor_eps >= 0, f"--anchor_eps must be >= 0 (got {opts.anchor_eps})")
    need(opts.codebook_size >= 2, f"--codebook_size must be at least 2 (got {opts.codebook_size})")
    need(opts.codebook_tau > 0, f"--codebook_tau must be > 0 (got {opts.codebook_tau})")
    need(opts.samples >= 0, f"--samples must be at least 0, 0 to evaluate without training "
         f"(got {opts.samples})")
    need(opts.eval_samples >= 1, f"--eval_samples must be at least 1 (got {opts.eval_samples}); "
         "every epoch ends with an evaluation")
    need(opts.epochs >= 1, f"--epochs must be at least 1 (got {opts.epochs})")
    need(opts.batch_size >= 1, f"--batch_size must be at least 1 (got {opts.batch_size})")
    need(opts.samples == 0 or opts.samples >= opts.batch_size, f"--samples ({opts.samples}) is smaller than "
         f"--batch_size ({opts.batch_size}); lower the batch or train on more samples")
    need(1 <= opts.grad_accum_steps <= opts.batch_size, "--grad_accum_steps must be between 1 "
         f"and --batch_size (got {opts.grad_accum_steps})")
    need(not (opts.by_paragraph and opts.grad_accum_steps > 1), "--by_paragraph makes each "
         "paragraph of a step its own micro-batch, so --grad_accum_steps "
         f"{opts.grad_accum_steps} cannot apply: pass --grad_accum_steps 1")
    need(opts.lr > 0 and math.isfinite(opts.lr), f"--lr must be a positive number (got {opts.lr})")
    need(opts.schedule in SCHEDULES, f"unknown --schedule {opts.schedule!r}; use one of: "
         f"{', '.join(SCHEDULES)}")
    need(opts.warmup_steps >= 0, f"--warmup_steps must be >= 0 (got {opts.warmup_steps})")
    need(opts.max_minutes >= 0 and math.isfinite(opts.max_minutes), "--max_minutes must be a "
         f"number of minutes >= 0, 0 for no budget (got {opts.max_minutes})")
    need(opts.max_grad_norm >= 0, f"--max_grad_norm must be >= 0, 0 for no clipping "
         f"(got {opts.max_grad_norm})")
    for name in ("first_token_ce_weight", "kd_weight", "recon_weight"):
        need(getattr(opts, name) >= 0, f"--{name} must be >= 0 (got {getattr(opts, name)})")
    need(opts.kd_tau > 0, f"--kd_tau must be > 0 (got {opts.kd_tau})")
    need(opts.save_every >= 0, f"--save_every must be >= 0, 0 for epoch ends only "
         f"(got {opts.save_every})")
    need(opts.max_new_tokens >= 1, f"--max_new_tokens must be at least 1 (got {opts.max_new_tokens})")
    need(opts.prompt in prompts.FORMATS, f"unknown --prompt {opts.prompt!r}; use one of "
         f"{', '.join(prompts.FORMATS)}")
    tracking.chosen(opts.report_to)
    need(opts.references_from != "", "--references_from is empty; pass an earlier run's folder, "
         "or drop the flag")
    need(opts.references_from is None
         or (Path(opts.references_from) / "references.json").is_file(),
         f"--references_from: {opts.references_from} holds no references.json; pass the folder "
         "of a run that got past its references, or drop the flag")
    need(opts.press_from != "", "--press_from is empty; pass an earlier run's folder, or drop "
         "the flag")
    fitted = fitted_presses()
    need(opts.press_from is None or (opts.encoder in fitted and opts.samples > 0),
         f"--press_from applies to an encoder whose press is fitted on the training questions "
         f"({', '.join(fitted)}) with --samples above 0 (got --encoder {opts.encoder}, "
         f"--samples {opts.samples}); drop the flag")
    need(opts.press_samples >= 0, f"--press_samples must be >= 0, 0 for every training "
         f"question (got {opts.press_samples})")
    need(not opts.press_samples or (opts.encoder in fitted and opts.samples > 0),
         f"--press_samples applies to an encoder whose press is fitted on the training "
         f"questions ({', '.join(fitted)}) with --samples above 0 (got --encoder {opts.encoder}, "
         f"--samples {opts.samples}); drop the flag")
    need(opts.press_from is None or (Path(opts.press_from) / "config.json").is_file(),
         f"--press_from: {opts.press_from} holds no run (no config.json); pass the folder of a "
         "run that fitted its press, or drop the flag")
    data.check_spec(opts.dataset)
    if opts.eval_dataset is not None:
        data.check_spec(opts.eval_dataset)
    need(opts.resume in RESUME, f"--resume takes one of {', '.join(RESUME)} (got {opts.resume!r})")
    opts = resume_mode(opts)
    last = checkpoint.existing(opts.run_dir() / "checkpoints" / "last")
    need(opts.resume != "yes" or last is not None, f"--resume: {opts.run_dir()} holds no "
         "checkpoint to resume (no checkpoints/last); drop --resume to start a new run")
    out = writable_dir(opts.run_dir(), "--output_dir")
    if opts.resume == "yes":
        changed = _changed(opts, json.loads((out / "config.json").read_text(encoding="utf-8")))
        need(not changed, f"--resume: {out} was made with other flags ({_listed(opts, changed)});"
             " resume with the same flags or pick another --output_dir")
    else:
        earlier = read_json(out / "summary.json") or {}
        need(earlier.get("status") != "failed", f"{out} holds a run that failed (its loss became "
             "non-finite); lower --lr and pick another --output_dir")
        need(last is None and not (out / "summary.json").exists(),
             f"{out} holds a run already; add --resume to continue it, or pick another "
             "--output_dir")
    return out
