"""The latent-diffusion autoencoder: a small convolutional KL autoencoder and its patch discriminator.

The layout follows the "KL-f4 / KL-f8" first stage of Rombach et al. (2022), "High-Resolution
Image Synthesis with Latent Diffusion Models", Sec. 3 and App. G, scaled down for a CPU: an
encoder of residual blocks with a stride-2 convolution per halving, a decoder that mirrors it
with nearest-neighbour upsampling, and a diagonal Gaussian posterior q(z|x) = N(mean, exp(logvar))
over a latent of `latent_channels` x (S / f) x (S / f). No attention blocks (they cost most at
full resolution and matter little at these sizes). The discriminator is a PatchGAN (Isola et al.
2017, "Image-to-Image Translation with Conditional Adversarial Networks", Sec. 3.2.2).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

LEVEL_MULTS = (1, 2, 2, 4, 4)  # width multiplier per resolution level (level k is S / 2**k)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(max(1, min(32, ch // 4)), ch)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice plus a (1x1 when the width changes) skip, as LDM's ResnetBlock without time."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(_norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
                                  _norm(cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


def kl_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per row, summed over the latent's elements.

    Kingma & Welling (2014), "Auto-Encoding Variational Bayes", App. B:
    -KL = 1/2 sum(1 + log sigma^2 - mu^2 - sigma^2). Exactly 0 when mean = 0 and logvar = 0.
    """
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


class AutoencoderKL(nn.Module):
    """Image (N, C, S, S) in [-1, 1] <-> latent (N, latent_channels, S/f, S/f); f = `downsample`."""

    def __init__(self, channels: int = 3, latent_channels: int = 4, downsample: int = 4, base_channels: int = 32):
        super().__init__()
        levels = int(round(math.log2(downsample)))
        if 2 ** levels != downsample or not 1 <= levels < len(LEVEL_MULTS):
            raise ValueError(f"downsample must be a power of 2 from 2 to {2 ** (len(LEVEL_MULTS) - 1)}, "
                             f"got {downsample}")
        self.channels, self.latent_channels, self.downsample = channels, latent_channels, downsample
        widths = [base_channels * m for m in LEVEL_MULTS[:levels + 1]]
        enc: list[nn.Module] = [nn.Conv2d(channels, widths[0], 3, padding=1)]
        for k in range(levels):  # one block, then halve (stride-2 conv) into the next level's width
            enc += [ResBlock(widths[k], widths[k]), nn.Conv2d(widths[k], widths[k + 1], 3, stride=2, padding=1)]
        enc += [ResBlock(widths[-1], widths[-1]), _norm(widths[-1]), nn.SiLU(),
                nn.Conv2d(widths[-1], 2 * latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(latent_channels, widths[-1], 3, padding=1), ResBlock(widths[-1], widths[-1])]
        for k in reversed(range(levels)):  # double (nearest + conv), then one block at that level's width
            dec += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(widths[k + 1], widths[k], 3, padding=1),
                    ResBlock(widths[k], widths[k])]
        dec += [_norm(widths[0]), nn.SiLU(), nn.Conv2d(widths[0], channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of q(z|x); logvar clamped to [-30, 20] as LDM's DiagonalGaussianDistribution."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None):
        """(reconstruction, mean, logvar); z = mean + exp(logvar / 2) * noise (the reparameterization
        of Kingma & Welling 2014, Eq. 10), or z = mean when `noise` is None."""
        mean, logvar = self.encode(x)
        z = mean if noise is None else mean + (0.5 * logvar).exp() * noise
        return self.decode(z), mean, logvar


class PatchDiscriminator(nn.Module):
    """Real/fake logits per overlapping patch: strided 4x4 convolutions with LeakyReLU(0.2)."""

    def __init__(self, channels: int = 3, width: int = 32, layers: int = 3):
        super().__init__()
        body: list[nn.Module] = [nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for k in range(1, layers):
            body += [nn.Conv2d(width * 2 ** (k - 1), width * 2 ** k, 4, stride=2, padding=1), _norm(width * 2 ** k),
                     nn.LeakyReLU(0.2)]
        body += [nn.Conv2d(width * 2 ** (layers - 1), 1, 3, padding=1)]
        self.body = nn.Sequential(*body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class AutoencoderWithDisc(nn.Module):
    """The autoencoder and its discriminator as one module, so the trainer's single optimizer,
    EMA and checkpoint hold both; `encode`/`decode`/`forward` are the autoencoder's."""

    def __init__(self, autoencoder: AutoencoderKL, disc: PatchDiscriminator):
        super().__init__()
        self.ae, self.disc = autoencoder, disc
        self.channels, self.latent_channels, self.downsample = (autoencoder.channels, autoencoder.latent_channels,
                                                                autoencoder.downsample)

    def encode(self, x):
        return self.ae.encode(x)

    def decode(self, z):
        return self.ae.decode(z)

    def forward(self, x, noise=None):
        return self.ae(x, noise)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss per row (Lim & Ye 2017, "Geometric GAN", Eq. 8; used by LDM's first stage)."""
    return (F.relu(1.0 - logits_real).flatten(1).mean(1) + F.relu(1.0 + logits_fake).flatten(1).mean(1)) / 2
