"""What a training run trains: the extension point that lets other commands reuse the trainer.

`train.train(cfg, ckpt, task=...)` runs the one training loop of ddpmkit -- exact resume,
SIGTERM saves, EMA, TensorBoard, sample grids, atomic checkpoints, DDP -- around a `Task`. The
default `Task()` is `ddpm train`: a diffusion model on an image folder with the configured
diffusion loss. Another command (distillation, pruning fine-tunes, an autoencoder) subclasses
`Task` and overrides only what differs:

    class MyTask(Task):
        command = "ddpm mything"                       # named in the "run it again to resume" line
        def build(self, cfg, device):                  # -> (model, diffusion), model on device
            model, diffusion = super().build(cfg, device)
            ...                                        # e.g. load a teacher's weights into it
            return model, diffusion
        def make_loss(self, diffusion, cfg):           # the loss API of losses.py:
            return MyLoss(...)                         #   draw(n, like, generator) -> {name: tensor, n rows}
                                                       #   __call__(net, x0, draws) -> one loss per row
        def extra_state(self):                         # plain values and tensors (weights_only loading)
            return {"method": "...", "stage": self.stage}
        def load_extra_state(self, state):             # called on resume, before the first step
            self.stage = state["stage"]

    train(cfg, ckpt, task=MyTask(...))

The trainer calls, in this order: `data(cfg, log)` (once), `build(cfg, device)`, `make_loss`,
`load_extra_state(ckpt["task_state"])` (when resuming a checkpoint that has one; the model,
EMA and optimizer are restored right after), `start(trainer)`; then per batch
`batches(...)` supplies x (what the loss gets as x0), and after each optimizer step that was
taken `after_step(trainer)`; `grid(trainer, name)` at the grid points and `extra_state()` at
every checkpoint save (stored under the checkpoint's "task_state" key). Everything else a
checkpoint holds (config, model/EMA/optimizer state, position, RNG) is the trainer's.

Rules that keep the guarantees: a task's random draws belong in the loss's `draw` (the trainer
seeds it per global batch, so resume is exact); any state that changes during a run must be
in `extra_state` or derivable from `trainer.state.step`; the model returned by `build` is the
one trained, saved as `model_state_dict` and loaded by `loading.load_model`, so it must be
buildable from the config alone (`checkpoint.model_from_config`) for `ddpm sample/eval/export`
to work on the result.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from .checkpoint import model_from_config
from .config import Config
from .data import ImageData, epoch_batches, load_data
from .losses import make_loss

if TYPE_CHECKING:
    from .train import _Trainer


class Task:
    """The default task, `ddpm train`: override the methods that differ (see the module docstring)."""

    command = "ddpm train"

    def data(self, cfg: Config, log: Callable) -> ImageData:
        """The training set: anything with `images` (N rows), `channels`, `labels` (or None), `source`, len().

        Called once per process (rank 0 of each node first when data.cache_dir is set)."""
        return load_data(cfg.data.path, cfg.data.hw, cfg.data.channels, cfg.data.cache_dir, log)

    def batches(self, data, cfg: Config, epoch: int, start: int, rank: int, world: int,
                device: torch.device) -> Iterator[torch.Tensor]:
        """The batches of `epoch` from batch `start` on (this rank's rows), as the loss's x0.

        Must depend only on (cfg.train.seed, epoch, start), like `data.epoch_batches`, for exact resume."""
        return epoch_batches(data, cfg.train.batch_size, cfg.train.seed, epoch, start, cfg.data.hflip,
                             rank=rank, world=world, device=device)

    def build(self, cfg: Config, device: torch.device) -> tuple[torch.nn.Module, Any]:
        """(model on device, its Diffusion); called after the trainer seeded torch with cfg.train.seed."""
        return model_from_config(cfg, device)

    def make_loss(self, diffusion, cfg: Config):
        """The objective: `draw(n, like, generator) -> dict` and `__call__(net, x0, draws) -> (n,)` (losses.py)."""
        dc = cfg.diffusion
        return make_loss(diffusion, dc.loss_weighting, dc.min_snr_gamma, dc.vlb_weight, dc.p_mean, dc.p_std)

    def start(self, trainer: "_Trainer") -> None:
        """Called once after set-up and restore, before the first step (e.g. to keep `trainer`)."""

    def after_step(self, trainer: "_Trainer") -> None:
        """Called after each optimizer step taken (trainer.state.step already counts it), on every rank."""

    def grid(self, trainer: "_Trainer", name: str) -> torch.Tensor | None:
        """Draw and save the sample grid `name` (rank 0 only); returns the uint8 images for TensorBoard, or None."""
        return trainer.diffusion_grid(name)

    def extra_state(self) -> dict[str, Any]:
        """Task-specific checkpoint content (plain values and tensors only); {} for `ddpm train`."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` returned, when resuming."""
