"""What transforms the embeddings: each transformation's code (declared in experiments.TRANSFORMS)
and what each one did.

A transform sees `TransformInputs`: the real source positions of every example, packed into one
[N, d] float32 tensor, with `offsets` saying which rows belong to which example. Padding and the
untransformed parts of the prompt are never in it, so they can never enter a transform or its
statistics, and no result can depend on how the engine later batches the examples.
"""

import hashlib
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import experiments
from .vocab import VocabSpace

EPS = 1e-8


@dataclass
class TransformInputs:
    x: torch.Tensor  # [N, d] float32: every example's source span, concatenated
    offsets: torch.Tensor  # [E + 1]: example i owns rows offsets[i]:offsets[i + 1]
    vocab: VocabSpace
    search_k: int = 10  # one search at this depth serves every nearest_k / anchor experiment
    # Training's own codes for soft_codebook, by (size, seed): learned parameters that replace
    # the vocabulary's k-means codes they were initialised from.
    codebooks: dict | None = None
    _neighbours: tuple | None = field(default=None, repr=False)

    def codebook(self, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, temperature scale): the trained codes where training supplies them."""
        _, scale = self.vocab.codebook(size, seed)
        if self.codebooks and (size, seed) in self.codebooks:
            return self.codebooks[(size, seed)], scale
        return self.vocab.codebook(size, seed)

    def neighbours(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cosine similarities, ids) of the k nearest vocabulary rows of each position."""
        if self._neighbours is None or self._neighbours[0].shape[1] < min(k, self.vocab.size):
            self.search_k = max(self.search_k, k)
            self._neighbours = self.vocab.topk(self.x, self.search_k)
        sims, ids = self._neighbours
        return sims[:, :k], ids[:, :k]

    def segment_ids(self) -> torch.Tensor:
        lengths = self.offsets[1:] - self.offsets[:-1]
        return torch.repeat_interleave(torch.arange(len(lengths), device=self.x.device),
                                       lengths.to(self.x.device))


