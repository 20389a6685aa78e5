"""Samplers: pure functions sharing one signature.

    sampler(denoiser, x, sigmas, *, noise=None, callback=None, progress=False, **options) -> x0

All samplers work in variance-exploding coordinates x = x0 + sigma * eps (Karras et al. 2022,
§2). `denoiser(x, sigma)` returns the model's estimate of x0; `sigmas` is a descending 1-D
tensor ending with 0, and `x` starts as noise scaled to `sigmas[0]`. A discrete VP model
(DDPM) fits this frame through `diffusion.VPDenoiser`, since x_VP / sqrt(alpha_bar) is such an
x with sigma = sqrt((1 - alpha_bar) / alpha_bar). `noise(x)` draws standard normal noise shaped
like x (per-sample seeded by `sample`); `callback(i, sigma, x, denoised)` sees every step.

Clipping. A denoiser built with clipping on (`Diffusion.denoiser(clip=True)`, config
`diffusion.clip_denoised`, `ddpm sample --clip`) clamps every x0 estimate to [-1, 1] before the
sampler sees it. For DDPM that is the clipped posterior mean of Ho et al. (2020). For the ODE
solvers (DDIM, DPM-Solver++, Euler, Heun, iPNDM) it replaces D by clamp(D), so they integrate a
different ODE from the probability-flow ODE (k-diffusion and EDM do not clip); it can still
help a small model whose estimates stray outside the data range (diffusers' "thresholding").

Adding a sampler means writing one function and one `SAMPLERS` entry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import schedules
from .errors import DdpmError

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _steps(sigmas: torch.Tensor, progress: bool, desc: str):
    return tqdm(range(len(sigmas) - 1), desc=desc, disable=not progress, leave=False)


def _noise_fn(noise):
    return noise if noise is not None else torch.randn_like


def ancestral_sigmas(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step into a deterministic part to sigma_down and fresh noise of std sigma_up.

    sigma_up^2 = eta^2 sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2 is the DDIM noise
    sigma_eta of Song et al. (2021) Eq. (16) in these coordinates; eta = 1 is DDPM's posterior
    variance beta-tilde (Ho et al. 2020, Eq. 7).
    """
    if sigma_to == 0:
        return 0.0, 0.0
    up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - up**2), up


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise=None, callback=None,
                progress: bool = False, eta: float = 0.0) -> torch.Tensor:
    """DDIM, Song et al. (2021) Eq. (12): deterministic for eta = 0, DDPM-like for eta = 1.

    The direction term uses the noise implied by the (possibly clipped) x0 estimate,
    eps = (x - D) / sigma, not the network's own eps output. With clipping on this differs from
    diffusers' default (use_clipped_model_output=False keeps the model's eps) and equals its
    use_clipped_model_output=True; without clipping the two are the same.
    """
    if not 0.0 <= eta <= 1.0:
        raise DdpmError(f"DDIM eta must be in [0, 1], got {eta}")
    noise = _noise_fn(noise)
    for i in _steps(sigmas, progress, "ddim"):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigmas[i])
        if callback is not None:
            callback(i, s, x, denoised)
        down, up = ancestral_sigmas(s, s_next, eta)
        # x0 estimate plus the predicted noise direction scaled to sigma_down (Eq. 12's middle term).
        x = denoised + (down / s) * (x - denoised)
        if up > 0:
            x = x + up * noise(x)
    return x


