"""The training loop: data -> loss -> AdamW step -> EMA, with grids, logs and exact resume.

A run lives in WORKDIR/models/RUN/ckpt.pt (everything a resume needs), WORKDIR/results/RUN/
(sample grids drawn with the EMA weights) and WORKDIR/runs/RUN/ (TensorBoard). Running the same
run name again resumes from the checkpoint, at the exact batch where it stopped.

Under torchrun (`torchrun --nproc_per_node N -m ddpmkit.cli train ...`) the same loop runs with
DistributedDataParallel: each process takes rows rank::N of every global batch of batch_size * N
images, so the effective batch is batch_size * grad_accum * N. All processes share one RNG stream
(`distributed.SharedBatchNoise` draws the noise for the global batch and keeps this process's
rows), which makes an N-process run the computation of one process with batch_size * N, up to
float rounding of the gradient all-reduce. Only rank 0 keeps the EMA and writes checkpoints,
grids, TensorBoard logs and progress; a stop signal on any process stops all at the same step.
"""
from __future__ import annotations

import contextlib
import copy
import random
import dataclasses
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import __version__, distributed
from .checkpoint import (FORMAT_VERSION, atomic_save, config_of, load_checkpoint, load_state, model_from_config,
                         resume_batch, rng_state, set_rng_state)
from .config import Config, apply_overrides, validate
from .data import epoch_batches, load_data, num_batches
from .errors import DdpmError
from .images import make_grid, save_images
from .losses import make_loss


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
    """Exponential moving average of the weights, with the usual warm-up of the decay."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        ema_p = [p for p in self.model.parameters()]
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1 - decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


# --- preparing a run -------------------------------------------------------------------------

def prepare(overrides: dict[str, dict[str, Any]], fresh: bool = False, log: Callable = print):
    """Resolve the config of a run and load its checkpoint when resuming.

    When WORKDIR/models/RUN/ckpt.pt exists (and not `fresh`), the stored config is the base and
    only the given overrides change it; changing the model, the diffusion or the image format of
    an existing run is an error.
    """
    cfg = validate(apply_overrides(Config(), overrides))
    paths = RunPaths.of(cfg)
    if fresh or not paths.ckpt.exists():
        return cfg, None
    ckpt = load_checkpoint(paths.ckpt)
    stored = config_of(ckpt, paths.ckpt)
    cfg = validate(apply_overrides(stored, overrides))
    if cfg.data.channels == 0:
        cfg.data.channels = stored.data.channels
    for section, fields in (("model", None), ("diffusion", None), ("data", ("image_size", "channels"))):
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

class _NoWriter:
    """Stands in for the SummaryWriter on ranks other than 0."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def add_image(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _quiet(*args, **kwargs) -> None:
    pass


def train(cfg: Config, ckpt: dict[str, Any] | None = None, log: Callable = tqdm.write,
          progress: bool = True) -> dict[str, Any]:
    """Train until cfg.train.epochs are done (or a stop signal); returns a summary dict.

    Started by torchrun with WORLD_SIZE > 1, this joins the process group (NCCL on GPU, gloo on
    CPU), trains with DistributedDataParallel and leaves the group at the end; a failed peer
    becomes a DdpmError here instead of a hang.
    """
    ctx = distributed.setup(cfg.train.device)
    try:
        with distributed.translate_errors(ctx):
            return _train(cfg, ckpt, ctx, log if ctx.is_main else _quiet, progress and ctx.is_main)
    finally:
        ctx.close()


