"""How a batch is generated: greedy decoding from `inputs_embeds`, batched and length-sorted.

`generate` is the engine. The prompt start every example shares is computed once and its KV
cache reused. Prompts are sorted by length into decode groups; a group's prompts are prefilled
packed end to end with no padding, in passes of a few hundred tokens (fast on CPU), each layer
writing its keys and values straight into the group's one cache, where every prompt ends at the
same column; the group then decodes as one wide batch (cheap per row) and stops as soon as every
row has finished its answer (EOS or a newline: the answer is the first line). Models whose
attention a packed pass cannot reproduce (sliding windows, hybrid state) are left-padded with
explicit position ids instead. `generate_reference` is the plain loop the seed ran, one
`model.generate` per example; tests and the benchmark compare them.
"""

import inspect
from contextlib import contextmanager
from dataclasses import dataclass

from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size
import torch
from transformers import AttentionInterface, AttentionMaskInterface
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
    """(decode-group tokens, prefill pass tokens) for the model's device.

    On CPU, measured with a 135M model on 2 cores: padded prefill ran at ~85% of the matmul peak
    in micro-batches of ~1k tokens and lost a quarter of that at 4k; packed passes of 1k to 6k
    tokens measured within noise of each other, so 1k stays. Decoding 32 rows at once costs 4 ms
    a row-step against 37 ms for one row alone; so prefill small, decode wide.
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


def cache_argument(model) -> str:
    """The keyword the model's forward takes its cache under. transformers renamed
    `past_key_values` to `cache` (the old name warns, and goes in 5.40); older versions, and remote
    code written for them, know only the old name and would take `cache` as an unknown keyword:
    an error, or worse, ignored, and every step decoded without its history."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(out):
    """The cache a forward pass returned: `cache` since the rename (reading `past_key_values`
    warns), `past_key_values` before it."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


class _InPlaceLayer(DynamicLayer):
    """A cache layer over a buffer with room reserved up front, written in place. The default
    layer concatenates its whole history on every token: on CPU that copying was 55% of a decode
    step (profiled: 32 rows x 230 cached tokens, SmolLM2-135M)."""

    def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int):
        super().__init__()
        self._keys, self._values, self._length = key_buffer, value_buffer, length
        self.dtype, self.device, self.is_initialized = key_buffer.dtype, key_buffer.device, True
        self.keys, self.values = key_buffer[:, :, :length], value_buffer[:, :, :length]

    def update(self, key_states, value_states, *args, **kwargs):
        end = self._length + key_states.shape[-2]
        self._keys[:, :, self._length:end] = key_states
        self._values[:, :, self._length:end] = value_states
        self._length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values


def plain_kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The per-layer key/value tensors of a cache made only of plain growing layers, or None
    (sliding windows, recurrent or hybrid state): such caches are neither shared nor batched
    into one buffer."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(type(l) in (DynamicLayer, _InPlaceLayer) for l in layers):
        return None
    return [(l.keys, l.values) for l in layers]


def _cache(model, layers: list[_InPlaceLayer]):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    cache.layers[:] = layers
    return cache


@dataclass
class _Prefilled:
    """A batch after its prompt pass: the first generated token and the state to continue."""
    token: torch.Tensor  # [b]
    cache: object
    mask: torch.Tensor  # [b, cache width]
    position: torch.Tensor  # [b, 1]: position of the last prompt token


def _keep_only(extra, positions: torch.Tensor) -> dict:
    """`logits_to_keep` for the given sequence positions, as an index tensor: the model then
    gathers them into a contiguous block and its LM head is one matrix multiply; as the int 1 it
    is a strided view that the head multiplies row by row (measured: 24 ms against 4 ms for
    7 rows, 49k vocab). Empty for models that compute every position's logits."""
    return {"logits_to_keep": positions} if extra else {}


@torch.no_grad()
def _prefill(model, prompts, extra) -> _Prefilled:
    """One forward pass over left-padded prompts, in the model's own cache: the path for models
    whose attention or cache a packed pass cannot reproduce (sliding windows, hybrid state).

    Position ids count real tokens only and the mask hides the padding, so each row computes
    what it would alone.
    """
    device = next(model.parameters()).device
    lengths = [p.shape[0] for p in prompts]
    width = max(lengths)
    embeds = torch.zeros(len(prompts), width, prompts[0].shape[1], dtype=prompts[0].dtype,
                         device=device)
    mask = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for row, (p, n) in enumerate(zip(prompts, lengths)):
        embeds[row, width - n:] = p
        mask[row, width - n:] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                **_keep_only(extra, torch.tensor([width - 1], device=device)))
    return _Prefilled(out.logits[:, -1].argmax(dim=-1), returned_cache(out), mask,
                      positions[:, -1:])


