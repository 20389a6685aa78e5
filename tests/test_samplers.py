"""Every sampler, driven by the exact denoiser of a known distribution, must land on it."""
import math

import pytest
import torch

from ddpmkit import samplers, schedules
from ddpmkit.diffusion import VPDenoiser
from ddpmkit.errors import DdpmError


class ExactDenoiser:
    """Closed-form D(x, sigma) = E[x0 | x0 + sigma n = x] for Gaussian or 1-D Gaussian-mixture data,
    on the noise levels of a 1000-step schedule (the seed's linear one by default)."""

    def __init__(self, kind="gauss", schedule="linear"):
        # the levels the library's VPDenoiser gives a model on this schedule (its clamp included)
        ab = schedules.alpha_bar_schedule(schedule, 1000)
        self.discrete_sigmas = VPDenoiser(torch.nn.Identity(), ab).discrete_sigmas
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


def gaussian_errors(sampler, steps, n=4000, schedule="linear", **opts):
    den = ExactDenoiser("gauss", schedule)
    x = samplers.run(den, (n, 2, 1, 1), sampler, steps, seed=0, **opts).double().flatten(1)
    mean_err = (x.mean(0) - den.mu).abs().max().item()
    cov_err = (torch.cov(x.T) - den.cov).abs().max().item()
    return mean_err, cov_err


# Covariance tolerance per (sampler, steps): statistical error (~0.004 for 4000 samples) plus a
# discretisation allowance that shrinks with the steps (first-order methods shrink slowest); the
# 10-step cells are the measured error (ddim 0.055, euler 0.046, heun 0.059) plus about 0.01.
# No cell for dpm++3m at 10 steps: there its error (0.11, measured) exceeds every entry of the
# target covariance, so no tolerance could tell it from a sampler that collapsed to the mean.
# Multistep 3rd order is unstable on 10 Karras steps from sigma 157; its accuracy is asserted at
# 20 and 50 steps and by test_convergence_order.
COV_TOL = {
    "ddpm": {10: 0.02, 50: 0.012, 1000: 0.008},
    "ddim": {10: 0.065, 50: 0.02, 200: 0.008},
    "euler": {10: 0.055, 50: 0.02, 200: 0.008},
    "heun": {10: 0.07, 50: 0.008, 200: 0.008},  # 10 Karras steps from sigma 157 are coarse for Heun
    "dpm++2m": {10: 0.02, 50: 0.008, 200: 0.008},
    "dpm++3m": {20: 0.012, 50: 0.008},
    "dpm++2m-sde": {10: 0.03, 50: 0.012, 200: 0.008},
}


def test_covariance_tolerances_can_catch_a_collapsed_sampler():
    # A sampler that returned the mean would have a covariance error of max |cov| = 0.09.
    largest = ExactDenoiser("gauss").cov.abs().max().item()
    assert all(tol < 0.8 * largest for cells in COV_TOL.values() for tol in cells.values())


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


class TangentGaussian(ExactDenoiser):
    """The Gaussian case's exact denoiser D(x) = mu + G (x - mu) applied to a batch whose row 0 is the
    affine part of the sampler's state and whose other rows are its linear parts (one per input noise
    coordinate): D acts on those rows as G alone. Every sampler is affine in its noise inputs here,
    so the rows carry the output's exact mean and covariance, without sampling error."""

    def __call__(self, x, sigma):
        self.calls += 1
        gain = self.cov @ torch.linalg.inv(self.cov + float(sigma) ** 2 * torch.eye(2, dtype=torch.float64))
        d = x.flatten(1) @ gain.T
        d[0] += self.mu - self.mu @ gain.T
        return d.view_as(x)


def exact_output_covariance(sampler, steps, **opts):
    """Covariance of `sampler`'s output for the Gaussian data, from the TangentGaussian rows."""
    den = TangentGaussian("gauss")
    sigmas = samplers.make_sigmas(den.discrete_sigmas, steps, samplers.SAMPLERS[sampler].spacing).double()
    rows = 1 + 2 * (steps + 2)  # enough noise blocks for the start and one draw per step
    drawn = []

    def noise(like):  # the k-th draw is the identity in its own block of rows
        z = torch.zeros(rows, 2, dtype=torch.float64)
        z[1 + 2 * len(drawn): 3 + 2 * len(drawn)] = torch.eye(2, dtype=torch.float64)
        drawn.append(1)
        return z.view_as(like)

    x = noise(torch.empty(rows, 2, 1, 1)) * den.prior_std(float(sigmas[0]))
    out = samplers.SAMPLERS[sampler].fn(den, x, sigmas, noise=noise, **opts).flatten(1)[1:]
    return out.T @ out


