"""Noise schedules as plain tensor builders (float64, on the CPU).

A discrete variance-preserving (VP) schedule is the vector alpha_bar[0..T-1]; index 0 is the
least noisy step. Samplers work in the equivalent variance-exploding coordinates
x / sqrt(alpha_bar), whose noise level is sigma = sqrt((1 - alpha_bar) / alpha_bar).
"""
from __future__ import annotations

import math

import torch


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Betas rising linearly from beta_start to beta_end, as in Ho et al. (2020) §4 (1e-4 to 0.02 over T=1000)."""
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_alpha_bar(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), Eq. (17) of Nichol & Dhariwal (2021), betas clipped at 0.999."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return torch.cumprod(1 - betas, dim=0)


def sigmoid_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Betas following a sigmoid from beta_start to beta_end (the GeoDiff / Jabri et al. sigmoid schedule)."""
    x = torch.linspace(-6, 6, timesteps, dtype=torch.float64)
    return torch.sigmoid(x) * (beta_end - beta_start) + beta_start


def rescale_zero_terminal_snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so its last value is 0 and its first unchanged (Lin et al. 2024, Alg. 1)."""
    root = alpha_bar.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return root**2


def alpha_bar_schedule(name: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02,
                       zero_terminal_snr: bool = False) -> torch.Tensor:
    """alpha_bar[0..T-1] for a named schedule."""
    if name == "linear":
        alpha_bar = torch.cumprod(1 - linear_betas(timesteps, beta_start, beta_end), dim=0)
    elif name == "cosine":
        alpha_bar = cosine_alpha_bar(timesteps)
    elif name == "sigmoid":
        alpha_bar = torch.cumprod(1 - sigmoid_betas(timesteps, beta_start, beta_end), dim=0)
    else:
        raise ValueError(f"unknown schedule '{name}'; choose linear, cosine or sigmoid")
    if zero_terminal_snr:
        alpha_bar = rescale_zero_terminal_snr(alpha_bar)
    return alpha_bar


def betas_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, with alpha_bar_{-1} = 1."""
    prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    return 1 - alpha_bar / prev


def vp_sigmas(alpha_bar: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), increasing in t (inf where alpha_bar = 0)."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def spaced_timesteps(timesteps: int, steps: int, spacing: str = "trailing") -> torch.Tensor:
    """`steps` distinct indices in 0..T-1, descending from the noisiest.

    uniform: the "leading" spacing of DDIM (Song et al. 2021, App. C.2), starting at 0;
    trailing: ends at T-1 as recommended by Lin et al. (2024) Table 2, t_k = round(k T / steps) - 1
    for k = 1..steps, computed in integers (ties round up); since T / steps >= 1 the values are distinct;
    quadratic: denser near t=0 (Song et al. 2021, App. D.3).
    """
    if not 1 <= steps <= timesteps:
        raise ValueError(f"steps must be in 1..{timesteps} for this {timesteps}-step model, got {steps}")
    if spacing == "uniform":
        t = torch.arange(steps, dtype=torch.float64) * (timesteps // steps)
    elif spacing == "trailing":
        # A float arange over (T, 0] with step T/steps can yield steps + 1 points; integers cannot.
        k = torch.arange(1, steps + 1, dtype=torch.long)
        t = (2 * timesteps * k + steps) // (2 * steps) - 1
    elif spacing == "quadratic":
        t = torch.linspace(0, math.sqrt(timesteps * 0.8), steps, dtype=torch.float64) ** 2
    else:
        raise ValueError(f"unknown timestep spacing '{spacing}'; choose uniform, trailing or quadratic")
    t = torch.unique(t.long().clamp(0, timesteps - 1))
    if len(t) < steps:  # rounding collisions (quadratic at large step counts): fill with unused indices
        unused = torch.tensor(sorted(set(range(timesteps)) - set(t.tolist())), dtype=torch.long)
        t = torch.unique(torch.cat([t, unused[torch.linspace(0, len(unused) - 1, steps - len(t)).long()]]))
    return t.flip(0)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, Eq. (5) of Karras et al. (2022)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho
