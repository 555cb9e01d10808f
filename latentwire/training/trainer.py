"""The graph a training run optimises, and how it is evaluated.

text -> the model's own token embeddings -> encoder -> latents -> the sweep's transform ->
[prompt prefix] + latents [+ question as text] + answer anchor -> the frozen model, trained on
the answer with teacher forcing. The model never changes and stays in eval mode; only the
compressor (encoder, and a soft codebook's codes) learns. Evaluation goes through the sweep's
engine and scoring, beside two references computed once: the text itself and the question
alone. One optimizer step sums gradients over torchrun's processes (through accelerate, which
also runs the graph at --mixed_precision); loop.py drives the steps.
"""

import contextlib
import itertools
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm import tqdm
from torch.utils.checkpoint import checkpoint as recompute
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from .. import data, experiments, models, prompts, provenance, stats
from ..embed_experiments import NonFiniteError
from ..errors import UsageError
from ..files import read_json
from ..field import (Extractive, Press, Repeat, TokenCompressor, answer_pressed, budget,
                     pressed, reads_question)
from ..generation import StopTokens, cache_argument, generate, plain_kv, returned_cache
from ..scoring import answer_in, cut_answer, score_answers
from ..stats import bootstrap_ci
from ..vocab import VocabSpace, shared_tokens, token_anchors, translation
from . import checkpoint
from .encoders import RECOMPUTES, build, transform_config
from .learned_press import LearnedPress, paragraphs_of
from .options import TrainOptions, made_otherwise, shared_store_restarts, with_precision
from .registry import ENCODERS
from .spec import CompressorSpec, TransformSpec

CALIBRATION_EXAMPLES = 32  # spans an encoder that starts from data measures before step 1
KD_TOP = 32  # teacher logits kept per answer position: the distribution's head, a few MB in all
# The flags that shape an encoder: --freeze_encoder takes one trained with the same ones.
FROZEN_KEYS = ("encoder", "compression", "latent_len", "keep_question", "encoder_layer",
               "encoder_lora")


@dataclass
class Item:
    """One example, tokenised for training: what the encoder reads, the question kept as text
    (with --keep_question), and the answer to teach (the first gold answer, then a stop)."""
    example: data.Example
    span: list[int]
    question: list[int]
    answer: list[int]
    text: int = 0  # positions of the span before a field compressor kept part of it
    # An extractive field compressor's: the whole context's tokens, and where the kept ones stood.
    context: list[int] | None = None
    kept_at: list[int] | None = None


def answer_ids(tokenizer, fmt: prompts.PromptFormat, answer: str) -> list[int]:
    joined = fmt.anchor_text and not fmt.anchor_text[-1].isspace()
    ids = tokenizer((" " if joined else "") + answer, add_special_tokens=False).input_ids
    return ids + [tokenizer.eos_token_id]