@torch.no_grad()
def sample_ddpm(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise=None, callback=None,
                progress: bool = False, variance: str = "beta") -> torch.Tensor:
    """Ancestral sampling, Algorithm 2 of Ho et al. (2020), on any subset of the model's timesteps.

    Each step draws from N(mu-tilde, sigma^2) with mu-tilde the posterior mean of q(x_s | x_t, x0)
    (Eq. 7) and sigma^2 = beta_t ("beta") or beta-tilde_t ("posterior"). On a subset of timesteps
    beta_t = 1 - alpha_bar_t / alpha_bar_s, the respacing of Nichol & Dhariwal (2021) §4.
    A model with learned variance (Improved DDPM Eq. 15) overrides `variance`.
    """
    if variance not in ("beta", "posterior"):
        raise DdpmError(f"DDPM variance must be 'beta' or 'posterior', got '{variance}'")
    noise = _noise_fn(noise)
    learned = getattr(denoiser, "learned_variance", False)
    for i in _steps(sigmas, progress, "ddpm"):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        if learned:
            denoised, frac = denoiser(x, sigmas[i], return_variance=True)
        else:
            denoised = denoiser(x, sigmas[i])
        if callback is not None:
            callback(i, s, x, denoised)
        # Posterior mean in VE coordinates: x0 + (s_next^2 / s^2) (x - x0).
        x = denoised + (s_next**2 / s**2) * (x - denoised)
        if s_next == 0:
            continue  # Algorithm 2 adds no noise at the last step
        # Both variances divided by alpha_bar_s, expressed with sigmas.
        var_post = s_next**2 * (s**2 - s_next**2) / s**2
        var_beta = (1 + s_next**2) * (s**2 - s_next**2) / (1 + s**2)
        if learned:
            # Improved DDPM Eq. (15): interpolate the two log-variances with the model's output.
            log_var = frac * math.log(var_beta) + (1 - frac) * math.log(var_post)
            x = x + torch.exp(0.5 * log_var) * noise(x)
        else:
            x = x + math.sqrt(var_beta if variance == "beta" else var_post) * noise(x)
    return x


