"""`ddpm prune`: structural channel pruning of a trained model (Torch-Pruning), then a fine-tune.

    prune(ckpt, ratio, run_name, finetune_images=None, ...) -> the trainer's summary

Method (Fang et al. 2023, "Structural Pruning for Diffusion Models", "Diff-Pruning", §3):
- Importance is first-order Taylor, |w * dL/dw| summed over each group of coupled channels
  (Molchanov et al. 2019, "Importance Estimation for Neural Network Pruning", Eq. 8 and its
  group sum), with the gradient accumulated over timesteps: L_t is the error of the predicted
  noise, mean ||eps - eps_theta(x_t, t)||^2 (Ho et al. 2020, Eq. 14 -- the loss Diff-Pruning expands,
  whatever the network predicts: an x0-, v- or EDM network's output is converted to its eps first),
  on one seeded random batch with one noise draw, in eval mode, at t = 0 and upwards over a grid of
  noise levels (`TAYLOR_LEVELS`), stopping at the first level whose L_t falls below
  `TAYLOR_THRESHOLD` (5%) of the largest L_t seen so far -- the timestep-aware partial sum of
  Diff-Pruning, which drops the near-pure-noise steps that carry little information about the weights.
  (The training loss would not do: an x0, v or EDM objective weights the noisy steps up, so its
  L_t never falls below the threshold and the sum runs over every level -- plain Taylor.)
- Channels are pruned uniformly: every prunable layer loses the same share R; a GroupNorm whose
  groups no longer divide its channels gets ADM's group rule for its new width. Torch-Pruning traces the
  dependency graph, so residual additions, the ADM skip concatenations, GroupNorm and the
  scale/shift chunk of AdaGN stay consistent.
- Attention keeps its heads whole: each attention block is pruned only on its residual-stream
  side (its norm, the inputs of qkv, the outputs of proj; for the seed UNet also its
  feed-forward's input and output), never inside -- the number of heads and their width stay
  as trained. The output convolution's output channels are never pruned.

- The amount is what users count: `ratio_of="params"` (the default) or `"macs"` asks for that share
  of the network's parameters or multiply-accumulates per image to go, and `prune_to_target`
  bisects over the uniform channel ratio R, pruning copies, until the share removed is within
  `TOLERANCE` of it (or as close as the layers' channel counts allow); `"channels"` is R itself.

The pruned network's layer sizes go into the run's config (`model.pruned`, models/widths.py),
so `load_model`, `ddpm sample/eval/export` rebuild it from the checkpoint alone. The fine-tune
is an ordinary training run (`PruneTask`): resume, SIGTERM saves and EMA as in `ddpm train`. Its
objective mixes the unpruned teacher's prediction into the target (`TeacherLoss`, the knowledge
distillation of Diff-Pruning's reference code: 0.7 ||eps_teacher - eps_theta||^2 + 0.3 ||eps - eps_theta||^2),
and its learning rate follows a cosine to 0 at the last planned step.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..checkpoint import config_of, load_checkpoint, load_state, model_from_config
from ..config import Config, validate
from ..diffusion import EDMDenoiser, target, to_eps
from ..errors import DdpmError
from ..guidance.cfg import LabelledNet
from ..losses import EDMLoss, VPLoss
from ..models import widths
from ..models.adm import AttnBlock, ResBlock, norm_groups
from ..models.unet import SelfAttention
from ..tasks import Task
from . import require

TAYLOR_LEVELS = 20          # noise levels on the importance grid, from t = 0 to t = T - 1
TAYLOR_THRESHOLD = 0.05     # stop accumulating once a level's eps error < this share of the largest
TAYLOR_BATCH = 64           # images per importance level
DEFAULT_SHARE = 0.10        # default fine-tune: this share of the teacher's training images
# Default fine-tune LR as a share of the teacher's. Measured (bench_compress, the 150k digits model
# pruned 50%, 15k images, digits FD): 1e-3 (= the teacher's) 37.5, 3e-4 33.0, 1e-4 42.8.
FINETUNE_LR_SHARE = 0.3
# Weight of the teacher term in the fine-tune's loss (`TeacherLoss`): Diff-Pruning's reference code
# (ddpm_exp/functions/losses.py, its --kd fine-tunes) uses 0.7 ||eps_T - eps||^2 + 0.3 ||eps - eps_theta||^2.
DEFAULT_DISTILL_WEIGHT = 0.7
RATIO_OF = ("params", "macs", "channels")  # what --ratio is a share of
TOLERANCE = 0.01            # the share removed may miss a params / MACs target by this much (absolute)
MAX_CHANNEL_RATIO = 0.95    # the search's upper end (Torch-Pruning's uniform ratio)
SEARCH_STEPS = 24           # at most this many trial prunes per search


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

def noise_level(diffusion, level: int) -> int | float:
    """Level `level` of TAYLOR_LEVELS (0 = least noise): a VP timestep on an even grid from 0 to T - 1,
    or an EDM sigma with ln sigma evenly spaced from sigma_min to sigma_max."""
    frac = level / (TAYLOR_LEVELS - 1)
    if diffusion.objective == "edm":
        lo, hi = math.log(diffusion.sigma_min), math.log(diffusion.sigma_max)
        return math.exp(lo + frac * (hi - lo))
    return round(frac * (diffusion.noise_steps - 1))


def eps_error(model: nn.Module, diffusion, x0: torch.Tensor, noise: torch.Tensor, level: int) -> torch.Tensor:
    """L_t of Diff-Pruning at noise level `level`: mean ||eps - eps_theta||^2 over the batch (Ho et al. 2020,
    Eq. 14), with eps_theta the network's output turned into a noise prediction (diffusion.py's to_eps)."""
    n, view = x0.shape[0], (-1,) + (1,) * (x0.ndim - 1)
    if diffusion.objective == "edm":
        # D(x0 + sigma n, sigma) estimates x0 (Karras et al. 2022, Eq. 2). In VP coordinates
        # x_VP = a x = a x0 + s n with a = 1 / sqrt(1 + sigma^2), s = sigma a, so to_eps("x0") applies.
        sigma = torch.full((n,), noise_level(diffusion, level), device=x0.device)
        x = x0 + sigma.view(view) * noise
        d = EDMDenoiser(model, diffusion.sigma_data, diffusion.sigma_min, diffusion.sigma_max)(x, sigma)
        a = (1 + sigma**2).rsqrt().view(view)
        eps = to_eps("x0", d, a * x, a, sigma.view(view) * a)
    else:
        t = noise_level(diffusion, level)
        ab = float(diffusion.alpha_bar64[t])
        a, s = math.sqrt(ab), math.sqrt(1 - ab)
        x_t = a * x0 + s * noise  # Ho et al. 2020, Eq. 4
        out = model(x_t, torch.full((n,), t, dtype=torch.long, device=x0.device)).float()
        if diffusion.learned_variance:
            out = out.chunk(2, dim=1)[0]  # the variance half is no noise prediction
        eps = to_eps(diffusion.prediction, out, x_t, a, s)
    return (eps - noise).pow(2).mean()


def accumulate_taylor_grads(model: nn.Module, diffusion, x0: torch.Tensor, seed: int = 0) -> list[float]:
    """Sum the gradients of the eps error L_t over noise levels from t = 0 upwards into .grad, stopping at the
    first level whose L_t is below TAYLOR_THRESHOLD of the largest so far (that level is not summed);
    returns the L_t summed. Diff-Pruning, §3 (its timestep-aware Taylor importance): one batch `x0`, one
    noise draw n ~ N(0, I) from `seed` (torch.randn(x0.shape) of a generator seeded with `seed`, on x0's
    device) shared by every level, the network in eval mode (no dropout; its mode is restored after)."""
    model.zero_grad(set_to_none=True)
    g = torch.Generator(device=x0.device).manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
    was_training = model.training
    model.eval()
    losses: list[float] = []
    try:
        for level in range(TAYLOR_LEVELS):
            loss = eps_error(model, diffusion, x0, noise, level)
            if losses and loss.item() < TAYLOR_THRESHOLD * max(losses):
                break
            loss.backward()
            losses.append(loss.item())
    finally:
        model.train(was_training)
    return losses


def importance_batch(images, seed: int) -> torch.Tensor:
    """TAYLOR_BATCH rows of `images` (N, H, W, C) uint8 drawn without replacement by `seed`, as floats in
    [-1, 1], NCHW. Random, not the first rows: an image folder loads sorted by class folder, so its first
    rows are one class (Diff-Pruning's reference code draws its batch from a shuffled loader)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(images), generator=g)[:TAYLOR_BATCH].sort().values.numpy()
    batch = torch.from_numpy(np.ascontiguousarray(images[rows]))
    return batch.permute(0, 3, 1, 2).float().div(127.5).sub(1)


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


def param_count(model: nn.Module) -> int:
    """All parameters of `model` (the share `prune_to_target` removes with ratio_of="params")."""
    return sum(p.numel() for p in model.parameters())


def mac_count(model: nn.Module, example: tuple) -> int:
    """Multiply-accumulates of one call model(*example): torch.utils.flop_counter's FLOPs of every
    convolution and matrix product (attention's included) over 2; norms and activations are not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*example)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def _copy_with_grads(model: nn.Module) -> nn.Module:
    """A deep copy that keeps the Taylor gradients (`copy.deepcopy` of a Parameter drops .grad)."""
    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    return twin


@dataclasses.dataclass
class Pruned:
    """A pruned network and what was removed (before/after counts of one image's network call)."""

    model: nn.Module
    channel_ratio: float
    params: tuple[int, int]
    macs: tuple[int, int]

    def removed(self, what: str) -> float:
        before, after = self.params if what == "params" else self.macs
        return 1 - after / before

    def describe(self) -> str:
        (p0, p1), (m0, m1) = self.params, self.macs
        return (f"removed {self.removed('params'):.1%} of parameters ({(p0 - p1) / 1e6:.3f}M of {p0 / 1e6:.3f}M) "
                f"and {self.removed('macs'):.1%} of MACs ({(m0 - m1) / 1e6:.1f}M of {m0 / 1e6:.1f}M per image) "
                f"at channel ratio {self.channel_ratio:.3f}")


def prune_to_target(model: nn.Module, example: tuple, ratio: float, ratio_of: str = "params",
                    log: Callable = print) -> Pruned:
    """Prune a copy of `model` (Taylor gradients in .grad) so that `ratio` of its `ratio_of` goes.

    "channels": Torch-Pruning's uniform channel ratio R = `ratio`. "params" / "macs": the share of
    parameters / of MACs per image (`mac_count` of `example`) removed grows with R, so R is found by
    bisection on [0, MAX_CHANNEL_RATIO], starting from the guess 1 - sqrt(1 - ratio) (a convolution's
    cost scales with in x out channels), until the share is within TOLERANCE of `ratio`. Channels go in
    whole numbers per layer, so the share is a step function of R; when no step lands within
    TOLERANCE, the closest one tried is taken and a note logged. A trial whose share is smaller than
    at a lower R counts as too high an R (near R = 0.9 Torch-Pruning can remove less than at a lower R:
    seen on layers of 8 and 16 channels). `model` itself is not changed.
    """
    one = tuple(x[:1] for x in example)  # MACs per image
    p0, m0 = param_count(model), mac_count(model, one)

    def trial(r: float) -> Pruned:
        twin = prune_model(_copy_with_grads(model), example, r)
        return Pruned(twin, r, (p0, param_count(twin)), (m0, mac_count(twin, one)))

    if ratio_of == "channels":
        return trial(ratio)
    lo, lo_share, hi = 0.0, 0.0, MAX_CHANNEL_RATIO
    r, best = min(1 - math.sqrt(1 - ratio), MAX_CHANNEL_RATIO), None
    for _ in range(SEARCH_STEPS):
        got = trial(r)
        share = got.removed(ratio_of)
        if best is None or abs(share - ratio) < abs(best.removed(ratio_of) - ratio):
            best = got
        if abs(share - ratio) <= TOLERANCE:
            break
        if share < ratio and share >= lo_share:
            lo, lo_share = r, share
        else:
            hi = r
        if hi - lo < 1e-3:
            break
        r = (lo + hi) / 2
    if abs(best.removed(ratio_of) - ratio) > TOLERANCE:
        log(f"note: the closest share of {ratio_of} that whole channels allow is {best.removed(ratio_of):.1%} "
            f"(asked: {ratio:.1%})")
    return best


# --- the fine-tune as a training run --------------------------------------------------------------

class TeacherLoss:
    """The fine-tune's objective: the model's own loss with part of its regression target replaced by
    the unpruned teacher's output at the same input (knowledge distillation in the output space).

    Diff-Pruning's reference code fine-tunes an eps network with 0.7 ||eps_T(x_t, t) - eps_theta(x_t, t)||^2
    + 0.3 ||eps - eps_theta(x_t, t)||^2 (ddpm_exp/functions/losses.py, noise_estimation_kd_loss). Here,
    with W = `weight`, per sample:

        VP:  w(t) [W |out - out_T|^2 + (1 - W) |out - target|^2]       (losses.VPLoss: out in the model's
             own eps / x0 / v space, w(t) its weighting such as min-SNR; Ho et al. 2020, Eq. 14)
        EDM: lambda(sigma) [W |D - D_T|^2 + (1 - W) |D - x0|^2]         (losses.EDMLoss, Karras et al. 2022, Eq. 8)

    so for an eps model it is exactly the reference's mixture. A learned variance (Nichol & Dhariwal 2021)
    keeps (1 - W) of its L_vlb term and gets W |v - v_T|^2 on the variance channels. The teacher runs in
    eval mode without gradients (no dropout), on the same x_t, t (and class labels); the student as in
    training. W = 0 is the base loss itself.
    """

    def __init__(self, base: VPLoss | EDMLoss, teacher: nn.Module | None, weight: float):
        self.base, self.teacher, self.weight = base, teacher, weight
        self.draw = base.draw

    def _teacher(self, net: nn.Module) -> nn.Module:
        return LabelledNet(self.teacher, net.labels) if isinstance(net, LabelledNet) else self.teacher

    def __call__(self, net: nn.Module, x0: torch.Tensor, draws=None) -> torch.Tensor:
        if self.weight == 0:
            return self.base(net, x0, draws)
        draws = self.draw(x0.shape[0], x0) if draws is None else draws
        w = self.weight
        if isinstance(self.base, EDMLoss):
            b, sigma = self.base, draws["sigma"]
            lam = (sigma**2 + b.sigma_data**2) / (sigma * b.sigma_data) ** 2
            x = x0 + sigma.view(-1, 1, 1, 1) * draws["noise"]
            d = EDMDenoiser(net, b.sigma_data)(x, sigma)
            with torch.no_grad():
                d_teacher = EDMDenoiser(self._teacher(net), b.sigma_data)(x, sigma)
            mse = lambda u, v: ((u - v) ** 2).mean(dim=(1, 2, 3))  # noqa: E731
            return lam * (w * mse(d, d_teacher) + (1 - w) * mse(d, x0))
        b = self.base
        tab = b._tables(x0.device)
        t, eps = draws["t"], draws["eps"]
        ab = tab["alpha_bar"][t]
        a, s = ab.sqrt().view(-1, 1, 1, 1), (1 - ab).sqrt().view(-1, 1, 1, 1)
        x_t = a * x0 + s * eps
        out = net(x_t, t).float()
        with torch.no_grad():
            ref = self._teacher(net)(x_t, t).float()
        if b.learn_sigma:
            (out, var_out), (ref, var_ref) = out.chunk(2, dim=1), ref.chunk(2, dim=1)
        mse = lambda u, v: ((u - v) ** 2).mean(dim=(1, 2, 3))  # noqa: E731
        loss = b.weight(ab) * (w * mse(out, ref) + (1 - w) * mse(out, target(b.prediction, x0, eps, a, s)))
        if b.learn_sigma:
            vlb = b.vlb_weight * len(tab["alpha_bar"]) * b.vlb_term(x0, x_t, t, out.detach(), var_out)
            loss = loss + (1 - w) * vlb + w * mse(var_out, var_ref)
        return loss


def teacher_weights(ckpt: dict) -> dict:
    """The weights a checkpoint teaches and is pruned from: its EMA weights, else its raw ones."""
    return ckpt["ema_state_dict"] if ckpt.get("ema_state_dict") is not None else ckpt["model_state_dict"]


class PruneTask(Task):
    """`ddpm prune`'s fine-tune: `TeacherLoss` on the teacher's data, starting from the pruned weights
    (a resumed run gets its weights from its checkpoint instead). `record` (ratio, what it is a share of,
    the channel ratio, the shares removed, the distill weight) goes into the checkpoint's task_state."""

    command = "ddpm prune"

    def __init__(self, teacher_path: str, teacher_cfg: Config, teacher_state: dict, record: dict | None = None,
                 pruned_state: dict | None = None):
        self.teacher_path, self.teacher_cfg, self.teacher_state = teacher_path, teacher_cfg, teacher_state
        self.record, self.pruned_state = dict(record or {}), pruned_state
        self.teacher: nn.Module | None = None
        self._data = None

    def data(self, cfg: Config, log: Callable):
        if self._data is None:
            self._data = super().data(cfg, log)
        return self._data

    def build(self, cfg: Config, device: torch.device):
        model, diffusion = super().build(cfg, device)
        if self.pruned_state is not None:
            load_state(model, self.pruned_state, self.teacher_path, "pruned")
        if self.record.get("distill_weight", 0.0) > 0:
            teacher = model_from_config(self.teacher_cfg, device)[0]
            load_state(teacher, self.teacher_state, self.teacher_path, "teacher")
            self.teacher = teacher.eval().requires_grad_(False)
        return model, diffusion

    def make_loss(self, diffusion, cfg: Config):
        return TeacherLoss(super().make_loss(diffusion, cfg), self.teacher, self.record.get("distill_weight", 0.0))

    def extra_state(self) -> dict:
        return {"method": "prune", "teacher": self.teacher_path, **self.record}


def check_input(path: str | Path, ratio: float, ratio_of: str = "params", distill_weight: float | None = None) -> None:
    """One-line errors for a ratio outside (0, 1), an unknown --ratio-of, a distill weight outside [0, 1],
    and an input that `ddpm quantize` wrote."""
    if ratio_of not in RATIO_OF:
        raise DdpmError(f"--ratio-of must be one of {', '.join(RATIO_OF)}, got {ratio_of!r}")
    if not (0.0 < ratio < 1.0):
        what = {"params": "parameters", "macs": "MACs per image", "channels": "channels"}[ratio_of]
        raise DdpmError(f"--ratio must lie strictly between 0 and 1 (the share of {what} to remove), got {ratio}")
    if distill_weight is not None and not (0.0 <= distill_weight <= 1.0):
        raise DdpmError(f"--distill-weight must lie in [0, 1] (the teacher's share of the fine-tune target), "
                        f"got {distill_weight}")
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


def _pruned(teacher: Config, ckpt: dict, path: str, ratio: float, data, log: Callable,
            ratio_of: str = "channels") -> tuple[Config, dict, Pruned]:
    """(config with model.pruned, pruned weights, the prune's figures) of the teacher's EMA (else raw) weights."""
    torch.manual_seed(teacher.train.seed)
    model, diffusion = model_from_config(teacher)
    load_state(model, teacher_weights(ckpt), path)
    x0 = importance_batch(data.images, teacher.train.seed)
    losses = accumulate_taylor_grads(model, diffusion, x0, teacher.train.seed)
    t = torch.zeros(2, dtype=torch.long)
    result = prune_to_target(model.eval(), (x0[:2], t), ratio, ratio_of, log)
    entries = widths.record(result.model, model_from_config(teacher)[0])
    cfg = dataclasses.replace(teacher, model=dataclasses.replace(teacher.model, pruned=entries))
    log(f"{result.describe()}; Taylor importance of the eps error over {len(losses)} of {TAYLOR_LEVELS} noise levels")
    return cfg, result.model.state_dict(), result


def _resumed_record(stored: dict, ratio: float, ratio_of: str, distill_weight: float | None, path) -> dict:
    """The stored run's task record; a one-line error when the call asks for another amount or weight.
    A run from before these options pruned a channel ratio and fine-tuned without a teacher."""
    record = {k: v for k, v in (stored.get("task_state") or {}).items() if k not in ("method", "teacher")}
    record.setdefault("ratio_of", "channels")
    record.setdefault("distill_weight", 0.0)
    if (record.get("ratio"), record["ratio_of"]) != (ratio, ratio_of):
        raise DdpmError(f"run at {path} was pruned with --ratio {record.get('ratio')} --ratio-of {record['ratio_of']}; "
                        "repeat those to resume it, or pick another --run-name")
    if distill_weight is not None and distill_weight != record["distill_weight"]:
        raise DdpmError(f"run at {path} fine-tunes with --distill-weight {record['distill_weight']}; drop the option "
                        "or repeat that value to resume it, or pick another --run-name")
    return record


def prune(ckpt_path: str, ratio: float, run_name: str, finetune_images: int | None = None,
          batch_size: int | None = None, lr: float | None = None, device: str | None = None,
          workdir: str = ".", log: Callable = print, progress: bool = True, ratio_of: str = "params",
          distill_weight: float | None = None, lr_schedule: str | None = None,
          warmup_steps: int | None = None) -> dict:
    """Prune `ckpt_path` so that `ratio` of its `ratio_of` goes, and fine-tune it into
    WORKDIR/models/RUN_NAME/ckpt.pt (resumes a run that exists).

    distill_weight: the teacher's share W of the fine-tune target (`TeacherLoss`; default
    DEFAULT_DISTILL_WEIGHT, a resumed run keeps its own). lr_schedule / warmup_steps: cosine (default)
    or constant after a linear warm-up of that many steps (default 0); a resumed run keeps its own
    unless given. The fine-tune covers `finetune_images` rounded up to whole epochs, and the cosine
    reaches 0 at its last step. A larger `finetune_images` on a finished or stopped run continues it
    with the cosine stretched over the new length: at step k of N planned steps the rate is the
    schedule's value at k / N, so it rises again to the longer schedule's level and decays to 0 at
    the new end (as `ddpm train` does when --epochs grows).
    """
    from ..runlock import RunLock
    from ..train import RunPaths, train

    check_input(ckpt_path, ratio, ratio_of, distill_weight)
    require("torch_pruning", "ddpm prune")
    ckpt = load_checkpoint(ckpt_path)
    teacher = config_of(ckpt, ckpt_path)
    _check_prunable(teacher, ckpt_path)
    lr = FINETUNE_LR_SHARE * teacher.train.lr if lr is None else lr
    given = {k: v for k, v in (("batch_size", batch_size), ("lr", lr), ("device", device)) if v is not None}
    run = dict(run_name=run_name, workdir=workdir, eval_every_steps=0, lr_schedule=lr_schedule or "cosine",
               warmup_steps=warmup_steps or 0, **given)
    cfg = validate(dataclasses.replace(teacher, train=dataclasses.replace(teacher.train, **run)))
    path = RunPaths.of(cfg).ckpt
    with RunLock(path.parent, run_name):
        task = PruneTask(str(ckpt_path), teacher, teacher_weights(ckpt))
        data = task.data(cfg, log)
        stored = load_checkpoint(path) if path.exists() else None
        if stored is not None:
            task.record = _resumed_record(stored, ratio, ratio_of, distill_weight, path)
            own = config_of(stored, path).train
            keep = {"lr_schedule": lr_schedule or own.lr_schedule,
                    "warmup_steps": own.warmup_steps if warmup_steps is None else warmup_steps}
            cfg = validate(dataclasses.replace(config_of(stored, path), train=dataclasses.replace(cfg.train, **keep)))
        else:
            cfg, task.pruned_state, result = _pruned(cfg, ckpt, str(ckpt_path), ratio, data, log, ratio_of)
            task.record = {"ratio": ratio, "ratio_of": ratio_of, "channel_ratio": result.channel_ratio,
                           "params_removed": result.removed("params"), "macs_removed": result.removed("macs"),
                           "distill_weight": DEFAULT_DISTILL_WEIGHT if distill_weight is None else distill_weight}
        images = finetune_images or round(DEFAULT_SHARE * teacher_images(ckpt, teacher)) or len(data)
        epochs = max(1, math.ceil(images / len(data)))
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=epochs, sample_every_epochs=epochs))
        return train(cfg, stored, log=log, progress=progress, task=task)
