"""Which encoders exist, as data: each one's name, what it does, whether it reads with a model,
and where its code is. The parsers of `train`, `study` and `screen` read this, so it imports no
torch; a run imports an encoder's class (training/encoders.py) when it builds one."""

from dataclasses import dataclass

from ..registry import Registry, load


@dataclass(frozen=True)
class EncoderEntry:
    description: str
    implementation: str  # "package.module:Class", an nn.Module built as Class(d_model, max_latents, scale, ...)
    needs_model: bool = False  # reads the span with a copy of a model (gets model, vocab, layer, lora)
    # A training-free compressor of the field (latentwire/field.py), as "module:Class" and its
    # keyword arguments: it decides what is kept of the context at --compression, and the
    # encoder (pool) then reads what it kept one position per latent, the identity until it
    # trains: the small trained adapter the uncompressed reference has.
    field: str | None = None
    field_args: tuple = ()
    needs_question: bool = False  # query-aware by nature: it has no query-agnostic use
    # Reads the frozen model's states over the whole context at the positions its (extractive)
    # field compressor kept: the trainer computes them once per example and passes them.
    reads_states: bool = False
    encoder_args: tuple = ()  # keyword arguments of its class, as (name, value) pairs
    # Its field compressor's output goes on as text, compressed in another model's tokens (the
    # source: --encoder_model) and read in the reader's own (field.Relay).
    relay: bool = False
    # Its field compressor learns from the training split before training starts (`fit`):
    # not training-free, though read as it is.
    fitted: bool = False

    def load(self) -> type:
        return load(self.implementation)

    @property
    def training_free(self) -> bool:
        """A field compressor (or its relay), read as it is or through the small adapter the
        references train: not an encoder that learns what to add to what it kept."""
        return self.field is not None and not self.reads_states and not self.fitted

    @property
    def keeps_tokens(self) -> bool:
        """A field compressor that keeps some of the context's tokens, as text; not a press,
        which keeps keys and values of a cache."""
        return self.field is not None and not self.field.endswith(":Press")

    @property
    def trains(self) -> bool:
        """Whether anything of it trains by gradient: not a fitted press read as it is."""
        return not self.implementation.endswith(":Kept")

    def field_compressor(self, seed: int = 0, source: tuple | None = None):
        """The field compressor this entry names, built; None for a learned encoder. A relay's
        compresses in the `source` model's tokens: (its tokenizer, its id)."""
        if self.field is None:
            return None
        built = load(self.field)(**dict(self.field_args), seed=seed)
        if not self.relay:
            return built
        tokenizer, model_id = source or (None, "")
        return load(f"{FIELD}:Relay")(inner=built, source_tokenizer=tokenizer,
                                      source_id=model_id, seed=seed)


FIELD = "latentwire.field"
ENCODERS = Registry("encoder", EncoderEntry)
HERE = "latentwire.training.encoders"
ENCODERS.add("pool", EncoderEntry(
    "mean of each chunk of token embeddings + a residual MLP (identity at start)", f"{HERE}:Pool"))
ENCODERS.add("attn", EncoderEntry(
    "learned slot queries cross-attend over the token embeddings (starts as pool)",
    f"{HERE}:Attention"))
ENCODERS.add("constant", EncoderEntry(
    "M learned vectors that ignore the input: the learned-prefix control", f"{HERE}:Constant"))
ENCODERS.add("lm", EncoderEntry(
    "the frozen model reads the span, then M learned memory slots; its states at the slots, "
    "projected, are the latents", f"{HERE}:ModelReader", needs_model=True))

# The field's training-free compressors and the controls without a model, each read by the
# frozen model as it is (--samples 0) or through pool at 1x trained on their output.
POOL = f"{HERE}:Pool"
ENCODERS.add("truncate", EncoderEntry(
    "control without a model: the first 1/R of the context's tokens", POOL,
    field=f"{FIELD}:Truncate"))
ENCODERS.add("random_tokens", EncoderEntry(
    "control without a model: 1/R of the context's tokens at random, in order", POOL,
    field=f"{FIELD}:RandomTokens"))
ENCODERS.add("stride", EncoderEntry(
    "control without a model: one token in every R, the last of each of ceil(N/R) equal "
    "chunks of the context", POOL, field=f"{FIELD}:Stride"))
ENCODERS.add("sentences", EncoderEntry(
    "control without a model: the context's sentences holding most of the question's words, "
    "whole while they fit; query-aware", POOL, field=f"{FIELD}:Sentences", needs_question=True))
ENCODERS.add("llmlingua", EncoderEntry(
    "LLMLingua (llmlingua): drops the context's least informative tokens as the reader scores "
    "them; query-agnostic", POOL, field=f"{FIELD}:LLMLingua"))
ENCODERS.add("longllmlingua", EncoderEntry(
    "LongLLMLingua (llmlingua): LLMLingua conditioned on the question; query-aware", POOL,
    field=f"{FIELD}:LLMLingua", field_args=(("query_aware", True),), needs_question=True))
