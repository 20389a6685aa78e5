"""The `ddpm calibrate` subcommand: its flags and its call of `calibrate.calibrate`."""
from __future__ import annotations

import argparse

CALIBRATE_EXAMPLES = """examples:
  ddpm calibrate --ckpt models/digits/ckpt.pt --nfe 6,8
  ddpm sample --ckpt models/digits/ckpt.pt --sampler ipndm --steps 8    # uses the stored 8-NFE schedule
  ddpm sample --ckpt models/digits/ckpt.pt --sampler ipndm --steps 8 --spacing trailing   # does not
  ddpm calibrate --ckpt models/digits/ckpt.pt --nfe 9 --sampler heun    # Heun: 5 steps, 9 model calls
"""


def _nfe_list(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects whole numbers separated by commas, e.g. 6,8; got '{text}'") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"model-call counts must be >= 1, got '{text}'")
    return values


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_parser(sub, positive_int) -> None:
    from .calibrate import CALIBRATED_SAMPLERS, DEFAULT_LEVELS, DEFAULT_SAMPLES, SCHEDULES_FILE

    p = sub.add_parser("calibrate", help="search a few-step schedule for a checkpoint (GITS)",
                       epilog=CALIBRATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Find the noise levels of an N-call ODE sampler for this model: a dynamic "
                       "program over a fine grid of candidate levels picks the N steps whose summed local error "
                       "against fine teacher trajectories is least (GITS, Chen et al. 2024). The levels are "
                       f"written to {SCHEDULES_FILE} beside the checkpoint, and `ddpm sample` / `ddpm eval` with "
                       "that sampler and NFE use them when no --spacing is given.")
    p.add_argument("--ckpt", required=True, metavar="PATH", help="checkpoint written by `ddpm train`")
    p.add_argument("--nfe", required=True, type=_nfe_list, metavar="N[,N...]",
                   help="model calls per sample, one or more (e.g. 6,8); Heun needs odd counts")
    p.add_argument("--sampler", type=_names, default=None, metavar="S[,S...]",
                   help=f"the samplers to store it for, of {', '.join(CALIBRATED_SAMPLERS)} (default: every one "
                   "that can make the NFE; those of one call per step share one schedule per NFE)")
    p.add_argument("-n", type=positive_int, default=DEFAULT_SAMPLES,
                   help=f"teacher trajectories (default: {DEFAULT_SAMPLES})")
    p.add_argument("--levels", type=positive_int, default=DEFAULT_LEVELS,
                   help=f"candidate noise levels searched (default: {DEFAULT_LEVELS})")
    p.add_argument("--seed", type=int, default=0, help="seed of the teacher's start noise (default: 0)")
    p.add_argument("--clip", choices=("auto", "on", "off"), default="auto",
                   help="x0 clipping of the teacher, as `ddpm sample --clip` (default: auto, the checkpoint's)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="trajectories per batch (default: 64)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import time

    from . import calibrate
    from .errors import DdpmError
    from .loading import load_model
    from .train import resolve_device

    calibrate.calibration_plan(args.nfe, args.sampler)  # bad samplers and counts fail before the model loads
    if args.levels < 2:
        raise DdpmError(f"--levels must be >= 2, got {args.levels}")
    model, diffusion, cfg = load_model(args.ckpt, resolve_device(args.device))
    if cfg.model.num_classes:
        raise DdpmError("ddpm calibrate supports unconditional models; this checkpoint is class-conditional")
    clip = {"auto": None, "on": True, "off": False}[args.clip]
    denoiser = diffusion.denoiser(model, clip=clip)
    start = time.perf_counter()
    results = calibrate.calibrate(denoiser, (diffusion.channels, *diffusion.hw), args.nfe,
                                  args.sampler, n=args.n, levels=args.levels, seed=args.seed,
                                  batch_size=args.batch_size, device=diffusion.device,
                                  progress=not args.no_progress)
    settings = {"samples": args.n, "levels": args.levels, "seed": args.seed,
                "clip": bool(diffusion.clip_denoised if clip is None else clip)}
    path = calibrate.save_schedules(args.ckpt, results, settings)
    print(f"calibrated on {args.n} teacher trajectories in {time.perf_counter() - start:.0f} s")
    lines: dict[tuple, list[str]] = {}  # one line per NFE and schedule, naming its samplers
    for name, table in results.items():
        for nfe, r in table.items():
            lines.setdefault((nfe, tuple(float(s) for s in r["sigmas"])), [r, []])[1].append(name)
    for (nfe, sigmas), (r, names) in sorted(lines.items()):
        others = ", ".join(f"{k} {v:.4f}" for k, v in r["compare"].items())
        print(f"  {nfe} NFE ({', '.join(names)}): sigmas {' '.join(f'{s:.4g}' for s in sigmas)}; summed local "
              f"error {r['cost']:.4f} ({others})")
    print(f"wrote {path}")
    return 0
