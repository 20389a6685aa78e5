"""The training loop: data -> loss -> AdamW step -> EMA, with grids, logs and exact resume.

A run lives in WORKDIR/models/RUN/ckpt.pt (everything a resume needs), WORKDIR/results/RUN/
(sample grids drawn with the EMA weights) and WORKDIR/runs/RUN/ (logs: loggers.py). Running the same
run name again resumes from the checkpoint, at the exact batch where it stopped.

Random draws. The random inputs of the loss (VP: t and eps; EDM: sigma and noise) of global
batch b of epoch e are drawn by the trainer, for the whole global batch, from a generator seeded
by (seed, e, b) alone, and passed to the loss (`losses.VPLoss.draw`). Dropout draws from the
device's default generator, reseeded per micro-batch from (seed, e, b, rank). No draw depends on
an RNG state carried from step to step, so a resumed run draws what an uninterrupted one draws.

Under torchrun (`torchrun --nproc_per_node N -m ddpmkit.cli train ...`) the same loop runs with
DistributedDataParallel: each process takes rows rank::N of every global batch of batch_size * N
images, so the effective batch is batch_size * grad_accum * N, and the same rows of the global
batch's draws. Without dropout an N-process run is then the computation of one process with
batch_size * N, up to float rounding of the gradient all-reduce; with dropout each process draws
its own masks. Only rank 0 keeps the EMA and writes checkpoints, grids, logs and
progress; a stop signal on any process stops all at the same step.

The loop is a `_Trainer` around a `TrainState` (what a checkpoint holds: checkpoint.py writes and
reads it): set-up (load data, build, restore, wrap for DDP), then epochs of micro-batches,
optimizer steps, logging and periodic actions (checkpoint, sample grid, evaluation). What is
trained -- data, model, loss, grids, extra checkpoint content -- is a `tasks.Task`; the default
is `ddpm train`, and other commands pass their own (`train(cfg, ckpt, task=...)`).
"""
from __future__ import annotations

import contextlib
import functools
import copy
import random
import dataclasses
import itertools
import math
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import (check_channels, config_of, load_checkpoint, new_history, position_of, restore_training,
                         save_training)
from .config import (SIGMA_REL_MAX, Config, apply_overrides, bf16_alias, new_run_config, size_text, validate,
                     with_default_model)
from .data import epoch_labels, num_batches
from .errors import DdpmError
from .guidance.cfg import LabelledNet
from .images import READABLE_WIDTH, make_grid, save_images
from .loggers import make_logger
from .losses import take_rows
from .precision import Precision, channels_last, compile_network
from .tasks import Task


@dataclass
class RunPaths:
    ckpt: Path
    results: Path
    runs: Path

    @classmethod
    def of(cls, cfg: Config) -> "RunPaths":
        root, name = Path(cfg.train.workdir), cfg.train.run_name
        return cls(root / "models" / name / "ckpt.pt", root / "results" / name, root / "runs" / name)


