"""Training objectives: small callables returning one loss per sample (the trainer reduces).

Each objective separates its random inputs from the computation, as EDM's training loop hands
its loss the inputs it drew:

    draws = loss_fn.draw(n, like, generator)   # {name: tensor with n rows}, e.g. VP: t and eps
    per_sample = loss_fn(net, x0, draws)        # draws for x0's rows; loss_fn(net, x0) draws itself

so the trainer can draw the inputs of a whole global batch from one generator and give every
process its own rows (`take_rows`). `make_loss(diffusion)` picks the objective a Diffusion was
configured with.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .diffusion import Diffusion, EDMDenoiser, target, to_eps


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_nll(x0: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """-log p(x0) for 8-bit data in [-1, 1] under a Gaussian integrated over each pixel's bin, Ho et al. (2020) Eq. (13)."""
    inv_std = torch.exp(-log_scale)
    centered = x0 - mean
    cdf_plus = torch.special.ndtr(inv_std * (centered + 1 / 255))
    cdf_minus = torch.special.ndtr(inv_std * (centered - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_minus = torch.log((1 - cdf_minus).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    log_probs = torch.where(x0 < -0.999, log_cdf_plus, torch.where(x0 > 0.999, log_one_minus_cdf_minus, log_delta))
    return -log_probs


Draws = dict[str, torch.Tensor]  # the random inputs of a loss, batch first


def take_rows(draws: Draws, rows: slice) -> Draws:
    """The rows `rows` of every tensor in `draws` (e.g. slice(rank, None, world): one process's share)."""
    return {name: value[rows] for name, value in draws.items()}


def _noise(n: int, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """n standard normal samples of like's per-sample shape, on like's device and in its dtype."""
    return torch.randn((n, *like.shape[1:]), generator=generator, device=like.device, dtype=like.dtype)


class VPLoss:
    """Simple DDPM loss, Eq. (14) of Ho et al. (2020): || net(x_t, t) - target ||^2 with t ~ U{0..T-1}.

    The target is eps, x0 or v; `weighting="min_snr"` multiplies by the min-SNR-gamma weight of
    Hang et al. (2023), Eq. (8) and §3.4, expressed for each prediction type. With
    `learn_sigma`, the network's extra channels learn the variance through the hybrid loss
    L_simple + lambda L_vlb of Nichol & Dhariwal (2021) §3.1, with the mean's gradient stopped.
    """

    def __init__(self, alpha_bar: torch.Tensor, prediction: str = "eps", weighting: str = "none",
                 min_snr_gamma: float = 5.0, learn_sigma: bool = False, vlb_weight: float = 0.001):
        self.alpha_bar = alpha_bar.double()
        self.prediction, self.weighting, self.gamma = prediction, weighting, min_snr_gamma
        self.learn_sigma, self.vlb_weight = learn_sigma, vlb_weight
        self._cache: dict[torch.device, dict[str, torch.Tensor]] = {}

    def _tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        """alpha_bar and the posterior q(x_{t-1} | x_t, x0) coefficients, Ho et al. (2020) Eq. (7)."""
        if device not in self._cache:
            ab = self.alpha_bar
            prev = torch.cat([ab.new_ones(1), ab[:-1]])
            beta = 1 - ab / prev
            post_var = beta * (1 - prev) / (1 - ab)
            # beta-tilde_0 = 0: use beta-tilde_1 in its place for the log (as Improved DDPM does).
            post_var_clipped = torch.cat([post_var[1:2], post_var[1:]]) if len(ab) > 1 else beta
            tables = {
                "alpha_bar": ab,
                "coef_x0": prev.sqrt() * beta / (1 - ab),
                "coef_xt": (1 - beta).sqrt() * (1 - prev) / (1 - ab),
                "log_post_var": post_var_clipped.log(),
                "log_beta": beta.log(),
            }
            self._cache[device] = {k: v.float().to(device) for k, v in tables.items()}
        return self._cache[device]

    def weight(self, ab: torch.Tensor) -> torch.Tensor:
        if self.weighting == "none":
            return torch.ones_like(ab)
        snr = ab / (1 - ab).clamp(min=1e-12)
        clipped = snr.clamp(max=self.gamma)
        if self.prediction == "eps":
            return clipped / snr.clamp(min=1e-12)
        if self.prediction == "x0":
            return clipped
        return clipped / (snr + 1)  # v

    def vlb_term(self, x0, x_t, t, mean_out, var_out) -> torch.Tensor:
        """L_t of the variational bound in bits per dimension, for a network output (mean part, variance part).

        t > 0: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)); t = 0: the decoder's discretized NLL.
        The model's variance is exp(frac log beta_t + (1 - frac) log beta-tilde_t), frac = (v + 1) / 2
        (Nichol & Dhariwal 2021, Eq. 15).
        """
        tab = self._tables(x0.device)
        col = lambda name: tab[name][t].view(-1, 1, 1, 1)
        ab = col("alpha_bar")
        a, s = ab.sqrt(), (1 - ab).sqrt()
        x0_hat = (x_t - s * to_eps(self.prediction, mean_out, x_t, a, s)) / a
        frac = (var_out + 1) / 2
        model_logvar = frac * col("log_beta") + (1 - frac) * col("log_post_var")
        model_mean = col("coef_x0") * x0_hat + col("coef_xt") * x_t
        true_mean = col("coef_x0") * x0 + col("coef_xt") * x_t
        kl = normal_kl(true_mean, col("log_post_var"), model_mean, model_logvar).mean(dim=(1, 2, 3))
        nll = discretized_gaussian_nll(x0, model_mean, 0.5 * model_logvar).mean(dim=(1, 2, 3))
        return torch.where(t == 0, nll, kl) / math.log(2.0)

    def draw(self, n: int, like: torch.Tensor, generator: torch.Generator | None = None) -> Draws:
        """The random inputs of n samples shaped like `like`'s rows: t ~ U{0..T-1} and eps ~ N(0, I)."""
        t = torch.randint(0, len(self.alpha_bar), (n,), generator=generator, device=like.device)
        return {"t": t, "eps": _noise(n, like, generator)}

    def __call__(self, net: nn.Module, x0: torch.Tensor, draws: Draws | None = None) -> torch.Tensor:
        """One loss per sample of x0; `draws` (from `draw`, one row per sample) or fresh draws."""
        draws = self.draw(x0.shape[0], x0) if draws is None else draws
        tab = self._tables(x0.device)
        T = len(tab["alpha_bar"])
        t, eps = draws["t"], draws["eps"]
        ab = tab["alpha_bar"][t]
        a, s = ab.sqrt().view(-1, 1, 1, 1), (1 - ab).sqrt().view(-1, 1, 1, 1)
        x_t = a * x0 + s * eps
        out = net(x_t, t).float()
        if self.learn_sigma:
            out, var_out = out.chunk(2, dim=1)
        mse = ((out - target(self.prediction, x0, eps, a, s)) ** 2).mean(dim=(1, 2, 3))
        loss = self.weight(ab) * mse
        if self.learn_sigma:
            # Stop-gradient on the mean: L_vlb trains only the variance (Nichol & Dhariwal 2021, §3.1).
            # L_vlb = T E_t[L_t], so lambda L_vlb per sample is lambda * T * L_t.
            loss = loss + self.vlb_weight * T * self.vlb_term(x0, x_t, t, out.detach(), var_out)
        return loss


class EDMLoss:
    """EDM training loss, Karras et al. (2022) Eq. (8) and Table 1: ln sigma ~ N(P_mean, P_std^2),
    weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 on || D(x0 + sigma n, sigma) - x0 ||^2."""

    def __init__(self, sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2):
        self.sigma_data, self.p_mean, self.p_std = sigma_data, p_mean, p_std

    def draw(self, n: int, like: torch.Tensor, generator: torch.Generator | None = None) -> Draws:
        """The random inputs of n samples shaped like `like`'s rows: ln sigma ~ N(P_mean, P_std^2) and noise ~ N(0, I)."""
        ln_sigma = self.p_mean + self.p_std * torch.randn(n, generator=generator, device=like.device)
        return {"sigma": torch.exp(ln_sigma), "noise": _noise(n, like, generator)}

    def __call__(self, net: nn.Module, x0: torch.Tensor, draws: Draws | None = None) -> torch.Tensor:
        """One loss per sample of x0; `draws` (from `draw`, one row per sample) or fresh draws."""
        draws = self.draw(x0.shape[0], x0) if draws is None else draws
        sigma = draws["sigma"]
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        denoiser = EDMDenoiser(net, self.sigma_data)
        x = x0 + sigma.view(-1, 1, 1, 1) * draws["noise"]
        return weight * ((denoiser(x, sigma) - x0) ** 2).mean(dim=(1, 2, 3))


def make_loss(diffusion: Diffusion, weighting: str = "none", min_snr_gamma: float = 5.0, vlb_weight: float = 0.001,
              p_mean: float = -1.2, p_std: float = 1.2):
    """The objective a Diffusion was configured for."""
    if diffusion.objective == "edm":
        return EDMLoss(diffusion.sigma_data, p_mean, p_std)
    return VPLoss(diffusion.alpha_bar64, diffusion.prediction, weighting, min_snr_gamma,
                  diffusion.learned_variance, vlb_weight)
