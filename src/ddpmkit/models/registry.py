"""Build the network a ModelConfig describes, dispatching on `cfg.arch`.

The named sizes (PRESETS, `preset`) are config data and live in config.py; they are re-exported
here for older imports. This module imports config, never the other way round.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..config import PRESETS, ModelConfig, preset
from ..errors import DdpmError
from . import widths
from .adm import ADMUNet
from .unet import UNet


def _unet(cfg: ModelConfig, c_in: int, c_out: int) -> nn.Module:
    return UNet(c_in=c_in, c_out=c_out, time_dim=cfg.time_dim, base_channels=cfg.base_channels,
                channel_mults=tuple(cfg.channel_mults), attn_levels=tuple(cfg.attn_levels),
                num_heads=cfg.num_heads, dropout=cfg.dropout, num_classes=cfg.num_classes)


def _adm(cfg: ModelConfig, c_in: int, c_out: int) -> nn.Module:
    return ADMUNet(c_in=c_in, c_out=c_out, time_dim=cfg.time_dim, base_channels=cfg.base_channels,
                   channel_mults=tuple(cfg.channel_mults), attn_levels=tuple(cfg.attn_levels),
                   num_heads=cfg.num_heads, dropout=cfg.dropout, num_res_blocks=cfg.num_res_blocks,
                   num_classes=cfg.num_classes, time_features=cfg.time_features, norm_groups=cfg.norm_groups)


# One builder per name in config.ARCHS (a test checks that the two agree).
BUILDERS: dict[str, Callable[[ModelConfig, int, int], nn.Module]] = {"unet": _unet, "adm": _adm}


def build_model(cfg: ModelConfig, channels: int, out_channels: int | None = None) -> nn.Module:
    """Build the network `cfg` describes for images with `channels` channels; `out_channels`
    defaults to `channels` (2 * channels for a learned variance)."""
    if cfg.arch not in BUILDERS:
        raise DdpmError(f"unknown model.arch '{cfg.arch}'; choose one of {', '.join(BUILDERS)}")
    model = BUILDERS[cfg.arch](cfg, channels, out_channels or channels)
    return widths.apply(model, tuple(cfg.pruned)) if cfg.pruned else model  # a pruned network's own sizes


__all__ = ["BUILDERS", "PRESETS", "build_model", "preset"]
