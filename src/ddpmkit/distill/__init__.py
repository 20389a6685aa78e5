"""`ddpm distill`: few-step students of a trained model, trained by the trainer through task hooks.

    distill(teacher, method, run_name, steps=None, images=None, ...) -> summary

progressive (Salimans & Ho 2022), student (Luhman & Luhman 2021), consistency (Song et al.
2023; Geng et al. 2024) and sfd (Zhou et al. 2024) each live in their own module; `tasks` plugs
them into `train.train`.
The result, WORKDIR/models/RUN/ckpt.pt, is an ordinary checkpoint whose config's [distill]
section records the method, the teacher, the student's steps and its sampler (`ddpm sample`'s
default for it). Running the same command again resumes the run.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

from ..checkpoint import config_of, load_checkpoint
from ..config import Config, DistillConfig, validate
from ..data import num_batches
from ..errors import DdpmError

METHODS = ("progressive", "student", "consistency", "sfd")
DEFAULT_STEPS = {"progressive": 4, "student": 1, "consistency": 1, "sfd": 4}
# The student's own sampler, `ddpm sample`'s default for it. An SFD student takes plain DDIM steps on
# the nested grid, which is what the `progressive` entry samples (sfd.py: the levels it trains at).
SAMPLER = {"progressive": "progressive", "student": "ddim", "consistency": "consistency", "sfd": "progressive"}
# sfd: 10,000 noise draws. On the 150k-image digits teacher a 4-step student scored digits FD 20.40 with
# 10k and 20.43 with 20k (five draws of 1,000 each); 10k took 371 s on 2 EPYC cores, under the
# teacher's own training time (benchmarks/README.md, bench_distill.py).
DEFAULT_IMAGES = {"progressive": 20000, "student": 50000, "consistency": 50000, "sfd": 10000}  # per stage for progressive
MAX_START_STEPS = 64  # progressive: start from at most this many teacher DDIM steps
PAIR_EPOCHS = 5  # student: default pairs = images / PAIR_EPOCHS, so each pair is seen about 5 times
SFD_EPOCH_ROWS = 10_000  # sfd: noise draws per epoch (a checkpoint at every epoch end)


def _teacher(path: str) -> tuple[Config, dict]:
    """The teacher's config and (EMA) weights; a one-line error for anything that cannot teach."""
    ckpt = load_checkpoint(path)
    cfg = config_of(ckpt, path)
    if cfg.model.num_classes:
        raise DdpmError(f"teacher {path} is class-conditional; ddpm distill takes unconditional teachers only")
    if cfg.distill.method in ("student", "consistency", "sfd"):
        raise DdpmError(f"teacher {path} is itself a {cfg.distill.method} model (no diffusion ODE to follow); "
                        "pass the checkpoint of a diffusion model or of a progressive student")
    if cfg.autoencoder.path:
        raise DdpmError(f"teacher {path} is a latent diffusion model; ddpm distill takes pixel-space teachers only")
    if cfg.diffusion.learn_sigma:
        raise DdpmError(f"teacher {path} learns its variance (learn_sigma); distillation follows the "
                        "deterministic ODE of a model without it")
    key = "ema_state_dict" if ckpt.get("ema_state_dict") is not None else "model_state_dict"
    return cfg, ckpt[key]


def start_steps(teacher: Config, steps: int, start: int | None) -> int:
    """The teacher's DDIM steps a progressive run halves from, checked against `steps`."""
    d = teacher.distill
    has = d.steps if d.method == "progressive" else (teacher.diffusion.timesteps
                                                     if teacher.diffusion.objective == "vp" else None)
    if has is not None and steps >= has:
        raise DdpmError(f"--steps {steps} is not below the teacher's {has} steps; progressive distillation halves "
                        f"the step count, so pick --steps {has // 2} or fewer")
    if start is None:
        start = d.steps if d.method == "progressive" else 0
        if not start:
            start = steps * 2
            while start * 2 <= min(MAX_START_STEPS, has or MAX_START_STEPS):
                start *= 2
    if has is not None and start > has:
        raise DdpmError(f"the teacher has {has} steps, fewer than the {start} to start from; pass a smaller "
                        f"--steps or --start-steps")
    if start <= steps:
        raise DdpmError(f"--steps {steps} is not below the teacher's {start} steps; progressive distillation "
                        f"halves the step count, so pick --steps {start // 2} or fewer")
    ratio = start // steps
    if start % steps or ratio & (ratio - 1):
        reachable = [start >> k for k in range(1, start.bit_length()) if (start >> k) << k == start]
        raise DdpmError(f"--steps {steps} cannot be reached by halving the teacher's {start} steps; use one of "
                        f"{reachable} (or --start-steps {steps} * 2^k)")
    return start


