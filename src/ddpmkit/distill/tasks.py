"""The distillation methods as trainer tasks (tasks.Task): each a model, a loss and its state.

Every task trains a copy of the teacher's network (the same config, so `load_model` and `ddpm
sample/eval/export` read the result unchanged) with the trainer's loop; the task adds the
teacher and what changes during a run (the progressive stage) to the checkpoint's task_state.

Learning rate. Each task sets the optimizer's rate before every step (`start`, `after_step`):
train.lr annealed linearly to 0 at the end of the run, and for progressive distillation at the
end of every halving stage (Salimans & Ho 2022 distil each halving with the learning rate
decaying linearly to 0). Step k of a span of L steps uses lr (1 - k / L): the first lr, the
last lr / L. The trainer's own schedule is constant for these runs (`distill._run_config`).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..checkpoint import FORMAT_VERSION, atomic_save, load_state, model_from_config
from ..config import Config, DiffusionConfig
from ..data import load_data
from ..diffusion import Diffusion
from ..images import save_images
from ..tasks import Task
from .consistency import ConsistencyLoss
from .progressive import ProgressiveLoss, frozen_copy
from .sfd import NoiseRows, SFDLoss, check_teacher_solver, noise_batches
from .student import PairData, StudentLoss, make_pairs, pair_batches, PAIR_SEED_STREAM


def annealed(step: int, start: int, end: int) -> float:
    """The LR factor of optimizer step `step` (0-based) in the span [start, end): 1 - (step - start) / (end - start)."""
    return max(0.0, 1.0 - (step - start) / max(1, end - start))


class DistillTask(Task):
    """What the three methods share: the teacher's weights as the start, grids with the student's sampler."""

    command = "ddpm distill"
    method = ""

    def __init__(self, teacher_path: str, teacher_state: dict[str, torch.Tensor], budget: int, log: Callable = print):
        self.teacher_path, self.teacher_state, self.budget, self.log = teacher_path, teacher_state, budget, log
        self._data = None
        self.trainer = None
        self.run_steps = 0  # optimizer steps of the whole run, from the trainer (`start`)

    def data(self, cfg: Config, log: Callable):
        if self._data is None:
            self._data = load_data(cfg.data.path, cfg.data.hw, cfg.data.channels, cfg.data.cache_dir, log)
        return self._data

    def build(self, cfg: Config, device: torch.device):
        """The student: the teacher's network with the teacher's (EMA) weights."""
        model, diffusion = model_from_config(cfg, device)
        load_state(model, self.teacher_state, self.teacher_path, "teacher")
        return model, diffusion

    def plan(self, n_batches: int, batch_size: int) -> int:
        """The epochs of `budget` training images (optimizer steps of batch_size, n_batches per epoch)."""
        return math.ceil(math.ceil(self.budget / batch_size) / n_batches)

    def start(self, trainer) -> None:
        t = trainer.cfg.train
        self.trainer = trainer
        self.run_steps = t.epochs * math.ceil(trainer.n_batches / t.grad_accum)  # the trainer's own count
        self.set_lr(trainer)

    def after_step(self, trainer) -> None:
        self.set_lr(trainer)

    def lr_factor(self, step: int) -> float:
        """The fraction of train.lr that optimizer step `step` (0-based) uses: linear to 0 over the run."""
        return annealed(step, 0, self.run_steps)

    def set_lr(self, trainer) -> None:
        """Set the rate of the next optimizer step (trainer.state.step steps are done)."""
        lr = trainer.cfg.train.lr * self.lr_factor(trainer.state.step)
        for group in trainer.state.opt.param_groups:
            group["lr"] = lr

    def steps_now(self, cfg: Config) -> int:
        return cfg.distill.steps

    def grid(self, trainer, name: str) -> torch.Tensor:
        """sample_n images with the student's own sampler and current step count."""
        t = trainer.cfg.train
        images = trainer.diffusion.sample(trainer._sampling_model(), t.sample_n, sampler=trainer.cfg.distill.sampler,
                                          steps=self.steps_now(trainer.cfg), seed=t.seed, bf16=t.precision,
                                          progress=False)
        save_images(images, trainer.paths.results / f"{name}.jpg")
        return images

    def extra_state(self) -> dict[str, Any]:
        return {"method": self.method, "teacher": self.teacher_path}


