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

    def load(self) -> type:
        return load(self.implementation)


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
