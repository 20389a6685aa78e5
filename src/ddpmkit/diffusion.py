"""The forward process and the parameterization wrapper between a network and the samplers.

`VPDenoiser` turns a network trained on a discrete VP schedule (predicting eps, x0 or v) into
D(x, sigma), the x0 estimate in variance-exploding coordinates that every sampler uses.
`Diffusion` is the seed tutorial's API (`Diffusion(img_size=...)`, `noise_images`,
`sample_timesteps`, `sample`) on top of those pieces; it owns no sampler and no trainer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
from torch import nn
from tqdm.auto import tqdm

from . import samplers, schedules
from .config import DiffusionConfig, as_hw


def to_x0(prediction: str, out: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x0 from a network output at x_t = a x0 + s eps (a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar))."""
    if prediction == "eps":
        return (x_t - s * out) / a
    if prediction == "x0":
        return out
    if prediction == "v":  # v = a eps - s x0 (Salimans & Ho 2022, §4), so x0 = a x_t - s v
        return a * x_t - s * out
    raise ValueError(f"unknown prediction '{prediction}'")


def to_eps(prediction: str, out: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """eps from a network output at x_t = a x0 + s eps."""
    if prediction == "eps":
        return out
    if prediction == "x0":
        return (x_t - a * out) / s
    if prediction == "v":  # eps = s x_t + a v
        return s * x_t + a * out
    raise ValueError(f"unknown prediction '{prediction}'")


def target(prediction: str, x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """What the network should output for a given (x0, eps) pair."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return a * eps - s * x0
    raise ValueError(f"unknown prediction '{prediction}'")


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def _run(net: nn.Module, x: torch.Tensor, t: torch.Tensor, autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """net(x, t) in float32, or under autocast (bf16 / fp16) when a dtype is given; the output is float32."""
    ctx = torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with ctx:
        return net(x, t).float()


class DenoiserWrapper(nn.Module):
    """A denoiser built around another (guidance, inpainting): what samplers and the consistency
    function read besides the call (noise levels, sigma_data, the prior's std) is the base's."""

    SAMPLER_ATTRIBUTES = ("discrete_sigmas", "sigma_min", "sigma_max", "sigma_data", "learned_variance")

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        for name in self.SAMPLER_ATTRIBUTES:
            if hasattr(base, name):
                setattr(self, name, getattr(base, name))

    def prior_std(self, sigma_max: float) -> float:
        return self.base.prior_std(sigma_max)


class EDMDenoiser(nn.Module):
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise), the preconditioning of Karras et al. (2022), Table 1.

    c_noise = 1000 * ln(sigma) / 4 = 250 ln(sigma): Table 1's ln(sigma) / 4, scaled by 1000 so the
    network's sinusoidal time embedding (built for DDPM's integer timesteps 0..999) sees values
    of the same order: about -1550..1100 for sigma in [0.002, 80], -300 +- 300 for the training
    distribution ln(sigma) ~ N(-1.2, 1.2^2). Checkpoints store networks trained on this c_noise.

    `clip_denoised` clamps D to [-1, 1]. That is not part of EDM: inside an ODE solver it changes
    the probability-flow ODE being solved (see `samplers`); it is a sampling option only.
    """

    discrete_sigmas = None

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 clip_denoised: bool = False, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.net, self.sigma_data = net, sigma_data
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.clip_denoised, self.autocast_dtype = clip_denoised, autocast_dtype

    def prior_std(self, sigma_max: float) -> float:
        return sigma_max

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        s, sd = _bcast(sigma, x), self.sigma_data
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1 / (s**2 + sd**2).sqrt()
        c_noise = 250.0 * sigma.log()
        x0 = c_skip * x + c_out * _run(self.net, c_in * x, c_noise, self.autocast_dtype)
        return x0.clamp(-1, 1) if self.clip_denoised else x0


class VPDenoiser(nn.Module):
    """D(x, sigma) for a network trained on discrete VP timesteps 0..T-1.

    The input x = x_VP / sqrt(alpha_bar) is scaled back by c_in = sqrt(alpha_bar) = 1/sqrt(1 + sigma^2),
    sigma maps to a (fractional) timestep by interpolating log sigma over the model's grid, and the
    output becomes an x0 estimate. With `learned_variance` the network's second half of channels
    is the Improved-DDPM variance interpolation v in [-1, 1].
    """

    def __init__(self, net: nn.Module, alpha_bar: torch.Tensor, prediction: str = "eps", clip_denoised: bool = False,
                 learned_variance: bool = False, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.net = net
        self.prediction = prediction
        self.clip_denoised = clip_denoised
        self.learned_variance = learned_variance
        self.autocast_dtype = autocast_dtype
        # Zero terminal SNR makes the last sigma infinite; 2**-24 keeps it finite for the samplers.
        alpha_bar = alpha_bar.double().clamp(min=2.0**-24)
        self.register_buffer("discrete_sigmas", schedules.vp_sigmas(alpha_bar).float(), persistent=False)
        self.register_buffer("log_sigmas", self.discrete_sigmas.log(), persistent=False)
        self.sigma_min = float(self.discrete_sigmas[0])
        self.sigma_max = float(self.discrete_sigmas[-1])

    def prior_std(self, sigma_max: float) -> float:
        """Std of x at sigma_max: sqrt(1 + sigma^2), i.e. x_VP ~ N(0, I) as DDPM starts."""
        return math.sqrt(1.0 + sigma_max**2)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep whose sigma is `sigma` (exact integers on the model's own grid)."""
        log_sigma = sigma.float().log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        hi = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, len(self.log_sigmas) - 1)
        lo_v, hi_v = self.log_sigmas[hi - 1], self.log_sigmas[hi]
        w = ((log_sigma - lo_v) / (hi_v - lo_v)).clamp(0, 1)
        return (hi - 1).float() + w

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, return_variance: bool = False):
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        t = self.sigma_to_t(sigma)
        c_in = _bcast(1 / (1 + sigma**2).sqrt(), x)          # sqrt(alpha_bar)
        s_vp = _bcast(sigma, x) * c_in                        # sqrt(1 - alpha_bar)
        x_vp = x * c_in
        out = _run(self.net, x_vp, t, self.autocast_dtype)
        if self.learned_variance:
            out, var_out = out.chunk(2, dim=1)
        x0 = to_x0(self.prediction, out, x_vp, c_in, s_vp)
        if self.clip_denoised:
            x0 = x0.clamp(-1, 1)
        if return_variance:
            if not self.learned_variance:
                raise ValueError("this model has no learned variance")
            return x0, (var_out.clamp(-1, 1) + 1) / 2
        return x0


class Diffusion:
    """The seed tutorial's diffusion object, configured by a `DiffusionConfig`.

    Holds the schedule (`beta`, `alpha`, `alpha_hat` as in the tutorial) and offers the forward
    process and sampling; it delegates sampling to `samplers` through a `VPDenoiser` or an
    `EDMDenoiser`. `Diffusion(cfg, img_size=..., channels=..., device=...)` takes a whole
    config; the seed's keywords still work (`Diffusion(noise_steps=1000, beta_start=1e-4,
    beta_end=0.02, img_size=64, device="cuda")`), and so does any DiffusionConfig field given by
    name (`Diffusion(img_size=8, prediction="v")`), applied on top of `config`. `img_size` is the
    side of square images or (height, width); `hw` is always (height, width).
    """

    def __init__(self, config: DiffusionConfig | None = None, *, img_size: int | tuple[int, int] = 64,
                 device: str | torch.device = "cpu", channels: int = 3, **fields):
        if config is not None and not isinstance(config, DiffusionConfig):
            raise TypeError(f"Diffusion's first argument is a DiffusionConfig, got {type(config).__name__}; "
                            "pass the seed's settings by name, e.g. Diffusion(noise_steps=1000)")
        if "noise_steps" in fields:  # the seed tutorial's name for diffusion.timesteps
            fields["timesteps"] = fields.pop("noise_steps")
        try:
            cfg = dataclasses.replace(config or DiffusionConfig(), **fields)
        except TypeError:
            known = {f.name for f in dataclasses.fields(DiffusionConfig)} | {"noise_steps"}
            raise TypeError(f"Diffusion() got unknown settings {sorted(set(fields) - known)}; "
                            f"known: {sorted(known)}") from None
        self.config = cfg
        self.noise_steps, self.beta_start, self.beta_end = cfg.timesteps, cfg.beta_start, cfg.beta_end
        self.img_size, self.channels, self.device = img_size, channels, torch.device(device)
        self.hw = as_hw(img_size)
        self.schedule, self.prediction, self.variance = cfg.schedule, cfg.prediction, cfg.variance
        self.clip_denoised, self.learned_variance = cfg.clip_denoised, cfg.learn_sigma
        self.objective, self.sigma_data = cfg.objective, cfg.sigma_data
        self.sigma_min, self.sigma_max = cfg.sigma_min, cfg.sigma_max
        self.alpha_bar64 = schedules.alpha_bar_schedule(cfg.schedule, cfg.timesteps, cfg.beta_start, cfg.beta_end,
                                                        cfg.zero_terminal_snr)
        self.beta = self.prepare_noise_schedule().to(self.device)
        self.alpha = 1.0 - self.beta
        self.alpha_hat = self.alpha_bar64.float().to(self.device)

    @classmethod
    def from_config(cls, cfg: DiffusionConfig, img_size: int | tuple[int, int], channels: int,
                    device="cpu") -> "Diffusion":
        return cls(cfg, img_size=img_size, channels=channels, device=device)

    def prepare_noise_schedule(self) -> torch.Tensor:
        """Betas of the schedule (the seed's method name)."""
        return schedules.betas_from_alpha_bar(self.alpha_bar64).float()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, Eq. (4) of Ho et al. (2020)."""
        ab = _bcast(self.alpha_hat.to(x0.device)[t], x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def noise_images(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The seed's forward-process call: returns (x_t, eps)."""
        eps = torch.randn_like(x)
        return self.q_sample(x, t, eps), eps

    def sample_timesteps(self, n: int) -> torch.Tensor:
        """Uniform timesteps over the full range 0..T-1 (the tutorial skipped t=0)."""
        return torch.randint(0, self.noise_steps, (n,), device=self.device)

    def denoiser(self, model: nn.Module, bf16: bool | str = False, clip: bool | None = None) -> nn.Module:
        """The network as D(x, sigma), the form every sampler takes.

        `bf16` is the network's precision: False / True (fp32 / bf16 autocast, the older switch) or a
        name of `precision.PRECISIONS` (fp32 | bf16 | fp16 | auto, decided for this device). `clip`
        clamps every x0 estimate to [-1, 1] before the sampler uses it (None: the config's
        `clip_denoised`). See `samplers` for what that does to each sampler.
        """
        from .precision import autocast_dtype

        dtype = autocast_dtype(bf16, self.device)
        clip = self.clip_denoised if clip is None else bool(clip)
        if self.objective == "edm":
            return EDMDenoiser(model, self.sigma_data, self.sigma_min, self.sigma_max, clip, dtype)
        return VPDenoiser(model, self.alpha_bar64, self.prediction, clip, self.learned_variance,
                          dtype).to(self.device)

    @torch.inference_mode()
    def generate(self, model: nn.Module, n: int, sampler: str = "ddpm", steps: int | None = None,
                 seed: int | None = None, first_index: int = 0, batch_size: int | None = None,
                 spacing: str | None = None, bf16: bool = False, progress: bool = True, clip: bool | None = None,
                 **options) -> torch.Tensor:
        """`n` samples as float images in [-1, 1], shape (n, C, H, W), on the CPU.

        Image k depends only on (seed, first_index + k), not on `batch_size`. `steps` defaults to
        the sampler's `SamplerSpec.default_steps`; `clip` as in `denoiser`. The returned images
        are always clamped to [-1, 1]; `clip` decides whether the sampler's x0 estimates are.
        """
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        if sampler == "ddpm":  # beta_t as the variance only has a meaning on a VP schedule
            options.setdefault("variance", self.variance if self.objective == "vp" else "posterior")
        was_training = model.training
        model.eval()
        denoiser = self.denoiser(model, bf16, clip)
        batch_size = batch_size or n
        chunks = []
        try:
            bar = tqdm(total=n, desc=f"sampling ({sampler})", disable=not progress, unit="img")
            for start in range(0, n, batch_size):
                b = min(batch_size, n - start)
                x = samplers.run(denoiser, (b, self.channels, *self.hw), sampler, steps,
                                 seed=seed, first_index=first_index + start, spacing=spacing, device=self.device,
                                 **options)
                chunks.append(self.to_images(x).cpu())
                bar.update(b)
            bar.close()
        finally:
            model.train(was_training)
        return torch.cat(chunks)

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """The sampler's final x as images in [-1, 1]: clamped here; a latent model decodes (latent.py)."""
        return x.clamp(-1, 1)

    def sample(self, model: nn.Module, n: int, **kwargs) -> torch.Tensor:
        """The seed's call: `n` samples as uint8 images (n, C, H, W); keyword arguments as in `generate`."""
        x = self.generate(model, n, **kwargs)
        return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