class ProgressiveTask(DistillTask):
    """Salimans & Ho (2022) Alg. 2: stages of `per_stage` optimizer steps, halving from `start_steps`."""

    method = "progressive"

    def __init__(self, teacher_path, teacher_state, budget, start_steps: int, final_steps: int,
                 teacher_diffusion: DiffusionConfig, log=print):
        super().__init__(teacher_path, teacher_state, budget, log)
        self.start_steps, self.final_steps = start_steps, final_steps
        self.stages = int(round(math.log2(start_steps // final_steps)))
        self.stage, self.per_stage, self.teacher = 0, 0, None
        self.teacher_diffusion = teacher_diffusion  # the first stage's teacher is read with its own config

    def plan(self, n_batches: int, batch_size: int) -> int:
        """Epochs for `budget` images per stage; sets the optimizer steps per stage (equal stages)."""
        per_stage = math.ceil(self.budget / batch_size)
        epochs = math.ceil(self.stages * per_stage / n_batches)
        self.per_stage = epochs * n_batches // self.stages
        return epochs

    def build(self, cfg, device):
        model, diffusion = super().build(cfg, device)
        self.teacher = frozen_copy(model)  # stage 0's teacher; a resume loads the current stage's
        return model, diffusion

    def steps_now(self, cfg=None) -> int:
        return self.start_steps // 2 ** (self.stage + 1)

    def make_loss(self, diffusion, cfg):
        def state():
            """Stage 0 distils the teacher checkpoint, read with its own diffusion config (an eps teacher
            of a v student stays eps); later stages distil the previous student, read as the run's model."""
            if self.stage > 0:
                return self.teacher, diffusion, self.steps_now()
            first = Diffusion.from_config(self.teacher_diffusion, diffusion.img_size, diffusion.channels,
                                          diffusion.device)
            return self.teacher, first, self.steps_now()

        return ProgressiveLoss(diffusion, state)

    def lr_factor(self, step: int) -> float:
        """Linear to 0 within each stage; the last stage also takes the steps that do not divide evenly."""
        stage = min(step // self.per_stage, self.stages - 1)
        end = self.run_steps if stage == self.stages - 1 else (stage + 1) * self.per_stage
        return annealed(step, stage * self.per_stage, end)

    def after_step(self, trainer) -> None:
        self._switch(trainer)
        super().after_step(trainer)

    def _switch(self, trainer) -> None:
        stage = min(trainer.state.step // self.per_stage, self.stages - 1)
        if stage == self.stage:
            return
        s = trainer.state
        if trainer.ctx.is_main:
            self._snapshot(trainer)
        self.stage = stage
        self.teacher.load_state_dict(s.model.state_dict())  # the student becomes the teacher (Alg. 2: eta <- theta)
        if s.ema is not None:
            s.ema.model.load_state_dict(s.model.state_dict())
        self.log(f"stage {stage + 1}/{self.stages}: distilling {2 * self.steps_now()} -> {self.steps_now()} steps")

    def _snapshot(self, trainer) -> None:
        """models/RUN/steps{N}.pt: the finished N-step student of this stage, an ordinary checkpoint."""
        s, n = trainer.state, self.steps_now()
        cfg = dataclasses.replace(trainer.cfg, distill=dataclasses.replace(trainer.cfg.distill, steps=n))
        ema = s.ema.model.state_dict() if s.ema is not None else None
        atomic_save({"format_version": FORMAT_VERSION, "config": cfg.to_dict(), "model_state_dict": s.model.state_dict(),
                     "ema_state_dict": ema, "global_step": s.step}, trainer.paths.ckpt.with_name(f"steps{n}.pt"))

    def extra_state(self):
        return {**super().extra_state(), "stage": self.stage, "per_stage": self.per_stage,
                "start_steps": self.start_steps, "teacher_state": self.teacher.state_dict(),
                "teacher_diffusion": dataclasses.asdict(self.teacher_diffusion)}

    def load_extra_state(self, state):
        self.stage, self.per_stage = int(state["stage"]), int(state["per_stage"])
        self.teacher.load_state_dict(state["teacher_state"])
        if "teacher_diffusion" in state:  # runs saved before it was stored read the teacher file's config
            self.teacher_diffusion = DiffusionConfig(**state["teacher_diffusion"])


class StudentTask(DistillTask):
    """Luhman & Luhman (2021): pairs from the teacher's sampler, then a one-step student on them."""

    method = "student"

    def __init__(self, teacher_path, teacher_state, budget, pairs: int, pairs_path: Path, teacher_cfg: Config,
                 log=print):
        super().__init__(teacher_path, teacher_state, budget, log)
        self.pairs, self.pairs_path, self.teacher_cfg = pairs, pairs_path, teacher_cfg

    def data(self, cfg, log):
        if self._data is None:
            from ..train import resolve_device

            device = resolve_device(cfg.train.device)
            model, diffusion = model_from_config(self.teacher_cfg, device)  # read as the teacher (eps, ...)
            load_state(model, self.teacher_state, self.teacher_path, "teacher")
            denoiser = diffusion.denoiser(model.eval())
            channels = cfg.data.channels or 3
            seed = int(np.random.SeedSequence([cfg.train.seed, PAIR_SEED_STREAM]).generate_state(1)[0] >> 2)
            arr = make_pairs(self.pairs_path, self.pairs, (channels, *cfg.data.hw),
                             denoiser, seed, device, log)
            self._data = PairData(arr, str(self.pairs_path))
        return self._data

    def batches(self, data, cfg, epoch, start, rank, world, device):
        return pair_batches(data, cfg.train.batch_size, cfg.train.seed, epoch, start, rank, world, device)

    def make_loss(self, diffusion, cfg):
        return StudentLoss(diffusion)

    def extra_state(self):
        return {**super().extra_state(), "pairs": self.pairs}


class ConsistencyTask(DistillTask):
    """Easy Consistency Tuning (Geng et al. 2024) from the teacher's weights."""

    method = "consistency"

    def __init__(self, teacher_path, teacher_state, budget, log=print):
        super().__init__(teacher_path, teacher_state, budget, log)
        self.total_steps = 0

    def plan(self, n_batches: int, batch_size: int) -> int:
        """Epochs for `budget` images; the gap schedule spans the run's optimizer steps."""
        epochs = math.ceil(math.ceil(self.budget / batch_size) / n_batches)
        self.total_steps = epochs * n_batches
        return epochs

    def make_loss(self, diffusion, cfg):
        return ConsistencyLoss(diffusion, lambda: (self.trainer.state.step, self.total_steps))

    def extra_state(self):
        return {**super().extra_state(), "total_steps": self.total_steps}

    def load_extra_state(self, state):
        self.total_steps = int(state["total_steps"])


class SFDTask(DistillTask):
    """Simple and Fast Distillation (Zhou et al. 2024, `sfd`): the teacher's network fine-tuned to follow
    the teacher's trajectory with one DDIM step per segment of its own levels. Data-free: every
    "image" of the budget is a noise draw of the loss, and an epoch is `rows` of them."""

    method = "sfd"

    def __init__(self, teacher_path, teacher_state, budget, rows: int, teacher_sampler: str, teacher_steps: int,
                 teacher_diffusion: DiffusionConfig, log=print):
        super().__init__(teacher_path, teacher_state, budget, log)
        check_teacher_solver(teacher_sampler, teacher_steps)
        self.rows, self.teacher_sampler, self.teacher_steps = rows, teacher_sampler, teacher_steps
        self.teacher_diffusion, self.teacher = teacher_diffusion, None

    def data(self, cfg, log):
        if self._data is None:
            log(f"sfd needs no training images: an epoch is {self.rows} noise samples, the teacher's trajectories "
                f"from {self.teacher_sampler} with {self.teacher_steps} steps per student step")
            self._data = NoiseRows(self.rows, cfg.data.channels or 3)
        return self._data

    def batches(self, data, cfg, epoch, start, rank, world, device):
        shape = (data.channels, *cfg.data.hw)
        return noise_batches(data, shape, cfg.train.batch_size, start, rank, world, device)

    def build(self, cfg, device):
        model, diffusion = super().build(cfg, device)
        self.teacher = frozen_copy(model)  # the teacher's weights, frozen; the student trains from the same
        return model, diffusion

    def make_loss(self, diffusion, cfg):
        teacher = Diffusion.from_config(self.teacher_diffusion, diffusion.img_size, diffusion.channels, diffusion.device)
        return SFDLoss(diffusion, self.teacher, teacher, cfg.distill.steps, self.teacher_steps, self.teacher_sampler,
                       cfg.distill.sampler)

    def extra_state(self):
        return {**super().extra_state(), "rows": self.rows, "teacher_sampler": self.teacher_sampler,
                "teacher_steps": self.teacher_steps, "teacher_diffusion": dataclasses.asdict(self.teacher_diffusion)}

    def load_extra_state(self, state):
        self.teacher_diffusion = DiffusionConfig(**state["teacher_diffusion"])
