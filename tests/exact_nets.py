"""Networks whose outputs are exact for Gaussian data, shared by the tests (not a test module)."""
import torch

from ddpmkit.diffusion import target


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
