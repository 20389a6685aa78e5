"""One-file checkpoints: written atomically, loaded without executing pickled code.

A checkpoint is a dict of tensors and plain Python values, so `torch.load(path,
weights_only=True)` reads it. It keeps the seed tutorial's keys (`model_state_dict`,
`optimizer_state_dict`, `epoch`) and adds everything an exact resume needs plus the full
config, from which `load_model` rebuilds the network alone.
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

from .config import Config, from_dict
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
    except (OSError, RuntimeError) as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        reason = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else " ".join(str(exc).split())
        hint = {errno.ENOSPC: "free some disk space", errno.EACCES: "check the folder's permissions",
                errno.EROFS: "choose a writable --workdir"}.get(getattr(exc, "errno", None), "check the output folder")
        raise DdpmError(f"cannot write {path}: {reason}; {hint} (the previous checkpoint is intact)") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a ddpmkit checkpoint; every failure is a one-line DdpmError."""
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
        raise DdpmError(f"{path} is not a ddpmkit checkpoint (missing {', '.join(REQUIRED_KEYS)})")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise DdpmError(f"{path} has checkpoint format {ckpt['format_version']}, newer than this ddpmkit's "
                        f"{FORMAT_VERSION}; upgrade ddpmkit")
    return ckpt


def config_of(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> Config:
    try:
        return from_dict(ckpt["config"])
    except DdpmError as exc:
        raise DdpmError(f"{path} holds an invalid config: {exc}") from None


# --- RNG state, as tensors and plain values that weights_only loading accepts -----------------

def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# --- models ----------------------------------------------------------------------------------

def model_from_config(cfg: Config, device: str | torch.device = "cpu"):
    """Build an untrained network and its Diffusion on `device` from a config whose data.channels is resolved."""
    from .diffusion import Diffusion
    from .models.registry import build_model

    channels = cfg.data.channels or 3
    model = build_model(cfg.model, channels, channels * 2 if cfg.diffusion.learn_sigma else channels)
    diffusion = Diffusion.from_config(cfg.diffusion, cfg.data.image_size, channels, device)
    return model.to(device), diffusion


def load_state(model: torch.nn.Module, state: dict, path: str | Path, what: str = "model") -> None:
    """load_state_dict with a one-line message when the weights do not fit the model."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).split("\n")[0] + " " + " ".join(str(exc).split("\n")[1:2]).strip()
        raise DdpmError(f"the {what} weights in {path} do not match its model config ({first[:200]}); "
                        "the checkpoint is damaged or was made by another version") from None


def load_model(path: str | Path, device: str | torch.device = "cpu", ema: bool = True):
    """Rebuild (model, diffusion, config) from a checkpoint alone; the EMA weights by default.

    The model is in eval mode on `device`; `diffusion.sample(model, n)` draws images from it.
    """
    ckpt = load_checkpoint(path)
    cfg = config_of(ckpt, path)
    model, diffusion = model_from_config(cfg, device)
    key = "ema_state_dict" if ema and ckpt.get("ema_state_dict") is not None else "model_state_dict"
    load_state(model, ckpt[key], path, "EMA" if key.startswith("ema") else "model")
    return model.eval(), diffusion, cfg
