"""Where the embeddings come from: the model's own token embeddings, or controlled corruptions of
them, or a trained encoder/adapter checkpoint.

`text` asks "does a transform hurt?"; the corrupted sources ask the question the tool exists for,
"can a transform fix an encoder's off-distribution embeddings?". Every source is seeded and
deterministic per example (noise depends on the run seed and the example id, never on batching).

A spec is `name` or `name:param`, e.g. `scaled:120`, `noisy:0.89`,
`adapter:runs/train/pool/checkpoints/best`.
"""

import hashlib
import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .. import models, prompts, provenance
from ..errors import UsageError
from ..training import checkpoint
from ..training.encoders import build
from ..training.spec import CompressorSpec
from ..vocab import VocabSpace


@dataclass
class SourceInputs:
    text: torch.Tensor  # [N, d] float32: the model's own embeddings of the source span
    token_ids: torch.Tensor  # [N]
    offsets: torch.Tensor  # [E + 1]
    example_ids: list[str]
    vocab_mean_norm: float
    seed: int
    # What a trained encoder needs besides the text: the examples themselves, to tokenise them
    # as its training did, and the model it must have been trained for.
    examples: list | None = None
    tokenizer: object = None
    fmt: object = None
    embed: object = None
    model: object = None  # the frozen model: an `lm` encoder reads with it
    vocab: object = None
    model_sha: str | None = None


@dataclass
class Latents:
    """What a source gives the transforms: rows, which rows are whose, and what follows each
    example's rows as text (a question kept out of the encoder), if anything."""
    x: torch.Tensor  # [M, d]
    offsets: torch.Tensor  # [E + 1]
    suffixes: list | None = None  # E tensors [Q_i, d], untransformed


@dataclass(frozen=True)
class Source:
    name: str
    build: Callable  # (SourceInputs, param) -> [N, d]
    default: object  # the parameter used when the spec gives none
    parse: Callable  # str -> param
    description: str


