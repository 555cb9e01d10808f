"""The field's training-free compressors, beside which every learned latent is measured: what
each keeps of an example's context at a ratio R, in the reader's own tokens.

Two kinds. A token compressor keeps some of the context's tokens (as text): the controls
`truncate` and `random_tokens`, and Microsoft's LLMLingua and LongLLMLingua (`llmlingua`),
which score tokens with a small causal LM, here the reader itself. A cache press keeps some of
the context's keys and values after the reader has read all of it: NVIDIA's kvpress presses,
applied to the context's positions only (the instruction before it and the question after it
are kept whole), so that a budget of ceil(N / R) means the same thing for every compressor.

Neither package is reimplemented: LLMLingua's `PromptCompressor` compresses, and each press's
own `score` ranks the positions; what is ours is the budget and where it applies.
"""

import bisect
import copy
import functools
import logging
import math
import random
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from unittest import mock

import torch

from .errors import UsageError
from .generation import answer_from_caches, cache_argument, plain_kv


def budget(n: int, ratio: float) -> int:
    """Context positions kept at ratio R: ceil(N / R), at least one."""
    return max(1, min(n, math.ceil(n / ratio)))


@dataclass
class FieldCompressor:
    """A training-free compressor. `query_aware`: True when it reads the question, False when
    it never does, None when it reads it where the setting allows (a press that observes the
    question only if the question is read before the cache is pruned). `seed`: the run's, for
    those that draw at random."""
    seed: int = 0
    query_aware: bool | None = False

    def describe(self) -> dict:
        """What a run records of it: its settings beside its name."""
        return {}


def reads_question(compressor, keep_question: bool) -> bool:
    """Whether what is kept of a context (and an encoder's states over it) depends on the
    question: only where the setting lets the question be read (no --keep_question) and the
    compressor reads it."""
    return not keep_question and compressor is not None and compressor.query_aware is True


# -- token compressors -------------------------------------------------------------------------

class TokenCompressor(FieldCompressor):
    def select(self, spans: list[list[int]], contexts: list[str], questions: list[str],
               ratio: float, tokenizer, model_id: str) -> list[list[int]]:
        """The kept tokens of each span (the context as the reader's `tokenizer` gives it; the
        same context as text; the question)."""
        raise NotImplementedError


class Extractive(TokenCompressor):
    """A token compressor that keeps some of the span's own tokens as they are: where each kept
    token stood is known, which an encoder that reads the whole context around them needs."""

    def positions(self, spans, contexts, questions, ratio, tokenizer,
                  model_id) -> list[list[int]]:
        """Each span's kept positions, ascending."""
        raise NotImplementedError

    def select(self, spans, contexts, questions, ratio, tokenizer, model_id):
        kept = self.positions(spans, contexts, questions, ratio, tokenizer, model_id)
        return [[span[i] for i in at] for span, at in zip(spans, kept)]


class Truncate(Extractive):
    """The first ceil(N / R) tokens of the context."""

    def positions(self, spans, contexts, questions, ratio, tokenizer, model_id):
        return [list(range(budget(len(span), ratio))) for span in spans]