def resolve_device(name: str) -> torch.device:
    """auto picks cuda, then mps, then cpu; an unavailable explicit device is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise DdpmError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DdpmError("--device cuda was requested but no CUDA GPU is available; use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DdpmError("--device mps was requested but MPS is not available; use --device cpu or auto")
    return device


class EMA:
    """A moving average of the weights, updated after every optimizer step (`step` counts from 1).

    Two profiles:
    * `sigma_rel` = 0: the seed's exponential EMA, with the usual warm-up of its decay,
      min(decay, (1 + step) / (10 + step));
    * `sigma_rel` > 0: the power-function EMA of Karras et al. 2024 ("Analyzing and Improving the
      Training Dynamics of Diffusion Models", Sec. 3): at step t the average weighs the weights of
      step tau in proportion to tau^gamma, which one update keeps with beta_t = (1 - 1/t)^(gamma + 1).
      Its width relative to the run's length stays sigma_rel at every step, so it suits a run of any
      length; gamma comes from sigma_rel by `power_ema_gamma`.
    """

    def __init__(self, model: torch.nn.Module, decay: float, sigma_rel: float = 0.0):
        self.decay = decay
        self.gamma = power_ema_gamma(sigma_rel) if sigma_rel > 0 else None
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def beta(self, step: int) -> float:
        """The weight the average keeps at optimizer step `step` (1, 2, ...)."""
        if self.gamma is not None:
            return (1 - 1 / step) ** (self.gamma + 1)
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        ema_p = [p for p in self.model.parameters()]
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1 - self.beta(step))
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # torch >= 2.4 has the fused AdamW kernel for both


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step where the parameters' device has it, else torch's
    default (per-parameter on a CPU, multi-tensor elsewhere). Both apply the same update up to
    float rounding. On the `tiny` preset (1.40M parameters in 166 tensors) the fused step took
    2.5 ms against 11.0 ms (AVX-512 EPYC, 2 threads), about 6% of a 16 px batch-64 training step.
    A resumed run uses this choice whatever its checkpoint was written with (restore_training)."""
    params = list(params)
    fused = all(p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, fused=True if fused else None, **kwargs)


def power_ema_gamma(sigma_rel: float) -> float:
    """The exponent gamma of a power-function EMA whose relative width is sigma_rel.

    Karras et al. 2024, Sec. 3: the profile tau^gamma on [0, t] has standard deviation
    t * sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))), decreasing in gamma from sqrt(1/12) at
    gamma = 0. Squared, it is the cubic sigma_rel^2 (gamma + 2)^2 (gamma + 3) = gamma + 1, which has
    one positive root for 0 < sigma_rel < sqrt(1/12).
    """
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}), got {sigma_rel}")
    s2 = sigma_rel ** 2
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


# --- preparing a run -------------------------------------------------------------------------

def prepare(overrides: dict[str, dict[str, Any]], fresh: bool = False, log: Callable = print):
    """Resolve the config of a run and load its checkpoint when resuming.

    When WORKDIR/models/RUN/ckpt.pt exists (and not `fresh`), the stored config is the base and
    only the given overrides change it; changing the model, the diffusion or the image format of
    an existing run is an error.
    """
    overrides = bf16_alias(overrides)
    cfg = validate(apply_overrides(new_run_config(), with_default_model(overrides)))
    paths = RunPaths.of(cfg)
    if fresh or not paths.ckpt.exists():
        if cfg.diffusion.schedule == "cosine" and {"beta_start", "beta_end"} & set(overrides.get("diffusion", {})):
            # The cosine schedule has no betas; since it became the new-run default, a user who
            # sets them most likely expects the seed's linear schedule. (A resumed run keeps its own.)
            raise DdpmError("diffusion.beta_start / beta_end set the linear and sigmoid schedules, but this run "
                            "uses the cosine schedule (the new-run default): add --schedule linear, or drop them")
        return cfg, None
    ckpt = load_checkpoint(paths.ckpt)
    stored = config_of(ckpt, paths.ckpt)
    cfg = validate(apply_overrides(stored, overrides))
    if cfg.data.channels == 0:
        cfg.data.channels = stored.data.channels
    if stored.data.hw != cfg.data.hw:
        raise DdpmError(f"run '{cfg.train.run_name}' was trained at image size {size_text(stored.data.hw)}, not "
                        f"{size_text(cfg.data.hw)}; drop --image-size to resume, pick another --run-name, or pass "
                        "--fresh to start over")
    for section, fields in (("model", None), ("diffusion", None),
                            ("data", ("image_size", "image_width", "channels"))):
        a, b = dataclasses.asdict(getattr(stored, section)), dataclasses.asdict(getattr(cfg, section))
        for key in fields or a:
            if a[key] != b[key]:
                raise DdpmError(
                    f"run '{cfg.train.run_name}' was trained with {section}.{key}={a[key]!r}, not {b[key]!r}; "
                    f"drop that option to resume, pick another --run-name, or pass --fresh to start over")
    return cfg, ckpt