def _churn(x: torch.Tensor, sigma: float, noise, steps: int, s_churn: float, s_tmin: float, s_tmax: float,
           s_noise: float) -> tuple[torch.Tensor, float]:
    """Raise the noise level from sigma to sigma_hat = (1 + gamma) sigma, Algorithm 2 lines 4-6 of Karras et al. (2022)."""
    gamma = min(s_churn / steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma == 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    return x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * noise(x), sigma_hat


@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise=None, callback=None,
                 progress: bool = False, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
                 s_noise: float = 1.0) -> torch.Tensor:
    """Euler steps on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, Alg. 1), optional churn."""
    noise = _noise_fn(noise)
    n = len(sigmas) - 1
    for i in _steps(sigmas, progress, "euler"):
        x, s = _churn(x, float(sigmas[i]), noise, n, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoiser(x, sigmas.new_tensor(s))
        if callback is not None:
            callback(i, s, x, denoised)
        x = x + (float(sigmas[i + 1]) - s) * (x - denoised) / s
    return x


@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise=None, callback=None,
                progress: bool = False, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
                s_noise: float = 1.0) -> torch.Tensor:
    """Heun's 2nd-order method, Algorithm 2 of Karras et al. (2022); 2 model calls per step, 1 on the last."""
    noise = _noise_fn(noise)
    n = len(sigmas) - 1
    for i in _steps(sigmas, progress, "heun"):
        x, s = _churn(x, float(sigmas[i]), noise, n, s_churn, s_tmin, s_tmax, s_noise)
        s_next = float(sigmas[i + 1])
        denoised = denoiser(x, sigmas.new_tensor(s))
        if callback is not None:
            callback(i, s, x, denoised)
        d = (x - denoised) / s
        # Euler step.
        x_next = x + (s_next - s) * d
        if s_next > 0:
            # Apply the 2nd-order correction with the slope at the new point.
            d_next = (x_next - denoiser(x_next, sigmas[i + 1])) / s_next
            x_next = x + (s_next - s) * 0.5 * (d + d_next)
        x = x_next
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise=None, callback=None,
                    progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M), Algorithm 2 of Lu et al. (2022b), in lambda = -log sigma.

    The first step and the step to sigma = 0 are first order (the final-step fallback the
    paper recommends for few steps).
    """
    old, h_old = None, None
    for i in _steps(sigmas, progress, "dpm++2m"):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigmas[i])
        if callback is not None:
            callback(i, s, x, denoised)
        if s_next == 0:
            x = denoised
            continue
        h = math.log(s / s_next)
        d = denoised
        if old is not None:
            r = h_old / h
            # Linear extrapolation of the data prediction to the step's midpoint in lambda.
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
        # Exact integration of the linear part: x_next = (s_next / s) x + (1 - e^{-h}) d.
        x = (s_next / s) * x - math.expm1(-h) * d
        old, h_old = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_3m(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise=None, callback=None,
                    progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(3M), the third-order multistep solver of Lu et al. (2022b) App. B.

    Derivation (read it before "fixing" the D'' term to match other code). In VE coordinates with
    lambda = -log sigma, the exact step from lambda_s to lambda_t = lambda_s + h is (Lu et al.
    2022b, Eq. 9 with alpha = 1)
        x_t = e^{-h} x_s + e^{-h} int_0^h e^u D(lambda_s + u) du.
    Expand D(lambda_s + u) = D + u D' + (u^2 / 2) D'' + O(u^3) and integrate each term exactly:
        e^{-h} int_0^h e^u du           = 1 - e^{-h}
        e^{-h} int_0^h u e^u du         = h - 1 + e^{-h}            = h phi_2,  phi_2 = 1 - (1 - e^{-h})/h
        e^{-h} int_0^h (u^2/2) e^u du   = h^2/2 - h + 1 - e^{-h}    = h^2 phi_3, phi_3 = 1/2 - phi_2/h
    so x_t = e^{-h} x_s + (1 - e^{-h}) D + h phi_2 D' + h^2 phi_3 D'' + O(h^4); for small h the last
    coefficient is h^3/6, i.e. int u^2/2 du, as it must be. The derivatives at lambda_0 (newest)
    come from the quadratic through (lambda_2, D_2), (lambda_1, D_1), (lambda_0, D_0) in Newton form,
    with h1 = lambda_0 - lambda_1, h2 = lambda_1 - lambda_2 and divided differences
        D[0,1] = (D_0 - D_1)/h1,  D[1,2] = (D_1 - D_2)/h2,  D[0,1,2] = (D[0,1] - D[1,2]) / (h1 + h2):
        D'' = 2 D[0,1,2]                 (`second`)
        D'  = D[0,1] + h1 D[0,1,2]       (`first`)
    The factor 2 is the one a Newton quadratic's second derivative carries. k-diffusion, diffusers
    and the DPM-Solver reference code multiply phi_3 by D[0,1,2] h^2 instead (half this term),
    which leaves an O(h^3) local error; test_convergence_order measures order ~3 for this form.
    Lower orders on the first two and the final step.
    """
    hist: list[tuple[torch.Tensor, float]] = []  # (denoised, lambda), newest last
    for i in _steps(sigmas, progress, "dpm++3m"):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigmas[i])
        if callback is not None:
            callback(i, s, x, denoised)
        if s_next == 0:
            x = denoised
            continue
        lam, h = -math.log(s), math.log(s / s_next)
        phi2 = 1 + math.expm1(-h) / h
        x = (s_next / s) * x - math.expm1(-h) * denoised
        order = min(len(hist) + 1, len(sigmas) - 1 - i)  # lower order for the last steps
        if order >= 2:
            d0, lam1 = hist[-1]
            h1 = lam - lam1
            slope0 = (denoised - d0) / h1                      # D' at the midpoint of [lam1, lam]
            if order >= 3:
                dm, lam2 = hist[-2]
                h2 = lam1 - lam2
                slope1 = (d0 - dm) / h2
                second = (slope0 - slope1) * (2 / (h1 + h2))   # D''
                first = slope0 + second * (h1 / 2)             # D' at lam
                phi3 = 0.5 - phi2 / h
                x = x + h * phi2 * first + h**2 * phi3 * second
            else:
                x = x + h * phi2 * slope0
        hist = (hist + [(denoised, lam)])[-2:]
    return x


# Adams-Bashforth weights of the newest slope first, orders 1-4 (Hairer, Norsett & Wanner, Solving
# ODEs I, §III.1, Table 1.1): the fixed coefficients of iPNDM.
ADAMS_BASHFORTH = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


