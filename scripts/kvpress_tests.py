#!/usr/bin/env python
"""kvpress's own test suite, from its sdist, against the versions this project pins (newer than
kvpress declares): the check behind installing it with --no-deps. The presses run as they run
in latentwire, through `latentwire.field.adapt_kvpress` (the two attention-hook arguments
transformers 5 renamed or dropped, given back), which is applied before the suite starts.

    .venv/bin/python scripts/kvpress_tests.py .venv/src/kvpress-0.5.5     (or: make kvpress-tests)

Its tests load a tiny unit-test Llama from the Hugging Face hub, which this machine cannot
reach: the same architecture, built here at random and saved under that name, stands in for it
(its tests check what the presses do to the cache, not what the model says). Tests that need
another model, a tokenizer or a dataset from the hub, or a GPU, cannot run offline: they are
listed apart from real failures, and so are the failures of presses latentwire does not offer (NOT_OFFERED) and
those of the stand-in's random weights (STAND_IN). Exit code 1 when any test fails for
another reason.
"""

import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub request fails at once instead of retrying

UNIT_TEST_MODEL = "maxjeblick/llama2-0b-unit-test"
OFFLINE = ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "Cannot access gated repo",
           "couldn't connect", "Failed to resolve", "ConnectionError", "We couldn't connect",
           "Repository Not Found", "is not a local folder", "ConnectTimeout", "MaxRetryError")
# Failures that are not a press latentwire offers (latentwire.field.PRESSES) failing, each by
# the error it raises and why; any other failure is a failure.
NOT_OFFERED = {
    "ReadOnlyDynamicLayer.update() got an unexpected keyword argument 'kwargs'":
        "KVgradPress's read-only cache layer has transformers < 5's update()",
    "The version of PEFT you are using is not compatible":
        "RestoreKVPress's test adapter: transformers 5.24 asks peft >= 0.22, not released",
    "LlamaRotaryEmbedding.__init__() got an unexpected keyword argument 'device'":
        "KeyRerotationPress's yarn test builds its reference with transformers < 5's arguments",
}
# Failures of the stand-in's random weights, each by its test or error and what was measured.
STAND_IN = {
    "Could not find fake keys such that for every query q":
        "head-wise masking needs a key every query ignores; the random queries leave none",
    "test_block_press_is_streaming_top_k":
        "repeated tokens tie at layer 0 (with 256 distinct tokens every block size agrees)",
}


def stand_in(folder: Path) -> None:
    """The hub's unit-test Llama as a folder of real files under the name its tests load it by
    (a relative path from the working directory wins over the hub): a tiny Llama of the shapes
    its tests assert (2 layers, 2 key-value heads of 6), random weights, and the bundled
    model's tokenizer, which KVzip and the pipeline need."""
    import transformers

    from latentwire.models import bundled_gguf, convert_gguf

    tokenizer = transformers.AutoTokenizer.from_pretrained(convert_gguf(bundled_gguf()))
    tokenizer.chat_template = None  # as the hub model's: the pipeline then adds its newline
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=24, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    target = folder / UNIT_TEST_MODEL
    transformers.LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    for spelling in {UNIT_TEST_MODEL.split("/")[0], "MaxJeblick"} - {target.parent.name}:
        (folder / spelling).symlink_to(target.parent.name)


class Adapted:
    """A pytest plugin: the presses adapted as latentwire runs them."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session):
        from latentwire.field import adapt_kvpress

        adapt_kvpress()


class Outcomes:
    def __init__(self):
        self.by = defaultdict(list)

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            if report.outcome == "passed":
                self.by["passed"].append(report.nodeid)
            elif report.outcome == "skipped":
                self.by["skipped"].append(report.nodeid)
            else:
                text = str(report.longrepr)
                kind = ("needs the hub (offline)" if any(w in text for w in OFFLINE)
                        else "needs CUDA" if "CUDA" in text or "cuda" in text.split("\n")[-1]
                        else next((f"{kind}: {why}"
                                   for kind, known in (("not offered here", NOT_OFFERED),
                                                       ("random stand-in", STAND_IN))
                                   for error, why in known.items()
                                   if error in report.nodeid + text), "failed"))
                last = [line for line in text.splitlines() if line.startswith("E ")][-1:]
                self.by[kind].append(f"{report.nodeid}  {last[0][:160] if last else ''}")


def main() -> int:
    src = Path(sys.argv[1] if len(sys.argv) > 1 else ".venv/src/kvpress-0.5.5")
    if not (src / "tests").is_dir():
        print(f"error: {src} holds no tests/; run `make kvpress-tests`, which downloads the "
              "sdist there", file=sys.stderr)
        return 2
    src, outcomes = src.resolve(), Outcomes()
    with tempfile.TemporaryDirectory() as folder:
        stand_in(Path(folder))
        os.chdir(folder)
        # Its own configuration (not this project's, which makes a deprecation an error).
        pytest.main([str(src / "tests"), "-q", "-p", "no:cacheprovider", "-c",
                     str(src / "pyproject.toml"), "--rootdir", str(src), "--ignore",
                     str(src / "tests" / "integration")],
                    plugins=[Adapted(), outcomes])
    kinds = ["passed", "skipped", "needs the hub (offline)", "needs CUDA",
             *sorted(k for k in outcomes.by if k.startswith(("not offered", "random stand-in"))),
             "failed"]
    for kind in kinds:
        print(f"{kind}: {len(outcomes.by[kind])}")
    for kind in kinds[2:]:
        for line in outcomes.by[kind]:
            print(f"  [{kind}] {line}")
    return 1 if outcomes.by["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
