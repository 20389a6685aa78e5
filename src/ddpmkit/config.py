"""Configuration: one dataclass per concern, merged from defaults, a checkpoint, a file and flags.

Every field has a comment and a default; the defaults of `TrainConfig` and `DataConfig` are
the seed tutorial's `launch()` values. A whole `Config` is stored in every checkpoint, so a
checkpoint can rebuild its own model and diffusion process.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from .errors import DdpmError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class ModelConfig:
    size: str = "seed"                       # preset in PRESETS below the fields started from, or custom
    arch: str = "unet"                       # unet: the seed tutorial's network | adm: ADM-style (models/adm.py)
    base_channels: int = 64                  # channels at full resolution
    channel_mults: tuple[int, ...] = (1, 2, 4, 4)  # channels per level = base * mult; len-1 downsamplings
    attn_levels: tuple[int, ...] = (0, 1, 2, 3)    # levels with self-attention; level k is image_size / 2**k
    num_heads: int = 4                       # attention heads
    time_dim: int = 256                      # sinusoidal time-embedding width (adm: also its MLP's width)
    time_features: int = 0                   # adm: width of the sinusoidal features the time MLP reads (0: time_dim)
    norm_groups: int = 0                     # adm: groups of every GroupNorm (0: chosen per width, adm.norm_groups)
    dropout: float = 0.0                     # dropout inside the conv blocks
    num_res_blocks: int = 2                  # adm: residual blocks per level (the decoder has one more); unet: unused
    num_classes: int = 0                     # > 0: class-conditional (set by train.class_cond from the data's classes)
    class_names: tuple[str, ...] = ()        # the name of each class, in label order (stored in checkpoints)
    pruned: tuple[str, ...] = ()             # layers resized by `ddpm prune`, "NAME:A:B" each (models/widths.py)


# Network architectures `build_model` knows (models/registry.py dispatches on these names).
ARCHS = ("unet", "adm")

# Named model sizes (`--model-size NAME`), each a complete ModelConfig. A checkpoint stores the
# fields, not the name's meaning, so changing a preset never changes an old checkpoint's model;
# checkpoints from before `arch` existed load as arch="unet".
PRESETS: dict[str, ModelConfig] = {
    # The ADM presets read sinusoidal time features as wide as their first level and use one GroupNorm
    # group count throughout, so each maps exactly onto diffusers' UNet2DModel (`ddpm export --format
    # diffusers`). Checkpoints store their fields, so runs made before this keep their networks.
    # 1.40M parameters: the CPU demo (16x16 or 32x32 images); about the old UNet tiny's cost per image.
    "tiny": ModelConfig(size="tiny", arch="adm", base_channels=32, channel_mults=(1, 2, 2), attn_levels=(2,),
                        num_heads=4, time_dim=256, num_res_blocks=1, time_features=32, norm_groups=8),
    # 7.7M parameters: small datasets at 32x32 on one GPU or a patient CPU.
    "small": ModelConfig(size="small", arch="adm", base_channels=64, channel_mults=(1, 1, 2, 2), attn_levels=(2,),
                         num_heads=4, time_dim=256, num_res_blocks=2, time_features=64, norm_groups=16),
    # The seed tutorial's UNet (23.3M at 3 channels): attention after every Down and Up block.
    "seed": ModelConfig(size="seed", arch="unet", base_channels=64, channel_mults=(1, 2, 4, 4),
                        attn_levels=(0, 1, 2, 3), num_heads=4, time_dim=256),
    # 31.4M parameters, DDPM-CIFAR-10's layout (Ho et al. 2020, App. B: 128 channels, 35.7M) at 120 channels:
    # 2 residual blocks per level, attention at 16x16, dropout 0.1.
    "cifar": ModelConfig(size="cifar", arch="adm", base_channels=120, channel_mults=(1, 2, 2, 2), attn_levels=(1,),
                         num_heads=4, time_dim=256, dropout=0.1, num_res_blocks=2, time_features=120,
                         norm_groups=30),
}


def preset(name: str) -> ModelConfig:
    """A fresh copy of the named preset."""
    if name not in PRESETS:
        raise DdpmError(f"unknown model size '{name}'; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


@dataclass
class DiffusionConfig:
    timesteps: int = 1000                    # T, number of discrete diffusion steps
    schedule: str = "linear"                 # beta schedule: linear | cosine | sigmoid
    beta_start: float = 1e-4                 # linear/sigmoid schedule: first beta
    beta_end: float = 0.02                   # linear/sigmoid schedule: last beta
    zero_terminal_snr: bool = False          # rescale so alpha_bar_T = 0 (Lin et al. 2024)
    prediction: str = "eps"                  # what the network predicts: eps | x0 | v
    loss_weighting: str = "none"             # none | min_snr (Hang et al. 2023)
    min_snr_gamma: float = 5.0               # gamma of min-SNR weighting
    variance: str = "beta"                   # ancestral-sampler variance: beta (sigma^2=beta_t) | posterior (beta-tilde)
    clip_denoised: bool = True               # sampling: clamp every x0 estimate to [-1, 1], inside ODE solvers too
                                             # (changes their ODE; see samplers.py); `ddpm sample --clip` overrides
    learn_sigma: bool = False                # learn the reverse variance: hybrid loss of Nichol & Dhariwal (2021)
    vlb_weight: float = 0.001                # lambda of L_hybrid = L_simple + lambda * L_vlb
    objective: str = "vp"                    # vp: discrete DDPM timesteps | edm: Karras et al. (2022) training
    sigma_data: float = 0.5                  # edm: std of the data
    p_mean: float = -1.2                     # edm: mean of log sigma during training
    p_std: float = 1.2                       # edm: std of log sigma during training
    sigma_min: float = 0.002                 # edm: smallest sampling sigma
    sigma_max: float = 80.0                  # edm: largest sampling sigma


@dataclass
class DataConfig:
    path: str = "builtin:digits"             # image folder, or builtin:digits | builtin:shapes
    image_size: int = 64                     # image height (and width when image_width is 0); images are
                                             # scaled to cover it, preserving aspect, and center-cropped
    channels: int = 0                        # 1 or 3; 0 = auto (a builtin's own, 3 for folders)
    hflip: bool = False                      # random horizontal flips while training
    cache_dir: str = ""                      # folder for a memory-mapped decoded-image cache; "" = in memory
    image_width: int = 0                     # image width; 0 = image_size (square). `--image-size HxW` sets both

    @property
    def hw(self) -> tuple[int, int]:
        """(height, width) of the training images."""
        return self.image_size, self.image_width or self.image_size


def as_hw(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """An image size given as one side (a square) or as (height, width), as (height, width)."""
    if isinstance(size, (tuple, list)):
        h, w = size
        return int(h), int(w)
    return int(size), int(size)


def size_text(size: int | tuple[int, int]) -> str:
    """"64" for a 64x64 square, "64x48" for 64 high and 48 wide: the way --image-size takes it."""
    h, w = as_hw(size)
    return str(h) if h == w else f"{h}x{w}"


def parse_image_size(value: Any) -> tuple[int, int]:
    """--image-size / data.image_size as (height, width 0 for a square): N, or HxW (height x width)."""
    if isinstance(value, float) and value.is_integer():  # YAML / JSON may hold 64.0
        value = int(value)
    head, sep, tail = str(value).strip().lower().partition("x")
    try:
        if not isinstance(value, (int, str)) or isinstance(value, bool):
            raise ValueError
        h, w = int(head), int(tail) if sep else 0
    except ValueError:
        raise DdpmError(f"image size {value!r} is not N (a square) or HxW (height x width); pass e.g. "
                        "--image-size 64 or --image-size 64x48") from None
    if sep and min(h, w) < 4:
        raise DdpmError(f"image size {value!r}: height and width must each be >= 4 pixels; pass e.g. "
                        "--image-size 64x48")
    return h, (0 if w == h else w)


# The widest power-function EMA (`train.ema_sigma_rel`): the flat profile's sqrt(1/12).
SIGMA_REL_MAX = math.sqrt(1 / 12)


@dataclass
class TrainConfig:
    run_name: str = "DDPM_Unconditional"     # names models/RUN, results/RUN and runs/RUN
    workdir: str = "."                       # where models/, results/ and runs/ go
    epochs: int = 500                        # total epochs (re-running with more continues the run)
    batch_size: int = 8                      # images per micro-batch and process
    grad_accum: int = 1                      # micro-batches per optimizer step (effective batch = batch_size * grad_accum * processes)
    lr: float = 3e-4                         # AdamW learning rate
    weight_decay: float = 0.0                # AdamW weight decay
    warmup_steps: int = 0                    # linear LR warmup over this many optimizer steps
    lr_schedule: str = "constant"            # after warmup: constant | cosine (to 0 at the last step of --epochs)
    grad_clip: float = 1.0                   # max global grad norm; 0 disables clipping
    ema_decay: float = 0.995                 # EMA of the weights (the seed's 0.995); 0 disables any EMA
    ema_sigma_rel: float = 0.0               # > 0: a power-function EMA of this relative width instead (Karras et al. 2024)
    precision: str = "fp32"                  # fp32 | bf16 | fp16 (autocast + loss scaling) | auto (bf16 where native)
    bf16: bool = False                       # older switch: true = precision bf16 (validate moves it there)
    compile: bool = False                    # torch.compile the network (checkpoints are the same without)
    channels_last: bool = False              # keep the network's weights and activations in NHWC memory format
    seed: int = 0                            # seeds weights, data order, noise and the sample grids
    device: str = "auto"                     # auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps
    log_every: int = 10                      # steps between TensorBoard scalars
    logger: str = "tensorboard"              # tensorboard | wandb (the [wandb] extra) | none: where scalars and grids go
    sample_every_epochs: int = 1             # epochs between sample grids; 0 = never by epoch
    sample_every_steps: int = 0              # steps between sample grids; 0 = never by step
    sample_n: int = 16                       # images in each sample grid
    sample_sampler: str = "ddpm"             # sampler for the grids
    sample_steps: int = 100                  # sampler steps for the grids (fewer keeps grids cheap)
    native_grids: bool = False               # keep sample grids at the images' size (default: enlarged to >= 256 px)
    ckpt_every_steps: int = 0                # extra checkpoints every N optimizer steps; 0 = off
    ckpt_every_minutes: float = 0.0          # extra checkpoints every M minutes; 0 = off (epoch ends always save)
    max_nonfinite_steps: int = 20            # stop after this many non-finite losses/gradients in a row
    eval_every_steps: int = 0                # log FID/KID vs the training images every N steps; 0 = off
    eval_n: int = 2000                       # samples per training-time evaluation
    eval_extractor: str = "randconv"         # randconv (fast, weight-free) | inception | auto
    eval_sampler: str = "dpm++2m"            # sampler for training-time evaluation
    eval_steps: int = 20                     # its steps
    class_cond: bool = False                 # class-conditional training on the data's labels (class folders, IDX, .npz)
    cond_drop: float = 0.1                   # probability of the null class per image (classifier-free guidance)
    grad_checkpoint: bool = False            # recompute residual/attention blocks in backward: less activation memory, slower steps


@dataclass
class DistillConfig:
    """How a few-step student was made by `ddpm distill` (empty for a model trained by `ddpm train`)."""
    method: str = ""                          # "" (not distilled) | progressive | student | consistency | sfd
    teacher: str = ""                         # the teacher checkpoint it was distilled from
    steps: int = 0                            # the student's sampling steps (NFE)
    sampler: str = ""                         # its own sampler: `ddpm sample`'s default for it ("": ddpm)


@dataclass
class AutoencoderConfig:
    """The latent-diffusion autoencoder (`ddpm train-ae`), and in a diffusion run the one it trains in."""
    path: str = ""                           # diffusion run: the `ddpm train-ae` checkpoint of its latents ("" = pixels)
    downsample: int = 4                      # image side / latent side: 2 | 4 | 8 (LDM's KL-f4, KL-f8)
    latent_channels: int = 4                 # channels of the latent
    base_channels: int = 32                  # encoder/decoder width at full resolution (x1, x2, x2, x4 per level)
    kl_weight: float = 1e-6                  # weight of KL(q(z|x) || N(0, I)) against the L1 loss (LDM's 1e-6)
    disc_weight: float = 0.0                 # weight of the patch discriminator's hinge loss; 0 = no discriminator
    disc_start: int = 5000                   # optimizer step from which the discriminator loss counts


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out = dataclasses.asdict(self)
        for section in out.values():
            for key, value in section.items():
                if isinstance(value, tuple):
                    section[key] = list(value)
        return out


# What `ddpm train` puts on top of the dataclass defaults for a NEW run: the recipe chosen by
# the same-budget quality benchmark (benchmarks/README.md, "bench_quality.py"). The dataclass
# defaults stay the seed's values, because they also give the meaning of a key that an older
# stored config lacks, and `Diffusion()` (the seed's API) predicts eps as the seed did.
#   * v-prediction: the seed's eps-prediction leaves 20-31% of DDIM/DPM-Solver++ samples speckled
#     at 30k images even on the ADM backbone (v: 0-1%), and fails outright on the seed UNet;
#   * a cosine learning-rate decay to 0 at the last epoch: 13-18% lower FD than constant;
#   * min-SNR-5 loss weighting (Hang et al. 2023): 17-25% lower FD again;
#   * the cosine noise schedule (Nichol & Dhariwal 2021): at 150k images, 2-3 points more samples
#     a digit classifier recognizes, on each of three models, at about the same FD (its
#     DPM-Solver++ speckle came from Karras levels up to sigma 4096, now capped in `samplers`).
#   * sample grids with DPM-Solver++(2M) at 20 steps, as `ddpm sample` draws by default, instead of
#     100 ancestral DDPM steps: five times fewer network calls per grid;
#   * a checkpoint every 10 minutes on top of epoch ends and SIGTERM, so a disconnect or a kill -9
#     loses at most 10 minutes of training (a save of the 31M-parameter `cifar` preset, 480 MiB with
#     its optimizer state, took 5.3 s on a 2-vCPU EPYC, under 1% of that: benchmarks/bench_ckpt.py).
#   * precision `auto`: bf16 autocast where the hardware runs bf16 natively, fp32 elsewhere. On the
#     150k-image digits benchmark (`tiny`, lr 1e-3, five draws of 1,000 each) two training seeds
#     scored FD 23.65 and 17.67 in bf16 against 22.67 and 18.01 in fp32 (mean +1.6%), and bf16
#     trained in 395-417 s against 596 s on an AVX-512 EPYC with avx512_bf16.
# Not changed: the seed's lr 3e-4 without warm-up. Against the demo's 1e-3 with 100 warm-up steps
# on the same benchmark, three training seeds each differed by less than the spread between seeds.
# The model size is chosen by the image size (`default_model_size`) when the run names none.
RECIPE: dict[str, dict[str, Any]] = {"diffusion": {"prediction": "v", "loss_weighting": "min_snr",
                                                   "schedule": "cosine"},
                                     "train": {"lr_schedule": "cosine", "sample_sampler": "dpm++2m",
                                               "sample_steps": 20, "ckpt_every_minutes": 10.0,
                                               "precision": "auto"}}


def new_run_config() -> "Config":
    """The config a new `ddpm train` run starts from, before its file, flags and --set."""
    return apply_overrides(Config(), RECIPE)


# Largest side (pixels, of the image or of a latent) trained with the `tiny` preset by default; above
# it `small`. Measured on 2 vCPUs of an AMD EPYC (docs/training.md, "Model sizes"): `tiny` trains
# at 117 img/s at 16 px and 32 img/s at 32 px, a CPU-sized model; `small` (5.3x the parameters)
# trains at 9 img/s at 32 px there, so at 64 px and up it is sized for a GPU, where the seed's
# 23.3M-parameter UNet (attention at every level) was the default before.
TINY_MAX_SIDE = 32


def default_model_size(side: int) -> str:
    """The preset a new run without any model option trains at this image (or latent) side."""
    return "tiny" if side <= TINY_MAX_SIDE else "small"


def bf16_alias(overrides: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`overrides` with an explicit `train.bf16` and no `train.precision` spelled as the precision it
    means: true is bf16, false is fp32 (not the new-run default `auto`, which may pick bf16)."""
    t = overrides.get("train", {})
    if "bf16" not in t or "precision" in t:
        return overrides
    rest = {k: v for k, v in t.items() if k != "bf16"}
    on = _coerce("train", "bf16", t["bf16"], bool)  # flags and --set give text such as "false"
    return {**overrides, "train": {**rest, "precision": "bf16" if on else "fp32"}}


