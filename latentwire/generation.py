"""How a batch is generated: greedy decoding from `inputs_embeds`, batched and length-sorted.

`generate` is the engine: the prompt start every example shares is computed once and its KV
cache reused; prompts are sorted by length so each batch pads little, left-padded with explicit
position ids so padding changes nothing, prefilled in small micro-batches (fast on CPU) whose
caches merge into one wide decode group (cheap per row), and a group stops as soon as every row
has finished its answer (EOS or a newline: the answer is the first line). `generate_reference` is
the plain loop the seed ran, one `model.generate` per example; tests and the benchmark compare them.
"""

import inspect
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from .scoring import cut_answer


class StopTokens:
    """Which token ids end an answer: EOS, or any token whose text contains a newline."""

    def __init__(self, tokenizer, model, vocab_size: int):
        ids = set()
        eos = getattr(model.generation_config, "eos_token_id", None)
        for e in (eos if isinstance(eos, (list, tuple)) else [eos]) + [tokenizer.eos_token_id]:
            if e is not None:
                ids.add(int(e))
        pieces = tokenizer.batch_decode([[i] for i in range(min(vocab_size, len(tokenizer)))])
        ids.update(i for i, p in enumerate(pieces) if "\n" in p)
        self.ids = frozenset(i for i in ids if i < vocab_size)
        self.table = torch.zeros(vocab_size, dtype=torch.bool)
        self.table[list(self.ids)] = True


def default_budgets(model) -> tuple[int, int]:
    """(decode-group tokens, prefill micro-batch tokens) for the model's device.

    On CPU, measured with a 135M model on 2 cores: prefill runs at ~85% of the matmul peak in
    micro-batches of ~1k tokens and loses a quarter of that at 4k, while decoding 32 rows at once
    costs 4 ms a row-step against 37 ms for one row alone; so prefill small, decode wide.
    On CUDA both are what half the free memory holds (bigger batches are simply faster there).
    """
    device = next(model.parameters()).device
    if device.type != "cuda":
        return 16384, 1024
    cfg = model.config
    free, _ = torch.cuda.mem_get_info(device)
    elt = next(model.parameters()).element_size()
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * heads * head_dim * elt
    activations = 6 * max(cfg.hidden_size, getattr(cfg, "intermediate_size", 0)) * elt
    tokens = int(max(512, min(262144, 0.5 * free / (kv + activations))))
    return tokens, tokens


def _takes_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


class _InPlaceLayer(DynamicLayer):
    """A cache layer with room reserved up front, written in place. The default layer
    concatenates its whole history on every token: on CPU that copying was 55% of a decode step
    (profiled: 32 rows x 230 cached tokens, SmolLM2-135M)."""

    def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int):
        super().__init__()
        self._keys, self._values, self._length = key_buffer, value_buffer, length
        self.dtype, self.device, self.is_initialized = key_buffer.dtype, key_buffer.device, True
        self.keys, self.values = key_buffer[:, :, :length], value_buffer[:, :, :length]

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor, room: int) -> "_InPlaceLayer":
        b, n = keys.shape[0], keys.shape[2]
        key_buffer = keys.new_empty(b, keys.shape[1], n + room, keys.shape[3])
        value_buffer = values.new_empty(b, values.shape[1], n + room, values.shape[3])
        key_buffer[:, :, :n], value_buffer[:, :, :n] = keys, values
        return cls(key_buffer, value_buffer, n)

    def update(self, key_states, value_states, *args, **kwargs):
        end = self._length + key_states.shape[-2]
        if end > self._keys.shape[2]:  # more than was reserved: grow the ordinary way
            return super().update(key_states, value_states, *args, **kwargs)
        self._keys[:, :, self._length:end] = key_states
        self._values[:, :, self._length:end] = value_states
        self._length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values


def _kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The per-layer key/value tensors of a cache made only of plain growing layers, or None
    (sliding windows, recurrent or hybrid state): such caches are neither shared nor merged."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(type(l) in (DynamicLayer, _InPlaceLayer) for l in layers):
        return None
    return [(l.keys, l.values) for l in layers]


def _cache(model, layers: list[_InPlaceLayer]):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    cache.layers[:] = layers
    return cache


