#!/usr/bin/env python
"""kvpress's own test suite, from its sdist, against the versions this project pins (newer than
kvpress declares): the check behind installing it with --no-deps.

    .venv/bin/python scripts/kvpress_tests.py .venv/src/kvpress-0.5.5     (or: make kvpress-tests)

Its tests load a tiny unit-test Llama from the Hugging Face hub, which this machine cannot
reach: the same architecture, built here at random, stands in for it (its tests check what the
presses do to the cache, not what the model says). Tests that need another model, a tokenizer
or a dataset from the hub, or a GPU, cannot run offline: they are listed apart from real
failures. Exit code 1 when any test fails for another reason.
"""

import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

UNIT_TEST_MODEL = "maxjeblick/llama2-0b-unit-test"
OFFLINE = ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "Cannot access gated repo",
           "couldn't connect", "Failed to resolve", "ConnectionError", "We couldn't connect",
           "Repository Not Found", "is not a local folder", "ConnectTimeout", "MaxRetryError")


class StandIn:
    """A pytest plugin: the hub's unit-test Llama as a tiny random Llama built in process."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session):
        import transformers

        original = transformers.AutoModelForCausalLM.from_pretrained.__func__

        def from_pretrained(cls, name, *args, **kwargs):
            if str(name).lower() != UNIT_TEST_MODEL:
                return original(cls, name, *args, **kwargs)
            torch.manual_seed(0)
            config = transformers.LlamaConfig(
                vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
            if kwargs.get("attn_implementation"):
                config._attn_implementation = kwargs["attn_implementation"]
            return transformers.LlamaForCausalLM(config)

        transformers.AutoModelForCausalLM.from_pretrained = classmethod(from_pretrained)


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
                        else "failed")
                last = [line for line in text.splitlines() if line.startswith("E ")][-1:]
                self.by[kind].append(f"{report.nodeid}  {last[0][:160] if last else ''}")


def main() -> int:
    src = Path(sys.argv[1] if len(sys.argv) > 1 else ".venv/src/kvpress-0.5.5")
    if not (src / "tests").is_dir():
        print(f"error: {src} holds no tests/; run `make kvpress-tests`, which downloads the "
              "sdist there", file=sys.stderr)
        return 2
    outcomes = Outcomes()
    # Its own configuration (not this project's, which makes a deprecation an error).
    pytest.main([str(src / "tests"), "-q", "-p", "no:cacheprovider", "-c",
                 str(src / "pyproject.toml"), "--rootdir", str(src), "--ignore",
                 str(src / "tests" / "integration")],
                plugins=[StandIn(), outcomes])
    for kind in ("passed", "skipped", "needs the hub (offline)", "needs CUDA", "failed"):
        print(f"{kind}: {len(outcomes.by[kind])}")
    for kind in ("needs the hub (offline)", "needs CUDA", "failed"):
        for line in outcomes.by[kind]:
            print(f"  [{kind}] {line}")
    return 1 if outcomes.by["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