PREDICTIONS = ("auto", "eps", "x0", "v")


def student_prediction(teacher: Config, prediction: str = "auto") -> str:
    """What the student network predicts. auto: v for an eps teacher, else the teacher's own.

    An eps network's x0 is (x_VP - s eps) / a with a = 1 / sqrt(1 + sigma^2), so an error in its output
    reaches x0 multiplied by sigma: 157 at the top of the linear schedule, ~4096 on the cosine one.
    Few-step students evaluate exactly there; v (x0 = a x_VP - s v) keeps the factor below 1
    (Salimans & Ho 2022, §4). benchmarks/bench_student_param.py measures eps against v students.
    """
    d = teacher.diffusion
    if prediction not in PREDICTIONS:
        raise DdpmError(f"unknown --prediction '{prediction}'; choose one of {', '.join(PREDICTIONS)}")
    if d.objective != "vp":
        if prediction not in ("auto", d.prediction):
            raise DdpmError(f"the teacher is an EDM model (its preconditioning is fixed); drop --prediction {prediction}")
        return d.prediction
    if prediction == "auto":
        return "v" if d.prediction == "eps" else d.prediction
    return prediction


def _run_config(teacher: Config, teacher_path: str, method: str, steps: int, train: dict,
                prediction: str = "auto") -> Config:
    """A new run's config: the teacher's model, diffusion and data, a fresh [train] and the [distill] record."""
    d = dataclasses.replace(teacher.diffusion, prediction=student_prediction(teacher, prediction))
    if method == "sfd":  # trained unclipped, so sampled unclipped: its intermediate x0 are steps, not images
        d = dataclasses.replace(d, clip_denoised=False)
    # The trainer's schedule stays constant: the task anneals the LR itself, over the run or (progressive)
    # over each stage (tasks.DistillTask.set_lr), whose length is set by --images, not by --epochs.
    t = dataclasses.replace(teacher.train, epochs=0, warmup_steps=0, lr_schedule="constant", sample_every_epochs=0,
                            eval_every_steps=0, class_cond=False, grad_accum=1, ckpt_every_steps=0, **train)
    record = DistillConfig(method=method, teacher=str(teacher_path), steps=steps, sampler=SAMPLER[method])
    return validate(dataclasses.replace(teacher, diffusion=d, train=t, distill=record))


def _stored(path: Path, method: str, teacher_path: str, steps: int, train: dict) -> tuple[Config, dict]:
    """A resumed run's config (its own, with the given [train] options) and checkpoint."""
    ckpt = load_checkpoint(path)
    cfg = config_of(ckpt, path)
    d = cfg.distill
    if (d.method, Path(d.teacher).resolve(), d.steps) != (method, Path(teacher_path).resolve(), steps):
        raise DdpmError(f"run '{cfg.train.run_name}' distils {d.teacher} with --method {d.method} --steps {d.steps}; "
                        "run it with those, or pick another --run-name")
    return validate(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))), ckpt


