"""Public entry point for sample-quality evaluation; each concern lives in its own module.

* :mod:`ddpmkit.fid_weights`: where the FID Inception weights come from and whether a file is the
  standard one (decided by its sha256).
* :mod:`ddpmkit.extractors`: networks that turn uint8 images into feature matrices.
* :mod:`ddpmkit.metrics`: FID, KID and precision/recall on feature matrices.
* :mod:`ddpmkit.reference_cache`: the on-disk cache of reference statistics.
* :mod:`ddpmkit.scoring`: the pipeline behind ``ddpm eval`` (reference data, samples, scores).

This module only re-exports their public names, so ``from ddpmkit.evaluate import ...`` keeps
working.
"""

from ddpmkit.extractors import FeatureExtractor, InceptionExtractor, RandomConvExtractor, compute_features
from ddpmkit.fid_weights import (
    INCEPTION_ENV_VAR,
    KNOWN_INCEPTION_SHA256,
    find_inception_weights,
    is_known_fid_file,
)
from ddpmkit.metrics import evaluate_features, feature_stats, frechet_distance, kid, precision_recall
from ddpmkit.reference_cache import cached_feature_stats, dataset_fingerprint

__all__ = [
    "FeatureExtractor",
    "InceptionExtractor",
    "RandomConvExtractor",
    "find_inception_weights",
    "is_known_fid_file",
    "compute_features",
    "feature_stats",
    "frechet_distance",
    "kid",
    "precision_recall",
    "evaluate_features",
    "cached_feature_stats",
    "dataset_fingerprint",
    "INCEPTION_ENV_VAR",
    "KNOWN_INCEPTION_SHA256",
]
