"""Where a training run logs its scalars and sample grids: TensorBoard, Weights & Biases, or nowhere.

The trainer holds one logger and calls the three methods of TensorBoard's ``SummaryWriter`` on it:
``add_scalar(tag, value, step)``, ``add_image(tag, image, step, dataformats="HWC")`` and
``close()``. :func:`make_logger` picks the backend from ``train.logger`` (``--logger``); only rank 0
gets a real one, the other processes of a torchrun job a :class:`NullLogger`.

* ``tensorboard`` (default): event files in WORKDIR/runs/RUN/.
* ``wandb``: one W&B run per training run, its files under WORKDIR/runs/RUN/wandb/ (or $WANDB_DIR),
  project $WANDB_PROJECT or "ddpmkit". The run id is kept in WORKDIR/runs/RUN/wandb_run_id, and a
  resumed training run (one that starts from its checkpoint) continues that W&B run. Set
  WANDB_MODE=offline to log without an account and upload later with ``wandb sync``. Needs the
  optional extra: ``pip install 'ddpmkit[wandb]'``.
* ``none``: nothing is written.
"""
from __future__ import annotations

import importlib
import os
import secrets
import string
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import DdpmError

LOGGERS = ("tensorboard", "wandb", "none")
WANDB_HINT = "the W&B logger needs the 'wandb' extra: pip install 'ddpmkit[wandb]'"
RUN_ID_FILE = "wandb_run_id"  # in WORKDIR/runs/RUN: the W&B run that a resume continues
_ID_CHARS = string.ascii_lowercase + string.digits  # W&B run ids: letters and digits


class NullLogger:
    """Logs nothing: `--logger none`, and every rank but 0 of a torchrun job."""

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        pass

    def add_image(self, tag: str, image: Any, step: int, dataformats: str = "HWC") -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """TensorBoard event files in `folder` (WORKDIR/runs/RUN)."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to import

        self.writer = SummaryWriter(str(folder))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def add_image(self, tag: str, image: Any, step: int, dataformats: str = "HWC") -> None:
        self.writer.add_image(tag, image, step, dataformats=dataformats)

    def close(self) -> None:
        self.writer.close()


def import_wandb():
    """The wandb module, or a one-line DdpmError naming the extra to install."""
    try:
        return importlib.import_module("wandb")
    except ImportError:
        raise DdpmError(WANDB_HINT) from None


def _read_run_id(path: Path) -> str | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return text if text and all(c in _ID_CHARS for c in text) else None


def _write_run_id(path: Path, run_id: str) -> None:
    """Write the id atomically (temporary file, then rename): a crash never leaves half an id."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(run_id + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class WandbLogger:
    """A Weights & Biases run. Scalars go into one history row per training step, plotted against
    a "step" key of their own (not W&B's internal counter), so the rows a resumed run logs again
    after the last checkpoint are kept rather than dropped as out of order.

    A failure of the W&B backend after the run started is reported once and logging stops; it
    never ends the training run.
    """

    def __init__(self, folder: Path, run_name: str, config: dict[str, Any] | None = None, resume: bool = False,
                 log: Callable[[str], None] = print, wandb=None):
        self.wandb = wandb if wandb is not None else import_wandb()
        self.log = log
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / RUN_ID_FILE
        run_id = _read_run_id(id_file) if resume else None
        self.resumed = run_id is not None
        if run_id is None:
            run_id = "".join(secrets.choice(_ID_CHARS) for _ in range(8))
        kwargs: dict[str, Any] = dict(id=run_id, resume="allow", name=run_name,
                                      project=os.environ.get("WANDB_PROJECT") or "ddpmkit")
        if not os.environ.get("WANDB_DIR"):
            kwargs["dir"] = str(folder)
        try:
            self.run = self.wandb.init(**kwargs)
            if config:
                # a resume may change --epochs, --lr, ...: the stored config is updated, not refused
                self.run.config.update(config, allow_val_change=True)
        except Exception as exc:  # noqa: BLE001 - wandb raises many types (UsageError, CommError, ...)
            msg = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise DdpmError(f"could not start the W&B run ({msg}); run `wandb login`, set WANDB_MODE=offline, "
                            f"or use --logger tensorboard") from None
        _write_run_id(id_file, run_id)
        self.run_id = run_id
        self._defined: set[str] = set()
        self._row: dict[str, Any] = {}
        self._step: int | None = None
        self._broken = False

    def _flush(self) -> None:
        row, self._row = self._row, {}
        if not row or self._broken:
            return
        try:
            for key in row:
                if key not in self._defined:
                    self.run.define_metric(key, step_metric="step")
                    self._defined.add(key)
            self.run.log({"step": self._step, **row})
        except Exception as exc:  # noqa: BLE001 - a logging backend must never end a training run
            self._broken = True
            self.log(f"warning: W&B logging failed and is off for the rest of this run: {type(exc).__name__}: "
                     f"{' '.join(str(exc).split())[:160]}")

    def _at(self, step: int) -> None:
        """Start a new row when the step changes (scalars of one step share a row)."""
        if self._step is not None and step != self._step:
            self._flush()
        self._step = int(step)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._at(step)
        self._row[tag] = float(value)

    def add_image(self, tag: str, image: Any, step: int, dataformats: str = "HWC") -> None:
        arr = np.asarray(image)
        if dataformats == "CHW":
            arr = arr.transpose(1, 2, 0)
        elif dataformats != "HWC":
            raise ValueError(f"add_image: dataformats must be HWC or CHW, got {dataformats!r}")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]  # grayscale
        self._at(step)
        try:
            self._row[tag] = self.wandb.Image(arr)
        except Exception as exc:  # noqa: BLE001
            self.log(f"warning: could not log image '{tag}' to W&B: {type(exc).__name__}: {exc}")

    def close(self) -> None:
        self._flush()
        try:
            self.run.finish()
        except Exception as exc:  # noqa: BLE001
            self.log(f"warning: could not finish the W&B run: {type(exc).__name__}: {exc}")


def make_logger(cfg, folder: Path, is_main: bool = True, resume: bool = False,
                log: Callable[[str], None] = print):
    """The logger of a run: `cfg.train.logger` on rank 0 (`is_main`), a NullLogger elsewhere.
    `resume`: the run starts from its checkpoint, so a W&B run continues the stored run id."""
    kind = cfg.train.logger
    if kind not in LOGGERS:
        raise DdpmError(f"train.logger must be one of {', '.join(LOGGERS)}, got '{kind}'")
    if not is_main or kind == "none":
        return NullLogger()
    if kind == "wandb":
        return WandbLogger(folder, cfg.train.run_name, cfg.to_dict(), resume=resume, log=log)
    return TensorBoardLogger(folder)
