"""The diffusers format: an ADM network as a `DDPMPipeline` folder, and such a folder read back.

`export_diffusers` writes, without importing diffusers:

    OUT/model_index.json                          DDPMPipeline = UNet2DModel + DDPMScheduler
    OUT/unet/config.json                          the UNet2DModel that computes this network
    OUT/unet/diffusion_pytorch_model.safetensors  its weights
    OUT/scheduler/scheduler_config.json           beta schedule, T, prediction type, variance, clipping
    OUT/README.md                                 a model card

so that `DDPMPipeline.from_pretrained(OUT)` samples from it. `read_unet` maps a UNet2DModel
folder back onto an ADM config and a ddpmkit state dict (`ddpm train --init-from`).

Both networks follow ADM (Dhariwal & Nichol 2021, App. A), and every ADM piece has its
UNet2DModel counterpart: the MLP on sinusoidal timestep features (`time_embedding`), AdaGN
(`resnet_time_scale_shift="scale_shift"`: GroupNorm(h) * (1 + scale) + shift), residual blocks
with a 1x1 skip when the width changes (`conv_shortcut`), a stride-2 3x3 conv down and
nearest + 3x3 conv up (`downsample_type` / `upsample_type` "conv"), one skip per encoder step
concatenated after the decoder's input, a middle of ResBlock-Attention-ResBlock, the class
embedding added to the time embedding (`num_class_embeds`), and a GroupNorm-SiLU-conv head. The
weights are mapped by walking both layouts level by level (`_pairs`), never by key order.

Three ADM details are settings of both networks and must agree (`model_problems` refuses,
in one line naming the reason, a config where they cannot):
  * GroupNorm groups. UNet2DModel has one `norm_num_groups` for every norm; ddpmkit's ADM has
    `model.norm_groups` for all of them, or, when that is 0, picks each norm's groups from its
    width (`models.adm.norm_groups`: 8 at 32 channels, 16 at 64, 32 from 128), which maps only
    when every width gets the same count.
  * The sinusoidal timestep features. ddpmkit's time MLP reads `model.time_features` of them
    (0: `model.time_dim`), UNet2DModel's `block_out_channels[0]`; the MLP's width is `time_dim`
    in both (`time_embedding_dim`). Equal feature widths map exactly; a narrower ddpmkit width
    maps through `freq_shift`, which makes UNet2DModel's first time_features / 2 frequencies
    ddpmkit's, with zero weights on the others. Wider features cannot be expressed.
  * The attention head width: ddpmkit fixes the number of heads, UNet2DModel the head width
    (`attention_head_dim`), so every attention layer must have the same width.
The ADM presets (tiny, small, cifar) read features as wide as their first level and use one
group count throughout, so each exports exactly. Checkpoints made with the earlier presets
(256 time features and groups chosen per width) do not, and the refusal says so.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..checkpoint import config_of, load_checkpoint, load_state, model_from_config
from ..config import PRESETS, Config, ModelConfig
from ..errors import DdpmError

UNET_DIR, SCHEDULER_DIR = "unet", "scheduler"
UNET_CONFIG, UNET_WEIGHTS = "config.json", "diffusion_pytorch_model.safetensors"
SCHEDULER_CONFIG, PIPELINE_INDEX = "scheduler_config.json", "model_index.json"
DIFFUSERS_VERSION = "0.21.0"  # the first release with every UNet2DModel option written here (attn_norm_num_groups)
GROUPNORM_EPS = 1e-5          # torch's default, which ddpmkit's GroupNorms use

PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2", "sigmoid": "sigmoid"}
VARIANCE = {"beta": "fixed_large", "posterior": "fixed_small"}  # a learned variance is "learned_range"


# --- which ADM configs UNet2DModel can express ---------------------------------------------------

def _widths(m: ModelConfig) -> list[int]:
    return [m.base_channels * k for k in m.channel_mults]


def _norm_groups(m: ModelConfig, c_in: int, c_out: int) -> dict[int, int]:
    """{channels: groups} of every GroupNorm of the ADM network `m` describes (built on the meta device)."""
    from ..models.registry import build_model

    with torch.device("meta"):
        net = build_model(m, c_in, c_out)
    return {mod.num_channels: mod.num_groups for mod in net.modules() if isinstance(mod, torch.nn.GroupNorm)}


def _attention_widths(m: ModelConfig) -> set[int]:
    """Channels of every attention layer: the attention levels' widths and the middle's (always attended)."""
    widths = _widths(m)
    return {widths[k] for k in m.attn_levels} | {widths[-1]}


def time_features(m: ModelConfig) -> int:
    """Width of the sinusoidal timestep features the ADM network `m` reads (`model.time_features`, 0: time_dim)."""
    return m.time_features or m.time_dim


def _current_preset(m: ModelConfig, c_in: int, c_out: int) -> str | None:
    """The preset `m` is named after, when today's preset maps onto UNet2DModel and `m`'s time
    features or GroupNorms differ from it (a checkpoint of an earlier preset); None otherwise."""
    p = PRESETS.get(m.size)
    if p is None or p.arch != "adm" or not p.norm_groups or not p.time_features:
        return None
    if (time_features(m), m.norm_groups) == (p.time_features, p.norm_groups):
        return None
    return m.size if not model_problems(p, c_in, c_out) else None


def model_problems(m: ModelConfig, c_in: int, c_out: int) -> list[str]:
    """Why UNet2DModel cannot compute the network `m` describes exactly; [] when it can."""
    if m.arch != "adm":
        return [f"its network is the seed UNet (model.arch={m.arch}), whose blocks (GELU double convs, max-pool, "
                "bilinear upsampling, LayerNorm attention) UNet2DModel does not have"]
    if m.pruned:
        return ["it is pruned (model.pruned): its layers have widths no UNet2DModel config describes"]
    problems = []
    groups = _norm_groups(m, c_in, c_out)
    if len(set(groups.values())) > 1:
        listed = ", ".join(f"{g} at {c}" for c, g in sorted(groups.items()))
        problems.append(f"its GroupNorms use different group counts ({listed} channels) while UNet2DModel has one "
                        "norm_num_groups (model.norm_groups gives every GroupNorm the same count)")
    first, features = _widths(m)[0], time_features(m)
    if features > first:
        problems.append(f"its sinusoidal timestep features are {features} wide (model.time_features="
                        f"{m.time_features}, time_dim={m.time_dim}), UNet2DModel's block_out_channels[0]={first} "
                        "wide (needs model.time_features <= base_channels * channel_mults[0])")
    heads = sorted({w // m.num_heads for w in _attention_widths(m)})
    if len(heads) > 1:
        problems.append(f"its attention heads are {' and '.join(map(str, heads))} channels wide at different levels "
                        "(num_heads fixed), UNet2DModel has one attention_head_dim")
    preset = _current_preset(m, c_in, c_out) if problems else None
    if preset:
        p = PRESETS[preset]
        why = (f"their time MLP reads {time_features(m)} features, the preset's {p.time_features}"
               if time_features(m) != p.time_features
               else f"the preset has {p.norm_groups} GroupNorm groups throughout")
        problems.append(f"it is a '{preset}' network from before the presets matched UNet2DModel (or with "
                        f"model.time_features / model.norm_groups changed); today's {preset} (time_features="
                        f"{p.time_features}, norm_groups={p.norm_groups}) exports exactly, so train a new run with "
                        f"--model-size {preset} (--init-from cannot carry these weights into it: {why})")
    return problems


def export_problems(cfg: Config, c_in: int, c_out: int) -> list[str]:
    """Why a checkpoint with config `cfg` cannot become an exact DDPMPipeline; [] when it can."""
    d = cfg.diffusion
    problems = []
    if cfg.autoencoder.path:
        problems.append("it is a latent diffusion model and DDPMPipeline works on pixels")
    if d.objective != "vp":
        problems.append(f"it is trained with the {d.objective.upper()} objective, whose preconditioning and "
                        "continuous noise levels DDPMScheduler does not have")
    if cfg.distill.method:
        problems.append(f"it is a distilled student ({cfg.distill.method}) that samples with its own few-step "
                        "sampler, not DDPMScheduler's")
    return problems + model_problems(cfg.model, c_in, c_out)


# --- the two layouts, level by level -------------------------------------------------------------
# Each pair is (ddpmkit module, diffusers module, kind); kind says how the tensors convert:
# "same" copies weight/bias, "qkv" splits ddpmkit's fused 1x1-conv qkv into to_q/to_k/to_v,
# "proj" turns a 1x1 conv into a Linear, "time" places the first Linear's columns (see `_time_columns`).

def _res(a: str, b: str) -> list[tuple[str, str, str]]:
    return [(f"{a}.norm1", f"{b}.norm1", "same"), (f"{a}.conv1", f"{b}.conv1", "same"),
            (f"{a}.emb", f"{b}.time_emb_proj", "same"), (f"{a}.norm2", f"{b}.norm2", "same"),
            (f"{a}.conv2", f"{b}.conv2", "same"), (f"{a}.skip", f"{b}.conv_shortcut", "same")]


def _attn(a: str, b: str) -> list[tuple[str, str, str]]:
    return [(f"{a}.norm", f"{b}.group_norm", "same"), (f"{a}.qkv", b, "qkv"), (f"{a}.proj", f"{b}.to_out.0", "proj")]


def _pairs(m: ModelConfig) -> list[tuple[str, str, str]]:
    """Every (ddpmkit, diffusers) module pair of the ADM network `m`, following `ADMUNet._encoder`
    / `_decoder` and UNet2DModel's down_blocks / mid_block / up_blocks."""
    levels, attn, n = len(m.channel_mults), set(m.attn_levels), m.num_res_blocks
    pairs = [("time_mlp.0", "time_embedding.linear_1", "time"), ("time_mlp.2", "time_embedding.linear_2", "same"),
             ("conv_in", "conv_in", "same"), ("label_emb", "class_embedding", "same"),
             ("out.0", "conv_norm_out", "same"), ("out.2", "conv_out", "same")]
    step = 0
    for level in range(levels):  # encoder: n residual steps per level, then a downsampling step
        for i in range(n):
            pairs += _res(f"enc.{step}.0", f"down_blocks.{level}.resnets.{i}")
            if level in attn:
                pairs += _attn(f"enc.{step}.1", f"down_blocks.{level}.attentions.{i}")
            step += 1
        if level < levels - 1:
            pairs.append((f"enc.{step}.0.conv", f"down_blocks.{level}.downsamplers.0.conv", "same"))
            step += 1
    pairs += _res("mid.0", "mid_block.resnets.0") + _attn("mid.1", "mid_block.attentions.0")
    pairs += _res("mid.2", "mid_block.resnets.1")
    step = 0
    for block, level in enumerate(reversed(range(levels))):  # decoder: deepest level first, n + 1 steps each
        for i in range(n + 1):
            pairs += _res(f"dec.{step}.0", f"up_blocks.{block}.resnets.{i}")
            if level in attn:
                pairs += _attn(f"dec.{step}.1", f"up_blocks.{block}.attentions.{i}")
            if level > 0 and i == n:
                pairs.append((f"dec.{step}.{2 if level in attn else 1}.conv", f"up_blocks.{block}.upsamplers.0.conv",
                              "same"))
            step += 1
    return pairs


