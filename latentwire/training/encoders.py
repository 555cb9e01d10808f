"""What turns text into latents: the encoder registry, and the compressor that training optimises
and the sweep's `adapter:` source replays.

An encoder reads the frozen model's own token embeddings of a span and returns fewer vectors in
the model's width: M per example, from `--compression R` (M = ceil(N / R)) or `--latent_len M`.
The compressor then applies the chosen transform: the same registry entry the sweep runs, so
what training optimises is what the sweep measures. Everything is packed ([rows, d] plus offsets,
no padding), like the sweep's transform inputs.
"""

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import embed_experiments, experiments
from ..embed_experiments import TransformInputs
from ..errors import UsageError
from ..generation import cache_argument, plain_kv, returned_cache
from .registry import ENCODERS
from .spec import CompressorSpec

# Set on a model whose layers recompute their activations in the backward pass: a layer run
# twice would append its keys and values to a cache twice.
RECOMPUTES = "latentwire_recomputes"


@dataclass
class Layout:
    """Which latent each token feeds: example i's N tokens are cut into M near-equal consecutive
    chunks, token p going to chunk floor(p * M / N)."""
    lengths: torch.Tensor  # [E] tokens per example
    counts: torch.Tensor  # [E] latents per example
    chunk: torch.Tensor  # [N] the global latent row each token feeds
    position: torch.Tensor  # [N] each token's index within its example
    slot: torch.Tensor  # [M] each latent's index within its example
    example: torch.Tensor  # [N] each token's example

    @classmethod
    def of(cls, lengths: list[int], counts: list[int], device=None) -> "Layout":
        lengths_t = torch.tensor(lengths, device=device)
        counts_t = torch.tensor(counts, device=device)
        example = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths_t)
        starts = torch.cumsum(lengths_t, 0) - lengths_t
        position = torch.arange(int(lengths_t.sum()), device=device) - starts[example]
        latent_starts = torch.cumsum(counts_t, 0) - counts_t
        chunk = latent_starts[example] + position * counts_t[example] // lengths_t[example]
        latent_example = torch.repeat_interleave(torch.arange(len(counts), device=device), counts_t)
        slot = torch.arange(int(counts_t.sum()), device=device) - latent_starts[latent_example]
        return cls(lengths_t, counts_t, chunk, position, slot, example)

    @property
    def offsets(self) -> torch.Tensor:
        return torch.cat([self.counts.new_zeros(1), self.counts.cumsum(0)])

    def chunk_mean(self, x: torch.Tensor) -> torch.Tensor:
        rows = int(self.counts.sum())
        sums = x.new_zeros(rows, x.shape[1]).index_add(0, self.chunk, x)
        sizes = torch.bincount(self.chunk, minlength=rows).clamp_min(1)
        return sums / sizes.unsqueeze(1).to(x)


def _sinusoid(position: torch.Tensor, width: int) -> torch.Tensor:
    """Fixed sine/cosine features of a position: lets attention tell near from far."""
    half = width // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=position.device) / half)
    angle = position.float().unsqueeze(1) * freq
    return torch.cat([angle.sin(), angle.cos(), angle.new_zeros(len(position), width - 2 * half)], 1)


def _residual_mlp(d_model: int) -> nn.Sequential:
    mlp = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, 2 * d_model), nn.GELU(),
                        nn.Linear(2 * d_model, d_model))
    # A zero last layer: the encoder starts as its residual path (the chunk mean), so at
    # --compression 1 training starts from the text itself.
    nn.init.zeros_(mlp[-1].weight)
    nn.init.zeros_(mlp[-1].bias)
    return mlp


class Pool(nn.Module):
    def __init__(self, d_model: int, max_latents: int, scale: float):
        super().__init__()
        self.scale = scale  # the vocabulary's RMS: the MLP's output is learned in that unit
        self.mlp = _residual_mlp(d_model)

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        mean = layout.chunk_mean(x)
        return mean + self.scale * self.mlp(mean)


