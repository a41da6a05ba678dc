"""Figures for --plot (inspect, bench, eval): matplotlib without a display, written atomically."""

from __future__ import annotations

import os
import tempfile


class PlotError(Exception):
    """--plot cannot be honoured (no matplotlib, or no such directory); a one-line user error."""


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("--plot needs matplotlib: pip install matplotlib") from None
    return plt


def check_path(path: str) -> None:
    """Fail before any work is done when the image could not be written."""
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise PlotError(f"--plot {path}: no such directory")
    if not os.access(d, os.W_OK):
        raise PlotError(f"--plot {path}: directory is not writable")


def preflight(path: str) -> None:
    """matplotlib is there and `path` can be written: checked before any long run starts."""
    pyplot()
    check_path(path)


def save(fig, path: str, dpi: int = 110) -> None:
    """Render into a temporary file beside `path`, then rename: never a half-written image."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".razor-plot-", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
