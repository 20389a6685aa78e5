"""Image data: folders and built-in sets, decoded once into a uint8 cache, and seeded batches.

Every image is decoded, converted and resized exactly once (in threads), then kept as one
uint8 array (N, H, W, C), in memory or in a memory-mapped .npy file keyed by the folder's file
list. Training then slices that array, so JPEG decoding never competes with the model for CPU,
and files added to or removed from the folder later do not affect a running training.

Hostile files never stop a load while usable images remain: empty, truncated or mislabelled
files, decompression bombs (more pixels than Pillow's `Image.MAX_IMAGE_PIXELS`, checked before
decoding), FIFOs and devices, symlink loops and unreadable files are each skipped with a
warning that names the path and the reason.
"""
from __future__ import annotations

import hashlib
import os
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from .config import as_hw, size_text
from .errors import DdpmError
from .formats import check_size, is_array_source, read_arrays

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
BUILTINS = ("digits", "shapes")
# What `load_data` accepts, for the error a path of any other kind gets (e.g. `--data x.pt`).
ACCEPTED = ("pass a folder of images (" + "/".join(e[1:] for e in IMAGE_EXTENSIONS) + ", sub-folders included), "
            "an .npy or .npz array file, an MNIST-style IDX images file (*-images-idx3-ubyte, optionally .gz) "
            "or a folder holding one, or " + " | ".join(f"builtin:{b}" for b in BUILTINS))
# Pillow decoders tried on a file, whatever its extension. Only plain raster formats: a file named
# x.png that holds e.g. EPS would otherwise be handed to Ghostscript.
DECODERS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")


class SkippedFile(Exception):
    """A file that is not decoded, with the reason as its message."""


def show_path(path: str | Path) -> str:
    """A path as printable text on one line (undecodable bytes and control characters escaped)."""
    text = str(path).encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


@dataclass
class ImageData:
    """Decoded images (N, H, W, C) uint8, with where they came from, and class labels where the
    source has them (IDX, .npz): `labels[i]` indexes `classes`."""

    images: np.ndarray
    source: str
    skipped: int = 0
    labels: np.ndarray | None = None
    classes: tuple[str, ...] = ()

    @property
    def channels(self) -> int:
        return self.images.shape[-1]

    def __len__(self) -> int:
        return len(self.images)


# --- folders ---------------------------------------------------------------------------------

def list_images(root: str | Path, log=None) -> list[Path]:
    """Image files under `root`, recursively and sorted; symlinked folders are followed once (no loops).

    A folder that cannot be read is skipped, with a warning through `log` when given.
    """
    root = Path(root)
    found, seen = [], set()

    def unreadable(exc: OSError) -> None:
        if log is not None:
            log(f"warning: skipping folder {show_path(exc.filename or root)}: {exc.strerror or exc}")

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unreadable):
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