class Kept(nn.Module):
    """The context's tokens as they are, one latent each, with nothing to train: for a
    compressor that learns before training starts (a learned press's fit)."""

    def __init__(self, d_model: int, max_latents: int, scale: float):
        super().__init__()

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        return layout.chunk_mean(x)


class Attention(nn.Module):
    def __init__(self, d_model: int, max_latents: int, scale: float, heads: int = 4):
        super().__init__()
        self.scale, self.heads = scale, heads
        self.slots = nn.Parameter(torch.zeros(max_latents, d_model))
        self.norm_q, self.norm_kv = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.q, self.k, self.v = (nn.Linear(d_model, d_model) for _ in range(3))
        self.out = nn.Linear(d_model, d_model)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        d = x.shape[1]
        mean = layout.chunk_mean(x)
        # A query knows its slot and where its chunk lies; a key knows its token's position.
        centre = layout.chunk_mean(layout.position.unsqueeze(1).float()).squeeze(1)
        slots = self.slots[layout.slot.clamp_max(len(self.slots) - 1)]
        q = self.q(self.norm_q(mean) + slots + _sinusoid(centre, d))
        kv_in = self.norm_kv(x) + _sinusoid(layout.position, d)
        attended = _attend(q, layout.counts, layout.slot, self.k(kv_in), self.v(kv_in),
                           layout.lengths, layout.position, self.heads)
        return mean + self.scale * self.out(attended)


def _attend(q: torch.Tensor, counts: torch.Tensor, slot: torch.Tensor, k: torch.Tensor,
            v: torch.Tensor, lengths: torch.Tensor, position: torch.Tensor,
            heads: int) -> torch.Tensor:
    """Packed multi-head attention, each example's queries over its own keys alone: `counts`
    queries and `lengths` keys per example, `slot`/`position` each row's index within its
    example. Returns [sum(counts), d]."""
    n_ex, d = len(counts), q.shape[1]
    q_example = torch.repeat_interleave(torch.arange(n_ex, device=q.device), counts)
    k_example = torch.repeat_interleave(torch.arange(n_ex, device=q.device), lengths)
    width, rows = int(lengths.max()), int(counts.max())

    def padded(t, example, index, length):
        out = t.new_zeros(n_ex, length, d)
        out[example, index] = t
        return out.view(n_ex, length, heads, d // heads).transpose(1, 2)

    visible = torch.arange(width, device=q.device) < lengths.unsqueeze(1)
    attended = F.scaled_dot_product_attention(
        padded(q, q_example, slot, rows), padded(k, k_example, position, width),
        padded(v, k_example, position, width), attn_mask=visible[:, None, None])
    return attended.transpose(1, 2).reshape(n_ex, rows, d)[q_example, slot]


class Constant(nn.Module):
    def __init__(self, d_model: int, max_latents: int, scale: float):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(max_latents, d_model) * scale)

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        return self.latents[layout.slot.clamp_max(len(self.latents) - 1)]


def _handover_layer(model, layer: int | None) -> int | None:
    """The layer whose states an encoder that reads with `model` takes (--encoder_layer), None
    for the last: its output is the model's own last state."""
    layers = model.config.num_hidden_layers
    if layer is not None and not 1 <= layer <= layers:
        raise UsageError(f"--encoder_layer must be between 1 and {layers}, the model's "
                         f"layers (got {layer})")
    return None if layer in (None, layers) else layer


