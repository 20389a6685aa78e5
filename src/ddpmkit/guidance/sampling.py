"""One sampling entry for the conditional features: class labels with guidance, inpainting and
SDEdit, in any combination and with any sampler, batch by batch.

Image k depends only on (seed, first_index + k) and its own inputs, not on `batch_size`, as in
`Diffusion.generate`; with no labels, no inpainting and strength 1 the result is exactly
`Diffusion.generate`'s.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import samplers
from ..errors import DdpmError
from .cfg import GuidedDenoiser, LabelledNet
from .inpaint import InpaintDenoiser, with_resampling
from .sdedit import start_sigma, truncate


def num_classes(model: nn.Module) -> int:
    return int(getattr(model, "num_classes", 0) or 0)


def build_denoiser(diffusion, model: nn.Module, labels: torch.Tensor | None = None, guidance: float = 1.0,
                   rescale_phi: float = 0.0, bf16: bool = False, clip: bool | None = None,
                   interval: tuple[float, float] | None = None) -> nn.Module:
    """D(x, sigma) of `model`: plain for an unconditional one, a GuidedDenoiser for a conditional one
    (labels None = the null class, i.e. unconditional sampling of a conditional model)."""
    k = num_classes(model)
    clip = diffusion.clip_denoised if clip is None else bool(clip)
    if k == 0:
        if labels is not None:
            raise DdpmError("class labels need a class-conditional model; this one was trained without --class-cond")
        den = diffusion.denoiser(model, bf16)
        den.clip_denoised = clip
        return den
    binding = LabelledNet(model)
    base = diffusion.denoiser(binding, bf16)
    base.clip_denoised = False  # clipped after mixing, in GuidedDenoiser
    return GuidedDenoiser(base, binding, null=k, labels=labels, guidance=guidance, rescale_phi=rescale_phi,
                          clip=clip, interval=interval)


def _rows(value: torch.Tensor | None, start: int, b: int) -> torch.Tensor | None:
    """Rows start..start+b of a per-image tensor, or the tensor itself when it has one row for all."""
    if value is None or value.ndim == 0 or value.shape[0] == 1:
        return value
    return value[start:start + b]


def _run_chunk(denoiser, shape, sampler: str, steps, seed: int, first_index: int, spacing, device,
               init: torch.Tensor | None, strength: float, resample: int, options: dict) -> torch.Tensor:
    """samplers.run, plus SDEdit's start (init noised to sigma(S T), truncated schedule) and RePaint resampling."""
    if (init is None or strength == 1.0) and resample <= 1:
        return samplers.run(denoiser, shape, sampler, steps, seed=seed, first_index=first_index, spacing=spacing,
                            device=device, **options)
    spec = samplers.SAMPLERS[sampler]
    discrete = getattr(denoiser, "discrete_sigmas", None)
    steps = steps or samplers.default_steps(sampler, len(discrete) if discrete is not None else None)
    sigmas = samplers.make_sigmas(discrete, steps, spacing or (spec.spacing if discrete is not None else "karras"),
                                  sigma_min=getattr(denoiser, "sigma_min", None),
                                  sigma_max=getattr(denoiser, "sigma_max", None)).to(device)
    noise = samplers.PerSampleNoise(samplers.sample_seeds(seed, range(first_index, first_index + shape[0])))
    z = noise(torch.empty(shape, device=device))
    if init is None or strength == 1.0:  # S = 1 starts from the ordinary prior, as samplers.run does
        x = z * denoiser.prior_std(float(sigmas[0]))
    else:
        sigma0 = start_sigma(denoiser, strength, float(sigmas[0]))
        sigmas = truncate(sigmas, sigma0)
        x = init.to(device).expand(shape) + sigma0 * z  # Meng et al. (2022) Eq. 3, VE form
    return with_resampling(spec.fn, resample)(denoiser, x, sigmas, noise=noise, **options)


@torch.inference_mode()
def generate(diffusion, model: nn.Module, n: int, *, labels: torch.Tensor | None = None, guidance: float = 1.0,
             rescale_phi: float = 0.0, interval: tuple[float, float] | None = None,
             known: torch.Tensor | None = None, mask: torch.Tensor | None = None,
             resample: int = 1, init: torch.Tensor | None = None, strength: float = 1.0, sampler: str = "ddpm",
             steps: int | None = None, seed: int = 0, first_index: int = 0, batch_size: int | None = None,
             spacing: str | None = None, bf16: bool = False, clip: bool | None = None, **options) -> torch.Tensor:
    """`n` images in [-1, 1], (n, C, H, W) on the CPU.

    labels: class per image (or one for all; None = unconditional); guidance w, rescale phi and
    the guidance interval (lo, hi] in sigma as in `cfg`. known + mask: inpaint (mask 1 =
    generate), `resample` = RePaint's U. init + strength: SDEdit from `init` (strength 0 returns
    it; 1 is an ordinary sample from the same seed).
    """
    if init is not None and strength == 0.0:
        return init.expand(n, *init.shape[1:]).clamp(-1, 1).cpu().clone()
    if sampler == "ddpm":
        options.setdefault("variance", diffusion.variance if diffusion.objective == "vp" else "posterior")
    device = diffusion.device
    was_training = model.training
    model.eval()
    batch_size = batch_size or n
    chunks = []
    try:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            y = _rows(labels, start, b)
            den = build_denoiser(diffusion, model, None if y is None else y.to(device), guidance, rescale_phi,
                                 bf16, clip, interval)
            if known is not None:
                den = InpaintDenoiser(den, _rows(known, start, b).to(device), _rows(mask, start, b).to(device))
            x = _run_chunk(den, (b, diffusion.channels, diffusion.img_size, diffusion.img_size), sampler, steps,
                           seed, first_index + start, spacing, device, _rows(init, start, b), strength, resample,
                           options)
            if known is not None:
                x = den.paste(x)  # the known pixels, bit-exact
            chunks.append(x.clamp(-1, 1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks)
