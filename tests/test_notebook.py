"""The Colab quickstart notebook runs top to bottom (its code cells, on a tiny setting), drawing the
trajectory strip and the training curves."""
import json
from pathlib import Path

from PIL import Image

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMKIT_QUICK", "1")
    monkeypatch.chdir(tmp_path)
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    namespace: dict = {}
    for cell in cells:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), str(NOTEBOOK), "exec"), namespace)
    assert namespace["summary"]["status"] == "finished"
    assert (tmp_path / "colab_digits.png").is_file()
    assert namespace["images"].shape == (64, 1, 8, 8)
    with Image.open(tmp_path / "trajectory.png") as strip:  # 10 steps x (x_t, x0) of 4 samples
        assert strip.size[0] >= 256 and strip.size[0] > strip.size[1]
    assert namespace["traj"].xt.shape == (10, 4, 1, 8, 8)
    with Image.open(tmp_path / "results" / "colab_digits" / "curves.png") as curves:
        assert curves.size[0] > 2 * curves.size[1] > 300
