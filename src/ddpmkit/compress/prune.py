"""`ddpm prune`: structural channel pruning of a trained model (Torch-Pruning), then a fine-tune.

    prune(ckpt, ratio, run_name, finetune_images=None, ...) -> the trainer's summary

Method (Fang et al. 2023, "Structural Pruning for Diffusion Models", "Diff-Pruning", §3):
- Importance is first-order Taylor, |w * dL/dw| summed over each group of coupled channels
  (Molchanov et al. 2019, "Importance Estimation for Neural Network Pruning", Eq. 8 and its
  group sum), with the gradient accumulated over timesteps: the diffusion loss of one batch at
  t = 0 and upwards over a grid of noise levels (`TAYLOR_LEVELS`), stopping at the first level
  whose loss falls below `TAYLOR_THRESHOLD` (5%) of the largest loss seen so far -- the
  timestep-aware partial sum of Diff-Pruning, which drops the near-pure-noise steps that carry
  little information about the weights.
- Channels are pruned uniformly: every prunable layer loses the same share R; a GroupNorm whose
  groups no longer divide its channels gets ADM's group rule for its new width. Torch-Pruning traces the
  dependency graph, so residual additions, the ADM skip concatenations, GroupNorm and the
  scale/shift chunk of AdaGN stay consistent.
- Attention keeps its heads whole: each attention block is pruned only on its residual-stream
  side (its norm, the inputs of qkv, the outputs of proj; for the seed UNet also its
  feed-forward's input and output), never inside -- the number of heads and their width stay
  as trained. The output convolution's output channels are never pruned.

The pruned network's layer sizes go into the run's config (`model.pruned`, models/widths.py),
so `load_model`, `ddpm sample/eval/export` rebuild it from the checkpoint alone. The fine-tune
is an ordinary training run (`PruneTask`): resume, SIGTERM saves and EMA as in `ddpm train`.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ..checkpoint import config_of, load_checkpoint, load_state, model_from_config
from ..config import Config, validate
from ..errors import DdpmError
from ..models import widths
from ..models.adm import AttnBlock, ResBlock, norm_groups
from ..models.unet import SelfAttention
from ..tasks import Task
from . import require

TAYLOR_LEVELS = 20          # noise levels on the importance grid, from t = 0 to t = T - 1
TAYLOR_THRESHOLD = 0.05     # stop accumulating once a level's loss < this share of the largest loss
TAYLOR_BATCH = 64           # images per importance level
DEFAULT_SHARE = 0.10        # default fine-tune: this share of the teacher's training images
# Default fine-tune LR as a share of the teacher's. Measured (bench_compress, the 150k digits model
# pruned 50%, 15k images, digits FD): 1e-3 (= the teacher's) 37.5, 3e-4 33.0, 1e-4 42.8.
FINETUNE_LR_SHARE = 0.3


# --- attention as one unit for Torch-Pruning ---------------------------------------------------

def _keep(param: nn.Parameter | None, keep: torch.Tensor, dim: int) -> nn.Parameter | None:
    return None if param is None else nn.Parameter(param.data.index_select(dim, keep).clone())


class _Unit(nn.Module):
    """Stands in for an attention block while Torch-Pruning traces the network: same output, but the
    autograd graph links output to input directly, so the tracer sees one unit (handled by
    AttnPruner) instead of the reshapes inside, which it cannot map channel by channel."""

    checkpointable = False

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, *rest) -> torch.Tensor:
        return x + (self.block(x, *rest) - x).detach()


def _swap_units(model: nn.Module, wrap: bool) -> None:
    """Wrap every attention block in a `_Unit` (wrap=True) or unwrap them again."""
    for name, module in list(model.named_modules()):
        if (isinstance(module, (AttnBlock, SelfAttention)) and wrap) or (isinstance(module, _Unit) and not wrap):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, _Unit(module) if wrap else module.block)


def _attn_parts(layer: nn.Module) -> tuple[list, list, list]:
    """(norms, layers reading the residual stream (in dim 1), layers writing it (out dim 0))."""
    layer = layer.block
    if isinstance(layer, AttnBlock):
        return [layer.norm], [layer.qkv], [layer.proj]
    return [layer.norm, layer.ff[0]], [layer.qkv, layer.ff[1]], [layer.proj, layer.ff[3]]


def _set_sizes(module: nn.Module, n: int, side: str) -> None:
    if isinstance(module, nn.Conv2d):
        setattr(module, "in_channels" if side == "in" else "out_channels", n)
    elif isinstance(module, nn.Linear):
        setattr(module, "in_features" if side == "in" else "out_features", n)
    elif isinstance(module, nn.GroupNorm):
        module.num_channels = n
    else:
        module.normalized_shape = (n,)


def _make_attn_pruner(tp):
    class AttnPruner(tp.pruner.BasePruningFunc):
        """Prunes an attention block's residual-stream channels only (heads and their width stay whole)."""

        TARGET_MODULES = _Unit

        def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            c = self.get_out_channels(layer)
            keep = torch.tensor(sorted(set(range(c)) - set(int(i) for i in idxs)), dtype=torch.long)
            norms, readers, writers = _attn_parts(layer)
            for m in norms:
                m.weight, m.bias = _keep(m.weight, keep, 0), _keep(m.bias, keep, 0)
                _set_sizes(m, len(keep), "in")
            for m in readers:
                m.weight = _keep(m.weight, keep, 1)
                _set_sizes(m, len(keep), "in")
            for m in writers:
                m.weight, m.bias = _keep(m.weight, keep, 0), _keep(m.bias, keep, 0)
                _set_sizes(m, len(keep), "out")
            return layer

        prune_in_channels = prune_out_channels

        def get_out_channels(self, layer: nn.Module) -> int:
            qkv = layer.block.qkv
            return qkv.in_channels if isinstance(qkv, nn.Conv2d) else qkv.in_features

        get_in_channels = get_out_channels

    return AttnPruner()


