"""Where the embeddings come from: the model's own token embeddings, or controlled corruptions of
them, or a trained encoder/adapter checkpoint.

`text` asks "does a transform hurt?"; the corrupted sources ask the question the tool exists for,
"can a transform fix an encoder's off-distribution embeddings?". Every source is seeded and
deterministic per example (noise depends on the run seed and the example id, never on batching).

A spec is `name` or `name:param`, e.g. `scaled:120`, `noisy:0.89`, `adapter:ckpt.pt`.
"""

import hashlib
import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from .errors import UsageError


@dataclass
class SourceInputs:
    text: torch.Tensor  # [N, d] float32: the model's own embeddings of the source span
    token_ids: torch.Tensor  # [N]
    offsets: torch.Tensor  # [E + 1]
    example_ids: list[str]
    vocab_mean_norm: float
    seed: int


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
# Adapters: the interface for a researcher's own encoder. A checkpoint is a torch file holding
# {"format": "latentwire-adapter", "version": 1, "kind": <ADAPTERS key>, "d_model": int,
#  "state_dict": ...}. Training writes one with `save_adapter`; `adapter:PATH` reads it.

class Encoder(Protocol):
    def __call__(self, token_ids: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Given the source span's token ids [N] and their text embeddings [N, d], return the
        embeddings [N, d] (the model's width) that the frozen model should read."""


class LinearAdapter(torch.nn.Module):
    """An affine map of the text embeddings: the smallest encoder worth training."""

    def __init__(self, d_model: int):
        super().__init__()
        self.proj = torch.nn.Linear(d_model, d_model)

    def forward(self, token_ids, text_embeds):
        return self.proj(text_embeds)


ADAPTERS = {"linear": LinearAdapter}


def save_adapter(module: torch.nn.Module, kind: str, d_model: int, path) -> None:
    torch.save({"format": "latentwire-adapter", "version": 1, "kind": kind, "d_model": d_model,
                "state_dict": module.state_dict()}, path)


def load_adapter(path: str, d_model: int) -> Encoder:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"adapter checkpoint {path} does not exist")
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UsageError(f"adapter checkpoint {path} cannot be read ({type(err).__name__}); "
                         "write it with latentwire.sources.save_adapter")
    if not isinstance(ckpt, dict) or ckpt.get("format") != "latentwire-adapter":
        raise UsageError(f"adapter checkpoint {path} is not a latentwire adapter; "
                         "write it with latentwire.sources.save_adapter")
    if ckpt["kind"] not in ADAPTERS:
        raise UsageError(f"adapter checkpoint {path} has unknown kind {ckpt['kind']!r}; "
                         f"known: {', '.join(ADAPTERS)}")
    if ckpt["d_model"] != d_model:
        raise UsageError(f"adapter checkpoint {path} outputs width {ckpt['d_model']} but the "
                         f"model reads width {d_model}")
    module = ADAPTERS[ckpt["kind"]](d_model)
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()


def _adapter(inp: SourceInputs, path: str):
    encoder = load_adapter(path, inp.text.shape[1])
    with torch.no_grad():
        return encoder(inp.token_ids.cpu(), inp.text.cpu()).float().to(inp.text.device)


SOURCES = {s.name: s for s in [
    Source("text", _text, None, str, "the model's own token embeddings (the seed's input)"),
    Source("scaled", _scaled, 120.0, float, "text x F (default 120: the logged magnitude mismatch)"),
    Source("noisy", _noisy, 0.89, float,
           "text + orthogonal Gaussian noise, cosine C to the text (default 0.89: the logged value)"),
    Source("mismatch", _mismatch, None, str, "noisy:0.89 then scaled:120: both logged symptoms"),
    Source("shift", _shift, 1.0, float, "text + one constant offset of S x the mean token norm"),
    Source("rotated", _rotated, None, str, "a seeded random rotation of embedding space"),
    Source("adapter", _adapter, None, str, "embeddings from a trained adapter checkpoint (PATH)"),
]}


@dataclass(frozen=True)
class SourceSpec:
    source: Source
    param: object
    spec: str  # as the user wrote it, normalised

    @property
    def dirname(self) -> str:
        if self.source.name == "adapter":
            return f"adapter_{Path(str(self.param)).stem}"
        return self.spec.replace(":", "_")

    def config(self) -> dict:
        return {"name": self.source.name, "param": self.param}

    def build(self, inp: SourceInputs) -> torch.Tensor:
        return self.source.build(inp, self.param).float()


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
        if name == "adapter" and not Path(arg).is_file():
            raise UsageError(f"adapter checkpoint {arg} does not exist")
        spec = name if param is None else f"{name}:{param}"
        if spec not in [o.spec for o in out]:
            out.append(SourceSpec(source, param, spec))
    if not out:
        raise UsageError("--source is empty; use e.g. --source text")
    return out


def code_version(name: str) -> str:
    """A hash of the source's code and of the module's functions it calls (mismatch calls
    noisy; adapter calls load_adapter): results made before any of them changed are redone."""
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
    """What a source did to the text embeddings: the figures the logged symptoms are stated in."""
    return {"norm_ratio": float((out.norm(dim=1) / text.norm(dim=1).clamp_min(1e-8)).mean()),
            "cosine_to_text": float(F.cosine_similarity(out, text, dim=1).mean())}
