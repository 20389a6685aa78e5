"""Image grids, saving and plotting (Pillow only).

Grids that are written or shown for people (`save_images`, `plot_images`) are enlarged with
nearest-neighbour by a whole factor until they are at least `READABLE_WIDTH` px across, so a
grid of 16 px samples is not a thumbnail; pass `min_width=0` to keep the native size.
`make_grid` itself stays native (TensorBoard scales its images itself).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Accept uint8 images or floats in [-1, 1]; return uint8 (N, C, H, W) on the CPU."""
    images = images.detach().cpu()
    if images.dtype != torch.uint8:
        images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if images.ndim == 3:
        images = images[None]
    return images


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tile (N, C, H, W) images into one (H', W', C) uint8 array, `nrow` images per row (default ~sqrt(N))."""
    images = to_uint8(images)
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad_value, np.uint8)
    arr = images.permute(0, 2, 3, 1).numpy()
    for k in range(n):
        r, col = divmod(k, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = arr[k]
    return grid


READABLE_WIDTH = 256


def upscale(arr: np.ndarray, min_width: int = READABLE_WIDTH) -> np.ndarray:
    """Repeat every pixel k x k times (nearest-neighbour), the smallest whole k that makes the
    (H, W, C) image at least `min_width` px wide; unchanged when it already is or min_width <= 0."""
    k = -(-min_width // arr.shape[1]) if min_width > 0 else 1
    return arr if k <= 1 else np.repeat(np.repeat(arr, k, axis=0), k, axis=1)


def _pil(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def atomic_image_save(img: Image.Image, path: Path, **save_kwargs) -> None:
    """Save through a temporary file and a rename, so a reader never sees a half-written image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    if path.suffix.lower() in (".jpg", ".jpeg"):
        save_kwargs.setdefault("quality", 95)
    try:
        img.save(tmp, **save_kwargs)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_images(images: torch.Tensor, path: str | Path, nrow: int | None = None, *,
                min_width: int = READABLE_WIDTH, **grid_kwargs) -> Path:
    """Save images as one grid (jpg, png, ... by the file's suffix); the seed's `save_images`.

    The grid is enlarged to at least `min_width` px across (nearest-neighbour); 0 keeps it native.
    """
    path = Path(path)
    atomic_image_save(_pil(upscale(make_grid(images, nrow, **grid_kwargs), min_width)), path)
    return path


def save_each(images: torch.Tensor, out_dir: str | Path, first_index: int = 0) -> list[Path]:
    """Save image k as OUT_DIR/{first_index + k:06d}.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arr = to_uint8(images).permute(0, 2, 3, 1).numpy()
    paths = []
    for k, a in enumerate(arr):
        p = out_dir / f"{first_index + k:06d}.png"
        _pil(a).save(p)
        paths.append(p)
    return paths


def plot_images(images: torch.Tensor, nrow: int | None = None, min_width: int = READABLE_WIDTH) -> Image.Image:
    """Show images in a row-major grid (inline in notebooks, with matplotlib elsewhere); returns the
    grid, enlarged to at least `min_width` px across (0 = native)."""
    img = _pil(upscale(make_grid(images, nrow), min_width))
    try:
        from IPython import get_ipython
        from IPython.display import display

        if get_ipython() is not None:
            display(img)
            return img
    except ImportError:
        pass
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_images: not in a notebook and matplotlib is not installed; use save_images(images, 'grid.png')")
        return img
    plt.figure(figsize=(8, 8))
    plt.imshow(np.asarray(img), cmap="gray" if img.mode == "L" else None)
    plt.axis("off")
    plt.show()
    return img
