"""What builds a compressor, typed: the trainer makes a CompressorSpec from its options and its
data, a checkpoint stores it as JSON (`to_json`), and the sweep and the benchmarks read it back
(`from_json`) to build the same compressor again. No other module reads its fields by name from
JSON. Imports no torch."""

import math
from dataclasses import dataclass

from .registry import ENCODERS


@dataclass(frozen=True)
class TransformSpec:
    name: str  # a key of experiments.TRANSFORMS
    config: dict  # its keyword arguments

    def to_json(self) -> dict:
        return {"name": self.name, "config": dict(self.config)}


@dataclass(frozen=True)
class CompressorSpec:
    encoder: str  # a key of training.registry.ENCODERS
    d_model: int  # the reader's width, the encoder's
    max_latents: int  # slots: the most latents any example of the run needed
    scale: float  # the reader vocabulary's mean RMS: the unit the encoder's output is learned in
    compression: float | None  # text positions per latent, or
    latent_len: int | None  # a fixed count of latents per example
    keep_question: bool  # the question follows the latents as text
    encoder_layer: int | None  # lm: the reader's layer handing over its states (None: the last)
    encoder_lora: int  # lm: the rank of the reader copy's LoRA adapters (0: none)
    transform: TransformSpec
    codebook_trainable: bool
    # A shared compressor (several models, another reader, a latent width or a frozen encoder):
    # the latents' width and each answering model's own width, in --model_id's order. None for
    # one model reading its own text.
    latent_dim: int | None = None
    adapters: tuple[int, ...] | None = None

    @property
    def shared(self) -> bool:
        return self.adapters is not None

    @property
    def field(self) -> bool:
        """A field compressor's: it keeps 1/R of the context itself, and the encoder reads
        what it kept one position per latent."""
        return ENCODERS[self.encoder].field is not None

    def counts(self, lengths: list[int]) -> list[int]:
        if self.field:
            return list(lengths)
        return latent_counts(lengths, self.compression, self.latent_len, self.max_latents)

    def to_json(self) -> dict:
        """As a checkpoint's config.json stores it; the keys of a shared compressor only where
        it is one."""
        out = {"encoder": self.encoder, "d_model": self.d_model, "max_latents": self.max_latents,
               "scale": self.scale, "compression": self.compression, "latent_len": self.latent_len,
               "keep_question": self.keep_question, "encoder_layer": self.encoder_layer,
               "encoder_lora": self.encoder_lora, "transform": self.transform.to_json(),
               "codebook_trainable": self.codebook_trainable}
        if self.shared:
            out["latent_dim"] = self.latent_dim
            out["adapters"] = [{"d_model": width} for width in self.adapters]
        return out

    @classmethod
    def from_json(cls, spec: dict) -> "CompressorSpec":
        """A checkpoint's spec; a field added after that checkpoint was written takes the value
        its absence meant then."""
        adapters = spec.get("adapters")
        return cls(
            encoder=spec["encoder"], d_model=spec["d_model"], max_latents=spec["max_latents"],
            scale=spec["scale"], compression=spec.get("compression"),
            latent_len=spec.get("latent_len"), keep_question=spec.get("keep_question", False),
            encoder_layer=spec.get("encoder_layer"), encoder_lora=spec.get("encoder_lora", 0),
            transform=TransformSpec(spec["transform"]["name"], spec["transform"]["config"]),
            codebook_trainable=bool(spec.get("codebook_trainable", False)),
            latent_dim=spec.get("latent_dim"),
            adapters=None if adapters is None else tuple(a["d_model"] for a in adapters))


def latent_counts(lengths: list[int], compression: float | None, latent_len: int | None,
                  max_latents: int | None = None) -> list[int]:
    """Latents per example: ceil(N / R), or M; never more than the span's own tokens (a latent
    with no token behind it carries nothing), nor than the encoder has slots for."""
    counts = [min(n, latent_len) if latent_len else math.ceil(n / compression) for n in lengths]
    return [max(1, min(c, max_latents or c)) for c in counts]
