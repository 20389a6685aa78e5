"""SDEdit (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with SDEs", §3, Alg. 1):
perturb a guide image to time t0 = S * T of the forward SDE, then run the reverse process from
t0 to 0. In VE coordinates the perturbation is x(t0) = x_guide + sigma(t0) z (their Eq. 3 for
the VE-SDE; a VP model's x_VP / sqrt(alpha_bar) is this x, see diffusion.VPDenoiser).

`start_sigma` maps S to sigma(t0); `truncate` cuts a sampler's noise levels to those below it,
so any sampler runs the remaining part of its own schedule.
"""
from __future__ import annotations

import math

import torch


def start_sigma(denoiser, strength: float, sigma_max: float) -> float:
    """sigma at t0 = S * T.

    Discrete (VP) model with T timesteps: the model's sigma at fractional timestep S * T - 1,
    log-interpolated (timestep index T - 1 is t = T), so S = 1 gives its largest sigma. Continuous
    (EDM) model: the point at fraction S of the Karras ramp (Karras et al. 2022, Eq. 5 with
    rho = 7) between sigma_min and `sigma_max`, whose t runs over [0, 1] the same way.
    """
    discrete = getattr(denoiser, "discrete_sigmas", None)
    if discrete is not None:
        log_s = discrete.double().log()
        pos = min(max(strength * len(discrete) - 1, 0.0), len(discrete) - 1.0)
        lo = int(math.floor(pos))
        hi = min(lo + 1, len(discrete) - 1)
        return float(torch.exp(log_s[lo] + (pos - lo) * (log_s[hi] - log_s[lo])))
    rho, lo_s = 7.0, float(denoiser.sigma_min)
    return (lo_s ** (1 / rho) + strength * (sigma_max ** (1 / rho) - lo_s ** (1 / rho))) ** rho


def truncate(sigmas: torch.Tensor, sigma_start: float) -> torch.Tensor:
    """[sigma_start] followed by the levels of `sigmas` (descending, ending in 0) below it."""
    below = sigmas[sigmas < sigma_start * (1 - 1e-6)]
    return torch.cat([sigmas.new_tensor([sigma_start]), below])
