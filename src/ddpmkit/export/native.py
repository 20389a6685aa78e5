"""The ddpmkit format: a checkpoint's weights as safetensors plus a JSON config, and back.

The exported folder holds no pickled data at all: `model.safetensors` (tensors only) and
`config.json` (the run's full config), so it can be shared and loaded without trust. A latent
diffusion model adds `autoencoder.safetensors` (its decoder) and the latents' scale factor in
config.json.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..checkpoint import load_checkpoint, load_state, model_from_config, config_of
from ..config import from_dict, validate
from ..errors import DdpmError

WEIGHTS, CONFIG, AUTOENCODER = "model.safetensors", "config.json", "autoencoder.safetensors"
EXPORT_VERSION = 1


def export_model(ckpt_path: str | Path, out_dir: str | Path, ema: bool = True) -> Path:
    """Write OUT_DIR/model.safetensors and OUT_DIR/config.json from a checkpoint (EMA weights by default)."""
    from ..latent import refuse_autoencoder_checkpoint

    ckpt = load_checkpoint(ckpt_path, accept_seed=True)
    refuse_autoencoder_checkpoint(ckpt, ckpt_path)
    cfg = config_of(ckpt, ckpt_path)
    key = "ema_state_dict" if ema and ckpt.get("ema_state_dict") is not None else "model_state_dict"
    model, _ = model_from_config(cfg)
    load_state(model, ckpt[key], ckpt_path)  # proves the weights fit the config before writing anything
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".{WEIGHTS}.tmp{os.getpid()}"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"format": "ddpmkit", "weights": key.split("_")[0]})
        os.replace(tmp, out_dir / WEIGHTS)
        meta = {"export_version": EXPORT_VERSION, "weights": key.split("_")[0], "config": cfg.to_dict(),
                "global_step": ckpt.get("global_step")}
        if cfg.autoencoder.path:  # latent diffusion: the decoder and the latents' scale go along
            meta["scale_factor"] = _export_autoencoder(ckpt, cfg, ckpt_path, out_dir)
        (out_dir / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    except OSError as exc:
        raise DdpmError(f"cannot write the export to {out_dir}: {os.strerror(exc.errno) if exc.errno else exc}") from None
    return out_dir


def _export_autoencoder(ckpt: dict, cfg, ckpt_path, out_dir: Path) -> float:
    """Write a latent run's autoencoder as OUT_DIR/autoencoder.safetensors; returns its scale factor."""
    from ..latent import attach_decoder, latent_parts

    state, scale = latent_parts(ckpt)
    ae = attach_decoder(model_from_config(cfg)[1], cfg, state, scale, ckpt_path).autoencoder  # checks the weights fit
    tmp = out_dir / f".{AUTOENCODER}.tmp{os.getpid()}"
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, str(tmp), metadata={"format": "ddpmkit"})
    os.replace(tmp, out_dir / AUTOENCODER)
    return float(scale)


def load_exported(model_dir: str | Path, device: str | torch.device = "cpu"):
    """(model, diffusion, config) from a folder written by `export_model`."""
    model_dir = Path(model_dir)
    cfg, state, meta = read_exported(model_dir)
    weights = model_dir / WEIGHTS
    model, diffusion = model_from_config(cfg, device)
    load_state(model, state, weights)
    if cfg.autoencoder.path:  # latent diffusion: decode with the exported autoencoder
        from ..latent import attach_decoder

        ae_state = _read_weights(model_dir / AUTOENCODER) if (model_dir / AUTOENCODER).is_file() else None
        diffusion = attach_decoder(diffusion, cfg, ae_state, meta.get("scale_factor"), model_dir)
    return model.eval(), diffusion, cfg


def is_exported(model_dir: str | Path) -> bool:
    """True for a folder that holds this format's weights and config."""
    return (Path(model_dir) / WEIGHTS).is_file() and (Path(model_dir) / CONFIG).is_file()


def read_exported(model_dir: str | Path):
    """(config, state dict of the network, config.json's content) of a folder written by `export_model`."""
    model_dir = Path(model_dir)
    weights, config = model_dir / WEIGHTS, model_dir / CONFIG
    if not is_exported(model_dir):
        if (model_dir / "model_index.json").is_file() or (model_dir / "unet").is_dir():
            raise DdpmError(f"{model_dir} is a diffusers folder, which diffusers samples from "
                            "(DDPMPipeline.from_pretrained); `ddpm train --init-from` trains from it")
        raise DdpmError(f"{model_dir} is not an exported model (needs {WEIGHTS} and {CONFIG}); "
                        "create one with `ddpm export --ckpt PATH --out DIR`")
    try:
        meta = json.loads(config.read_text())
        cfg = validate(from_dict(meta["config"]))
    except (ValueError, KeyError, TypeError, AttributeError, DdpmError) as exc:
        raise DdpmError(f"{config} is not a valid ddpmkit export config ({' '.join(str(exc).split())[:160]})") from None
    return cfg, _read_weights(weights), meta


def _read_weights(path: Path) -> dict:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DdpmError(f"{path} is damaged ({' '.join(str(exc).split())[:120]})") from None
