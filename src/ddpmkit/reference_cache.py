"""On-disk cache of reference feature statistics, keyed by dataset contents and extractor.

Recomputing the features of a reference set (thousands of Inception passes) is the slow part of
an evaluation; :func:`cached_feature_stats` does it once per dataset contents and extractor.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ddpmkit.extractors import FeatureExtractor
from ddpmkit.metrics import as_features, feature_stats

__all__ = ["dataset_fingerprint", "cached_feature_stats"]

_CACHE_VERSION = 1


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


def cached_feature_stats(
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
    feats64 = as_features(features, "reference features")
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