class _StopFlag:
    """SIGINT/SIGTERM request a graceful stop at the next optimizer step; a second SIGINT aborts."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(f"{signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
                   "(press Ctrl-C again to abort without saving)")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


# --- the loop --------------------------------------------------------------------------------

def _quiet(*args, **kwargs) -> None:
    pass


# --- random draws fixed by the data position -------------------------------------------------

_LOSS_DRAWS, _DROPOUT = 1, 2  # streams of draw_seed
DRAW_CURVES = True  # results/RUN/curves.png; the test suite turns it off where it does not test it (a plot costs ~1 s)
CURVES_EVERY_S = 60.0  # curves.png is redrawn at a checkpoint save at most this often, and at the end of a run
HISTORY_CAP = 10_000  # points per logged curve kept in the checkpoint; beyond it every other one is dropped


def lr_factor(step: int, warmup: int = 0, total: int = 0, schedule: str = "constant") -> float:
    """The learning rate of optimizer step `step` as a fraction of train.lr: a linear warm-up over
    `warmup` steps, then constant, or (schedule "cosine") a half cosine from 1 down to 0 at step
    `total`, the run's last step (Loshchilov & Hutter 2017, SGDR Eq. 5 without restarts)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine" and total > warmup:
        progress = min(1.0, (step - warmup) / (total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def draw_seed(seed: int, stream: int, epoch: int, batch: int, rank: int = 0) -> int:
    """A 64-bit seed that depends only on the run's seed, the stream and the data position."""
    return int(np.random.SeedSequence([seed, stream, epoch, batch, rank]).generate_state(1, np.uint64)[0])


def _seed_dropout(device: torch.device, seed: int) -> None:
    """Seed the generator that dropout on `device` draws from (that device's default generator only)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)
    elif device.type == "mps":
        torch.mps.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def _with_classes(cfg: Config, data) -> Config:
    """cfg with model.num_classes / class_names from the data when train.class_cond is on; a resumed
    conditional run must see the classes it was trained on."""
    if not cfg.train.class_cond:
        return cfg
    if data.labels is None:
        raise DdpmError(f"--class-cond needs class labels, but {data.source} has none; arrange the images as "
                        "DATA/CLASS_NAME/*.jpg (one folder per class), or use an IDX / .npz file with labels or "
                        "builtin:digits")
    names = tuple(data.classes) or tuple(str(k) for k in range(int(data.labels.max()) + 1))
    m = cfg.model
    if m.num_classes and (m.num_classes, tuple(m.class_names)) != (len(names), names):
        raise DdpmError(f"this run was trained on {m.num_classes} classes {list(m.class_names)[:10]}, but the "
                        f"data now has {len(names)} {list(names)[:10]}; use the same data or --fresh")
    return dataclasses.replace(cfg, model=dataclasses.replace(m, num_classes=len(names), class_names=names))


# --- the state of a run and the loop ---------------------------------------------------------

@dataclass
class TrainState:
    """What training changes and a checkpoint keeps (checkpoint.training_checkpoint is the schema).

    `epoch` and `batch` are the data position to continue from: the epoch, and the next batch in it.
    """

    model: torch.nn.Module
    ema: EMA | None
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    epoch: int = 0
    batch: int = 0
    step: int = 0
    skipped: int = 0  # optimizer steps skipped for a non-finite gradient, in all
    bad_in_row: int = 0
    precision: Precision | None = None  # autocast and, for fp16, the GradScaler (its state is checkpointed)
    history: dict[str, list[tuple[int, float]]] = field(default_factory=new_history)

    def record(self, key: str, value: float) -> None:
        """Add (step, value) to a logged curve, thinning it to every other point beyond HISTORY_CAP."""
        points = self.history.setdefault(key, [])
        points.append((self.step, float(value)))
        if len(points) > HISTORY_CAP:
            del points[1::2]


@dataclass
class _Window:
    """Sums over the micro-batches since the last log line."""

    loss_sum: torch.Tensor
    n: int = 0
    images: int = 0
    t0: float = field(default_factory=time.perf_counter)


def train(cfg: Config, ckpt: dict[str, Any] | None = None, log: Callable = tqdm.write,
          progress: bool = True, task: Task | None = None, init_from: str | None = None) -> dict[str, Any]:
    """Train until cfg.train.epochs are done (or a stop signal); returns a summary dict.

    `init_from`: a new run (ckpt None) starts its network from these weights (export/init_from.py).

    `task` says what is trained (tasks.Task; None: `ddpm train`'s diffusion model on the images).

    Started by torchrun with WORLD_SIZE > 1, this joins the process group (NCCL on GPU, gloo on
    CPU), trains with DistributedDataParallel and leaves the group at the end; a failed peer
    becomes a DdpmError here instead of a hang. A run whose every optimizer step was skipped
    (non-finite loss or gradient) is a DdpmError too: it learned nothing.
    """
    ctx = distributed.setup(cfg.train.device)
    try:
        with distributed.translate_errors(ctx):
            trainer = _Trainer(cfg, ckpt, ctx, log if ctx.is_main else _quiet, progress and ctx.is_main,
                               task or Task(), init_from if ckpt is None else None)
            return trainer.run()
    finally:
        ctx.close()


class _Trainer:
    """One run of the training loop: `__init__` sets it up, `run` trains."""

    def __init__(self, cfg: Config, ckpt: dict[str, Any] | None, ctx: distributed.Context, log: Callable,
                 progress: bool, task: Task | None = None, init_from: str | None = None):
        self.ctx, self.log, self.progress, self.task = ctx, log, progress, task or Task()
        self.init_from = init_from
        self.device = ctx.device if ctx.enabled else resolve_device(cfg.train.device)
        self.paths = RunPaths.of(cfg)
        ctx.check_same("run config", cfg.to_dict())
        ctx.check_same(f"checkpoint {self.paths.ckpt} (global step, epoch, batch)", position_of(ckpt))
        self.cfg, self.data = self._load_data(cfg)
        check_channels(ckpt, self.data.channels)
        self.global_batch = cfg.train.batch_size * ctx.world
        self.n_batches = num_batches(len(self.data), cfg.train.batch_size, ctx.world)
        self.state, self.diffusion = self._build()
        self.loss_fn = self.task.make_loss(self.diffusion, self.cfg)
        self.draw_gen = torch.Generator(device=self.device)  # reseeded per global batch (draw_seed)
        self._restore(ckpt)
        self.net = self._wrap_for_ddp()
        if cfg.train.compile:  # the state keeps the plain model: checkpoints are the same either way
            self.net = compile_network(self.net, self.device)
        self.params = list(self.state.model.parameters())
        self.precision = self.state.precision
        self.step_loss = torch.zeros((), device=self.device)  # fp16: this optimizer step's logged loss, summed
        self.writer = make_logger(self.cfg, self.paths.runs, self.ctx.is_main, resume=ckpt is not None, log=self.log)
        self.metric = None  # the training-time FID, built at its first use
        self.stopping = False
        self.steps_tried = self.steps_taken = 0
        self.last_ckpt_time = self.last_curves_time = time.monotonic()
        self.task.start(self)

    # --- set-up ---

    def _load_data(self, cfg: Config):
        """The decoded images (one process builds a file cache first), and cfg with their channel count."""
        with self.ctx.local_main_first() if cfg.data.cache_dir else contextlib.nullcontext():
            data = self.task.data(cfg, self.log)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, channels=data.channels))
        return _with_classes(cfg, data), data

    def _build(self) -> tuple[TrainState, Any]:
        """Model, EMA (rank 0 only: every rank holds the same weights), AdamW and the warm-up schedule."""
        t = self.cfg.train
        torch.manual_seed(t.seed)  # the same on every rank: the same initial weights
        random.seed(t.seed)
        np.random.seed(t.seed % 2**32)
        model, diffusion = self.task.build(self.cfg, self.device)
        if self.init_from:  # --init-from: before the EMA copies the network and the optimizer takes it
            from .export.init_from import load_initial_weights

            load_initial_weights(model, self.cfg, self.init_from, self.log)
        model.train()
        if t.channels_last:
            channels_last(model)
        ema = EMA(model, t.ema_decay, t.ema_sigma_rel) if t.ema_decay > 0 and self.ctx.is_main else None
        flag = getattr(t, "grad_checkpoint", None)
        if flag is not None and hasattr(model, "set_grad_checkpointing"):
            model.set_grad_checkpointing(flag)
        opt = adamw(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        total = t.epochs * math.ceil(self.n_batches / t.grad_accum)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, functools.partial(lr_factor, warmup=t.warmup_steps, total=total, schedule=t.lr_schedule))
        return TrainState(model, ema, opt, sched, precision=Precision(t.precision, self.device, self.log)), diffusion

    def _restore(self, ckpt: dict[str, Any] | None) -> None:
        t, data = self.cfg.train, self.data
        if ckpt is None:
            n_params = sum(p.numel() for p in self.state.model.parameters()) / 1e6
            self.log(f"starting run '{t.run_name}': {len(data)} images of {self.cfg.data.image_size}x"
                     f"{self.cfg.data.hw[1]}x{data.channels} from {self.cfg.data.path}, model "
                     f"'{self.cfg.model.size}' ({n_params:.2f}M parameters) on {self.device} in "
                     f"{self.state.precision.name}{' (auto)' if t.precision == 'auto' else ''}")
            return
        if ckpt.get("task_state") is not None:
            self.task.load_extra_state(ckpt["task_state"])
        note = restore_training(self.state, ckpt, self.cfg, len(data), self.ctx.world, self.device, self.paths.ckpt)
        s = self.state
        self.log(f"resuming run '{t.run_name}' from {self.paths.ckpt}: epoch {s.epoch}, batch {s.batch}, step {s.step}")
        if note:
            self.log(f"note: {note}")

    def _wrap_for_ddp(self) -> torch.nn.Module:
        """The model itself, or under torchrun a DistributedDataParallel around it."""
        ctx, t, model = self.ctx, self.cfg.train, self.state.model
        if not ctx.enabled:
            return model
        self.log(f"distributed: {ctx.world} processes ({dist.get_backend()}), effective batch "
                 f"{t.batch_size} x {t.grad_accum} x {ctx.world} = {self.global_batch * t.grad_accum}")
        # Built after loading the checkpoint; DDP also broadcasts rank 0's weights here. Gradients
        # live in the all-reduce buckets (no second copy of them).
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # On a CPU under bf16 autocast, a 1x1 convolution's weight gradient came back with
        # channels_last strides ([3, 8, 1, 1]: (8, 1, 8, 8) against the bucket's (8, 1, 1, 1)), which
        # for a 1x1 kernel is the same memory order; DDP's reducer still warned in four lines of a
        # C++ trace. The gradients are right either way (a mismatch costs a copy), so not shown.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)

    # --- the loop ---

    def run(self) -> dict[str, Any]:
        s, t, ctx = self.state, self.cfg.train, self.ctx
        status, stopping = "finished", False
        try:
            with _StopFlag() as self.stop:
                while s.epoch < t.epochs and not (stopping := ctx.any(self.stop.requested)):
                    if not self._epoch():
                        status = "stopped"
                        break
                else:
                    if stopping and s.epoch < t.epochs:
                        status = "stopped"
        finally:
            self.writer.close()
        ctx.barrier()  # leave together, after rank 0's last checkpoint and grid
        self._write_curves(force=True)
        if self.steps_tried and not self.steps_taken:
            raise DdpmError(f"all {self.steps_tried} optimizer steps of this run were skipped (non-finite loss or "
                            f"gradient), so it learned nothing; lower --lr, enable gradient clipping or check the "
                            f"data and the diffusion settings")
        if status == "stopped":
            self.log(f"stopped at epoch {s.epoch}, step {s.step}; checkpoint saved to {self.paths.ckpt}. "
                     f"Run the same `{self.task.command}` command again to resume.")
        return {"status": status, "epoch": s.epoch, "step": s.step, "ckpt": self.paths.ckpt,
                "nonfinite_skipped": s.skipped, "fp16_overflow_skipped": self.precision.overflows}

    def _epoch(self) -> bool:
        """Train from the current position to the end of the epoch; False when a stop ended it early."""
        s, t, ctx = self.state, self.cfg.train, self.ctx
        bar = tqdm(total=self.n_batches, initial=s.batch, desc=f"epoch {s.epoch}", unit="batch",
                   disable=not self.progress, leave=False, dynamic_ncols=True)
        self.window = _Window(torch.zeros((), device=self.device))
        batches = self.task.batches(self.data, self.cfg, s.epoch, s.batch, ctx.rank, ctx.world, self.device)
        labels = (epoch_labels(self.data, t.batch_size, t.seed, s.epoch, s.batch, ctx.rank, ctx.world, self.device)
                  if self.cfg.model.num_classes else itertools.repeat(None))
        try:
            for b, (x, y) in enumerate(zip(batches, labels), start=s.batch):
                bar.update(1)
                if not self._micro_batch(b, x, y):
                    continue  # more micro-batches of this optimizer step to come
                s.batch = b + 1
                norm = self._optimizer_step()
                if norm is None:
                    continue
                self.task.after_step(self)
                self.stopping = ctx.any(self.stop.requested)  # a signal on any rank stops all ranks at this step
                if s.step % t.log_every == 0:
                    self._log(norm, bar)
                if t.eval_every_steps and s.step % t.eval_every_steps == 0:
                    self._evaluate()
                if s.batch < self.n_batches:
                    self._mid_epoch_actions()
                    if self.stopping:
                        return False
        finally:
            bar.close()
        s.epoch, s.batch = s.epoch + 1, 0
        self._save()
        if t.sample_every_epochs and s.epoch % t.sample_every_epochs == 0:
            self._grid(str(s.epoch - 1))
        if t.sample_every_steps and s.step % t.sample_every_steps == 0:
            self._grid(f"step{s.step}")
        return True

    def _micro_batch(self, b: int, x: torch.Tensor, y: torch.Tensor | None = None) -> bool:
        """Forward and backward of batch b; True when it is the last of its optimizer step's group."""
        accum = self.cfg.train.grad_accum
        group_start = b // accum * accum
        group_n = min(accum, self.n_batches - group_start)
        last_of_group = b + 1 == group_start + group_n
        # Gradients of the group's earlier micro-batches stay local; the last one all-reduces them all.
        no_sync = self.ctx.enabled and not last_of_group
        with self.net.no_sync() if no_sync else contextlib.nullcontext():
            loss, logged = self._loss(b, x, y)
            self.precision.backward(loss / group_n)
        if self.precision.scaler is not None:  # only fp16's overflow test reads it
            self.step_loss += logged
        self.window.loss_sum += logged
        self.window.n += 1
        self.window.images += x.shape[0]
        return last_of_group

    def _loss(self, b: int, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss of this process's rows to backpropagate, its detached value for the log).

        The loss's random inputs are drawn for the whole global batch b (the same on every rank)
        and this rank keeps rows rank::world, the rows of x. A class-conditional model gets the
        labels y, each replaced by the null class with probability cond_drop (drawn after the
        loss's inputs, from the same generator; Ho & Salimans 2022, Alg. 1).
        """
        ctx, seed, epoch = self.ctx, self.cfg.train.seed, self.state.epoch
        g = min(self.global_batch, len(self.data) - b * self.global_batch)  # the last global batch may be smaller
        self.draw_gen.manual_seed(draw_seed(seed, _LOSS_DRAWS, epoch, b))
        draws = take_rows(self.loss_fn.draw(g, x, self.draw_gen), slice(ctx.rank, None, ctx.world))
        net = self.net
        if y is not None:
            drop = torch.rand(g, generator=self.draw_gen, device=self.device)[ctx.rank::ctx.world]
            net = LabelledNet(self.net, torch.where(drop < self.cfg.train.cond_drop, self.cfg.model.num_classes, y))
        _seed_dropout(self.device, draw_seed(seed, _DROPOUT, epoch, b, ctx.rank))
        with self.precision.autocast():
            per_sample = self.loss_fn(net, x, draws)
        # DDP averages gradients over the ranks, so sum * world / g gives the gradient of the
        # global batch's mean loss even when ranks hold unequal shares (or none) of it.
        local = per_sample.sum() / g
        return local * ctx.world, local.detach()

    def _optimizer_step(self) -> torch.Tensor | None:
        """Clip and apply the accumulated gradient; its norm, or None when it was not finite (skipped).

        After the all-reduce every rank holds the same gradients, so all ranks decide alike. Under
        fp16 the gradients are unscaled before clipping; a non-finite gradient of a finite loss is
        an overflow of the loss scale, which the GradScaler backs off from (`Precision.overflowed`):
        the step is skipped and counted, but not as a non-finite step.
        """
        s, t, p = self.state, self.cfg.train, self.precision
        self.steps_tried += 1
        step_loss = self.step_loss
        if p.scaler is not None:
            self.step_loss = torch.zeros((), device=self.device)
        p.unscale(s.opt)
        norm = torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip if t.grad_clip > 0 else math.inf)
        if not torch.isfinite(norm):
            s.opt.zero_grad(set_to_none=True)
            if p.scaler is not None and p.overflowed(not self.ctx.any(not torch.isfinite(step_loss))):
                self.steps_tried -= 1  # loss scaling at work, not a non-finite step
                self.log(f"fp16 gradient overflow at step {s.step}: step skipped, loss scale now {p.scale():g} "
                         f"({p.overflows} skipped in all)")
                return None
            s.bad_in_row += 1
            s.skipped += 1
            self.log(f"warning: non-finite loss or gradient at step {s.step}; step skipped "
                     f"({s.bad_in_row} in a row, {s.skipped} in all)")
            if s.bad_in_row >= t.max_nonfinite_steps:
                raise DdpmError(f"{s.bad_in_row} non-finite steps in a row: training diverged; lower --lr, "
                                f"enable gradient clipping or check the data (last good checkpoint: {self.paths.ckpt})")
            return None
        s.bad_in_row = 0
        p.step(s.opt)
        s.sched.step()
        s.opt.zero_grad(set_to_none=True)
        s.step += 1
        self.steps_taken += 1
        if s.ema is not None:
            s.ema.update(s.model, s.step)
        return norm

    # --- logging and periodic actions ---

    def _log(self, norm: torch.Tensor, bar) -> None:
        """Mean loss, learning rate and speed since the last log line, to the logger and the history."""
        s, w = self.state, self.window
        loss_sum, images = w.loss_sum, w.images
        if self.ctx.enabled:  # global figures: sums of every rank's share
            totals = self.ctx.all_reduce_sum(torch.stack([loss_sum, loss_sum.new_tensor(float(images))]))
            loss_sum, images = totals[0], int(totals[1].item())
        dt = time.perf_counter() - w.t0
        mean_loss = loss_sum.item() / w.n  # the only host sync, once per log_every steps
        for key, value in (("loss", mean_loss), ("lr", s.opt.param_groups[0]["lr"]), ("img_per_sec", images / dt)):
            self.writer.add_scalar(key, value, s.step)
            s.record(key, value)
        self.writer.add_scalar("grad_norm", float(norm), s.step)
        if self.precision.scaler is not None:
            self.writer.add_scalar("loss_scale", self.precision.scale(), s.step)
        bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{images / dt:.0f}", step=s.step)
        self.window = _Window(torch.zeros((), device=self.device))

    def _mid_epoch_actions(self) -> None:
        """Checkpoint (every N steps, every M minutes, or when stopping) and sample grid inside an epoch."""
        s, t = self.state, self.cfg.train
        timed = t.ckpt_every_minutes and time.monotonic() - self.last_ckpt_time >= 60 * t.ckpt_every_minutes
        if self.stopping or timed or (t.ckpt_every_steps and s.step % t.ckpt_every_steps == 0):
            self._save()
        if t.sample_every_steps and s.step % t.sample_every_steps == 0:
            self._grid(f"step{s.step}")

    def _save(self) -> None:
        if self.ctx.is_main:
            save_training(self.paths.ckpt, self.state, self.cfg, self.ctx.world, len(self.data), self.device,
                          self.task.extra_state())
            self._write_curves()
        self.last_ckpt_time = time.monotonic()

    def _write_curves(self, force: bool = False) -> None:
        """Redraw results/RUN/curves.png (rank 0; at most every CURVES_EVERY_S unless forced); never fatal."""
        due = force or time.monotonic() - self.last_curves_time >= CURVES_EVERY_S
        if not (DRAW_CURVES and self.ctx.is_main and due):
            return
        self.last_curves_time = time.monotonic()
        path = self.paths.results / "curves.png"
        try:
            from .curves import write_curves

            write_curves(self.state.history, path)
        except Exception as exc:  # a plot must never end a training run
            self.log(f"warning: could not draw {path}: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}")

    def _sampling_model(self) -> torch.nn.Module:
        return self.state.ema.model if self.state.ema is not None else self.state.model

    def _grid(self, name: str) -> None:
        if not self.ctx.is_main:  # the other ranks go on and wait for rank 0 at the next all-reduce
            return
        images = self.task.grid(self, name)
        if images is not None:
            self.writer.add_image("samples", make_grid(images), self.state.step, dataformats="HWC")

    def diffusion_grid(self, name: str) -> torch.Tensor:
        """`ddpm train`'s grid: sample_n images of the EMA model with the grid sampler, saved as
        results/RUN/NAME.jpg; returns them (uint8)."""
        t = self.cfg.train
        if self.cfg.model.num_classes:
            images = self._class_grid(name)
        else:
            images = self.diffusion.sample(self._sampling_model(), t.sample_n, sampler=t.sample_sampler,
                                           steps=min(t.sample_steps, self.cfg.diffusion.timesteps), seed=t.seed,
                                           bf16=self.precision.name, progress=False)
            save_images(images, self.paths.results / f"{name}.jpg", min_width=0 if t.native_grids else READABLE_WIDTH)
        return images

    def _class_grid(self, name: str) -> torch.Tensor:
        """A conditional model's grid: one row per class (at least one image each, about sample_n in
        all), unguided, with the class names on the left."""
        from .guidance import class_names, class_rows, generate, save_labelled_grid

        t, m = self.cfg.train, self.cfg.model
        per_class = max(1, t.sample_n // m.num_classes)
        images = generate(self.diffusion, self._sampling_model(), m.num_classes * per_class,
                          labels=class_rows(m.num_classes, per_class), sampler=t.sample_sampler,
                          steps=min(t.sample_steps, self.cfg.diffusion.timesteps), seed=t.seed,
                          bf16=self.precision.name)
        save_labelled_grid(images, class_names(m), per_class, self.paths.results / f"{name}.jpg",
                           min_width=0 if t.native_grids else READABLE_WIDTH)
        return images

    def _evaluate(self) -> None:
        """FID/KID of the EMA model against the training images, logged under eval/ (rank 0)."""
        if not self.ctx.is_main:
            return
        t, step = self.cfg.train, self.state.step
        if self.metric is None:
            from .scoring import TrainingMetric

            self.metric = TrainingMetric(self.data.images, t.eval_extractor, t.eval_n, t.eval_sampler,
                                         min(t.eval_steps, self.cfg.diffusion.timesteps), t.seed, device=self.device)
        values = self.metric(self._sampling_model(), self.diffusion, self.precision.name)
        for key, value in values.items():
            self.writer.add_scalar(f"eval/{key}", value, step)
        self.state.record("fid", values["fid"])
        self.log(f"step {step}: FID {values['fid']:.3f} ({self.metric.extractor.name}), KID {values['kid']:.5f}")
