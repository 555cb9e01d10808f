"""A cache press whose scores are learned from the training questions, query-agnostic.

The field's query-agnostic presses guess which of a context's keys and values later questions
will need from the context alone: ExpectedAttention from statistics of the queries to come,
Knorm from key norms. This press learns that guess. For every training paragraph the frozen
reader reads the instruction and the paragraph once; then each of the paragraph's training
questions, with the answer anchor and the answer, is read after it, and the attention those
positions pay each context position is recorded, per layer and key-value head (averaged over
the positions and the query heads sharing the key). Its logarithm, centred over the paragraph,
is the target; the feature is what the layer's attention reads at that position (the input a
kvpress press's `score` receives). A ridge regression per layer, solved in closed form on all
the paragraphs at once, maps one to the other. At answer time the press scores a new paragraph
from its own features alone, before any question, and keeps the best 1/R per head as every
press here does (`field.context_only`).
The mean over a paragraph's questions is taken before the logarithm, so the target depends on
how many questions each paragraph has: fit on all of them (on Qwen, about two per paragraph
scored 0.05 F1 below five; docs/results/learned.md).
"""

import copy
import json
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from ..data import grouped
from ..errors import UsageError
from ..field import Press, adapt_kvpress, budget, context_only
from ..generation import cache_argument

# Ridge of the regression: the held-out rank correlation of Qwen2.5-Coder-0.5B's fit on 297
# SQuAD paragraphs was 0.814 at 10 and 100, 0.813 at 1,000 and 0.808 at 10,000.
RIDGE = 100.0
FLOOR = 1e-4  # attention below this is "not read": the logarithm's floor
# Tails read in one batch from copies of the paragraph's cache: one tail at a time spent most
# of the fit in passes of a few dozen positions; 16 bounds the attention weights kept at once.
TAILS_AT_ONCE = 16


class Scores:
    """kvpress's scorer interface over fitted weights [layers, width, key-value heads]: each
    position's score per head is its attention input times that layer's weights."""

    def __init__(self, weights: torch.Tensor):
        self.weights = weights

    def post_init_from_model(self, model) -> None:
        pass

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        w = self.weights[module.layer_idx].to(hidden_states.device)
        return torch.einsum("bnd,dg->bgn", hidden_states.detach().float(), w)


@dataclass
class LearnedPress(Press):
    """The press, with the weights `fit` leaves; query-agnostic in either setting."""
    name: str = "learned"
    query_aware: bool | None = False
    weights: torch.Tensor | None = field(default=None, repr=False)
    fitted: dict = field(default_factory=dict)  # what the fit read, for the run's record

    def reads_question(self, aware: bool) -> bool:
        return False

    def describe(self) -> dict:
        return {"press": "LearnedPress (latentwire.training.learned_press)",
                "applied_to": "the context's positions only",
                "settings": {"ridge": RIDGE, "floor": FLOOR, **self.fitted}}

    def make(self, prefix: int, context: int, question: int, ratio: float, aware: bool,
             reader=None):
        if self.weights is None:
            raise UsageError("--encoder kvpress:learned has not been fitted: it learns its "
                             "scores from the training questions; pass --samples N")
        adapt_kvpress()
        from kvpress.presses.base_press import BasePress

        return context_only(BasePress)(Scores(self.weights), prefix, prefix + context,
                                       budget(context, ratio))

    def state(self) -> tuple[dict, dict]:
        """(tensors, string metadata) of the fitted press: what `restore` reads back."""
        return {"weights": self.weights}, {"fitted": json.dumps(self.fitted)}

    def restore(self, tensors: dict, metadata: dict) -> bool:
        """Whether `state`'s tensors and metadata were read back (not another file's)."""
        if "weights" not in tensors or "fitted" not in metadata:
            return False
        self.weights, self.fitted = tensors["weights"], json.loads(metadata["fitted"])
        return True

    def fit(self, model, paragraphs: list[tuple], autocast=None, on_read=None) -> None:
        """Fits the weights on `paragraphs`: (prefix, context, [tail, ...]) embeddings, each tail
        what follows the context when a question is asked of it. `on_read(1)` after each."""
        fitted, questions = fit(model, paragraphs, autocast, on_read)
        self.weights = fitted
        self.fitted = {"paragraphs": len(paragraphs), "questions": questions}