def with_default_model(overrides: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`overrides` plus `model.size` chosen by `default_model_size` when they name no size (other model
    keys then apply on top of that preset, as on any named one); the side is the latent's for a latent
    run. `--model-size seed` keeps the tutorial's UNet."""
    if "size" in overrides.get("model", {}):
        return overrides
    side = max(parse_image_size(overrides.get("data", {}).get("image_size", DataConfig.image_size)))  # the longer
    ae = overrides.get("autoencoder", {})
    if ae.get("path"):
        side //= int(ae.get("downsample", AutoencoderConfig.downsample))
    return {**overrides, "model": {"size": default_model_size(side), **overrides.get("model", {})}}


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_TYPES = {"model": ModelConfig, "diffusion": DiffusionConfig, "data": DataConfig, "train": TrainConfig,
                  "distill": DistillConfig, "autoencoder": AutoencoderConfig}


def _coerce(section: str, key: str, value: Any, hint: Any) -> Any:
    """Convert a value from a file, flag or checkpoint into the field's type, or explain why not."""
    where = f"{section}.{key}"
    origin = get_origin(hint)
    try:
        if origin is tuple:
            (elem, _) = get_args(hint)
            if isinstance(value, str):
                value = [v for v in value.replace(" ", "").split(",") if v]
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return tuple(_coerce(section, key, v, elem) for v in value)
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            raise TypeError
        if hint is int:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if not isinstance(value, (int, str)):
                raise TypeError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise TypeError
            out = float(value)
            if not math.isfinite(out):
                raise ValueError
            return out
        if hint is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        pass
    name = getattr(hint, "__name__", str(hint))
    raise DdpmError(f"config value {where}={value!r} is not a valid {name}")


def _hints(section: str) -> dict[str, Any]:
    return get_type_hints(_SECTION_TYPES[section])


def _unknown(kind: str, name: Any, choices) -> DdpmError:
    near = difflib.get_close_matches(name, list(choices), n=1) if isinstance(name, str) else []
    hint = f" (did you mean '{near[0]}'?)" if near else f" (known: {', '.join(sorted(choices))})"
    return DdpmError(f"unknown config {kind} {name!r}{hint}")


def apply_overrides(cfg: Config, overrides: dict[str, dict[str, Any]]) -> Config:
    """Return a copy of `cfg` with `{section: {key: value}}` applied; unknown keys are errors."""
    out = dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s)) for s in SECTIONS})
    for section, values in overrides.items():
        if section not in SECTIONS:
            raise _unknown("section", section, SECTIONS)
        if not isinstance(values, dict):
            raise DdpmError(f"config section '{section}' must be a table of key = value pairs")
        hints = _hints(section)
        target = getattr(out, section)
        if section == "data" and "image_size" in values:
            values = _split_image_size(values)
        if section == "model" and values.get("size", "custom") != "custom":
            # A preset replaces the whole model section; explicit model keys then apply on top.
            target = preset(str(values["size"]))
            setattr(out, section, target)
        for key, value in values.items():
            if key not in hints:
                raise _unknown(f"key in [{section}]", key, hints)
            setattr(target, key, _coerce(section, key, value, hints[key]))
    return out


