"""Pictures: training curves, readable grids and the reverse-process trajectory."""
import builtins

import numpy as np
import pytest
from PIL import Image

from ddpmkit.curves import smooth, write_curves


def _history(n=50, fid=True):
    h = {
        "loss": [(s, 1.0 / (1 + s) + 0.05 * (s % 3)) for s in range(1, n + 1)],
        "lr": [(s, 1e-4 * min(1.0, s / 10)) for s in range(1, n + 1)],
        "img_per_sec": [(s, 100.0 + s) for s in range(1, n + 1)],
    }
    if fid:
        h["fid"] = [(10, 80.0), (30, 50.0), (50, 40.0)]
    return h


def test_curves_png_has_a_panel_per_series(tmp_path):
    out = write_curves(_history(), tmp_path / "run" / "curves.png")
    assert out == tmp_path / "run" / "curves.png"
    with Image.open(out) as img:
        four = img.size
    assert four[0] > 3 * four[1] and four[1] >= 200  # four panels side by side
    write_curves(_history(fid=False), out)
    with Image.open(out) as img:
        three = img.size
    assert three[0] < four[0] and three[1] == four[1]
    assert sorted(p.name for p in out.parent.iterdir()) == ["curves.png"]  # no temp file left


def test_curves_none_without_matplotlib(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert write_curves(_history(), tmp_path / "curves.png") is None
    assert not (tmp_path / "curves.png").exists()


def test_curves_nothing_logged_yet(tmp_path):
    assert write_curves({"loss": []}, tmp_path / "c.png") is None


def test_smooth_is_bias_corrected():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    s = smooth([0.0] * 20 + [1.0] * 20)
    assert s[19] == 0.0 and 0.0 < s[25] < 1.0 and np.all(np.diff(s[20:]) > 0)