def _task(method: str, teacher_path: str, teacher_cfg: Config, teacher_state: dict, budget: int, cfg: Config,
          ckpt: dict | None, start: int | None, pairs: int | None, log: Callable,
          teacher_sampler: str | None = None, teacher_steps: int | None = None):
    from . import sfd, tasks

    stored = ckpt.get("task_state") if ckpt else None
    if method == "progressive":
        first = int(stored["start_steps"]) if stored else start
        return tasks.ProgressiveTask(teacher_path, teacher_state, budget, first, cfg.distill.steps,
                                     teacher_cfg.diffusion, log)
    if method == "student":
        n = int(stored["pairs"]) if stored else (pairs or default_pairs(budget))
        path = Path(cfg.train.workdir) / "models" / cfg.train.run_name / "pairs.npy"
        return tasks.StudentTask(teacher_path, teacher_state, budget, n, path, teacher_cfg, log)
    if method == "sfd":
        solver = (teacher_sampler or sfd.DEFAULT_TEACHER_SAMPLER, teacher_steps or sfd.DEFAULT_TEACHER_STEPS)
        rows = min(budget, SFD_EPOCH_ROWS)
        if stored:
            given = (teacher_sampler or stored["teacher_sampler"], teacher_steps or stored["teacher_steps"])
            solver, rows = (stored["teacher_sampler"], int(stored["teacher_steps"])), int(stored["rows"])
            if given != solver:
                raise DdpmError(f"run '{cfg.train.run_name}' distils with --teacher-sampler {solver[0]} "
                                f"--teacher-steps {solver[1]}; resume it with those, or pick another --run-name")
        return tasks.SFDTask(teacher_path, teacher_state, budget, rows, *solver, teacher_cfg.diffusion, log)
    return tasks.ConsistencyTask(teacher_path, teacher_state, budget, log)


def default_pairs(images: int) -> int:
    """The one-step student's default pair count: a few passes (PAIR_EPOCHS) over them in `images`."""
    return max(1, math.ceil(images / PAIR_EPOCHS))


def distill(teacher: str, method: str, run_name: str, steps: int | None = None, images: int | None = None,
            batch_size: int | None = None, lr: float | None = None, device: str | None = None, workdir: str = ".",
            pairs: int | None = None, start_steps_: int | None = None, prediction: str = "auto",
            teacher_sampler: str | None = None, teacher_steps: int | None = None,
            log: Callable = print, progress: bool = True) -> dict:
    """Distil `teacher` (a ckpt.pt) into WORKDIR/models/RUN_NAME/ckpt.pt with `method`; resumes a run that exists.

    images: training images per halving stage (progressive) or in all (student, consistency; sfd: noise
    draws, it needs no data); pairs: teacher samples the student method trains on (default
    `default_pairs(images)`); start_steps_: progressive's first teacher steps; prediction: the student's
    parameterization (`student_prediction`; a resumed run keeps its own); teacher_sampler, teacher_steps:
    sfd's teacher solver and its steps per student step (`sfd.TEACHER_SAMPLERS`, default dpm++2m and 4).
    """
    from ..runlock import RunLock
    from ..train import RunPaths, train

    teacher = str(teacher)  # a pathlib.Path in the stored config would make the student's checkpoint unloadable
    if method not in METHODS:
        raise DdpmError(f"unknown --method '{method}'; choose one of {', '.join(METHODS)}")
    steps = steps or DEFAULT_STEPS[method]
    if method == "student" and steps != 1:
        raise DdpmError(f"the student method makes one-step students; drop --steps {steps} (or use --steps 1)")
    if method != "sfd" and (teacher_sampler or teacher_steps):
        raise DdpmError("--teacher-sampler and --teacher-steps set the teacher solver of --method sfd only; drop them")
    teacher_cfg, teacher_state = _teacher(teacher)
    start = start_steps(teacher_cfg, steps, start_steps_) if method == "progressive" else None
    if method == "sfd":
        from . import sfd

        sfd.check_steps(teacher_cfg.diffusion, steps, teacher_sampler, teacher_steps)
    given = {k: v for k, v in (("batch_size", batch_size), ("lr", lr), ("device", device)) if v is not None}
    cfg = _run_config(teacher_cfg, teacher, method, steps, {"run_name": run_name, "workdir": workdir,
                                                             "lr": 1e-4, **given}, prediction)
    path = RunPaths.of(cfg).ckpt
    with RunLock(path.parent, run_name):
        ckpt = None
        if path.exists():
            cfg, ckpt = _stored(path, method, teacher, steps, given)
        task = _task(method, teacher, teacher_cfg, teacher_state, images or DEFAULT_IMAGES[method], cfg, ckpt, start,
                     pairs, log, teacher_sampler, teacher_steps)
        data = task.data(cfg, log)
        b = cfg.train.batch_size
        epochs = task.plan(num_batches(len(data), b), b)
        every = task.per_stage if method == "progressive" else epochs * num_batches(len(data), b)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=epochs, sample_every_steps=every))
        return train(cfg, ckpt, log=log, progress=progress, task=task)
