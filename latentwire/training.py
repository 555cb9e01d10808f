"""The training loop: an encoder turns text into a few latents that the frozen model reads.

text -> the model's own token embeddings -> encoder -> latents -> the sweep's transform ->
[prompt prefix] + latents [+ question as text] + answer anchor -> the frozen model, trained on
the answer with teacher forcing. The model never changes and stays in eval mode; only the
compressor (encoder, and a soft codebook's codes) learns. Every epoch ends with an evaluation
through the sweep's engine and scoring, beside two references computed once: the text itself
and the question alone. Data parallel under torchrun; resumable after SIGKILL, bitwise on CPU.
"""

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import checkpoint, data, models, prompts
from .embed_experiments import NonFiniteError
from .errors import UsageError

TRANSFORMS = {"none": "identity", "rms_matching": "rms_matching",
              "batch_distribution": "batch_distribution", "nearest_k": "nearest_k",
              "anchor_offset": "anchor_offset", "soft_codebook": "soft_codebook"}
SCHEDULES = ("constant", "cosine")
CALIBRATION_EXAMPLES = 32  # spans an encoder that starts from data measures before step 1
KD_TOP = 32  # teacher logits kept per answer position: the distribution's head, a few MB in all


@dataclass
class TrainOptions:
    embed_transform: str = "none"
    target_rms_scale: float = 1.0
    nearest_k: int = 5
    nearest_alpha: float = 0.5
    anchor_eps: float = 0.1
    codebook_size: int = 512
    codebook_tau: float = 1.0
    codebook_trainable: bool = True
    encoder: str = "pool"
    compression: float | None = 4.0
    latent_len: int | None = None
    keep_question: bool = False
    encoder_layer: int | None = None
    encoder_lora: int = 0
    model_id: str = models.BUNDLED
    dataset: str = "builtin"
    samples: int = 2000
    eval_samples: int = 100
    epochs: int = 1
    batch_size: int = 16
    grad_accum_steps: int = 1
    lr: float = 1e-3
    schedule: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    first_token_ce_weight: float = 1.0
    kd_weight: float = 0.0
    kd_tau: float = 1.0
    output_dir: str | None = None
    save_every: int = 50
    resume: bool = False
    seed: int = 42
    device: str | None = None
    prompt: str = "auto"
    max_new_tokens: int = 12
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False

    def __post_init__(self):
        if self.latent_len is not None:
            self.compression = None  # a fixed count replaces the ratio

    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/train/{self.embed_transform}")

    def identity(self) -> dict:
        """The flags a resumed run must share with the run it continues."""
        return {k: v for k, v in asdict(self).items() if k not in ("resume", "device")}


