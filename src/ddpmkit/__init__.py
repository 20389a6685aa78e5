"""ddpmkit: train, sample and evaluate DDPM-family diffusion image models.

The seed tutorial's API works as it did::

    model = UNet().to(device)
    diffusion = Diffusion(img_size=64, device=device)
    images = diffusion.sample(model, n=16)
    plot_images(images)

and `load_model("models/RUN/ckpt.pt")` returns (model, diffusion, config) from a checkpoint alone.
"""
__version__ = "0.1.0"

from .loading import load_model
from .config import Config, DataConfig, DiffusionConfig, ModelConfig, TrainConfig
from .diffusion import Diffusion, VPDenoiser
from .errors import DdpmError
from .images import make_grid, plot_images, save_images
from .models import PRESETS, UNet, build_model
from .samplers import SAMPLERS

__all__ = [
    "Config", "DataConfig", "DdpmError", "Diffusion", "DiffusionConfig", "ModelConfig", "PRESETS", "SAMPLERS",
    "TrainConfig", "UNet", "VPDenoiser", "build_model", "load_model", "make_grid", "plot_images", "save_images",
]