class ModelReader(nn.Module):
    """A language model hands over what it read at a few memory slots (gist tokens, ICAE).

    The reader is the frozen model itself: it reads each span followed by M learned slot
    embeddings, and its hidden states at the slots pass through a trainable projection into the
    model's input width. Gradients reach the slots through the frozen reader.

    The projection starts where the answering model can read it. Hidden states are no token
    embeddings: in SmolLM2's last layer three of 576 dimensions hold about two thirds of a
    layer-normalised state's energy, so a latent made from it is one spike. `calibrate` measures
    each dimension's mean and spread over the slots of a batch of real spans; the projection
    starts as that standardisation followed by the vocabulary's own mean and spread per
    dimension (the sweep's batch-distribution matching, done once), an identity in between.

    With `lora` > 0 the reader is a copy of the model with LoRA adapters (peft) that train with
    the projection; the model that answers is the original, never touched.
    """
    def __init__(self, d_model: int, max_latents: int, scale: float, model=None, vocab=None,
                 layer: int | None = None, lora: int = 0):
        super().__init__()
        self.layer = _handover_layer(model, layer)
        reader = _lora_copy(model, lora) if lora else model
        if lora and self.layer is not None and _keep_first_layers(reader, self.layer):
            # The copy now ends at that layer, with no final norm: its last state is the state
            # the full model hands over there, and the layers above it are never run.
            self.layer = None
        # A plain attribute, not a submodule: the reader's weights are the frozen model's and
        # belong to no checkpoint; only its adapters do, registered below.
        self.reader = (reader,)
        adapters = {name.replace(".", "__"): p for name, p in reader.named_parameters()
                    if lora and "lora_" in name}
        self.lora = nn.ParameterDict(adapters)
        self.slots = nn.Parameter(torch.randn(max_latents, d_model) * scale)
        self.proj = nn.Linear(d_model, d_model)
        nn.init.eye_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        # Measured by calibrate() and saved with the weights: a checkpoint replays them.
        self.register_buffer("center", torch.zeros(d_model))
        self.register_buffer("spread", torch.ones(d_model))
        # The vocabulary's statistics follow from the model: not saved.
        self.register_buffer("vocab_mean", vocab.mean.clone(), persistent=False)
        self.register_buffer("vocab_std", vocab.std.clone(), persistent=False)

    def states(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        """The reader's hidden states at the slots, [M, d] float32."""
        (model,) = self.reader
        if torch.is_grad_enabled() and not len(self.lora) and not getattr(model, RECOMPUTES, False):
            split = self._states_after_span(x, layout)
            if split is not None:
                return split
        return self._states_in_one_pass(x, layout)

    def _read_out(self, out) -> torch.Tensor:
        return out.last_hidden_state if self.layer is None else out.hidden_states[self.layer]

    def _states_in_one_pass(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        (model,) = self.reader
        lengths, counts = layout.lengths.tolist(), layout.counts.tolist()
        dtype = model.get_input_embeddings().weight.dtype
        spans = x.split(lengths)
        states: list[torch.Tensor | None] = [None] * len(lengths)
        for group in similar_widths([n + m for n, m in zip(lengths, counts)]):
            width = lengths[group[0]] + counts[group[0]]
            # Right padding needs no mask: under causal attention no real position sees a pad.
            rows = [F.pad(torch.cat([spans[i], self.slots[:counts[i]]]).to(dtype),
                          (0, 0, 0, width - lengths[i] - counts[i])) for i in group]
            out = self._read_out(model.base_model(inputs_embeds=torch.stack(rows),
                                                  use_cache=False,
                                                  output_hidden_states=self.layer is not None))
            for row, i in enumerate(group):
                states[i] = out[row, lengths[i]:lengths[i] + counts[i]]
        return torch.cat(states).float()

    def _states_after_span(self, x: torch.Tensor, layout: Layout) -> torch.Tensor | None:
        """The same states, with the span read once without a graph and only the slots through
        autograd: nothing trainable lies upstream of the span (without LoRA), so its keys and
        values are constants, and the backward pass covers M positions instead of N + M (on
        the bundled model at 4x, a fifth of them). None where the model's cache is not plain
        keys and values."""
        (model,) = self.reader
        base = model.base_model
        lengths, counts = layout.lengths.tolist(), layout.counts.tolist()
        width, rows = max(lengths), max(counts)
        dtype = model.get_input_embeddings().weight.dtype
        with torch.no_grad():
            spans = torch.stack([F.pad(span.to(dtype), (0, 0, 0, width - n))
                                 for span, n in zip(x.split(lengths), lengths)])
            cache = returned_cache(base(inputs_embeds=spans, use_cache=True))
        if plain_kv(cache) is None:
            return None
        slots = torch.stack([F.pad(self.slots[:m], (0, 0, 0, rows - m)) for m in counts]).to(dtype)
        # Slot j of example i sees that example's own tokens (not the padding after them) and
        # slots 0..j, at positions n_i + j.
        key = torch.arange(width + rows, device=x.device)
        query = torch.arange(rows, device=x.device)
        seen = (key < layout.lengths[:, None, None]) | (
            (key >= width) & (key - width <= query[:, None]))
        mask = torch.zeros(seen.shape, dtype=dtype, device=x.device).masked_fill(
            ~seen, torch.finfo(dtype).min)[:, None]
        out = base(inputs_embeds=slots, attention_mask=mask, use_cache=True,
                   position_ids=layout.lengths[:, None] + query, **{cache_argument(base): cache},
                   output_hidden_states=self.layer is not None)
        example = torch.repeat_interleave(torch.arange(len(lengths), device=x.device), layout.counts)
        return self._read_out(out)[example, layout.slot].float()

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, layout: Layout) -> None:
        h = self.states(x, layout)
        self.center.copy_(h.mean(0))
        self.spread.copy_(h.std(0).clamp_min(1e-6) if len(h) > 1 else h.new_ones(h.shape[1]))

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        z = (self.states(x, layout) - self.center) / self.spread
        return self.vocab_mean + self.vocab_std * self.proj(z)


def _owned(states: torch.Tensor) -> torch.Tensor:
    """A float32 copy: a slice of the pass's output would keep all of it (the question and the
    first reading too) alive in the trainer's cache, 2-3x the memory."""
    return states.to(torch.float32, copy=True)


class _Stop(Exception):
    """Ends a forward pass early, once the layer whose states are wanted has run."""


class StateOffset(nn.Module):
    """The tokens a selector kept, each plus what the frozen model read around it.

    The selector (an extractive field compressor) keeps ceil(N / R) of the context's own
    tokens; this encoder adds to each kept token's embedding a learned function of the frozen
    model's hidden state at that token, read over the question (query-aware) and the whole
    context twice: under causal attention a state sees only what came before it, and in the
    second reading that is the whole context, so a kept token can carry what the selector
    dropped on either side of it. The function's last layer starts at zero: at step 0 the
    latents are the selector's tokens exactly, and training moves them from the selector's F1.
    With `readings=1` the context is read once: each state has seen only the context before it
    (and the question), for half the frozen model's work. The states are the frozen model's,
    with no gradient: `states` computes them, and the trainer keeps them per (question,
    paragraph) read, across epochs and questions.
    """

    def __init__(self, d_model: int, max_latents: int, scale: float, model=None, vocab=None,
                 layer: int | None = None, lora: int = 0, readings: int = 2):
        super().__init__()
        self.scale, self.layer = scale, _handover_layer(model, layer)
        self.readings = readings
        self.reader = (model,)  # frozen, and not the checkpoint's
        self.norm_token, self.norm_state = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(2 * d_model, 2 * d_model), nn.GELU(),
                                 nn.Linear(2 * d_model, d_model))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    @torch.no_grad()
    def states(self, question: list[int], context: list[int]) -> torch.Tensor:
        """[len(context), d] float32: the frozen model's states over the context's last
        reading, after the question (empty: query-agnostic)."""
        (model,) = self.reader
        embed = model.get_input_embeddings()
        ids = torch.tensor(question + context * self.readings, device=embed.weight.device)
        at = slice(len(question) + len(context) * (self.readings - 1), None)
        base = model.base_model
        if self.layer is None:
            out = base(inputs_embeds=embed(ids)[None], use_cache=False)
            return _owned(out.last_hidden_state[0, at])
        # The layers above --encoder_layer change nothing read here: the pass stops once that
        # layer has run (at 8 of the bundled model's 30, a quarter of the cost).
        got = []

        def stop(module, inputs, output):
            got.append(output[0] if isinstance(output, tuple) else output)
            raise _Stop

        hook = base.layers[self.layer - 1].register_forward_hook(stop)
        try:
            base(inputs_embeds=embed(ids)[None], use_cache=False)
        except _Stop:
            pass
        finally:
            hook.remove()
        return _owned(got[0][0, at])

    def forward(self, x: torch.Tensor, layout: Layout, states: torch.Tensor | None = None):
        if states is None:
            raise UsageError("this encoder reads the frozen model's states over the whole "
                             "context, which only `latentwire train` and `study` compute; it "
                             "cannot be replayed from its latents alone")
        both = torch.cat([self.norm_token(x), self.norm_state(states)], 1)
        return x + self.scale * self.mlp(both)

    def gather(self, contexts: list[torch.Tensor], kept_at: list[list[int]]) -> torch.Tensor:
        """What `forward` reads, from each example's states over its whole context (`states`)
        and where its kept tokens lie in it: the states at the kept tokens, packed."""
        return torch.cat([c[at] for c, at in zip(contexts, kept_at)])