@torch.no_grad()
def sample_ipndm(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise=None, callback=None,
                 progress: bool = False, max_order: int = 4) -> torch.Tensor:
    """iPNDM, the improved pseudo-numerical method of Zhang & Chen (2023) §5 / App. B: explicit
    Adams-Bashforth on the PF-ODE dx/dsigma = d = (x - D(x, sigma)) / sigma with the fixed
    coefficients of a uniform grid, order rising with the history (1, 2, 3, then 4); one model call
    per step and no Runge-Kutta warm-up. The step to sigma = 0 is first order (x = D), as DPM-Solver++'s:
    across it the slope changes fastest, and extrapolating it speckled few-step samples (digits model,
    4 / 6 / 8 NFE on trailing levels: FD 61.6 / 46.2 / 35.8 with the Adams-Bashforth step to 0, 39.8 /
    32.8 / 32.4 first order; equal at 20 NFE; benchmarks/bench_solvers.py's setting).
    """
    if max_order not in (1, 2, 3, 4):
        raise DdpmError(f"iPNDM max_order must be 1, 2, 3 or 4, got {max_order}")
    slopes: list[torch.Tensor] = []  # newest first
    for i in _steps(sigmas, progress, "ipndm"):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigmas[i])
        if callback is not None:
            callback(i, s, x, denoised)
        if s_next == 0:
            x = denoised
            continue
        slopes = [(x - denoised) / s] + slopes[:max_order - 1]
        weights = ADAMS_BASHFORTH[len(slopes) - 1]
        x = x + (s_next - s) * sum(w * d for w, d in zip(weights, slopes))
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise=None, callback=None,
                        progress: bool = False, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """SDE-DPM-Solver++(2M), Lu et al. (2022b) §5 / App. B, with a midpoint 2nd-order term.

    With eta = 1 the first-order step is exactly DDPM's posterior step; eta = 0 gives the ODE solver.
    """
    noise = _noise_fn(noise)
    old, h_old = None, None
    for i in _steps(sigmas, progress, "dpm++2m-sde"):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigmas[i])
        if callback is not None:
            callback(i, s, x, denoised)
        if s_next == 0:
            x = denoised
            continue
        h = math.log(s / s_next)
        eh = eta * h
        # x_next = (s_next/s) e^{-eta h} x + (1 - e^{-(1+eta) h}) D, plus fresh noise.
        x = (s_next / s) * math.exp(-eh) * x - math.expm1(-h - eh) * denoised
        if old is not None:
            r = h_old / h
            x = x - 0.5 * math.expm1(-h - eh) * (1 / r) * (denoised - old)
        if eta > 0:
            x = x + s_next * math.sqrt(-math.expm1(-2 * eh)) * s_noise * noise(x)
        old, h_old = denoised, h
    return x


def nested_sigmas(denoiser, steps: int) -> torch.Tensor:
    """The noise levels of a `steps`-step progressively distilled student: every level of the
    `steps`-step grid is also a level of the 2*steps grid, so two teacher steps span one student step.

    Discrete (VP) models: the trailing timesteps t_k = round(k T / steps) - 1 (the grid `ddim`
    uses; round(2k T / 2steps) = round(k T / steps), so the grids nest); continuous (EDM) models:
    Karras et al. (2022) Eq. (5) with ramp i / steps, i = 0..steps-1 (levels i/steps are levels
    2i / 2steps). Both start at the model's largest sigma and end with 0.
    """
    discrete = getattr(denoiser, "discrete_sigmas", None)
    if discrete is not None:
        T = len(discrete)
        if steps > T:
            raise DdpmError(f"steps={steps} exceeds this model's {T} timesteps; use at most {T}")
        sig = discrete.float()[schedules.spaced_timesteps(T, steps, "trailing").to(discrete.device)].cpu()
    else:
        sigma_min, sigma_max, rho = denoiser.sigma_min, denoiser.sigma_max, 7.0
        ramp = torch.arange(steps, dtype=torch.float64) / steps
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        sig = ((hi + ramp * (lo - hi)) ** rho).float()
    return torch.cat([sig, sig.new_zeros(1)])