def _in_place(cache, room: int):
    """Give a cache's plain growing layers `room` free slots, written in place from now on."""
    layers = getattr(cache, "layers", [])
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.is_initialized:
            layers[i] = _InPlaceLayer.holding(layer.keys, layer.values, room)
    return cache


@dataclass
class _Prefilled:
    """A batch after its prompt pass: the first generated token and the state to continue."""
    token: torch.Tensor  # [b]
    cache: object
    mask: torch.Tensor  # [b, cache width]
    position: torch.Tensor  # [b, 1]: position of the last prompt token


@torch.no_grad()
def _prefill(model, prompts, prefix_kv, extra, room: int) -> _Prefilled:
    """One forward pass over left-padded prompts, continuing from the shared prefix's cache;
    the cache keeps `room` free slots for the answer.

    Layout per row: [prefix][padding][prompt]. Position ids count real tokens only and the mask
    hides the padding, so each row computes what it would alone.
    """
    device = next(model.parameters()).device
    lengths = [p.shape[0] for p in prompts]
    batch, width = len(prompts), max(lengths)
    embeds = torch.zeros(batch, width, prompts[0].shape[1], dtype=prompts[0].dtype, device=device)
    mask = torch.zeros(batch, width, dtype=torch.long, device=device)
    for row, (p, n) in enumerate(zip(prompts, lengths)):
        embeds[row, width - n:] = p
        mask[row, width - n:] = 1
    offset = prefix_kv[0][0].shape[2] if prefix_kv else 0
    positions = offset + (mask.cumsum(dim=1) - 1).clamp_min(0)
    cache = None
    if prefix_kv:
        cache = _cache(model, [_InPlaceLayer.holding(k.expand(batch, -1, -1, -1),
                                                     v.expand(batch, -1, -1, -1), width + room)
                               for k, v in prefix_kv])
        mask = torch.cat([torch.ones(batch, offset, dtype=mask.dtype, device=device), mask], dim=1)
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                past_key_values=cache, use_cache=True, **extra)
    return _Prefilled(out.logits[:, -1].argmax(dim=-1), _in_place(out.past_key_values, room),
                      mask, positions[:, -1:])


def _merge(model, parts: list[_Prefilled], room: int) -> _Prefilled:
    """Several prefilled micro-batches as one wide batch for decoding, copied once into buffers
    with `room` free slots: each part right-aligned, the padding zeros that the mask hides."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.mask.shape[1] for p in parts)
    kvs = [_kv(p.cache) for p in parts]
    rows = sum(p.mask.shape[0] for p in parts)
    layers = []
    for i, (k0, v0) in enumerate(kvs[0]):
        keys = k0.new_zeros(rows, k0.shape[1], width + room, k0.shape[3])
        values = v0.new_zeros(rows, v0.shape[1], width + room, v0.shape[3])
        r = 0
        for kv in kvs:
            k, v = kv[i]
            keys[r:r + k.shape[0], :, width - k.shape[2]:width] = k
            values[r:r + v.shape[0], :, width - v.shape[2]:width] = v
            r += k.shape[0]
        layers.append(_InPlaceLayer(keys, values, width))
    mask = parts[0].mask.new_zeros(rows, width)
    r = 0
    for p in parts:
        mask[r:r + p.mask.shape[0], width - p.mask.shape[1]:] = p.mask
        r += p.mask.shape[0]
    return _Prefilled(torch.cat([p.token for p in parts]), _cache(model, layers), mask,
                      torch.cat([p.position for p in parts]))


@torch.no_grad()
def _decode(model, state: _Prefilled, stops: StopTokens, max_new_tokens: int, pad_id: int,
            extra) -> list[list[int]]:
    """Greedy decoding until every row has hit a stop token or the token limit."""
    stop_table = stops.table.to(state.token.device)
    n_stop = len(stop_table)

    def is_stop(t):
        return stop_table[t.clamp_max(n_stop - 1)] & (t < n_stop)

    token, mask, position, cache = state.token, state.mask, state.position, state.cache
    finished = is_stop(token)
    steps = [token]
    for _ in range(max_new_tokens - 1):
        if bool(finished.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                    past_key_values=cache, use_cache=True, **extra)
        cache = out.past_key_values
        token = torch.where(finished, torch.full_like(token, pad_id), out.logits[:, -1].argmax(-1))
        steps.append(token)
        finished |= is_stop(token)
    result = []
    for row in torch.stack(steps, dim=1).tolist():
        # Everything up to and including the first stop token; the rest is padding.
        end = next((i + 1 for i, t in enumerate(row) if t in stops.ids), len(row))
        result.append(row[:end])
    return result


def plan_batches(lengths: list[int], token_budget: int, max_batch: int = 256) -> list[list[int]]:
    """Indices grouped into batches, longest prompts first, each within the token budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        # Sorted descending, so the first member of a batch is its widest.
        width = lengths[current[0]] if current else lengths[i]
        if current and ((len(current) + 1) * width > token_budget or len(current) >= max_batch):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