@dataclass
class ContextStates:
    """The frozen model's states over whole contexts, packed, for an encoder that reads them all."""
    kept: torch.Tensor  # [M, d] at the kept tokens
    context: torch.Tensor  # [sum of N, d] at every token of each context
    lengths: torch.Tensor  # [E] each context's N
    position: torch.Tensor  # [M] each kept token's index in its context


class StateAttention(StateOffset):
    """StateOffset whose kept tokens also attend over the frozen model's states at every token
    of the context, the dropped ones too: a kept token's own state holds what it read, diluted
    over everything before it; attention lets it fetch a dropped token's state directly. The
    read joins the MLP's input, whose last layer starts at zero: at step 0 the latents are
    still the selector's tokens exactly."""

    def __init__(self, d_model: int, max_latents: int, scale: float, model=None, vocab=None,
                 layer: int | None = None, lora: int = 0, readings: int = 2, heads: int = 4):
        super().__init__(d_model, max_latents, scale, model, vocab, layer, lora, readings)
        self.heads = heads
        self.norm_context = nn.LayerNorm(d_model)
        self.q, self.k, self.v = (nn.Linear(d_model, d_model) for _ in range(3))
        self.mlp = nn.Sequential(nn.Linear(3 * d_model, 2 * d_model), nn.GELU(),
                                 nn.Linear(2 * d_model, d_model))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def gather(self, contexts: list[torch.Tensor], kept_at: list[list[int]]) -> ContextStates:
        device = contexts[0].device
        return ContextStates(
            kept=super().gather(contexts, kept_at), context=torch.cat(contexts),
            lengths=torch.tensor([len(c) for c in contexts], device=device),
            position=torch.tensor([p for at in kept_at for p in at], device=device))

    def read(self, states: ContextStates, layout: Layout) -> torch.Tensor:
        """[M, d]: each kept token's attention over its own context's states."""
        d = states.kept.shape[1]
        # A query knows where its token lies, a key where its own does: near from far.
        q = self.q(self.norm_state(states.kept) + _sinusoid(states.position, d))
        context_at = Layout.of(states.lengths.tolist(), states.lengths.tolist(),
                               states.context.device).position
        kv = self.norm_context(states.context) + _sinusoid(context_at, d)
        return _attend(q, layout.counts, layout.slot, self.k(kv), self.v(kv), states.lengths,
                       context_at, self.heads)

    def forward(self, x: torch.Tensor, layout: Layout, states: ContextStates | None = None):
        if states is None:
            return super().forward(x, layout, None)
        both = torch.cat([self.norm_token(x), self.norm_state(states.kept),
                          self.read(states, layout)], 1)
        return x + self.scale * self.mlp(both)


