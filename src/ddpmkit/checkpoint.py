"""One-file checkpoints: written atomically, loaded without executing pickled code.

A checkpoint is a dict of tensors and plain Python values, so `torch.load(path,
weights_only=True)` reads it. It keeps the seed tutorial's keys (`model_state_dict`,
`optimizer_state_dict`, `epoch`) and adds everything an exact resume needs plus the full
config, from which `loading.load_model` rebuilds the network alone. The schema -- which keys a
training checkpoint holds and what they mean -- is written by `training_checkpoint` and read by
`restore_training`, here and nowhere else. A multi-process run is saved by rank 0 alone; its
position in the epoch is also stored as images, so that a resume with another number of
processes (or batch size) continues where it stopped (`resume_batch`).
"""
from __future__ import annotations

import errno
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .config import Config, from_dict, validate
from .errors import DdpmError

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "config", "model_state_dict")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never a torn file.
    A failed write (disk full, no permission) removes the temporary file and raises DdpmError;
    the previous file is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if not isinstance(exc, (OSError, RuntimeError)):
            raise  # e.g. a second Ctrl-C: the temp file is gone, the old checkpoint intact
        reason = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else " ".join(str(exc).split())
        hint = {errno.ENOSPC: "free some disk space", errno.EACCES: "check the folder's permissions",
                errno.EROFS: "choose a writable --workdir"}.get(getattr(exc, "errno", None), "check the output folder")
        raise DdpmError(f"cannot write {path}: {reason}; {hint} (the previous checkpoint is intact)") from None
    # Temp files of processes killed mid-save (SIGKILL cannot be caught); the run lock makes us the only writer.
    for stale in path.parent.glob(f".{path.name}.tmp*"):
        try:
            stale.unlink()
        except OSError:
            pass


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    accept_seed: bool = False) -> dict[str, Any]:
    """Load and check a ddpmkit checkpoint; every failure is a one-line DdpmError.

    With `accept_seed`, the seed tutorial's checkpoint is accepted too, as the ddpmkit checkpoint
    `seed_checkpoint` makes of it (for sampling, export and --init-from; never for a resume)."""
    path = Path(path)
    if not path.is_file():
        raise DdpmError(f"checkpoint {path} not found; pass the path of a ckpt.pt written by `ddpm train`")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since PyTorch 1.6
        raise DdpmError(f"checkpoint {path} is truncated or not a PyTorch file; use an intact checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise DdpmError(f"refusing to load {path}: it contains Python objects other than tensors, which could "
                            "run code; only load checkpoints written by ddpmkit or from sources you trust") from None
        raise DdpmError(f"checkpoint {path} is corrupt ({' '.join(str(exc).split())[:120]}); "
                        "use an earlier checkpoint or retrain") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise DdpmError(f"checkpoint {path} is truncated or not a PyTorch file "
                        f"({' '.join(str(exc).split())[:120]}); use an intact checkpoint") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        seed = seed_checkpoint(ckpt)
        if seed is not None and accept_seed:
            return seed
        if seed is not None:
            raise DdpmError(f"{path} is the seed tutorial's checkpoint, not a ddpmkit run: `ddpm sample --ckpt` "
                            "samples from it, `ddpm train --init-from PATH --model-size seed` fine-tunes it")
        raise DdpmError(f"{path} is not a ddpmkit checkpoint (missing {', '.join(REQUIRED_KEYS)})")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise DdpmError(f"{path} has checkpoint format {ckpt['format_version']}, newer than this ddpmkit's "
                        f"{FORMAT_VERSION}; upgrade ddpmkit")
    return ckpt


SEED_KEYS = ("model_state_dict", "optimizer_state_dict", "epoch")  # what the seed tutorial's ckpt.pt holds


