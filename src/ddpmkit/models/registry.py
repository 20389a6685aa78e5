"""Named model sizes, usable as `--model-size NAME` and from `build_model`."""
from __future__ import annotations

import dataclasses

from ..config import ModelConfig
from ..errors import DdpmError
from .unet import UNet

# Each preset is a complete ModelConfig; `seed` is the tutorial's 64x64 network.
PRESETS: dict[str, ModelConfig] = {
    # ~1.4M parameters: the CPU demo (16x16 or 32x32 images).
    "tiny": ModelConfig(size="tiny", base_channels=32, channel_mults=(1, 2, 2), attn_levels=(2,),
                        num_heads=4, time_dim=128),
    # ~8M parameters: small datasets at 32x32 on one GPU or a patient CPU.
    "small": ModelConfig(size="small", base_channels=64, channel_mults=(1, 2, 2, 2), attn_levels=(2,),
                         num_heads=4, time_dim=256),
    # The seed tutorial's UNet: attention after every Down and Up block.
    "seed": ModelConfig(size="seed", base_channels=64, channel_mults=(1, 2, 4, 4), attn_levels=(0, 1, 2, 3),
                        num_heads=4, time_dim=256),
    # ~31M parameters, a DDPM-CIFAR-10-like width (Ho et al. 2020, App. B; 35.7M there): 128 channels, attention at 16x16.
    "cifar": ModelConfig(size="cifar", base_channels=128, channel_mults=(1, 2, 2, 2), attn_levels=(1,),
                         num_heads=4, time_dim=256, dropout=0.1),
}


def preset(name: str) -> ModelConfig:
    """A fresh copy of the named preset."""
    if name not in PRESETS:
        raise DdpmError(f"unknown model size '{name}'; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


def build_model(cfg: ModelConfig, channels: int, out_channels: int | None = None) -> UNet:
    """Build the UNet a ModelConfig describes, for images with `channels` channels."""
    return UNet(c_in=channels, c_out=out_channels or channels, time_dim=cfg.time_dim,
                base_channels=cfg.base_channels, channel_mults=tuple(cfg.channel_mults),
                attn_levels=tuple(cfg.attn_levels), num_heads=cfg.num_heads, dropout=cfg.dropout)
