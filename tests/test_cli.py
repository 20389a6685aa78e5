"""The `ddpm` command end to end, and its one-line errors."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpmkit.cli import main

TINY = ["--model-size", "tiny", "--image-size", "8", "--batch-size", "8", "--sample-steps", "4",
        "--timesteps", "40", "--device", "cpu", "--no-progress"]


def train(folder, workdir, *extra):
    return main(["train", "--data", str(folder), "--workdir", str(workdir), "--run-name", "e2e", *TINY, *extra])


def test_train_resume_sample(image_folder, tmp_path, capsys):
    assert train(image_folder, tmp_path, "--epochs", "2") == 0
    assert (tmp_path / "models/e2e/ckpt.pt").is_file()
    assert {p.name for p in (tmp_path / "results/e2e").iterdir()} == {"0.jpg", "1.jpg"}
    assert list((tmp_path / "runs/e2e").glob("events.out.tfevents.*"))
    assert train(image_folder, tmp_path, "--epochs", "3") == 0
    out = capsys.readouterr().out
    assert "resuming run 'e2e'" in out and "epoch 2" in out
    assert (tmp_path / "results/e2e/2.jpg").is_file()

    ckpt = str(tmp_path / "models/e2e/ckpt.pt")
    grid = tmp_path / "grid.png"
    assert main(["sample", "--ckpt", ckpt, "-n", "5", "--seed", "7", "--out", str(grid), "--out-dir",
                 str(tmp_path / "a"), "--batch-size", "2", "--steps", "6", "--no-progress", "--native-size"]) == 0
    assert Image.open(grid).size == (3 * 10 + 2, 2 * 10 + 2)  # 3x2 grid of 8px images with 2px padding
    assert main(["sample", "--ckpt", ckpt, "-n", "5", "--seed", "7", "--out-dir", str(tmp_path / "b"),
                 "--batch-size", "5", "--steps", "6", "--no-progress"]) == 0
    assert main(["sample", "--ckpt", ckpt, "-n", "5", "--seed", "7", "--out-dir", str(tmp_path / "c"),
                 "--batch-size", "5", "--steps", "6", "--no-progress", "--clip", "off"]) == 0
    for k in range(5):  # per-sample seeding: same images whatever the batch size
        a = np.asarray(Image.open(tmp_path / f"a/{k:06d}.png"))
        b = np.asarray(Image.open(tmp_path / f"b/{k:06d}.png"))
        assert a.shape == (8, 8, 3) and np.array_equal(a, b)


def test_fresh_keeps_old_checkpoint(image_folder, tmp_path):
    assert train(image_folder, tmp_path, "--epochs", "1") == 0
    assert train(image_folder, tmp_path, "--epochs", "1", "--fresh") == 0
    assert (tmp_path / "models/e2e/ckpt.prev.pt").is_file()


def _error(capsys, code):
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpm: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_data_inputs(tmp_path, capsys):
    assert "does not exist" in _error(capsys, train(tmp_path / "nope", tmp_path))
    (tmp_path / "empty").mkdir()
    assert "no images" in _error(capsys, train(tmp_path / "empty", tmp_path))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"not an image")
    (bad / "b.png").write_bytes(b"")
    assert "none of the 2 image files" in _error(capsys, train(bad, tmp_path))


def test_corrupt_images_are_skipped_with_count(image_folder, tmp_path, capsys):
    (image_folder / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    good = next(image_folder.glob("a/*.png")).read_bytes()
    (image_folder / "a" / "cut.png").write_bytes(good[: len(good) // 2])
    assert train(image_folder, tmp_path, "--epochs", "1") == 0
    out = capsys.readouterr().out
    assert "skipping" in out and "broken.jpg" in out and "cut.png" in out
    assert "skipped 2 of 26 files" in out


@pytest.mark.parametrize("args,match", [
    (["--image-size", "10"], "not divisible by 4"),
    (["--lr", "0"], "train.lr must be > 0"),
    (["--lr=-1e-3"], "train.lr must be > 0"),
    (["--batch-size", "0"], "train.batch_size must be >= 1"),
    (["--timesteps", "0"], "diffusion.timesteps must be >= 1"),
    (["--schedule", "linear", "--set", "diffusion.beta_end=0.00001"], "beta_end .* must be greater than beta_start"),
    (["--set", "diffusion.beta_end=0.01"], "beta_end set the linear and sigmoid schedules.*--schedule linear"),
    (["--set", "train.bogus=1"], "unknown config key in \\[train\\] 'bogus'"),
    (["--set", "train.epochs=many"], "train.epochs='many' is not a valid int"),
    (["--model-size", "huge"], "unknown model size 'huge'"),
    (["--schedule", "exp"], "diffusion.schedule must be"),
    (["--prediction", "v", "--set", "diffusion.learn_sigma=true", "--set", "diffusion.zero_terminal_snr=true"],
     "learn_sigma cannot be combined with zero_terminal_snr"),
])
def test_impossible_values(image_folder, tmp_path, capsys, args, match):
    import re
    assert re.search(match, _error(capsys, train(image_folder, tmp_path, *args)))


def test_unknown_config_file_keys(image_folder, tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text("[train]\nepocs = 3\n")
    assert "did you mean 'epochs'" in _error(capsys, train(image_folder, tmp_path, "--config", str(cfg)))
    cfg.write_text("[trainer]\nepochs = 3\n")
    assert "unknown config section 'trainer'" in _error(capsys, train(image_folder, tmp_path, "--config", str(cfg)))
    yml = tmp_path / "run.yaml"
    yml.write_text("train:\n  epochs: 1\n  run_name: fromyaml\n")
    assert train(image_folder, tmp_path, "--config", str(yml)) == 0  # --run-name e2e on the CLI wins
    assert (tmp_path / "models/e2e/ckpt.pt").exists()


def test_changed_model_on_resume(image_folder, tmp_path, capsys):
    assert train(image_folder, tmp_path, "--epochs", "1") == 0
    capsys.readouterr()
    err = _error(capsys, train(image_folder, tmp_path, "--epochs", "2", "--model-size", "small"))
    assert "was trained with model" in err and "--fresh" in err


def test_bad_checkpoints(tmp_path, capsys):
    missing = str(tmp_path / "none.pt")
    assert "not found" in _error(capsys, main(["sample", "--ckpt", missing]))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00garbage" * 100)
    assert "truncated or not a PyTorch file" in _error(capsys, main(["sample", "--ckpt", str(garbage)]))


def test_truncated_checkpoint(image_folder, tmp_path, capsys):
    assert train(image_folder, tmp_path, "--epochs", "1") == 0
    data = (tmp_path / "models/e2e/ckpt.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert "truncated" in _error(capsys, main(["sample", "--ckpt", str(cut)]))


def test_real_process_prints_one_line_and_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ddpmkit", "train", "--data", str(tmp_path / "missing")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr
    assert not (tmp_path / "models").exists()


def test_sample_help_states_every_samplers_default_steps(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "ddpm: all T, ddim: 50, dpm++2m: 20, dpm++3m: 20, dpm++2m-sde: 20, euler: 50, heun: 18 (35 NFE)" in text
    assert "--clip {auto,on,off}" in text