def _open_regular(path: str | Path):
    """Open a regular, non-empty file for reading; FIFOs and devices are refused without blocking."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SkippedFile("not a regular file (a FIFO, device or socket)")
        if st.st_size == 0:
            raise SkippedFile("empty file (0 bytes)")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def load_image(path: str | Path, size: int | tuple[int, int], channels: int = 3) -> np.ndarray:
    """Decode one file to (H, W, channels) uint8, `size` being H = W or (H, W): convert, scale by
    max(H / h, W / w) so the image covers H x W with its aspect kept, center-crop to H x W.

    Raises SkippedFile (or Pillow's / the OS's error) for a file that is not a usable image. An
    image with more pixels than `PIL.Image.MAX_IMAGE_PIXELS` after JPEG draft scaling is refused
    before its pixels are decoded.
    """
    h, w = as_hw(size)
    Image.init()
    with _open_regular(path) as f:
        try:
            img = Image.open(f, formats=[d for d in DECODERS if d in Image.OPEN])
        except UnidentifiedImageError:
            f.seek(0)
            head = f.read(8)
            raise SkippedFile(f"not a JPEG, PNG, WebP, BMP or GIF image (starts with {head!r})") from None
        with img:
            img.draft("RGB" if channels == 3 else "L", (w, h))  # JPEG: decode at a reduced scale, >= w x h
            limit = Image.MAX_IMAGE_PIXELS
            if limit and img.width * img.height > limit:
                raise Image.DecompressionBombError(
                    f"{img.width}x{img.height} = {img.width * img.height} pixels is over Pillow's limit of "
                    f"{limit} (PIL.Image.MAX_IMAGE_PIXELS); not decoded (possible decompression bomb)")
            img = ImageOps.exif_transpose(img)
            img = _to_mode(img, channels)
            img = ImageOps.fit(img, (w, h), method=Image.Resampling.BICUBIC)  # Pillow sizes are (width, height)
            arr = np.asarray(img, dtype=np.uint8)
    return arr.reshape(h, w, channels)


def _fingerprint(paths: list[Path], size: int | tuple[int, int], channels: int) -> str:
    h = hashlib.sha256(f"v1|{size_text(size)}|{channels}".encode())  # a square keeps its old key
    for p in paths:
        try:
            st = p.stat()
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}|missing\n".encode())
    return h.hexdigest()[:16]


def _decode_all(paths: list[Path], size: int | tuple[int, int], channels: int,
                log=print) -> tuple[np.ndarray, int, list[int]]:
    """(the decodable images, how many were skipped, the indices into `paths` of those kept)."""
    def one(path: Path):
        try:
            return load_image(path, size, channels), None
        except SkippedFile as exc:
            return None, str(exc)
        except Exception as exc:  # corrupt, truncated, not an image, too large, unreadable, vanished
            reason = " ".join(str(exc).split()) or type(exc).__name__
            return None, f"{type(exc).__name__}: {reason}"

    workers = min(8, (os.cpu_count() or 1) * 2)
    # load_image checks the pixel limit itself (after JPEG draft scaling); Pillow's own warning for
    # images between 1x and 2x the limit is silenced here, once, around all threads (a
    # catch_warnings per thread would race on the process-wide filter list).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(one, paths))
    good, skipped, kept = [], 0, []
    for k, (path, (arr, err)) in enumerate(zip(paths, results)):
        if arr is None:
            skipped += 1
            log(f"warning: skipping {show_path(path)}: {show_path(err)}")
        else:
            good.append(arr)
            kept.append(k)
    if not good:
        return np.zeros((0, *as_hw(size), channels), np.uint8), skipped, kept
    return np.stack(good), skipped, kept


def load_folder(root: str | Path, size: int | tuple[int, int], channels: int = 3, cache_dir: str | Path | None = None,
                log=print) -> ImageData:
    """Decode every image under `root` (skipping unreadable ones with a warning)."""
    root = Path(root)
    shown = show_path(root)
    try:
        exists, is_dir = root.exists(), root.is_dir()
    except (OSError, ValueError):  # e.g. an embedded NUL byte or a name too long
        exists = is_dir = False
    if not exists:
        raise DdpmError(f"data path {shown} does not exist; {ACCEPTED}")
    if not is_dir:
        raise DdpmError(f"data path {shown} is not a folder or a data file ddpmkit reads; {ACCEPTED}")
    paths = list_images(root, log)
    if not paths:
        raise DdpmError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {shown}; "
                        "put images in it (any sub-folders) or use --data builtin:digits")
    cache_file = None
    if cache_dir:
        cache_file = Path(cache_dir) / f"{_fingerprint(paths, size, channels)}.npy"
        try:
            cached = cache_file.is_file()
        except (OSError, ValueError):
            cached = False
        if cached:
            try:
                images = np.load(cache_file, mmap_mode="r")
                if images.ndim == 4 and images.shape[1:] == (*as_hw(size), channels):
                    # Labels line up with the cache only when no file was skipped when it was built.
                    kept = list(range(len(paths))) if len(images) == len(paths) else None
                    return ImageData(images, str(root), 0, *folder_labels(root, paths, kept))
            except (OSError, ValueError):
                pass
            log(f"warning: ignoring unreadable image cache {show_path(cache_file)}; rebuilding it")
    images, skipped, kept = _decode_all(paths, size, channels, log)
    if len(images) == 0:
        raise DdpmError(f"none of the {len(paths)} image files under {shown} could be read; "
                        "check that they are valid jpg/png/webp/bmp images")
    if skipped:
        log(f"warning: skipped {skipped} of {len(paths)} files that could not be read as images")
    if cache_file is not None:
        images = _write_cache(images, cache_file, log)
    return ImageData(images, str(root), skipped, *folder_labels(root, paths, kept))


def folder_labels(root: Path, paths: list[Path], kept: list[int] | None) -> tuple[np.ndarray | None, tuple[str, ...]]:
    """(labels, class names) from the seed's layout root/CLASS/.../image: the first folder below
    `root` names each image's class, classes in sorted order. (None, ()) when any image lies
    directly in `root`, or `kept` (indices of the decoded paths) is unknown."""
    firsts = [p.relative_to(root).parts for p in paths]
    if kept is None or not firsts or any(len(parts) < 2 for parts in firsts):
        return None, ()
    names = tuple(sorted({parts[0] for parts in firsts}))
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[firsts[k][0]] for k in kept], np.int64), names


def _write_cache(images: np.ndarray, cache_file: Path, log=print) -> np.ndarray:
    """Save the decoded images as a memory-mapped cache; on failure keep them in memory, with a warning."""
    tmp = cache_file.with_suffix(f".tmp{os.getpid()}.npy")
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp, images)
        os.replace(tmp, cache_file)
        return np.load(cache_file, mmap_mode="r")
    except (OSError, ValueError) as exc:
        try:
            tmp.unlink(missing_ok=True)
        except (OSError, ValueError):
            pass
        reason = getattr(exc, "strerror", None) or " ".join(str(exc).split())
        log(f"warning: cannot write the image cache {show_path(cache_file)} ({show_path(reason)}); "
            "keeping the images in memory")
        return images


# --- built-in data sets ----------------------------------------------------------------------

def _resize_stack(arr: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Fit a uint8 stack (N, h, w) to (N, H, W) with bicubic interpolation: scaled to cover H x W,
    center-cropped (for a square stack and a square size, a plain resize)."""
    h, w = as_hw(size)
    return np.stack([np.asarray(ImageOps.fit(Image.fromarray(a), (w, h), Image.Resampling.BICUBIC)) for a in arr])