def validate(opts: TrainOptions) -> Path:
    """Every check that needs no model: a mistake costs a second, not a model load."""
    from .encoders import ENCODERS

    def need(ok: bool, message: str):
        if not ok:
            raise UsageError(message)

    need(opts.embed_transform in TRANSFORMS, f"unknown --embed_transform {opts.embed_transform!r};"
         f" use one of: {', '.join(TRANSFORMS)}")
    need(opts.encoder in ENCODERS, f"unknown --encoder {opts.encoder!r}; use one of: "
         f"{', '.join(ENCODERS)}")
    need(opts.latent_len is None or opts.latent_len >= 1,
         f"--latent_len must be at least 1 (got {opts.latent_len})")
    need(opts.latent_len is not None or (opts.compression or 0) >= 1,
         f"--compression must be at least 1 (got {opts.compression}): it is text positions "
         "per latent")
    need(opts.encoder_lora >= 0, f"--encoder_lora must be >= 0, 0 for none (got {opts.encoder_lora})")
    need(not opts.encoder_lora or opts.encoder == "lm", "--encoder_lora adapts the reader of "
         f"--encoder lm; --encoder {opts.encoder} has none")
    need(opts.target_rms_scale > 0, f"--target_rms_scale must be > 0 (got {opts.target_rms_scale})")
    need(opts.nearest_k >= 1, f"--nearest_k must be at least 1 (got {opts.nearest_k})")
    need(0 <= opts.nearest_alpha <= 1, f"--nearest_alpha must be in [0, 1] (got {opts.nearest_alpha})")
    need(opts.anchor_eps >= 0, f"--anchor_eps must be >= 0 (got {opts.anchor_eps})")
    need(opts.codebook_size >= 2, f"--codebook_size must be at least 2 (got {opts.codebook_size})")
    need(opts.codebook_tau > 0, f"--codebook_tau must be > 0 (got {opts.codebook_tau})")
    need(opts.samples >= 1, f"--samples must be at least 1 (got {opts.samples})")
    need(opts.eval_samples >= 1, f"--eval_samples must be at least 1 (got {opts.eval_samples}); "
         "every epoch ends with an evaluation")
    need(opts.epochs >= 1, f"--epochs must be at least 1 (got {opts.epochs})")
    need(opts.batch_size >= 1, f"--batch_size must be at least 1 (got {opts.batch_size})")
    need(opts.samples >= opts.batch_size, f"--samples ({opts.samples}) is smaller than "
         f"--batch_size ({opts.batch_size}); lower the batch or train on more samples")
    need(1 <= opts.grad_accum_steps <= opts.batch_size, "--grad_accum_steps must be between 1 "
         f"and --batch_size (got {opts.grad_accum_steps})")
    need(opts.lr > 0 and math.isfinite(opts.lr), f"--lr must be a positive number (got {opts.lr})")
    need(opts.schedule in SCHEDULES, f"unknown --schedule {opts.schedule!r}; use one of: "
         f"{', '.join(SCHEDULES)}")
    need(opts.warmup_steps >= 0, f"--warmup_steps must be >= 0 (got {opts.warmup_steps})")
    need(opts.max_grad_norm >= 0, f"--max_grad_norm must be >= 0, 0 for no clipping "
         f"(got {opts.max_grad_norm})")
    for name in ("first_token_ce_weight", "kd_weight"):
        need(getattr(opts, name) >= 0, f"--{name} must be >= 0 (got {getattr(opts, name)})")
    need(opts.kd_tau > 0, f"--kd_tau must be > 0 (got {opts.kd_tau})")
    need(opts.save_every >= 0, f"--save_every must be >= 0, 0 for epoch ends only "
         f"(got {opts.save_every})")
    need(opts.max_new_tokens >= 1, f"--max_new_tokens must be at least 1 (got {opts.max_new_tokens})")
    need(opts.prompt in prompts.FORMATS, f"unknown --prompt {opts.prompt!r}; use one of "
         f"{', '.join(prompts.FORMATS)}")
    data.check_spec(opts.dataset)
    from .sweep import writable_dir

    out = writable_dir(opts.run_dir(), "--output_dir")
    last = checkpoint.existing(out / "checkpoints" / "last")
    if opts.resume:
        need(last is not None, f"--resume: {out} holds no checkpoint to resume "
             f"(no checkpoints/last); drop --resume to start a new run")
        saved = json.loads((out / "config.json").read_text(encoding="utf-8"))["options"]
        # A flag added after the run was made counts as its default there.
        default = asdict(TrainOptions())
        changed = sorted(k for k, v in opts.identity().items() if saved.get(k, default[k]) != v)
        need(not changed, f"--resume: {out} was made with other flags ("
             + ", ".join(f"--{k} {saved.get(k)} there, {getattr(opts, k)} now" for k in changed)
             + "); resume with the same flags or pick another --output_dir")
    else:
        need(last is None and not (out / "summary.json").exists(),
             f"{out} holds a run already; add --resume to continue it, or pick another "
             "--output_dir")
    return out


@dataclass
class Item:
    """One example, tokenised for training: what the encoder reads, the question kept as text
    (with --keep_question), and the answer to teach (the first gold answer, then a stop)."""
    example: data.Example
    span: list[int]
    question: list[int]
    answer: list[int]


