"""The one-step denoising student of Luhman & Luhman (2021).

The teacher's deterministic sampler maps noise z to an image x = S(z); the student learns that
map in one network evaluation: x^ = D_student(prior_std * z, sigma_max), trained with the mean
squared error ||x^ - S(z)||^2 (a regression on the teacher's samples, as in their paper; the
exact loss and weighting of their Eq. are not reproduced here). The pairs (z, S(z))
are made once by the teacher with DPM-Solver++(2M) (Lu et al. 2022) on its Karras grid, and kept
in models/RUN/pairs.npy, a float32 memory-mapped array of shape (N, 2, C, H, W) ([:, 0] = z,
[:, 1] = image in [-1, 1]). Pair k's noise depends only on (seed, k), and the count of finished
pairs is written (atomically) only after their chunk is flushed, so a killed run resumes the
generation where it stopped and ends with the same file. The student samples with one DDIM step
at sigma_max: D(x, sigma_max) is exactly DDIM's single step.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from .. import samplers
from ..data import epoch_generator, num_batches
from ..errors import DdpmError

TEACHER_SAMPLER, TEACHER_STEPS = "dpm++2m", 20
CHUNK = 64  # pairs generated and flushed at a time
PAIR_SEED_STREAM = 104729  # pairs use seed (train.seed, this), apart from the grids' seeds


@dataclass
class PairData:
    """(noise, image) pairs for the trainer: `images` is the (N, 2, C, H, W) memory map."""

    images: np.ndarray
    source: str
    labels: None = None
    classes: tuple = ()
    skipped: int = 0

    @property
    def channels(self) -> int:
        return self.images.shape[2]

    def __len__(self) -> int:
        return len(self.images)


def _write_count(path: Path, done: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"done": done}))
    os.replace(tmp, path)


def make_pairs(path: Path, n: int, shape: tuple[int, int, int], denoiser, seed: int, device: torch.device,
               log: Callable = print, batch: int = CHUNK) -> np.ndarray:
    """Generate the n pairs into `path` (resuming a partial file), returning the memory map."""
    count_file = path.with_name(path.name + ".done.json")
    full = (n, 2, *shape)
    done = 0
    if path.exists() and count_file.exists():
        arr = np.load(path, mmap_mode="r+")
        if arr.shape != full or arr.dtype != np.float32:
            raise DdpmError(f"{path} holds pairs of shape {arr.shape}, not {full}; delete it or use another "
                            f"--run-name")
        done = int(json.loads(count_file.read_text())["done"])
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=full)
        _write_count(count_file, 0)
    if done < n:
        log(f"teacher: generating {n - done} of {n} (noise, image) pairs with {TEACHER_SAMPLER} "
            f"{TEACHER_STEPS} steps into {path}")
    sigmas = samplers.make_sigmas(getattr(denoiser, "discrete_sigmas", None), TEACHER_STEPS, "karras",
                                  sigma_min=denoiser.sigma_min, sigma_max=denoiser.sigma_max).to(device)
    for start in range(done, n, batch):
        b = min(batch, n - start)
        noise = samplers.PerSampleNoise(samplers.sample_seeds(seed, range(start, start + b)))
        z = noise(torch.empty((b, *shape), device=device))
        with torch.no_grad():
            x = samplers.SAMPLERS[TEACHER_SAMPLER].fn(denoiser, z * denoiser.prior_std(float(sigmas[0])), sigmas)
        arr[start:start + b, 0] = z.cpu().numpy()
        arr[start:start + b, 1] = x.clamp(-1, 1).cpu().numpy()
        arr.flush()
        _write_count(count_file, start + b)
    return np.load(path, mmap_mode="r")


def pair_batches(data: PairData, batch_size: int, seed: int, epoch: int, start: int, rank: int, world: int,
                 device: torch.device) -> Iterator[torch.Tensor]:
    """Batches of pairs in the epoch's fixed order, as (b, 2C, H, W): noise channels, then image channels."""
    n = len(data)
    perm = torch.randperm(n, generator=epoch_generator(seed, epoch))
    g = batch_size * world
    for b in range(start, num_batches(n, batch_size, world)):
        idx = np.sort(perm[b * g:(b + 1) * g][rank::world].numpy())
        rows = torch.from_numpy(np.ascontiguousarray(data.images[idx])).to(device)
        yield rows.flatten(1, 2)


class StudentLoss:
    """||D_student(prior_std z, sigma_max) - S(z)||^2 per pair; x0 is a pair batch from `pair_batches`."""

    def __init__(self, diffusion):
        self.diffusion = diffusion

    def draw(self, n: int, like: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        return {}  # nothing random: the pairs are the data

    def __call__(self, net: nn.Module, x0: torch.Tensor, draws: dict) -> torch.Tensor:
        z, image = x0.chunk(2, dim=1)
        student = self.diffusion.denoiser(net, clip=False)
        sigma_max = float(student.sigma_max)
        x = z * student.prior_std(sigma_max)
        out = student(x, torch.full((x.shape[0],), sigma_max, device=x.device))
        return ((out.float() - image) ** 2).flatten(1).mean(1)
