#!/usr/bin/env python
"""The seed's training entry point: a thin wrapper over `latentwire train` (same flags).

    python latentwire/train.py --embed_transform rms_matching --target_rms_scale 1.0 \
        --samples 10000 --epochs 10
    torchrun --nproc_per_node 2 latentwire/train.py --batch_size 16
"""
import sys
from pathlib import Path

# Run as a file, Python puts latentwire/ itself first on the path, where its modules would
# shadow top-level names (data, models, ...); the repository root goes there instead.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from latentwire.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
