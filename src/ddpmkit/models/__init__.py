"""Networks: the seed tutorial's UNet, an ADM-style UNet, and `build_model` (named sizes live in config)."""
from ..config import PRESETS, preset
from .adm import ADMUNet
from .registry import build_model
from .unet import UNet

__all__ = ["ADMUNet", "PRESETS", "UNet", "build_model", "preset"]
