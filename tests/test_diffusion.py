"""Forward process, parameterizations and the seed API, checked against closed forms."""
import math

import pytest
import torch

from ddpmkit import Diffusion, UNet, samplers, schedules
from ddpmkit.diffusion import VPDenoiser, target, to_eps, to_x0


def test_linear_schedule_is_the_seeds():
    d = Diffusion(img_size=8)
    assert d.beta.shape == (1000,)
    assert math.isclose(float(d.beta[0]), 1e-4, rel_tol=1e-5)
    assert math.isclose(float(d.beta[-1]), 0.02, rel_tol=1e-5)
    torch.testing.assert_close(d.alpha_hat, torch.cumprod(1 - d.beta, 0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
def test_schedules_decrease_to_noise(name):
    ab = schedules.alpha_bar_schedule(name, 1000)
    assert torch.all(ab[1:] < ab[:-1]) and ab[0] > 0.99 and ab[-1] < 1e-2


def test_zero_terminal_snr_rescale():
    ab = schedules.alpha_bar_schedule("linear", 1000, zero_terminal_snr=True)
    assert float(ab[-1]) == 0.0
    assert math.isclose(float(ab[0]), float(schedules.alpha_bar_schedule("linear", 1000)[0]), rel_tol=1e-12)


def test_q_sample_marginal_matches_closed_form():
    d = Diffusion(img_size=4, channels=1)
    torch.manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    for t in (0, 300, 999):
        xt, _ = d.noise_images(x0, torch.full((20000,), t))
        ab = float(d.alpha_hat[t])
        assert abs(xt.mean().item() - math.sqrt(ab) * 0.7) < 0.02
        assert abs(xt.var().item() - (1 - ab)) < 0.02 + 0.03 * (1 - ab)


def test_sample_timesteps_cover_full_range():
    d = Diffusion(noise_steps=10, img_size=4)
    torch.manual_seed(0)
    t = d.sample_timesteps(2000)
    assert int(t.min()) == 0 and int(t.max()) == 9


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_parameterization_round_trip(prediction):
    torch.manual_seed(0)
    x0, eps = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randn(4, 3, 2, 2, dtype=torch.float64)
    ab = torch.tensor([0.999, 0.5, 0.1, 1e-4], dtype=torch.float64).view(-1, 1, 1, 1)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    xt = a * x0 + s * eps
    out = target(prediction, x0, eps, a, s)
    torch.testing.assert_close(to_x0(prediction, out, xt, a, s), x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(to_eps(prediction, out, xt, a, s), eps, rtol=0, atol=1e-8)


class GaussianEps(torch.nn.Module):
    """The exact eps-prediction for data ~ N(mu, s^2 I): E[eps | x_t] = sqrt(1-ab)(x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab)."""

    def __init__(self, alpha_bar, mu, std, prediction="eps"):
        super().__init__()
        self.ab, self.mu, self.std, self.prediction = alpha_bar.float(), mu, std, prediction

    def forward(self, x, t):
        assert torch.all(t == t.round()), "ddpm sampling on the model's own grid uses integer timesteps"
        ab = self.ab[t.long()].view(-1, 1, 1, 1)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        eps = s * (x - a * self.mu) / (ab * self.std**2 + 1 - ab)
        x0 = (x - s * eps) / a
        return target(self.prediction, x0, eps, a, s)


@pytest.mark.parametrize("variance", ["beta", "posterior"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ancestral_sampling_with_exact_model_reproduces_gaussian(variance, prediction):
    mu, std = 0.3, 0.5
    d = Diffusion(img_size=4, channels=1, clip_denoised=False, variance=variance, prediction=prediction)
    net = GaussianEps(d.alpha_hat, mu, std, prediction)
    # All 1000 steps through the VPDenoiser; samplers.run returns unclamped values (generate clamps to [-1, 1]).
    x = samplers.run(d.denoiser(net), (256, 1, 4, 4), "ddpm", seed=0, variance=variance)  # 4096 values
    # Tolerances: 5 standard errors of the mean and of the std for 4096 samples.
    assert abs(x.mean().item() - mu) < 5 * std / 64
    assert abs(x.std().item() - std) < 5 * std / math.sqrt(2 * 4096)


def test_denoiser_maps_sigma_to_exact_timesteps():
    ab = schedules.alpha_bar_schedule("linear", 1000)
    den = VPDenoiser(torch.nn.Identity(), ab)
    t = torch.tensor([0, 1, 250, 999])
    torch.testing.assert_close(den.sigma_to_t(den.discrete_sigmas[t]), t.float(), rtol=0, atol=2e-3)


def test_seed_api_sample_returns_uint8_and_restores_mode():
    model = UNet(c_in=3, c_out=3, base_channels=8, channel_mults=(1, 2), attn_levels=(1,), time_dim=16)
    model.train()
    d = Diffusion(noise_steps=20, img_size=8)
    images = d.sample(model, n=3, progress=False)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 8, 8)
    assert model.training


def test_seed_constructor_keywords_still_work():
    d = Diffusion(img_size=16, device="cpu")
    assert (d.noise_steps, d.img_size, d.device.type) == (1000, 16, "cpu")
    d = Diffusion(noise_steps=50, beta_start=2e-4, beta_end=0.03, img_size=8, device="cpu")
    assert d.noise_steps == 50 and d.beta.shape == (50,) and d.alpha_hat.shape == (50,)
    assert math.isclose(float(d.beta[0]), 2e-4, rel_tol=1e-5) and math.isclose(float(d.beta[-1]), 0.03, rel_tol=1e-5)
    torch.testing.assert_close(d.alpha, 1 - d.beta)
    assert callable(d.noise_images) and callable(d.sample_timesteps) and callable(d.sample)
    with pytest.raises(TypeError, match="unknown settings \\['noise_step'\\]"):
        Diffusion(noise_step=10)
    with pytest.raises(TypeError, match="DiffusionConfig"):
        Diffusion(1000)


def test_every_config_field_reaches_the_diffusion():
    from ddpmkit.config import DiffusionConfig

    cfg = DiffusionConfig(timesteps=30, schedule="cosine", prediction="v", variance="posterior", clip_denoised=False,
                          zero_terminal_snr=True, objective="edm", sigma_data=0.3, sigma_min=0.01, sigma_max=40.0)
    d = Diffusion.from_config(cfg, 8, 1, "cpu")
    assert d.config == cfg and (d.img_size, d.channels) == (8, 1)
    assert (d.noise_steps, d.schedule, d.prediction, d.variance, d.clip_denoised, d.objective) == \
        (30, "cosine", "v", "posterior", False, "edm")
    assert (d.sigma_data, d.sigma_min, d.sigma_max) == (0.3, 0.01, 40.0)
    assert float(d.alpha_hat[-1]) == 0.0  # zero terminal SNR reached the schedule
    # Keywords apply on top of a config.
    assert Diffusion(cfg, img_size=8, prediction="x0", learn_sigma=True).learned_variance is True


def test_clip_is_a_sampling_option():
    # An exact model of N(0.9, 0.5^2) data: many x0 estimates lie above 1.
    d = Diffusion(img_size=2, channels=1, noise_steps=1000)  # clip_denoised defaults to True
    net = GaussianEps(d.alpha_hat, 0.9, 0.5)
    x = torch.full((1, 1, 2, 2), 3.0)
    sigma = d.denoiser(net).discrete_sigmas[100]
    assert float(d.denoiser(net)(x, sigma).max()) == 1.0            # config default: clipped
    assert float(d.denoiser(net, clip=False)(x, sigma).max()) > 1.0  # off: the PF-ODE's own D
    assert float(Diffusion(img_size=2, channels=1, clip_denoised=False).denoiser(net, clip=True)(x, sigma).max()) == 1.0
    def largest_x0(**clip):  # the largest x0 estimate the sampler saw
        seen = []
        d.generate(net, 64, sampler="ddim", steps=10, seed=0, progress=False,
                   callback=lambda i, s, x, denoised: seen.append(float(denoised.max())), **clip)
        return max(seen)

    assert largest_x0() == largest_x0(clip=True) == 1.0 and largest_x0(clip=False) > 1.5


class RecordsT(torch.nn.Module):
    """F = t: the network's output is its noise-conditioning input."""

    def forward(self, x, t):
        return t.view(-1, 1, 1, 1).expand_as(x).clone()


def test_edm_noise_conditioning_is_250_ln_sigma():
    from ddpmkit.diffusion import EDMDenoiser

    sigma, sd = torch.tensor([0.002, 0.5, 80.0]), 0.5
    x = torch.zeros(3, 1, 1, 1)
    out = EDMDenoiser(RecordsT(), sigma_data=sd)(x, sigma).flatten()
    c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
    # c_noise = 1000 * ln(sigma) / 4 (Karras et al. 2022 Table 1's ln(sigma)/4, scaled as documented)
    torch.testing.assert_close(out / c_out, 1000 * sigma.log() / 4)
