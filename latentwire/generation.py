"""How a batch is generated: greedy decoding from `inputs_embeds`, batched and length-sorted.

`generate` is the engine: prompts are sorted by length so each batch pads little, left-padded
with explicit position ids so padding changes nothing, and a batch stops as soon as every row has
finished its answer (EOS or a newline: the answer is the first line). `generate_reference` is the
plain loop the seed ran, one `model.generate` per example; tests and the benchmark compare them.
"""

import inspect

import torch

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
        self.table = torch.zeros(vocab_size, dtype=torch.bool)
        self.table[[i for i in ids if i < vocab_size]] = True


def default_token_budget(model) -> int:
    """Prompt tokens per batch: a fixed size on CPU; on CUDA, what fits in free memory."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        # Measured on a 2-core CPU with a 135M model: prefill runs at ~85% of the matmul peak
        # up to ~4k tokens a batch and loses a third of that at 8k, while decoding 16 rows at
        # once costs 5 ms a row-step against 37 ms for one row alone.
        return 4096
    cfg = model.config
    free, _ = torch.cuda.mem_get_info(device)
    elt = next(model.parameters()).element_size()
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * heads * head_dim * elt
    activations = 6 * max(cfg.hidden_size, getattr(cfg, "intermediate_size", 0)) * elt
    return int(max(512, min(262144, 0.5 * free / (kv + activations))))


def _takes_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.no_grad()
def _generate_batch(model, prompts: list[torch.Tensor], stops: StopTokens, max_new_tokens: int,
                    pad_id: int) -> list[list[int]]:
    device = next(model.parameters()).device
    lengths = [p.shape[0] for p in prompts]
    batch, width = len(prompts), max(lengths)
    embeds = torch.zeros(batch, width, prompts[0].shape[1], dtype=prompts[0].dtype, device=device)
    mask = torch.zeros(batch, width, dtype=torch.long, device=device)
    for row, (p, n) in enumerate(zip(prompts, lengths)):
        embeds[row, width - n:] = p
        mask[row, width - n:] = 1
    # Positions count real tokens only, so a left-padded row sees the positions it would alone.
    positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
    extra = {"logits_to_keep": 1} if _takes_logits_to_keep(model) else {}
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                use_cache=True, **extra)
    stop_table = stops.table.to(device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    steps = []
    for step in range(max_new_tokens):
        token = out.logits[:, -1].argmax(dim=-1)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        steps.append(token)
        finished |= stop_table[token.clamp_max(len(stop_table) - 1)] & (token < len(stop_table))
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                    past_key_values=out.past_key_values, use_cache=True, **extra)
    tokens = torch.stack(steps, dim=1).tolist()
    result = []
    for row in tokens:
        # Keep everything up to and including the first stop token; the rest is padding.
        end = next((i + 1 for i, t in enumerate(row) if t < len(stop_table) and stop_table[t]),
                   len(row))
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


def generate(model, tokenizer, prompts: list[torch.Tensor], stops: StopTokens,
             max_new_tokens: int = 12, token_budget: int | None = None,
             on_batch=None) -> list[tuple[str, int]]:
    """(answer, generated token count) for every prompt, in the order given; the answer is the
    first line of the greedy generation, stripped.

    On a CUDA out-of-memory error the token budget is halved and the batch retried, so a batch
    size that was too hopeful costs a retry, not the run.
    """
    budget = token_budget or default_token_budget(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    answers: list[tuple[str, int] | None] = [None] * len(prompts)
    pending = plan_batches([p.shape[0] for p in prompts], budget)
    while pending:
        batch = pending.pop(0)
        try:
            generated = _generate_batch(model, [prompts[i] for i in batch], stops,
                                        max_new_tokens, pad_id)
        except torch.OutOfMemoryError:
            if len(batch) == 1:
                raise
            torch.cuda.empty_cache()
            budget = max(1, budget // 2)
            half = len(batch) // 2
            pending[:0] = [batch[:half], batch[half:]]
            continue
        for i, ids in zip(batch, generated):
            answers[i] = (cut_answer(tokenizer.decode(ids, skip_special_tokens=True)), len(ids))
        if on_batch:
            on_batch(len(batch))
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
