"""Simple and Fast Distillation (SFD): Zhou, Chen, Wang, Chen & Lyu (NeurIPS 2024), "Simple and Fast
Distillation of Diffusion Models"; reference code zju-pi/diff-sampler, sfd-main/training/loss.py.

An N-step student samples with one deterministic DDIM step (= an Euler step of the
probability-flow ODE) per segment [s_n, s_{n+1}] of its levels s_0 > s_1 > ... > s_N = 0. SFD
fine-tunes the teacher's own network, at exactly those levels, so that its N steps follow the
teacher's whole trajectory:

  1. draw x_T = prior_std(s_0) z, z ~ N(0, I) (the noise `ddpm sample` starts from);
  2. the teacher solves the ODE from x_T with about K solver steps per segment (the paper's M
     intermediate points per segment, K = M + 1; its code's default M = 3) and is read at the
     segment ends: x^T_1, ..., x^T_N;
  3. the student steps from its own previous output: x^S_0 = x_T and
         x^S_{n+1} = D_S(x^S_n, s_n) + (s_{n+1} / s_n) (x^S_n - D_S(x^S_n, s_n))    (Song et al. 2021, Eq. 12),
     with x^S_n detached, so each step learns to fix the error the student's earlier steps left
     (the paper's "global" trajectory distillation);
  4. the loss is the L1 distance sum_n mean |x^S_{n+1} - x^T_{n+1}|, unweighted, in the
     variance-exploding coordinates x = x0 + sigma eps (the paper's choice of L1; its code's
     `(student_out - teacher_out).abs()`).

The reference code takes one optimizer step per segment; here one optimizer step takes the
summed gradients of all N segments of a batch, so each teacher trajectory is computed once and a
run resumes exactly from the trainer's per-batch draws. Left out: the analytical first step
(AFS), the step-conditioned SFD-v and the second, one-step stage.

The student's levels are its own sampler's (`samplers.sampler_sigmas` with the sampler and steps
that the checkpoint's [distill] section names: `progressive`, DDIM on the nested grid, whose VP
levels are the trailing timesteps round(k T / N) - 1 and EDM levels Karras et al. (2022) Eq. (5)
with ramp k / N), so `ddpm sample --ckpt` evaluates the student at exactly the levels it was
trained at. The teacher takes K N steps of one size in log sigma from s_0 down to its sigma_min,
with the student's levels among them (`substep_levels`), then one step to 0: its target at
sigma = 0 is the ODE's end up to D(x, sigma_min) - x, not a first-order jump from s_{N-1}. The
paper's teacher is DPM-Solver++(3M); the default here is (2M): on N(0.3, 0.5^2) data with the
exact denoiser and K = 4, (2M) missed the ODE's end by 0.006-0.012 (mean absolute error) for
N = 2 and 4 on the linear and cosine schedules, (3M) by 0.002-0.17 (`--teacher-sampler` picks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import samplers
from ..data import num_batches
from ..errors import DdpmError
from .progressive import ddim_step

TEACHER_SAMPLERS = ("dpm++2m", "dpm++3m", "heun", "euler", "ddim", "ipndm")  # deterministic, any levels
DEFAULT_TEACHER_SAMPLER = "dpm++2m"
DEFAULT_TEACHER_STEPS = 4  # K: teacher sub-steps per student step (SFD's default M = 3 points, M + 1 steps)
STUDENT_SAMPLER = "progressive"  # DDIM on the nested grid: the student's step and its levels


def check_teacher_solver(sampler: str, substeps: int) -> None:
    """A one-line error for a teacher solver SFD cannot use."""
    if sampler not in TEACHER_SAMPLERS:
        raise DdpmError(f"unknown --teacher-sampler '{sampler}'; choose one of {', '.join(TEACHER_SAMPLERS)}")
    if substeps < 1:
        raise DdpmError(f"--teacher-steps must be >= 1, got {substeps}")


def check_steps(diffusion_cfg, steps: int, sampler: str | None = None, substeps: int | None = None) -> None:
    """One-line errors, before a run starts, for student steps or a teacher solver that cannot work."""
    from ..diffusion import Diffusion

    check_teacher_solver(sampler or DEFAULT_TEACHER_SAMPLER, substeps or DEFAULT_TEACHER_STEPS)
    den = Diffusion.from_config(diffusion_cfg, 4, 1).denoiser(nn.Identity())
    substep_levels(student_levels(den, steps), substeps or DEFAULT_TEACHER_STEPS, float(den.sigma_min))


def student_levels(denoiser, steps: int, sampler: str = STUDENT_SAMPLER) -> torch.Tensor:
    """The student's N + 1 levels (ending with 0): those `ddpm sample` gives `sampler` with `steps`."""
    return samplers.sampler_sigmas(denoiser, sampler, steps)


def split_steps(lengths: list[float], total: int) -> list[int]:
    """`total` steps over segments of the given (log) lengths in proportion to them, at least one each
    (largest remainders), so that every teacher step spans about the same log-sigma."""
    total = max(total, len(lengths))
    share = [total * l / sum(lengths) for l in lengths]
    counts = [max(1, math.floor(v)) for v in share]
    while sum(counts) < total:
        counts[max(range(len(counts)), key=lambda i: share[i] - counts[i])] += 1
    while sum(counts) > total:
        counts[max((i for i in range(len(counts)) if counts[i] > 1), key=lambda i: counts[i] - share[i])] -= 1
    return counts


