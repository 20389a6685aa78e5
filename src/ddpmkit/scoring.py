"""Score a model (or a set of samples) against reference data: the pipeline behind `ddpm eval`.

Reference images are decoded at the samples' resolution and channel count (the data pipeline's
resize and center crop), turned into uint8 and handed to the extractor, which resizes them the
standard way (Inception: TF-style bilinear to 299x299, grayscale repeated to 3 channels).
Reference features are cached per dataset contents, resolution and extractor.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import size_text
from .data import IMAGE_EXTENSIONS, list_images, load_data, load_image
from .errors import DdpmError
from .extractors import FeatureExtractor, InceptionExtractor, RandomConvExtractor, compute_features
from .fid_weights import find_inception_weights
from .metrics import evaluate_features
from .reference_cache import cached_feature_stats, dataset_fingerprint

EXTRACTORS = ("auto", "inception", "randconv")


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddpmkit" / "reference"


def make_extractor(name: str = "auto", inception_path: str | None = None,
                   device: str | torch.device = "cpu", log=print) -> FeatureExtractor:
    """inception (standard FID network, local weights), randconv (weight-free, not comparable), or
    auto: inception when its weights are found, randconv otherwise (with a notice)."""
    if name not in EXTRACTORS:
        raise DdpmError(f"unknown extractor '{name}'; choose one of {', '.join(EXTRACTORS)}")
    if name == "randconv":
        return RandomConvExtractor(device=device)
    if name == "auto":
        try:
            path = find_inception_weights(inception_path)
        except DdpmError:
            log("notice: no Inception weights found (see README, 'FID offline'); using the random-conv "
                "extractor, whose scores are NOT comparable to published FID")
            return RandomConvExtractor(device=device)
    else:
        path = find_inception_weights(inception_path)
    return InceptionExtractor(path, device=device)


def reference_key(ref: str, size: int | tuple[int, int], channels: int) -> str:
    """Identifies the reference images: a builtin's name, or the files (a folder's images, or one array file)
    with their sizes and mtimes; and the image size (N or HxW) and channels they are loaded at."""
    size = size_text(size)  # a square keeps the key it had before non-square sizes
    if ref.startswith("builtin:"):
        return f"{ref}|{size}|{channels}"
    entries = []
    # An array file (.npy, .npz, IDX) is keyed by itself; a folder by its image files.
    files = [Path(ref).resolve()] if Path(ref).is_file() else list_images(ref)
    for p in files:
        try:
            st = p.stat()
            entries.append((str(p), st.st_size, st.st_mtime_ns))
        except OSError:
            continue
    return f"{dataset_fingerprint(entries)}|{size}|{channels}"


def reference_stats(ref: str, size: int | tuple[int, int], channels: int, extractor: FeatureExtractor,
                    cache_dir: str | Path | None = None, batch_size: int = 64, log=print) -> dict[str, Any]:
    """Features and statistics of the reference data, computed once and cached (no augmentation)."""
    def compute():
        data = load_data(ref, size, channels, log=log)
        images = torch.from_numpy(np.ascontiguousarray(data.images)).permute(0, 3, 1, 2)
        log(f"computing reference features of {len(images)} images from {ref} with {extractor.name}")
        return compute_features(extractor, images, batch_size)

    return cached_feature_stats(reference_key(ref, size, channels), compute, cache_dir or default_cache_dir(),
                                extractor)


def load_samples(path: str | Path) -> torch.Tensor:
    """uint8 (N, C, H, W) samples from a folder of equally sized images or a .npy/.npz array
    of uint8 (N, H, W, C) or (N, C, H, W)."""
    path = Path(path)
    if path.is_dir():
        files = list_images(path)
        if not files:
            raise DdpmError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {path}")
        from PIL import Image

        with Image.open(files[0]) as first:
            size, channels = (first.height, first.width), 1 if first.mode in ("L", "I;16", "I") else 3
        return torch.from_numpy(np.stack([load_image(f, size, channels) for f in files])).permute(0, 3, 1, 2)
    if path.suffix not in (".npy", ".npz") or not path.is_file():
        raise DdpmError(f"--samples {path} must be a folder of images or an existing .npy/.npz file")
    try:
        arr = np.load(path, allow_pickle=False)
        if isinstance(arr, np.lib.npyio.NpzFile):
            arr = arr[arr.files[0]]
    except (OSError, ValueError) as exc:
        raise DdpmError(f"cannot read samples from {path}: {exc}") from None
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise DdpmError(f"samples in {path} must be a uint8 array of shape (N, H, W, C) or (N, C, H, W), "
                        f"got {arr.dtype} {arr.shape}; convert floats with ((x + 1) * 127.5).round()")
    if arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(arr))


def sample_features(model, diffusion, n: int, extractor: FeatureExtractor, sampler: str = "ddpm",
                    steps: int | None = None, seed: int = 0, batch_size: int = 64, bf16: bool = False,
                    progress: bool = True, **options) -> torch.Tensor:
    """Generate `n` samples in batches (image k seeded by (seed, k)) and return their features."""
    feats = []
    bar = tqdm(total=n, desc=f"eval samples ({sampler})", unit="img", disable=not progress)
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        images = diffusion.sample(model, b, sampler=sampler, steps=steps, seed=seed, first_index=start,
                                  bf16=bf16, progress=False, **options)
        feats.append(extractor(images))
        bar.update(b)
    bar.close()
    return torch.cat(feats)


def score(real: dict[str, Any], fake_features: torch.Tensor, extractor: FeatureExtractor) -> dict[str, Any]:
    """FID, KID, precision and recall of generated features against reference stats."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = evaluate_features(real["features"], fake_features.numpy(),
                                             kid_subset_size=min(1000, len(fake_features), len(real["features"])))
    metrics.update(extractor=extractor.name, comparable_to_published=bool(extractor.comparable_to_published),
                   warnings=[str(w.message) for w in caught])
    return metrics


class TrainingMetric:
    """FID/KID of the EMA model against the training images, for logging every K steps.

    The reference features of the (already decoded) training images are computed once per run;
    each call generates `n` per-sample seeded images (the same seeds every time, so the curve
    reflects the model, not the noise) and scores them.
    """

    def __init__(self, images_nhwc: np.ndarray, extractor: str = "randconv", n: int = 2000, sampler: str = "dpm++2m",
                 steps: int = 20, seed: int = 0, batch_size: int = 250, device: str | torch.device = "cpu"):
        self.extractor = make_extractor(extractor, device=device, log=lambda *a: None)
        self.n, self.sampler, self.steps, self.seed, self.batch_size = n, sampler, steps, seed, batch_size
        self._images = images_nhwc
        self._real: np.ndarray | None = None

    def __call__(self, model, diffusion, bf16: bool = False) -> dict[str, float]:
        if self._real is None:
            images = torch.from_numpy(np.ascontiguousarray(self._images)).permute(0, 3, 1, 2)
            self._real = compute_features(self.extractor, images, self.batch_size).numpy()
        fake = sample_features(model, diffusion, self.n, self.extractor, self.sampler, self.steps, self.seed,
                               self.batch_size, bf16, progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # small-n warnings would repeat at every evaluation
            m = evaluate_features(self._real, fake.numpy(),
                                           kid_subset_size=min(1000, self.n, len(self._real)))
        return {"fid": m["fid"], "kid": m["kid_mean"], "precision": m["precision"], "recall": m["recall"]}