def _make_norm_pruner(tp):
    class NormPruner(tp.pruner.function.GroupNormPruner):
        """GroupNorm pruned channel by channel: a norm over a skip concatenation has groups that do not
        line up with its parts' channels, so the groups are re-chosen afterwards (`_fix_groups`)."""

        def get_in_channel_groups(self, layer):
            return 1

        get_out_channel_groups = get_in_channel_groups

    return NormPruner()


def _fix_groups(model: nn.Module) -> None:
    """Keep each GroupNorm's groups where they still divide its channels, else ADM's rule (adm.norm_groups)."""
    for m in model.modules():
        if isinstance(m, nn.GroupNorm) and m.num_channels % m.num_groups:
            m.num_groups = norm_groups(m.num_channels)


# --- importance and the pruning step ------------------------------------------------------------

def _noise_grid(draws: dict, level: int, like: torch.Tensor, diffusion) -> dict:
    """`draws` with every row at noise level `level` of TAYLOR_LEVELS (t = 0 first)."""
    frac = level / (TAYLOR_LEVELS - 1)
    if "t" in draws:
        t = round(frac * (diffusion.noise_steps - 1))
        return {**draws, "t": torch.full_like(draws["t"], t)}
    lo, hi = math.log(diffusion.sigma_min), math.log(diffusion.sigma_max)  # EDM: ln sigma from low to high
    return {**draws, "sigma": torch.full_like(draws["sigma"], math.exp(lo + frac * (hi - lo)))}