def _train(cfg: Config, ckpt: dict[str, Any] | None, ctx: distributed.Context, log: Callable,
           progress: bool) -> dict[str, Any]:
    t_cfg = cfg.train
    device = ctx.device if ctx.enabled else resolve_device(t_cfg.device)
    paths = RunPaths.of(cfg)
    main = ctx.is_main
    resume_key = None if ckpt is None else (ckpt.get("global_step"), ckpt.get("next_epoch"), ckpt.get("batch_in_epoch"))
    ctx.check_same("run config", cfg.to_dict())
    ctx.check_same(f"checkpoint {paths.ckpt} (global step, epoch, batch)", resume_key)
    with ctx.local_main_first() if cfg.data.cache_dir else contextlib.nullcontext():  # one process builds the cache
        data = load_data(cfg.data.path, cfg.data.image_size, cfg.data.channels, cfg.data.cache_dir, log)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, channels=data.channels))
    if ckpt is not None and ckpt["config"]["data"]["channels"] not in (0, data.channels):
        raise DdpmError(f"the data now has {data.channels} channels but the run was trained on "
                        f"{ckpt['config']['data']['channels']}; use --fresh or another --run-name")

    torch.manual_seed(t_cfg.seed)  # the same on every rank: one shared RNG stream
    random.seed(t_cfg.seed)
    np.random.seed(t_cfg.seed % 2**32)
    model, diffusion = model_from_config(cfg, device)
    model.train()
    ema = EMA(model, t_cfg.ema_decay) if t_cfg.ema_decay > 0 and main else None  # identical weights: rank 0 suffices
    opt = torch.optim.AdamW(model.parameters(), lr=t_cfg.lr, weight_decay=t_cfg.weight_decay)
    warmup = t_cfg.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    dc = cfg.diffusion
    loss_fn = make_loss(diffusion, dc.loss_weighting, dc.min_snr_gamma, dc.vlb_weight, dc.p_mean, dc.p_std)
    world, accum = ctx.world, t_cfg.grad_accum
    global_batch = t_cfg.batch_size * world
    n_batches = num_batches(len(data), t_cfg.batch_size, world)

    epoch, batch0, step, skipped_total = 0, 0, 0, 0
    if ckpt is not None:
        load_state(model, ckpt["model_state_dict"], paths.ckpt)
        if ema is not None and ckpt.get("ema_state_dict") is not None:
            load_state(ema.model, ckpt["ema_state_dict"], paths.ckpt, "EMA")
        elif ema is not None:
            ema.model.load_state_dict(model.state_dict())
        opt.load_state_dict(ckpt["optimizer_state_dict"])
        sched.load_state_dict(ckpt["scheduler_state_dict"])
        sched.base_lrs = [t_cfg.lr] * len(opt.param_groups)  # --lr and --weight-decay may change on resume
        for group in opt.param_groups:
            group["initial_lr"], group["weight_decay"] = t_cfg.lr, t_cfg.weight_decay
            group["lr"] = t_cfg.lr * sched.lr_lambdas[0](sched.last_epoch)
        set_rng_state(ckpt["rng_state"], device)
        epoch, step = ckpt["next_epoch"], ckpt["global_step"]
        batch0, converted = resume_batch(ckpt, len(data), t_cfg.batch_size, accum, world)
        skipped_total = ckpt.get("nonfinite_skipped", 0)
        log(f"resuming run '{t_cfg.run_name}' from {paths.ckpt}: epoch {epoch}, batch {batch0}, step {step}")
        if converted:
            log(f"note: {converted}")
    else:
        log(f"starting run '{t_cfg.run_name}': {len(data)} images of {cfg.data.image_size}x{cfg.data.image_size}"
            f"x{data.channels} from {cfg.data.path}, model '{cfg.model.size}' "
            f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters) on {device}")
    if ctx.enabled:
        log(f"distributed: {world} processes ({dist.get_backend()}), effective batch "
            f"{t_cfg.batch_size} x {accum} x {world} = {global_batch * accum}")
        # Built after loading the checkpoint; DDP also broadcasts rank 0's weights here. Gradients
        # live in the all-reduce buckets (no second copy of them).
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      gradient_as_bucket_view=True)
    else:
        net = model

    if main:
        from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to import

        writer = SummaryWriter(str(paths.runs))
    else:
        writer = _NoWriter()
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if t_cfg.bf16 else contextlib.nullcontext())
    params = list(model.parameters())
    bad_in_row = 0
    last_ckpt_time = time.monotonic()
    status = "finished"
    stopping = False

    def save(next_epoch: int, batch_in_epoch: int) -> None:
        if not main:
            return
        # A step can pass the gradient check and still overflow the weights (absurd lr / decay).
        nets = [model] + ([ema.model] if ema is not None else [])
        if not all(torch.isfinite(p).all() for net_ in nets for p in net_.parameters()):
            raise DdpmError(f"the weights became non-finite at step {step} (learning rate or weight decay too "
                            f"large?); not saving them, the last good checkpoint is {paths.ckpt}")
        atomic_save({
            "format_version": FORMAT_VERSION,
            "ddpmkit_version": __version__,
            "config": cfg.to_dict(),
            "model_state_dict": model.state_dict(),
            "ema_state_dict": ema.model.state_dict() if ema is not None else None,
            "optimizer_state_dict": opt.state_dict(),
            "scheduler_state_dict": sched.state_dict(),
            "epoch": next_epoch - 1,  # the seed's key: last completed epoch (-1 before the first)
            "next_epoch": next_epoch,
            "batch_in_epoch": batch_in_epoch,
            "images_in_epoch": min(batch_in_epoch * global_batch, len(data)),
            "world_size": world,
            "global_step": step,
            "nonfinite_skipped": skipped_total,
            "rng_state": rng_state(device),
        }, paths.ckpt)

    def grid(name: str) -> None:
        if not main:  # the other ranks go on and wait for rank 0 at the next all-reduce
            return
        sample_model = ema.model if ema is not None else model
        images = diffusion.sample(sample_model, t_cfg.sample_n, sampler=t_cfg.sample_sampler,
                                  steps=min(t_cfg.sample_steps, cfg.diffusion.timesteps), seed=t_cfg.seed,
                                  bf16=t_cfg.bf16, progress=False)
        save_images(images, paths.results / f"{name}.jpg")
        writer.add_image("samples", make_grid(images), step, dataformats="HWC")

    metric = None

    def evaluate_now() -> None:
        """FID/KID of the EMA model against the training images, logged under eval/ (rank 0)."""
        nonlocal metric
        if not main:
            return
        if metric is None:
            from .scoring import TrainingMetric

            metric = TrainingMetric(data.images, t_cfg.eval_extractor, t_cfg.eval_n, t_cfg.eval_sampler,
                                    min(t_cfg.eval_steps, cfg.diffusion.timesteps), t_cfg.seed, device=device)
        values = metric(ema.model if ema is not None else model, diffusion, t_cfg.bf16)
        for key, value in values.items():
            writer.add_scalar(f"eval/{key}", value, step)
        log(f"step {step}: FID {values['fid']:.3f} ({metric.extractor.name}), KID {values['kid']:.5f}")

    def micro_loss(b: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to backpropagate before the 1/group_n scaling, its detached value for the log)."""
        if not ctx.enabled:
            with autocast:
                loss = loss_fn(net, x).mean()
            return loss, loss.detach()
        g = min(global_batch, len(data) - b * global_batch)  # the last global batch may be smaller
        with autocast, distributed.SharedBatchNoise(ctx.rank, world, g, x.shape[0]):
            per_sample = loss_fn(net, x)
        # DDP averages gradients over the ranks, so sum * world / g gives the gradient of the
        # global batch's mean loss even when ranks hold unequal shares (or none) of it.
        local = per_sample.sum() / g
        return local * world, local.detach()

    with _StopFlag() as stop:
        while epoch < t_cfg.epochs and not (stopping := ctx.any(stop.requested)):
            bar = tqdm(total=n_batches, initial=batch0, desc=f"epoch {epoch}", unit="batch", disable=not progress,
                       leave=False, dynamic_ncols=True)
            loss_sum, n_loss, imgs, t0 = torch.zeros((), device=device), 0, 0, time.perf_counter()
            b = batch0
            for b, x in enumerate(epoch_batches(data, t_cfg.batch_size, t_cfg.seed, epoch, batch0, cfg.data.hflip,
                                                rank=ctx.rank, world=world, device=device), start=batch0):
                group_start = b // accum * accum
                group_n = min(accum, n_batches - group_start)
                last_of_group = b + 1 == group_start + group_n
                # Gradients of the group's earlier micro-batches stay local; the last one all-reduces them all.
                with net.no_sync() if ctx.enabled and not last_of_group else contextlib.nullcontext():
                    loss, logged = micro_loss(b, x)
                    (loss / group_n).backward()
                loss_sum += logged
                n_loss += 1
                imgs += x.shape[0]
                bar.update(1)
                if not last_of_group:
                    continue
                # Optimizer step; a non-finite gradient skips it (and is counted). After the
                # all-reduce every rank holds the same gradients, so all ranks decide alike.
                norm = torch.nn.utils.clip_grad_norm_(params, t_cfg.grad_clip if t_cfg.grad_clip > 0 else math.inf)
                if not torch.isfinite(norm):
                    opt.zero_grad(set_to_none=True)
                    bad_in_row += 1
                    skipped_total += 1
                    log(f"warning: non-finite loss or gradient at step {step}; step skipped "
                        f"({bad_in_row} in a row, {skipped_total} in all)")
                    if bad_in_row >= t_cfg.max_nonfinite_steps:
                        writer.close()
                        raise DdpmError(f"{bad_in_row} non-finite steps in a row: training diverged; lower --lr, "
                                        f"enable gradient clipping or check the data (last good checkpoint: {paths.ckpt})")
                    continue
                bad_in_row = 0
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                if ema is not None:
                    ema.update(model, step)
                stopping = ctx.any(stop.requested)  # a signal on any rank stops all ranks at this step
                if step % t_cfg.log_every == 0:
                    if ctx.enabled:  # global figures: sums of every rank's share
                        totals = ctx.all_reduce_sum(torch.stack([loss_sum, loss_sum.new_tensor(float(imgs))]))
                        loss_sum, imgs = totals[0], int(totals[1].item())
                    dt = time.perf_counter() - t0
                    mean_loss = loss_sum.item() / n_loss  # the only host sync, once per log_every steps
                    writer.add_scalar("loss", mean_loss, step)
                    writer.add_scalar("lr", opt.param_groups[0]["lr"], step)
                    writer.add_scalar("grad_norm", float(norm), step)
                    writer.add_scalar("img_per_sec", imgs / dt, step)
                    bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{imgs / dt:.0f}", step=step)
                    loss_sum = torch.zeros((), device=device)
                    n_loss, imgs, t0 = 0, 0, time.perf_counter()
                if t_cfg.eval_every_steps and step % t_cfg.eval_every_steps == 0:
                    evaluate_now()
                done_epoch = b + 1 == n_batches
                if not done_epoch:
                    timed = t_cfg.ckpt_every_minutes and time.monotonic() - last_ckpt_time >= 60 * t_cfg.ckpt_every_minutes
                    if stopping or timed or (t_cfg.ckpt_every_steps and step % t_cfg.ckpt_every_steps == 0):
                        save(epoch, b + 1)
                        last_ckpt_time = time.monotonic()
                    if t_cfg.sample_every_steps and step % t_cfg.sample_every_steps == 0:
                        grid(f"step{step}")
                    if stopping:
                        break
            bar.close()
            if stopping and b + 1 < n_batches:
                status = "stopped"
                break
            epoch += 1
            batch0 = 0
            save(epoch, 0)
            last_ckpt_time = time.monotonic()
            if t_cfg.sample_every_epochs and epoch % t_cfg.sample_every_epochs == 0:
                grid(str(epoch - 1))
            if t_cfg.sample_every_steps and step % t_cfg.sample_every_steps == 0:
                grid(f"step{step}")
        else:
            if stopping and epoch < t_cfg.epochs:
                status = "stopped"
    writer.close()
    ctx.barrier()  # leave together, after rank 0's last checkpoint and grid
    if status == "stopped":
        log(f"stopped at epoch {epoch}, step {step}; checkpoint saved to {paths.ckpt}. "
            f"Run the same `ddpm train` command again to resume.")
    return {"status": status, "epoch": epoch, "step": step, "ckpt": paths.ckpt, "nonfinite_skipped": skipped_total}
