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


# --- readable grids ----------------------------------------------------------------------------

import torch  # noqa: E402

from ddpmkit.images import make_grid, save_images, upscale  # noqa: E402


def test_small_grids_are_upscaled_nearest_neighbour(tmp_path):
    imgs = torch.rand(64, 1, 16, 16) * 2 - 1
    native = make_grid(imgs)
    assert native.shape == (146, 146, 1)  # make_grid (TensorBoard) stays native
    with Image.open(save_images(imgs, tmp_path / "g.png")) as img:
        big = np.asarray(img)
    assert big.shape == (292, 292) and np.array_equal(big[::2, ::2], native[..., 0])
    assert np.array_equal(big[1::2, 1::2], native[..., 0])  # nearest-neighbour: exact pixel copies
    with Image.open(save_images(imgs, tmp_path / "n.png", min_width=0)) as img:
        assert img.size == (146, 146)
    with Image.open(save_images(torch.rand(4, 3, 64, 64), tmp_path / "l.png", 2)) as img:
        assert img.size == (134 * 2, 134 * 2)
    assert upscale(np.zeros((300, 300, 3), np.uint8)).shape == (300, 300, 3)


# --- trajectory --------------------------------------------------------------------------------

from ddpmkit.checkpoint import model_from_config  # noqa: E402
from ddpmkit.config import Config, preset  # noqa: E402
from ddpmkit.errors import DdpmError  # noqa: E402
from ddpmkit.trajectory import record_trajectory, write_trajectory  # noqa: E402


@pytest.fixture
def tiny_model():
    cfg = Config()
    cfg.model = preset("tiny")
    cfg.data.image_size, cfg.data.channels, cfg.diffusion.timesteps = 8, 1, 50
    torch.manual_seed(0)
    return model_from_config(cfg)


@pytest.mark.parametrize("sampler,steps", [("ddpm", 50), ("dpm++2m", 7)])
def test_trajectory_frames(tiny_model, sampler, steps, one_torch_thread):
    model, diffusion = tiny_model
    traj = record_trajectory(diffusion, model, n=3, frames=10, sampler=sampler, steps=steps, seed=1)
    f = len(traj.sigmas)
    assert traj.xt.shape == traj.x0.shape == (f, 3, 1, 8, 8) and traj.xt.dtype == torch.uint8
    assert f == min(10, steps + 1) and traj.sigmas[-1] == 0.0
    assert all(a > b for a, b in zip(traj.sigmas, traj.sigmas[1:]))  # noise level falls left to right
    # last frame is the sample itself, identical to an ordinary draw with the same seed
    same = diffusion.sample(model, 3, sampler=sampler, steps=steps, seed=1, progress=False)
    assert torch.equal(traj.xt[-1], same) and torch.equal(traj.x0[-1], same)
    # the first x_t is the prior noise seen as a VP image: mean grey, wide spread
    assert traj.xt[0].float().std() > 40


def test_trajectory_png_and_gif(tiny_model, tmp_path, one_torch_thread):
    model, diffusion = tiny_model
    traj = record_trajectory(diffusion, model, n=4, frames=10, sampler="ddim", steps=12, seed=0)
    png = write_trajectory(traj, tmp_path / "t.png")
    with Image.open(png) as img:
        w, h = img.size
    # 10 columns and 4 x (x_t, x0) rows of 8 px cells, upscaled to >= 256 px plus a label margin
    assert w >= 256 and abs((w - 28) / h - (10 * 10 + 2) / (8 * 10 + 2)) < 0.02
    gif = write_trajectory(traj, tmp_path / "t.gif")
    with Image.open(gif) as img:
        assert img.n_frames == 10 and img.size[0] >= 256
        assert abs(img.size[0] / img.size[1] - (4 * 10 + 2) / (2 * 10 + 2)) < 0.02
    with pytest.raises(DdpmError, match=".png .*or .gif"):
        write_trajectory(traj, tmp_path / "t.jpg")


def test_trajectory_shows_x_t_in_image_range():
    """x_t is drawn as x_vp = x / sqrt(1 + sigma^2); x0 as the denoiser's estimate."""
    class FakeDiffusion:
        def generate(self, model, n, callback, progress, **kw):
            for i, sigma in enumerate((3.0, 1.0)):
                x = torch.full((n, 1, 2, 2), 0.5 * (1 + sigma**2) ** 0.5)  # x_vp = 0.5 -> 191
                callback(i, torch.tensor(sigma), x, torch.full((n, 1, 2, 2), -0.5))  # -> 64
            return torch.ones(n, 1, 2, 2)

    traj = record_trajectory(FakeDiffusion(), None, n=2, frames=10)
    assert traj.sigmas == [3.0, 1.0, 0.0]
    assert (traj.xt[:2] == 191).all() and (traj.x0[:2] == 64).all() and (traj.xt[2] == 255).all()


def test_cli_sample_grid_trajectory_and_npz_data(tmp_path, capsys, one_torch_thread):
    from ddpmkit.cli import main

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (16, 8, 8), dtype=np.uint8), labels=np.arange(16) % 4)
    assert main(["train", "--data", str(tmp_path / "d.npz"), "--workdir", str(tmp_path), "--run-name", "t",
                 "--model-size", "tiny", "--image-size", "8", "--batch-size", "8", "--sample-every", "0",
                 "--timesteps", "20", "--device", "cpu", "--no-progress", "--epochs", "1"]) == 0
    ckpt = str(tmp_path / "models/t/ckpt.pt")
    common = ["sample", "--ckpt", ckpt, "-n", "6", "--steps", "5", "--sampler", "ddim", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "g.png"), "--trajectory", str(tmp_path / "t.gif")]) == 0
    assert "trajectory" in capsys.readouterr().out
    with Image.open(tmp_path / "g.png") as img:
        assert img.size == (256, 176) and img.mode == "L"  # 3x2 grid of 8 px images, 8x nearest-neighbour
    with Image.open(tmp_path / "t.gif") as img:
        assert img.n_frames == 6  # 5 steps + the finished samples
    assert main([*common, "--out", str(tmp_path / "n.png"), "--native-size"]) == 0
    with Image.open(tmp_path / "n.png") as img:
        assert img.size == (32, 22)
    assert main([*common, "--trajectory", str(tmp_path / "t.mp4")]) == 2
    assert "must end in .png" in capsys.readouterr().err
