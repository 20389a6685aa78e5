"""Every sampler, driven by the exact denoiser of a known distribution, must land on it."""
import math

import pytest
import torch

from ddpmkit import samplers, schedules
from ddpmkit.errors import DdpmError


class ExactDenoiser:
    """Closed-form D(x, sigma) = E[x0 | x0 + sigma n = x] for Gaussian or 1-D Gaussian-mixture data,
    on the noise levels of the seed's 1000-step linear schedule."""

    def __init__(self, kind="gauss"):
        ab = schedules.alpha_bar_schedule("linear", 1000)
        self.discrete_sigmas = schedules.vp_sigmas(ab).float()
        self.sigma_min, self.sigma_max = float(self.discrete_sigmas[0]), float(self.discrete_sigmas[-1])
        self.kind = kind
        self.mu = torch.tensor([0.4, -0.2], dtype=torch.float64)
        self.cov = torch.tensor([[0.09, 0.03], [0.03, 0.04]], dtype=torch.float64)
        self.means = torch.tensor([-0.6, 0.5], dtype=torch.float64)
        self.weights = torch.tensor([0.3, 0.7], dtype=torch.float64)
        self.mix_std = 0.15
        self.calls = 0

    def prior_std(self, sigma_max):
        return math.sqrt(1 + sigma_max**2)

    def __call__(self, x, sigma):
        self.calls += 1
        sigma = float(sigma)
        dtype = x.dtype
        x = x.double()
        if self.kind == "gauss":  # x: (N, 2, 1, 1); D = mu + Sigma (Sigma + s^2 I)^-1 (x - mu)
            gain = self.cov @ torch.linalg.inv(self.cov + sigma**2 * torch.eye(2, dtype=torch.float64))
            d = self.mu + (x.flatten(1) - self.mu) @ gain.T
            return d.view_as(x).to(dtype)
        var = self.mix_std**2 + sigma**2  # x: (N, 1, 1, 1); posterior-weighted component means
        logp = torch.log(self.weights) - (x[..., None] - self.means) ** 2 / (2 * var)
        post = self.means + self.mix_std**2 / var * (x[..., None] - self.means)
        return (torch.softmax(logp, -1) * post).sum(-1).to(dtype)


def gaussian_errors(sampler, steps, n=4000, **opts):
    den = ExactDenoiser("gauss")
    x = samplers.run(den, (n, 2, 1, 1), sampler, steps, seed=0, **opts).double().flatten(1)
    mean_err = (x.mean(0) - den.mu).abs().max().item()
    cov_err = (torch.cov(x.T) - den.cov).abs().max().item()
    return mean_err, cov_err


# Covariance tolerance per (sampler, steps): statistical error (~0.004 for 4000 samples) plus a
# discretisation allowance that shrinks with the steps (first-order methods shrink slowest).
COV_TOL = {
    "ddpm": {10: 0.02, 50: 0.012, 1000: 0.008},
    "ddim": {10: 0.07, 50: 0.02, 200: 0.008},
    "euler": {10: 0.07, 50: 0.02, 200: 0.008},
    "heun": {10: 0.08, 50: 0.008, 200: 0.008},  # 10 Karras steps from sigma 157 are coarse for Heun
    "dpm++2m": {10: 0.02, 50: 0.008, 200: 0.008},
    "dpm++3m": {10: 0.15, 20: 0.012, 50: 0.008},  # multistep 3rd order is unstable at very few steps
    "dpm++2m-sde": {10: 0.03, 50: 0.012, 200: 0.008},
}


@pytest.mark.parametrize("sampler", sorted(COV_TOL))
def test_sampler_matches_gaussian_mean_and_covariance(sampler):
    for steps, tol in COV_TOL[sampler].items():
        mean_err, cov_err = gaussian_errors(sampler, steps)
        assert mean_err < 0.012, (sampler, steps, mean_err)
        assert cov_err < tol, (sampler, steps, cov_err)


@pytest.mark.parametrize("sampler", sorted(COV_TOL))
def test_sampler_recovers_mixture_weights(sampler):
    den = ExactDenoiser("mixture")
    x = samplers.run(den, (4000, 1, 1, 1), sampler, 50, seed=1).flatten()
    nearest = (x[:, None] - den.means.float()).abs().argmin(1)
    frac = nearest.float().mean().item()   # fraction assigned to the 0.7-weight mode
    assert abs(frac - 0.7) < 0.03, (sampler, frac)
    # Samples sit on the modes: within-mode spread close to the true 0.15.
    spread = (x - den.means.float()[nearest]).std().item()
    assert abs(spread - 0.15) < 0.03, (sampler, spread)