def consistency_sigmas(denoiser, steps: int) -> torch.Tensor:
    """The levels of multistep consistency sampling (Song et al. 2023, Alg. 1): Karras et al. (2022)
    Eq. (5) with steps + 1 points from the top level to sigma_min, without sigma_min itself (f is the
    identity there), then 0. One step evaluates at the top level only."""
    sig = make_sigmas(getattr(denoiser, "discrete_sigmas", None), steps + 1, "karras",
                      sigma_min=denoiser.sigma_min, sigma_max=denoiser.sigma_max)
    return torch.cat([sig[:steps], sig.new_zeros(1)])


@torch.no_grad()
def sample_consistency(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise=None, callback=None,
                       progress: bool = False) -> torch.Tensor:
    """Multistep consistency sampling, Song et al. (2023) Alg. 1, on the given levels: at level s_i,
    x0 = f(x, s_i); the next level starts from x = x0 + sqrt(s_{i+1}^2 - sigma_min^2) z, and the last
    (0) returns x0. f is `distill.consistency`'s boundary-condition parameterization of the model.
    Any descending levels work, so SDEdit's truncated grid and RePaint's single steps do too."""
    from .distill.consistency import ConsistencyFunction

    f = ConsistencyFunction(denoiser)
    noise = _noise_fn(noise)
    for i in _steps(sigmas, progress, "consistency"):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = f(x, sigmas[i].to(x.device))
        if callback is not None:
            callback(i, s, x, x0)
        x = x0 + math.sqrt(max(s_next**2 - f.sigma_min**2, 0.0)) * noise(x0) if s_next > 0 else x0
    return x


@dataclass(frozen=True)
class SamplerSpec:
    fn: Callable
    spacing: str | Callable[[int], str]  # default levels on a discrete model: a spacing name, or steps -> name
    calls_per_step: int     # model evaluations per step (Heun's last step makes 1)
    stochastic: bool
    summary: str
    default_steps: int | None  # steps when none are given; None = every timestep of a discrete model
    grid: Callable | None = None  # grid(denoiser, steps) -> its own levels when no spacing is given (students)

    def default_spacing(self, steps: int) -> str:
        """The spacing this sampler uses for `steps` steps on a discrete model when none is given."""
        return self.spacing(steps) if callable(self.spacing) else self.spacing


# Default steps, chosen from the papers' own recommendations and the README's quality-vs-NFE table:
# ddpm: all T, Algorithm 2 as trained (its quality falls fastest with fewer steps);
# ddim: 50, between the 20 and 100 of Song et al. (2021) Table 1 where DDIM is close to converged;
# dpm++2m / 3m / 2m-sde / ipndm: 20, the "15 to 20 steps" Lu et al. (2022b) state (abstract) for high quality;
# euler: 50, first order like DDIM; heun: 18 steps = 35 NFE, the CIFAR-10 setting of Karras et al. (2022) Table 2.
#
# Default spacings of the ODE solvers, measured with benchmarks/bench_solvers.py on the 16 px digits
# `tiny` model (cosine schedule, v-prediction, 150k training images), n = 500 paired samples, clip off;
# classifier FD, the converged ODE (100 NFE) scores 27.8:
# * trailing up to FEW_STEPS steps for dpm++2m, dpm++3m and ipndm: at 4 / 6 / 8 / 10 / 12 / 15 NFE
#   DPM-Solver++(2M) scores 44.5 / 35.2 / 32.9 / 30.8 / 30.3 / 31.1 on trailing levels, 93.7 / 49.2 /
#   46.3 / 41.3 / 34.7 / 30.7 on karras and 261 / 38.6 / 35.9 / 35.3 / 32.1 / 31.4 on karras-nomin
#   (3M and iPNDM alike, 3M's karras far worse: 84 at 12 NFE). At 20 NFE karras and trailing tie
#   (2M 28.5 and 29.4, 3M 29.8 and 29.3, iPNDM 28.0 and 28.2), so karras stays there;
# * ddim and euler (the same update without churn): trailing at every count (20 NFE: 29.6, karras 34.2);
# * heun: karras-nomin. Heun's last correction lands near sigma_min on karras levels (3 / 5 / 7 / 9 / 19
#   NFE: FD 1357 / 988 / 250 / 178 / 35.4; karras-nomin 1102 / 164 / 155 / 110 / 34.5), and trailing's
#   first step from sigma 4096 ruins its correction (FD > 400).
# A schedule calibrated for the model (`ddpm calibrate`, calibrate.py) beats these at 4, 6, 8 and 10 NFE
# (2M: 40.6 / 33.4 / 29.2 / 27.7; iPNDM: 36.6 / 30.2 / 28.2 / 26.8; DPM-Solver++(2M) on 20 karras steps: 28.5).
FEW_STEPS = 15