for _press, _what in (("snapkv", "SnapKV: attention from a window of queries"),
                      ("expected_attention", "ExpectedAttention: attention expected of future queries"),
                      ("tova", "TOVA: attention from the last query"),
                      ("knorm", "Knorm: the keys' norms"),
                      ("streaming_llm", "StreamingLLM: sink and most recent positions"),
                      ("random", "random positions")):
    ENCODERS.add(f"kvpress:{_press}", EncoderEntry(
        f"kvpress, {_what}: prunes the context's keys and values to 1/R", POOL,
        field=f"{FIELD}:Press", field_args=(("name", _press),)))
ENCODERS.add("kvpress:kvzip", EncoderEntry(
    "kvpress, KVzip: how much the reader attends to each position when it repeats the "
    "context; query-agnostic: prunes the context's keys and values to 1/R", POOL,
    field=f"{FIELD}:Press", field_args=(("name", "kvzip"), ("query_aware", False))))
ENCODERS.add("kvpress:learned", EncoderEntry(
    "a press that learns its scores: a ridge regression, per layer and key-value head, from "
    "what attention reads at each context position to how much the training questions and "
    "answers attend to it, fitted on the training split before anything trains; then read "
    "as it is; query-agnostic: prunes the context's keys and values to 1/R",
    f"{HERE}:Kept", field="latentwire.training.learned_press:LearnedPress", fitted=True))

# Learned on top of a field compressor: it starts as the compressor's output and trains from there.
ENCODERS.add("offset:sentences", EncoderEntry(
    "the tokens `sentences` keeps, each plus a learned offset from the frozen model's state "
    "there after reading the question and the whole context (the kept tokens at step 0)",
    f"{HERE}:StateOffset", needs_model=True, field=f"{FIELD}:Sentences", needs_question=True,
    reads_states=True))
ENCODERS.add("offset:truncate", EncoderEntry(
    "the context's first 1/R tokens, each plus a learned offset from the frozen model's state "
    "there after reading the whole context (the kept tokens at step 0); reads no question",
    f"{HERE}:StateOffset", needs_model=True, field=f"{FIELD}:Truncate", reads_states=True))
ENCODERS.add("offset:stride", EncoderEntry(
    "one token in every R of the context (`stride`), each plus a learned offset from the frozen "
    "model's state there after reading the whole context (the kept tokens at step 0); reads no "
    "question", f"{HERE}:StateOffset", needs_model=True, field=f"{FIELD}:Stride",
    reads_states=True))
ENCODERS.add("offset:sentences:once", EncoderEntry(
    "offset:sentences with the context read once, not twice: a kept token's state has read the "
    "question and the context up to it (half the frozen model's work per question)",
    f"{HERE}:StateOffset", needs_model=True, field=f"{FIELD}:Sentences", needs_question=True,
    reads_states=True, encoder_args=(("readings", 1),)))
ENCODERS.add("offset:kvpress:expected_attention", EncoderEntry(
    "every token of the context, each plus a learned offset from the frozen model's state there "
    "after reading the whole context, then pruned by ExpectedAttention to 1/R of its keys and "
    "values (the press's cache at step 0); reads no question", f"{HERE}:StateOffset",
    needs_model=True, field=f"{FIELD}:Press", field_args=(("name", "expected_attention"),),
    reads_states=True))
ENCODERS.add("offset:kvpress:learned", EncoderEntry(
    "offset:kvpress:expected_attention with the learned press (`kvpress:learned`) pruning: "
    "the press is fitted on the training questions first, then the offsets train through what "
    "it keeps (the fitted press's cache at step 0); reads no question", f"{HERE}:StateOffset",
    needs_model=True, field="latentwire.training.learned_press:LearnedPress",
    reads_states=True, fitted=True))
ENCODERS.add("attend:sentences:once", EncoderEntry(
    "offset:sentences:once whose kept tokens also attend over the frozen model's states at every "
    "token of the context, the dropped ones too (the kept tokens at step 0)",
    f"{HERE}:StateAttention", needs_model=True, field=f"{FIELD}:Sentences",
    needs_question=True, reads_states=True, encoder_args=(("readings", 1),)))
ENCODERS.add("attend:truncate", EncoderEntry(
    "offset:truncate whose kept tokens also attend over the frozen model's states at every "
    "token of the context, the dropped three quarters too (the kept tokens at step 0); reads "
    "no question", f"{HERE}:StateAttention", needs_model=True, field=f"{FIELD}:Truncate",
    reads_states=True))

# The text relay: a text compressor's output read by another model in its own tokens, at the
# position budget of latents made from the source's tokens. The source is --encoder_model
# (unset: the reader itself, where a relay is its compressor exactly).
for _name in ("sentences", "truncate", "llmlingua", "longllmlingua"):
    _inner = ENCODERS[_name]
    ENCODERS.add(f"relay:{_name}", EncoderEntry(
        f"`{_name}`'s text, compressed in --encoder_model's tokens, read in the reader's own "
        "(at most the latents' count of positions): the text relay between two models", POOL,
        field=_inner.field, field_args=_inner.field_args, needs_question=_inner.needs_question,
        relay=True))


def token_keepers() -> list[str]:
    """The encoders whose output keeps some of the context's own tokens: the ones `--answer_kept`
    can look for the answer in."""
    return [name for name, entry in ENCODERS.items() if entry.keeps_tokens]


def fitted_presses() -> list[str]:
    """The encoders whose press is fitted on the training questions before anything trains."""
    return [name for name, e in ENCODERS.items() if e.fitted]
