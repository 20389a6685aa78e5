"""The seed tutorial's UNet, made configurable.

Blocks keep the seed's names and structure: `DoubleConv` (two 3x3 convs with GroupNorm and
GELU, optionally residual), `Down` (max-pool, two DoubleConvs, plus a projection of the time
embedding), `Up` (bilinear upsample, skip concatenation, two DoubleConvs, plus the time
projection) and `SelfAttention` (pre-norm multi-head attention and a feed-forward, on the
flattened feature map). The network maps (x, t) to an output of the same spatial size and
knows nothing about noise schedules or what its output means.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in Vaswani et al. (2017) §3.5."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def class_table(num_classes: int, dim: int) -> nn.Embedding | None:
    """The learned class embedding of a class-conditional network, or None for an unconditional one
    (whose parameters and state-dict keys then stay exactly as before).

    Row `num_classes` is the null class, trained with probability cond_drop so that one network
    also predicts unconditionally, for classifier-free guidance (Ho & Salimans 2022, §3.2)."""
    return nn.Embedding(num_classes + 1, dim) if num_classes > 0 else None


def add_class(emb: torch.Tensor, table: nn.Embedding | None, y: torch.Tensor | None) -> torch.Tensor:
    """emb + table(y): the class embedding joins the time embedding, as in ADM (Dhariwal & Nichol
    2021, App. A: emb = time_embed(t) + label_emb(y)); y None means the null class."""
    if table is None:
        if y is not None:
            raise ValueError("this network is unconditional (num_classes=0) but got class labels")
        return emb
    null = table.num_embeddings - 1
    if y is None:
        y = torch.full((emb.shape[0],), null, device=emb.device, dtype=torch.long)
    y = torch.as_tensor(y, device=emb.device).long().reshape(-1).expand(emb.shape[0])
    if y.device.type == "cpu" and bool(((y < 0) | (y > null)).any()):  # no host sync on a GPU
        raise ValueError(f"class labels must lie in 0..{null} ({null} = the null class)")
    return emb + table(y).to(emb.dtype)


class DoubleConv(nn.Module):
    """conv3x3 -> GroupNorm -> GELU -> conv3x3 -> GroupNorm, with an optional residual GELU(x + f(x))."""

    def __init__(self, in_ch: int, out_ch: int, mid_ch: int | None = None, residual: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        mid_ch = mid_ch or out_ch
        self.residual = residual
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_ch, mid_ch, 3, padding=1, bias=False),
            nn.GroupNorm(1, mid_ch),
            nn.GELU(),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.Conv2d(mid_ch, out_ch, 3, padding=1, bias=False),
            nn.GroupNorm(1, out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual:
            return F.gelu(x + self.double_conv(x))
        return self.double_conv(x)


class Down(nn.Module):
    """Halve the resolution, then add a projection of the time embedding."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.maxpool_conv = nn.Sequential(
            nn.MaxPool2d(2),
            DoubleConv(in_ch, in_ch, residual=True, dropout=dropout),
            DoubleConv(in_ch, out_ch, dropout=dropout),
        )
        self.emb_layer = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.maxpool_conv(x)
        return x + self.emb_layer(emb)[:, :, None, None]