def builtin_digits(size: int | tuple[int, int]) -> np.ndarray:
    """scikit-learn's 1,797 8x8 handwritten digits (16 grey levels), bright ink on black, upscaled."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DdpmError("builtin:digits needs scikit-learn; install it with: pip install scikit-learn") from None
    raw = load_digits().images  # (1797, 8, 8), values 0..16
    small = np.round(raw * (255.0 / 16.0)).astype(np.uint8)
    return _resize_stack(small, size)[..., None]


def builtin_shapes(size: int | tuple[int, int], n: int = 2048, seed: int = 0) -> np.ndarray:
    """A generated RGB set: one filled circle, square or triangle of random colour, place and size
    on a plain background (of H x W, `size` being H = W or (H, W)). Deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    scale = 4  # draw large, then downsample for anti-aliased edges
    h, w = as_hw(size)
    big_h, big_w = h * scale, w * scale
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        bg = tuple(int(c) for c in rng.integers(0, 90, 3))
        fg = tuple(int(c) for c in rng.integers(120, 256, 3))
        img = Image.new("RGB", (big_w, big_h), bg)
        draw = ImageDraw.Draw(img)
        r = rng.uniform(0.18, 0.35) * min(big_h, big_w)
        cx, cy = rng.uniform(r, [big_w - r, big_h - r])
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        elif kind == 1:
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
        out[i] = np.asarray(img.resize((w, h), Image.Resampling.BOX))
    return out


def _match_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """Grey -> RGB by repetition, RGB -> grey by ITU-R BT.601 luma; channels 0 keeps the data's own."""
    if channels == 3 and images.shape[-1] == 1:
        return np.repeat(images, 3, axis=-1)
    if channels == 1 and images.shape[-1] == 3:
        return np.round(images @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)[..., None]
    return images


# --- array files (IDX, .npy, .npz) ----------------------------------------------------------

def _to_uint8(part: np.ndarray) -> np.ndarray:
    part = np.asarray(part)
    return part if part.dtype == np.uint8 else np.round(part * 255.0).astype(np.uint8)


