"""Shared fixtures: tiny randomly initialised models built in-process (no download), the
bundled model for the few integration tests, and the shared SQuAD file when it is present."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network
# The tests check the graph against direct fp32 computations. An unset --mixed_precision means
# bf16 autocast on a CPU that multiplies bf16 natively (AVX-512 BF16), fp32 elsewhere; capping
# oneDNN at AVX2 makes it fp32 in the test process and in every process it starts (the CLI's
# subprocesses, Ray's workers), on any CPU. bf16 is tested where a test asks for it.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
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


def byte_tokenizer():
    """A byte-level tokenizer with no merges: real text of any kind becomes real tokens (one a
    byte), so training runs on the built-in data with a tiny model. Id 0 is EOS."""
    from tokenizers import Tokenizer, decoders, models as tokenizer_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"</s>": 0, **{ch: i + 1 for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(tokenizer_models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>")
    # A chat template, so prompts have a shared prefix as the bundled model's do.
    fast.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    return fast


def tiny_lm(hidden=32, seed=0):
    """A tiny random Llama over the byte tokenizer, as the loader returns a model."""
    from latentwire.models import LoadedModel

    tok = byte_tokenizer()
    model = tiny_llama(vocab_size=len(tok), hidden=hidden, seed=seed)
    model.requires_grad_(False)
    return LoadedModel(model, tok, "tiny-byte-llama", "cpu", "float32")


def saved(lm, tmp_path_factory):
    """A loaded tiny model written as a model directory, for commands run as processes."""
    path = tmp_path_factory.mktemp(lm.name)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


def unloadable_model(folder: Path) -> str:
    """A model folder that passes the command's up-front checks (it holds a config.json) but
    holds no model: a test that proves a refusal comes before any load fails if one happens."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    return str(folder)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny byte-level Llama saved as a model directory."""
    return saved(tiny_lm(), tmp_path_factory)


def other_byte_tokenizer():
    """Another vocabulary for the same text: byte-level with a few merges, the bytes in reverse
    id order, EOS last, and its own chat template, so no token id means what it means to
    byte_tokenizer()."""
    from tokenizers import Tokenizer, decoders, models as tokenizer_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), reverse=True)
    merges = [("t", "h"), ("th", "e"), ("i", "n"), ("a", "n")]
    vocab = {ch: i for i, ch in enumerate(alphabet + ["".join(m) for m in merges] + ["<|end|>"])}
    tok = Tokenizer(tokenizer_models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<|end|>")
    fast.chat_template = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                          "{% if add_generation_prompt %}[assistant] {% endif %}")
    return fast


def tiny_qwen_lm(hidden=48, seed=1):
    """A tiny random Qwen2 over other_byte_tokenizer(): another architecture, width and
    vocabulary than tiny_lm()'s, as the loader returns a model."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from latentwire.models import LoadedModel

    tok = other_byte_tokenizer()
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, tie_word_embeddings=False)).eval()
    model.requires_grad_(False)
    return LoadedModel(model, tok, "tiny-other-qwen2", "cpu", "float32")


@pytest.fixture(scope="session")
def tiny_qwen_other_dir(tmp_path_factory):
    """tiny_qwen_lm() saved as a model directory."""
    return saved(tiny_qwen_lm(), tmp_path_factory)