def _split_image_size(values: dict[str, Any]) -> dict[str, Any]:
    """A [data] override whose image_size is "HxW" as image_size = H, image_width = W. A plain number
    means a square (image_width 0) unless the same override names image_width too."""
    h, w = parse_image_size(values["image_size"])
    if w == 0 and "image_width" in values:
        return values
    if w and "image_width" in values and _coerce("data", "image_width", values["image_width"], int) not in (0, w):
        raise DdpmError(f"data.image_size={values['image_size']!r} and data.image_width={values['image_width']!r} "
                        "disagree; give the size once, e.g. --image-size 64x48")
    return {**values, "image_size": h, "image_width": w}


def load_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a TOML or YAML config file into `{section: {key: value}}`."""
    path = Path(path)
    if not path.is_file():
        raise DdpmError(f"config file {path} not found; pass an existing .toml or .yaml file to --config")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            raise DdpmError(f"config file {path} must end in .toml, .yaml or .yml")
    except DdpmError:
        raise
    except Exception as exc:  # parser errors name the line; keep them on one line
        raise DdpmError(f"cannot parse config file {path}: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise DdpmError(f"config file {path} must hold sections like [train] and [model]")
    return data


def from_dict(data: dict[str, dict[str, Any]]) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. stored in a checkpoint)."""
    cfg = Config()
    for section, values in data.items():
        if section not in SECTIONS:
            raise _unknown("section", section, SECTIONS)
        hints = _hints(section)
        target = getattr(cfg, section)
        for key, value in values.items():
            if key not in hints:
                raise _unknown(f"key in [{section}]", key, hints)
            setattr(target, key, _coerce(section, key, value, hints[key]))
    return cfg


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise DdpmError(message)


