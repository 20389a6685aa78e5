"""The command-line side of conditional sampling: `ddpm sample --class/--guidance/--inpaint/--mask`
and `ddpm edit` (SDEdit). cli.py adds these arguments and calls in here, so it stays small."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..errors import DdpmError

EDIT_EXAMPLES = """examples:
  ddpm edit --ckpt models/digits/ckpt.pt --init sketch.png --strength 0.5 --out edited.png
  ddpm edit --ckpt models/digits_cond/ckpt.pt --init three.png --strength 0.7 --class 8 --guidance 2 -n 8
"""


def add_condition_args(p: argparse.ArgumentParser) -> None:
    """--class / --guidance / --rescale / --guidance-interval, shared by `sample` and `edit`."""
    p.add_argument("--class", dest="klass", metavar="NAME_OR_INDEX", default=None,
                   help="class of a class-conditional model (a name stored in the checkpoint, or an index); "
                   "without it a conditional model draws one labelled row per class")
    p.add_argument("--guidance", type=float, default=1.0, metavar="W",
                   help="classifier-free guidance weight: null + W (cond - null); 1 = none, 0 = unconditional "
                   "(default: 1)")
    p.add_argument("--rescale", type=float, default=0.0, metavar="PHI",
                   help="guidance rescale of Lin et al. (2024) in [0, 1] (default: 0 = off)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only at noise levels LO < sigma <= HI (Kynkaanniemi et al. 2024; sigma = "
                   "sqrt((1 - alpha_bar) / alpha_bar), 0.01 to 157 for the linear schedule); elsewhere W = 1")


def add_sample_args(sa: argparse.ArgumentParser) -> None:
    add_condition_args(sa)
    sa.add_argument("--inpaint", metavar="IMAGE", help="fill in the --mask region of IMAGE (model's image size)")
    sa.add_argument("--mask", metavar="MASK", help="single-channel mask, white = generate, black = keep IMAGE")
    sa.add_argument("--resample", type=int, default=1, metavar="U",
                    help="RePaint resampling: repeat each inpainting step U times (default: 1 = plain replacement)")


def add_edit_parser(sub) -> None:
    """`ddpm edit`: SDEdit (Meng et al. 2022) of an image with a trained model."""
    ed = sub.add_parser("edit", help="image-to-image with SDEdit: noise an image, then denoise it",
                        epilog=EDIT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="SDEdit: noise --init to t = S*T, then run the reverse process from there. "
                        "--strength 0 returns the image, 1 is a new sample.")
    ed.add_argument("--ckpt", required=True, metavar="PATH", help="checkpoint (or export folder)")
    ed.add_argument("--init", required=True, metavar="IMAGE", help="image to edit (resized and center-cropped)")
    ed.add_argument("--strength", type=float, required=True, metavar="S", help="S in [0, 1]: how far to noise it")
    ed.add_argument("--out", default="edited.png", metavar="FILE", help="output image or grid (default: edited.png)")
    ed.add_argument("-n", type=int, default=1, metavar="N", help="number of edits (default: 1)")
    add_condition_args(ed)
    from ..samplers import SAMPLERS

    ed.add_argument("--seed", type=int, default=0, help="seed of the noise (default: 0)")
    ed.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS), help="sampler (default: ddim)")
    ed.add_argument("--steps", type=int, default=None, help="steps of the full schedule, of which SDEdit runs "
                    "the part below sigma(S*T) (default: per sampler)")
    ed.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    ed.add_argument("--bf16", action="store_true", help="bf16 autocast for the network")
    ed.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    ed.add_argument("--native-size", action="store_true", help="write at the images' own size (default: enlarged)")


def _check_guidance(args, model_cfg) -> None:
    if not 0.0 <= args.rescale <= 1.0:
        raise DdpmError(f"--rescale must be in [0, 1], got {args.rescale}")
    interval = getattr(args, "guidance_interval", None)
    if interval is not None and not 0.0 <= interval[0] < interval[1]:
        raise DdpmError(f"--guidance-interval LO HI needs 0 <= LO < HI, got {interval[0]:g} {interval[1]:g}")
    if model_cfg.num_classes == 0 and (args.guidance != 1.0 or args.rescale or interval is not None):
        raise DdpmError("--guidance, --rescale and --guidance-interval need a class-conditional model; this "
                        "checkpoint was trained without --class-cond")


def wants_conditional(args, model_cfg) -> bool:
    """Whether `ddpm sample` goes through this module instead of the plain (distributed) path."""
    return bool(args.klass is not None or args.inpaint or args.mask or model_cfg.num_classes
                or args.guidance != 1.0 or args.rescale or getattr(args, "guidance_interval", None) is not None)


def sample(args, model, diffusion, cfg, options: dict, out: Path | None) -> int:
    """`ddpm sample` for a conditional model or with --inpaint: writes the grid / images, returns 0."""
    from ..images import READABLE_WIDTH, save_each, save_images
    from .grid import class_rows, save_labelled_grid
    from .inputs import class_names, load_guide, load_mask, parse_class
    from .sampling import generate, image_shape

    _check_guidance(args, cfg.model)
    if args.trajectory:
        raise DdpmError("--trajectory is not available with --class, --inpaint or a class-conditional model")
    if bool(args.inpaint) != bool(args.mask):
        raise DdpmError("--inpaint IMAGE and --mask MASK go together; give both")
    (channels, hw), k = image_shape(diffusion), cfg.model.num_classes  # a latent model's decoded images
    known = mask = None
    if args.inpaint:
        mask = load_mask(args.mask, hw)
        known = load_guide(args.inpaint, hw, channels, "--inpaint image", exact=True)
    labels, n, per_class = None, args.n, None
    if args.klass is not None:
        labels = torch.tensor([parse_class(args.klass, cfg.model)])
    elif k:  # one row per class
        per_class = max(1, args.n // k)
        labels, n = class_rows(k, per_class), k * per_class
    images = generate(diffusion, model, n, labels=labels, guidance=args.guidance, rescale_phi=args.rescale,
                      interval=args.guidance_interval,
                      known=known, mask=mask, resample=args.resample, sampler=args.sampler, steps=args.steps,
                      seed=args.seed, batch_size=args.batch_size, spacing=args.spacing, bf16=args.bf16,
                      clip={"auto": None, "on": True, "off": False}[getattr(args, "clip", "auto")], **options)
    width = 0 if args.native_size else READABLE_WIDTH
    written = []
    if args.out_dir:
        save_each(images, args.out_dir)
        written.append(f"{n} images in {args.out_dir}")
    if out is not None:
        if per_class:
            save_labelled_grid(images, class_names(cfg.model), per_class, out, min_width=width)
            written.append(f"grid {out} (rows: {', '.join(class_names(cfg.model))})")
        else:
            save_images(images, out, min_width=width)
            written.append(f"grid {out}")
    print("wrote " + " and ".join(written))
    return 0


def edit(args, load) -> int:
    """`ddpm edit`; `load(path, device, ema)` returns (model, diffusion, cfg)."""
    from ..images import READABLE_WIDTH, save_images
    from .inputs import check_strength, load_guide, parse_class
    from .sampling import generate, image_shape

    strength = check_strength(args.strength)
    if args.n < 1:
        raise DdpmError(f"-n must be >= 1, got {args.n}")
    if Path(args.out).suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        raise DdpmError(f"--out {args.out} must end in .png, .jpg, .webp or .bmp")
    model, diffusion, cfg = load(args.ckpt, args.device, not args.no_ema)
    _check_guidance(args, cfg.model)
    channels, hw = image_shape(diffusion)  # a latent model's decoded images, which generate encodes
    init = load_guide(args.init, hw, channels, "--init image", exact=False)
    labels = None if args.klass is None else torch.tensor([parse_class(args.klass, cfg.model)])
    images = generate(diffusion, model, args.n, labels=labels, guidance=args.guidance, rescale_phi=args.rescale,
                      interval=args.guidance_interval,
                      init=init, strength=strength, sampler=args.sampler, steps=args.steps, seed=args.seed,
                      bf16=args.bf16)
    save_images(images, args.out, min_width=0 if args.native_size else READABLE_WIDTH,
                padding=0 if args.n == 1 else 2)  # one edit: the image itself
    print(f"wrote {args.out} ({args.n} edit{'s' if args.n > 1 else ''} at strength {strength})")
    return 0