def answer_ids(tokenizer, fmt: prompts.PromptFormat, answer: str) -> list[int]:
    joined = fmt.anchor_text and not fmt.anchor_text[-1].isspace()
    ids = tokenizer((" " if joined else "") + answer, add_special_tokens=False).input_ids
    return ids + [tokenizer.eos_token_id]


def encode_items(tokenizer, fmt, examples, keep_question: bool) -> list[Item]:
    items = []
    for e in examples:
        span, question = prompts.encode_span(tokenizer, fmt, e.context, e.question, keep_question)
        items.append(Item(e, span, question, answer_ids(tokenizer, fmt, e.answers[0])))
    return items


class NonFiniteLoss(Exception):
    """The loss, the latents or the updated weights stopped being finite numbers."""


def _distributed():
    """(rank, world size), joining torchrun's process group when there is one."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        import torch

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", "0")), world


def _checkpoint_layers(model) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them.
    Done by wrapping the layers, not with transformers' switch, which works only in train mode:
    the frozen model stays in eval mode (no dropout)."""
    from torch.utils.checkpoint import checkpoint as recompute
    from transformers.modeling_layers import GradientCheckpointingLayer

    from .encoders import RECOMPUTES

    setattr(model, RECOMPUTES, True)

    for layer in model.modules():
        # A model reused by a later run (a study's cells, a screen worker's trials) is wrapped
        # once: wrapping again would recompute each layer once more per wrap.
        if isinstance(layer, GradientCheckpointingLayer) and not hasattr(layer, "recomputed"):
            layer.recomputed = True
            forward = layer.forward
            layer.forward = (lambda f: lambda *a, **k: recompute(f, *a, use_reentrant=False,
                                                                 **k))(forward)


@dataclass
class State:
    """Where a run stands: saved in checkpoints/last/trainer_state.json."""
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress
    batch: int = 0  # its batches done
    elapsed: float = 0.0  # training seconds before this process
    epochs: list = field(default_factory=list)  # one entry per finished epoch
    best: dict | None = None
    references: dict | None = None


