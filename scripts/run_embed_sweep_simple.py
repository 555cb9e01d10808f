#!/usr/bin/env python
"""The seed's sweep script: a thin wrapper over `latentwire sweep` (same flags).

    PYTHONPATH=. python scripts/run_embed_sweep_simple.py --experiment rms_scale1.0 --samples 100
    PYTHONPATH=. python scripts/run_embed_sweep_simple.py --experiment list
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from latentwire.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
