"""Matplotlib without a display, and one way to save a figure: every command that draws (the
sweep's report, a training run, a study, a screen) stands on this."""

import os
from pathlib import Path

from .files import writing


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, imported on first use (it is slow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        with writing(path, tmp):
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.tight_layout()
            fig.savefig(tmp, dpi=110)
            os.replace(tmp, path)
    finally:
        pyplot().close(fig)
    return path