class Trainer:
    def __init__(self, opts: TrainOptions, out: Path, log=print, lm=None):
        import torch

        from .encoders import Compressor, transform_config
        from .generation import StopTokens
        from .sweep import provenance
        from .vocab import VocabSpace

        self.opts, self.out = opts, out
        self.rank, self.world = _distributed()
        self.log = log if self.rank == 0 else (lambda *a, **k: None)
        examples = data.load_all(opts.dataset, at_least=opts.samples + opts.eval_samples)
        self.split = data.split(examples, opts.samples, opts.eval_samples, opts.seed)
        if len(self.split.train) < opts.batch_size:
            raise UsageError(f"the training split holds {len(self.split.train)} examples, fewer "
                             f"than --batch_size {opts.batch_size}; lower the batch or use more data")
        self.lm = lm or models.load(opts.model_id, opts.device, opts.trust_remote_code)
        model, tok = self.lm.model, self.lm.tokenizer
        model.eval().requires_grad_(False)
        self.device = next(model.parameters()).device
        # Recomputed layers would append to a cache twice: with checkpointing the prefix goes
        # into every row instead of a shared cache.
        self.checkpointing = opts.gradient_checkpointing or self.device.type == "cuda"
        if self.checkpointing:
            _checkpoint_layers(model)
        self.fmt = prompts.make_format(tok, opts.prompt)
        self.embed = model.get_input_embeddings()
        self.vocab = VocabSpace.from_model(model, len(tok))
        prefix, _, anchor = prompts.encode(tok, self.fmt, "", "")
        self.prefix, self.anchor = self.embed_ids(prefix), self.embed_ids(anchor)
        self.train_items = encode_items(tok, self.fmt, self.split.train, opts.keep_question)
        self.eval_items = encode_items(tok, self.fmt, self.split.eval, opts.keep_question)
        self.stops = StopTokens(tok, model, self.embed.weight.shape[0])
        transform = TRANSFORMS[opts.embed_transform]
        flags = asdict(opts)
        self.spec = {
            "encoder": opts.encoder, "d_model": self.embed.weight.shape[1],
            "max_latents": max(len(i.span) for i in self.train_items + self.eval_items),
            "scale": float(self.vocab.mean_rms), "compression": opts.compression,
            "latent_len": opts.latent_len, "keep_question": opts.keep_question,
            "encoder_layer": opts.encoder_layer, "encoder_lora": opts.encoder_lora,
            "transform": {"name": transform, "config": transform_config(transform, flags)},
            "codebook_trainable": opts.codebook_trainable}
        torch.manual_seed(opts.seed)
        self.compressor = Compressor(self.spec, self.vocab, model).to(self.device)
        # The same first examples on every rank: each calibrates to identical statistics.
        calibration = self.train_items[:CALIBRATION_EXAMPLES]
        self.compressor.calibrate(self.embed_ids([t for i in calibration for t in i.span]),
                                  [len(i.span) for i in calibration])
        self.params = [p for p in self.compressor.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=opts.lr)
        self.provenance = provenance(opts, self.lm, self.fmt, self.split.eval, self.vocab)
        self.checkpoint_config = {
            "model": self.provenance["model"], "prompt_format": self.fmt.describe(),
            "compressor": self.spec, "trained_on": {"dataset": opts.dataset,
                                                    "samples": len(self.split.train)}}
        self.teacher = None
        self._prefix_kv = None

    # -- the graph --------------------------------------------------------------------------

    def embed_ids(self, ids: list[int]):
        import torch

        with torch.no_grad():
            return self.embed(torch.tensor(ids, dtype=torch.long, device=self.device))

    def latents(self, items: list[Item]):
        """(latents [M, d] float32, offsets, transform diagnostics) of the items' spans."""
        spans = self.embed_ids([t for i in items for t in i.span]).float()
        return self.compressor(spans, [len(i.span) for i in items])

    def loss(self, items: list[Item], teacher: list | None = None):
        """Sum over the items of each one's loss, and its parts, summed likewise."""
        import torch
        import torch.nn.functional as F

        from .generation import cache_argument

        o, dtype = self.opts, self.embed.weight.dtype
        z, offsets, _ = self.latents(items)
        cache = self.prefix_cache(len(items))
        lead = self.prefix if cache is None else self.prefix[:0]
        rows, targets, starts = [], [], []
        for n, item in enumerate(items):
            row = torch.cat([lead, z[offsets[n]:offsets[n + 1]].to(dtype),
                             self.embed_ids(item.question), self.anchor,
                             self.embed_ids(item.answer[:-1])])
            # The last anchor token predicts the first answer token, and so on.
            starts.append(row.shape[0] - len(item.answer))
            rows.append(row)
            targets += item.answer
        width = max(r.shape[0] for r in rows)
        # Right padding needs no mask: under causal attention no real token sees a pad.
        batch = torch.stack([F.pad(r, (0, 0, 0, width - r.shape[0])) for r in rows])
        at_row = torch.cat([torch.full((len(i.answer),), n) for n, i in enumerate(items)])
        at_col = torch.cat([torch.arange(s, s + len(i.answer)) for s, i in zip(starts, items)])
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            base = self.lm.model.base_model
            hidden = base(inputs_embeds=batch, use_cache=cache is not None,
                          **{cache_argument(base): cache}).last_hidden_state
            logits = self.lm.model.get_output_embeddings()(hidden[at_row, at_col]).float()
        target = torch.tensor(targets, device=logits.device)
        ce = F.cross_entropy(logits, target, reduction="none")
        first_at = torch.tensor([0] + [len(i.answer) for i in items[:-1]]).cumsum(0)
        sizes = torch.tensor([len(i.answer) for i in items], device=ce.device)
        segment = at_row.to(ce.device)
        per_item_ce = torch.zeros(len(items), device=ce.device).index_add(0, segment, ce) / sizes
        first = ce[first_at.to(ce.device)]
        total = per_item_ce + o.first_token_ce_weight * first
        parts = {"ce": float(per_item_ce.detach().sum()), "first_token_ce": float(first.detach().sum())}
        if teacher is not None:
            ids = torch.cat([t[0] for t in teacher]).to(ce.device)
            p = torch.softmax(torch.cat([t[1] for t in teacher]).to(ce.device) / o.kd_tau, -1)
            log_q = torch.log_softmax(logits / o.kd_tau, -1).gather(1, ids)
            kd = -(p * log_q).sum(-1) * o.kd_tau ** 2
            per_item_kd = torch.zeros_like(per_item_ce).index_add(0, segment, kd) / sizes
            total = total + o.kd_weight * per_item_kd
            parts["kd"] = float(per_item_kd.detach().sum())
        return total.sum(), parts

    def prefix_cache(self, rows: int):
        """The prompt prefix's keys and values, shared by every row: the prefix is the same
        constant text in every example and the model is frozen, so it is computed once per run
        and never enters the batch (on the bundled model, 37 of about 65 positions a row).
        None where the model's cache is not plain keys and values (sliding windows, recurrent
        state): the prefix then goes into every row."""
        import torch
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        from .generation import plain_kv, returned_cache

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
        import torch

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

    def _answer(self, prompts_: list) -> list[tuple[str, int]]:
        from .generation import generate

        return generate(self.lm.model, self.lm.tokenizer, prompts_, self.stops,
                        self.opts.max_new_tokens, prefix=self.prefix)

    def _score(self, items: list[Item], answers) -> dict:
        from .scoring import score_answers
        from .stats import bootstrap_ci

        predictions, means = score_answers([i.example for i in items], answers)
        return {**means, "ci": list(bootstrap_ci([p["f1"] for p in predictions])),
                "num_samples": len(predictions), "predictions": predictions}

    def evaluate(self) -> dict:
        """The latents' answers on the evaluation split, scored, with latent diagnostics."""
        import torch

        self.compressor.eval()
        dtype = self.embed.weight.dtype
        prompts_, lat_rows, text_rows, diag, latents_total = [], [], [], [], 0
        with torch.no_grad():
            for s in range(0, len(self.eval_items), 64):
                chunk = self.eval_items[s:s + 64]
                z, offsets, d = self.latents(chunk)
                diag.append(d)
                for n, item in enumerate(chunk):
                    prompts_.append(torch.cat([z[offsets[n]:offsets[n + 1]].to(dtype),
                                               self.embed_ids(item.question), self.anchor]))
                    # Positions the model reads for the content, both ways: with
                    # --keep_question the question is text on both sides.
                    m = int(offsets[n + 1] - offsets[n])
                    latents_total += m
                    lat_rows.append(m + len(item.question))
                    text_rows.append(len(item.span) + len(item.question))
                latent = z.float()
                sims, _ = self.vocab.topk(latent, 1)
                diag[-1] = {**d, "rms_over_vocab": float(
                    latent.pow(2).mean(1).sqrt().mean() / self.vocab.mean_rms),
                    "cosine_to_nearest_token": float(sims[:, 0].mean())}
        self.compressor.train()
        result = self._score(self.eval_items, self._answer(prompts_))
        keys = diag[0].keys()
        result["latent_diagnostics"] = {k: sum(d[k] for d in diag) / len(diag) for k in keys
                                        if isinstance(diag[0][k], (int, float))}
        result["compression_ratio"] = sum(t / m for t, m in zip(text_rows, lat_rows)) / len(lat_rows)
        result["latents_per_example"] = float(latents_total) / len(lat_rows)
        return result

    def references(self) -> dict:
        """The text itself, and the question with no context: the frame a latent F1 is read in."""
        import torch

        text, question = [], []
        for item in self.eval_items:
            e = item.example
            span, _ = prompts.encode_span(self.lm.tokenizer, self.fmt, e.context, e.question, False)
            text.append(torch.cat([self.embed_ids(span), self.anchor]))
            q = self.lm.tokenizer(self.fmt.question_text(e.question),
                                  add_special_tokens=False).input_ids
            question.append(torch.cat([self.embed_ids(q), self.anchor]))
        return {"text": self._score(self.eval_items, self._answer(text)),
                "question_only": self._score(self.eval_items, self._answer(question))}

    # -- the loop ---------------------------------------------------------------------------

    def batches(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches: a seeded order that depends on the epoch alone, so a
        resumed run sees exactly the batches it would have seen."""
        import torch

        gen = torch.Generator().manual_seed(self.opts.seed * 1000 + epoch)
        order = torch.randperm(len(self.train_items), generator=gen).tolist()
        b = self.opts.batch_size
        return [order[s:s + b] for s in range(0, len(order), b)]

    def learning_rate(self, step: int) -> float:
        """--lr after a linear warm-up of --warmup_steps, then constant or cosine to zero over
        the whole run; a function of the step alone, so a resumed run follows the same curve."""
        o = self.opts
        if step < o.warmup_steps:
            return o.lr * (step + 1) / o.warmup_steps
        if o.schedule == "cosine":
            total = len(self.batches(0)) * o.epochs
            progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
            return o.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return o.lr

    def step(self, batch: list[int], step: int = 0) -> dict:
        """Optimizer step number `step` (from 0) on a global batch: this rank's share, in
        grad_accum_steps micro-batches, gradients summed over ranks; the loss is the batch mean."""
        import torch
        import torch.distributed as dist

        o = self.opts
        mine = batch[self.rank::self.world]
        size = -(-len(mine) // o.grad_accum_steps) if mine else 1
        self.optimizer.zero_grad(set_to_none=True)
        totals = {"loss": 0.0}
        for s in range(0, len(mine), size):
            micro = [self.train_items[i] for i in mine[s:s + size]]
            teacher = [self.teacher[i] for i in mine[s:s + size]] if self.teacher else None
            try:
                loss, parts = self.loss(micro, teacher)
            except NonFiniteError:  # the compressor's latents are already NaN or inf
                raise NonFiniteLoss
            (loss / len(batch)).backward()
            totals["loss"] += float(loss.detach())
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        keys = sorted(totals)
        sums = torch.tensor([totals[k] for k in keys], dtype=torch.float64)
        if self.world > 1:
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat)
            dist.all_reduce(sums)
            grads = list(flat.split([g.numel() for g in grads]))
        for p, g in zip(self.params, grads):
            p.grad = g.view_as(p)
        metrics = {k: float(v) / len(batch) for k, v in zip(keys, sums)}
        if not math.isfinite(metrics["loss"]):
            raise NonFiniteLoss
        norm = torch.nn.utils.clip_grad_norm_(
            self.params, o.max_grad_norm if o.max_grad_norm > 0 else float("inf"))
        lr = self.learning_rate(step)
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
        if which == "last":
            checkpoint.save(folder, weights, self.checkpoint_config,
                            self.optimizer.state_dict(), asdict(state))
        else:
            checkpoint.save(folder, weights, self.checkpoint_config)

    def restore(self) -> State:
        weights, _, optimizer, saved = checkpoint.load_training(
            checkpoint.existing(self.out / "checkpoints" / "last"))
        self.compressor.load_state_dict({k: v.to(self.device) for k, v in weights.items()})
        self.optimizer.load_state_dict(optimizer)
        return State(**saved)


def write_split(examples, path: Path) -> None:
    """The evaluation split as a dataset file: sweeping a checkpoint on it (`--dataset`) measures
    the latents on entities the encoder never trained on, as the run's own evaluation does."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps({"id": e.id, "title": e.group, "context": e.context,
                                       "question": e.question, "answers": list(e.answers)}) + "\n"
                           for e in examples), encoding="utf-8")
    os.replace(tmp, path)


