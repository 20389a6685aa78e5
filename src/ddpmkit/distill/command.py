"""The `ddpm distill` subcommand: its flags and its call of `distill.distill`."""
from __future__ import annotations

import argparse

DISTILL_EXAMPLES = """examples:
  ddpm distill --teacher models/digits/ckpt.pt --method progressive --steps 4 --run-name digits_p4
  ddpm distill --teacher models/digits/ckpt.pt --method student --run-name digits_1step --pairs 5000
  ddpm distill --teacher models/digits/ckpt.pt --method consistency --steps 2 --run-name digits_ct
  ddpm distill --teacher models/digits/ckpt.pt --method sfd --steps 4 --run-name digits_sfd4
  ddpm sample --ckpt models/digits_p4/ckpt.pt      # the student's own sampler and steps by default
"""


def add_parser(sub, positive_int, add_run_options) -> None:
    from . import DEFAULT_IMAGES, DEFAULT_STEPS, METHODS, PAIR_EPOCHS, PREDICTIONS
    from .sfd import DEFAULT_TEACHER_SAMPLER, DEFAULT_TEACHER_STEPS, TEACHER_SAMPLERS

    p = sub.add_parser("distill", help="distil a trained model into a few-step student",
                       epilog=DISTILL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a few-step student of a checkpoint with the training loop of `ddpm train` "
                       "(resume, SIGTERM saves, EMA, grids, TensorBoard). progressive: Salimans & Ho (2022), halving "
                       "DDIM steps; student: Luhman & Luhman (2021), one step on teacher (noise, image) pairs; "
                       "consistency: Easy Consistency Tuning (Geng et al. 2024); sfd: Simple and Fast Distillation "
                       "(Zhou et al. 2024), the teacher fine-tuned to follow its own trajectory with --steps DDIM "
                       "steps, from noise alone (no data). The learning rate decays linearly to 0 over the run "
                       "(progressive: over each halving). Writes WORKDIR/models/RUN/ckpt.pt "
                       "(progressive also steps{N}.pt after each halving); the same command again resumes.")
    p.add_argument("--teacher", required=True, metavar="CKPT", help="checkpoint of the model to distil")
    p.add_argument("--method", required=True, choices=METHODS, help="distillation method")
    p.add_argument("--run-name", required=True, help="names models/RUN, results/RUN and runs/RUN")
    p.add_argument("--steps", type=positive_int, default=None, help="the student's sampling steps (default: "
                   + ", ".join(f"{m} {s}" for m, s in DEFAULT_STEPS.items()) + ")")
    p.add_argument("--images", type=positive_int, default=None, help="training images: per halving stage for "
                   "progressive, in all otherwise (sfd: noise samples), rounded up to whole epochs (default: "
                   + ", ".join(f"{m} {s}" for m, s in DEFAULT_IMAGES.items()) + ")")
    p.add_argument("--pairs", type=positive_int, default=None, help="student: teacher samples to train on "
                   f"(DPM-Solver++(2M), 20 steps; default: --images / {PAIR_EPOCHS}, so each pair is seen about "
                   f"{PAIR_EPOCHS} times)")
    p.add_argument("--start-steps", type=positive_int, default=None, help="progressive: the teacher's DDIM "
                   "steps to halve from (default: the largest --steps * 2^k up to 64 and the teacher's T)")
    p.add_argument("--prediction", default="auto", choices=PREDICTIONS, help="what the student network "
                   "predicts (default auto: v for an eps teacher, whose error at the top noise level would reach x0 "
                   "multiplied by sigma_max, else the teacher's own)")
    p.add_argument("--teacher-sampler", default=None, choices=TEACHER_SAMPLERS, help="sfd: the teacher's ODE "
                   f"solver for the targets (default {DEFAULT_TEACHER_SAMPLER})")
    p.add_argument("--teacher-steps", type=positive_int, default=None, help="sfd: teacher solver steps per "
                   f"student step, on average (default {DEFAULT_TEACHER_STEPS}: {DEFAULT_TEACHER_STEPS} * --steps + 1 "
                   "teacher evaluations per sample with dpm++2m)")
    add_run_options(p, "teacher", "1e-4, decaying linearly to 0")


def run(args: argparse.Namespace) -> int:
    from . import distill

    summary = distill(args.teacher, args.method, args.run_name, steps=args.steps, images=args.images,
                      batch_size=args.batch_size, lr=args.lr, device=args.device, workdir=args.workdir,
                      pairs=args.pairs, start_steps_=args.start_steps, prediction=args.prediction,
                      teacher_sampler=args.teacher_sampler, teacher_steps=args.teacher_steps,
                      progress=not args.no_progress)
    if summary["status"] == "finished":
        print(f"done: {summary['step']} steps; student checkpoint {summary['ckpt']}")
    return 0
