"""Parameterizations, learned variance, min-SNR and EDM, checked against closed forms."""
import math

import pytest
import torch

from ddpmkit import Diffusion, samplers, schedules
from ddpmkit.diffusion import EDMDenoiser, VPDenoiser, target
from ddpmkit.losses import EDMLoss, VPLoss, discretized_gaussian_nll, make_loss
from exact_nets import InterpolatingGaussian


@pytest.mark.parametrize("ab,t", [([0.9, 0.72, 0.504], 2), ([0.9, 0.72], 1)], ids=["T=3", "T=2"])
def test_vlb_term_matches_hand_computed_kl(ab, t):
    loss = VPLoss(torch.tensor(ab, dtype=torch.float64), "eps", learn_sigma=True)
    x0, x_t, eps_hat, v = 0.3, -0.5, 0.2, 0.4
    got = loss.vlb_term(torch.full((1, 1, 1, 1), x0), torch.full((1, 1, 1, 1), x_t), torch.tensor([t]),
                        torch.full((1, 1, 1, 1), eps_hat), torch.full((1, 1, 1, 1), v)).item()
    # By hand, Ho et al. (2020) Eq. (7) and Nichol & Dhariwal (2021) Eq. (15):
    a_t, a_prev = ab[t], ab[t - 1]
    beta = 1 - a_t / a_prev
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