def _time_columns(features: int, first_width: int) -> torch.Tensor:
    """Where ddpmkit's timestep features [sin(t w_i), cos(t w_i)], i < features / 2, sit among
    UNet2DModel's [sin(t w'_j), cos(t w'_j)], j < first_width // 2, with w'_j = w_j (`freq_shift`)."""
    half, half_d = features // 2, first_width // 2
    return torch.cat([torch.arange(half), half_d + torch.arange(half)])


def to_diffusers(state: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """An ADM state dict (ddpmkit layout) as UNet2DModel's."""
    out, used = {}, set()
    first = _widths(m)[0]
    for a, b, kind in _pairs(m):
        for suffix in ("weight", "bias"):
            key = f"{a}.{suffix}"
            if key not in state:
                continue
            used.add(key)
            w = state[key]
            if kind == "qkv":  # rows [q; k; v], each head's channels contiguous: ADMUNet's reshape(b, 3, heads, ...)
                for name, part in zip(("to_q", "to_k", "to_v"), w.chunk(3, dim=0)):
                    out[f"{b}.{name}.{suffix}"] = part.flatten(1) if suffix == "weight" else part
            elif kind == "proj":
                out[f"{b}.{suffix}"] = w.flatten(1) if suffix == "weight" else w
            elif kind == "time" and suffix == "weight":
                full = w.new_zeros(w.shape[0], first)
                full[:, _time_columns(time_features(m), first)] = w
                out[f"{b}.{suffix}"] = full
            else:
                out[f"{b}.{suffix}"] = w
    left = sorted(set(state) - used)
    if left:  # cannot happen for a network built from `m`; guards the walk above
        raise DdpmError(f"cannot map the weights {', '.join(left[:3])} onto UNet2DModel")
    return {k: v.contiguous() for k, v in out.items()}


def from_diffusers(state: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """A UNet2DModel state dict as the ADM state dict (ddpmkit layout) of `m`; the inverse of `to_diffusers`."""
    out, used = {}, set()
    first = _widths(m)[0]

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return state[key]

    for a, b, kind in _pairs(m):
        for suffix in ("weight", "bias"):
            if kind == "qkv":
                if f"{b}.to_q.{suffix}" in state:
                    parts = [take(f"{b}.{name}.{suffix}") for name in ("to_q", "to_k", "to_v")]
                    w = torch.cat(parts)
                    out[f"{a}.{suffix}"] = w[:, :, None, None] if suffix == "weight" else w
            elif f"{b}.{suffix}" in state:
                w = take(f"{b}.{suffix}")
                if kind == "proj" and suffix == "weight":
                    w = w[:, :, None, None]
                elif kind == "time" and suffix == "weight":
                    cols = _time_columns(time_features(m), first)
                    rest = torch.ones(w.shape[1], dtype=torch.bool)
                    rest[cols] = False
                    if bool((w[:, rest] != 0).any()):
                        raise DdpmError("its timestep MLP uses sinusoidal features that ddpmkit's time embedding "
                                        f"(model.time_features={time_features(m)}) does not have")
                    w = w[:, cols]
                out[f"{a}.{suffix}"] = w
    left = sorted(set(state) - used)
    if left:
        raise DdpmError(f"it holds weights an ADM network does not have ({', '.join(left[:3])})")
    return out


# --- configs ----------------------------------------------------------------------------------

def unet_config(m: ModelConfig, c_in: int, c_out: int, image_size: int | list[int]) -> dict[str, Any]:
    """The UNet2DModel config.json of the ADM network `m` (which `model_problems` accepted)."""
    widths, attn = _widths(m), set(m.attn_levels)
    groups = next(iter(_norm_groups(m, c_in, c_out).values()))
    return {
        "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": image_size, "in_channels": c_in, "out_channels": c_out, "center_input_sample": False,
        # ddpmkit's F = time_features features are [sin, cos] with w_i = 10000^(-i / (F / 2)) (Vaswani et al.
        # 2017, §3.5; models/unet.timestep_embedding); UNet2DModel's w_j = 10000^(-j / (first_width // 2 -
        # freq_shift)), equal for j < F / 2 with this shift. The MLP (Linear, SiLU, Linear) is time_dim wide.
        "time_embedding_type": "positional", "time_embedding_dim": m.time_dim, "flip_sin_to_cos": False,
        "freq_shift": widths[0] // 2 - time_features(m) // 2,
        "down_block_types": ["AttnDownBlock2D" if k in attn else "DownBlock2D" for k in range(len(widths))],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if k in attn else "UpBlock2D" for k in reversed(range(len(widths)))],
        "block_out_channels": widths, "layers_per_block": m.num_res_blocks, "mid_block_scale_factor": 1,
        "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": m.dropout,
        "act_fn": "silu", "attention_head_dim": widths[-1] // m.num_heads, "norm_num_groups": groups,
        "attn_norm_num_groups": groups, "norm_eps": GROUPNORM_EPS, "resnet_time_scale_shift": "scale_shift",
        "add_attention": True, "class_embed_type": None,
        # ddpmkit's class table has one more row, the null class of classifier-free guidance
        "num_class_embeds": m.num_classes + 1 if m.num_classes else None,
    }


def scheduler_config(cfg: Config) -> dict[str, Any]:
    """The DDPMScheduler config that reproduces the checkpoint's discrete VP process and its `ddpm` sampler."""
    d = cfg.diffusion
    return {
        "_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": d.timesteps, "beta_schedule": SCHEDULE[d.schedule],
        "beta_start": d.beta_start, "beta_end": d.beta_end, "trained_betas": None,
        "rescale_betas_zero_snr": d.zero_terminal_snr,  # Lin et al. (2024) Alg. 1, as schedules.rescale_zero_terminal_snr
        "prediction_type": PREDICTION[d.prediction],
        # Improved DDPM Eq. (15): the network's extra channels interpolate log beta and log beta-tilde
        "variance_type": "learned_range" if d.learn_sigma else VARIANCE[d.variance],
        "clip_sample": d.clip_denoised, "clip_sample_range": 1.0, "thresholding": False,
        "timestep_spacing": "trailing", "steps_offset": 0,  # ddpmkit's ddpm sampler spaces its steps "trailing"
    }


def _model_card(cfg: Config, ckpt_path) -> str:
    m, d = cfg.model, cfg.diffusion
    classes = ""
    if m.num_classes:
        names = ", ".join(f"{i}: {n}" for i, n in enumerate(m.class_names or map(str, range(m.num_classes))))
        classes = (f"\nClass-conditional: pass `class_labels` to the UNet ({names}; {m.num_classes} is the null "
                   "class used for classifier-free guidance). DDPMPipeline itself passes no labels.\n")
    task = "" if m.num_classes else "pipeline_tag: unconditional-image-generation\n"
    return f"""---
library_name: diffusers
tags: [ddpmkit]
{task}---
# {Path(str(ckpt_path)).parent.name or 'ddpmkit model'}

A {cfg.data.hw[0]}x{cfg.data.hw[1]} diffusion model trained with ddpmkit (ADM backbone, \
{d.timesteps} steps, {d.schedule} schedule, {d.prediction}-prediction), exported as a diffusers `DDPMPipeline`.
{classes}
```python
from diffusers import DDPMPipeline
pipe = DDPMPipeline.from_pretrained("THIS_FOLDER_OR_REPO")
images = pipe(batch_size=4, num_inference_steps=250).images
```
"""


# --- writing and reading ---------------------------------------------------------------------------

def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def export_diffusers(ckpt_path: str | Path, out_dir: str | Path, ema: bool = True) -> Path:
    """Write OUT_DIR as a diffusers DDPMPipeline folder from a checkpoint (EMA weights by default);
    a config UNet2DModel cannot compute exactly is a one-line DdpmError saying why."""
    from ..latent import refuse_autoencoder_checkpoint

    ckpt = load_checkpoint(ckpt_path, accept_seed=True)
    refuse_autoencoder_checkpoint(ckpt, ckpt_path)
    cfg = config_of(ckpt, ckpt_path)
    c_in = cfg.data.channels or 3
    c_out = 2 * c_in if cfg.diffusion.learn_sigma else c_in
    problems = export_problems(cfg, c_in, c_out)
    if problems:
        raise DdpmError(f"cannot export {ckpt_path} to diffusers exactly: {'; '.join(problems)}; "
                        "`--format ddpmkit` exports any model (see docs/ecosystem.md)")
    key = "ema_state_dict" if ema and ckpt.get("ema_state_dict") is not None else "model_state_dict"
    model, _ = model_from_config(cfg)
    load_state(model, ckpt[key], ckpt_path)  # proves the weights fit the config before writing anything
    state = to_diffusers(model.state_dict(), cfg.model)
    out_dir = Path(out_dir)
    try:
        for sub in (UNET_DIR, SCHEDULER_DIR):
            (out_dir / sub).mkdir(parents=True, exist_ok=True)
        tmp = out_dir / UNET_DIR / f".{UNET_WEIGHTS}.tmp{os.getpid()}"
        save_file(state, str(tmp), metadata={"format": "pt", "source": "ddpmkit", "weights": key.split("_")[0]})
        os.replace(tmp, out_dir / UNET_DIR / UNET_WEIGHTS)
        _write_json(out_dir / UNET_DIR / UNET_CONFIG, unet_config(cfg.model, c_in, c_out, list(cfg.data.hw) if cfg.data.image_width else cfg.data.image_size))
        _write_json(out_dir / SCHEDULER_DIR / SCHEDULER_CONFIG, scheduler_config(cfg))
        _write_json(out_dir / PIPELINE_INDEX, {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                                               "scheduler": ["diffusers", "DDPMScheduler"],
                                               "unet": ["diffusers", "UNet2DModel"]})
        (out_dir / "README.md").write_text(_model_card(cfg, ckpt_path))
    except OSError as exc:
        raise DdpmError(f"cannot write the export to {out_dir}: {os.strerror(exc.errno) if exc.errno else exc}") from None
    return out_dir


# What ddpmkit's ADM fixes and a UNet2DModel config may set otherwise: key -> the value ADM needs.
_FIXED = {"center_input_sample": False, "time_embedding_type": "positional", "flip_sin_to_cos": False,
          "mid_block_type": "UNetMidBlock2D", "mid_block_scale_factor": 1, "downsample_padding": 1,
          "downsample_type": "conv", "upsample_type": "conv", "act_fn": "silu", "norm_eps": GROUPNORM_EPS,
          "resnet_time_scale_shift": "scale_shift", "add_attention": True, "class_embed_type": None}
# UNet2DModel's defaults for the keys above and the others read here, for configs that leave them out.
_DEFAULTS = {"center_input_sample": False, "time_embedding_type": "positional", "time_embedding_dim": None,
             "freq_shift": 0, "flip_sin_to_cos": True, "mid_block_type": "UNetMidBlock2D",
             "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv",
             "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu", "attention_head_dim": 8,
             "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
             "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
             "num_class_embeds": None, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
             "block_out_channels": [224, 448, 672, 896], "sample_size": None,
             "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
             "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}


def unet_folder(path: str | Path) -> Path | None:
    """The UNet2DModel folder of a diffusers pipeline folder (its unet/) or a UNet2DModel folder; None otherwise."""
    path = Path(path)
    for folder in (path / UNET_DIR, path):
        config = folder / UNET_CONFIG
        if config.is_file():
            try:
                if json.loads(config.read_text()).get("_class_name") == "UNet2DModel":
                    return folder
            except (ValueError, OSError, AttributeError):
                return None
    return None


def adm_of_unet(config: dict[str, Any]) -> tuple[ModelConfig, int, int]:
    """(the ADM ModelConfig, in channels, out channels) of a UNet2DModel config; a DdpmError names
    what has no ADM counterpart."""
    import math

    c = {**_DEFAULTS, **config}
    wrong = [f"{k}={c[k]!r} (ADM: {v!r})" for k, v in _FIXED.items() if c[k] != v]
    widths = [int(w) for w in c["block_out_channels"]]
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    kinds = {"DownBlock2D": False, "AttnDownBlock2D": True}
    if any(t not in kinds for t in down) or [t.replace("Down", "Up") for t in reversed(down)] != up:
        wrong.append(f"blocks {down} / {up} (ADM: DownBlock2D / AttnDownBlock2D, mirrored by the up blocks)")
    if c["num_class_embeds"] is not None and c["num_class_embeds"] < 2:
        wrong.append(f"num_class_embeds={c['num_class_embeds']} (ddpmkit: classes + a null class)")
    if wrong:
        raise DdpmError(f"it is a UNet2DModel that is not an ADM network: {'; '.join(wrong)}")
    base = math.gcd(*widths)
    attn = tuple(k for k, t in enumerate(down) if kinds[t])
    head = c["attention_head_dim"] or widths[-1]  # None: one head per layer
    time_dim = c["time_embedding_dim"] or 4 * widths[0]  # UNet2DModel's default MLP width
    # UNet2DModel's frequencies w_j = 10000^(-j / (first // 2 - freq_shift)), j < first // 2, are ddpmkit's
    # for time_features = 2 * (first // 2 - freq_shift); its MLP must give the others zero weight (`from_diffusers`).
    shift, half = c["freq_shift"], widths[0] // 2
    features = 2 * (half - int(shift)) if isinstance(shift, (int, float)) and float(shift).is_integer() else 0
    groups = c["norm_num_groups"]
    fits = isinstance(groups, int) and groups > 0 and all(w % groups == 0 for w in widths)
    m = ModelConfig(size="custom", arch="adm", base_channels=base, channel_mults=tuple(w // base for w in widths),
                    attn_levels=attn, num_heads=max(1, widths[-1] // head), time_dim=time_dim,
                    dropout=float(c["dropout"]), num_res_blocks=int(c["layers_per_block"]),
                    num_classes=int(c["num_class_embeds"]) - 1 if c["num_class_embeds"] else 0,
                    time_features=features, norm_groups=groups if fits else 0)
    c_in, c_out = int(c["in_channels"]), int(c["out_channels"])
    wrong = []
    if not 0 < features <= widths[0]:
        wrong.append(f"its sinusoidal frequencies (block_out_channels[0]={widths[0]}, freq_shift={shift}) are not "
                     "ddpmkit's for any width of time features (needs 0 <= freq_shift < block_out_channels[0] // 2)")
    if time_dim % 2:
        wrong.append(f"time_embedding_dim={time_dim} is odd (ddpmkit's time_dim is even)")
    if any(w % head for w in _attention_widths(m)):
        wrong.append(f"attention_head_dim={head} does not divide every attention layer's width")
    if not fits or c["attn_norm_num_groups"] != groups:
        wrong.append(f"norm_num_groups={groups}, attn_norm_num_groups={c['attn_norm_num_groups']} (ddpmkit's ADM "
                     f"needs one group count for every GroupNorm that divides every width {widths})")
    if not wrong:  # a network that builds: what else ADM cannot express (a head count that differs per level)
        wrong = model_problems(m, c_in, c_out)
    if wrong:
        raise DdpmError(f"it is a UNet2DModel that ddpmkit's ADM cannot reproduce: {'; '.join(wrong)}")
    return m, c_in, c_out


def read_unet(folder: str | Path) -> tuple[ModelConfig, int, int, dict[str, torch.Tensor]]:
    """(ADM ModelConfig, in channels, out channels, ddpmkit state dict) of a UNet2DModel folder."""
    folder = Path(folder)
    try:
        config = json.loads((folder / UNET_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise DdpmError(f"{folder / UNET_CONFIG} is unreadable ({' '.join(str(exc).split())[:120]})") from None
    weights = folder / UNET_WEIGHTS
    if not weights.is_file():
        other = [p.name for p in folder.glob("diffusion_pytorch_model*")]
        hint = (f" (found {', '.join(other)}: only an unsharded float .safetensors file loads without pickle; "
                "re-save it with `UNet2DModel.save_pretrained(DIR, safe_serialization=True)`)" if other else "")
        raise DdpmError(f"{folder} has no {UNET_WEIGHTS}{hint}")
    m, c_in, c_out = adm_of_unet(config)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DdpmError(f"{weights} is damaged ({' '.join(str(exc).split())[:120]})") from None
    return m, c_in, c_out, from_diffusers(state, m)
