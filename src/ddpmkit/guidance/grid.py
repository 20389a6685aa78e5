"""A labelled grid: one row per class, the class name written left of its row."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..images import READABLE_WIDTH, atomic_image_save, make_grid, upscale


def class_rows(num_classes: int, per_class: int) -> torch.Tensor:
    """Labels 0,0,..,1,1,..: `per_class` images of every class, row by row."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def labelled_grid(images: torch.Tensor, names: tuple[str, ...], per_class: int,
                  min_width: int = READABLE_WIDTH) -> Image.Image:
    """The grid of `images` (class rows of `per_class`), enlarged, with a caption margin on the left."""
    grid = upscale(make_grid(images, nrow=per_class), min_width)
    rows = len(names)
    row_h = grid.shape[0] / rows
    margin = 8 + 7 * max(len(n) for n in names)
    canvas = np.zeros((grid.shape[0], grid.shape[1] + margin, grid.shape[2]), np.uint8)
    canvas[:, margin:] = grid
    img = Image.fromarray(canvas[..., 0] if canvas.shape[-1] == 1 else canvas)
    draw = ImageDraw.Draw(img)
    white = 255 if img.mode == "L" else (255, 255, 255)
    for r, name in enumerate(names):
        draw.text((4, int(r * row_h + row_h / 2) - 5), name, fill=white)
    return img


def save_labelled_grid(images: torch.Tensor, names: tuple[str, ...], per_class: int, path: str | Path,
                       min_width: int = READABLE_WIDTH) -> Path:
    path = Path(path)
    atomic_image_save(labelled_grid(images, names, per_class, min_width), path)
    return path