def seed_checkpoint(obj: Any) -> dict[str, Any] | None:
    """The seed tutorial's checkpoint {model_state_dict, optimizer_state_dict, epoch} as a ddpmkit
    checkpoint, or None when `obj` is not one.

    Its network is the seed UNet (`--model-size seed`, whose parameter names ddpmkit keeps) and its
    diffusion the seed's: linear betas 1e-4..0.02 over 1000 steps, eps-prediction, 64 px; the image
    channels are read from the first convolution. The seed's sampler does not clip x0, so neither
    does this config. DataParallel's `module.` prefixes are dropped.
    """
    from .config import preset

    if not isinstance(obj, dict) or any(k not in obj for k in SEED_KEYS) or "format_version" in obj:
        return None
    state = obj["model_state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return None
    state = {k.removeprefix("module."): v for k, v in plain_state(state).items()}
    first = state.get("inc.double_conv.0.weight")
    if first is None or first.ndim != 4 or "outc.weight" not in state:
        return None
    cfg = Config(model=preset("seed"))
    cfg.data.image_size, cfg.data.channels = 64, int(first.shape[1])
    cfg.diffusion.timesteps, cfg.diffusion.schedule, cfg.diffusion.prediction = 1000, "linear", "eps"
    cfg.diffusion.beta_start, cfg.diffusion.beta_end, cfg.diffusion.clip_denoised = 1e-4, 0.02, False
    return {"format_version": FORMAT_VERSION, "config": cfg.to_dict(), "model_state_dict": state,
            "ema_state_dict": None, "epoch": obj["epoch"], "seed_tutorial": True}


def config_of(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> Config:
    try:
        if not isinstance(ckpt["config"], dict):
            raise DdpmError("the config is not a table")
        return validate(from_dict(ckpt["config"]))
    except DdpmError as exc:
        raise DdpmError(f"{path} holds an invalid config: {exc}") from None


# --- RNG state, as tensors and plain values that weights_only loading accepts -----------------

def rng_state(device: str | torch.device | None = None) -> dict[str, Any]:
    """Every RNG a training step draws from; with a CUDA `device`, also that device's own state
    under "device", so that a run resumed on another GPU (another rank) continues the same stream."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
        if device is not None and torch.device(device).type == "cuda":
            state["device"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: str | torch.device | None = None) -> None:
    """Restore `rng_state()`; the training device's generator gets the stored "device" state
    (older checkpoints: the first GPU's), whichever GPU this process uses."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        own = state.get("device", state["cuda"][0] if state.get("cuda") else None)
        if own is not None:
            torch.cuda.set_rng_state(own.cpu(), device)


# --- position in an epoch --------------------------------------------------------------------

def resume_batch(ckpt: dict[str, Any], n_images: int, batch_size: int, grad_accum: int,
                 world: int = 1) -> tuple[int, str | None]:
    """The batch of the checkpoint's epoch to continue from, for this run's batch layout.

    A checkpoint stores its position as `batch_in_epoch` global batches of batch_size * world
    images. With the same batch size, grad_accum and number of processes that number is used as
    it is (exact resume). Otherwise the position goes through the images consumed: global batch
    i covers images [i*g, (i+1)*g) of the epoch's fixed order (g = batch_size * world), so the
    run restarts at floor(images / g), rounded down to a multiple of grad_accum to keep whole
    optimizer steps. When that does not divide evenly, up to g * grad_accum - 1 images of the
    epoch are seen a second time; none is skipped. Returns (batch, a note when converted).
    """
    batch = int(ckpt.get("batch_in_epoch", 0))
    if batch == 0:
        return 0, None
    old = ckpt.get("config", {}).get("train", {})
    old_bs, old_accum = int(old.get("batch_size", batch_size)), int(old.get("grad_accum", grad_accum))
    old_world = int(ckpt.get("world_size", 1))
    if (old_bs, old_accum, old_world) == (batch_size, grad_accum, world):
        return batch, None
    images = int(ckpt.get("images_in_epoch", min(batch * old_bs * old_world, n_images)))
    g = batch_size * world
    new = images // g // grad_accum * grad_accum
    note = (f"the checkpoint was written with {old_world} process(es) x batch {old_bs} x accumulation {old_accum}, "
            f"this run uses {world} x {batch_size} x {grad_accum}: continuing the epoch after {images} images at "
            f"batch {new}" + (f" ({images - new * g} images are seen again)" if new * g != images else ""))
    return new, note


# --- models ----------------------------------------------------------------------------------

def model_from_config(cfg: Config, device: str | torch.device = "cpu"):
    """Build an untrained network and its Diffusion on `device` from a config whose data.channels is resolved.

    For a latent run (config.autoencoder.path set) both work on latents; `loading.load_model`
    then attaches the stored decoder (latent.attach_decoder)."""
    from .diffusion import Diffusion
    from .models.registry import build_model

    channels, (h, w) = cfg.data.channels or 3, cfg.data.hw
    if cfg.autoencoder.path:  # latent diffusion (latent.py): the network works on the autoencoder's latents
        f = cfg.autoencoder.downsample
        channels, h, w = cfg.autoencoder.latent_channels, h // f, w // f
    model = build_model(cfg.model, channels, channels * 2 if cfg.diffusion.learn_sigma else channels)
    diffusion = Diffusion.from_config(cfg.diffusion, h if h == w else (h, w), channels, device)
    return model.to(device), diffusion


COMPILED_PREFIX = "_orig_mod."  # what torch.compile's wrapper puts before every state_dict key


def plain_state(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict without torch.compile's `_orig_mod.` key prefixes (at any depth), so weights
    saved from a compiled network load into a plain one and the other way round."""
    return {k.replace(COMPILED_PREFIX, ""): v for k, v in state.items()}


def load_state(model: torch.nn.Module, state: dict, path: str | Path, what: str = "model") -> None:
    """load_state_dict with a one-line message when the weights do not fit the model; a compiled
    `model` and weights saved from one are both accepted (`plain_state`)."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper: load into the network itself
    try:
        model.load_state_dict(plain_state(state))
    except RuntimeError as exc:
        first = str(exc).split("\n")[0] + " " + " ".join(str(exc).split("\n")[1:2]).strip()
        raise DdpmError(f"the {what} weights in {path} do not match its model config ({first[:200]}); "
                        "the checkpoint is damaged or was made by another version") from None


# --- the training checkpoint's schema ----------------------------------------------------------
# `state` below is a train.TrainState: model, ema (an EMA or None), opt, sched, epoch (the epoch
# to continue in), batch (the next batch of that epoch), step, skipped and history.

HISTORY_KEYS = ("loss", "lr", "img_per_sec", "fid")


def new_history() -> dict[str, list[tuple[int, float]]]:
    """The logged curves of a run: for each key, a list of (global step, value)."""
    return {key: [] for key in HISTORY_KEYS}


def training_checkpoint(state, cfg: Config, world: int, n_images: int, device: torch.device,
                        task_state: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint dict of a training state; `restore_training` reads it back. `task_state` is a
    non-default task's own content (tasks.Task.extra_state), stored as "task_state" when not empty."""
    ema = plain_state(state.ema.model.state_dict()) if state.ema is not None else None
    precision = getattr(state, "precision", None)
    return {
        "format_version": FORMAT_VERSION,
        "ddpmkit_version": __version__,
        "config": cfg.to_dict(),
        "model_state_dict": plain_state(state.model.state_dict()),
        "ema_state_dict": ema,
        "optimizer_state_dict": state.opt.state_dict(),
        "scheduler_state_dict": state.sched.state_dict(),
        "epoch": state.epoch - 1,  # the seed's key: last completed epoch (-1 before the first)
        "next_epoch": state.epoch,
        "batch_in_epoch": state.batch,
        "images_in_epoch": min(state.batch * cfg.train.batch_size * world, n_images),
        "world_size": world,
        "global_step": state.step,
        "nonfinite_skipped": state.skipped,
        "precision_state": precision.state_dict() if precision is not None else None,  # fp16: GradScaler's state
        "history": {key: [(int(s), float(v)) for s, v in points] for key, points in state.history.items()},
        "rng_state": rng_state(device),
        **({"task_state": task_state} if task_state else {}),
    }


def save_training(path: Path, state, cfg: Config, world: int, n_images: int, device: torch.device,
                  task_state: dict[str, Any] | None = None) -> None:
    """Write the training state to `path` atomically; non-finite weights are refused, not written."""
    # A step can pass the gradient check and still overflow the weights (absurd lr / decay).
    nets = [state.model] + ([state.ema.model] if state.ema is not None else [])
    if not all(torch.isfinite(p).all() for net in nets for p in net.parameters()):
        raise DdpmError(f"the weights became non-finite at step {state.step} (learning rate or weight decay too "
                        f"large?); not saving them, the last good checkpoint is {path}")
    atomic_save(training_checkpoint(state, cfg, world, n_images, device, task_state), path)


def position_of(ckpt: dict[str, Any] | None) -> tuple | None:
    """(global step, next epoch, batch in epoch) of a checkpoint; None for a fresh run."""
    return None if ckpt is None else (ckpt.get("global_step"), ckpt.get("next_epoch"), ckpt.get("batch_in_epoch"))


def check_channels(ckpt: dict[str, Any] | None, channels: int) -> None:
    """Refuse to resume a run on data with another number of channels than it was trained on."""
    stored = None if ckpt is None else ckpt["config"]["data"]["channels"]
    if stored not in (None, 0, channels):
        raise DdpmError(f"the data now has {channels} channels but the run was trained on {stored}; "
                        "use --fresh or another --run-name")


def restore_training(state, ckpt: dict[str, Any], cfg: Config, n_images: int, world: int,
                     device: torch.device, path: Path) -> str | None:
    """Load a checkpoint into a freshly built training state; returns a note when the data
    position had to be converted to this run's batch layout (see `resume_batch`)."""
    t = cfg.train
    load_state(state.model, ckpt["model_state_dict"], path)
    if state.ema is not None and ckpt.get("ema_state_dict") is not None:
        load_state(state.ema.model, ckpt["ema_state_dict"], path, "EMA")
    elif state.ema is not None:
        state.ema.model.load_state_dict(state.model.state_dict())
    # The moments and step counts are the same for every AdamW kernel; the kernel (fused or not,
    # train.adamw) stays this build's, so a checkpoint written where the fused one was missing
    # resumes fused here and vice versa (load_state_dict would otherwise take the stored flags).
    kernel = {key: state.opt.param_groups[0].get(key) for key in ("fused", "foreach")}
    saved = ckpt["optimizer_state_dict"]
    state.opt.load_state_dict({**saved, "param_groups": [{**g, **kernel} for g in saved["param_groups"]]})
    sched = state.sched
    sched.load_state_dict(ckpt["scheduler_state_dict"])
    sched.base_lrs = [t.lr] * len(state.opt.param_groups)  # --lr and --weight-decay may change on resume
    for group in state.opt.param_groups:
        group["initial_lr"], group["weight_decay"] = t.lr, t.weight_decay
        group["lr"] = t.lr * sched.lr_lambdas[0](sched.last_epoch)
    set_rng_state(ckpt["rng_state"], device)
    state.epoch, state.step = ckpt["next_epoch"], ckpt["global_step"]
    state.batch, note = resume_batch(ckpt, n_images, t.batch_size, t.grad_accum, world)
    state.skipped = ckpt.get("nonfinite_skipped", 0)
    if getattr(state, "precision", None) is not None and ckpt.get("precision_state"):
        state.precision.load_state_dict(ckpt["precision_state"])
    stored = ckpt.get("history") or {}  # absent before the curves were stored
    state.history = {key: [(int(s), float(v)) for s, v in stored.get(key, [])] for key in HISTORY_KEYS}
    return note
