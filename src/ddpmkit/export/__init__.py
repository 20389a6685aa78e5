"""Model formats: writers and the readers that bring weights back.

  native.py     the ddpmkit format: model.safetensors + config.json (`ddpm export`), any model
  diffusers.py  the diffusers format: a DDPMPipeline folder (`ddpm export --format diffusers`) for
                ADM networks UNet2DModel computes exactly, and such a UNet read back
  init_from.py  `ddpm train --init-from`: a new run from a checkpoint, either export, or the seed
                tutorial's checkpoint

`export_model` and `load_exported` keep their place here (`from ddpmkit.export import ...`).
"""
from .native import AUTOENCODER, CONFIG, EXPORT_VERSION, WEIGHTS, export_model, load_exported, read_exported

FORMATS = ("ddpmkit", "diffusers")


def export(ckpt_path, out_dir, fmt: str = "ddpmkit", ema: bool = True):
    """Write a checkpoint as `fmt` (ddpmkit | diffusers) into `out_dir`; returns the folder."""
    from ..errors import DdpmError

    if fmt == "ddpmkit":
        return export_model(ckpt_path, out_dir, ema=ema)
    if fmt == "diffusers":
        from .diffusers import export_diffusers

        return export_diffusers(ckpt_path, out_dir, ema=ema)
    raise DdpmError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")


__all__ = ["AUTOENCODER", "CONFIG", "EXPORT_VERSION", "FORMATS", "WEIGHTS", "export", "export_model",
           "load_exported", "read_exported"]
