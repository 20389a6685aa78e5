"""benchmarks/sweep_quality.py: the runs file's checks, the paired table, and one tiny sweep end to end."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sweep_quality.py"


@pytest.fixture(scope="module")
def sweep(load_benchmark):
    return load_benchmark("sweep_quality")


@pytest.mark.parametrize("runs, message", [
    ([], "non-empty JSON list"),
    ([{"name": "a b"}], "needs a \"name\""),
    ([{"name": "a"}, {"name": "a"}], "appears twice"),
    ([{"name": "a", "set": "train.lr=1e-3"}], "must be a list"),
    ([{"name": "a", "set": ["lr=1e-3"]}], "SECTION.KEY=VALUE"),
    ([{"name": "a", "seed": "1"}], "must be an integer"),
])
def test_a_bad_runs_file_stops_with_a_message(runs, message, tmp_path, sweep):
    path = tmp_path / "runs.json"
    path.write_text(json.dumps(runs))
    with pytest.raises(SystemExit) as exc:
        sweep.load_runs(str(path))
    assert message in str(exc.value)


def test_runs_get_default_overrides_and_seed(tmp_path, sweep):
    path = tmp_path / "runs.json"
    path.write_text(json.dumps([{"name": "v"}, {"name": "eps", "set": ["diffusion.prediction=eps"], "seed": 2}]))
    assert sweep.load_runs(str(path)) == [{"name": "v", "set": [], "seed": 0},
                                          {"name": "eps", "set": ["diffusion.prediction=eps"], "seed": 2}]


def test_the_table_pairs_draws_with_the_baseline(sweep):
    base = {"name": "base", "seed": 0, "set": [], "fd": [10.0, 14.0, 12.0], "recognized": [0.9] * 3,
            "speckled": [0.0] * 3, "train_s": 5.0}
    other = {**base, "name": "other", "set": ["model.dropout=0.1"], "fd": [9.0, 12.0, 12.0]}
    lines = sweep.table([base, other], "base").splitlines()
    diff = np.array(other["fd"]) - np.array(base["fd"])  # -1, -2, 0: mean -1, se 1/sqrt(3)
    assert f"{diff.mean():+.2f} ± {diff.std(ddof=1) / np.sqrt(3):.2f}" in lines[3]
    assert "| base | 0 | - | 12.00 ± 2.00 | - |" in lines[2]


def test_a_tiny_sweep_runs_end_to_end_and_reports_a_failed_run(tmp_path):
    runs = tmp_path / "runs.json"
    runs.write_text(json.dumps([{"name": "base", "set": ["diffusion.prediction=eps"]},
                                {"name": "broken", "set": ["model.dropout=lots"]}]))
    out = tmp_path / "sweep.json"
    clf = tmp_path / "clf.pt"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(runs), "--images", "64", "--n", "8", "--draws", "2",
                           "--parallel", "2", "--threads", "1", "--classifier-epochs", "1", "--classifier", str(clf),
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "broken: failed" in proc.stderr and "Traceback" not in proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 and rows[1].startswith("| base | 0 | diffusion.prediction=eps |")
    result = json.loads(out.read_text())["runs"]
    assert [r["name"] for r in result] == ["base"]
    assert all(len(r["fd"]) == 2 and all(np.isfinite(r["fd"])) for r in result)
    assert clf.exists()  # saved for the next sweep to score on the same scale


@pytest.mark.parametrize("argv", [["--n", "1"], ["--draws", "0"], ["--device", "tpu"], ["--base-set", "lr=1"]])
def test_bad_options_stop_with_an_error(argv, sweep):
    with pytest.raises(SystemExit) as exc:
        sweep.parse_args(["runs.json", *argv])
    assert exc.value.code != 0
