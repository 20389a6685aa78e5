"""Training curves: one PNG with a panel per logged quantity against step.

matplotlib is an optional extra (`pip install ddpmkit[plots]`). Without it,
`write_curves` returns None and the trainer carries on; `curves_missing_hint`
gives the one line to print once if a caller wants to tell the user.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# (history key, panel title, y-axis log scale)
_PANELS = (
    ("loss", "loss", True),
    ("lr", "learning rate", False),
    ("img_per_sec", "images / s", False),
    ("fid", "FID (training-time)", False),
)

curves_missing_hint = "curves.png skipped: matplotlib is not installed (pip install 'ddpmkit[plots]')"


def _pyplot():
    """Return matplotlib.pyplot on the Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (as in Adam, Kingma & Ba 2015, Alg. 1),
    so the first points are not pulled towards zero."""
    out, avg = [], 0.0
    for k, v in enumerate(values, start=1):
        avg = weight * avg + (1.0 - weight) * float(v)
        out.append(avg / (1.0 - weight**k))
    return out


def _draw_panel(ax, key: str, title: str, log: bool, points: list[tuple[int, float]]) -> None:
    steps = [int(s) for s, _ in points]
    values = [float(v) for _, v in points]
    if key == "loss":
        ax.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.8, label="raw")
        ax.plot(steps, smooth(values), color="tab:blue", linewidth=1.6, label="smoothed")
        ax.legend(loc="upper right", fontsize=8)
    else:
        ax.plot(steps, values, marker="o" if len(values) < 30 else None, markersize=3)
    if log and min(values) > 0:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=8)


def write_curves(history: dict[str, list[tuple[int, float]]], path) -> Path | None:
    """Plot the available series of `history` (keys "loss", "lr", "img_per_sec",
    optional "fid"; each a list of (step, value)) into one PNG at `path`.

    Written to a temporary file and renamed, so a reader never sees half a PNG.
    Returns the path, or None when matplotlib is not installed or nothing is logged yet.
    """
    panels = [(k, t, log) for k, t, log in _PANELS if history.get(k)]
    if not panels:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
    try:
        for ax, (key, title, log) in zip(axes[0], panels):
            _draw_panel(ax, key, title, log, history[key])
        fig.tight_layout()
        fd, tmp = tempfile.mkstemp(prefix=".curves-", suffix=".png", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                fig.savefig(f, format="png", dpi=100)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    finally:
        plt.close(fig)
    return path
