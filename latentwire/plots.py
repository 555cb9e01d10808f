"""Matplotlib without a display, and one way to save a figure: every command that draws (the
sweep's report, a training run, a study, a screen) stands on this."""

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, imported on first use (it is slow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path
