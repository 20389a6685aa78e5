"""Networks and their named sizes."""
from .registry import PRESETS, build_model, preset
from .unet import UNet

__all__ = ["PRESETS", "UNet", "build_model", "preset"]
