"""`load_model`: a trained network from a checkpoint or an exported folder, ready to sample.

It lives apart from checkpoint.py and the export package, which it both uses, so that neither
of them imports the other.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import config_of, load_checkpoint, load_state, model_from_config
from .export import load_exported
from .latent import attach_decoder, latent_parts, refuse_autoencoder_checkpoint


def load_model(path: str | Path, device: str | torch.device = "cpu", ema: bool = True):
    """Rebuild (model, diffusion, config) from a checkpoint alone (the EMA weights by default),
    or from a folder written by `ddpm export`. The seed tutorial's checkpoint loads as the seed
    UNet with the seed's diffusion (`checkpoint.seed_checkpoint`).

    The model is in eval mode on `device`; `diffusion.sample(model, n)` draws images from it (a
    latent model's diffusion is a `latent.LatentDiffusion`, which decodes its samples).
    """
    if Path(path).is_dir():
        from .compress.quantize import is_quantized, load_quantized  # ONNX Runtime runs it (`ddpm quantize`)

        return load_quantized(path, device) if is_quantized(path) else load_exported(path, device)
    ckpt = load_checkpoint(path, accept_seed=True)
    refuse_autoencoder_checkpoint(ckpt, path)
    cfg = config_of(ckpt, path)
    model, diffusion = model_from_config(cfg, device)
    key = "ema_state_dict" if ema and ckpt.get("ema_state_dict") is not None else "model_state_dict"
    load_state(model, ckpt[key], path, "EMA" if key.startswith("ema") else "model")
    if cfg.autoencoder.path:  # latent diffusion: sampling decodes with the autoencoder stored in the checkpoint
        diffusion = attach_decoder(diffusion, cfg, *latent_parts(ckpt), path)
    return model.eval(), diffusion, cfg
