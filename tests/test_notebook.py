"""The Colab quickstart notebook runs top to bottom (its code cells, on a tiny setting)."""
import json
from pathlib import Path

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
