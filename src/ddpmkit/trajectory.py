"""A few samples through the reverse process: x_t and the predicted x0 at evenly spaced steps.

Written as a PNG strip (per sample one row of x_t and one row of x0, noise on the left, the
finished sample on the right) or as a GIF (one frame per recorded step, x_t above x0).

Every sampler reports `callback(i, sigma, x, denoised)` in the variance-exploding coordinates
the samplers share, x = x0 + sigma * eps (Karras et al. 2022, Eq. 1). x_t is shown as the VP
image a DDPM would hold at that noise level, x_vp = x / sqrt(1 + sigma^2) (Karras et al. 2022,
Table 1, VP scaling s(t) = 1 / sqrt(sigma^2 + 1)), so every frame has the image range.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .errors import DdpmError
from .images import READABLE_WIDTH, atomic_image_save, make_grid, to_uint8, upscale

TRAJECTORY_SUFFIXES = (".png", ".gif")


@dataclass
class Trajectory:
    """Recorded frames: sigmas (F,), x_t and x0 as uint8 (F, n, C, H, W); the last frame is the sample."""

    sigmas: list[float]
    xt: torch.Tensor
    x0: torch.Tensor


def check_trajectory_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in TRAJECTORY_SUFFIXES:
        raise DdpmError(f"--trajectory {path} must end in .png (a strip) or .gif (an animation)")
    return path


def record_trajectory(diffusion, model, n: int = 4, frames: int = 10, **generate_kwargs) -> Trajectory:
    """Sample `n` images with `diffusion.generate(model, n, **generate_kwargs)` and keep about
    `frames` evenly spaced steps of x_t and x0, plus the finished samples as the last frame."""
    seen_sigma, seen_xt, seen_x0 = [], [], []

    def keep(i, sigma, x, denoised):
        s = float(sigma)
        seen_sigma.append(s)
        seen_xt.append(to_uint8(x / (1.0 + s * s) ** 0.5))  # x_vp, Karras et al. 2022, Table 1
        seen_x0.append(to_uint8(denoised))

    if "callback" in generate_kwargs:
        raise TypeError("record_trajectory sets the callback itself")
    samples = diffusion.generate(model, n, callback=keep, progress=False, **generate_kwargs)
    if not seen_sigma:
        raise DdpmError("the sampler reported no steps; cannot draw a trajectory")
    picks = np.unique(np.linspace(0, len(seen_sigma) - 1, max(1, frames - 1)).round().astype(int))
    done = to_uint8(samples)
    return Trajectory(sigmas=[seen_sigma[k] for k in picks] + [0.0],
                      xt=torch.stack([seen_xt[k] for k in picks] + [done]),
                      x0=torch.stack([seen_x0[k] for k in picks] + [done]))


def _label_margin(grid: np.ndarray, rows: list[str], cell: int, padding: int, width: int = 28) -> np.ndarray:
    """Prefix a grid with a white column naming each row (x_t / x0)."""
    margin = Image.new("L", (width, grid.shape[0]), 255)
    draw = ImageDraw.Draw(margin)
    for r, text in enumerate(rows):
        draw.text((2, padding + r * (cell + padding) + cell // 2 - 5), text, fill=0)
    margin = np.asarray(margin)[..., None].repeat(grid.shape[2], axis=2)
    return np.concatenate([margin, grid], axis=1)


def strip(traj: Trajectory, min_width: int = READABLE_WIDTH) -> Image.Image:
    """Rows x_t, x0 per sample; columns from pure noise (left) to the finished sample (right)."""
    f, n, c, h, w = traj.xt.shape
    rows = torch.stack([traj.xt, traj.x0], dim=1).permute(2, 1, 0, 3, 4, 5).reshape(2 * n * f, c, h, w)
    grid = upscale(make_grid(rows, nrow=f, pad_value=255), max(0, min_width - 28))
    k = grid.shape[0] // (2 * n * (h + 2) + 2)
    grid = _label_margin(grid, ["x_t", "x0"] * n, h * k, 2 * k)
    return Image.fromarray(grid[..., 0] if c == 1 else grid)


def animation(traj: Trajectory, min_width: int = READABLE_WIDTH) -> list[Image.Image]:
    """One frame per recorded step: the n samples' x_t above their x0."""
    frames = []
    for xt, x0 in zip(traj.xt, traj.x0):
        grid = upscale(make_grid(torch.cat([xt, x0]), nrow=len(xt), pad_value=255), min_width)
        frames.append(Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid))
    return frames


def write_trajectory(traj: Trajectory, path: str | Path, min_width: int = READABLE_WIDTH) -> Path:
    """Write `traj` as a PNG strip or a looping GIF (by `path`'s suffix), atomically."""
    path = check_trajectory_path(path)
    if path.suffix.lower() == ".png":
        atomic_image_save(strip(traj, min_width), path)
    else:
        frames = animation(traj, min_width)
        durations = [250] * (len(frames) - 1) + [1500]  # hold the finished samples
        atomic_image_save(frames[0], path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return path
