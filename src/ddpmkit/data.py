"""Image data: folders and built-in sets, decoded once into a uint8 cache, and seeded batches.

Every image is decoded, converted and resized exactly once (in threads), then kept as one
uint8 array (N, H, W, C), in memory or in a memory-mapped .npy file keyed by the folder's file
list. Training then slices that array, so JPEG decoding never competes with the model for CPU.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from .errors import DdpmError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
BUILTINS = ("digits", "shapes")


@dataclass
class ImageData:
    """Decoded images (N, H, W, C) uint8, with where they came from."""

    images: np.ndarray
    source: str
    skipped: int = 0

    @property
    def channels(self) -> int:
        return self.images.shape[-1]

    def __len__(self) -> int:
        return len(self.images)


# --- folders ---------------------------------------------------------------------------------

def list_images(root: str | Path) -> list[Path]:
    """Image files under `root`, recursively and sorted; symlinked folders are followed once (no loops)."""
    root = Path(root)
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=None):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        found.extend(Path(dirpath) / f for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(found)


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any Pillow mode (palette, alpha, 16-bit, CMYK, ...) to L or RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Composite transparent pixels over white instead of keeping their arbitrary colour.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("L" if channels == 1 else "RGB")


def load_image(path: str | Path, size: int, channels: int = 3) -> np.ndarray:
    """Decode one file to (size, size, channels) uint8: convert, resize the short side, center-crop."""
    with Image.open(path) as img:
        img.draft("RGB" if channels == 3 else "L", (size, size))  # JPEG: decode at a reduced scale
        img = ImageOps.exif_transpose(img)
        img = _to_mode(img, channels)
        img = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)
        arr = np.asarray(img, dtype=np.uint8)
    return arr.reshape(size, size, channels)


def _fingerprint(paths: list[Path], size: int, channels: int) -> str:
    h = hashlib.sha256(f"v1|{size}|{channels}".encode())
    for p in paths:
        try:
            st = p.stat()
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}|missing\n".encode())
    return h.hexdigest()[:16]


def _decode_all(paths: list[Path], size: int, channels: int, log=print) -> tuple[np.ndarray, int]:
    def one(path: Path):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                return load_image(path, size, channels), None
        except Exception as exc:  # corrupt, truncated, not an image, too large, unreadable
            reason = " ".join(str(exc).split()) or type(exc).__name__
            return None, f"{type(exc).__name__}: {reason}"

    workers = min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one, paths))
    good, skipped = [], 0
    for path, (arr, err) in zip(paths, results):
        if arr is None:
            skipped += 1
            log(f"warning: skipping {path}: {err}")
        else:
            good.append(arr)
    if not good:
        return np.zeros((0, size, size, channels), np.uint8), skipped
    return np.stack(good), skipped


def load_folder(root: str | Path, size: int, channels: int = 3, cache_dir: str | Path | None = None,
                log=print) -> ImageData:
    """Decode every image under `root` (skipping unreadable ones with a warning)."""
    root = Path(root)
    if not root.exists():
        raise DdpmError(f"data folder {root} does not exist; pass --data FOLDER or --data builtin:digits")
    if not root.is_dir():
        raise DdpmError(f"data path {root} is not a folder; pass a folder of images or --data builtin:digits")
    paths = list_images(root)
    if not paths:
        raise DdpmError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}; "
                        "put images in it (any sub-folders) or use --data builtin:digits")
    cache_file = None
    if cache_dir:
        cache_file = Path(cache_dir) / f"{_fingerprint(paths, size, channels)}.npy"
        if cache_file.exists():
            try:
                images = np.load(cache_file, mmap_mode="r")
                if images.ndim == 4 and images.shape[1:] == (size, size, channels):
                    return ImageData(images, str(root))
            except (OSError, ValueError):
                pass
            log(f"warning: ignoring unreadable image cache {cache_file}; rebuilding it")
    images, skipped = _decode_all(paths, size, channels, log)
    if len(images) == 0:
        raise DdpmError(f"none of the {len(paths)} image files under {root} could be read; "
                        "check that they are valid jpg/png/webp/bmp images")
    if skipped:
        log(f"warning: skipped {skipped} of {len(paths)} files that could not be read as images")
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, images)
        os.replace(tmp, cache_file)
        images = np.load(cache_file, mmap_mode="r")
    return ImageData(images, str(root), skipped)


# --- built-in data sets ----------------------------------------------------------------------

def _resize_stack(arr: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 stack (N, h, w) with bicubic interpolation to (N, size, size)."""
    return np.stack([np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BICUBIC)) for a in arr])


