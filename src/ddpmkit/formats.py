"""Array data sets as `--data`: MNIST-style IDX files and NumPy .npy / .npz arrays.

Read as carefully as the image reader: no pickles (`allow_pickle=False`), every header is
checked against the file's real size and against `MAX_ARRAY_BYTES` before any pixel buffer is
allocated, and a malformed file gives a one-line `DdpmError` saying what is wrong.

The IDX layout is LeCun et al.'s, as published with MNIST (yann.lecun.com/exdb/mnist):
bytes 0-1 are zero, byte 2 the element type (0x08 = unsigned byte), byte 3 the number of
dimensions, then one big-endian uint32 per dimension, then the elements in row-major order.
"""
from __future__ import annotations

import gzip
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DdpmError

# The largest pixel or label array read from one file (bytes as stored). 8 GiB holds e.g.
# 2.7 million 32x32 RGB images; raise it for bigger sets.
MAX_ARRAY_BYTES = 8 << 30
IDX_IMAGES = re.compile(r"images[-.]idx3-ubyte(\.gz)?$")
IMAGE_KEYS = ("images", "x", "x_train", "data", "arr_0")
LABEL_KEYS = ("labels", "y", "y_train", "targets")


@dataclass
class RawArrays:
    """Images (N, H, W, C) as read (uint8, or float in [0, 1]) and optional integer labels (N,)."""

    images: np.ndarray
    labels: np.ndarray | None
    source: str


def is_array_source(path: str | Path) -> bool:
    """True for an .npy/.npz/IDX images file, or a folder holding an IDX images file."""
    p = Path(path)
    try:
        if p.is_dir():
            return any(IDX_IMAGES.search(c.name) for c in p.iterdir() if c.is_file())
        return p.suffix.lower() in (".npy", ".npz") or bool(IDX_IMAGES.search(p.name))
    except (OSError, ValueError):
        return False


def check_size(nbytes: int, what: str) -> None:
    if nbytes > MAX_ARRAY_BYTES:
        raise DdpmError(f"{what} would need {nbytes / 2**30:.1f} GiB, over the limit of "
                        f"{MAX_ARRAY_BYTES / 2**30:.1f} GiB (ddpmkit.formats.MAX_ARRAY_BYTES); "
                        "use a smaller file or raise the limit")


# --- IDX -------------------------------------------------------------------------------------

def _open_idx(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file with `ndim` dimensions; header checked before allocating."""
    path = Path(path)
    try:
        with _open_idx(path) as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\0\0":
                raise DdpmError(f"{path.name} is not an IDX file (bad magic {head!r}); "
                                "expected an MNIST-style *-images-idx3-ubyte file")
            if head[2] != 0x08:
                raise DdpmError(f"{path.name}: IDX element type 0x{head[2]:02x} is not supported; "
                                "only unsigned bytes (0x08), as in MNIST")
            if head[3] != ndim:
                raise DdpmError(f"{path.name}: IDX file has {head[3]} dimensions, expected {ndim}")
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise DdpmError(f"{path.name}: IDX header is truncated; the file is damaged, download it again")
            dims = tuple(int(d) for d in np.frombuffer(raw_dims, ">u4"))
            count = int(np.prod(dims, dtype=np.int64))
            check_size(count, f"{path.name} ({'x'.join(map(str, dims))} bytes)")
            body = _read_at_most(f, count)
            extra = f.read(1)
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DdpmError(f"cannot read {path.name}: {' '.join(str(exc).split())}") from None
    if len(body) != count or extra:
        raise DdpmError(f"{path.name}: size does not match its IDX header ({'x'.join(map(str, dims))} "
                        f"= {count} bytes expected, {len(body) + len(extra)}{'+' if extra else ''} found); "
                        "the file is truncated or damaged")
    return np.frombuffer(body, np.uint8).reshape(dims)


def _read_at_most(f, count: int, chunk: int = 16 << 20) -> bytes:
    """Up to `count` bytes, read in chunks: memory follows the bytes that exist, not what a
    (possibly lying) header claims."""
    parts, left = [], count
    while left > 0:
        part = f.read(min(chunk, left))
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _find_idx_images(folder: Path) -> Path:
    found = sorted(c for c in folder.iterdir() if c.is_file() and IDX_IMAGES.search(c.name))
    train = [c for c in found if c.name.startswith("train")]
    if len(found) == 1 or len(train) == 1:
        return (found if len(found) == 1 else train)[0]
    raise DdpmError(f"{folder} holds several IDX image files ({', '.join(c.name for c in found)}); "
                    "pass the one to use as --data")


def _idx_labels_path(images: Path) -> Path | None:
    name = IDX_IMAGES.sub(lambda m: m.group(0).replace("images", "labels").replace("idx3", "idx1"), images.name)
    stem = name[:-3] if name.endswith(".gz") else name
    for candidate in (stem, stem + ".gz"):
        if (images.parent / candidate).is_file():
            return images.parent / candidate
    return None


def load_idx(path: Path) -> RawArrays:
    images_path = _find_idx_images(path) if path.is_dir() else path
    images = read_idx(images_path, 3)[..., None]
    labels_path = _idx_labels_path(images_path)
    labels = read_idx(labels_path, 1) if labels_path is not None else None
    return RawArrays(images, labels, str(images_path))


# --- NumPy -----------------------------------------------------------------------------------

def _npz_member_header(zf: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of member `key` from its .npy header alone, checked against its stored size."""
    info = zf.getinfo(key + ".npy")
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                           else np.lib.format.read_array_header_2_0(f))
        header_len = f.tell() if f.seekable() else 0
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    check_size(nbytes, f"array '{key}' {shape}")
    if header_len and info.file_size != header_len + nbytes:
        raise DdpmError(f"array '{key}' in the .npz is truncated or damaged (its header says {shape} {dtype})")
    return shape, dtype