def _trailing_for_few_steps(steps: int) -> str:
    return "trailing" if steps <= FEW_STEPS else "karras"


SAMPLERS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(sample_ddpm, "trailing", 1, True, "ancestral DDPM (Ho et al. 2020), respaced when steps < T",
                        None),
    "ddim": SamplerSpec(sample_ddim, "trailing", 1, False, "DDIM (Song et al. 2021); --eta adds noise", 50),
    "dpm++2m": SamplerSpec(sample_dpmpp_2m, _trailing_for_few_steps, 1, False, "DPM-Solver++(2M) (Lu et al. 2022)", 20),
    "dpm++3m": SamplerSpec(sample_dpmpp_3m, _trailing_for_few_steps, 1, False, "DPM-Solver++(3M) (Lu et al. 2022)", 20),
    "dpm++2m-sde": SamplerSpec(sample_dpmpp_2m_sde, "karras", 1, True, "SDE-DPM-Solver++(2M) (Lu et al. 2022)", 20),
    "euler": SamplerSpec(sample_euler, "trailing", 1, False, "Euler on the PF-ODE (Karras et al. 2022, Alg. 1)", 50),
    "heun": SamplerSpec(sample_heun, "karras-nomin", 2, False, "Heun (Karras et al. 2022, Alg. 2): NFE = 2*steps-1",
                        18),
    "ipndm": SamplerSpec(sample_ipndm, _trailing_for_few_steps, 1, False,
                         "iPNDM, 4th-order Adams-Bashforth (Zhang & Chen 2023)", 20),
    # Samplers of distilled students (`ddpm distill`): their checkpoints name them as `ddpm sample`'s default.
    # Each runs on its student's own levels unless --spacing is given.
    "progressive": SamplerSpec(sample_ddim, "trailing", 1, False,
                               "DDIM on the nested grid of a progressive student (Salimans & Ho 2022)", 4,
                               nested_sigmas),
    "consistency": SamplerSpec(sample_consistency, "karras", 1, True,
                               "multistep consistency sampling (Song et al. 2023, Alg. 1)", 1, consistency_sigmas),
}

CONTINUOUS_DEFAULT_STEPS = 50  # ddpm's default on a continuous (EDM) model, which has no T


SPACINGS = ("uniform", "trailing", "quadratic", "karras", "karras-nomin")

# Top of the Karras levels on a discrete VP model. The cosine schedule (beta clipped at 0.999)
# and zero terminal SNR end at sigma ~ 4096, and Eq. (5) of Karras et al. (2022) with rho = 7
# then puts 9 of 20 levels above 160, where the signal is under 1/160 of the noise. The levels
# left for the image are too few: DPM-Solver++ speckled on a cosine model (1.6% at 20 steps
# after 150k images, 16-55% at 10 steps after 30k), and on exact Gaussian data Heun's error
# grows sixfold (tests/test_samplers.py). 160 is just above the linear schedule's 157, so
# linear models keep their levels; benchmarks/README ("The cosine noise schedule, with capped
# Karras levels") measures it.
KARRAS_VP_SIGMA_MAX = 160.0