def _metrics_log(path: Path, keep_until_step: int):
    """metrics.jsonl, opened for appending, without any line written after the checkpoint being
    resumed (those steps are about to run again) or cut off by a kill."""
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


def _write_line(fh, row: dict) -> None:
    fh.write(json.dumps(row) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def summary(trainer: Trainer, state: State, status: str, wall: float) -> dict:
    refs = state.references or {}
    last = state.epochs[-1]["eval"] if state.epochs else None

    def brief(r):
        return {k: r[k] for k in ("f1", "em", "empty_rate", "ci")} if r else None

    return {
        "status": status,
        "encoder": trainer.opts.encoder, "transform": trainer.spec["transform"],
        "compression_ratio": last["compression_ratio"] if last else None,
        "latents_per_example": last["latents_per_example"] if last else None,
        "keep_question": trainer.opts.keep_question,
        "final": {**brief(last), "latent_diagnostics": last["latent_diagnostics"]} if last else None,
        "best": state.best,
        "references": {k: brief(v) for k, v in refs.items()},
        "epochs": [{k: v for k, v in e.items() if k != "eval"} for e in state.epochs],
        "steps": state.step, "train_seconds": round(state.elapsed, 1), "wall_seconds": round(wall, 1),
        "trainable_parameters": sum(p.numel() for p in trainer.params),
        "split": trainer.split.describe(),
        "checkpoints": {"last": "checkpoints/last", "best": "checkpoints/best"},
    }


def run(opts: TrainOptions, log=print, lm=None, on_epoch=None) -> int:
    """Train (or resume) one run; returns the exit code: 0, or 1 when the loss went non-finite.
    Bad input raises UsageError before the model loads. `on_epoch(entry)` is called after each
    evaluation, once its checkpoints and summary are on disk (a screen reports to Tune there)."""
    import torch

    from . import report
    from .sweep import write_json

    started = time.time()
    out = validate(opts)
    trainer = Trainer(opts, out, log, lm)
    log = trainer.log  # silent on every rank but 0
    main = trainer.rank == 0
    state = trainer.restore() if opts.resume else State()
    if main and not opts.resume:
        write_json(out / "config.json", {"options": opts.identity(), "provenance": trainer.provenance,
                                         "split": trainer.split.describe(),
                                         "compressor": trainer.spec})
        write_split(trainer.split.eval, out / "eval_split.jsonl")
    metrics = _metrics_log(out / "metrics.jsonl", state.step) if main else None
    if opts.kd_weight > 0:
        log("distillation: the frozen model reads the text of every training example once")
        trainer.teacher = trainer.teacher_targets()
    if main and state.references is None:
        log(f"references on {len(trainer.eval_items)} entity-disjoint evaluation examples ...")
        state.references = trainer.references()
        r = state.references
        log(f"  text F1 {r['text']['f1']:.3f}   question only F1 {r['question_only']['f1']:.3f}")
        write_json(out / "references.json", r)
    batches_per_epoch = len(trainer.batches(0))
    total_steps = batches_per_epoch * opts.epochs
    log(f"training {opts.encoder} ({sum(p.numel() for p in trainer.params):,} parameters) + "
        f"{trainer.spec['transform']['name']} into {opts.model_id} on {trainer.device}: "
        f"{len(trainer.train_items)} examples x {opts.epochs} epoch(s), {total_steps} steps of "
        f"{opts.batch_size}, {trainer.world} process(es) -> {out}")
    bar = None
    if main and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=state.step, unit="step", dynamic_ncols=True)
    every = max(1, batches_per_epoch // 10)
    code = 0
    try:
        while state.epoch < opts.epochs:
            epoch_start, loss_sum, seen = time.time(), 0.0, 0
            batches = trainer.batches(state.epoch)
            while state.batch < len(batches):
                t0 = time.time()
                try:
                    m = trainer.step(batches[state.batch], state.step)
                except NonFiniteLoss:
                    print(f"error: the loss became non-finite at step {state.step + 1} (epoch "
                          f"{state.epoch + 1}); stopped. checkpoints/last (step {state.step} or "
                          "earlier) is kept: lower --lr, then --resume", file=sys.stderr)
                    code = 1
                    break
                state.step, state.batch = state.step + 1, state.batch + 1
                state.elapsed += time.time() - t0
                n = len(batches[state.batch - 1])
                loss_sum, seen = loss_sum + m["loss"] * n, seen + n
                rate = n / max(time.time() - t0, 1e-9)
                if main:
                    _write_line(metrics, {"type": "step", "step": state.step,
                                          "epoch": state.epoch + 1, **m, "examples_per_s": rate})
                    eta = (total_steps - state.step) * state.elapsed / max(state.step, 1)
                    if bar is not None:
                        bar.set_postfix(loss=f"{m['loss']:.3f}", ex_s=f"{rate:.1f}")
                        bar.update(1)
                    elif state.step % every == 0:
                        log(f"step {state.step}/{total_steps}  epoch {state.epoch + 1}  loss "
                            f"{m['loss']:.3f}  {rate:.1f} ex/s  eta {eta / 60:.1f} min")
                if opts.save_every and state.step % opts.save_every == 0 and main:
                    trainer.save("last", state)
            if code:
                break
            state.epoch, state.batch = state.epoch + 1, 0
            if main:
                t0 = time.time()
                result = trainer.evaluate()
                entry = {"epoch": state.epoch, "step": state.step,
                         "train_loss": loss_sum / seen if seen else None,
                         "eval_f1": result["f1"], "eval_em": result["em"],
                         "eval_ci": result["ci"], "seconds": round(time.time() - epoch_start, 1),
                         "eval_seconds": round(time.time() - t0, 1), "eval": result}
                state.epochs.append(entry)
                write_json(out / "eval" / f"epoch{state.epoch}.json", result)
                _write_line(metrics, {"type": "eval", "step": state.step, "epoch": state.epoch,
                                      **{k: v for k, v in result.items() if k != "predictions"}})
                if state.best is None or result["f1"] > state.best["f1"]:
                    state.best = {"epoch": state.epoch, "f1": result["f1"], "em": result["em"]}
                    trainer.save("best", state)
                trainer.save("last", state)
                write_json(out / "summary.json", summary(trainer, state, "running",
                                                         time.time() - started))
                report.plot_training(out)
                log(f"epoch {state.epoch}/{opts.epochs}: train loss {entry['train_loss']:.3f}  "
                    f"eval F1 {result['f1']:.3f} [{result['ci'][0]:.3f}, {result['ci'][1]:.3f}]"
                    f"  EM {result['em']:.3f}  empty {result['empty_rate']:.0%}  "
                    f"({result['compression_ratio']:.1f}x fewer positions)")
                if on_epoch is not None:
                    on_epoch(entry)
            if trainer.world > 1:
                torch.distributed.barrier()
    finally:
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
    if main and state.epochs:
        final = summary(trainer, state, "failed" if code else "finished", time.time() - started)
        write_json(out / "summary.json", final)
        log(render(final))
    if trainer.world > 1:
        torch.distributed.destroy_process_group()
    return code


def render(s: dict) -> str:
    """The run against its frame: the text and the question alone, on the same examples."""
    def row(name, r):
        if not r:
            return f"  {name:<16} -"
        return (f"  {name:<16} F1 {r['f1']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]  "
                f"EM {r['em']:.3f}")
    lines = [f"{s['encoder']} + {s['transform']['name']}, "
             f"{s['compression_ratio']:.2f}x fewer positions than the text:",
             row("latents (final)", s["final"]),
             row("text itself", s["references"].get("text")),
             row("question only", s["references"].get("question_only"))]
    if s["final"] and s["references"].get("question_only"):
        floor = s["references"]["question_only"]["ci"][1]
        if s["final"]["ci"][1] <= floor or s["final"]["f1"] <= s["references"]["question_only"]["f1"]:
            lines.append("  The latents do no better than the question alone: they carry no "
                         "usable content from the context.")
    if s["encoder"] == "constant":
        lines.append("  This is the control: latents of other encoders count only where they "
                     "beat it at the same budget.")
    else:
        lines.append("  Compare with --encoder constant at the same budget: a trained prefix "
                     "counts only if it beats one that never sees the context.")
    return "\n".join(lines)