def _pick_key(keys: list[str], wanted: tuple[str, ...], what: str, file: str, required: bool) -> str | None:
    for k in wanted:
        if k in keys:
            return k
    if what == "images" and len(keys) == 1:
        return keys[0]
    if required:
        raise DdpmError(f"{file} has arrays {keys}; name the images array one of {list(wanted)} "
                        "(and labels one of " + str(list(LABEL_KEYS)) + ")")
    return None


def load_npz(path: Path) -> RawArrays:
    with zipfile.ZipFile(path) as zf:
        keys = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        img_key = _pick_key(keys, IMAGE_KEYS, "images", path.name, True)
        lab_key = _pick_key([k for k in keys if k != img_key], LABEL_KEYS, "labels", path.name, False)
        for k in (img_key, lab_key):
            if k is not None:
                _npz_member_header(zf, k)
    with np.load(path, allow_pickle=False) as npz:
        images = npz[img_key]
        labels = npz[lab_key] if lab_key is not None else None
    return RawArrays(images, labels, str(path))


def load_npy(path: Path) -> RawArrays:
    # mmap reads only the header; numpy refuses a file shorter than its header says.
    images = np.load(path, mmap_mode="r", allow_pickle=False)
    check_size(images.nbytes, f"{path.name} {images.shape}")
    return RawArrays(images, None, str(path))


def read_arrays(path: str | Path) -> RawArrays:
    """Read images (and labels where present) from an IDX, .npy or .npz source, checked."""
    p = Path(path)
    if not p.exists():
        raise DdpmError(f"data file {p} does not exist; pass an .npy/.npz/IDX file, a folder or builtin:digits")
    try:
        if p.is_dir() or IDX_IMAGES.search(p.name):
            raw = load_idx(p)
        elif p.suffix.lower() == ".npz":
            raw = load_npz(p)
        else:
            raw = load_npy(p)
    except DdpmError:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        reason = " ".join(str(exc).split())
        if "allow_pickle" in reason or "Python objects" in reason:
            reason = "it holds Python objects (pickles), which ddpmkit never loads; save a plain numeric array"
        raise DdpmError(f"cannot read {p.name}: {reason}") from None
    return check_arrays(raw)


def check_arrays(raw: RawArrays) -> RawArrays:
    """Validate shape, dtype, value range and labels; return images as (N, H, W, C)."""
    name, images = Path(raw.source).name, raw.images
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[0] == 0:
        raise DdpmError(f"{name}: images have shape {raw.images.shape}; expected (N, H, W) or (N, H, W, C) with N > 0")
    if images.shape[-1] not in (1, 3):
        hint = "; it looks channels-first: transpose to (N, H, W, C)" if images.shape[1] in (1, 3) else ""
        raise DdpmError(f"{name}: images have {images.shape[-1]} channels (shape {images.shape}); "
                        f"expected 1 or 3 in the last axis{hint}")
    if images.dtype.kind == "f":
        lo, hi = _float_range(images)
        if not (0.0 <= lo and hi <= 1.0):
            raise DdpmError(f"{name}: float images must lie in [0, 1], found values in [{lo:g}, {hi:g}]; "
                            "rescale them (e.g. x / 255) or save as uint8")
    elif images.dtype != np.uint8:
        raise DdpmError(f"{name}: images have dtype {images.dtype}; save them as uint8 (0..255) or float in [0, 1]")
    labels = raw.labels
    if labels is not None:
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(images):
            raise DdpmError(f"{name}: labels have shape {labels.shape} and dtype {labels.dtype}; expected "
                            f"{len(images)} integers, one per image")
        if len(labels) and labels.min() < 0:
            raise DdpmError(f"{name}: labels must be non-negative class numbers, found {labels.min()}")
    return RawArrays(images, labels, raw.source)


def _float_range(images: np.ndarray, chunk: int = 4096) -> tuple[float, float]:
    """Min and max over all images in chunks (NaN counts as out of range)."""
    lo, hi = np.inf, -np.inf
    for i in range(0, len(images), chunk):
        part = np.asarray(images[i:i + chunk])
        if np.isnan(part).any():
            return float("nan"), float("nan")
        lo, hi = min(lo, float(part.min())), max(hi, float(part.max()))
    return lo, hi
