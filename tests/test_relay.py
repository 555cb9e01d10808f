"""The text relay (`relay:<compressor>`): a text compressor's output, compressed once in one
model's tokens, read by another model in its own tokens at the position budget latents made
from the first model's tokens would have. Read by its own source it is the compressor exactly;
read by another, it is that model's tokens of the same text, cut to the budget; a run trains
the reader's own adapter on it; a study over two models runs it once per model."""

import json
from dataclasses import replace

import pytest
import torch

from latentwire import models
from latentwire.cli import main
from latentwire.errors import UsageError
from latentwire.field import Relay, Sentences, Truncate, budget
from latentwire.training.loop import run
from latentwire.training.options import TrainOptions, validate
from latentwire.training.trainer import Trainer

from .conftest import byte_tokenizer, other_byte_tokenizer, tiny_lm, tiny_qwen_lm

CONTEXT = ("Context: The river runs north of the town. Then the mill stands on an island. "
           "Anna built the bridge in 1850, and the mill burned in 1901.\n")
QUESTION = "Who built the bridge?"


def quiet(*args, **kwargs):
    pass


@pytest.mark.parametrize("inner", [Truncate(), Sentences()])
def test_a_relay_read_by_its_own_source_is_its_compressor_exactly(inner):
    tok = byte_tokenizer()
    span = tok(CONTEXT, add_special_tokens=False).input_ids
    relay = Relay(inner=inner, source_tokenizer=tok, source_id="a")
    assert relay.query_aware == inner.query_aware
    assert (relay.select([span], [CONTEXT], [QUESTION], 4, tok, "a")
            == inner.select([span], [CONTEXT], [QUESTION], 4, tok, "a"))


@pytest.mark.parametrize("source, reader", [(byte_tokenizer, other_byte_tokenizer),
                                            (other_byte_tokenizer, byte_tokenizer)])
def test_another_model_reads_the_same_text_in_its_own_tokens_within_the_latents_budget(
        source, reader):
    """byte_tokenizer gives one token per byte, other_byte_tokenizer merges a few pairs: the
    text relayed to the merging one fits in fewer tokens than the budget; relayed the other
    way it takes more and is cut to the budget, a prefix of the text."""
    src, mine = source(), reader()
    theirs = src(CONTEXT, add_special_tokens=False).input_ids
    relay = Relay(inner=Sentences(), source_tokenizer=src, source_id="a")
    own = mine(CONTEXT, add_special_tokens=False).input_ids
    [got] = relay.select([own], [CONTEXT], [QUESTION], 4, mine, "b")
    [kept] = Sentences().select([theirs], [CONTEXT], [QUESTION], 4, src, "a")
    text, limit = src.decode(kept), budget(len(theirs), 4)
    assert "built the bridge" in text  # of the sentence the question asks about
    assert len(got) <= limit and text.startswith(mine.decode(got))
    everything = mine(text, add_special_tokens=False).input_ids
    assert got == everything[:limit]
    assert (len(everything) > limit) == (reader is byte_tokenizer)


def options(tmp_path, **kw):
    base = dict(model_id="qwen", encoder_model="llama", encoder="relay:truncate",
                compression=4.0, keep_question=True, samples=8, eval_samples=4, batch_size=4,
                epochs=1, lr=1e-2, max_new_tokens=3, output_dir=str(tmp_path / "run"))
    return TrainOptions(**{**base, **kw})


def test_a_relay_run_trains_the_readers_own_adapter_on_its_tokens_of_the_text(tmp_path):
    lms = {"llama": tiny_lm(), "qwen": tiny_qwen_lm()}
    opts = options(tmp_path)
    t = Trainer(opts, validate(opts), quiet, lms)
    qwen, llama = lms["qwen"].tokenizer, lms["llama"].tokenizer
    assert t.reader is t.answerers[0] and t.reader.model_id == "qwen"
    assert not t.spec.shared and t.spec.d_model == lms["qwen"].model.config.hidden_size
    for item in t.reader.train_items + t.reader.eval_items:
        context = t.reader.fmt.context_text(item.example.context)
        theirs = llama(context, add_special_tokens=False).input_ids
        keep = budget(len(theirs), 4.0)
        assert item.span == qwen(llama.decode(theirs[:keep]),
                                 add_special_tokens=False).input_ids[:keep]
    before = {k: v.clone() for k, v in lms["qwen"].model.state_dict().items()}
    loss, _ = t.loss(range(4))
    loss.backward()
    assert all(p.grad is not None for p in t.params)
    assert all(torch.equal(before[k], v) for k, v in lms["qwen"].model.state_dict().items())
    assert run(replace(opts, output_dir=str(tmp_path / "whole")), quiet, lms) == 0
    config = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert config["provenance"]["field_compressor"]["relay_from"] == "llama"


def test_a_relay_over_several_models_in_one_run_is_refused_in_one_line(tmp_path):
    with pytest.raises(UsageError, match="gives each model its own text"):
        validate(options(tmp_path, model_id="llama,qwen", encoder_model=None))
    with pytest.raises(UsageError, match="drop --keep_question"):
        validate(options(tmp_path, encoder="relay:longllmlingua"))


def test_a_study_over_two_models_relays_to_each_from_the_first(tmp_path, tiny_model_dir,
                                                                tiny_qwen_other_dir):
    ids = [str(tiny_model_dir), str(tiny_qwen_other_dir)]
    names = [models.model_dirname(m) for m in ids]
    args = ["study", "--model_id", ",".join(ids), "--encoders", "relay:truncate",
            "--compressions", "4", "--settings", "agnostic", "--samples", "0",
            "--eval_samples", "3", "--max_new_tokens", "2", "--output_dir", str(tmp_path)]
    assert main(args) == 0
    for name, m in zip(names, ids):
        config = json.loads(
            (tmp_path / f"agnostic/relay:truncate_x4-{name}" / "config.json").read_text())
        assert config["options"]["model_id"] == m
        assert config["provenance"]["field_compressor"]["relay_from"] == ids[0]
    rows = json.loads((tmp_path / "study.json").read_text())["rows"]
    relayed = [(r["encoder"], r["model"]) for r in rows if r["encoder"] == "relay:truncate"]
    assert relayed == [("relay:truncate", n) for n in names]
    assert f"| agnostic | relay:truncate | {names[1]} |" in (tmp_path / "study.md").read_text()