def nfe(sampler: str, steps: int) -> int:
    """Number of model evaluations `sampler` makes for `steps` steps."""
    spec = SAMPLERS[sampler]
    return steps if spec.calls_per_step == 1 else spec.calls_per_step * steps - 1


def default_steps(sampler: str, timesteps: int | None) -> int:
    """Steps `sampler` takes when none are given, for a model with `timesteps` discrete steps (None: continuous)."""
    steps = SAMPLERS[sampler].default_steps
    if steps is None:
        return timesteps if timesteps is not None else CONTINUOUS_DEFAULT_STEPS
    return steps if timesteps is None else min(steps, timesteps)


def describe_defaults(timesteps_name: str = "T") -> str:
    """'ddpm: all T, ddim: 50, ..., heun: 18 (35 NFE)': every sampler's default steps, for --help."""
    parts = []
    for name, spec in SAMPLERS.items():
        if spec.default_steps is None:
            parts.append(f"{name}: all {timesteps_name}")
        else:
            parts.append(f"{name}: {spec.default_steps}" + (f" ({nfe(name, spec.default_steps)} NFE)"
                                                            if spec.calls_per_step != 1 else ""))
    return ", ".join(parts)


def karras_range(discrete_sigmas: torch.Tensor | None, sigma_min: float | None = None,
                 sigma_max: float | None = None) -> tuple[float, float]:
    """(sigma_min, sigma_max) of the karras spacing: the given ones, else a discrete model's smallest and
    largest finite sigma, the largest capped at `KARRAS_VP_SIGMA_MAX` on a discrete model."""
    if discrete_sigmas is not None:
        finite = discrete_sigmas[torch.isfinite(discrete_sigmas)]
        sigma_min = float(finite[0]) if sigma_min is None else sigma_min
        sigma_max = min(float(finite[-1]) if sigma_max is None else sigma_max, KARRAS_VP_SIGMA_MAX)
    if sigma_min is None or sigma_max is None:
        raise DdpmError("karras spacing needs sigma_min and sigma_max")
    return sigma_min, sigma_max


def make_sigmas(discrete_sigmas: torch.Tensor | None, steps: int, spacing: str,
                sigma_min: float | None = None, sigma_max: float | None = None, rho: float = 7.0) -> torch.Tensor:
    """Descending noise levels ending with 0.

    For a discrete model (`discrete_sigmas` ascending, one per timestep) a timestep spacing picks
    `steps` of the model's own timesteps; `karras` spaces `steps` levels by Eq. (5) of Karras et
    al. (2022) between the model's smallest and largest sigma, the largest capped at
    `KARRAS_VP_SIGMA_MAX` on a discrete model (continuous models need karras). Its last model
    call is at sigma_min, where D is nearly the identity. `karras-nomin` leaves that call out:
    the first `steps` of the steps + 1 levels of Eq. (5), the last step going straight to 0 (the
    levels of `consistency_sigmas`), so every call is above sigma_min.
    """
    if spacing not in SPACINGS:
        raise DdpmError(f"unknown spacing '{spacing}'; choose one of {', '.join(SPACINGS)}")
    if steps < 1:
        raise DdpmError(f"steps must be >= 1, got {steps}")
    if spacing in ("karras", "karras-nomin"):
        sigma_min, sigma_max = karras_range(discrete_sigmas, sigma_min, sigma_max)
        sig = schedules.karras_sigmas(steps + (spacing == "karras-nomin"), sigma_min, sigma_max, rho)[:steps]
    else:
        if discrete_sigmas is None:
            raise DdpmError(f"spacing '{spacing}' needs a discrete-time model; use --spacing karras")
        T = len(discrete_sigmas)
        if steps > T:
            raise DdpmError(f"steps={steps} exceeds this model's {T} timesteps; use at most {T}")
        sig = discrete_sigmas[schedules.spaced_timesteps(T, steps, spacing)]
    return torch.cat([sig.float(), sig.new_zeros(1).float()])