class Stride(Extractive):
    """One token in every R, spread over the whole context: the last token of each of ceil(N / R)
    near-equal chunks, so every part of the context has a kept token near it (with `truncate`
    the last three quarters have none at 4x)."""

    def positions(self, spans, contexts, questions, ratio, tokenizer, model_id):
        out = []
        for span in spans:
            n, k = len(span), budget(len(span), ratio)
            out.append([(j + 1) * n // k - 1 for j in range(k)])
        return out


class RandomTokens(Extractive):
    """ceil(N / R) of the context's tokens drawn at random (seeded per example), in order."""

    def positions(self, spans, contexts, questions, ratio, tokenizer, model_id):
        return [sorted(random.Random(self.seed * 1_000_003 + n).sample(
            range(len(span)), budget(len(span), ratio))) for n, span in enumerate(spans)]

    def describe(self) -> dict:
        return {"seed": self.seed}


_WORD = re.compile(r"\w+")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


@dataclass
class Sentences(Extractive):
    """Extractive selection with no model: the context's sentences ranked by the question's
    words they hold, each word weighted by how few of the paragraph's sentences hold it
    (log(1 + S / df), so words every sentence shares count for little, without a stop list),
    taken whole in that order (ties: the earlier) while they fit in ceil(N / R) tokens; the
    first that does not fit gives its window of that many tokens holding the most weight.
    Kept in the context's order."""
    query_aware: bool = True

    def describe(self) -> dict:
        return {"unit": "sentence", "weight": "log(1 + sentences / sentences holding the word)",
                "overflow": "the heaviest window of the first sentence that does not fit"}

    def positions(self, spans, contexts, questions, ratio, tokenizer, model_id):
        return [self._one(span, context, question, budget(len(span), ratio), tokenizer)
                for span, context, question in zip(spans, contexts, questions)]

    @staticmethod
    def _one(span: list[int], context: str, question: str, keep: int, tokenizer) -> list[int]:
        encoded = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
        if encoded.input_ids != list(span):
            raise UsageError("--encoder sentences needs the context's tokens to be the reader's "
                             "tokenisation of its text; this tokenizer gives another")
        ends = [m.end() for m in _SENTENCE_END.finditer(context)]
        # A token's (or word's) sentence is the one its first character falls in.
        sentence = [bisect.bisect_right(ends, start) for start, _ in encoded.offset_mapping]
        words = [(m.start(), m.end(), m.group().lower()) for m in _WORD.finditer(context)]
        word_sentence = [bisect.bisect_right(ends, start) for start, _, _ in words]
        count = max(sentence) + 1
        holders: dict[str, set] = {}
        for (_, _, w), s in zip(words, word_sentence):
            holders.setdefault(w, set()).add(s)
        # Sorted: summed in a fixed order, level sentences stay level in every process (a set's
        # order follows the process's hash seed, and float sums follow their order).
        asked = sorted({w.lower() for w in _WORD.findall(question)} & holders.keys())
        weight = {w: math.log(1 + count / len(holders[w])) for w in asked}
        score = [sum(weight[w] for w in asked if s in holders[w]) for s in range(count)]
        # A token carries the weight of the heaviest asked word it overlaps.
        heavy = [(a, b, weight[w]) for a, b, w in words if w in weight]
        token_weight = [max([v for a, b, v in heavy if a < end and b > start], default=0.0)
                        for start, end in encoded.offset_mapping]
        kept: list[int] = []
        for s in sorted(range(count), key=lambda s: (-score[s], s)):
            room = keep - len(kept)
            if room == 0:
                break
            members = [i for i, t in enumerate(sentence) if t == s]
            if len(members) > room:
                best = max(range(len(members) - room + 1),
                           key=lambda j: (sum(token_weight[i] for i in members[j:j + room]), -j))
                members = members[best:best + room]
            kept += members
        return sorted(kept)


class _PairCache:
    """LLMLingua's scorer, as llmlingua 0.2.2 expects a model to be: it hands the model, and
    slices, a cache as one [keys, values] pair per layer, which transformers 5 no longer takes
    or returns (it wants a Cache object, and iterating one yields more than two tensors). With
    that, every prompt longer than one of its windows failed or came back whole."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, input_ids, attention_mask=None, past_key_values=None, **kwargs):
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer, (keys, values) in enumerate(past_key_values or []):
            cache.update(keys, values, layer)
        kwargs.update(use_cache=True, **{cache_argument(self.model): cache})
        out = self.model(input_ids, attention_mask=attention_mask, **kwargs)
        out.past_key_values = plain_kv(cache)
        return out


class _ReaderCount:
    """Stands in for LLMLingua's OpenAI tokenizer (tiktoken's cl100k_base, which it downloads
    when it starts): token budgets are counted in the reader's own tokens, which is what the
    study's ratio means, and nothing is fetched."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str, **_) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids


@dataclass
class Relay(TokenCompressor):
    """A text compressor's output passed on as text: `inner` compresses each context once, in
    the source model's tokens (LLMLingua scoring with the source model), and the reader reads
    that text in its own tokens, at most ceil(N / R) of them for the source's N: the position
    budget latents made from the source's tokens would have. The honest competitor of a latent
    message between two model families. Read by the source itself, it is `inner` exactly."""
    inner: TokenCompressor = None
    source_tokenizer: object = field(default=None, repr=False)
    source_id: str = ""

    def __post_init__(self):
        self.query_aware = self.inner.query_aware

    def describe(self) -> dict:
        return {"relay_from": self.source_id, "compressor": self.inner.describe(),
                "budget": "ceil(N / R) of the source's N context tokens, counted in the "
                          "reader's own tokens of the compressed text, cut to it"}

    def select(self, spans, contexts, questions, ratio, tokenizer, model_id):
        source = self.source_tokenizer
        theirs = [source(c, add_special_tokens=False).input_ids for c in contexts]
        kept = self.inner.select(theirs, contexts, questions, ratio, source, self.source_id)
        if model_id == self.source_id:
            return kept
        return [tokenizer(source.decode(k), add_special_tokens=False).input_ids[
                    :budget(len(t), ratio)] for k, t in zip(kept, theirs)]


WINDOW = 32  # LLMLingua's window in tokens: see LLMLingua.select


@dataclass
class LLMLingua(TokenCompressor):
    """LLMLingua (query-agnostic) or, with `query_aware`, LongLLMLingua (its question-conditioned
    ranking and token filter), scored by the reader model, loaded from its local folder. Its
    output is cut to the exact budget in the reader's tokens when it runs over (LLMLingua's own
    budget is approximate)."""
    query_aware: bool = False
    _compressor: object = field(default=None, repr=False)

    def describe(self) -> dict:
        return {"llmlingua": _version("llmlingua"), "scorer": "the reader model",
                "method": "longllmlingua" if self.query_aware else "llmlingua",
                "budget": "target_token = ceil(N / R) reader tokens, cut to it",
                "iterative_size": WINDOW}

    def _load(self, tokenizer, model_id: str):
        if self._compressor is None:
            try:
                from llmlingua import PromptCompressor
            except ImportError:
                raise UsageError("--encoder llmlingua/longllmlingua needs llmlingua: "
                                 "pip install 'latentwire[field]'")
            from .models import resolve

            with mock.patch("tiktoken.encoding_for_model",
                            lambda _: _ReaderCount(tokenizer)):
                self._compressor = PromptCompressor(
                    resolve(model_id), device_map="cpu",
                    model_config={"trust_remote_code": False})
            self._compressor.model = _PairCache(self._compressor.model)
        return self._compressor

    def select(self, spans, contexts, questions, ratio, tokenizer, model_id):
        compressor, out = self._load(tokenizer, model_id), []
        count = _ReaderCount(tokenizer)
        for span, context, question in zip(spans, contexts, questions):
            keep = budget(len(span), ratio)
            # Its window (iterative_size, 200 tokens by default) must be shorter than the
            # context: on a shorter one its window arithmetic keeps every token. A SQuAD
            # paragraph is 100-250 reader tokens.
            args = {"use_context_level_filter": False, "iterative_size": WINDOW}
            if self.query_aware:
                args.update(question=question, rank_method="longllmlingua",
                            condition_in_question="after_condition", condition_compare=True,
                            concate_question=False)
            text = compressor.compress_prompt([context], target_token=keep, **args)[
                "compressed_prompt"]
            kept = count.encode(text)
            # Cut to the budget, the rest of a compression that ran over it. A text hardly
            # shorter is no compression at all (what its window arithmetic gives a context
            # shorter than the window), and cutting it would be `truncate` under its name.
            if ratio >= 2 and len(kept) > 0.9 * len(span):
                raise UsageError(
                    f"{'longllmlingua' if self.query_aware else 'llmlingua'} returned "
                    f"{len(kept)} of the context's {len(span)} tokens at --compression "
                    f"{ratio:g}: llmlingua {_version('llmlingua')} did not compress it with "
                    f"this model as its scorer; no result is recorded under its name")
            out.append(kept[:keep])
        return out


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


# -- cache presses -----------------------------------------------------------------------------

# kvpress's presses by our name: its class, and the settings a short paragraph needs where its
# defaults assume thousands of positions (each recorded in the run's config).
PRESSES = {
    "snapkv": "SnapKVPress",
    "expected_attention": "ExpectedAttentionPress",
    "tova": "TOVAPress",
    "knorm": "KnormPress",
    "streaming_llm": "StreamingLLMPress",
    "random": "RandomPress",
    "kvzip": "KVzipPress",
}
SNAPKV_WINDOW = 8  # query-agnostic: the context's last positions observe the rest (64 by default)


@dataclass
class Press(FieldCompressor):
    """A kvpress press on the context's positions. Query-aware where the setting lets the
    question be read before the cache is pruned (it then observes it: SnapKV's window is the
    question, TOVA's query its last position); agnostic otherwise, as kvpress's own pipeline."""
    name: str = "snapkv"
    query_aware: bool | None = None

    def settings(self, prefix: int, question: int, aware: bool) -> dict:
        """The press's settings for one prompt: `prefix` positions before the context,
        `question` after it in the same pass (0 when agnostic)."""
        if self.name == "snapkv":
            return {"window_size": question if aware else SNAPKV_WINDOW}
        if self.name == "streaming_llm":
            return {"n_sink": prefix}  # the instruction is the sink: the context's last positions stay
        if self.name == "random":
            return {"seed": self.seed}
        return {}

    def describe(self) -> dict:
        return {"kvpress": _version("kvpress"), "press": PRESSES[self.name],
                "applied_to": "the context's positions only",
                "settings": {"snapkv": f"window_size: the question's positions (aware), "
                                       f"{SNAPKV_WINDOW} (agnostic)",
                             "streaming_llm": "n_sink: the positions before the context",
                             "random": f"seed {self.seed}",
                             "kvzip": "kvpress defaults; the repetition is asked for with the "
                                      "prompt's anchor; query-agnostic in either setting"
                             }.get(self.name, "kvpress defaults")}

    def reads_question(self, aware: bool) -> bool:
        """Whether it reads the question before pruning in a setting (`aware`): where the
        setting allows it and the press can use it (KVzip never does)."""
        return aware and self.query_aware is not False

    def make(self, prefix: int, context: int, question: int, ratio: float, aware: bool,
             reader=None):
        """The press for one prompt of prefix + context (+ question when aware) positions.
        `reader`: what KVzip, which has the reader repeat the context, needs of it (Repeat)."""
        try:
            import kvpress
            from kvpress.presses.base_press import BasePress
        except ImportError:
            raise UsageError(f"--encoder kvpress:{self.name} needs kvpress: make install "
                             "installs it (see docs/compression.md, the field's compressors)")
        adapt_kvpress()
        keep = budget(context, ratio)
        total = prefix + context + question
        if self.name == "kvzip":
            # It warns at every construction that it costs 2-3 prefills; the study's seconds
            # per answer says what it costs here.
            logging.getLogger("kvpress.presses.kvzip_press").setLevel(logging.ERROR)
            return _kvzip_context_only(kvpress.KVzipPress)(
                compression_ratio=(context - keep) / total, start=prefix, end=prefix + context,
                keep=keep, reader=reader)
        inner = getattr(kvpress, PRESSES[self.name])(
            compression_ratio=(context - keep) / total, **self.settings(prefix, question, aware))
        return context_only(BasePress)(inner, prefix, prefix + context, keep)


@dataclass
class Repeat:
    """What KVzip reads of the prompt to have the reader repeat its context: the prompt's
    token ids up to the context's end, the ids it asks for an answer with (our prompt's
    anchor, where kvpress takes its chat template's turn), and the reader's tokenizer."""
    ids: list[int]
    suffix: list[int]
    tokenizer: object


def _keep_context(keys, values, scores, start: int, end: int, keep: int):
    """The keys and values with, per head, only the `keep` best-scored positions of
    [start, end) and every other position, in their order."""
    scores = scores.float().clone()
    scores[..., :start] = math.inf
    scores[..., end:] = math.inf
    kept = keys.shape[2] - (end - start) + keep
    index = scores.topk(kept, dim=-1).indices.sort(dim=-1).values
    index = index.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
    return keys.gather(2, index).contiguous(), values.gather(2, index).contiguous()


@functools.cache  # once per process, before the first press: every press class exists then
def adapt_kvpress() -> None:
    """Lets kvpress 0.5.5's presses run on this transformers (5.x; kvpress was written for
    < 5.3), which renamed the cache argument from `past_key_values` to `cache` and no longer
    passes `cache_position`, read by the presses only to tell a prefill from a later pass.
    Every press class's forward_hook is given both again (the positions being those the pass
    wrote into the layer's cache), and a press that replaces the model's forward while it is
    on (KVzip) receives the cache under the name it reads. A transformers that still passes
    them is left alone. `make kvpress-tests` runs kvpress's own suite with this
    applied, the way the presses run here."""
    import kvpress  # noqa: F401  (registers every press class)
    from kvpress.presses.base_press import BasePress

    def classes(cls):
        yield cls
        for sub in cls.__subclasses__():
            yield from classes(sub)

    for cls in set(classes(BasePress)):
        hook, call = cls.__dict__.get("forward_hook"), cls.__dict__.get("__call__")
        if hook is not None:
            cls.forward_hook = _with_hook_arguments(hook)
        if call is not None:
            cls.__call__ = _with_cache_renamed(call)


def _with_hook_arguments(hook):
    def forward_hook(self, module, inputs, kwargs, output):
        if "past_key_values" not in kwargs:
            kwargs = _hook_arguments(module, kwargs)
        return hook(self, module, inputs, kwargs, output)

    return forward_hook


def _with_cache_renamed(call):
    @contextmanager
    def renamed(self, model):
        before = model.model.__dict__.get("forward")
        with call(self, model):
            installed = model.model.__dict__.get("forward")
            if installed is not before:  # the press's own forward, which reads past_key_values

                def forward(*args, **kwargs):
                    if "cache" in kwargs:
                        kwargs["past_key_values"] = kwargs.pop("cache")
                    return installed(*args, **kwargs)

                model.model.forward = forward
            yield

    return renamed


def _hook_arguments(module, kwargs: dict) -> dict:
    passed = kwargs["hidden_states"].shape[1]
    cache = kwargs.get("cache")
    end = cache.get_seq_length(module.layer_idx) if cache is not None else passed
    return {"past_key_values": cache, "cache_position": torch.arange(end - passed, end),
            **kwargs}


@functools.cache  # one class per press base, not one per prompt
def context_only(base):
    @dataclass
    class ContextOnly(base):
        """Prunes `inner`'s lowest-scored positions among [start, end) down to `keep`, every
        other position kept; the kept ones stay in their order."""
        inner: object = None
        start: int = 0
        end: int = 0
        keep: int = 0

        def post_init_from_model(self, model):
            self.inner.post_init_from_model(model)

        def compress(self, module, hidden_states, keys, values, attentions, kwargs):
            scores = self.inner.score(module, hidden_states, keys, values, attentions, kwargs)
            return _keep_context(keys, values, scores, self.start, self.end, self.keep)

    return ContextOnly


@functools.cache
def _kvzip_context_only(base):
    @dataclass
    class ContextKVzip(base):
        """kvpress's KVzip on [start, end) alone: the reader reads the prompt, then repeats the
        context after it (kvpress's own passes and scores: each position's highest attention
        from the repetition), and the `keep` best-scored context positions per head are kept,
        every other position with them. kvpress itself spreads its budget over layers and
        heads and masks rather than prunes; ours is the same per head for every press."""
        start: int = 0
        end: int = 0
        keep: int = 0
        reader: Repeat | None = None

        @contextmanager
        def __call__(self, model):
            cache = {}
            forward, name = model.model.forward, cache_argument(model.model)

            def read(*args, **kwargs):
                # The prefill's cache, which the repetition extends; kvpress 0.5.5 hands it on
                # as `past_key_values`, transformers' name for it before 5.3 (5.40 drops it).
                if "past_key_values" in kwargs:
                    kwargs[name] = kwargs.pop("past_key_values")
                cache.setdefault("prompt", kwargs.get(name))
                return forward(*args, **kwargs)

            model.model.forward = read
            try:
                yield
                if len(self.reader.ids) != self.end:
                    raise ValueError(f"KVzip was given {len(self.reader.ids)} prompt ids for a "
                                     f"prompt whose context ends at position {self.end}")
                self._context_ids = torch.tensor([self.reader.ids])
                self._cache, self.prefix_length = cache["prompt"], self.start
                self._suffix_ids = torch.tensor([self.reader.suffix])
                self._perform_kvzip_compression(model, self.reader.tokenizer)
            finally:
                model.model.forward = forward
                self._reset_internal_parameters()

        def compress_post(self, model):
            for layer in model.model.layers:
                i = int(layer.self_attn.layer_idx)
                kept = self._cache.layers[i]
                kept.keys, kept.values = _keep_context(
                    kept.keys, kept.values, self.score_val[i], self.start, self.end, self.keep)

    return ContextKVzip


@torch.no_grad()
def answer_pressed(model, prompts: list[tuple], press: Press, ratio: float, aware: bool,
                   stops, max_new_tokens: int, repeats: list | None = None,
                   on_pressed=None) -> list[list[int]]:
    """Greedy answer tokens for each prompt (prefix, context, question, anchor), as embeddings:
    the reader reads prefix + context (+ question when aware, and the press does not refuse
    it) under the press, which prunes the context's keys and values, one prompt at a time;
    then the rest and the answer, at their true positions, the prompts decoding together.
    `repeats`: each prompt's Repeat, for KVzip. `on_pressed(1)` after each prompt's pressing, the
    slow part. Where the question is not read under the press, a prompt whose prefix, context
    and Repeat equal an earlier one's (another question on the same paragraph) reads a copy of
    that pruned cache: the pass would give the same one."""
    aware = press.reads_question(aware)
    caches, positions, rests = [], [], []
    for n, (prefix, context, question, anchor) in enumerate(prompts):
        repeat = repeats[n] if repeats else None
        same = next((m for m in range(n) if not aware and _same_pass(prompts[m], prompts[n])
                     and (not repeats or repeats[m] == repeat)), None)
        if same is not None:
            # A copy: each cache grows by its own prompt's rest.
            cache, position = copy.deepcopy(caches[same]), positions[same]
        else:
            cache, position = pressed(model, prefix, context, question if aware else None,
                                      press, ratio, repeat)
        caches.append(cache)
        positions.append(position)
        rests.append(torch.cat(([] if aware else [question]) + [anchor]))
        if on_pressed:
            on_pressed(1)
    return answer_from_caches(model, caches, positions, rests, stops, max_new_tokens)


def _same_pass(a: tuple, b: tuple) -> bool:
    return all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a[:2], b[:2]))


def pressed(model, prefix, context, question, press: Press, ratio: float, repeat=None):
    """The cache of prefix + context (+ `question`, for a press that observes it) as the press
    leaves it, and the position the next token takes (the prompt's length: what was pruned
    keeps its place). Under autograd where the caller is: the kept keys and values carry the
    gradient to the context."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    first = torch.cat([prefix, context] + ([question] if question is not None else [])).to(device)
    cache = DynamicCache(config=model.config)
    with press.make(len(prefix), len(context), len(question) if question is not None else 0,
                    ratio, question is not None, repeat)(model):
        model(inputs_embeds=first[None], use_cache=True, **{cache_argument(model): cache})
    return cache, first.shape[0]
