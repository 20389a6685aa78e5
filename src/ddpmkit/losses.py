"""Training objectives: small callables returning one loss per sample (the trainer reduces)."""
from __future__ import annotations

import torch
from torch import nn

from .diffusion import target


class VPLoss:
    """Simple DDPM loss, Eq. (14) of Ho et al. (2020): || net(x_t, t) - target ||^2 with t ~ U{0..T-1}.

    The target is eps, x0 or v; `weighting="min_snr"` multiplies by the min-SNR-gamma weight of
    Hang et al. (2023), Eq. (8) and §3.4, expressed for each prediction type.
    """

    def __init__(self, alpha_bar: torch.Tensor, prediction: str = "eps", weighting: str = "none",
                 min_snr_gamma: float = 5.0):
        self.alpha_bar = alpha_bar.float()
        self.prediction = prediction
        self.weighting = weighting
        self.gamma = min_snr_gamma
        self._cache: dict[torch.device, torch.Tensor] = {}

    def _alpha_bar(self, device: torch.device) -> torch.Tensor:
        if device not in self._cache:
            self._cache[device] = self.alpha_bar.to(device)
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

    def __call__(self, net: nn.Module, x0: torch.Tensor) -> torch.Tensor:
        alpha_bar = self._alpha_bar(x0.device)
        t = torch.randint(0, len(alpha_bar), (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        ab = alpha_bar[t]
        a, s = ab.sqrt().view(-1, 1, 1, 1), (1 - ab).sqrt().view(-1, 1, 1, 1)
        out = net(a * x0 + s * eps, t)
        err = (out.float() - target(self.prediction, x0, eps, a, s)) ** 2
        return self.weight(ab) * err.mean(dim=(1, 2, 3))