def per_item(values: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
    """[items]: the mean of each item's values, given one value per target token, the items'
    tokens in order."""
    segment = torch.cat([torch.full((len(t),), n, device=values.device)
                         for n, t in enumerate(targets)])
    sizes = torch.tensor([len(t) for t in targets], device=values.device)
    return values.new_zeros(len(targets)).index_add(0, segment, values) / sizes


def whole_context(item: Item) -> list[int]:
    """What the encoder compressed, whole: the context before a field compressor kept part of
    it, else the span itself."""
    return item.context if item.context is not None else item.span


def kept_positions(item: Item) -> list[int]:
    """Where the encoder's tokens stand in whole_context(item): every position where nothing
    was kept before it (a press keeps no tokens: it prunes the encoder's output after)."""
    return item.kept_at if item.kept_at is not None else list(range(len(item.span)))


def encode_items(tokenizer, fmt, examples, keep_question: bool) -> list[Item]:
    items = []
    for e in examples:
        span, question = prompts.encode_span(tokenizer, fmt, e.context, e.question, keep_question)
        items.append(Item(e, span, question, answer_ids(tokenizer, fmt, e.answers[0]),
                          len(span)))
    return items


class NonFiniteLoss(Exception):
    """The loss, the latents or the updated weights stopped being finite numbers."""


def accelerator(opts: TrainOptions) -> Accelerator:
    """This process's Accelerator (accelerate): it joins torchrun's processes, reduces across
    them and runs the graph at --mixed_precision. accelerate keeps one state per process, so a
    process trains at one precision."""
    cpu = opts.device == "cpu" or not torch.cuda.is_available()
    try:
        return Accelerator(cpu=cpu, mixed_precision=opts.mixed_precision)
    except ValueError:
        raise UsageError(f"--mixed_precision {opts.mixed_precision}: this process has trained at "
                         "another precision already; run this one as a command of its own")


def recompute_layers(model) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them.
    Done by wrapping the layers, not with transformers' switch, which works only in train mode:
    the frozen model stays in eval mode (no dropout)."""
    setattr(model, RECOMPUTES, True)

    for layer in model.modules():
        # A model reused by a later run (a study's cells, a screen worker's trials) is wrapped
        # once: wrapping again would recompute each layer once more per wrap.
        if isinstance(layer, GradientCheckpointingLayer) and not hasattr(layer, "recomputed"):
            layer.recomputed = True
            layer.forward = _recomputed(layer.forward, cache_argument(layer))


def _recomputed(forward, cache: str):
    def run(*args, **kwargs):
        # A pass that writes a cache (a press's, pruning as it writes) would write it again.
        if kwargs.get(cache) is not None:
            return forward(*args, **kwargs)
        return recompute(forward, *args, use_reentrant=False, **kwargs)

    return run


def load_models(opts: TrainOptions, given=None) -> dict:
    """Every model the run needs, by its id: those `given` (one loaded model for a run over one,
    or a dict by id), the others loaded here."""
    if not isinstance(given, dict):
        given = {opts.model_ids()[0]: given} if given is not None else {}
    return {m: given.get(m) or models.load(m, opts.device, opts.trust_remote_code)
            for m in opts.needed_models()}


# The models a Ray worker process loaded, kept for the next run it is given (Ray reuses workers).
KEPT: dict = {}


def kept_models(opts: TrainOptions) -> dict:
    """load_models(opts), loaded once per process for the same models and device."""
    key = (opts.model_id, opts.encoder_model, opts.device, opts.trust_remote_code)
    if key not in KEPT:
        KEPT.clear()
        KEPT[key] = load_models(opts)
    return KEPT[key]


@dataclass
class State:
    """Where a run stands: saved in checkpoints/last/trainer_state.json."""
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress
    batch: int = 0  # its batches done
    elapsed: float = 0.0  # training seconds before this process
    # The epoch in progress: its training loss summed over examples, and their count, so that
    # its mean covers the steps before a resume too.
    epoch_loss: float = 0.0
    epoch_examples: int = 0
    epochs: list = field(default_factory=list)  # one entry per finished epoch
    best: dict | None = None
    references: dict | None = None


class Tally:
    """How far one evaluation has answered: a bar on a terminal, else a line at each quarter
    once it has run for a while. A press on the second model took 10 minutes on one CPU thread
    to answer 200 questions, and a run that says nothing for that long looks hung; a quick one
    stays quiet."""

    QUIET_SECONDS = 30

    def __init__(self, total: int, what: str, log, unit: str = "answer"):
        self.total, self.what, self.log, self.done = total, what, log, 0
        self.started = time.perf_counter()
        self.bar = (tqdm(total=total, desc=what, unit=unit, leave=False, dynamic_ncols=True)
                    if log is not silent and sys.stderr.isatty() else None)

    def __call__(self, n: int) -> None:
        before, self.done = self.done, self.done + n
        if self.bar is not None:
            self.bar.update(n)
            return
        seconds = time.perf_counter() - self.started
        quarter = 4 * self.done // self.total
        if quarter > 4 * before // self.total and quarter < 4 and seconds >= self.QUIET_SECONDS:
            self.log(f"  {self.what}: {self.done} of {self.total} in {seconds / 60:.1f} min")

    def __enter__(self) -> "Tally":
        return self

    def __exit__(self, *_) -> None:
        if self.bar is not None:
            self.bar.close()


def silent(*_, **__) -> None:
    """The log of every process but rank 0."""


class Answerer:
    """One frozen model that answers from the latents, in its own tokenizer and prompt format:
    its items (the question, the anchor and the answer in its own tokens), its prompt pieces,
    its loss on given latents, its answers and its references. The model never changes and
    stays in eval mode."""

    def __init__(self, model_id: str, lm, opts: TrainOptions, split, checkpointing: bool,
                 weight: float = 1.0, autocast=contextlib.nullcontext, relay_from=None,
                 log=print):
        self.lm, self.opts, self.weight, self.checkpointing = lm, opts, weight, checkpointing
        self.log = log
        self.autocast = autocast  # the run's precision for the graph (Accelerator.autocast)
        self.model_id, self.name = model_id, models.model_dirname(model_id)
        model, tok = lm.model, lm.tokenizer
        model.eval().requires_grad_(False)
        self.device = next(model.parameters()).device
        if checkpointing:
            recompute_layers(model)
        self.fmt = prompts.make_format(tok, opts.prompt)
        self.embed = model.get_input_embeddings()
        self.vocab = VocabSpace.from_model(model, len(tok))
        self.prefix_ids, _, self.anchor_ids = prompts.encode(tok, self.fmt, "", "")
        self.prefix, self.anchor = self.embed_ids(self.prefix_ids), self.embed_ids(self.anchor_ids)
        # A field compressor keeps part of the context; the question follows as text in both
        # settings, and it reads the question only where the setting is query-aware.
        # relay_from: (tokenizer, id) of the model a text relay compresses in.
        self.field = ENCODERS[opts.encoder].field_compressor(opts.seed, relay_from)
        as_text = opts.keep_question or self.field is not None
        train = encode_items(tok, self.fmt, split.train, as_text)
        evaluated = encode_items(tok, self.fmt, split.eval, as_text)
        if self.field is not None:
            self.reachable(train + evaluated)
        self.train_items = self.kept(train)
        if isinstance(self.field, LearnedPress) and self.train_items:
            self.fit_press(provenance.examples_sha(split.train))
        started = time.perf_counter()
        self.eval_items = self.kept(evaluated)
        # What a token compressor took to compress the evaluation contexts, done here once:
        # part of the time its answers cost, beside the evaluation's own.
        self.compress_seconds = time.perf_counter() - started
        self.stops = StopTokens(tok, model, self.embed.weight.shape[0])
        self.teacher = None  # teacher_targets(), once per run with --kd_weight
        self._prefix_kv = None

    def fit_press(self, train_sha: str) -> None:
        """A learned press's scores, fitted on the training questions (their digest:
        `train_sha`): each read after its paragraph as the answer is read after the pruned
        cache (question, anchor, answer). Kept in the run folder as soon as fitted: the same
        run started again there (resumed, or rerun after a kill before its first checkpoint)
        reads them back instead of fitting again (on Qwen the fit is 22 minutes), and so does
        a run given --press_from this folder, where the fit would be the same."""
        folder = self.opts.run_dir()
        saved = checkpoint.press_file(folder, self.name)
        same_run = (folder / "config.json").is_file() and not made_otherwise(self.opts)
        kept = checkpoint.load_tensors(saved) if same_run else None
        if kept is not None and self.field.restore(*kept):
            self.log(f"{self.name}: the press's scores as this run fitted them ({saved})")
            return
        if self.opts.press_from is not None:
            unlike = self.earlier_press(Path(self.opts.press_from), train_sha)
            if not unlike:
                self.log(f"{self.name}: the press's scores fitted by {self.opts.press_from} (the "
                         "same model, prompt, precision and training examples)")
                # The record says whose fit it is: its seconds were spent there, not here.
                self.field.fitted["fitted_by"] = str(self.opts.press_from)
                checkpoint.save_tensors(saved, *self.field.state())
                return
            self.log(f"{self.name}: the press of {self.opts.press_from} is not this run's "
                     f"({unlike}), so it fits its own")
        started = time.perf_counter()
        paragraphs = paragraphs_of(self.train_items, self.embed_ids, self.prefix,
                                   self.answer_tail, self.opts.press_samples)
        with Tally(len(paragraphs), f"{self.name}, paragraphs read for the press's fit",
                   self.log, "paragraph") as tally:
            self.field.fit(self.lm.model, paragraphs, self.autocast, tally)
        seconds = time.perf_counter() - started
        self.field.fitted["seconds"] = round(seconds, 1)
        self.log(f"{self.name}: the press's scores fitted on {self.field.fitted['questions']} "
                 f"questions of {len(paragraphs)} paragraphs in {seconds / 60:.1f} min")
        checkpoint.save_tensors(saved, *self.field.state())

    def earlier_press(self, folder: Path, train_sha: str) -> str:
        """Reads this model's press fitted by the run in `folder` into self.field, where that
        run fitted it as this one would: the same model, prompt format, precision, device,
        versions, training examples (by digest) and --press_samples; "" then, else what
        differs."""
        config = read_json(folder / "config.json")
        if not config:
            return "its config.json is missing or unreadable"
        theirs = config.get("provenance", {})
        readers = ([(a["model"], a["prompt_format"]) for a in theirs.get("answerers", [])]
                   or [(theirs.get("model"), theirs.get("prompt_format"))])
        here = provenance.describe(self.model_id, self.lm, self.fmt, self.vocab, {}, {},
                                   self.opts.seed, self.opts.max_new_tokens)
        unlike = [] if (here["model"], here["prompt_format"]) in readers else [
            f"no model of it is {self.model_id} with this prompt format"]
        if theirs.get("dataset", {}).get("train_examples_sha256") != train_sha:
            unlike.append("training examples")
        if config.get("options", {}).get("mixed_precision") != self.opts.mixed_precision:
            unlike.append("precision")
        if config.get("options", {}).get("press_samples", 0) != self.opts.press_samples:
            unlike.append("--press_samples")
        unlike += [k for k in ("device", "versions") if theirs.get(k) != here[k]]
        kept = checkpoint.load_tensors(checkpoint.press_file(folder, self.name))
        if not unlike and (kept is None or not self.field.restore(*kept)):
            unlike.append(f"it holds no fitted press of {self.name}")
        return ", ".join(unlike)

    def reachable(self, items: list[Item]) -> None:
        """A training-free compressor keeps at least one of a context's tokens or positions: a
        context shorter than the ratio cannot be compressed that much, and its row would
        report a ratio it never had."""
        ratio = self.opts.compression
        shortest = min(len(i.span) for i in items)
        if shortest < ratio:
            raise UsageError(f"--compression {ratio:g}: the shortest context here is {shortest} "
                             f"tokens in {self.model_id}'s tokenizer, and --encoder "
                             f"{self.opts.encoder} keeps at least one; pass --compression "
                             f"{shortest} or less")

    def kept(self, items: list[Item]) -> list[Item]:
        """The items with only what a token compressor keeps of each context."""
        if not isinstance(self.field, TokenCompressor) or not items:
            return items
        args = ([i.span for i in items], [self.fmt.context_text(i.example.context) for i in items],
                [i.example.question for i in items], self.opts.compression, self.lm.tokenizer,
                self.model_id)
        if not isinstance(self.field, Extractive):
            return [replace(i, span=s) for i, s in zip(items, self.field.select(*args))]
        return [replace(i, span=[i.span[p] for p in at], context=i.span, kept_at=at)
                for i, at in zip(items, self.field.positions(*args))]

    def embed_ids(self, ids: list[int]):
        with torch.no_grad():
            return self.embed(torch.tensor(ids, dtype=torch.long, device=self.device))

    def identity(self) -> dict:
        """What a checkpoint records of the model: which one, the prompt it reads, its weight."""
        model = provenance.describe(self.model_id, self.lm, self.fmt, self.vocab, {}, {},
                                    self.opts.seed, self.opts.max_new_tokens)["model"]
        return {"name": self.name, "model": model, "prompt_format": self.fmt.describe(),
                "weight": self.weight}

    # -- the graph --------------------------------------------------------------------------

    def loss(self, z: torch.Tensor, offsets, items: list[Item], teacher: list | None = None):
        """Sum over the items of each one's loss on these latents, and its parts, summed
        likewise."""
        o = self.opts
        if isinstance(self.field, Press):
            logits = self.pressed_logits(z, offsets, items)
        else:
            logits = self.answer_logits(z, offsets, items)
        target = torch.tensor([t for i in items for t in i.answer], device=logits.device)
        ce = F.cross_entropy(logits, target, reduction="none")
        first_at = torch.tensor([0] + [len(i.answer) for i in items[:-1]]).cumsum(0)
        per_item_ce = per_item(ce, [i.answer for i in items])
        first = ce[first_at.to(ce.device)]
        total = per_item_ce + o.first_token_ce_weight * first
        parts = {"ce": float(per_item_ce.detach().sum()), "first_token_ce": float(first.detach().sum())}
        if teacher is not None:
            ids = torch.cat([t[0] for t in teacher]).to(ce.device)
            p = torch.softmax(torch.cat([t[1] for t in teacher]).to(ce.device) / o.kd_tau, -1)
            log_q = torch.log_softmax(logits / o.kd_tau, -1).gather(1, ids)
            kd = -(p * log_q).sum(-1) * o.kd_tau ** 2
            per_item_kd = per_item(kd, [i.answer for i in items])
            total = total + o.kd_weight * per_item_kd
            parts["kd"] = float(per_item_kd.detach().sum())
        if o.recon_weight > 0:
            contexts = [whole_context(i) for i in items]
            logits = self.context_logits(z, offsets, contexts)
            target = torch.tensor([t for c in contexts for t in c], device=logits.device)
            per_item_recon = per_item(F.cross_entropy(logits, target, reduction="none"), contexts)
            total = total + o.recon_weight * per_item_recon
            parts["recon"] = float(per_item_recon.detach().sum())
        return total.sum(), parts

    def answer_logits(self, z: torch.Tensor, offsets, items: list[Item]) -> torch.Tensor:
        """The logits at every answer position of every item (in order), the items read in one
        batch behind the shared prefix: latents, question, anchor, the answer so far."""
        return self.read_after(z, offsets, [(self.answer_tail(i), len(i.answer)) for i in items])

    def answer_tail(self, item: Item) -> torch.Tensor:
        """What follows the context's latents when the answer is read: the question, the
        anchor, the answer so far."""
        return torch.cat([self.embed_ids(item.question), self.anchor,
                          self.embed_ids(item.answer[:-1])])

    def context_logits(self, z: torch.Tensor, offsets, contexts: list[list[int]]) -> torch.Tensor:
        """The logits at every token of each item's whole context, read again right after its
        latents: the last latent predicts the context's first token, and so on (--recon_weight:
        what the latents must carry of the context, with no label)."""
        return self.read_after(z, offsets, [(self.embed_ids(c[:-1]), len(c)) for c in contexts])

    def read_after(self, z: torch.Tensor, offsets, tails: list[tuple]) -> torch.Tensor:
        """The logits at the last `count` positions of each row [prefix, latents, tail] for the
        (tail embeddings, count) of each item, the rows read in one batch behind the shared
        prefix; the position before each predicted token predicts it."""
        dtype = self.embed.weight.dtype
        cache = self.prefix_cache(len(tails))
        lead = self.prefix if cache is None else self.prefix[:0]
        rows, starts = [], []
        for n, (tail, count) in enumerate(tails):
            row = torch.cat([lead, z[offsets[n]:offsets[n + 1]].to(dtype), tail])
            starts.append(row.shape[0] - count)
            rows.append(row)
        width = max(r.shape[0] for r in rows)
        # Right padding needs no mask: under causal attention no real token sees a pad.
        batch = torch.stack([F.pad(r, (0, 0, 0, width - r.shape[0])) for r in rows])
        at_row = torch.cat([torch.full((c,), n) for n, (_, c) in enumerate(tails)])
        at_col = torch.cat([torch.arange(s, s + c) for s, (_, c) in zip(starts, tails)])
        with self.autocast():
            base = self.lm.model.base_model
            hidden = base(inputs_embeds=batch, use_cache=cache is not None,
                          **{cache_argument(base): cache}).last_hidden_state
            return self.lm.model.get_output_embeddings()(hidden[at_row, at_col]).float()

    def pressed_logits(self, z: torch.Tensor, offsets, items: list[Item]) -> torch.Tensor:
        """As answer_logits, each item read as evaluate() reads it under a press: the prompt
        (with the question where the press observes it) pruned by the press, then the rest and
        the answer so far at their true positions. The press prunes each prompt's own cache,
        so items are read one prompt at a time; items of one context whose press reads no
        question share its prompt, pruned once, and read on from copies of its cache in one
        batch (their latents are the same). The gradient reaches the latents through the
        positions kept."""
        aware = self.field.reads_question(not self.opts.keep_question)
        model = self.lm.model
        base = model.base_model
        by_prompt = data.grouped(range(len(items)), lambda n: n if aware else tuple(items[n].span))
        out = [None] * len(items)
        for members in by_prompt.values():
            first = items[members[0]]
            with self.autocast():
                cache, position = pressed(
                    model, self.prefix,
                    z[offsets[members[0]]:offsets[members[0] + 1]].to(self.embed.weight.dtype),
                    self.embed_ids(first.question) if aware else None, self.field,
                    self.opts.compression,
                    Repeat(self.prefix_ids + first.span, self.anchor_ids, self.lm.tokenizer))
                rests = [torch.cat(([] if aware else [self.embed_ids(items[n].question)])
                                   + [self.anchor, self.embed_ids(items[n].answer[:-1])])
                         for n in members]
                width = max(r.shape[0] for r in rests)
                if len(members) > 1:
                    cache.batch_repeat_interleave(len(members))
                # Right padding needs no mask: under causal attention no real token sees a pad.
                rows = torch.stack([F.pad(r, (0, 0, 0, width - r.shape[0])) for r in rests])
                positions = torch.arange(position, position + width, device=self.device)
                hidden = base(inputs_embeds=rows,
                              position_ids=positions.expand(len(members), -1), use_cache=True,
                              **{cache_argument(base): cache}).last_hidden_state
                for row, (n, rest) in enumerate(zip(members, rests)):
                    answer = hidden[row, rest.shape[0] - len(items[n].answer):rest.shape[0]]
                    out[n] = model.get_output_embeddings()(answer).float()
        return torch.cat(out)

    def prefix_cache(self, rows: int):
        """The prompt prefix's keys and values, shared by every row: the prefix is the same
        constant text in every example and the model is frozen, so it is computed once per run
        and never enters the batch (on the bundled model, 37 of about 65 positions a row).
        None where the model's cache is not plain keys and values (sliding windows, recurrent
        state): the prefix then goes into every row."""
        if not len(self.prefix) or self.checkpointing:
            return None
        if self._prefix_kv is None:
            with torch.no_grad():
                out = self.lm.model.base_model(inputs_embeds=self.prefix[None], use_cache=True)
            self._prefix_kv = plain_kv(returned_cache(out)) or []
        if not self._prefix_kv:
            return None
        cache = DynamicCache(config=self.lm.model.config)
        layers = []
        for k, v in self._prefix_kv:
            layer = DynamicLayer()
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)
            layers.append(layer)
        cache.layers[:] = layers
        return cache

    def teacher_targets(self) -> list:
        """The frozen model reading the text: its top logits at every answer position of every
        training example, computed once per run (the model never changes)."""
        out = []
        with torch.no_grad():
            for item in self.train_items:
                text, _ = prompts.encode_span(self.lm.tokenizer, self.fmt, item.example.context,
                                              item.example.question, False)
                row = torch.cat([self.prefix, self.embed_ids(text), self.anchor,
                                 self.embed_ids(item.answer[:-1])])
                logits = self.lm.model(inputs_embeds=row[None], use_cache=False,
                                       logits_to_keep=len(item.answer)).logits[0].float()
                values, ids = logits.topk(KD_TOP, dim=-1)
                out.append((ids.cpu(), values.cpu()))
        return out

    # -- evaluation -------------------------------------------------------------------------

    def _answer(self, prompts_: list, what: str) -> list[tuple[str, int]]:
        with Tally(len(prompts_), f"{self.name}, {what}", self.log) as tally:
            return generate(self.lm.model, self.lm.tokenizer, prompts_, self.stops,
                            self.opts.max_new_tokens, on_batch=tally, prefix=self.prefix)

    def _score(self, answers) -> dict:
        predictions, means = score_answers([i.example for i in self.eval_items], answers)
        return {**means, "ci": list(bootstrap_ci([p["f1"] for p in predictions])),
                "num_samples": len(predictions), "predictions": predictions}

    def evaluate(self, chunks: list[tuple]) -> dict:
        """Its answers from the latents of the evaluation split, given in chunks of
        (latents, offsets, diagnostics), scored, with latent diagnostics."""
        dtype = self.embed.weight.dtype
        prompts_, lat_rows, text_rows, diag, latents_total = [], [], [], [], 0
        items = iter(self.eval_items)
        with torch.no_grad():
            for z, offsets, d in chunks:
                for n in range(len(offsets) - 1):
                    item = next(items)
                    prompts_.append((z[offsets[n]:offsets[n + 1]].to(dtype),
                                     self.embed_ids(item.question)))
                    # Positions the model reads for the content, both ways: with
                    # --keep_question the question is text on both sides.
                    m = int(offsets[n + 1] - offsets[n])
                    if isinstance(self.field, Press):
                        m = budget(m, self.opts.compression)
                    latents_total += m
                    lat_rows.append(m + len(item.question))
                    text_rows.append(item.text + len(item.question))
                latent = z.float()
                sims, _ = self.vocab.topk(latent, 1)
                diag.append({**d, "rms_over_vocab": float(
                    latent.pow(2).mean(1).sqrt().mean() / self.vocab.mean_rms),
                    "cosine_to_nearest_token": float(sims[:, 0].mean())})
        if isinstance(self.field, Press):
            tok = self.lm.tokenizer
            repeats = [Repeat(self.prefix_ids + i.span, self.anchor_ids, tok)
                       for i in self.eval_items]
            with Tally(len(prompts_), f"{self.name}, contexts pressed", self.log) as tally:
                answers = [(cut_answer(tok.decode(ids, skip_special_tokens=True)), len(ids))
                           for ids in answer_pressed(
                               self.lm.model,
                               [(self.prefix, z, q, self.anchor) for z, q in prompts_],
                               self.field, self.opts.compression, not self.opts.keep_question,
                               self.stops, self.opts.max_new_tokens, repeats, tally)]
        else:
            answers = self._answer([torch.cat([z, q, self.anchor]) for z, q in prompts_],
                                   "latents")
        result = self._score(answers)
        keys = diag[0].keys()
        result["latent_diagnostics"] = {k: sum(d[k] for d in diag) / len(diag) for k in keys
                                        if isinstance(diag[0][k], (int, float))}
        result["compression_ratio"] = sum(t / m for t, m in zip(text_rows, lat_rows)) / len(lat_rows)
        result["latents_per_example"] = float(latents_total) / len(lat_rows)
        return result

    def references(self) -> dict:
        """The text itself, and the question with no context: the frame a latent F1 is read in."""
        text, question = [], []
        for item in self.eval_items:
            e = item.example
            span, _ = prompts.encode_span(self.lm.tokenizer, self.fmt, e.context, e.question, False)
            text.append(torch.cat([self.embed_ids(span), self.anchor]))
            q = self.lm.tokenizer(self.fmt.question_text(e.question),
                                  add_special_tokens=False).input_ids
            question.append(torch.cat([self.embed_ids(q), self.anchor]))
        return {"text": self._score(self._answer(text, "text reference")),
                "question_only": self._score(self._answer(question, "question-only reference"))}


def paired(results: dict) -> dict:
    """Every model's evaluation in one record: each model's own under its name, and the paired
    difference between the first two on the same questions (F1 of the first minus the second).
    Its f1, em, empty rate and compression are the means over the models, its interval that of
    the per-question mean: what picks the best checkpoint of a run over several models."""
    names = list(results)
    per_question = [[p["f1"] for p in r["predictions"]] for r in results.values()]
    mean = lambda key: sum(r[key] for r in results.values()) / len(results)
    return {"f1": mean("f1"), "em": mean("em"), "empty_rate": mean("empty_rate"),
            "ci": list(bootstrap_ci([sum(q) / len(q) for q in zip(*per_question)])),
            "compression_ratio": mean("compression_ratio"),
            "latents_per_example": mean("latents_per_example"),
            "latent_diagnostics": {},
            "models": results,
            "paired": {"a": names[0], "b": names[1],
                       **stats.paired_comparison(per_question[0], per_question[1])}}


class Trainer:
    """One run, set up in three named pieces, in this order (the compressor's slots come from
    the data and its scale from the reader): setup_data (the split), setup_models (the frozen
    models that answer and the one that reads), setup_compressor (the compressor, calibrated,
    and its optimizer); then what the run records of itself (record). step() is one optimizer
    step; evaluate() and references() score on the held-out split. loop.py fits: the epochs,
    the checkpoints and what the run writes."""

    def __init__(self, opts: TrainOptions, out: Path, log=print, lm=None):
        opts = with_precision(opts)
        self.opts, self.out = opts, out
        self.accelerator = accelerator(opts)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.log = log if self.rank == 0 else silent
        if shared_store_restarts():
            self.log("warning: torchrun --max-restarts shares its store with the processes, where "
                     "a restart finds the addresses of the round before and fails to join "
                     "(pytorch/pytorch#135712); start torchrun with "
                     "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
        self.split = self.setup_data()
        self.answerers, self.reader = self.setup_models(lm)
        if opts.answer_kept:
            self.keep_answered()
        self.spec, self.compressor, self.params, self.optimizer = self.setup_compressor()
        self._states: dict = {}  # states(): (question, context) -> the frozen model's states
        self.provenance, self.checkpoint_config = self.record()

    # -- setup ------------------------------------------------------------------------------

    def setup_data(self) -> data.Split:
        """The training and held-out evaluation examples."""
        opts = self.opts
        # --answer_kept counts --samples after its cut: every training example is drawn, in
        # the seeded order, and keep_answered takes the first that many whose answer was kept.
        drawn = None if opts.answer_kept else opts.samples  # validate refuses it with --samples 0
        if opts.eval_dataset is None:
            examples = data.load_all(opts.dataset, at_least=opts.samples + opts.eval_samples)
            split = data.split(examples, drawn, opts.eval_samples, opts.seed)
        else:
            split = data.split_apart(data.load_all(opts.dataset, at_least=opts.samples),
                                     data.load_all(opts.eval_dataset), drawn,
                                     opts.eval_samples, opts.seed)
        if opts.samples and len(split.train) < opts.batch_size:
            raise UsageError(f"the training split holds {len(split.train)} examples, fewer "
                             f"than --batch_size {opts.batch_size}; lower the batch or use more data")
        return split

    def setup_models(self, lm) -> tuple[list["Answerer"], "Answerer"]:
        """(the models that answer, the one whose copy reads the text): one of those answering,
        or one that only reads."""
        opts = self.opts
        loaded = load_models(opts, lm)
        self.device = next(loaded[opts.model_ids()[0]].model.parameters()).device
        # Recomputed layers would append to a cache twice: with checkpointing the prefix goes
        # into every row instead of a shared cache.
        self.checkpointing = opts.gradient_checkpointing or self.device.type == "cuda"

        source = (loaded[opts.reader_id()].tokenizer, opts.reader_id())

        def answerer(model_id: str, weight: float) -> Answerer:
            return Answerer(model_id, loaded[model_id], opts, self.split, self.checkpointing,
                            weight, self.accelerator.autocast, source, self.log)

        answerers = [answerer(m, w) for m, w in zip(opts.model_ids(), opts.weights())]
        if ENCODERS[opts.encoder].relay:  # the one model reads its own tokens of the text
            return answerers, answerers[0]
        reader = next((a for a in answerers if a.model_id == opts.reader_id()),
                      None) or answerer(opts.reader_id(), 0.0)
        return answerers, reader

    def keep_answered(self) -> None:
        """--answer_kept: the training split cut to the examples whose answer the reader's
        compressor kept, in every model's items alike. Most of a query-agnostic selector's
        training questions ask about text it dropped, and their answers teach the reader to
        guess rather than to read what was kept."""
        tok, items = self.reader.lm.tokenizer, self.reader.train_items
        rows = [r for r, item in enumerate(items)
                if answer_in(tok.decode(item.span), item.example.answers)]
        self.log(f"--answer_kept: {len(rows)} of the {len(items)} training examples have an "
                 f"answer in the kept text; training on the first {min(len(rows), self.opts.samples)}")
        if len(rows) < self.opts.batch_size:
            raise UsageError(f"--answer_kept leaves {len(rows)} training examples, fewer than "
                             f"--batch_size {self.opts.batch_size}; use a larger --dataset or "
                             "drop --answer_kept")
        if len(rows) < self.opts.samples:
            self.log(f"warning: asked for {self.opts.samples} samples with an answer kept but "
                     f"the dataset holds {len(rows)}; using all of them")
        rows = rows[:self.opts.samples]
        self.split = replace(self.split, train=[self.split.train[r] for r in rows])
        for a in {id(a): a for a in (*self.answerers, self.reader)}.values():
            a.train_items = [a.train_items[r] for r in rows]

    def setup_compressor(self):
        """(spec, compressor, its trained parameters, their optimizer): built from the seed,
        an encoder --freeze_encoder names loaded into it, calibrated on the first training
        spans (the same on every rank, so each calibrates to identical statistics)."""
        opts, reader = self.opts, self.reader
        spec, frozen = self.compressor_spec()
        torch.manual_seed(opts.seed)
        compressor = build(spec, reader.vocab, reader.lm.model, {
            i: a.vocab for i, a in enumerate(self.answerers)} if spec.shared
            else None).to(self.device)
        if frozen is not None:  # only the adapters train
            compressor.load_state_dict(frozen, strict=False)
            for name, p in compressor.named_parameters():
                p.requires_grad_(name.startswith("adapters."))
        self.map_adapters(spec, compressor)
        trained = [p for p in compressor.parameters() if p.requires_grad]
        if not (reader.train_items and trained):  # evaluated as it stands, nothing trains
            return spec, compressor, [], None
        calibration = reader.train_items[:CALIBRATION_EXAMPLES]
        spans = reader.embed_ids([t for i in calibration for t in i.span])
        compressor.calibrate(spans, [len(i.span) for i in calibration],
                             **({} if frozen is None else {"encoder": False}))
        return spec, compressor, trained, torch.optim.AdamW(trained, lr=opts.lr)

    def map_adapters(self, spec: CompressorSpec, compressor) -> None:
        """Latents that are the reader's embeddings of kept tokens plus what the encoder added
        (an encoder on a field compressor, in the reader's width) are read by each model as
        its own embedding of each kept token plus a linear map of the addition, which starts
        as the map between the two vocabularies fitted on the tokens both spell alike (the
        reader: its own table and the identity); their calibration then leaves them be."""
        if not (spec.shared and spec.field) or hasattr(compressor, "latent"):
            return
        reader = self.reader
        for n, a in enumerate(self.answerers):
            if a.model_id == reader.model_id:
                anchors, weight = reader.vocab.table, torch.eye(reader.embed.weight.shape[1])
            else:
                tok = reader.lm.tokenizer
                ids = shared_tokens(tok, a.lm.tokenizer, reader.vocab.size, a.vocab.size)
                weight, _ = translation(reader.vocab, a.vocab, *ids)
                anchors = token_anchors(tok, a.lm.tokenizer, a.vocab, reader.vocab.size)
                self.log(f"{a.name} reads {reader.name}'s kept tokens as its own embeddings of "
                         f"them ({len(ids[0]):,} of {reader.vocab.size:,} spelled alike, the "
                         "others as the mean of its tokens of their text), plus a map of the "
                         "offsets fitted on those it spells alike")
            compressor.adapters[str(n)].on_tokens(anchors.to(self.device), weight.to(self.device))

    def record(self) -> tuple[dict, dict]:
        """(the run's provenance for config.json, what each checkpoint records of its models
        and compressor)."""
        opts, first = self.opts, self.answerers[0]
        described = provenance.describe(
            first.model_id, first.lm, first.fmt, first.vocab,
            {"spec": opts.dataset, "eval_spec": opts.eval_dataset,
             "train_examples_sha256": provenance.examples_sha(self.split.train),
             "eval_examples_sha256": provenance.examples_sha(self.split.eval)},
            {"train_samples": len(self.split.train), "eval_samples": len(self.split.eval)},
            opts.seed, opts.max_new_tokens)
        if first.field is not None:  # a field compressor's settings, not only its name
            described["field_compressor"] = {"encoder": opts.encoder, **first.field.describe()}
        trained_on = {"dataset": opts.dataset, "samples": len(self.split.train)}
        if not self.spec.shared:
            return described, {"model": described["model"], "prompt_format": first.fmt.describe(),
                               "compressor": self.spec.to_json(), "trained_on": trained_on}
        described["answerers"] = [a.identity() for a in self.answerers]
        described["reader"] = self.reader.identity()
        return described, {"answerers": described["answerers"], "reader": described["reader"],
                           "compressor": self.spec.to_json(), "trained_on": trained_on}

    def compressor_spec(self) -> tuple[CompressorSpec, dict | None]:
        """(the compressor's spec, the weights of an encoder --freeze_encoder loads, or None).
        One model read by its own copy is today's compressor; several, another reader, a
        latent width or a frozen encoder make a shared one with an adapter per model."""
        opts, reader = self.opts, self.reader
        items = reader.train_items + reader.eval_items
        transform = experiments.embed_transforms()[opts.embed_transform]
        spec = CompressorSpec(
            encoder=opts.encoder, d_model=reader.embed.weight.shape[1],
            max_latents=max(len(i.span) for i in items), scale=float(reader.vocab.mean_rms),
            compression=opts.compression, latent_len=opts.latent_len,
            keep_question=opts.keep_question, encoder_layer=opts.encoder_layer,
            encoder_lora=opts.encoder_lora,
            transform=TransformSpec(transform, transform_config(transform, asdict(opts))),
            codebook_trainable=opts.codebook_trainable)
        if not opts.shared():
            return spec, None
        spec = replace(spec, latent_dim=opts.latent_dim or spec.d_model,
                       adapters=tuple(a.embed.weight.shape[1] for a in self.answerers))
        if opts.freeze_encoder is None:
            return spec, None
        weights, config = checkpoint.load(opts.freeze_encoder)
        theirs = CompressorSpec.from_json(config["compressor"])
        reader_there = checkpoint.reader(config)
        if reader_there["model"]["config_sha256"] != reader.identity()["model"]["config_sha256"]:
            raise UsageError(f"--freeze_encoder {opts.freeze_encoder}: its encoder reads with "
                             f"{reader_there['model']['id']}, not {reader.model_id}; pass that "
                             "model as --encoder_model")
        # An encoder trained for one model alone gives latents in its reader's width.
        theirs = replace(theirs, latent_dim=theirs.latent_dim or theirs.d_model)
        # Its slots and scale are the checkpoint's, whatever this run's data.
        spec = replace(spec, d_model=theirs.d_model, max_latents=theirs.max_latents,
                       scale=theirs.scale, latent_dim=opts.latent_dim or theirs.latent_dim)
        changed = [k for k in ("latent_dim", *FROZEN_KEYS)
                   if getattr(theirs, k) != getattr(spec, k)]
        if changed:
            raise UsageError(f"--freeze_encoder {opts.freeze_encoder} was trained with other "
                             "encoder flags (" + ", ".join(
                                 f"--{k} {getattr(theirs, k)} there, {getattr(spec, k)} now"
                                 for k in changed) + "); pass the same ones")
        return spec, {k: v for k, v in weights.items() if k.startswith(("encoder.", "latent."))}

    # -- the graph --------------------------------------------------------------------------

    def latents(self, rows, evaluating: bool = False) -> list[tuple]:
        """Per answering model: (latents [M, d] float32, offsets, transform diagnostics) of these
        examples (indices into the training or evaluation split), all from one encoding of the
        reader's spans."""
        items = self.reader.eval_items if evaluating else self.reader.train_items
        spans = [items[r].span for r in rows]
        states = None
        if ENCODERS[self.opts.encoder].reads_states:
            states = self.compressor.encoder.gather([self.context_states(items[r]) for r in rows],
                                                    [kept_positions(items[r]) for r in rows])
        flat = [t for s in spans for t in s]
        return self.compressor.per_model(self.reader.embed_ids(flat).float(),
                                         [len(s) for s in spans], states,
                                         torch.tensor(flat, device=self.device))

    def context_states(self, item: Item) -> torch.Tensor:
        """The frozen model's states at every token of an item's context. The model never
        changes, so a context's states are computed once and kept, whatever epoch or question
        reads them again: read without the question, a SQuAD paragraph's states serve its five
        or so questions. The question is read where its selector reads it (`sentences`,
        query-aware), never with one that does not (`truncate`): the encoder is as
        question-blind as its selector, and a study runs it once for both settings."""
        reads = reads_question(self.reader.field, self.opts.keep_question)
        question = tuple(item.question) if reads else ()
        context = whole_context(item)
        key = (question, tuple(context))
        if key not in self._states:
            self._states[key] = self.compressor.encoder.states(list(question), context)
        return self._states[key]

    def loss(self, rows: list[int]):
        """The weighted sum over the answering models of each one's answer loss on these
        training examples, and the parts (per model, under its name, where there are several)."""
        total, parts = 0.0, {}
        several = len(self.answerers) > 1
        for a, (z, offsets, _) in zip(self.answerers, self.latents(rows)):
            teacher = [a.teacher[r] for r in rows] if a.teacher else None
            loss, mine = a.loss(z, offsets, [a.train_items[r] for r in rows], teacher)
            total = total + a.weight * loss
            parts.update({f"{k}/{a.name}" if several else k: v for k, v in mine.items()})
        return total, parts

    def distil(self) -> None:
        """Every answering model's teacher: itself reading the text of every training example."""
        for a in self.answerers:
            a.teacher = a.teacher_targets()

    # -- evaluation -------------------------------------------------------------------------

    def evaluate(self) -> dict:
        """Every model's answers from the latents on the evaluation split, scored: one model's
        record, or for several each model's in one record (see `paired`)."""
        self.compressor.eval()
        chunks = [[] for _ in self.answerers]
        n = len(self.reader.eval_items)
        with torch.no_grad():
            for s in range(0, n, 64):
                for mine, out in zip(chunks, self.latents(range(s, min(s + 64, n)), True)):
                    mine.append(out)
        self.compressor.train()
        results = {a.name: a.evaluate(c) for a, c in zip(self.answerers, chunks)}
        return paired(results) if len(results) > 1 else next(iter(results.values()))

    def references(self) -> dict:
        """Each model's own references, under its name where there are several."""
        refs = {a.name: a.references() for a in self.answerers}
        return refs if len(refs) > 1 else next(iter(refs.values()))

    # -- the loop ---------------------------------------------------------------------------

    def batches(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches: a seeded order that depends on the epoch alone, so a
        resumed run sees exactly the batches it would have seen."""
        gen = torch.Generator().manual_seed(self.opts.seed * 1000 + epoch)
        order = torch.randperm(len(self.split.train), generator=gen).tolist()
        if self.opts.by_paragraph:  # paragraphs in the order of their first question drawn
            together = data.grouped(order, lambda r: self.split.train[r].context)
            order = [r for rows in together.values() for r in rows]
        b = self.opts.batch_size
        return [order[s:s + b] for s in range(0, len(order), b)] if self.params else []

    def total_steps(self) -> int:
        """The optimizer steps of the whole run as asked (--max_minutes may stop it sooner)."""
        return len(self.batches(0)) * self.opts.epochs

    def learning_rate(self, step: int, elapsed: float = 0.0) -> float:
        """--lr after a linear warm-up of --warmup_steps, then constant or cosine to zero over
        the whole run: over its steps, or with --max_minutes over the budget's seconds, of
        which `elapsed` are spent (a budget ends at a step no one knows beforehand, and a
        run that stops at a high rate ends on its noisiest weights). Either way a resumed run
        follows the same curve: its elapsed time counts the steps before the resume."""
        o = self.opts
        if step < o.warmup_steps:
            return o.lr * (step + 1) / o.warmup_steps
        if o.schedule == "cosine":
            progress = (elapsed / (o.max_minutes * 60) if o.max_minutes else
                        (step - o.warmup_steps) / max(1, self.total_steps() - o.warmup_steps))
            return o.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return o.lr

    def micro_batches(self, mine: list[int]) -> list[list[int]]:
        """This rank's share of a step in --grad_accum_steps parts, or with --by_paragraph one
        part per paragraph (consecutive in the epoch's order)."""
        if self.opts.by_paragraph:
            train = self.split.train
            return [list(rows) for _, rows in itertools.groupby(mine, lambda r: train[r].context)]
        size = -(-len(mine) // self.opts.grad_accum_steps) if mine else 1
        return [mine[s:s + size] for s in range(0, len(mine), size)]

    def step(self, batch: list[int], step: int = 0, elapsed: float = 0.0) -> dict:
        """Optimizer step number `step` (from 0) on a global batch, after `elapsed` seconds of
        training: this rank's share, in its micro-batches, gradients summed over ranks; the
        loss is the batch mean."""
        o = self.opts
        mine = batch[self.rank::self.world]
        self.optimizer.zero_grad(set_to_none=True)
        totals = {"loss": 0.0}
        for micro in self.micro_batches(mine):
            try:
                loss, parts = self.loss(micro)
            except NonFiniteError:  # the compressor's latents are already NaN or inf
                raise NonFiniteLoss
            (loss / len(batch)).backward()
            totals["loss"] += float(loss.detach())
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        keys = sorted(totals)
        # Each process times its own steps, and a rate from the budget must be one for all:
        # the elapsed time rides last in the sums the processes add anyway, and becomes the mean.
        sums = torch.tensor([totals[k] for k in keys] + [elapsed], dtype=torch.float64)
        if self.world > 1:
            flat = self.accelerator.reduce(torch.cat([g.flatten() for g in grads]), "sum")
            sums = self.accelerator.reduce(sums, "sum")
            grads = list(flat.split([g.numel() for g in grads]))
        for p, g in zip(self.params, grads):
            p.grad = g.view_as(p)
        metrics = {k: float(v) / len(batch) for k, v in zip(keys, sums[:-1])}
        elapsed = float(sums[-1]) / self.world
        if not math.isfinite(metrics["loss"]):
            raise NonFiniteLoss
        norm = torch.nn.utils.clip_grad_norm_(
            self.params, o.max_grad_norm if o.max_grad_norm > 0 else float("inf"))
        lr = self.learning_rate(step, elapsed)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        # Weights that overflowed would be saved as the next checkpoint: stop before that.
        if not all(bool(torch.isfinite(p).all()) for p in self.params):
            raise NonFiniteLoss
        return {**metrics, "grad_norm": float(norm), "lr": lr}

    def save(self, which: str, state: State) -> None:
        weights = self.compressor.state_dict()
        folder = self.out / "checkpoints" / which
        if which == "last" and self.optimizer is not None:
            checkpoint.save(folder, weights, self.checkpoint_config,
                            self.optimizer.state_dict(), asdict(state))
        else:
            checkpoint.save(folder, weights, self.checkpoint_config)

    def restore(self) -> State:
        folder = checkpoint.existing(self.out / "checkpoints" / "last")
        weights, _, optimizer, saved = checkpoint.load_training(folder)
        self.compressor.load_state_dict({k: v.to(self.device) for k, v in weights.items()})
        adapters = getattr(self.compressor, "adapters", {})
        misread = [a.model_id for n, a in zip(adapters, self.answerers)
                   if adapters[n].holds_whole_map()]
        if misread:
            raise UsageError(f"{folder} holds {', '.join(misread)}'s offset map as one matrix, "
                             "as latentwire saved it before 2026-12-04, and resuming would "
                             "scale it twice; train again with another --output_dir")
        self.optimizer.load_state_dict(optimizer)
        return State(**saved)