PACKED_ATTENTION = "latentwire_packed"


class _CannotPack(Exception):
    """The model's attention does more than a packed pass reproduces."""


class _PackedPass:
    """One prefill pass over several prompts' tokens laid end to end, with no padding.

    In every layer the new keys and values go straight into the decode group's buffers, at each
    token's (row, column); each span's queries then attend within their row: the prefix, the
    prompt's tokens from earlier passes, and its own tokens up to themselves.
    """

    def __init__(self, buffers, spans, starts: list[int], offset: int, device):
        self.buffers, self.layers_seen = buffers, 0
        self.rows = torch.cat([torch.full((b - a,), r, dtype=torch.long) for r, a, b in spans])
        self.columns = torch.cat([torch.arange(starts[r] + offset + a, starts[r] + offset + b)
                                  for r, a, b in spans])
        self.rows, self.columns = self.rows.to(device), self.columns.to(device)
        self.segments, t = [], 0
        for r, a, b in spans:
            # Key j (from the row's first column) is visible to the span's query i iff
            # j <= offset + a + i: the prefix, earlier tokens, and itself.
            visible = torch.ones(b - a, offset + b, dtype=torch.bool, device=device).tril(offset + a)
            self.segments.append((t, t + b - a, r, starts[r], starts[r] + offset + b, visible))
            t += b - a


