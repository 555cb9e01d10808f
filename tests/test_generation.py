"""The engine against one `model.generate` per example, on tiny random models of several
architectures: packed prefill where the attention allows it, the padded path where it does not."""

import pytest
import torch

from latentwire.generation import StopTokens, generate, generate_reference

from .conftest import tiny_tokenizer

VOCAB = 512


def _model(kind: str):
    import transformers as tf

    shared = dict(vocab_size=VOCAB, eos_token_id=0, bos_token_id=0, pad_token_id=0,
                  tie_word_embeddings=False)
    decoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    configs = {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**shared, **decoder)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**shared, **decoder)),
        # A window shorter than the prompts, so attending beyond it would change the answers.
        "mistral_sliding": lambda: tf.MistralForCausalLM(
            tf.MistralConfig(**shared, **decoder, sliding_window=12)),
        # Soft-capped attention logits, in a plain cache: the packed pass must refuse, then pad.
        "gemma2_softcap": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(
            **shared, **decoder, head_dim=8, attn_logit_softcapping=30.0,
            layer_types=["full_attention"] * 2)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(**shared, n_embd=32, n_layer=2,
                                                         n_head=4, n_positions=256)),
    }
    torch.manual_seed(0)
    model = configs[kind]().eval()
    # Decisive logits: at the default init a random model's logits are so flat that batching's
    # rounding could flip greedy ties, which would test the tie, not the engine.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40)
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral_sliding", "gemma2_softcap", "gpt2"])
@pytest.mark.parametrize("with_prefix", [True, False])
def test_engine_matches_generate_on_tiny_models(kind, with_prefix):
    model, tok = _model(kind), tiny_tokenizer(VOCAB)
    embed = model.get_input_embeddings()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        prompts = [embed(torch.randint(2, VOCAB, (n,), generator=g))
                   for n in torch.randint(3, 40, (20,), generator=g).tolist()]
        prefix = embed(torch.randint(2, VOCAB, (9,), generator=g)) if with_prefix else None
    # Small budgets: several decode groups, prefill passes that split prompts between them.
    answers = generate(model, tok, prompts, StopTokens(tok, model, VOCAB), 12, token_budget=200,
                       prefix=prefix, prefill_tokens=37)
    reference = [generate_reference(model, tok, p if prefix is None else torch.cat([prefix, p]), 12)
                 for p in prompts]
    assert [a for a, _ in answers] == reference
    assert any(len(a.split()) > 3 for a in reference)  # long answers, not only early stops


class _PreRenameModel(torch.nn.Module):
    """A model whose forward knows its cache only as `past_key_values`, as remote code written
    before transformers renamed it to `cache` does."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config
        self.generation_config = model.generation_config
        self.set_attn_implementation = model.set_attn_implementation

    def forward(self, input_ids=None, inputs_embeds=None, past_key_values=None, **kwargs):
        return self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, cache=past_key_values,
                          **kwargs)


def test_engine_passes_the_cache_under_the_name_the_model_takes():
    model, tok = _model("llama"), tiny_tokenizer(VOCAB)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        prompts = [model.get_input_embeddings()(torch.randint(2, VOCAB, (n,), generator=g))
                   for n in (5, 17, 30)]
    stops = StopTokens(tok, model, VOCAB)
    assert generate(_PreRenameModel(model), tok, prompts, stops, 12) == generate(
        model, tok, prompts, stops, 12)


class _SmallMemoryModel(_PreRenameModel):
    """A model that runs out of memory, in the CPU allocator's words, on more than two rows."""

    def forward(self, input_ids=None, inputs_embeds=None, past_key_values=None, **kwargs):
        rows = (inputs_embeds if inputs_embeds is not None else input_ids).shape[0]
        if rows > 2:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                               "can't allocate memory: you tried to allocate 8589934592 bytes.")
        return super().forward(input_ids, inputs_embeds, past_key_values, **kwargs)


class _Failing(_PreRenameModel):
    def forward(self, *args, **kwargs):
        raise RuntimeError("something else")


def test_out_of_memory_splits_the_group_and_the_answers_stay_the_same():
    model, tok = _model("llama"), tiny_tokenizer(VOCAB)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        prompts = [model.get_input_embeddings()(torch.randint(2, VOCAB, (n,), generator=g))
                   for n in (5, 9, 17, 30, 12, 8)]
    stops = StopTokens(tok, model, VOCAB)
    assert generate(_SmallMemoryModel(model), tok, prompts, stops, 12) == generate(
        model, tok, prompts, stops, 12)
    with pytest.raises(RuntimeError, match="something else"):  # other errors are not retried
        generate(_Failing(model), tok, prompts, stops, 12)