class Up(nn.Module):
    """Double the resolution, concatenate the skip connection, then add the time projection."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = nn.Sequential(
            DoubleConv(in_ch, in_ch, residual=True, dropout=dropout),
            DoubleConv(in_ch, out_ch, in_ch // 2, dropout=dropout),
        )
        self.emb_layer = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch))

    def forward(self, x: torch.Tensor, skip: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = torch.cat([skip, self.up(x)], dim=1)
        x = self.conv(x)
        return x + self.emb_layer(emb)[:, :, None, None]


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention over all pixels, then a pre-norm feed-forward."""

    def __init__(self, channels: int, num_heads: int = 4):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide channels={channels}")
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.ff = nn.Sequential(
            nn.LayerNorm(channels),
            nn.Linear(channels, channels),
            nn.GELU(),
            nn.Linear(channels, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)                      # (B, HW, C)
        q, k, v = self.qkv(self.norm(tokens)).chunk(3, dim=-1)
        q, k, v = (z.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for z in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v)              # (B, heads, HW, C/heads)
        tokens = tokens + self.proj(attn.transpose(1, 2).flatten(2))
        tokens = tokens + self.ff(tokens)
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class UNet(nn.Module):
    """Encoder-decoder with skip connections, self-attention and time conditioning.

    Level k works at 1/2**k of the input resolution with `base_channels * channel_mults[k]`
    channels; the input side must be divisible by 2**(len(channel_mults) - 1). The defaults
    reproduce the seed tutorial's 64x64 network (attention after every Down and Up block).
    `num_classes` > 0 adds a learned class embedding to the time embedding (see `add_class`).
    """

    def __init__(self, c_in: int = 3, c_out: int = 3, time_dim: int = 256, base_channels: int = 64,
                 channel_mults: tuple[int, ...] = (1, 2, 4, 4), attn_levels: tuple[int, ...] = (0, 1, 2, 3),
                 num_heads: int = 4, dropout: float = 0.0, device: str | torch.device | None = None,
                 num_classes: int = 0):
        super().__init__()
        self.time_dim = time_dim
        self.num_classes = num_classes
        self.num_levels = len(channel_mults)
        ch = [base_channels * m for m in channel_mults]
        last = len(ch) - 1
        attn = set(attn_levels)

        def maybe_attn(channels: int, level: int) -> nn.Module:
            return SelfAttention(channels, num_heads) if level in attn else nn.Identity()

        self.inc = DoubleConv(c_in, ch[0], dropout=dropout)
        self.downs = nn.ModuleList(Down(ch[i], ch[i + 1], time_dim, dropout) for i in range(last))
        self.down_attn = nn.ModuleList(maybe_attn(ch[i + 1], i + 1) for i in range(last))
        self.bot = nn.Sequential(
            DoubleConv(ch[last], 2 * ch[last], dropout=dropout),
            DoubleConv(2 * ch[last], 2 * ch[last], dropout=dropout),
            DoubleConv(2 * ch[last], ch[last], dropout=dropout),
        )
        ups, up_attn, width = [], [], ch[last]
        for level in reversed(range(last)):           # the skip from `level` joins here
            out = ch[max(level - 1, 0)]
            ups.append(Up(width + ch[level], out, time_dim, dropout))
            up_attn.append(maybe_attn(out, level))
            width = out
        self.ups = nn.ModuleList(ups)
        self.up_attn = nn.ModuleList(up_attn)
        self.outc = nn.Conv2d(width, c_out, kernel_size=1)
        self.grad_checkpointing = False
        if num_classes > 0:  # registered last, so an unconditional network's layout is unchanged
            self.label_emb = class_table(num_classes, time_dim)
        if device is not None:
            self.to(device)

    def set_grad_checkpointing(self, flag: bool = True) -> None:
        """Recompute the Down/Up, middle and attention blocks in backward instead of storing their
        activations (only while training with gradients enabled); gradients are unchanged."""
        self.grad_checkpointing = bool(flag)

    def _block(self, block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if isinstance(block, nn.Identity):
            return args[0]
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def pos_encoding(self, t: torch.Tensor, channels: int) -> torch.Tensor:
        """The seed's name for the sinusoidal time embedding."""
        return timestep_embedding(t, channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """`y`: class labels (num_classes = null) of a class-conditional network; None = null class."""
        factor = 2 ** (self.num_levels - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"input size {tuple(x.shape[-2:])} must be divisible by {factor}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = add_class(timestep_embedding(t, self.time_dim).to(x.dtype), getattr(self, "label_emb", None), y)
        skips = [self._block(self.inc, x)]
        h = skips[0]
        for down, attn in zip(self.downs, self.down_attn):
            h = self._block(attn, self._block(down, h, emb))
            skips.append(h)
        h = self._block(self.bot, skips.pop())
        for up, attn in zip(self.ups, self.up_attn):
            h = self._block(attn, self._block(up, h, skips.pop(), emb))
        return self.outc(h)