def _packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      latentwire_pass: _PackedPass | None = None, **kwargs):
    """Attention for a packed pass ([1, heads, tokens, dim] in, [1, tokens, heads, dim] out).
    Its arguments in transformers' order (dropout before scaling), which wrappers that pass
    dropout by position rely on (kvpress wraps every registered attention function)."""
    if latentwire_pass is None or dropout or getattr(module, "layer_idx", None) is None or any(
            kwargs.get(k) is not None for k in ("sliding_window", "softcap", "s_aux", "position_bias")):
        raise _CannotPack
    p = latentwire_pass
    keys, values = p.buffers[module.layer_idx]
    keys[p.rows, :, p.columns] = key[0].transpose(0, 1)
    values[p.rows, :, p.columns] = value[0].transpose(0, 1)
    out = [torch.nn.functional.scaled_dot_product_attention(
        query[:, :, t0:t1], keys[r:r + 1, :, lo:hi], values[r:r + 1, :, lo:hi], attn_mask=visible,
        scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
        for t0, t1, r, lo, hi, visible in p.segments]
    p.layers_seen += 1
    return torch.cat(out, dim=2).transpose(1, 2), None


AttentionInterface.register(PACKED_ATTENTION, _packed_attention)
# Each span's mask is built by the pass itself; the model need not build one.
AttentionMaskInterface.register(PACKED_ATTENTION, lambda *args, **kwargs: None)


@contextmanager
def _packed_attention_on(model):
    """The model runs the packed attention inside the block and its own again after it."""
    original = model.config._attn_implementation
    try:
        model.set_attn_implementation(PACKED_ATTENTION)
    except Exception as err:  # a model that cannot switch: pad instead
        raise _CannotPack from err
    try:
        if model.config._attn_implementation != PACKED_ATTENTION:
            raise _CannotPack
        yield
    finally:
        model.set_attn_implementation(original)


@torch.no_grad()
def _packed_prefill(model, prompts, prefix_kv, layout, budget: int, room: int,
                    extra) -> _Prefilled:
    """A decode group's prompts, prefilled in passes of `budget` tokens with no padding at all
    (a long prompt may continue in the next pass), straight into the group's cache buffers.

    Row layout: [gap][prefix][prompt][room]; every prompt ends at the same column, so decoding
    appends to all rows at once, and the mask hides the gap. Raises _CannotPack if the model's
    layers did not all run the packed attention.
    """
    device = layout[0][0].device
    offset = prefix_kv[0][0].shape[2] if prefix_kv else 0
    lengths = [p.shape[0] for p in prompts]
    rows, width = len(prompts), max(lengths)
    starts = [width - n for n in lengths]
    buffers = [(k.new_empty(rows, k.shape[1], offset + width + room, k.shape[3]),
                v.new_empty(rows, v.shape[1], offset + width + room, v.shape[3]))
               for k, v in layout]
    # Zeros, not garbage, in the gaps: the mask hides them, but attention still multiplies them
    # by 0, and 0 x NaN is NaN. The room is written before it is read. (Zeroing whole buffers
    # cost 0.1 s per 32 prompts.)
    gap_rows = torch.arange(rows).repeat_interleave(torch.tensor(starts)).to(device)
    gap_cols = torch.cat([torch.arange(s) for s in starts]).to(device)
    for k, v in buffers:
        k[gap_rows, :, gap_cols] = 0
        v[gap_rows, :, gap_cols] = 0
    if offset:
        at_rows = torch.arange(rows, device=device).repeat_interleave(offset)
        at_cols = torch.cat([torch.arange(s, s + offset) for s in starts]).to(device)
        for (k, v), (pk, pv) in zip(buffers, prefix_kv):
            k[at_rows, :, at_cols] = pk[0].transpose(0, 1).repeat(rows, 1, 1)
            v[at_rows, :, at_cols] = pv[0].transpose(0, 1).repeat(rows, 1, 1)
    passes, spans, filled = [], [], 0
    for r, n in enumerate(lengths):
        a = 0
        while a < n:
            b = min(n, a + budget - filled)
            spans.append((r, a, b))
            filled, a = filled + b - a, b
            if filled == budget:
                passes.append(spans)
                spans, filled = [], 0
    if spans:
        passes.append(spans)
    first = torch.empty(rows, dtype=torch.long, device=device)
    for spans in passes:
        packed = _PackedPass(buffers, spans, starts, offset, device)
        embeds = torch.cat([prompts[r][a:b] for r, a, b in spans])[None].to(device)
        ends = [(r, t1 - 1) for (r, a, b), (t0, t1, *_) in zip(spans, packed.segments)
                if b == lengths[r]]
        keep = torch.tensor([t for _, t in ends], dtype=torch.long, device=device)
        out = model(inputs_embeds=embeds,
                    position_ids=torch.cat([torch.arange(offset + a, offset + b)
                                            for r, a, b in spans])[None].to(device),
                    use_cache=False, latentwire_pass=packed,
                    **_keep_only(extra, keep))
        if packed.layers_seen != len(buffers):
            raise _CannotPack
        if ends:
            first[[r for r, _ in ends]] = (out.logits[0] if extra else out.logits[0, keep]).argmax(-1)
    mask = torch.zeros(rows, offset + width, dtype=torch.long, device=device)
    for r, s in enumerate(starts):
        mask[r, s:] = 1
    positions = torch.tensor(lengths, device=device)[:, None] + offset - 1
    cache = _cache(model, [_InPlaceLayer(k, v, offset + width) for k, v in buffers])
    return _Prefilled(first, cache, mask, positions)


@torch.no_grad()
def _decode(model, state: _Prefilled, stops: StopTokens, max_new_tokens: int, pad_id: int,
            extra) -> list[list[int]]:
    """Greedy decoding until every row has hit a stop token or the token limit."""
    stop_table = stops.table.to(state.token.device)
    n_stop = len(stop_table)

    def is_stop(t):
        return stop_table[t.clamp_max(n_stop - 1)] & (t < n_stop)

    token, mask, position, cache = state.token, state.mask, state.position, state.cache
    keyword = cache_argument(model)
    finished = is_stop(token)
    steps = [token]
    for _ in range(max_new_tokens - 1):
        if bool(finished.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                    use_cache=True, **{keyword: cache}, **extra)
        cache = returned_cache(out)
        token = torch.where(finished, torch.full_like(token, pad_id), out.logits[:, -1].argmax(-1))
        steps.append(token)
        finished |= is_stop(token)
    result = []
    for row in torch.stack(steps, dim=1).tolist():
        # Everything up to and including the first stop token; the rest is padding.
        end = next((i + 1 for i, t in enumerate(row) if t in stops.ids), len(row))
        result.append(row[:end])
    return result


@torch.no_grad()
def answer_from_caches(model, caches: list, positions: list[int], rests: list[torch.Tensor],
                       stops: StopTokens, max_new_tokens: int, pad_id: int = 0) -> list[list[int]]:
    """Greedy answer tokens for prompts that each already sit in a cache of their own, of any
    length (as a press leaves it): row i reads `rests[i]` (embeddings) from position
    `positions[i]` on, alone, then the rows decode together, left-padded to the longest cache,
    MAX_DECODE_ROWS at a time. One row at a time, each step would read every weight for one
    token. The caches grow by their rest."""
    from transformers import DynamicCache

    device, name = next(model.parameters()).device, cache_argument(model)
    answers = []
    for at in range(0, len(caches), MAX_DECODE_ROWS):
        rows = range(at, min(at + MAX_DECODE_ROWS, len(caches)))
        first, last = [], []
        for r in rows:
            n = rests[r].shape[0]
            out = model(inputs_embeds=rests[r][None].to(device), use_cache=True,
                        position_ids=torch.arange(positions[r], positions[r] + n,
                                                  device=device)[None],
                        logits_to_keep=1, **{name: caches[r]})
            first.append(int(out.logits[0, -1].argmax()))
            last.append(positions[r] + n - 1)
        lengths = [caches[r].get_seq_length() for r in rows]
        width = max(lengths)
        batch = DynamicCache(config=model.config)
        for layer in range(len(caches[rows[0]].layers)):
            # Zeros in the gaps, not garbage: masked, yet multiplied by 0 (0 x NaN is NaN).
            keys, values = ([torch.nn.functional.pad(getattr(caches[r].layers[layer], part),
                                                     (0, 0, width - n, 0))
                             for r, n in zip(rows, lengths)] for part in ("keys", "values"))
            batch.update(torch.cat(keys), torch.cat(values), layer)
        mask = torch.zeros(len(lengths), width, dtype=torch.long, device=device)
        for i, n in enumerate(lengths):
            mask[i, width - n:] = 1
        state = _Prefilled(torch.tensor(first, device=device), batch, mask,
                           torch.tensor(last, device=device)[:, None])
        answers += _decode(model, state, stops, max_new_tokens, pad_id, {})
    return answers


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
    `token_budget` tokens) is prefilled in passes of `prefill_tokens` and decoded as one.
    On an out-of-memory error both budgets are halved and the group retried in halves, so a
    batch size that was too hopeful costs a retry, not the run.
    """
    group_budget, pass_budget = default_budgets(model)
    group_budget = token_budget or group_budget
    pass_budget = min(prefill_tokens or pass_budget, group_budget)
    extra = {"logits_to_keep": 1} if _takes_logits_to_keep(model) else {}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    # The cache's shape per layer: the prefix's own, or a one-token pass's when there is none.
    start = prefix if prefix is not None and prefix.shape[0] else prompts[0][:1]
    with torch.no_grad():
        out = model(inputs_embeds=start[None].to(device), use_cache=True, **extra)
    layout = plain_kv(returned_cache(out))
    prefix_kv = layout if start is prefix else None
    if layout is None and start is prefix:  # a cache we cannot share: the prefix goes back in
        prompts = [torch.cat([prefix, p]) for p in prompts]
    answers: list[tuple[str, int] | None] = [None] * len(prompts)
    lengths = [p.shape[0] for p in prompts]
    pending = plan_batches(lengths, group_budget, MAX_DECODE_ROWS)
    while pending:
        group = pending.pop(0)
        try:
            if layout is not None:
                with _packed_attention_on(model):
                    state = _packed_prefill(model, [prompts[i] for i in group], prefix_kv,
                                            layout, pass_budget, max_new_tokens, extra)
                order, generated = group, _decode(model, state, stops, max_new_tokens, pad_id,
                                                  extra)
            else:
                micro = [[group[j] for j in mb] for mb in
                         plan_batches([lengths[i] for i in group], pass_budget)]
                order = [i for mb in micro for i in mb]
                generated = [g for mb in micro for g in _decode(
                    model, _prefill(model, [prompts[i] for i in mb], extra), stops,
                    max_new_tokens, pad_id, extra)]
        except _CannotPack:  # attention that a packed pass cannot reproduce: pad, from now on
            if prefix_kv is not None:
                prompts = [torch.cat([prefix, p]) for p in prompts]
                lengths = [p.shape[0] for p in prompts]
            layout = prefix_kv = None
            pending.insert(0, group)
            continue
        except RuntimeError as err:
            # accelerate's test of an out-of-memory error, on any device (CPU's too); a group
            # is split rather than the whole call retried, as find_executable_batch_size would.
            if len(group) == 1 or not should_reduce_batch_size(err):
                raise
            clear_device_cache()
            group_budget, pass_budget = max(1, group_budget // 2), max(1, pass_budget // 2)
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