class _StraightThrough(torch.autograd.Function):
    """The value of y with the gradient of x: how training passes a gradient through a step that
    has none (the snap to a vocabulary row)."""

    @staticmethod
    def forward(ctx, x, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def transform(name: str):
    """Marks a function as the code of the transform declared as `name` in experiments.TRANSFORMS,
    and refuses a declaration that names other code: the two cannot drift apart. (The mark is
    part of the source that code_version hashes, as it always was.)"""
    def mark(fn):
        declared = experiments.TRANSFORMS[name].function
        if declared != f"{fn.__module__}:{fn.__name__}":
            raise TypeError(f"transform {name!r} is declared as {declared}, not as "
                            f"{fn.__module__}:{fn.__name__}")
        return fn
    return mark


def code_version(name: str) -> str:
    """A hash of the transform's code and of what every transform stands on (the vocabulary
    space: its statistics, search and codebooks; the packed inputs): a change to any of them
    invalidates the results made with the old code."""
    from . import vocab

    parts = [inspect.getsource(experiments.TRANSFORMS[name].load()),
             inspect.getsource(TransformInputs), inspect.getsource(vocab)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


@transform("identity")
def identity(inp: TransformInputs):
    return inp.x, {}


@transform("rms_matching")
def rms_matching(inp: TransformInputs, target_scale: float):
    """Set every position's RMS to target_scale x the vocabulary's mean RMS."""
    rms = inp.x.pow(2).mean(dim=1, keepdim=True).sqrt()
    target = target_scale * inp.vocab.mean_rms
    return inp.x * (target / rms.clamp_min(EPS)), {"target_rms": float(target)}


@transform("batch_distribution")
def batch_distribution(inp: TransformInputs):
    """Standardise each feature over the example's own positions, then give it the vocabulary's
    per-feature mean and std (batch normalisation where the batch is one example)."""
    seg = inp.segment_ids()
    n_seg = len(inp.offsets) - 1
    counts = (inp.offsets[1:] - inp.offsets[:-1]).to(inp.x).unsqueeze(1).clamp_min(1)
    mean = torch.zeros(n_seg, inp.x.shape[1], device=inp.x.device).index_add_(0, seg, inp.x) / counts
    centred = inp.x - mean[seg]
    var = torch.zeros_like(mean).index_add_(0, seg, centred.pow(2)) / counts
    standard = centred / (var.sqrt()[seg] + 1e-5)
    return standard * inp.vocab.std + inp.vocab.mean, {}


@transform("nearest_k")
def nearest_k(inp: TransformInputs, k: int, alpha: float, temperature: float = 0.1):
    """alpha x input + (1 - alpha) x a convex combination of its k nearest vocabulary rows
    (exact cosine top-k, weights softmax(cosine / temperature))."""
    found, ids = inp.neighbours(k)
    rows = inp.vocab.table[ids]
    # The search picks the neighbours; their cosines are computed again here, from x, so that
    # training gets a gradient through the soft weights (the search itself has none).
    sims = torch.einsum("nd,nkd->nk", F.normalize(inp.x, dim=1), rows) / inp.vocab.norms[ids]
    weights = torch.softmax(sims / temperature, dim=1)
    projection = torch.einsum("nk,nkd->nd", weights, rows)
    return alpha * inp.x + (1 - alpha) * projection, {"mean_top1_cosine": float(found[:, 0].mean())}


@transform("anchor_offset")
def anchor_offset(inp: TransformInputs, eps: float):
    """Nearest vocabulary row (by cosine) plus the residual, clipped to eps x the anchor's norm.

    A position within the bound is returned as it is, bit for bit: on real token embeddings the
    residual is zero and the transform is an exact no-op, which the diagnostics then report.
    In training the snap passes the gradient straight through, as if it were the identity.
    """
    _, ids = inp.neighbours(1)
    anchor = inp.vocab.table[ids[:, 0]]
    x = inp.x.detach()
    delta = x - anchor
    limit = eps * anchor.norm(dim=1, keepdim=True)
    size = delta.norm(dim=1, keepdim=True)
    clipped = anchor + delta * (limit / size.clamp_min(EPS))
    out = torch.where(size <= limit, x, clipped)
    if inp.x.requires_grad:
        out = _StraightThrough.apply(inp.x, out)
    return out, {"fraction_clipped": float((size > limit).float().mean())}


@transform("soft_codebook")
def soft_codebook(inp: TransformInputs, size: int, tau: float, seed: int = 0, chunk: int = 4096):
    """Replace each position by a soft mixture of `size` k-means codes of the vocabulary.

    Weights are softmax(-||x - c||^2 / (tau x D)), with D the vocabulary's median gap between
    the nearest and second-nearest code (see VocabSpace.codebook): tau is relative to the
    embedding scale, so tau near 1 keeps a handful of codes in play, not one (tau -> 0) or all of
    them (tau -> inf). On SmolLM2-135M, tau in {0.7, 1.0} gives perplexities of 4 to 32.
    """
    codes, scale = inp.codebook(size, seed)
    c_sq = codes.pow(2).sum(dim=1)
    out, entropy, usage = [], [], torch.zeros(size, device=inp.x.device)
    for s in range(0, inp.x.shape[0], chunk):
        x = inp.x[s:s + chunk]
        d2 = (x.pow(2).sum(dim=1, keepdim=True) - 2 * x @ codes.T + c_sq).clamp_min(0)
        w = torch.softmax(-d2 / (tau * scale), dim=1)
        out.append(w @ codes)
        w = w.detach()
        entropy.append(-(w * torch.log(w.clamp_min(1e-30))).sum(dim=1))
        usage += w.sum(dim=0)
    usage = usage / usage.sum()
    return torch.cat(out), {
        "assignment_perplexity": float(torch.cat(entropy).exp().mean()),
        "code_usage_perplexity": float(torch.exp(-(usage * torch.log(usage.clamp_min(1e-30))).sum())),
    }


class NonFiniteError(ValueError):
    pass


def apply(name: str, inp: TransformInputs, config: dict) -> tuple[torch.Tensor, dict]:
    """Run a transform, refuse non-finite output, and measure what it did to its input."""
    out, extra = experiments.TRANSFORMS[name].load()(inp, **config)
    bad = (~torch.isfinite(out)).sum().item()
    if bad:
        raise NonFiniteError(f"transform {name} produced {bad} non-finite values (NaN/inf) in "
                             f"{out.numel()}; nothing was generated from them")
    return out, {**diagnostics(inp.x.detach(), out.detach()), **extra}


def diagnostics(x: torch.Tensor, y: torch.Tensor) -> dict:
    changed = (x != y).any(dim=1)
    return {
        "norm_ratio": float((y.norm(dim=1) / x.norm(dim=1).clamp_min(EPS)).mean()),
        "cosine_to_input": float(F.cosine_similarity(y, x, dim=1, eps=EPS).mean()),
        "fraction_changed": float(changed.float().mean()),
        "max_abs_delta": float((y - x).abs().max()) if x.numel() else 0.0,
        "identical_to_input": bool(not changed.any()),
    }