def _ode_error_slope(sampler, n1, n2):
    """Mean |x_N - x_ref| for the PF-ODE from sigma_max to sigma_min, at N = n1 and n2 steps."""
    torch.set_default_dtype(torch.float64)
    try:
        den = ExactDenoiser("mixture")
        x0 = torch.randn(2000, 1, 1, 1, generator=torch.Generator().manual_seed(0)) * 80.0
        def solve(name, n):
            return samplers.SAMPLERS[name].fn(den, x0, schedules.karras_sigmas(n + 1, 0.02, 80.0))
        ref = solve("heun", 3000)
        e1, e2 = ((solve(sampler, n) - ref).abs().mean().item() for n in (n1, n2))
        return math.log(e1 / e2) / math.log(n2 / n1)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("sampler,low,high", [
    ("ddim", 0.8, 1.3), ("euler", 0.8, 1.3), ("heun", 1.7, 2.6), ("dpm++2m", 1.7, 2.6), ("dpm++3m", 2.5, 4.0),
])
def test_convergence_order(sampler, low, high):
    slope = _ode_error_slope(sampler, 40, 80)
    assert low < slope < high, (sampler, slope)


@pytest.mark.parametrize("sampler", sorted(samplers.SAMPLERS))
def test_per_sample_seeding_is_batch_independent(sampler):
    den = ExactDenoiser("gauss")
    whole = samplers.run(den, (6, 2, 1, 1), sampler, 8, seed=3)
    first = samplers.run(den, (2, 2, 1, 1), sampler, 8, seed=3)
    rest = samplers.run(den, (4, 2, 1, 1), sampler, 8, seed=3, first_index=2)
    torch.testing.assert_close(torch.cat([first, rest]), whole, rtol=0, atol=1e-6)
    other = samplers.run(den, (6, 2, 1, 1), sampler, 8, seed=4)
    assert not torch.allclose(other, whole)


@pytest.mark.parametrize("sampler", [s for s, spec in samplers.SAMPLERS.items() if not spec.stochastic])
def test_ode_samplers_are_deterministic(sampler):
    den = ExactDenoiser("mixture")
    a = samplers.run(den, (16, 1, 1, 1), sampler, 10, seed=5)
    b = samplers.run(den, (16, 1, 1, 1), sampler, 10, seed=5)
    assert torch.equal(a, b)


def test_nfe_counts():
    for name in samplers.SAMPLERS:
        den = ExactDenoiser("gauss")
        samplers.run(den, (2, 2, 1, 1), name, 7, seed=0)
        assert den.calls == samplers.nfe(name, 7), name
    assert samplers.nfe("heun", 7) == 13


def test_ddim_eta_one_equals_ddpm_posterior():
    den = ExactDenoiser("gauss")
    a = samplers.run(den, (8, 2, 1, 1), "ddim", 20, seed=2, eta=1.0)
    b = samplers.run(den, (8, 2, 1, 1), "ddpm", 20, seed=2, variance="posterior")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dpmpp_sde_with_eta_zero_is_deterministic():
    den = ExactDenoiser("gauss")
    a = samplers.run(den, (8, 2, 1, 1), "dpm++2m-sde", 10, seed=2, eta=0.0)
    b = samplers.run(den, (8, 2, 1, 1), "dpm++2m-sde", 10, seed=9, eta=0.0)
    assert not torch.equal(a, b)  # different initial noise
    c = samplers.run(den, (8, 2, 1, 1), "dpm++2m-sde", 10, seed=2, eta=0.0)
    assert torch.equal(a, c)


@pytest.mark.parametrize("call,match", [
    (lambda d: samplers.run(d, (2, 2, 1, 1), "nope", 10), "unknown sampler"),
    (lambda d: samplers.run(d, (2, 2, 1, 1), "ddim", 0), "steps must be >= 1"),
    (lambda d: samplers.run(d, (2, 2, 1, 1), "ddpm", 1001), "exceeds this model's 1000 timesteps"),
    (lambda d: samplers.run(d, (2, 2, 1, 1), "ddim", 10, eta=1.5), "eta must be in"),
    (lambda d: samplers.run(d, (2, 2, 1, 1), "ddim", 10, spacing="weird"), "unknown spacing"),
    (lambda d: samplers.run(d, (2, 2, 1, 1), "ddpm", 10, variance="big"), "variance must be"),
])
def test_bad_arguments(call, match):
    with pytest.raises(DdpmError, match=match):
        call(ExactDenoiser("gauss"))


@pytest.mark.parametrize("spacing", ["uniform", "trailing", "quadratic"])
@pytest.mark.parametrize("steps", [1, 7, 50, 999, 1000])
def test_timestep_spacings_are_distinct_and_descending(spacing, steps):
    t = schedules.spaced_timesteps(1000, steps, spacing)
    assert len(t) == steps and torch.all(t[:-1] > t[1:]) and 0 <= int(t.min()) and int(t.max()) <= 999
    if spacing == "trailing":
        assert int(t[0]) == 999