def fit_arrays(images: np.ndarray, size: int | tuple[int, int], chunk: int = 4096) -> np.ndarray:
    """(N, h, w, C) uint8 or float in [0, 1] -> (N, H, W, C) uint8, `size` being H = W or (H, W).

    A source of the target's aspect up to a quarter smaller on each side is padded, centred, with
    the median of its border pixels (MNIST's 28 px digits on black become 32 px digits on black,
    unscaled, as in the common 32x32 MNIST setting); anything else is resized like folder images
    (scaled with bicubic to cover H x W, then a centre crop).
    """
    n, h, w, c = images.shape
    H, W = as_hw(size)
    check_size(n * H * W * c, "the resized images")
    out = np.empty((n, H, W, c), np.uint8)
    pad = h * W == w * H and h < H <= h + h // 4 and w < W <= w + w // 4
    if pad:
        border = np.concatenate([_to_uint8(images[:chunk, [0, -1]]).reshape(-1, c),
                                 _to_uint8(images[:chunk, :, [0, -1]]).reshape(-1, c)])
        out[:] = np.median(border, axis=0).astype(np.uint8)
        top, left = (H - h) // 2, (W - w) // 2
    for i in range(0, n, chunk):
        part = _to_uint8(images[i:i + chunk])
        if (h, w) == (H, W):
            out[i:i + len(part)] = part
        elif pad:
            out[i:i + len(part), top:top + h, left:left + w] = part
        else:
            for k, a in enumerate(part):
                img = Image.fromarray(a[..., 0] if c == 1 else a)
                fitted = ImageOps.fit(img, (W, H), method=Image.Resampling.BICUBIC)
                out[i + k] = np.asarray(fitted, np.uint8).reshape(H, W, c)
    return out


def load_arrays(path: str, size: int | tuple[int, int], channels: int = 0) -> ImageData:
    """An IDX / .npy / .npz data set (see formats.py) at `size` (H = W or (H, W)), with its labels when present.

    No cache: the arrays are already decoded, and padding or resizing them takes seconds
    (60,000 MNIST digits: well under a second when padded).
    """
    raw = read_arrays(path)
    images = _match_channels(fit_arrays(raw.images, size), channels)
    classes = tuple(str(k) for k in range(int(raw.labels.max()) + 1)) if raw.labels is not None else ()
    labels = None if raw.labels is None else np.asarray(raw.labels, np.int64)
    return ImageData(images, raw.source, labels=labels, classes=classes)


def load_data(path: str, size: int | tuple[int, int], channels: int = 0, cache_dir: str | None = None,
              log=print) -> ImageData:
    """Load `builtin:NAME`, an array file (IDX images, .npy, .npz), a folder holding an IDX
    images file, or an image folder, at `size` (a square side, or (height, width)); channels 0
    means the data's own (3 for image folders)."""
    if path.startswith("builtin:"):
        name = path.split(":", 1)[1]
        if name == "digits":  # with scikit-learn's labels 0..9
            images = builtin_digits(size)  # says how to install scikit-learn when it is missing
            from sklearn.datasets import load_digits

            return ImageData(_match_channels(images, channels), path,
                             labels=np.asarray(load_digits().target, np.int64), classes=tuple("0123456789"))
        elif name == "shapes":
            images = builtin_shapes(size)
        else:
            raise DdpmError(f"unknown built-in data set '{name}'; choose one of "
                            + ", ".join(f"builtin:{b}" for b in BUILTINS))
        return ImageData(_match_channels(images, channels), path)
    if is_array_source(path):
        return load_arrays(path, size, channels)
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


def epoch_labels(data: ImageData, batch_size: int, seed: int, epoch: int, start: int = 0, rank: int = 0,
                 world: int = 1, device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
    """The class labels of `epoch_batches`' batches (same arguments), as int64 tensors on `device`:
    the same permutation, drawn first from the same generator."""
    if data.labels is None:
        raise DdpmError(f"{data.source} has no class labels; use class folders (dataset/CLASS/*.jpg), an IDX or "
                        ".npz file with labels, or builtin:digits, or train without --class-cond")
    perm = torch.randperm(len(data), generator=epoch_generator(seed, epoch))
    labels = torch.from_numpy(np.asarray(data.labels, np.int64))
    global_batch = batch_size * world
    for b in range(start, num_batches(len(data), batch_size, world)):
        yield labels[perm[b * global_batch:(b + 1) * global_batch][rank::world]].to(device)


def num_batches(n: int, batch_size: int, world: int = 1) -> int:
    """Batches per epoch (the last one may be smaller)."""
    return -(-n // (batch_size * world))