def test_hybrid_loss_vlb_trains_the_variance_and_not_the_mean():
    ab = schedules.alpha_bar_schedule("linear", 100)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 2, 2, generator=gen) * 2 - 1
    draws = {"t": torch.tensor([0, 5, 50, 99]), "eps": torch.randn(4, 1, 2, 2, generator=gen)}
    start = 0.1 * torch.randn(4, 2, 2, 2, generator=gen)  # mean channel 0, variance channel 1

    def gradients(vlb_weight):
        out = start.clone().requires_grad_()
        VPLoss(ab, "eps", learn_sigma=True, vlb_weight=vlb_weight)(lambda x, t: out, x0, draws).sum().backward()
        return out.grad[:, :1], out.grad[:, 1:]

    mean_hybrid, var_hybrid = gradients(1.0)
    mean_simple, var_simple = gradients(0.0)
    assert mean_simple.abs().amax(dim=(1, 2, 3)).min() > 0
    torch.testing.assert_close(mean_hybrid, mean_simple, rtol=0, atol=0)  # the VLB adds nothing to the mean
    assert torch.all(var_simple == 0)
    # ...and reaches the variance of every sample, the t = 0 decoder term included.
    assert var_hybrid.abs().amax(dim=(1, 2, 3)).min() > 0 and torch.isfinite(var_hybrid).all()


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_weighted_loss_is_min_snr_gamma_times_the_x0_error(prediction):
    # Hang et al. (2023) Eq. (8): whatever the network predicts, the weighted loss of an output whose
    # x0 estimate is x0 + delta equals min(SNR, gamma) ||delta||^2 (the weight times the
    # parameterization's factor SNR, 1 or SNR + 1 is min(SNR, gamma)).
    gamma = 5.0
    ab = torch.tensor([0.999, 0.9, 0.5, 0.1, 0.001], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    x0, delta = torch.randn(5, 1, 2, 2, generator=gen), torch.randn(5, 1, 2, 2, generator=gen)
    draws = {"t": torch.arange(5), "eps": torch.randn(5, 1, 2, 2, generator=gen)}
    a, s = ab.sqrt().view(-1, 1, 1, 1).float(), (1 - ab).sqrt().view(-1, 1, 1, 1).float()

    def net(x_t, t):  # the output whose x0 estimate is x0 + delta, in this parameterization
        x0_hat = x0 + delta
        return target(prediction, x0_hat, (x_t - a * x0_hat) / s, a, s)

    got = VPLoss(ab, prediction, "min_snr", gamma)(net, x0, draws)
    snr = ab / (1 - ab)
    want = snr.clamp(max=gamma).float() * (delta**2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-6)


def test_edm_loss_of_zero_network_on_matched_gaussian_is_one():
    # For data N(0, sigma_data^2) the optimal denoiser is c_skip x, i.e. F = 0, and Table 1's
    # weighting makes the expected loss exactly 1 at every sigma.
    torch.manual_seed(0)
    loss = EDMLoss(sigma_data=0.5)
    zero_net = lambda x, t: torch.zeros_like(x)
    values = loss(zero_net, 0.5 * torch.randn(20000, 1, 2, 2))
    assert values.mean().item() == pytest.approx(1.0, abs=0.03)


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


@pytest.mark.parametrize("settings", [
    {"learn_sigma": True}, {"objective": "edm"}, {"prediction": "v", "loss_weighting": "min_snr"},
    {"prediction": "v", "schedule": "cosine", "zero_terminal_snr": True},
], ids=["hybrid", "edm", "v-min_snr", "v-zero_snr"])
def test_each_objective_learns_and_samples_finite_images(settings):
    from ddpmkit import UNet
    from ddpmkit.config import DiffusionConfig
    from ddpmkit.losses import make_loss

    torch.manual_seed(0)
    cfg = DiffusionConfig(timesteps=50, **settings)
    d = Diffusion(cfg, img_size=8, channels=1)
    net = UNet(c_in=1, c_out=2 if cfg.learn_sigma else 1, base_channels=8, channel_mults=(1, 2), attn_levels=(),
               time_dim=16)
    loss_fn = make_loss(d, cfg.loss_weighting, cfg.min_snr_gamma, cfg.vlb_weight, cfg.p_mean, cfg.p_std)
    # Data: a bright square on a dark background, shifted; held-out loss on fixed random draws.
    data = -torch.ones(16, 1, 8, 8)
    for k in range(16):
        data[k, :, k % 4: k % 4 + 4, k // 4: k // 4 + 4] = 1.0
    held = loss_fn.draw(64, data[:1], torch.Generator().manual_seed(1))
    held_x0 = data.repeat(4, 1, 1, 1)

    def held_loss():
        with torch.no_grad():
            return loss_fn(net, held_x0, held).mean().item()

    before = held_loss()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(40):
        loss = loss_fn(net, data).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_loss()
    assert math.isfinite(after) and after < 0.8 * before, (before, after)  # measured 0.34..0.69
    for sampler in ("ddpm", "dpm++2m"):
        x = d.generate(net, 4, sampler=sampler, steps=5, seed=0, progress=False, clip=False)
        assert torch.isfinite(x).all(), sampler


# Tests below were written for mutants that survived scripts/mutation.py (docs/mutation.md).

def test_default_vp_loss_is_the_simple_eps_mse():
    # Ho et al. (2020) Eq. (14), unweighted: || net(sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, t) - eps ||^2.
    d = Diffusion(img_size=2, channels=1, noise_steps=10)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 1, 2, 2, generator=gen)
    draws = {"t": torch.tensor([0, 3, 7, 9]), "eps": torch.randn(4, 1, 2, 2, generator=gen)}
    net = lambda x, t: 0.5 * x + 0.01 * t.view(-1, 1, 1, 1)
    ab = d.alpha_bar64[draws["t"]].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * draws["eps"]
    want = ((net(x_t, draws["t"]) - draws["eps"]) ** 2).mean(dim=(1, 2, 3)).float()
    for loss_fn in (VPLoss(d.alpha_bar64), make_loss(d)):
        torch.testing.assert_close(loss_fn(net, x0, draws), want, rtol=1e-5, atol=1e-6)


def test_make_loss_passes_the_configuration_on():
    d = Diffusion(img_size=2, prediction="v", learn_sigma=True)
    vp = make_loss(d, "min_snr", 3.0, 0.01)
    assert type(vp) is VPLoss and torch.equal(vp.alpha_bar, d.alpha_bar64)
    assert (vp.prediction, vp.weighting, vp.gamma, vp.learn_sigma, vp.vlb_weight) == ("v", "min_snr", 3.0, True, 0.01)
    edm = make_loss(Diffusion(img_size=2, objective="edm", sigma_data=0.3), p_mean=-1.0, p_std=0.7)
    assert type(edm) is EDMLoss and (edm.sigma_data, edm.p_mean, edm.p_std) == (0.3, -1.0, 0.7)


def test_edm_loss_with_given_draws_closed_form():
    # F = 0 gives D = c_skip x = sd^2 / (sigma^2 + sd^2) x at x = x0 + sigma n, weighted by
    # (sigma^2 + sd^2) / (sigma sd)^2 (Karras et al. 2022, Eq. 8 and Table 1).
    sd = 0.5
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 2, 2, generator=gen)
    draws = {"sigma": torch.tensor([0.1, 1.0, 5.0]), "noise": torch.randn(3, 2, 2, 2, generator=gen)}
    sigma = draws["sigma"].view(-1, 1, 1, 1)
    denoised = sd**2 / (sigma**2 + sd**2) * (x0 + sigma * draws["noise"])
    want = ((sigma**2 + sd**2) / (sigma * sd) ** 2).flatten() * ((denoised - x0) ** 2).mean(dim=(1, 2, 3))
    got = EDMLoss(sd)(lambda x, t: torch.zeros_like(x), x0, draws)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("objective", ["vp", "edm"])
