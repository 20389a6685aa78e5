"""Checked user inputs of conditional sampling: class names or indices, masks, guide images.

Each problem is one DdpmError line that says what is wrong and how to fix it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..config import as_hw
from ..errors import DdpmError


def class_names(model_cfg) -> tuple[str, ...]:
    """The checkpoint's class names, or "0".."K-1" when it stored none."""
    k = model_cfg.num_classes
    return tuple(model_cfg.class_names) if model_cfg.class_names else tuple(str(i) for i in range(k))


def parse_class(value: str | int, model_cfg) -> int:
    """A class index from a name or an index, checked against the model."""
    if model_cfg.num_classes <= 0:
        raise DdpmError("--class needs a class-conditional model, but this checkpoint was trained without "
                        "--class-cond; drop --class or train with `ddpm train --class-cond`")
    names = class_names(model_cfg)
    text = str(value)
    if text in names:
        return names.index(text)
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(names):
        return int(text)
    shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    raise DdpmError(f"unknown class '{text}'; this model knows {len(names)} classes: {shown} "
                    f"(or an index 0..{len(names) - 1})")


def _open(path: str | Path, what: str) -> Image.Image:
    p = Path(path)
    if not p.is_file():
        raise DdpmError(f"{what} file {path} does not exist (or is not a file); check the path")
    try:
        img = Image.open(p)
        img.load()
        return img
    except (UnidentifiedImageError, OSError) as exc:
        raise DdpmError(f"{what} file {path} is not a readable image ({type(exc).__name__}); "
                        "use a PNG or JPEG") from None


def load_mask(path: str | Path, size: int | tuple[int, int]) -> torch.Tensor:
    """(1, 1, H, W) float mask from a single-channel image of H x W (`size`: H = W or (H, W)): 1 (white)
    = generate, 0 = keep."""
    img = _open(path, "mask")
    if img.mode not in ("L", "1"):
        raise DdpmError(f"mask {path} has mode {img.mode}; it must be a single-channel image (mode L or 1: "
                        "white = generate, black = keep), e.g. convert it with PIL's Image.convert('L')")
    h, w = as_hw(size)
    if img.size != (w, h):  # Pillow sizes are (width, height)
        raise DdpmError(f"mask {path} is {img.height}x{img.width} (height x width) but the model makes {h}x{w} "
                        f"images; give a {h}x{w} mask")
    arr = np.asarray(img.convert("L"), dtype=np.uint8)
    return torch.from_numpy((arr > 127).astype(np.float32))[None, None]


def load_guide(path: str | Path, size: int | tuple[int, int], channels: int, what: str, exact: bool) -> torch.Tensor:
    """(1, C, H, W) image in [-1, 1] (`size`: H = W or (H, W)). `exact`: the image must already be
    H x W (inpainting, whose pixels must line up with the mask); otherwise it is scaled to cover
    H x W and center-cropped, as training images are."""
    img = _open(path, what)
    h, w = as_hw(size)
    if exact and img.size != (w, h):  # Pillow sizes are (width, height)
        raise DdpmError(f"{what} {path} is {img.height}x{img.width} (height x width) but the model makes "
                        f"{h}x{w} images; give a {h}x{w} image")
    from ..data import load_image  # the training data's own decoding: same conversion and crop

    arr = np.array(load_image(path, size, channels))  # a writable copy
    return torch.from_numpy(arr).permute(2, 0, 1).float().div(127.5).sub(1)[None]


def check_strength(strength: float) -> float:
    if not 0.0 <= strength <= 1.0:
        raise DdpmError(f"--strength must be in [0, 1] (0 = return the image, 1 = a new sample), got {strength}")
    return float(strength)
