#!/usr/bin/env python
"""The seed's analysis script: a thin wrapper over `latentwire analyze` (same flags).

    python scripts/analyze_sweep_results.py --summary runs/embed_sweep_simple/summary.json
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from latentwire.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["analyze", *sys.argv[1:]]))
