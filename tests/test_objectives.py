"""Parameterizations, learned variance, min-SNR and EDM, checked against closed forms."""
import math

import pytest
import torch

from ddpmkit import Diffusion, samplers, schedules
from ddpmkit.diffusion import EDMDenoiser, VPDenoiser, target
from ddpmkit.losses import EDMLoss, VPLoss


def test_vlb_term_matches_hand_computed_kl():
    betas = [0.1, 0.2, 0.3]
    ab = torch.tensor([0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7], dtype=torch.float64)
    loss = VPLoss(ab, "eps", learn_sigma=True)
    x0, x_t, eps_hat, v = 0.3, -0.5, 0.2, 0.4
    t = 2
    got = loss.vlb_term(torch.full((1, 1, 1, 1), x0), torch.full((1, 1, 1, 1), x_t), torch.tensor([t]),
                        torch.full((1, 1, 1, 1), eps_hat), torch.full((1, 1, 1, 1), v)).item()
    # By hand, Ho et al. (2020) Eq. (7) and Nichol & Dhariwal (2021) Eq. (15):
    a_t, a_prev, beta = 0.504, 0.72, betas[2]
    post_var = beta * (1 - a_prev) / (1 - a_t)
    c0, ct = math.sqrt(a_prev) * beta / (1 - a_t), math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)
    x0_hat = (x_t - math.sqrt(1 - a_t) * eps_hat) / math.sqrt(a_t)
    frac = (v + 1) / 2
    model_var = math.exp(frac * math.log(beta) + (1 - frac) * math.log(post_var))
    m_true, m_model = c0 * x0 + ct * x_t, c0 * x0_hat + ct * x_t
    kl = 0.5 * (math.log(model_var / post_var) + post_var / model_var + (m_true - m_model) ** 2 / model_var - 1)
    assert got == pytest.approx(kl / math.log(2), rel=1e-5)


def test_vlb_decoder_term_at_t0():
    ab = schedules.alpha_bar_schedule("linear", 10)
    loss = VPLoss(ab, "x0", learn_sigma=True)
    x0 = torch.zeros(1, 1, 1, 1)
    got = loss.vlb_term(x0, x0, torch.tensor([0]), x0, -torch.ones(1, 1, 1, 1)).item()  # x0-prediction exact
    beta1 = 1 - float(ab[1] / ab[0])
    std = math.sqrt(float(1e-4) * (1 - float(ab[0])) / (1 - float(ab[1])) * 0 + beta1 * (1 - float(ab[0])) / (1 - float(ab[1])))
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    expected = -math.log(phi(1 / 255 / std) - phi(-1 / 255 / std)) / math.log(2)
    assert got == pytest.approx(expected, rel=1e-4)


def test_hybrid_loss_gradient_reaches_variance_but_not_mean_through_vlb():
    ab = schedules.alpha_bar_schedule("linear", 100)
    loss = VPLoss(ab, "eps", learn_sigma=True, vlb_weight=1.0)
    out = torch.zeros(4, 2, 2, 2, requires_grad=True)
    net = lambda x, t: out.expand(x.shape[0], -1, -1, -1)
    torch.manual_seed(0)
    loss(net, torch.rand(4, 1, 2, 2) * 2 - 1).sum().backward()
    grad_mean_only = out.grad[:, :1].clone()
    out.grad = None
    torch.manual_seed(0)
    VPLoss(ab, "eps")(lambda x, t: out[:, :1], torch.rand(4, 1, 2, 2) * 2 - 1).sum().backward()
    torch.testing.assert_close(grad_mean_only, out.grad[:, :1])  # the VLB adds nothing to the mean's gradient


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_weights(prediction):
    ab = torch.tensor([0.99, 0.5, 0.01])
    snr = ab / (1 - ab)
    w = VPLoss(ab, prediction, "min_snr", 5.0).weight(ab)
    expected = {"eps": snr.clamp(max=5) / snr, "x0": snr.clamp(max=5), "v": snr.clamp(max=5) / (snr + 1)}[prediction]
    torch.testing.assert_close(w, expected)


def test_edm_loss_of_zero_network_on_matched_gaussian_is_one():
    # For data N(0, sigma_data^2) the optimal denoiser is c_skip x, i.e. F = 0, and Table 1's
    # weighting makes the expected loss exactly 1 at every sigma.
    torch.manual_seed(0)
    loss = EDMLoss(sigma_data=0.5)
    zero_net = lambda x, t: torch.zeros_like(x)
    values = loss(zero_net, 0.5 * torch.randn(20000, 1, 2, 2))
    assert values.mean().item() == pytest.approx(1.0, abs=0.03)


class InterpolatingGaussian(torch.nn.Module):
    """Exact network output for N(mu, s^2) data at fractional timesteps, using the same
    log-sigma interpolation as VPDenoiser so every sampler's noise levels are exact."""

    def __init__(self, den, mu, std, prediction):
        super().__init__()
        self.log_sigmas, self.mu, self.std, self.prediction = den.log_sigmas, mu, std, prediction

    def forward(self, x, t):
        lo = t.floor().long().clamp(max=len(self.log_sigmas) - 2)
        w = t - lo
        sigma = torch.exp(torch.lerp(self.log_sigmas[lo], self.log_sigmas[lo + 1], w)).view(-1, 1, 1, 1)
        ab = 1 / (1 + sigma**2)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        x0 = self.mu + self.std**2 * a / (ab * self.std**2 + 1 - ab) * (x - a * self.mu)  # E[x0 | x_t]
        eps = (x - a * x0) / s
        return target(self.prediction, x0, eps, a, s)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m", "heun", "dpm++2m-sde"])
def test_every_parameterization_works_with_every_sampler(prediction, sampler):
    d = Diffusion(img_size=2, channels=1, prediction=prediction, clip_denoised=False)
    probe = d.denoiser(torch.nn.Identity())
    net = InterpolatingGaussian(probe, 0.2, 0.4, prediction)
    steps = 200 if sampler == "ddim" else 50  # first order needs more steps for the same error
    x = d.generate(net, 1000, sampler=sampler, steps=steps, seed=0, progress=False)
    assert abs(x.mean().item() - 0.2) < 0.03 and abs(x.std().item() - 0.4) < 0.03


def test_edm_denoiser_with_exact_network_samples_gaussian():
    sd = 0.5
    # Data N(0, sd^2): D* = c_skip x, so F = 0 is exact.
    den = EDMDenoiser(lambda x, t: torch.zeros_like(x), sigma_data=sd)
    x = samplers.run(den, (2000, 1, 2, 2), "heun", 40, seed=0)
    assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - sd) < 0.02
