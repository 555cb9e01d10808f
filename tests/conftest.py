"""Shared fixtures: tiny randomly initialised models built in-process (no download), the
bundled model for the few integration tests, and the shared SQuAD file when it is present."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network
torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parent.parent
SHARED_SQUAD = ROOT.parent / "shared" / "data" / "squad-v2-dev-5-articles.json"


def tiny_llama(vocab_size=512, hidden=32, embed_scale=None, seed=0):
    """A random 2-layer Llama; with embed_scale, its embedding module multiplies its output the
    way Gemma-style models do, so inputs_embeds space differs from the raw weight table."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    if embed_scale is not None:
        class ScaledEmbedding(torch.nn.Embedding):
            def forward(self, ids):
                return super().forward(ids) * embed_scale

        scaled = ScaledEmbedding(vocab_size, hidden)
        scaled.weight = model.model.embed_tokens.weight
        model.model.embed_tokens = scaled
    return model


def tiny_tokenizer(vocab_size=512):
    """A word-level tokenizer over the tiny models' vocabulary: id 0 is EOS, id 1 a newline."""
    from tokenizers import Tokenizer, models as tokenizer_models
    from transformers import PreTrainedTokenizerFast

    vocab = {"</s>": 0, "\n": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="</s>")),
        eos_token="</s>", pad_token="</s>")


@pytest.fixture(scope="session")
def bundled():
    """The bundled SmolLM2-135M-Instruct, loaded once for the session."""
    from latentwire import models

    try:
        models.bundled_gguf()
    except Exception as err:
        pytest.skip(f"bundled model not installed: {err}")
    return models.load(models.BUNDLED, "cpu")


@pytest.fixture
def squad_file():
    if not SHARED_SQUAD.is_file():
        pytest.skip("shared SQuAD sample not present")
    return SHARED_SQUAD
