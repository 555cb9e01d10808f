#!/usr/bin/env bash
# The seed's entry point: run the sweep, then the analysis (printed at the end).
# Environment: MODEL_ID (several as A,B), DATASET, SAMPLES, OUTPUT_DIR, SOURCE, GRID, EXPERIMENT;
# any extra arguments are passed on to `latentwire sweep` (e.g. --ray, which reads RAY_ADDRESS).
set -euo pipefail
cd "$(dirname "$0")/.."

# The project's own environment when `make install` built one, so the seed's command works
# without activating anything.
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi

args=(--samples "${SAMPLES:-100}" --output_dir "${OUTPUT_DIR:-runs/embed_sweep_simple}"
      --dataset "${DATASET:-builtin}" --source "${SOURCE:-text}" --grid "${GRID:-default}"
      --experiment "${EXPERIMENT:-all}")
[[ -n "${MODEL_ID:-}" ]] && args+=(--model_id "$MODEL_ID")

exec "$PYTHON" scripts/run_embed_sweep_simple.py "${args[@]}" "$@"