def accumulate_taylor_grads(model: nn.Module, loss_fn, x0: torch.Tensor, diffusion, seed: int = 0) -> list[float]:
    """Sum the gradients of the diffusion loss over noise levels from t = 0 upwards into .grad,
    stopping below TAYLOR_THRESHOLD of the largest loss (Diff-Pruning, §3); returns the losses used."""
    model.zero_grad(set_to_none=True)
    g = torch.Generator(device=x0.device).manual_seed(seed)
    base = loss_fn.draw(x0.shape[0], x0, g)
    losses: list[float] = []
    for level in range(TAYLOR_LEVELS):
        loss = loss_fn(model, x0, _noise_grid(base, level, x0, diffusion)).mean()
        if losses and loss.item() < TAYLOR_THRESHOLD * max(losses):
            break
        loss.backward()
        losses.append(loss.item())
    return losses


def output_layer(model: nn.Module) -> nn.Module:
    """The network's output convolution (never pruned on its output side)."""
    return model.out[-1] if hasattr(model, "out") else model.outc


def prune_model(model: nn.Module, example: tuple, ratio: float) -> nn.Module:
    """Prune `model` in place at `ratio` with Taylor importance from the gradients already in .grad."""
    tp = require("torch_pruning", "ddpm prune")
    attn = _make_attn_pruner(tp)
    _swap_units(model, wrap=True)
    pruner = tp.pruner.MetaPruner(
        model, example, importance=tp.importance.TaylorImportance(), pruning_ratio=ratio,
        ignored_layers=[output_layer(model)], global_pruning=False,
        out_channel_groups={m.emb: 2 for m in model.modules() if isinstance(m, ResBlock)},  # (scale, shift) halves
        customized_pruners={_Unit: attn, nn.GroupNorm: _make_norm_pruner(tp)})
    pruner.step()
    _swap_units(model, wrap=False)
    _fix_groups(model)
    model.zero_grad(set_to_none=True)
    return model


def channel_count(model: nn.Module) -> int:
    """Output channels of the prunable convolutions: all but attention's qkv and the output conv
    (the share `prune_model` removes is measured on this)."""
    fixed = {id(m.qkv) for m in model.modules() if isinstance(m, (AttnBlock, SelfAttention))}
    fixed.add(id(output_layer(model)))
    return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d) and id(m) not in fixed)


# --- the fine-tune as a training run --------------------------------------------------------------

class PruneTask(Task):
    """`ddpm prune`'s fine-tune: the ordinary diffusion loss on the teacher's data, starting from
    the pruned weights (a resumed run gets its weights from its checkpoint instead)."""

    command = "ddpm prune"

    def __init__(self, pruned_state: dict | None, ratio: float, teacher: str):
        self.pruned_state, self.ratio, self.teacher = pruned_state, ratio, teacher

    def build(self, cfg: Config, device: torch.device):
        model, diffusion = super().build(cfg, device)
        if self.pruned_state is not None:
            load_state(model, self.pruned_state, self.teacher, "pruned")
        return model, diffusion

    def extra_state(self) -> dict:
        return {"method": "prune", "ratio": self.ratio, "teacher": self.teacher}


def check_input(path: str | Path, ratio: float) -> None:
    """One-line errors for a ratio outside (0, 1) and for an input that `ddpm quantize` wrote."""
    if not (0.0 < ratio < 1.0):
        raise DdpmError(f"--ratio must lie strictly between 0 and 1 (the share of channels to remove), got {ratio}")
    from .quantize import is_quantized

    if is_quantized(path):
        raise DdpmError(f"{path} is a quantized model (written by `ddpm quantize`); prune the fp32 checkpoint "
                        "first, then quantize the pruned one")


def _check_prunable(cfg: Config, path) -> None:
    """Only pixel-space diffusion models of the two UNets: the fine-tune is their diffusion loss on images."""
    latent = getattr(getattr(cfg, "autoencoder", None), "path", "")
    if cfg.model.arch not in ("unet", "adm") or latent or getattr(getattr(cfg, "distill", None), "method", ""):
        raise DdpmError(f"{path} is not a pixel-space diffusion model trained by `ddpm train` (arch "
                        f"{cfg.model.arch}{', latent' if latent else ''}); ddpm prune fine-tunes with the diffusion "
                        "loss on images, so prune such a model (the teacher of a distilled one), not this")