def similar_widths(widths: list[int], ratio: float = 0.8) -> list[list[int]]:
    """Indices grouped so that every row of a group is at least `ratio` of its widest: padded
    to one width, a group wastes at most a quarter of its positions. Real paragraphs vary
    threefold in length (SQuAD's held-out ones 95-337 tokens), and one padded batch of them
    spent twice the reader's time of the same rows read one by one."""
    order = sorted(range(len(widths)), key=lambda i: -widths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and widths[i] >= ratio * widths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _keep_first_layers(reader, layer: int) -> bool:
    """Cut the reader's own copy down to its first `layer` decoder layers and drop the final
    norm, where the architecture keeps them as `layers` and `norm` (Llama, Qwen2 and most
    decoders do); False, leaving the copy whole, where it does not. With --encoder_layer the
    layers above that one cost a forward and backward pass and change nothing the encoder
    reads."""
    base = reader.base_model
    if not isinstance(getattr(base, "layers", None), nn.ModuleList) or not hasattr(base, "norm"):
        return False
    base.layers = base.layers[:layer]
    base.norm = nn.Identity()
    reader.config.num_hidden_layers = layer
    if getattr(reader.config, "layer_types", None):
        reader.config.layer_types = reader.config.layer_types[:layer]
    return True


def _lora_copy(model, rank: int):
    """The reader's own copy of `model` with rank-`rank` LoRA adapters on the attention
    projections peft chooses for its architecture; every other weight stays frozen."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise UsageError("--encoder_lora needs peft: pip install 'latentwire[lora]'") from None
    reader = copy.deepcopy(model)
    try:
        # alpha = rank: the adapters' scale does not change with the rank.
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0), reader)
    except ValueError as e:
        raise UsageError(f"--encoder_lora: peft cannot place adapters in "
                         f"{type(model).__name__} ({e}); train without --encoder_lora") from None
    for name, p in reader.named_parameters():
        p.requires_grad_("lora_" in name)
    return reader


def transform_config(name: str, flags: dict) -> dict:
    """The sweep registry's config for a transform, from training's flag values."""
    return {key: flags[field] for key, field in experiments.TRANSFORMS[name].train_flags.items()}


def _encoder(spec: CompressorSpec, vocab, model) -> nn.Module:
    entry = ENCODERS[spec.encoder]
    extra = ({"model": model, "vocab": vocab, "layer": spec.encoder_layer,
              "lora": spec.encoder_lora} if entry.needs_model else {})
    return entry.load()(spec.d_model, spec.max_latents, spec.scale, **extra,
                        **dict(entry.encoder_args))


def _codebook(spec: CompressorSpec, vocab) -> tuple[tuple | None, nn.Parameter | None]:
    """(the cache key, the trainable codes) of a soft codebook that learns, else (None, None):
    the codes start at the sweep's k-means codes of `vocab`, then learn with the encoder."""
    t = spec.transform
    if t.name != "soft_codebook" or not spec.codebook_trainable:
        return None, None
    key = (t.config["size"], t.config.get("seed", 0))
    codes, _ = vocab.codebook(*key)
    return key, nn.Parameter(codes.clone())


def _transformed(spec: CompressorSpec, vocab, codebook_key, codes, z: torch.Tensor,
                 offsets: torch.Tensor):
    """(latents, offsets, diagnostics) of the chosen transform of latents in one model's width,
    with that model's vocabulary."""
    codebooks = {codebook_key: codes} if codebook_key else None
    y, diagnostics = embed_experiments.apply(
        spec.transform.name, TransformInputs(z, offsets, vocab, codebooks=codebooks),
        spec.transform.config)
    return y, offsets, diagnostics


class Compressor(nn.Module):
    """Token embeddings of a span -> latents in the model's width -> the chosen transform.

    `spec` is what a checkpoint's config stores (CompressorSpec.to_json).
    """

    def __init__(self, spec: CompressorSpec, vocab, model=None):
        super().__init__()
        self.spec, self.vocab = spec, vocab
        self.encoder = _encoder(spec, vocab, model)
        self.codebook_key, codes = _codebook(spec, vocab)
        if codes is not None:
            self.codes = codes

    def calibrate(self, x: torch.Tensor, lengths: list[int]) -> None:
        """Lets an encoder that starts from data (lm) measure a batch of real spans, once,
        before training."""
        if hasattr(self.encoder, "calibrate"):
            self.encoder.calibrate(x.float(), Layout.of(lengths, self.spec.counts(lengths), x.device))

    def forward(self, x: torch.Tensor, lengths: list[int], states: torch.Tensor | None = None):
        """(latents [M, d], offsets [E + 1], the transform's diagnostics) for packed spans (and
        the frozen model's states at them, for an encoder that reads them)."""
        layout = Layout.of(lengths, self.spec.counts(lengths), x.device)
        z = self.encoder(x.float(), layout, **({} if states is None else {"states": states}))
        return _transformed(self.spec, self.vocab, self.codebook_key,
                            getattr(self, "codes", None), z, layout.offsets)

    def per_model(self, x: torch.Tensor, lengths: list[int], states=None, ids=None) -> list[tuple]:
        """The latents of the one model that reads them, as a list like SharedCompressor's."""
        return [self(x, lengths, states)]


class Adapter(nn.Module):
    """The shared latents into one answering model's input width, then that model's transform
    (with its own vocabulary, and its own codes for a soft codebook that learns).

    It starts where its model can read it, as the lm encoder's projection does: `calibrate`
    measures each output dimension's mean and spread over the latents of a batch of real
    spans, and the adapter starts as that standardisation followed by its own vocabulary's mean
    and spread per dimension. The map is the identity where the widths agree, else a
    semi-orthogonal one (every output dimension a unit mix of the latent's).
    """

    def __init__(self, latent_dim: int, spec: CompressorSpec, vocab):
        super().__init__()
        self.spec, self.vocab = spec, vocab
        width = vocab.mean.shape[0]
        self.proj = nn.Linear(latent_dim, width)
        (nn.init.eye_ if latent_dim == width else nn.init.orthogonal_)(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.register_buffer("center", torch.zeros(width))
        self.register_buffer("spread", torch.ones(width))
        self.register_buffer("vocab_mean", vocab.mean.clone(), persistent=False)
        self.register_buffer("vocab_std", vocab.std.clone(), persistent=False)
        self.codebook_key, codes = _codebook(spec, vocab)
        if codes is not None:
            self.codes = codes

    @torch.no_grad()
    def calibrate(self, z: torch.Tensor) -> None:
        h = self.proj(z)
        self.center.copy_(h.mean(0))
        self.spread.copy_(h.std(0).clamp_min(1e-6) if len(h) > 1 else h.new_ones(h.shape[1]))

    @torch.no_grad()
    def on_tokens(self, anchors: torch.Tensor, weight: torch.Tensor) -> None:
        """For latents that are the reader's embeddings of kept tokens plus what the encoder
        added (an encoder on a field compressor): this model's latent is its own embedding of
        each kept token (`anchors`, by the reader's token id: vocab.token_anchors; the
        reader's own table for the reader) plus this linear map of what the encoder added
        (`offset_map`), in place of the calibration. The map starts as `weight`, the map
        between the two vocabularies (vocab.translation; the identity for the reader), so at
        step 0 each model reads the kept tokens as its own embeddings of them.

        The map is trained as `gain` x a matrix with an identity's norm: Adam moves every
        entry by about the learning rate whatever its size, and the map from SmolLM2's
        embeddings to Qwen's (an eighth of their scale) has entries a tenth of an identity's:
        trained as it is, 75 steps doubled its norm with noise and Qwen's F1 from a frozen
        encoder fell from 0.334 to 0.168. The anchors and the gain are rebuilt from the models,
        not saved (a checkpoint saved before the gain holds the map itself, not the matrix)."""
        self.register_buffer("anchors", anchors, persistent=False)
        gain = weight.norm() / weight.shape[1] ** 0.5
        self.register_buffer("gain", gain.reshape(()), persistent=False)
        self.proj.weight.copy_(weight / gain)
        self.proj.bias.zero_()

    def holds_whole_map(self) -> bool:
        """Whether `proj` holds the map itself rather than the matrix (see on_tokens): what a
        checkpoint saved before the gain gives, with no marker of its own. Its norm lies
        nearer the gain's times an identity's than an identity's; with a gain of 1 (a model
        reading its own tokens) the two readings are the same map."""
        if not hasattr(self, "anchors"):
            return False
        ratio = float(self.proj.weight.detach().norm()) / self.proj.weight.shape[1] ** 0.5
        return abs(math.log(ratio / float(self.gain))) < abs(math.log(ratio))

    def offset_map(self, added: torch.Tensor) -> torch.Tensor:
        """What this model adds to its own embedding of a kept token for what the encoder
        added to the reader's (see on_tokens)."""
        return self.gain * self.proj(added)

    def forward(self, z: torch.Tensor, offsets: torch.Tensor, tokens=None):
        if hasattr(self, "anchors"):
            if tokens is None:
                raise UsageError("these latents are read as the reader's kept tokens plus an "
                                 "offset, which only `latentwire train` and `study` give")
            x, ids = tokens
            y = self.anchors[ids] + self.offset_map(z - x)
        else:
            y = self.vocab_mean + self.vocab_std * (self.proj(z) - self.center) / self.spread
        return _transformed(self.spec, self.vocab, self.codebook_key,
                            getattr(self, "codes", None), y, offsets)


class SharedCompressor(nn.Module):
    """One encoder, one latent sequence per example, an adapter per answering model.

    The encoder reads the reader's token embeddings as a Compressor's does (M follows the
    reader's token count); where `latent_dim` is not the reader's width, a linear map
    (semi-orthogonal at start) takes its output to that width: the latents every model is
    given. Adapter i maps them into answering model i's width. `spec` is a shared one (its
    latent_dim, and a width per answering model in --model_id's order).
    `vocabs` maps an answering model's index to its vocabulary: only those adapters are built
    (a sweep replays the one for the model it loaded).
    """

    def __init__(self, spec: CompressorSpec, vocab, model=None, vocabs: dict | None = None):
        super().__init__()
        self.spec = spec
        self.encoder = _encoder(spec, vocab, model)
        width, latent_dim = spec.d_model, spec.latent_dim
        if latent_dim != width:
            self.latent = nn.Linear(width, latent_dim)
            nn.init.orthogonal_(self.latent.weight)
            nn.init.zeros_(self.latent.bias)
        self.adapters = nn.ModuleDict({str(i): Adapter(latent_dim, spec, v)
                                       for i, v in (vocabs or {}).items()})

    def shared(self, x: torch.Tensor, lengths: list[int],
               states: torch.Tensor | None = None) -> tuple[torch.Tensor, Layout]:
        """(the latents every model is given [M, latent_dim], their layout)."""
        layout = Layout.of(lengths, self.spec.counts(lengths), x.device)
        z = self.encoder(x.float(), layout, **({} if states is None else {"states": states}))
        return (self.latent(z) if hasattr(self, "latent") else z), layout

    def calibrate(self, x: torch.Tensor, lengths: list[int], encoder: bool = True) -> None:
        """The encoder measures the spans as a Compressor's does (not an encoder loaded from
        another run: it keeps its own start), then each adapter measures the latents (not
        adapters on tokens: Adapter.on_tokens)."""
        if encoder and hasattr(self.encoder, "calibrate"):
            self.encoder.calibrate(x.float(), Layout.of(lengths, self.spec.counts(lengths), x.device))
        measured = [a for a in self.adapters.values() if not hasattr(a, "anchors")]
        if not measured:
            return
        with torch.no_grad():
            z, _ = self.shared(x, lengths)
        for adapter in measured:
            adapter.calibrate(z)

    def forward(self, x: torch.Tensor, lengths: list[int], states=None,
                ids: torch.Tensor | None = None) -> list[tuple]:
        """Per adapter built, in order: (latents [M, d_i], offsets [E + 1], diagnostics). `ids`:
        the reader's token ids of x, for adapters on tokens (a field compressor's latents, one
        per kept token: Adapter.on_tokens)."""
        z, layout = self.shared(x, lengths, states)
        tokens = None if ids is None else (x.float(), ids)
        return [adapter(z, layout.offsets, tokens) for adapter in self.adapters.values()]

    per_model = forward


def build(spec: CompressorSpec, vocab, model=None, vocabs: dict | None = None) -> nn.Module:
    """The compressor a spec describes: a SharedCompressor where it has adapters."""
    if spec.shared:
        return SharedCompressor(spec, vocab, model, vocabs)
    return Compressor(spec, vocab, model)