def _example_generator(seed: int, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _text(inp: SourceInputs, _):
    return inp.text


def _scaled(inp: SourceInputs, factor: float):
    return inp.text * factor


def _noisy(inp: SourceInputs, cosine: float):
    """Add Gaussian noise orthogonal to each position, sized so its cosine to the original is
    exactly `cosine`: ||noise|| = ||x|| tan(arccos(cosine))."""
    if not 0 < cosine <= 1:
        raise UsageError(f"noisy:C needs 0 < C <= 1 (got {cosine})")
    out = inp.text.clone()
    for i, key in enumerate(inp.example_ids):
        s, e = int(inp.offsets[i]), int(inp.offsets[i + 1])
        x = inp.text[s:e]
        noise = torch.randn(x.shape, generator=_example_generator(inp.seed, key)).to(x)
        unit = F.normalize(x, dim=1)
        noise = noise - (noise * unit).sum(dim=1, keepdim=True) * unit
        scale = x.norm(dim=1, keepdim=True) * math.tan(math.acos(cosine))
        out[s:e] = x + F.normalize(noise, dim=1) * scale
    return out


def _mismatch(inp: SourceInputs, _):
    return _noisy(inp, 0.89) * 120.0


def _shift(inp: SourceInputs, size: float):
    """One constant offset for every position: a seeded direction, `size` x the mean token norm."""
    direction = torch.randn(inp.text.shape[1], generator=_example_generator(inp.seed, "shift"))
    return inp.text + F.normalize(direction, dim=0).to(inp.text) * size * inp.vocab_mean_norm


def _rotated(inp: SourceInputs, _):
    """A seeded random orthogonal rotation of embedding space: norms kept, directions scrambled."""
    d = inp.text.shape[1]
    gauss = torch.randn(d, d, generator=_example_generator(inp.seed, "rotation"), dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    q = q * torch.sign(torch.diagonal(r))  # makes the rotation Haar-uniform
    return inp.text @ q.to(inp.text)


# ---------------------------------------------------------------------------------------------
# Trained encoders: `adapter:PATH` replays a checkpoint folder written by `latentwire train`
# (PATH is e.g. runs/train/<run>/checkpoints/best). Its latents are what the frozen model read in
# training: the encoder's output after the run's own transform, M rows per example, fewer than
# the text's; the sweep's experiments then transform those rows again.

#
# A checkpoint of an encoder shared by several models holds an adapter per model: each model
# is given the latents through its own, and the text is read as in training, by the reader's
# tokenizer, prompt format and model (loaded here when it is not the model swept).

@dataclass
class _Reader:
    model: object
    tokenizer: object
    fmt: object
    embed: object
    vocab: object
    swept: bool  # the model swept reads the text itself: its own embeddings are the spans


def _which_adapter(inp: SourceInputs, path: str, config: dict) -> int:
    """The adapter of the model swept, refused in one line when the checkpoint has none."""
    entries = checkpoint.answerers(config)
    if "answerers" not in config:
        width = CompressorSpec.from_json(config["compressor"]).d_model
        if width != inp.text.shape[1]:
            raise UsageError(f"checkpoint {path} writes latents of width {width} but the model "
                             f"reads width {inp.text.shape[1]}: it was trained for another model "
                             f"({config['model']['id']}); pass that --model_id")
        if inp.model_sha and config["model"]["config_sha256"] != inp.model_sha:
            raise UsageError(f"checkpoint {path} was trained for model {config['model']['id']} "
                             "(another configuration than the model loaded); pass that --model_id")
        return 0
    widths = CompressorSpec.from_json(config["compressor"]).adapters
    mine = [i for i, (e, w) in enumerate(zip(entries, widths))
            if (e["model"]["config_sha256"] == inp.model_sha if inp.model_sha
                else w == inp.text.shape[1])]
    if not mine:
        raise UsageError(f"checkpoint {path} has no adapter for the model loaded; it has one "
                         f"for each of {', '.join(e['model']['id'] for e in entries)}: pass one of "
                         "those --model_id")
    return mine[0]


def _reader(inp: SourceInputs, path: str, config: dict) -> _Reader:
    """The model that reads the text for the encoder: the one swept, or the checkpoint's
    reader, loaded on the same device."""
    there = checkpoint.reader(config)
    if "reader" not in config or there["model"]["config_sha256"] == inp.model_sha:
        return _Reader(inp.model, inp.tokenizer, inp.fmt, inp.embed, inp.vocab, True)
    lm = models.load(there["model"]["id"], inp.text.device.type)
    if provenance.sha(lm.model.config.to_dict())[:16] != there["model"]["config_sha256"]:
        raise UsageError(f"checkpoint {path} reads the text with {there['model']['id']}, which "
                         "now loads another configuration; the checkpoint cannot be replayed")
    fmt = prompts.make_format(lm.tokenizer, there["prompt_format"]["name"])
    return _Reader(lm.model, lm.tokenizer, fmt, lm.model.get_input_embeddings(),
                   VocabSpace.from_model(lm.model, len(lm.tokenizer)), False)


def _adapter(inp: SourceInputs, path: str) -> "Latents":
    weights, config = checkpoint.load(path)
    index = _which_adapter(inp, path, config)
    fmt = checkpoint.answerers(config)[index]["prompt_format"]
    if inp.fmt is not None and fmt != inp.fmt.describe():
        raise UsageError(f"checkpoint {path} was trained with the {fmt['name']}"
                         f" prompt format; pass --prompt {fmt['name']}")
    spec = CompressorSpec.from_json(config["compressor"])
    if spec.field:  # its evaluation is `train`'s, or benchmarks/answer_time.py's
        raise UsageError(f"checkpoint {path} was trained on what --encoder {spec.encoder} keeps "
                         "of each context, which this source does not select: it would read "
                         "whole contexts; score it with `latentwire train --samples 0` or "
                         "benchmarks/answer_time.py")
    reader = _reader(inp, path, config)
    compressor = build(spec, reader.vocab, reader.model, {index: inp.vocab})
    # Only the swept model's adapter is built: the others' weights are not its business.
    compressor.load_state_dict({k: v for k, v in weights.items() if not k.startswith("adapters.")
                                or k.startswith(f"adapters.{index}.")})
    compressor.to(inp.text.device).eval()
    keep_question = spec.keep_question
    x, lengths, suffixes = inp.text, (inp.offsets[1:] - inp.offsets[:-1]).tolist(), None
    if keep_question or not reader.swept:
        spans = [prompts.encode_span(reader.tokenizer, reader.fmt, e.context, e.question,
                                     keep_question)[0] for e in inp.examples]
        with torch.no_grad():
            embed = lambda module, ids: module(torch.tensor(ids, device=inp.text.device)).float()
            x = embed(reader.embed, [t for span in spans for t in span])
            if keep_question:  # the question follows as text, in the swept model's own tokens
                suffixes = [embed(inp.embed, prompts.encode_span(
                    inp.tokenizer, inp.fmt, e.context, e.question, True)[1]) for e in inp.examples]
        lengths = [len(span) for span in spans]
    with torch.no_grad():
        ((z, offsets, _),) = compressor.per_model(x, lengths)
    return Latents(z, offsets, suffixes)


SOURCES = {s.name: s for s in [
    Source("text", _text, None, str, "the model's own token embeddings (the seed's input)"),
    Source("scaled", _scaled, 120.0, float, "text x F (default 120: the logged magnitude mismatch)"),
    Source("noisy", _noisy, 0.89, float,
           "text + orthogonal Gaussian noise, cosine C to the text (default 0.89: the logged value)"),
    Source("mismatch", _mismatch, None, str, "noisy:0.89 then scaled:120: both logged symptoms"),
    Source("shift", _shift, 1.0, float, "text + one constant offset of S x the mean token norm"),
    Source("rotated", _rotated, None, str, "a seeded random rotation of embedding space"),
    Source("adapter", _adapter, None, str,
           "latents from a `latentwire train` checkpoint folder (PATH), fewer rows than the text"),
]}


@dataclass(frozen=True)
class SourceSpec:
    source: Source
    param: object
    spec: str  # as the user wrote it, normalised

    @property
    def dirname(self) -> str:
        if self.source.name == "adapter":
            # runs/train/attn4/checkpoints/best -> adapter_attn4_best
            parts = [p for p in Path(str(self.param)).resolve().parts[-3:] if p != "checkpoints"]
            return "adapter_" + "_".join(parts)
        return self.spec.replace(":", "_")

    def config(self) -> dict:
        """What results made from this source depend on; for a checkpoint, its content, so a
        new checkpoint written to the same path is swept again."""
        if self.source.name == "adapter":
            return {"name": "adapter", "param": self.param,
                    "checkpoint_sha256": checkpoint.digest(self.param)}
        return {"name": self.source.name, "param": self.param}

    def build(self, inp: SourceInputs) -> Latents:
        out = self.source.build(inp, self.param)
        if isinstance(out, Latents):
            return Latents(out.x.float(), out.offsets, out.suffixes)
        return Latents(out.float(), inp.offsets)


def parse(specs: str) -> list[SourceSpec]:
    out = []
    for raw in (s.strip() for s in specs.split(",")):
        if not raw:
            continue
        name, _, arg = raw.partition(":")
        if name not in SOURCES:
            raise UsageError(f"unknown source {name!r}; use one of: {', '.join(SOURCES)} "
                             "(e.g. --source text,mismatch)")
        source = SOURCES[name]
        if name == "adapter" and not arg:
            raise UsageError("adapter needs a checkpoint path: --source adapter:PATH")
        if arg and source.default is None and name != "adapter":
            raise UsageError(f"source {name} takes no parameter (got {raw!r})")
        try:
            param = source.parse(arg) if arg else source.default
        except ValueError:
            raise UsageError(f"source {name} needs a number after ':' (got {raw!r})")
        if name == "adapter":
            if not Path(arg).exists():
                raise UsageError(f"adapter checkpoint {arg} does not exist; pass a folder "
                                 "such as runs/train/<run>/checkpoints/best")
            checkpoint.read_config(arg)
        spec = name if param is None else f"{name}:{param}"
        if spec not in [o.spec for o in out]:
            out.append(SourceSpec(source, param, spec))
    if not out:
        raise UsageError("--source is empty; use e.g. --source text")
    return out


def code_version(name: str) -> str:
    """A hash of the source's code and of this module's functions it calls (mismatch calls
    noisy, for one): results made before any of them changed are redone. An adapter's results
    also carry the checkpoint's own digest (SourceSpec.config), so retrained weights are redone."""
    seen, todo, parts = set(), [SOURCES[name].build], []
    while todo:
        fn = todo.pop()
        if fn in seen:
            continue
        seen.add(fn)
        parts.append(inspect.getsource(fn))
        todo += [globals()[n] for n in fn.__code__.co_names
                 if inspect.isfunction(globals().get(n)) and globals()[n].__module__ == __name__]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def effect(text: torch.Tensor, out: torch.Tensor) -> dict:
    """What a source did to the text embeddings: the figures the logged symptoms are stated in.
    Latents with fewer rows than the text have no row to compare with: their mean norm is set
    against the text's, and the compression is stated instead of a cosine."""
    if out.shape != text.shape:
        return {"norm_ratio": float(out.norm(dim=1).mean() / text.norm(dim=1).mean()),
                "cosine_to_text": None, "compression_ratio": text.shape[0] / max(1, out.shape[0])}
    return {"norm_ratio": float((out.norm(dim=1) / text.norm(dim=1).clamp_min(1e-8)).mean()),
            "cosine_to_text": float(F.cosine_similarity(out, text, dim=1).mean())}
