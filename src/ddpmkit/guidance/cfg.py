"""Classifier-free guidance as a denoiser wrapper: D_w(x, sigma) = D_null + w (D_cond - D_null).

Ho & Salimans (2022), "Classifier-Free Diffusion Guidance", Eq. (6), writes the guided noise
prediction as (1 + w') eps_cond - w' eps_null; with w = 1 + w' that is null + w (cond - null),
so w = 1 is the conditional model (no guidance) and w = 0 the unconditional one. Here the
mixing is done on the x0 estimate D(x, sigma), which is an affine function of eps at a fixed
(x, sigma), so the result is the same; wrapping D makes guidance work with every sampler.

The optional rescale is Lin et al. (2024), "Common Diffusion Noise Schedules and Sample Steps are
Flawed", §3.4, Eqs. (15)-(16): x_rescaled = x_cfg * std(x_cond) / std(x_cfg), then
x_final = phi x_rescaled + (1 - phi) x_cfg, with std over each sample's pixels. They apply it to
the (v) prediction; here it acts on the x0 estimate, which is what over-saturates at large w.

The optional interval is Kynkaanniemi et al. (2024), "Applying Guidance in a Limited Interval
Improves Sample and Distribution Quality in Diffusion Models", §3: guidance acts only for noise
levels sigma in (lo, hi] and the plain conditional model (w = 1) runs elsewhere. Guidance at high
noise is what collapses the diversity of the samples; at low noise it does little.
"""
from __future__ import annotations

import torch
from torch import nn

from ..diffusion import DenoiserWrapper


class LabelledNet(nn.Module):
    """net(x, t) -> net(x, t, labels): the diffusion wrappers call a network with (x, t) only, so
    the class labels of the current call ride along here (None: an unconditional call)."""

    def __init__(self, net: nn.Module, labels: torch.Tensor | None = None):
        super().__init__()
        self.net, self.labels = net, labels

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.labels is None:
            return self.net(x, t)
        return self.net(x, t, self.labels)


def _per_sample_std(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).std(dim=1).clamp(min=1e-8).reshape(-1, *([1] * (x.ndim - 1)))


def rescale(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. (2024) Eqs. (15)-(16) on x0 estimates; phi = 0 returns `guided` unchanged."""
    if phi == 0:
        return guided
    rescaled = guided * (_per_sample_std(cond) / _per_sample_std(guided))
    return phi * rescaled + (1 - phi) * guided


class GuidedDenoiser(DenoiserWrapper):
    """D(x, sigma) of a class-conditional model, guided toward `labels` with weight `guidance`.

    `base` is a diffusion.VPDenoiser / EDMDenoiser built around `binding` (a LabelledNet) without
    clipping; `null` is the model's null-class index. Set `labels` (one per row of x, or one for
    all) before each batch. w = 1 runs only the conditional prediction and w = 0 only the null
    one, so both are exactly the plain predictions; any other w runs cond and null rows as one
    batch of 2B. `clip` clamps the guided estimate to [-1, 1] (after mixing, not before).
    `interval` = (lo, hi) limits guidance to lo < sigma <= hi (VE sigma, the samplers' own); outside
    it a row gets w = 1, exactly the conditional prediction.
    The sampler-facing attributes (noise levels, prior) are the base denoiser's.
    """

    def __init__(self, base: nn.Module, binding: LabelledNet, null: int, labels: torch.Tensor | None = None,
                 guidance: float = 1.0, rescale_phi: float = 0.0, clip: bool = False,
                 interval: tuple[float, float] | None = None):
        super().__init__(base)
        self.binding, self.null = binding, null
        self.labels, self.guidance, self.rescale_phi, self.clip = labels, float(guidance), rescale_phi, clip
        self.interval = None if interval is None else (float(interval[0]), float(interval[1]))

    def _labels(self, n: int, device: torch.device) -> torch.Tensor:
        if self.labels is None:
            return torch.full((n,), self.null, dtype=torch.long, device=device)
        return torch.as_tensor(self.labels, device=device).long().reshape(-1).expand(n)

    def _call(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor, return_variance: bool):
        self.binding.labels = labels
        try:
            return self.base(x, sigma, return_variance=True) if return_variance else self.base(x, sigma)
        finally:
            self.binding.labels = None

    def _inside(self, sigma: torch.Tensor, n: int, device: torch.device) -> torch.Tensor | None:
        """Per row: whether guidance applies at this sigma; None without an interval (every row)."""
        if self.interval is None:
            return None
        sigma = torch.as_tensor(sigma, device=device).reshape(-1).expand(n)
        lo, hi = self.interval
        return (sigma > lo) & (sigma <= hi)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, return_variance: bool = False):
        y = self._labels(x.shape[0], x.device)
        w = self.guidance
        inside = self._inside(sigma, x.shape[0], x.device)
        partial = inside is not None and not bool(inside.all())
        if inside is not None and not bool(inside.any()):
            w = 1.0  # the whole batch is outside the interval: the conditional model alone
        if w == 1.0 or self.labels is None or (w == 0.0 and not partial):
            out = self._call(x, sigma, y if w != 0.0 else torch.full_like(y, self.null), return_variance)
            x0, var = out if return_variance else (out, None)
        else:
            sigma = torch.as_tensor(sigma, device=x.device)
            sigma2 = torch.cat([sigma.reshape(-1)] * 2) if sigma.numel() > 1 else sigma
            out = self._call(torch.cat([x, x]), sigma2, torch.cat([y, torch.full_like(y, self.null)]), return_variance)
            both, var = out if return_variance else (out, None)
            cond, null = both.chunk(2)
            x0 = rescale(null + w * (cond - null), cond, self.rescale_phi)
            if partial:
                x0 = torch.where(inside.view(-1, *[1] * (x0.dim() - 1)), x0, cond)
            var = None if var is None else var.chunk(2)[0]  # the variance of the conditional model
        if self.clip:
            x0 = x0.clamp(-1, 1)
        return (x0, var) if return_variance else x0
