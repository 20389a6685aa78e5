"""One sampling entry for the conditional features: class labels with guidance, inpainting and
SDEdit, in any combination and with any sampler, batch by batch.

Image k depends only on (seed, first_index + k) and its own inputs, not on `batch_size`, as in
`Diffusion.generate`; with no labels, no inpainting and strength 1 the result is exactly
`Diffusion.generate`'s.

A latent model (latent.LatentDiffusion) takes its guide images and masks at the image size, as a
pixel model does, and works on latents as LDM does (Rombach et al. 2022): the guide images are
encoded (`to_latents`: scale_factor * E(x)), the mask goes to the latent grid (`latent_mask`: a
cell is generated when any of its pixels is), the sampler runs on the latents, and the result is
decoded (`to_images`). Inpainting then pastes the known pixels into the decoded images, so they
come back bit-exact as with a pixel model: decoded, they would differ from the guide by more than
the autoencoder's reconstruction error, because the decoder (3x3 convolutions and GroupNorm)
mixes the generated cells into the known pixels near them, across all of a small image.
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
    if k == 0:
        if labels is not None:
            raise DdpmError("class labels need a class-conditional model; this one was trained without --class-cond")
        return diffusion.denoiser(model, bf16, clip)  # a latent model's does not clip unless asked (latent.py)
    binding = LabelledNet(model)
    base = diffusion.denoiser(binding, bf16, clip)
    clip, base.clip_denoised = base.clip_denoised, False  # clipped after mixing, in GuidedDenoiser
    return GuidedDenoiser(base, binding, null=k, labels=labels, guidance=guidance, rescale_phi=rescale_phi,
                          clip=clip, interval=interval)


def _rows(value: torch.Tensor | None, start: int, b: int) -> torch.Tensor | None:
    """Rows start..start+b of a per-image tensor, or the tensor itself when it has one row for all."""
    if value is None or value.ndim == 0 or value.shape[0] == 1:
        return value
    return value[start:start + b]


def image_shape(diffusion) -> tuple[int, tuple[int, int]]:
    """(channels, (height, width)) of the images `diffusion` makes: a latent model's decoded ones, not
    its latents'."""
    return (getattr(diffusion, "image_channels", diffusion.channels), getattr(diffusion, "image_hw", diffusion.hw))


def _check_image(value: torch.Tensor | None, name: str, channels: tuple[int, ...], hw: tuple[int, int],
                 n: int) -> None:
    if value is None:
        return
    if value.ndim != 4 or value.shape[0] not in (1, n) or value.shape[1] not in channels or \
            tuple(value.shape[2:]) != tuple(hw):
        rows = "1" if n == 1 else f"{n} or 1"
        raise DdpmError(f"{name} has shape {tuple(value.shape)}, but this model needs ({rows}, "
                        f"{' or '.join(map(str, channels))}, {hw[0]}, {hw[1]}) at its image size; resize it "
                        "(guidance.load_guide and load_mask read files at that size)")


def _to_model_space(diffusion, value: torch.Tensor | None, device, is_mask: bool = False) -> torch.Tensor | None:
    """A guide image or mask as the sampler sees it: itself for a pixel model; for a latent model its
    scaled latents (`to_latents`) or the mask on the latent grid (`latent_mask`)."""
    if value is None or not hasattr(diffusion, "to_latents"):
        return None if value is None else value.to(device)
    return diffusion.latent_mask(value) if is_mask else diffusion.to_latents(value)


def _run_chunk(denoiser, shape, sampler: str, steps, seed: int, first_index: int, spacing, device,
               init: torch.Tensor | None, strength: float, resample: int, options: dict) -> torch.Tensor:
    """samplers.run, plus SDEdit's start (init noised to sigma(S T), truncated schedule) and RePaint resampling."""
    if (init is None or strength == 1.0) and resample <= 1:
        return samplers.run(denoiser, shape, sampler, steps, seed=seed, first_index=first_index, spacing=spacing,
                            device=device, **options)
    spec = samplers.SAMPLERS[sampler]
    sigmas = samplers.sampler_sigmas(denoiser, sampler, steps, spacing).to(device)
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
    it; 1 is an ordinary sample from the same seed). known, mask and init are images at the
    model's image size ((n or 1, C, H, W), mask (n or 1, 1, H, W)), for a latent model too.
    """
    channels, hw = image_shape(diffusion)
    if (known is None) != (mask is None):
        raise DdpmError("inpainting needs both `known` (the image) and `mask` (1 = generate); give both or neither")
    _check_image(known, "the inpainting image", (channels,), hw, n)
    _check_image(mask, "the inpainting mask", (1, channels), hw, n)
    _check_image(init, "the SDEdit image", (channels,), hw, n)
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
                den = InpaintDenoiser(den, _to_model_space(diffusion, _rows(known, start, b), device),
                                      _to_model_space(diffusion, _rows(mask, start, b), device, is_mask=True))
            x = _run_chunk(den, (b, diffusion.channels, *diffusion.hw), sampler, steps,
                           seed, first_index + start, spacing, device,
                           _to_model_space(diffusion, _rows(init, start, b), device), strength, resample, options)
            if known is not None:
                x = den.paste(x)  # the known pixels (a latent model's known cells), bit-exact
            x = diffusion.to_images(x)  # clamped to [-1, 1]; a latent model decodes
            if known is not None and hasattr(diffusion, "to_latents"):  # the known pixels, bit-exact, here too
                m = _rows(mask, start, b).to(x.device, x.dtype).amax(1, keepdim=True)
                x = m * x + (1 - m) * _rows(known, start, b).to(x.device, x.dtype).clamp(-1, 1)
            chunks.append(x.cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks)