@pytest.mark.parametrize("sampler,opts,reference,low,high", [
    ("ddpm", {}, 1000, 0.7, 1.3), ("ddpm", {"variance": "posterior"}, 1000, 0.7, 1.3),
    ("dpm++2m-sde", {}, 640, 1.7, 2.6),
])
def test_stochastic_sampler_distribution_converges(sampler, opts, reference, low, high):
    # The distribution error at 80 and 160 steps against a fine run (ddpm's limit is its own
    # T-step chain), measured exactly; ancestral DDPM is first order, the SDE solver second.
    ref = exact_output_covariance(sampler, reference, **opts)
    # ...and that limit is the data's covariance (measured: 5e-4 beta, 2.2e-3 posterior, 1e-4 sde)
    assert (ref - ExactDenoiser("gauss").cov).abs().max().item() < 0.003
    e80, e160 = ((exact_output_covariance(sampler, n, **opts) - ref).abs().max().item() for n in (80, 160))
    slope = math.log(e80 / e160) / math.log(2)
    assert low < slope < high, (sampler, opts, slope)


def test_exact_output_covariance_agrees_with_sampling():
    cov = exact_output_covariance("ddpm", 10)
    x = samplers.run(ExactDenoiser("gauss"), (4000, 2, 1, 1), "ddpm", 10, seed=0).double().flatten(1)
    assert (torch.cov(x.T) - cov).abs().max().item() < 0.006  # 4000 samples: about 0.002 standard error


@pytest.mark.parametrize("sampler", sorted(samplers.SAMPLERS))
def test_per_sample_seeding_is_batch_independent(sampler):
    den = ExactDenoiser("gauss")
    whole = samplers.run(den, (6, 2, 1, 1), sampler, 8, seed=3)
    first = samplers.run(den, (2, 2, 1, 1), sampler, 8, seed=3)
    rest = samplers.run(den, (4, 2, 1, 1), sampler, 8, seed=3, first_index=2)
    torch.testing.assert_close(torch.cat([first, rest]), whole, rtol=0, atol=1e-6)
    other = samplers.run(den, (6, 2, 1, 1), sampler, 8, seed=4)
    assert not torch.allclose(other, whole)


def _run_with_noise_source(sampler, noise_seed, steps=10, **opts):
    """Sampler output from one fixed start x, with all later noise drawn from generator `noise_seed`."""
    den = ExactDenoiser("mixture")
    sigmas = samplers.make_sigmas(den.discrete_sigmas, steps, samplers.SAMPLERS[sampler].spacing)
    x = torch.randn(16, 1, 1, 1, generator=torch.Generator().manual_seed(5)) * den.prior_std(float(sigmas[0]))
    gen = torch.Generator().manual_seed(noise_seed)
    noise = lambda like: torch.randn(like.shape, generator=gen, dtype=like.dtype)
    return samplers.SAMPLERS[sampler].fn(den, x, sigmas, noise=noise, **opts)


@pytest.mark.parametrize("sampler", sorted(samplers.SAMPLERS))
def test_only_stochastic_samplers_draw_noise(sampler):
    # Same start, two different noise sources: a sampler that draws no noise gives the same result.
    a, b = _run_with_noise_source(sampler, 1), _run_with_noise_source(sampler, 2)
    assert torch.equal(a, b) != samplers.SAMPLERS[sampler].stochastic, sampler


class CountingDenoiser:
    """A cheap denoiser on a T-step linear schedule that counts its calls."""

    def __init__(self, timesteps):
        ab = schedules.alpha_bar_schedule("linear", timesteps, 1e-4, min(0.02 * 1000 / timesteps, 0.5))
        self.discrete_sigmas = schedules.vp_sigmas(ab).float()
        self.sigma_min, self.sigma_max = float(self.discrete_sigmas[0]), float(self.discrete_sigmas[-1])
        self.calls = 0

    def prior_std(self, sigma_max):
        return math.sqrt(1 + sigma_max**2)

    def __call__(self, x, sigma):
        self.calls += 1
        return 0.5 * x / (1 + float(sigma))


@pytest.mark.parametrize("spacing", samplers.SPACINGS)
def test_nfe_equals_model_calls_for_every_step_count(spacing):
    T = 24
    for name in samplers.SAMPLERS:
        for steps in range(1, T + 1):
            den = CountingDenoiser(T)
            samplers.run(den, (1, 1, 1, 1), name, steps, spacing=spacing)
            assert den.calls == samplers.nfe(name, steps), (name, spacing, steps)
    assert samplers.nfe("heun", 7) == 13


DEFAULT_NFE = {"ddpm": 1000, "ddim": 50, "dpm++2m": 20, "dpm++3m": 20, "dpm++2m-sde": 20, "euler": 50, "heun": 35,
               "progressive": 4, "consistency": 1}


@pytest.mark.parametrize("sampler", sorted(samplers.SAMPLERS))
def test_default_steps_nfe(sampler):
    den = CountingDenoiser(1000)
    samplers.run(den, (1, 1, 1, 1), sampler)  # no steps given
    assert den.calls == DEFAULT_NFE[sampler] == samplers.nfe(sampler, samplers.default_steps(sampler, 1000))
    den = CountingDenoiser(10)  # never more steps than the model has
    samplers.run(den, (1, 1, 1, 1), sampler)
    assert den.calls == samplers.nfe(sampler, min(10, samplers.default_steps(sampler, None)))


