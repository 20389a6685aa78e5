"""Conditional sampling: classifier-free guidance (`cfg`), inpainting (`inpaint`), SDEdit
(`sdedit`), checked inputs (`inputs`), labelled grids (`grid`) and one `generate` for all."""
from .cfg import GuidedDenoiser, LabelledNet, rescale
from .grid import class_rows, labelled_grid, save_labelled_grid
from .inpaint import InpaintDenoiser, with_resampling
from .inputs import check_strength, class_names, load_guide, load_mask, parse_class
from .sampling import build_denoiser, generate, num_classes
from .sdedit import start_sigma, truncate

__all__ = ["GuidedDenoiser", "InpaintDenoiser", "LabelledNet", "build_denoiser", "check_strength", "class_names",
           "class_rows", "generate", "labelled_grid", "load_guide", "load_mask", "num_classes", "parse_class",
           "rescale", "save_labelled_grid", "start_sigma", "truncate", "with_resampling"]