def test_a_loss_without_draws_draws_one_row_per_sample(objective):
    loss_fn = make_loss(Diffusion(img_size=2, channels=3, noise_steps=10, objective=objective))
    x0 = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    net = lambda x, t: 0.5 * x
    torch.manual_seed(1)
    got = loss_fn(net, x0)
    torch.manual_seed(1)
    want = loss_fn(net, x0, loss_fn.draw(4, x0))
    assert got.shape == (4,) and torch.equal(got, want)


@pytest.mark.parametrize("settings", [{}, {"objective": "edm"}, {"learn_sigma": True}], ids=["vp", "edm", "hybrid"])
def test_draws_tables_and_loss_follow_the_data_device(settings):
    # "meta" tensors stand in for an accelerator: a loss on x0's device draws, indexes and computes there.
    loss_fn = make_loss(Diffusion(img_size=2, channels=1, noise_steps=10, **settings))
    x0 = torch.empty(4, 1, 2, 2, device="meta")
    draws = loss_fn.draw(4, x0)
    assert {name: value.device.type for name, value in draws.items()} == {name: "meta" for name in draws}
    net = (lambda x, t: torch.cat([x, x], 1)) if settings.get("learn_sigma") else (lambda x, t: 0.5 * x)
    out = loss_fn(net, x0, draws)
    assert out.device.type == "meta" and out.shape == (4,)


def test_discretized_gaussian_nll_closed_form():
    # Ho et al. (2020) Eq. (13): the Gaussian's mass over the pixel's bin [x - 1/255, x + 1/255], the bins of
    # -1 and 1 extended to -inf and +inf.
    mean, std = 0.1, 0.5
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    cdf = lambda x: phi((x - mean) / std)
    want = [-math.log(cdf(-1 + 1 / 255)), -math.log(cdf(0.2 + 1 / 255) - cdf(0.2 - 1 / 255)), -math.log(1 - cdf(1 - 1 / 255))]
    x0 = torch.tensor([-1.0, 0.2, 1.0])
    got = discretized_gaussian_nll(x0, torch.full_like(x0, mean), torch.full_like(x0, math.log(std)))
    assert got.tolist() == pytest.approx(want, rel=1e-4)


def test_vlb_term_of_a_batch_is_each_rows_own():
    loss = VPLoss(schedules.alpha_bar_schedule("linear", 10), "eps", learn_sigma=True)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 2, 2, 2, generator=gen) * 2 - 1
    x_t, mean_out = torch.randn(3, 2, 2, 2, generator=gen), torch.randn(3, 2, 2, 2, generator=gen)
    var_out = torch.tanh(torch.randn(3, 2, 2, 2, generator=gen))
    t = torch.tensor([0, 4, 9])
    whole = loss.vlb_term(x0, x_t, t, mean_out, var_out)
    rows = torch.cat([loss.vlb_term(x0[k:k + 1], x_t[k:k + 1], t[k:k + 1], mean_out[k:k + 1], var_out[k:k + 1])
                      for k in range(3)])
    assert whole.shape == (3,)
    torch.testing.assert_close(whole, rows)