def test_ddim_eta_one_equals_ddpm_posterior():
    den = ExactDenoiser("gauss")
    a = samplers.run(den, (8, 2, 1, 1), "ddim", 20, seed=2, eta=1.0)
    b = samplers.run(den, (8, 2, 1, 1), "ddpm", 20, seed=2, variance="posterior")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["dpm++2m-sde", "ddim"])
def test_eta_zero_draws_no_noise(sampler):
    assert torch.equal(_run_with_noise_source(sampler, 1, eta=0.0), _run_with_noise_source(sampler, 2, eta=0.0))
    assert not torch.equal(_run_with_noise_source(sampler, 1, eta=1.0), _run_with_noise_source(sampler, 2, eta=1.0))


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
@pytest.mark.parametrize("T", [1000, 1, 37])
def test_timestep_spacings_are_distinct_and_descending(spacing, T):
    for steps in range(1, T + 1):
        t = schedules.spaced_timesteps(T, steps, spacing)
        assert len(t) == steps and torch.all(t[:-1] > t[1:]), (T, steps)
        assert 0 <= int(t.min()) and int(t.max()) <= T - 1, (T, steps)
        if spacing == "trailing":
            assert int(t[0]) == T - 1, (T, steps)
        # the sampler's noise levels: one per step, plus the final 0
        assert len(samplers.make_sigmas(torch.arange(1, T + 1.0), steps, spacing)) == steps + 1
    if spacing == "trailing" and T == 1000:  # the old float rule gave 62 timesteps for 61 steps
        assert schedules.spaced_timesteps(1000, 61, spacing).tolist()[-3:] == [48, 32, 15]


def test_karras_levels_are_capped_on_a_cosine_schedule():
    """The cosine schedule ends at sigma ~ 4096; uncapped, 9 of 20 Karras levels lie above 160 and
    the few left for the data cost accuracy (measured, uncapped: Heun 10 steps cov error 0.39,
    DPM-Solver++ 5 steps 0.086; capped: 0.064 and 0.020). The linear schedule's levels are unchanged."""
    cos, lin = ExactDenoiser("gauss", "cosine"), ExactDenoiser("gauss", "linear")
    assert cos.sigma_max > 4000 and lin.sigma_max < samplers.KARRAS_VP_SIGMA_MAX
    top = samplers.make_sigmas(cos.discrete_sigmas, 20, "karras", cos.sigma_min, cos.sigma_max)[0]
    assert top == pytest.approx(samplers.KARRAS_VP_SIGMA_MAX)
    lin_sig = samplers.make_sigmas(lin.discrete_sigmas, 20, "karras", lin.sigma_min, lin.sigma_max)
    assert torch.equal(lin_sig[:-1], schedules.karras_sigmas(20, lin.sigma_min, lin.sigma_max).float())
    assert gaussian_errors("heun", 10, schedule="cosine")[1] < 0.1
    assert gaussian_errors("dpm++2m", 5, schedule="cosine")[1] < 0.04


class TimestepRecorder(torch.nn.Module):
    """A v-network of a 100-step model that records the (fractional) timesteps it is called at."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, t):
        self.seen.extend(round(float(v), 3) for v in t[:1])
        return 0.1 * x


@pytest.mark.parametrize("sampler", ["progressive", "consistency"])
def test_student_samplers_honour_sdedit_and_repaint_levels(sampler):
    # SDEdit (Meng et al. 2022) starts at t0 = S T and runs the rest of the sampler's own levels;
    # RePaint (Lugmayr et al. 2022) repeats each step between two levels. A student sampler that
    # rebuilt its grid from the top would call the network at t = 99 there.
    from ddpmkit.diffusion import Diffusion
    from ddpmkit.guidance.sampling import generate

    d = Diffusion(img_size=4, channels=1, timesteps=100, prediction="v")
    den = d.denoiser(torch.nn.Identity())
    own = [round(float(t), 3) for t in den.sigma_to_t(samplers.sampler_sigmas(den, sampler, 4)[:-1])]
    if sampler == "progressive":
        assert own == [99, 74, 49, 24]  # the nested (trailing) grid of a 4-step student
    net = TimestepRecorder()
    init = torch.zeros(1, 1, 4, 4)
    generate(d, net, 2, init=init, strength=0.3, sampler=sampler, steps=4, seed=0)
    assert net.seen[0] == 29.0  # sigma(t0) with t0 = 0.3 * 100 - 1
    assert net.seen[1:] == [t for t in own if t < 29]
    net.seen.clear()
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2] = 1
    generate(d, net, 2, known=init, mask=mask, resample=2, sampler=sampler, steps=4, seed=0)
    assert net.seen == [t for t in own for _ in range(2)][:-1]  # each level twice; the last step once