def teacher_images(ckpt: dict, cfg: Config) -> int:
    """The images the teacher was trained on: optimizer steps x batch x accumulation x processes."""
    t = cfg.train
    return int(ckpt.get("global_step", 0)) * t.batch_size * t.grad_accum * int(ckpt.get("world_size", 1))


def _pruned(teacher: Config, ckpt: dict, path: str, ratio: float, data, log: Callable) -> tuple[Config, dict]:
    """(config with model.pruned, pruned weights) of the teacher's EMA (else raw) weights."""
    torch.manual_seed(teacher.train.seed)
    model, diffusion = model_from_config(teacher)
    key = "ema_state_dict" if ckpt.get("ema_state_dict") is not None else "model_state_dict"
    load_state(model, ckpt[key], path)
    before, params = channel_count(model), sum(p.numel() for p in model.parameters())
    x0 = torch.as_tensor(data.images[:TAYLOR_BATCH]).permute(0, 3, 1, 2).float().div(127.5).sub(1)  # NHWC uint8
    losses = accumulate_taylor_grads(model.train(), Task().make_loss(diffusion, teacher), x0, diffusion,
                                     teacher.train.seed)
    t = torch.zeros(2, dtype=torch.long)
    prune_model(model.eval(), (x0[:2], t), ratio)
    entries = widths.record(model, model_from_config(teacher)[0])
    cfg = dataclasses.replace(teacher, model=dataclasses.replace(teacher.model, pruned=entries))
    log(f"pruned {1 - channel_count(model) / before:.1%} of the conv channels "
        f"({params / 1e6:.2f}M -> {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
        f"Taylor importance over {len(losses)} of {TAYLOR_LEVELS} noise levels)")
    return cfg, model.state_dict()


def prune(ckpt_path: str, ratio: float, run_name: str, finetune_images: int | None = None,
          batch_size: int | None = None, lr: float | None = None, device: str | None = None,
          workdir: str = ".", log: Callable = print, progress: bool = True) -> dict:
    """Prune `ckpt_path` at `ratio` and fine-tune it into WORKDIR/models/RUN_NAME/ckpt.pt (resumes a run that exists)."""
    from ..runlock import RunLock
    from ..train import RunPaths, train

    check_input(ckpt_path, ratio)
    require("torch_pruning", "ddpm prune")
    ckpt = load_checkpoint(ckpt_path)
    teacher = config_of(ckpt, ckpt_path)
    _check_prunable(teacher, ckpt_path)
    lr = FINETUNE_LR_SHARE * teacher.train.lr if lr is None else lr
    given = {k: v for k, v in (("batch_size", batch_size), ("lr", lr), ("device", device)) if v is not None}
    # A constant LR, whatever the teacher's schedule: the fine-tune's length is open-ended (a
    # larger --finetune-images continues it), and a decay would restart part-way when it grows.
    run = dict(run_name=run_name, workdir=workdir, warmup_steps=0, lr_schedule="constant", eval_every_steps=0,
               **given)
    cfg = validate(dataclasses.replace(teacher, train=dataclasses.replace(teacher.train, **run)))
    path = RunPaths.of(cfg).ckpt
    with RunLock(path.parent, run_name):
        task = PruneTask(None, ratio, str(ckpt_path))
        data = task.data(cfg, log)
        stored = load_checkpoint(path) if path.exists() else None
        if stored is not None:
            cfg = validate(dataclasses.replace(config_of(stored, path), train=cfg.train))
        else:
            cfg, task.pruned_state = _pruned(cfg, ckpt, str(ckpt_path), ratio, data, log)
        images = finetune_images or round(DEFAULT_SHARE * teacher_images(ckpt, teacher)) or len(data)
        epochs = max(1, math.ceil(images / len(data)))
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=epochs, sample_every_epochs=epochs))
        return train(cfg, stored, log=log, progress=progress, task=task)
