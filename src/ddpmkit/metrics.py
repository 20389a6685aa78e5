"""Sample-quality metrics on feature matrices of shape ``(N, dim)``: FID, KID, precision/recall.

The features come from an extractor in :mod:`ddpmkit.extractors`; nothing here knows about
images or networks.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import scipy.linalg
import torch

from ddpmkit.errors import DdpmError

__all__ = ["as_features", "feature_stats", "frechet_distance", "kid", "precision_recall", "evaluate_features"]


def as_features(x: Any, what: str) -> np.ndarray:
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
    feats = as_features(features, "features")
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
    a = as_features(feats_a, "feats_a")
    b = as_features(feats_b, "feats_b")
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
    return torch.from_numpy(as_features(x, what).astype(np.float32))


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
    real = as_features(real_feats, "real_feats")
    fake = as_features(fake_feats, "fake_feats")
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