MAX_DECODE_ROWS = 64


def generate(model, tokenizer, prompts: list[torch.Tensor], stops: StopTokens,
             max_new_tokens: int = 12, token_budget: int | None = None,
             on_batch=None, prefix: torch.Tensor | None = None,
             prefill_tokens: int | None = None) -> list[tuple[str, int]]:
    """(answer, generated token count) for every prompt, in the order given; the answer is the
    first line of the greedy generation, stripped.

    `prefix` is a prompt start shared by every prompt (the chat header and instruction): it is
    computed once and its cache reused. Prompts are sorted by length; each decode group (at most
    `token_budget` tokens) is prefilled in micro-batches of `prefill_tokens` and decoded as one.
    On a CUDA out-of-memory error both budgets are halved and the group retried, so a batch
    size that was too hopeful costs a retry, not the run.
    """
    group_budget, micro_budget = default_budgets(model)
    group_budget = token_budget or group_budget
    micro_budget = min(prefill_tokens or micro_budget, group_budget)
    extra = {"logits_to_keep": 1} if _takes_logits_to_keep(model) else {}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prefix_kv = None
    if prefix is not None and prefix.shape[0]:
        with torch.no_grad():
            out = model(inputs_embeds=prefix[None].to(next(model.parameters()).device),
                        use_cache=True, **extra)
        prefix_kv = _kv(out.past_key_values)
        if prefix_kv is None:  # a cache we cannot share: put the prefix back into every prompt
            prompts = [torch.cat([prefix, p]) for p in prompts]
    answers: list[tuple[str, int] | None] = [None] * len(prompts)
    lengths = [p.shape[0] for p in prompts]
    pending = plan_batches(lengths, group_budget, MAX_DECODE_ROWS)
    while pending:
        group = pending.pop(0)
        try:
            micro = [[group[j] for j in mb] for mb in
                     plan_batches([lengths[i] for i in group], micro_budget)]
            parts = [_prefill(model, [prompts[i] for i in mb], prefix_kv, extra, max_new_tokens)
                     for mb in micro]
            order = [i for mb in micro for i in mb]
            if all(_kv(p.cache) is not None for p in parts):
                generated = _decode(model, _merge(model, parts, max_new_tokens), stops,
                                    max_new_tokens, pad_id, extra)
            else:
                generated = [g for p in parts
                             for g in _decode(model, p, stops, max_new_tokens, pad_id, extra)]
        except torch.OutOfMemoryError:
            if len(group) == 1:
                raise
            torch.cuda.empty_cache()
            group_budget, micro_budget = max(1, group_budget // 2), max(1, micro_budget // 2)
            pending[:0] = [group[:len(group) // 2], group[len(group) // 2:]]
            continue
        for i, ids in zip(order, generated):
            answers[i] = (cut_answer(tokenizer.decode(ids, skip_special_tokens=True)), len(ids))
        if on_batch:
            on_batch(len(group))
    return answers


@torch.no_grad()
def generate_reference(model, tokenizer, prompt: torch.Tensor, max_new_tokens: int = 12) -> str:
    """One example through `model.generate`, greedy, as the seed did: the engine's yardstick."""
    device = next(model.parameters()).device
    embeds = prompt[None].to(device)
    out = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2],
                         dtype=torch.long, device=device), max_new_tokens=max_new_tokens,
                         do_sample=False, num_beams=1,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return cut_answer(tokenizer.decode(out[0], skip_special_tokens=True))