@contextmanager
def eager_attention(model):
    """The model with attention computed in plain torch, which returns its weights."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@contextmanager
def attention_inputs(model):
    """A list that fills, per layer in order, with what each attention module reads."""
    got = []

    def keep(module, args, kwargs):
        got.append((kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach())

    hooks = [layer.self_attn.register_forward_pre_hook(keep, with_kwargs=True)
             for layer in model.base_model.layers]
    try:
        yield got
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def observed(model, prefix, context, tails,
             at_once: int = TAILS_AT_ONCE) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [layers, context, width], attention [layers, kv heads, context]) of one
    paragraph: the attention inputs at its positions, and the attention its tails pay them,
    averaged over the tails' positions, the query heads of each key and the tails. The
    paragraph is read once; its tails read on from copies of its cache, `at_once` at a
    time, each padded at its end to the longest: under the causal mask a tail's own positions
    never see its padding, so only those positions are averaged."""
    from transformers import DynamicCache

    config, base = model.config, model.base_model
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    start, end = len(prefix), len(prefix) + len(context)
    cache, name = DynamicCache(config=config), cache_argument(base)
    with attention_inputs(model) as got:
        base(inputs_embeds=torch.cat([prefix, context])[None], use_cache=True, **{name: cache})
    features = torch.stack([g[0, start:end].float() for g in got])
    paid = 0
    with eager_attention(model):
        for first in range(0, len(tails), at_once):
            some = tails[first:first + at_once]
            lengths = torch.tensor([len(t) for t in some], device=some[0].device)
            width = int(lengths.max())
            rows = torch.stack([torch.nn.functional.pad(t, (0, 0, 0, width - len(t)))
                                for t in some])
            shared = copy.deepcopy(cache)
            shared.batch_repeat_interleave(len(some))
            at = torch.arange(end, end + width, device=rows.device).expand(len(some), -1)
            out = base(inputs_embeds=rows, position_ids=at, use_cache=True,
                       output_attentions=True, **{name: shared})
            # [tails, 1, width, 1]: 1/length at a tail's own positions, 0 at its padding
            mean = ((torch.arange(width, device=rows.device) < lengths[:, None])
                    / lengths[:, None])[:, None, :, None]
            a = torch.stack([(w[:, :, :, start:end].float() * mean).sum(2)
                             for w in out.attentions])  # [layers, tails, heads, context]
            paid = paid + a.view(len(a), len(some), groups, heads // groups, -1).mean(3).sum(1)
    return features, paid / len(tails)


def target(attention: torch.Tensor) -> torch.Tensor:
    """What the regression predicts of a paragraph's attention: its logarithm, centred over
    the paragraph per layer and head (only the order within one paragraph matters)."""
    y = torch.log(attention + FLOOR)
    return y - y.mean(-1, keepdim=True)


def fit(model, paragraphs: list[tuple], autocast=None, on_read=None,
        at_once: int = TAILS_AT_ONCE) -> tuple[torch.Tensor, int]:
    """(weights [layers, width, kv heads], questions read): the ridge regression from a
    position's attention input, centred over its paragraph, to its `target`, over every
    position of every paragraph, by its normal equations."""
    xtx = xty = None
    questions = 0
    for prefix, context, tails in paragraphs:
        with autocast() if autocast else nullcontext():
            features, attention = observed(model, prefix, context, tails, at_once)
        x = (features - features.mean(1, keepdim=True)).double()
        y = target(attention).double()
        gram, cross = torch.einsum("lnd,lne->lde", x, x), torch.einsum("lnd,lgn->ldg", x, y)
        xtx = gram if xtx is None else xtx + gram
        xty = cross if xty is None else xty + cross
        questions += len(tails)
        if on_read:
            on_read(1)
    eye = RIDGE * torch.eye(xtx.shape[-1], dtype=xtx.dtype, device=xtx.device)
    # One layer at a time: a batched solve of these sizes fails inside oneMKL here.
    weights = torch.stack([torch.linalg.solve(a + eye, b) for a, b in zip(xtx, xty)])
    return weights.float(), questions


def paragraphs_of(items, embed, prefix, rest, questions: int = 0) -> list[tuple]:
    """The training items grouped by their context, in first-seen order: (prefix, context,
    [tail of each question]) embeddings, `rest(item)` giving an item's tail. With `questions`,
    only the first paragraphs, whole, until they hold at least that many."""
    chosen, held = [], 0
    for span, group in grouped(items, lambda item: tuple(item.span)).items():
        if questions and held >= questions:
            break
        chosen.append((span, group))
        held += len(group)
    return [(prefix, embed(list(span)), [rest(i) for i in group]) for span, group in chosen]
