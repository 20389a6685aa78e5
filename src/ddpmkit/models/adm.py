"""An ADM-style UNet: the backbone of Dhariwal & Nichol (2021), "Diffusion Models Beat GANs", §3
and App. A, which builds on Nichol & Dhariwal (2021), "Improved DDPM", and Ho et al. (2020), App. B.

What it keeps from ADM, and why it matters for eps-prediction: at high noise an eps model must
return almost exactly its input (eps ~ x_t). Here every residual block adds its input back
unnormalized, and the decoder concatenates a skip from every encoder stage (the input conv's
output included), so x_t reaches the output head through linear paths. The seed's UNet
(`unet.py`) has no such path and ends its first block in GroupNorm(1, C).

Pieces: sinusoidal timestep features -> MLP (Linear, SiLU, Linear); residual blocks with
GroupNorm, SiLU and 3x3 convs, conditioned on time in EVERY block through a scale and shift of
the second norm ("AdaGN", use_scale_shift_norm in ADM, their §3 and eq. for AdaGN(h, y) =
y_s GroupNorm(h) + y_b); multi-head self-attention at chosen levels and in the middle; learned
resampling (stride-2 conv down, nearest + conv up); dropout; zero-initialized last conv of each
block and of the output head, so each block starts as the identity.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .unet import add_class, class_table, timestep_embedding


def norm_groups(channels: int) -> int:
    """GroupNorm groups: the largest divisor of `channels` that is <= 32 and leaves >= 4 channels
    per group (ADM uses 32 groups; small widths need fewer so groups are not single channels)."""
    cap = max(1, min(32, channels // 4))
    return max(g for g in range(1, cap + 1) if channels % g == 0)


def _norm(channels: int, groups: int = 0) -> nn.GroupNorm:
    """GroupNorm with `groups` groups (0: `norm_groups(channels)`, the count chosen per width)."""
    return nn.GroupNorm(groups or norm_groups(channels), channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """x + conv(drop(SiLU(AdaGN(conv(SiLU(GN(x))), emb)))), with a 1x1 skip when the width changes.

    AdaGN: GroupNorm(h) * (1 + scale) + shift with (scale, shift) = Linear(SiLU(emb))
    (Dhariwal & Nichol 2021, §3; the "1 +" makes a zero projection the identity).
    `forward` takes SiLU(emb), computed once by the network, instead of emb.
    """

    checkpointable = True

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0, groups: int = 0):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = _norm(out_ch, groups)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, silu_emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(silu_emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """x + proj(MultiHeadAttention(GN(x))) over all pixels (ADM's AttentionBlock); proj starts at zero."""

    checkpointable = True

    def __init__(self, channels: int, num_heads: int, groups: int = 0):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide channels={channels}")
        self.num_heads = num_heads
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, silu_emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x))
        inner = qkv.shape[1] // 3  # = c, except after `ddpm prune`, which keeps the heads whole
        qkv = qkv.reshape(b, 3, self.num_heads, inner // self.num_heads, h * w)
        q, k, v = (z.transpose(-1, -2) for z in qkv.unbind(1))      # (B, heads, HW, inner/heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, inner, h, w))


class Downsample(nn.Module):
    """Learned 2x downsampling: a stride-2 3x3 conv."""

    checkpointable = False

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, silu_emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """2x nearest-neighbour upsampling followed by a 3x3 conv."""

    checkpointable = False

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, silu_emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class ADMUNet(nn.Module):
    """ADM-style UNet mapping (x, t) to an output of x's spatial size with `c_out` channels.

    Level k works at 1/2**k of the input resolution with `base_channels * channel_mults[k]`
    channels and `num_res_blocks` residual blocks (the decoder has one more per level, one per
    skip); `attn_levels` adds self-attention after the residual blocks of those levels; the
    middle always has attention, as in ADM. The input side must be divisible by
    2**(len(channel_mults) - 1). `time_dim` is the width of the time MLP; `time_features` the width
    of the sinusoidal features it reads (0: time_dim). `norm_groups` > 0 gives every GroupNorm that
    many groups (diffusers' UNet2DModel has one count for all); 0 picks them per width.
    `num_classes` > 0 adds a learned class embedding to the MLP's output (see `unet.add_class`).
    """

    def __init__(self, c_in: int = 3, c_out: int = 3, time_dim: int = 128, base_channels: int = 32,
                 channel_mults: tuple[int, ...] = (1, 2, 2), attn_levels: tuple[int, ...] = (2,),
                 num_heads: int = 4, dropout: float = 0.0, num_res_blocks: int = 2, num_classes: int = 0,
                 time_features: int = 0, norm_groups: int = 0):
        super().__init__()
        self.time_dim = time_dim
        self.time_features = time_features or time_dim
        self.num_classes = num_classes
        self.num_levels = len(channel_mults)
        self.grad_checkpointing = False
        self.time_mlp = nn.Sequential(nn.Linear(self.time_features, time_dim), nn.SiLU(),
                                      nn.Linear(time_dim, time_dim))
        widths = [base_channels * m for m in channel_mults]
        self.conv_in = nn.Conv2d(c_in, widths[0], 3, padding=1)  # level 0's width (base * channel_mults[0])
        block = dict(emb_dim=time_dim, dropout=dropout, groups=norm_groups)
        self.enc, skip_widths = self._encoder(widths, set(attn_levels), num_heads, num_res_blocks, block)
        top = widths[-1]
        self.mid = nn.ModuleList([ResBlock(top, top, **block), AttnBlock(top, num_heads, norm_groups), ResBlock(top, top, **block)])
        self.dec = self._decoder(widths, set(attn_levels), num_heads, num_res_blocks, block, skip_widths)
        self.out = nn.Sequential(_norm(widths[0], norm_groups), nn.SiLU(), _zero(nn.Conv2d(widths[0], c_out, 3, padding=1)))
        if num_classes > 0:  # registered last, so an unconditional network's layout is unchanged
            self.label_emb = class_table(num_classes, time_dim)

    @staticmethod
    def _encoder(widths, attn, heads, n_res, block) -> tuple[nn.ModuleList, list[int]]:
        """Encoder steps, each producing one skip; returns them and every skip's width (conv_in's first)."""
        steps, skip_widths, ch = [], [widths[0]], widths[0]
        for level, width in enumerate(widths):
            for _ in range(n_res):
                step = [ResBlock(ch, width, **block)]
                step += [AttnBlock(width, heads, block["groups"])] if level in attn else []
                steps.append(nn.ModuleList(step))
                ch = width
                skip_widths.append(ch)
            if level < len(widths) - 1:
                steps.append(nn.ModuleList([Downsample(ch)]))
                skip_widths.append(ch)
        return nn.ModuleList(steps), skip_widths

    @staticmethod
    def _decoder(widths, attn, heads, n_res, block, skip_widths) -> nn.ModuleList:
        """Decoder steps, each taking one skip (concatenated to its input), deepest level first."""
        steps, ch, skips = [], widths[-1], list(skip_widths)
        for level in reversed(range(len(widths))):
            width = widths[level]
            for i in range(n_res + 1):
                step = [ResBlock(ch + skips.pop(), width, **block)]
                step += [AttnBlock(width, heads, block["groups"])] if level in attn else []
                step += [Upsample(width)] if level > 0 and i == n_res else []
                steps.append(nn.ModuleList(step))
                ch = width
        return nn.ModuleList(steps)

    def set_grad_checkpointing(self, flag: bool = True) -> None:
        """Recompute residual and attention blocks in backward instead of storing their activations
        (only while training with gradients enabled); gradients are unchanged."""
        self.grad_checkpointing = bool(flag)

    def _run(self, step: nn.ModuleList, h: torch.Tensor, silu_emb: torch.Tensor) -> torch.Tensor:
        save = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in step:
            if save and block.checkpointable:
                h = checkpoint(block, h, silu_emb, use_reentrant=False)
            else:
                h = block(h, silu_emb)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """`y`: class labels (num_classes = null) of a class-conditional network; None = null class."""
        factor = 2 ** (self.num_levels - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"input size {tuple(x.shape[-2:])} must be divisible by {factor}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_mlp(timestep_embedding(t, self.time_features).to(x.dtype))
        silu_emb = F.silu(add_class(emb, getattr(self, "label_emb", None), y))
        h = self.conv_in(x)
        skips = [h]
        for step in self.enc:
            h = self._run(step, h, silu_emb)
            skips.append(h)
        h = self._run(self.mid, h, silu_emb)
        for step in self.dec:
            h = self._run(step, torch.cat([h, skips.pop()], dim=1), silu_emb)
        return self.out(h)
