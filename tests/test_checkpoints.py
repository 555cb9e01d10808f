"""Checkpoints written by an earlier version still load and give the same latents.

tests/fixtures/checkpoints/ holds two `checkpoints/best` folders written at commit 661da13 (before
the compressor's spec became a typed class) by `latentwire train` on the tiny models of
conftest.py, 8 examples, batch 4:
- attn_rms: `--encoder attn --embed_transform rms_matching`, the tiny Llama alone;
- shared_pool: `--encoder pool --latent_dim 16 --model_id <tiny Llama>,<tiny Qwen2>`.
Beside each, expected.safetensors: a random input `x` (spans of 9, 5 and 12 tokens) and the
latents each answering model got from it under that version's code."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentwire.training import checkpoint
from latentwire.training.encoders import build
from latentwire.training.spec import CompressorSpec
from latentwire.vocab import VocabSpace

from .conftest import tiny_lm, tiny_qwen_lm

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"
LENGTHS = [9, 5, 12]


@pytest.mark.parametrize("name,answerers", [("attn_rms", None), ("shared_pool", [0, 1])])
def test_a_checkpoint_from_before_the_typed_spec_gives_the_same_latents(name, answerers):
    lms = [tiny_lm(), tiny_qwen_lm()]
    vocabs = [VocabSpace.from_model(lm.model, len(lm.tokenizer)) for lm in lms]
    weights, config = checkpoint.load(FIXTURES / name)
    spec = CompressorSpec.from_json(config["compressor"])
    assert spec.to_json() == config["compressor"]  # read back, it is written the same
    comp = build(spec, vocabs[0], lms[0].model,
                 {i: vocabs[i] for i in answerers} if answerers else None)
    comp.load_state_dict(weights)
    comp.eval()
    expected = load_file(FIXTURES / name / "expected.safetensors")
    with torch.no_grad():
        outs = comp.per_model(expected["x"], LENGTHS)
    assert len(outs) == len(answerers or [0])
    for i, (latents, _, _) in enumerate(outs):
        # The fixtures were written on another CPU, whose kernels may round the last bits
        # differently: the same maths, to float32's precision.
        torch.testing.assert_close(latents, expected[f"latents{i}"], rtol=1e-5, atol=1e-6)