def _check_autoencoder(cfg: Config) -> None:
    ae, hw = cfg.autoencoder, cfg.data.hw
    _check(ae.downsample in (2, 4, 8), f"autoencoder.downsample must be 2, 4 or 8, got {ae.downsample}")
    f = ae.downsample
    _check(not ae.path or all(s % f == 0 and s // f >= 2 for s in hw),
           f"image size {size_text(hw)} is not a multiple of the autoencoder's downsample factor {f} on each side "
           f"(with a latent of at least 2x2); use e.g. --image-size {size_text([max(2 * f, s // f * f) for s in hw])}")
    _check(ae.latent_channels >= 1, f"autoencoder.latent_channels must be >= 1, got {ae.latent_channels}")
    _check(ae.base_channels >= 4, f"autoencoder.base_channels must be >= 4, got {ae.base_channels}")
    _check(ae.kl_weight >= 0 and ae.disc_weight >= 0 and ae.disc_start >= 0,
           "autoencoder.kl_weight, disc_weight and disc_start must be >= 0")


def _validate_text(cfg: Config) -> None:
    """Paths and names must be UTF-8 without NUL characters."""
    data, t = cfg.data, cfg.train
    for where, text in (("train.run_name", t.run_name), ("train.workdir", t.workdir), ("data.path", data.path),
                        ("data.cache_dir", data.cache_dir)):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise DdpmError(f"{where} {text!r} is not valid UTF-8 text") from None
        _check("\x00" not in text, f"{where} {text!r} contains a NUL character")


def _validate_model(cfg: Config) -> None:
    m, t = cfg.model, cfg.train
    _check(m.base_channels >= 1, f"model.base_channels must be >= 1, got {m.base_channels}")
    _check(len(m.channel_mults) >= 1 and all(c >= 1 for c in m.channel_mults),
           f"model.channel_mults must be positive integers, got {list(m.channel_mults)}")
    levels = len(m.channel_mults)
    _check(all(0 <= a < levels for a in m.attn_levels),
           f"model.attn_levels must lie in 0..{levels - 1} (one per channel_mults entry), got {list(m.attn_levels)}")
    _check(m.num_heads >= 1, f"model.num_heads must be >= 1, got {m.num_heads}")
    widths = [m.base_channels * c for c in m.channel_mults]
    _check(all(w % m.num_heads == 0 for w in widths),
           f"model.num_heads={m.num_heads} must divide every level's width {widths}")
    _check(m.time_dim >= 2 and m.time_dim % 2 == 0, f"model.time_dim must be even and >= 2, got {m.time_dim}")
    _check(m.time_features == 0 or (m.time_features >= 2 and m.time_features % 2 == 0),
           f"model.time_features must be 0 (= time_dim) or even and >= 2, got {m.time_features}")
    _check(m.norm_groups >= 0 and all(w % m.norm_groups == 0 for w in widths if m.norm_groups),
           f"model.norm_groups={m.norm_groups} must be 0 (per width) or divide every level's width {widths}")
    _check(m.arch == "adm" or (m.time_features == 0 and m.norm_groups == 0),
           "model.time_features and model.norm_groups apply to arch 'adm' only; set them to 0")
    _check(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    _check(m.size in PRESETS or m.size == "custom", f"model.size '{m.size}' is not one of {sorted(PRESETS)}")
    _check(m.arch in ARCHS, f"model.arch must be one of {', '.join(ARCHS)}, got '{m.arch}'")
    _check(m.num_res_blocks >= 1, f"model.num_res_blocks must be >= 1, got {m.num_res_blocks}")
    _check(m.num_classes >= 0, f"model.num_classes must be >= 0, got {m.num_classes}")
    _check(not m.class_names or len(m.class_names) == m.num_classes,
           f"model.class_names has {len(m.class_names)} names for num_classes={m.num_classes}")
    _check(0.0 <= t.cond_drop < 1.0, f"train.cond_drop must be in [0, 1), got {t.cond_drop}")


def _validate_diffusion(cfg: Config) -> None:
    d = cfg.diffusion
    _check(d.timesteps >= 1, f"diffusion.timesteps must be >= 1, got {d.timesteps}")
    _check(d.schedule in ("linear", "cosine", "sigmoid"),
           f"diffusion.schedule must be linear, cosine or sigmoid, got '{d.schedule}'")
    if d.schedule in ("linear", "sigmoid"):
        _check(0.0 < d.beta_start < 1.0, f"diffusion.beta_start must be in (0, 1), got {d.beta_start}")
        _check(0.0 < d.beta_end < 1.0, f"diffusion.beta_end must be in (0, 1), got {d.beta_end}")
        _check(d.beta_end > d.beta_start,
               f"diffusion.beta_end ({d.beta_end}) must be greater than beta_start ({d.beta_start})")
    _check(d.prediction in ("eps", "x0", "v"), f"diffusion.prediction must be eps, x0 or v, got '{d.prediction}'")
    _check(d.loss_weighting in ("none", "min_snr"),
           f"diffusion.loss_weighting must be none or min_snr, got '{d.loss_weighting}'")
    _check(d.min_snr_gamma > 0, f"diffusion.min_snr_gamma must be > 0, got {d.min_snr_gamma}")
    _check(d.variance in ("beta", "posterior"), f"diffusion.variance must be beta or posterior, got '{d.variance}'")
    _check(d.objective in ("vp", "edm"), f"diffusion.objective must be vp or edm, got '{d.objective}'")
    _check(d.vlb_weight >= 0, f"diffusion.vlb_weight must be >= 0, got {d.vlb_weight}")
    _check(not (d.learn_sigma and d.objective == "edm"), "diffusion.learn_sigma works with objective vp only")
    _check(d.sigma_data > 0 and d.p_std > 0, "diffusion.sigma_data and diffusion.p_std must be > 0")
    _check(0 < d.sigma_min < d.sigma_max,
           f"diffusion.sigma_min ({d.sigma_min}) must be > 0 and below sigma_max ({d.sigma_max})")
    _check(not (d.zero_terminal_snr and d.prediction == "eps"),
           "diffusion.zero_terminal_snr needs prediction v or x0 (eps is undefined at SNR 0)")
    _check(not (d.zero_terminal_snr and d.learn_sigma),
           "diffusion.learn_sigma cannot be combined with zero_terminal_snr (the variational bound's x0 "
           "estimate is 0/0 at SNR 0); turn one of them off")


def _validate_data(cfg: Config) -> None:
    data, levels = cfg.data, len(cfg.model.channel_mults)
    _check(bool(data.path), "data.path is empty; pass --data FOLDER or --data builtin:digits")
    _check(data.image_size >= 4, f"data.image_size must be >= 4, got {data.image_size}")
    _check(data.image_width == 0 or data.image_width >= 4,
           f"data.image_width must be 0 (square) or >= 4, got {data.image_width}")
    if data.image_width == data.image_size:  # HxH is the square H: one spelling, so a resume compares equal
        data.image_width = 0
    factor = 2 ** (levels - 1)
    _check_autoencoder(cfg)
    f = cfg.autoencoder.downsample if cfg.autoencoder.path else 1
    sides = [s // f for s in data.hw]
    _check(all(s % factor == 0 for s in sides),
           f"{'latent' if f > 1 else 'image'} size {size_text(sides)} is not divisible by {factor} on each side, "
           f"which the model's {levels - 1} downsamplings need; use multiples of {factor} "
           f"(e.g. --image-size {size_text([max(factor, (s + factor // 2) // factor * factor) * f for s in sides])})")
    _check(data.channels in (0, 1, 3), f"data.channels must be 1, 3 or 0 (auto), got {data.channels}")


def _validate_train(cfg: Config) -> None:
    from .samplers import SAMPLERS

    t = cfg.train
    _check(bool(t.run_name) and "/" not in t.run_name and "\\" not in t.run_name and t.run_name not in (".", ".."),
           f"train.run_name '{t.run_name}' must be a plain folder name")
    _check(t.epochs >= 0, f"train.epochs must be >= 0, got {t.epochs}")
    _check(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    _check(t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}")
    _check(0 < t.lr <= 1, f"train.lr must be > 0 and <= 1, got {t.lr}")
    _check(0 <= t.weight_decay <= 10, f"train.weight_decay must be in [0, 10], got {t.weight_decay}")
    _check(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    _check(t.lr_schedule in ("constant", "cosine"),
           f"train.lr_schedule must be constant or cosine, got '{t.lr_schedule}'")
    _check(t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 disables), got {t.grad_clip}")
    _check(0.0 <= t.ema_decay < 1.0, f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    _check(0.0 <= t.ema_sigma_rel < SIGMA_REL_MAX,
           f"train.ema_sigma_rel must be 0 (off) or in (0, {SIGMA_REL_MAX:.4f}), got {t.ema_sigma_rel}")
    _check(0 <= t.seed < 2**63, f"train.seed must be in 0..2**63-1, got {t.seed}")
    _check(t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}")
    _check(t.logger in ("tensorboard", "wandb", "none"),
           f"train.logger must be tensorboard, wandb or none, got '{t.logger}'")
    _check(t.sample_every_epochs >= 0, f"train.sample_every_epochs must be >= 0, got {t.sample_every_epochs}")
    _check(t.sample_every_steps >= 0, f"train.sample_every_steps must be >= 0, got {t.sample_every_steps}")
    _check(t.sample_n >= 1, f"train.sample_n must be >= 1, got {t.sample_n}")
    _check(t.sample_sampler in SAMPLERS, f"train.sample_sampler '{t.sample_sampler}' is not one of {sorted(SAMPLERS)}")
    _check(t.sample_steps >= 1, f"train.sample_steps must be >= 1, got {t.sample_steps}")
    _check(t.ckpt_every_steps >= 0, f"train.ckpt_every_steps must be >= 0, got {t.ckpt_every_steps}")
    _check(t.ckpt_every_minutes >= 0, f"train.ckpt_every_minutes must be >= 0, got {t.ckpt_every_minutes}")
    _check(t.eval_every_steps >= 0, f"train.eval_every_steps must be >= 0, got {t.eval_every_steps}")
    _check(t.eval_n >= 2, f"train.eval_n must be >= 2, got {t.eval_n}")
    _check(t.eval_extractor in ("randconv", "inception", "auto"),
           f"train.eval_extractor must be randconv, inception or auto, got '{t.eval_extractor}'")
    _check(t.eval_sampler in SAMPLERS, f"train.eval_sampler '{t.eval_sampler}' is not one of {sorted(SAMPLERS)}")
    _check(t.eval_steps >= 1, f"train.eval_steps must be >= 1, got {t.eval_steps}")
    _check(t.max_nonfinite_steps >= 1, f"train.max_nonfinite_steps must be >= 1, got {t.max_nonfinite_steps}")
    _check(t.precision in ("fp32", "bf16", "fp16", "auto"),
           f"train.precision must be fp32, bf16, fp16 or auto, got '{t.precision}'")
    if t.bf16:  # the older switch (and checkpoints written with it): the same as precision bf16
        _check(t.precision in ("fp32", "bf16", "auto"), f"train.bf16=true means precision bf16, but train.precision is "
               f"'{t.precision}'; give only --precision (or only --bf16 true)")
        t.precision, t.bf16 = "bf16", False


def _validate_distill(cfg: Config) -> None:
    from .samplers import SAMPLERS

    ds = cfg.distill
    _check(ds.method in ("", "progressive", "student", "consistency", "sfd"),
           f"distill.method must be progressive, student, consistency, sfd or empty, got '{ds.method}'")
    _check(ds.steps >= 0, f"distill.steps must be >= 0, got {ds.steps}")
    _check(ds.sampler in SAMPLERS or ds.sampler == "",
           f"distill.sampler '{ds.sampler}' is not one of {sorted(SAMPLERS)}")


def validate(cfg: Config) -> Config:
    """Reject impossible values with a message that names the field and the allowed range."""
    for check in (_validate_text, _validate_model, _validate_diffusion, _validate_data, _validate_train,
                  _validate_distill):
        check(cfg)
    return cfg