def substep_levels(levels: torch.Tensor, substeps: int, sigma_min: float) -> tuple[torch.Tensor, list[int]]:
    """The teacher's levels: substeps * N steps uniform in log sigma from levels[0] down to sigma_min,
    each student level a knot of them (`split_steps` shares the steps among the segments), then one
    step to 0. Returns (levels, the index of each segment's end in them); the last end is the final 0.

    Steps of one size in log sigma are the spacing DPM-Solver++ is built for (Lu et al. 2022b take
    the step in lambda = -log sigma); equal sub-steps per segment would change the step size at
    every knot, which the multistep extrapolation handles badly: for N(0.3, 0.5^2) data on the
    linear schedule, 4 x 4 DPM-Solver++(2M) steps missed the end of the exact ODE by 0.041 (mean
    absolute error) that way and by 0.006 this way.
    """
    top = [float(v) for v in levels[:-1]]
    ends = [float(v) for v in levels[1:-1]] + [sigma_min]
    if any(b >= a for a, b in zip(top, ends)):
        raise DdpmError(f"the student's levels {[round(v, 4) for v in top]} must lie above the teacher's "
                        f"sigma_min {sigma_min:.4g}; use fewer --steps")
    counts = split_steps([math.log(a / b) for a, b in zip(top, ends)], substeps * len(top))
    fine, knots = [top[0]], []
    for a, b, k in zip(top, ends, counts):
        fine += [math.exp(math.log(a) + j / k * math.log(b / a)) for j in range(1, k)] + [b]
        knots.append(len(fine) - 1)
    fine.append(0.0)
    knots[-1] = len(fine) - 1  # the last segment ends at 0, one step after sigma_min
    return torch.tensor(fine, dtype=torch.float32), knots


def teacher_trajectory(teacher, x: torch.Tensor, levels: torch.Tensor, substeps: int,
                       sampler: str = DEFAULT_TEACHER_SAMPLER) -> list[torch.Tensor]:
    """The teacher's ODE solution from x (at levels[0]) at levels[1], ..., levels[N] = 0: one solver
    run over `substep_levels`, read at each segment's end (the solvers' callback sees x at level i)."""
    fine, ends = substep_levels(levels, substeps, float(teacher.sigma_min))
    fine = fine.to(x.device)
    at = {}

    def keep(i, sigma, x_i, denoised):
        at[i] = x_i

    with torch.no_grad():
        out = samplers.SAMPLERS[sampler].fn(teacher, x, fine, callback=keep)
    return [at[i] for i in ends[:-1]] + [out]


def student_steps(student, x: torch.Tensor, levels: torch.Tensor) -> list[torch.Tensor]:
    """The student's N DDIM steps on `levels` from x, each from its own previous output (detached)."""
    outs = []
    for n in range(len(levels) - 1):
        s, s_next = (levels[k].to(x.device).expand(x.shape[0]) for k in (n, n + 1))
        y = ddim_step(student, x, s, s_next)
        outs.append(y)
        x = y.detach()
    return outs


def l1_per_sample(outs: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """sum over segments of the mean absolute error per sample."""
    return sum((a.float() - b.float()).abs().flatten(1).mean(1) for a, b in zip(outs, targets))


class SFDLoss:
    """SFD's loss (module docstring). `teacher_net` is read with `teacher_diffusion` (an eps teacher of
    a v student stays eps); the student network with the run's `diffusion`."""

    def __init__(self, diffusion, teacher_net: nn.Module, teacher_diffusion, steps: int,
                 substeps: int = DEFAULT_TEACHER_STEPS, teacher_sampler: str = DEFAULT_TEACHER_SAMPLER,
                 sampler: str = STUDENT_SAMPLER):
        check_teacher_solver(teacher_sampler, substeps)
        self.diffusion, self.teacher_net, self.teacher_diffusion = diffusion, teacher_net, teacher_diffusion
        self.steps, self.substeps, self.teacher_sampler, self.sampler = steps, substeps, teacher_sampler, sampler
        self.levels = student_levels(diffusion.denoiser(nn.Identity()), steps, sampler)

    def draw(self, n: int, like: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """z ~ N(0, I): the initial noise, before scaling to the top level."""
        return {"z": torch.randn((n, *like.shape[1:]), generator=generator, device=like.device, dtype=like.dtype)}

    def start(self, draws: dict) -> torch.Tensor:
        """x at levels[0], as `samplers.run` scales its noise."""
        den = self.diffusion.denoiser(nn.Identity())
        return draws["z"] * den.prior_std(float(self.levels[0]))

    def targets(self, x: torch.Tensor) -> list[torch.Tensor]:
        teacher = self.teacher_diffusion.denoiser(self.teacher_net, clip=False)
        return teacher_trajectory(teacher, x, self.levels, self.substeps, self.teacher_sampler)

    def __call__(self, net: nn.Module, x0: torch.Tensor, draws: dict) -> torch.Tensor:
        x = self.start(draws)
        targets = self.targets(x)
        outs = student_steps(self.diffusion.denoiser(net, clip=False), x, self.levels)
        return l1_per_sample(outs, targets)


@dataclass
class NoiseRows:
    """The 'data set' of a data-free run: `rows` placeholders per epoch (the loss draws its own noise)."""

    rows: int
    channels: int
    source: str = "noise (SFD needs no training images)"
    images: None = None
    labels: None = None
    classes: tuple = ()
    skipped: int = 0

    def __len__(self) -> int:
        return self.rows


def noise_batches(data: NoiseRows, shape: tuple[int, int, int], batch_size: int, start: int, rank: int, world: int,
                  device: torch.device):
    """Zero tensors with this rank's share (rows rank::world) of each global batch from batch `start` on."""
    g = batch_size * world
    for b in range(start, num_batches(len(data), batch_size, world)):
        rows = len(range(rank, min(g, len(data) - b * g), world))
        yield torch.zeros((rows, *shape), device=device)