def sampler_sigmas(denoiser, sampler: str, steps: int | None = None,
                   spacing: str | torch.Tensor | None = None) -> torch.Tensor:
    """The levels `sampler` runs on for `denoiser`: its own grid (a student's) when it has one and no
    `spacing` is given, else `make_sigmas` with `spacing` (default: the sampler's for these steps;
    karras on a continuous model). `spacing` may also be the levels themselves (a calibrated
    schedule, `calibrate.py`): descending, ending with 0, one per step. `steps` defaults to
    `default_steps` (or the given levels' steps)."""
    if sampler not in SAMPLERS:
        raise DdpmError(f"unknown sampler '{sampler}'; choose one of {', '.join(SAMPLERS)}")
    spec = SAMPLERS[sampler]
    if isinstance(spacing, torch.Tensor):
        return explicit_sigmas(spacing, steps)
    discrete = getattr(denoiser, "discrete_sigmas", None)
    if steps is None:
        steps = default_steps(sampler, len(discrete) if discrete is not None else None)
    if spacing is None and spec.grid is not None:
        return spec.grid(denoiser, steps)
    if spacing is None:
        spacing = spec.default_spacing(steps)
        if discrete is None and not spacing.startswith("karras"):
            spacing = "karras"  # a continuous model has no timesteps to space
    return make_sigmas(discrete, steps, spacing, sigma_min=getattr(denoiser, "sigma_min", None),
                       sigma_max=getattr(denoiser, "sigma_max", None))


def explicit_sigmas(levels: torch.Tensor, steps: int | None = None) -> torch.Tensor:
    """`levels` as a sampler's noise levels, checked: 1-D, finite, strictly descending, ending with 0,
    and `steps` + 1 of them when `steps` is given."""
    levels = levels.detach().float().cpu()
    if levels.ndim != 1 or len(levels) < 2 or not bool(torch.isfinite(levels).all()) or float(levels[-1]) != 0 \
            or not bool((levels[:-1] > levels[1:]).all()):
        raise DdpmError("a schedule must be strictly descending noise levels ending with 0, got "
                        f"{[round(float(v), 4) for v in levels.reshape(-1)[:12]]}")
    if steps is not None and steps != len(levels) - 1:
        raise DdpmError(f"this schedule has {len(levels) - 1} steps, not {steps}; drop --steps or calibrate for "
                        f"{steps} steps")
    return levels


def sample_seeds(seed: int, indices: Sequence[int]) -> list[int]:
    """Independent 63-bit seeds for samples `indices` of a run seeded with `seed`."""
    return [int(np.random.SeedSequence([seed, int(k)]).generate_state(1, np.uint64)[0] >> 1) for k in indices]


class PerSampleNoise:
    """Standard normal noise where row k comes from its own generator, so sample k does not
    depend on the batch it is drawn in. Draws happen on the CPU and move to x's device, so the
    noise is also the same on every device."""

    def __init__(self, seeds: Sequence[int]):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        shape = like.shape[1:]
        z = torch.stack([torch.randn(shape, generator=g) for g in self.generators])
        return z.to(device=like.device, dtype=like.dtype)


def run(denoiser, shape: Sequence[int], sampler: str = "ddpm", steps: int | None = None, *,
        seed: int = 0, first_index: int = 0, spacing: str | None = None, device: str | torch.device = "cpu",
        progress: bool = False, callback=None, **options) -> torch.Tensor:
    """Draw `shape[0]` samples, images first_index.. of the run seeded with `seed`; returns x0 in model space.

    `denoiser` is a diffusion.VPDenoiser / EDMDenoiser (it provides the noise levels and the
    initial noise scale). `steps` defaults to `default_steps(sampler, T)`.
    """
    sigmas = sampler_sigmas(denoiser, sampler, steps, spacing).to(device)
    noise = PerSampleNoise(sample_seeds(seed, range(first_index, first_index + shape[0])))
    x = noise(torch.empty(shape, device=device)) * denoiser.prior_std(float(sigmas[0]))
    return SAMPLERS[sampler].fn(denoiser, x, sigmas, noise=noise, callback=callback, progress=progress, **options)
