"""Consistency tuning from a trained model (Song et al. 2023; Geng et al. 2024, "Easy Consistency Tuning").

The consistency function f(x, sigma) maps any point of a probability-flow ODE trajectory to its
end at sigma_min. It is parameterized so that f(x, sigma_min) = x holds for every network
(Song et al. 2023, Eq. 5 and App. C):

    f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(x, sigma),
    c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2),
    c_out  = (sigma - sigma_min) sigma_data / sqrt(sigma^2 + sigma_data^2),

so c_skip(sigma_min) = 1 and c_out(sigma_min) = 0 exactly. F is the model's own raw output,
read off its denoiser D(x, sigma) = c_skip_ref x + c_out_ref F with the preconditioning the model
was trained under: EDM's (Karras et al. 2022, Table 1) with the model's sigma_data; a VP model
is the same form with sigma_data = 1 (v-prediction: D = x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) v,
so F = -v; eps and x0 models are converted through D). Since c_skip, c_out tend to c_skip_ref,
c_out_ref as sigma grows, f starts out close to the teacher's D: the network keeps the teacher's
weights and config (ECT initializes from the pretrained model, Geng et al. 2024 §3).

Training (ECT): x_t = x + t n and x_r = x + r n share the noise n; the loss is
w(t, r) d(f(x_t, t), stopgrad f(x_r, r)) with the pseudo-Huber metric
d(a, b) = sqrt(||a - b||^2 + c^2) - c, c = 0.00054 sqrt(dim) (Song & Dhariwal 2024, "Improved
techniques for training consistency models", §3.3), w = 1 / (t - r), and ln t ~ N(-1.1, 2.0^2).
The gap shrinks during the run: r = t (1 - n(t) / q^(a+1)), n(t) = 1 + k sigmoid(-b t), q = 2,
k = 8, b = 1, stage a = floor(step / d) (Geng et al. 2024, §3 "the mapping function"; their code's
`t_to_r_sigmoid` divides by q ** (stage + 1), so stage 0 already has r = t / 2 at large t); r is
clamped to [sigma_min, t). d is 1/8 of the run here (ECT halves the gap at a fixed interval).
Both passes see the same dropout mask (ECT replays the RNG state before the r pass), so the
difference f(x_t, t) - f(x_r, r) comes from the gap alone.
"""
from __future__ import annotations

import math

import torch
from torch import nn

P_MEAN, P_STD = -1.1, 2.0
GAP_K, GAP_B, GAP_Q = 8.0, 1.0, 2.0
GAP_SEGMENTS = 8


class ConsistencyFunction(nn.Module):
    """f(x, sigma) of a denoiser D(x, sigma) (diffusion.VPDenoiser / EDMDenoiser), see the module docstring."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser
        self.sigma_min = float(denoiser.sigma_min)
        self.sigma_data = float(getattr(denoiser, "sigma_data", 1.0))  # VP: the EDM form with sigma_data = 1

    def coefficients(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_skip_ref, c_out_ref) at sigma (float tensors)."""
        sd, smin = self.sigma_data, self.sigma_min
        c_skip = sd**2 / ((sigma - smin) ** 2 + sd**2)
        c_out = (sigma - smin) * sd / (sigma**2 + sd**2).sqrt()
        return c_skip, c_out, sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """f(x, sigma); sigma is a scalar or one level per sample, passed to the denoiser as given."""
        rows = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        c_skip, c_out, ref_skip, ref_out = (c.view(-1, *([1] * (x.ndim - 1))) for c in self.coefficients(rows))
        raw = (self.denoiser(x, sigma).float() - ref_skip * x) / ref_out  # the network's F
        return c_skip * x + c_out * raw


def gap_ratio(t: torch.Tensor, step: int, total_steps: int) -> torch.Tensor:
    """r / t at training step `step`: 1 - n(t) / q^(stage + 1) (Geng et al. 2024 §3), before clamping."""
    d = max(1, total_steps // GAP_SEGMENTS)
    stage = step // d
    n = 1 + GAP_K * torch.sigmoid(-GAP_B * t)
    return 1 - n / GAP_Q ** (stage + 1)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sqrt(||a - b||^2 + c^2) - c per sample, c = 0.00054 sqrt(dim) (Song & Dhariwal 2024, §3.3)."""
    dim = a[0].numel()
    c = 0.00054 * math.sqrt(dim)
    return ((a - b).float().pow(2).flatten(1).sum(1) + c**2).sqrt() - c


class ConsistencyLoss:
    """ECT's consistency loss on the trained network; `schedule()` gives (the trainer's step, the run's steps)."""

    def __init__(self, diffusion, schedule):
        self.diffusion, self.schedule = diffusion, schedule

    def _f(self, net: nn.Module) -> ConsistencyFunction:
        return ConsistencyFunction(self.diffusion.denoiser(net, clip=False))

    def draw(self, n: int, like: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """ln t ~ N(P_mean, P_std^2) and the shared noise n ~ N(0, I)."""
        ln_t = P_MEAN + P_STD * torch.randn(n, generator=generator, device=like.device)
        noise = torch.randn((n, *like.shape[1:]), generator=generator, device=like.device, dtype=like.dtype)
        return {"t": ln_t.exp(), "noise": noise}

    def __call__(self, net: nn.Module, x0: torch.Tensor, draws: dict) -> torch.Tensor:
        f = self._f(net)
        den = f.denoiser
        smin, smax = f.sigma_min, float(den.sigma_max)
        t = draws["t"].clamp(smin * 1.001, smax)
        r = torch.maximum(t * gap_ratio(t, *self.schedule()), torch.full_like(t, smin))
        bc = lambda v: v.view(-1, *([1] * (x0.ndim - 1)))
        devices = [x0.device] if x0.device.type != "cpu" else []
        rng = torch.get_rng_state(), [torch.get_device_module(d).get_rng_state(d) for d in devices]
        out_t = f(x0 + bc(t) * draws["noise"], t)
        # The r pass replays the RNG state the t pass started from (one dropout mask for both, as
        # ECT does); fork_rng leaves the state after the t pass in place for the rest of the step.
        with torch.no_grad(), torch.random.fork_rng(devices=devices, device_type=x0.device.type):
            torch.set_rng_state(rng[0])
            for d, state in zip(devices, rng[1]):
                torch.get_device_module(d).set_rng_state(state, d)
            out_r = f(x0 + bc(r) * draws["noise"], r)
        return pseudo_huber(out_t, out_r) / (t - r)