def builtin_digits(size: int) -> np.ndarray:
    """scikit-learn's 1,797 8x8 handwritten digits (16 grey levels), bright ink on black, upscaled."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DdpmError("builtin:digits needs scikit-learn; install it with: pip install scikit-learn") from None
    raw = load_digits().images  # (1797, 8, 8), values 0..16
    small = np.round(raw * (255.0 / 16.0)).astype(np.uint8)
    return _resize_stack(small, size)[..., None]


def builtin_shapes(size: int, n: int = 2048, seed: int = 0) -> np.ndarray:
    """A generated RGB set: one filled circle, square or triangle of random colour, place and size
    on a plain background. Deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    scale = 4  # draw large, then downsample for anti-aliased edges
    big = size * scale
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        bg = tuple(int(c) for c in rng.integers(0, 90, 3))
        fg = tuple(int(c) for c in rng.integers(120, 256, 3))
        img = Image.new("RGB", (big, big), bg)
        draw = ImageDraw.Draw(img)
        r = rng.uniform(0.18, 0.35) * big
        cx, cy = rng.uniform(r, big - r, 2)
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        elif kind == 1:
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
        out[i] = np.asarray(img.resize((size, size), Image.Resampling.BOX))
    return out


def load_data(path: str, size: int, channels: int = 0, cache_dir: str | None = None, log=print) -> ImageData:
    """Load `builtin:NAME` or an image folder; channels 0 means the data's own (3 for folders)."""
    if path.startswith("builtin:"):
        name = path.split(":", 1)[1]
        if name == "digits":
            images = builtin_digits(size)
        elif name == "shapes":
            images = builtin_shapes(size)
        else:
            raise DdpmError(f"unknown built-in data set '{name}'; choose one of "
                            + ", ".join(f"builtin:{b}" for b in BUILTINS))
        if channels == 3 and images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        elif channels == 1 and images.shape[-1] == 3:
            images = np.round(images @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)[..., None]
        return ImageData(images, path)
    return load_folder(path, size, channels or 3, cache_dir or None, log)


# --- batches ---------------------------------------------------------------------------------

def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator that fixes epoch `epoch`'s order and flips, independent of any other RNG."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 7919, epoch]).generate_state(1)[0]))


def to_model_range(batch_uint8: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, C, H, W) float in [-1, 1]."""
    return batch_uint8.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def epoch_batches(data: ImageData, batch_size: int, seed: int, epoch: int, start: int = 0, hflip: bool = False,
                  rank: int = 0, world: int = 1, device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
    """Batches of epoch `epoch` from batch number `start` on, as float tensors in [-1, 1] on `device`.

    The order and flips depend only on (seed, epoch), so a resumed run continues with exactly the
    batches an uninterrupted run would have seen. With `world` > 1, global batch i holds
    batch_size * world images and rank r takes every world-th of them.
    """
    g = epoch_generator(seed, epoch)
    n = len(data)
    perm = torch.randperm(n, generator=g)
    flips = torch.rand(n, generator=g) < 0.5
    source = torch.from_numpy(np.ascontiguousarray(data.images)) if isinstance(data.images, np.ndarray) \
        and not isinstance(data.images, np.memmap) else None
    pin = torch.device(device).type == "cuda"
    global_batch = batch_size * world
    for b in range(start, num_batches(n, batch_size, world)):
        idx = perm[b * global_batch:(b + 1) * global_batch][rank::world]
        if source is not None:
            batch = source[idx]
        else:  # memory-mapped cache: read only the rows this batch needs, in file order
            order = idx.sort()
            rows = torch.from_numpy(np.asarray(data.images[order.values.numpy()]))
            batch = torch.empty_like(rows)
            batch[order.indices] = rows
        if pin:
            batch = batch.pin_memory()
        x = to_model_range(batch.to(device, non_blocking=True))
        if hflip:
            f = flips[idx].to(device)
            x = torch.where(f[:, None, None, None], x.flip(3), x)
        yield x


def num_batches(n: int, batch_size: int, world: int = 1) -> int:
    """Batches per epoch (the last one may be smaller)."""
    return -(-n // (batch_size * world))
