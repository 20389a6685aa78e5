"""Latent diffusion (Rombach et al. 2022): the autoencoder's training task, and diffusion on its latents.

`ddpm train-ae` trains `models.autoencoder.AutoencoderKL` with `AutoencoderTask` on the one
training loop (train.py): L1 reconstruction + kl_weight * KL, and optionally a patch
discriminator's hinge loss after a warm-up. Its checkpoint is marked `task_state["kind"] =
"autoencoder"`.

`ddpm train --autoencoder AE_CKPT` trains the diffusion model with `LatentTask`: the data set is
encoded once (posterior means, cached in data.cache_dir when set), and the latents are scaled by
LDM's `scale_factor` = 1 / std of the latents, measured on the data (LDM Sec. 4.3.2 / App. G), so
the diffusion sees unit-variance data. The run's checkpoint holds the autoencoder's weights and
the scale factor in its task_state (kind "latent") and the autoencoder's shape in
config.autoencoder, so it is self-contained: `loading.load_model` returns a `LatentDiffusion`,
whose `generate`/`sample` decode the sampled latents to images.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.func import functional_call

from .checkpoint import config_of, load_checkpoint, load_state, model_from_config
from .config import Config, size_text
from .data import ImageData, epoch_generator, load_data, num_batches, to_model_range
from .diffusion import Diffusion
from .errors import DdpmError
from .images import save_images
from .models.autoencoder import AutoencoderKL, AutoencoderWithDisc, PatchDiscriminator, hinge_d_loss, kl_standard_normal
from .tasks import Task

AE_KIND, LATENT_KIND = "autoencoder", "latent"


def build_autoencoder(cfg: Config, channels: int, with_disc: bool | None = None) -> torch.nn.Module:
    """The autoencoder cfg.autoencoder describes, for images of `channels`; with its discriminator
    (an `AutoencoderWithDisc`) when disc_weight > 0, unless `with_disc` says otherwise."""
    a = cfg.autoencoder
    ae = AutoencoderKL(channels, a.latent_channels, a.downsample, a.base_channels)
    if a.disc_weight > 0 if with_disc is None else with_disc:
        return AutoencoderWithDisc(ae, PatchDiscriminator(channels, a.base_channels))
    return ae


def core(module: torch.nn.Module) -> AutoencoderKL:
    """The AutoencoderKL inside a (DDP-wrapped, discriminator-carrying) module."""
    module = getattr(module, "module", module)
    return getattr(module, "ae", module)


# --- ddpm train-ae ---------------------------------------------------------------------------

class AutoencoderLoss:
    """Per image: mean |x - x_hat| + kl_weight * KL / (pixels per image), LDM's ratio of summed terms;
    plus, from optimizer step disc_start on, the patch discriminator's hinge losses."""

    def __init__(self, cfg: Config, channels: int):
        self.a, self.channels, self.step = cfg.autoencoder, channels, 0

    def draw(self, n: int, like: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The reparameterization noise of each image's latent (drawn by the trainer: exact resume)."""
        h, w = (side // self.a.downsample for side in like.shape[-2:])
        return {"noise": torch.randn((n, self.a.latent_channels, h, w), generator=generator, device=like.device)}

    def __call__(self, net, x0: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        recon, mean, logvar = net(x0, draws["noise"])
        kl = kl_standard_normal(mean, logvar) / x0[0].numel()
        loss = (recon - x0).abs().flatten(1).mean(1) + self.a.kl_weight * kl
        if self.a.disc_weight > 0 and self.step >= self.a.disc_start:
            loss = loss + self._adversarial(getattr(net, "module", net).disc, x0, recon)
        return loss

    def _adversarial(self, disc: torch.nn.Module, x0: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """disc_weight * generator hinge term + discriminator hinge loss, for one optimizer.

        The generator term -D(x_hat) (LDM's g_loss) sees the discriminator through detached weights,
        so its gradient reaches only the autoencoder; the discriminator's loss sees x_hat detached,
        so its gradient reaches only the discriminator."""
        frozen = {k: v.detach() for k, v in disc.named_parameters()}
        g_loss = -functional_call(disc, frozen, (recon,)).flatten(1).mean(1)
        return self.a.disc_weight * g_loss + hinge_d_loss(disc(x0), disc(recon.detach()))


class AutoencoderTask(Task):
    """`ddpm train-ae`: the autoencoder on the images, grids of input | reconstruction pairs."""

    command = "ddpm train-ae"

    def data(self, cfg: Config, log: Callable) -> ImageData:
        hw, f = cfg.data.hw, cfg.autoencoder.downsample
        if any(s % f or s // f < 2 for s in hw):
            fix = size_text([max(2 * f, s // f * f) for s in hw])
            raise DdpmError(f"--image-size {size_text(hw)} is not a multiple of --downsample {f} on each side with a "
                            f"latent of at least 2x2; use e.g. --image-size {fix}")
        return super().data(cfg, log)

    def build(self, cfg: Config, device: torch.device):
        a = cfg.autoencoder
        self.shape = [a.downsample, a.latent_channels, a.base_channels, int(a.disc_weight > 0)]
        return build_autoencoder(cfg, cfg.data.channels).to(device), None

    def make_loss(self, diffusion, cfg: Config) -> AutoencoderLoss:
        self.loss = AutoencoderLoss(cfg, cfg.data.channels)
        return self.loss

    def start(self, trainer) -> None:
        self.loss.step = trainer.state.step
        n = min(8, trainer.cfg.train.sample_n, len(trainer.data))
        self.grid_images = to_model_range(torch.from_numpy(np.ascontiguousarray(trainer.data.images[:n])))

    def after_step(self, trainer) -> None:
        self.loss.step = trainer.state.step

    @torch.no_grad()
    def grid(self, trainer, name: str) -> torch.Tensor:
        """The first images of the data set next to their reconstructions (posterior mean, EMA weights)."""
        net = trainer._sampling_model()
        was_training = net.training
        x = self.grid_images.to(trainer.device)
        recon = core(net.eval())(x)[0].clamp(-1, 1)
        net.train(was_training)
        pairs = torch.stack([x, recon], 1).flatten(0, 1).cpu()  # input, reconstruction, input, ...
        images = ((pairs + 1) * 127.5).round().to(torch.uint8)
        save_images(images, trainer.paths.results / f"{name}.jpg", nrow=min(8, len(images)),
                    min_width=0 if trainer.cfg.train.native_grids else 256)
        return images

    def extra_state(self) -> dict[str, Any]:
        return {"kind": AE_KIND, "shape": self.shape}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if list(state.get("shape", self.shape)) != self.shape:
            raise DdpmError(f"this autoencoder run was trained with downsample, latent_channels, ae_channels, "
                            f"discriminator = {list(state['shape'])}, not {self.shape}; drop those options to "
                            "resume, pick another --run-name, or pass --fresh")


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu") -> tuple[AutoencoderKL, Config]:
    """The EMA autoencoder (eval mode) of a `ddpm train-ae` checkpoint, and its config."""
    ckpt = load_checkpoint(path)
    kind = (ckpt.get("task_state") or {}).get("kind")
    if kind != AE_KIND:
        raise DdpmError(f"{path} is not an autoencoder checkpoint (it was written by `ddpm "
                        f"{'train --autoencoder' if kind == LATENT_KIND else 'train'}`); pass the ckpt.pt of a "
                        "`ddpm train-ae` run to --autoencoder")
    cfg = config_of(ckpt, path)
    model = build_autoencoder(cfg, cfg.data.channels)
    key = "ema_state_dict" if ckpt.get("ema_state_dict") is not None else "model_state_dict"
    load_state(model, ckpt[key], path, "autoencoder")
    return core(model).to(device).eval().requires_grad_(False), cfg


def refuse_autoencoder_checkpoint(ckpt: dict[str, Any], path: str | Path) -> None:
    """A sampling command given a `ddpm train-ae` checkpoint: say what it is instead of a weights mismatch."""
    if (ckpt.get("task_state") or {}).get("kind") == AE_KIND:
        raise DdpmError(f"{path} is an autoencoder (`ddpm train-ae`), not a diffusion model; train one on its "
                        f"latents with `ddpm train --autoencoder {path}`")


def latent_overrides(ae_path: str, overrides: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`ddpm train --autoencoder AE_CKPT`'s config: the autoencoder's shape, and its image size and
    channels unless given."""
    ckpt = load_checkpoint(ae_path)
    if (ckpt.get("task_state") or {}).get("kind") != AE_KIND:
        load_autoencoder(ae_path)  # raises the one-line error that names what it is
    a = config_of(ckpt, ae_path)
    out = {k: dict(v) for k, v in overrides.items()}
    out["autoencoder"] = {**dataclasses.asdict(a.autoencoder), "path": str(ae_path)}
    if "image_size" not in out.setdefault("data", {}):
        out["data"]["image_size"] = a.data.image_size
        if a.data.image_width:  # a non-square autoencoder: its width too
            out["data"]["image_width"] = a.data.image_width
    out["data"].setdefault("channels", a.data.channels)
    return out


def autoencoder_overrides(overrides: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`ddpm train-ae`'s config: the model section (a diffusion network's, unused) set to one level,
    so that no diffusion-model constraint applies to the image size; no training-time FID."""
    out = {k: dict(v) for k, v in overrides.items()}
    if int(out.get("train", {}).get("eval_every_steps", 0) or 0):
        raise DdpmError("`ddpm train-ae` has no training-time FID; drop train.eval_every_steps")
    out["model"] = {"size": "custom", "channel_mults": [1], "attn_levels": []}
    return out


def task_for(command: str, cfg: Config, ckpt: dict[str, Any] | None, path: Path) -> Task | None:
    """The task of `ddpm train` / `ddpm train-ae` for this run (None: the default Task), refusing to
    resume a run of another kind."""
    kind = None if ckpt is None else (ckpt.get("task_state") or {}).get("kind")
    name = cfg.train.run_name
    if command == "train-ae":
        if ckpt is not None and kind != AE_KIND:
            raise DdpmError(f"run '{name}' ({path}) holds a diffusion model, not an autoencoder; pick another "
                            "--run-name for `ddpm train-ae`")
        return AutoencoderTask()
    if kind == AE_KIND:
        raise DdpmError(f"run '{name}' ({path}) is an autoencoder run; resume it with `ddpm train-ae`, or pick "
                        "another --run-name")
    if cfg.autoencoder.path and ckpt is not None and kind != LATENT_KIND:
        raise DdpmError(f"run '{name}' ({path}) was trained on pixels, not latents; drop --autoencoder to resume "
                        "it, or pick another --run-name")
    return LatentTask() if cfg.autoencoder.path else None


# --- ddpm train --autoencoder ----------------------------------------------------------------

@dataclass
class LatentData:
    """The training set of a latent run: the decoded images (for evaluation) and their latents."""

    images: np.ndarray               # (N, H, W, C) uint8
    latents: torch.Tensor            # (N, C', H/f, W/f) float32 posterior means, unscaled
    flipped: torch.Tensor | None     # the latents of the mirrored images (hflip), or None
    source: str
    scale_factor: float              # 1 / std of `latents`
    labels: np.ndarray | None = None
    classes: tuple[str, ...] = ()

    @property
    def channels(self) -> int:
        return self.images.shape[-1]

    def __len__(self) -> int:
        return len(self.images)


def measure_scale_factor(latents: torch.Tensor) -> float:
    """LDM's scale_factor: 1 / (standard deviation of all latent elements), so scaled latents have unit variance."""
    std = latents.double().std().item()
    if not np.isfinite(std) or std <= 0:
        raise DdpmError("the autoencoder's latents of this data set have no variance; retrain the autoencoder")
    return 1.0 / std


@torch.inference_mode()
def encode_images(ae: AutoencoderKL, images: np.ndarray, device, flip: bool = False, batch: int = 64) -> torch.Tensor:
    """Posterior means of uint8 NHWC images (mirrored first when `flip`), float32 on the CPU."""
    out = []
    for start in range(0, len(images), batch):
        rows = np.array(images[start:start + batch])  # a copy: a memory-mapped cache is read-only
        x = to_model_range(torch.from_numpy(rows)).to(device)
        out.append(ae.encode(x.flip(3) if flip else x)[0].float().cpu())
    return torch.cat(out)


def cached_latents(ae: AutoencoderKL, images: np.ndarray, cache_dir: str, device, flip: bool, log) -> torch.Tensor:
    """encode_images, read from or written to CACHE_DIR/latents-KEY.npy when cache_dir is set; the
    key hashes the images and the autoencoder's weights, so a changed one is never reused."""
    if not cache_dir:
        return encode_images(ae, images, device, flip)
    h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    for k, v in ae.state_dict().items():
        h.update(k.encode() + v.detach().cpu().numpy().tobytes())
    path = Path(cache_dir) / f"latents-{h.hexdigest()[:20]}{'-flip' if flip else ''}.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path))
    latents = encode_images(ae, images, device, flip)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npy")
        np.save(tmp, latents.numpy())
        os.replace(tmp, path)
        log(f"cached the latents of {len(images)} images in {path}")
    except OSError as exc:
        log(f"warning: could not cache the latents in {path} ({exc.strerror}); keeping them in memory")
    return latents


def _check_match(a: Config, cfg: Config, channels: int, path: str) -> None:
    if a.data.hw != cfg.data.hw or a.data.channels != channels:
        (h, w), (rh, rw) = a.data.hw, cfg.data.hw
        raise DdpmError(f"the autoencoder {path} was trained on {h}x{w} images with "
                        f"{a.data.channels} channel(s), but this run uses {rh}x{rw} "
                        f"with {channels}; pass --image-size {size_text(a.data.hw)} and data with {a.data.channels} "
                        f"channel(s), or train an autoencoder at this size with `ddpm train-ae`")
    keys = ("downsample", "latent_channels", "base_channels")
    if any(getattr(a.autoencoder, k) != getattr(cfg.autoencoder, k) for k in keys):
        raise DdpmError(f"the autoencoder {path} is not the one this run was trained with (its downsample / "
                        f"latent_channels / base_channels differ); use that one, or --fresh / another --run-name")


class LatentDiffusion(Diffusion):
    """A Diffusion on the latents whose `generate` (and so `sample`) returns decoded images:
    x = D(z / scale_factor), clamped to [-1, 1]. Its x0 estimates are not clipped by default.
    `to_latents` / `latent_mask` bring guide images and masks (inpainting, SDEdit) to the latents."""

    def __init__(self, base: Diffusion, autoencoder: AutoencoderKL, scale_factor: float):
        super().__init__(base.config, img_size=base.img_size, channels=base.channels, device=base.device)
        self.autoencoder = autoencoder.to(self.device).eval().requires_grad_(False)
        self.scale_factor = float(scale_factor)

    def denoiser(self, model: torch.nn.Module, bf16: bool = False, clip: bool | None = None) -> torch.nn.Module:
        """As Diffusion's, except that x0 estimates are not clamped unless `clip` is True: scaled
        latents do not live in [-1, 1], so diffusion.clip_denoised does not apply to them."""
        return super().denoiser(model, bf16, bool(clip))

    @property
    def image_channels(self) -> int:
        """Channels of the decoded images (the diffusion's own `channels` are the latent's)."""
        return self.autoencoder.channels

    @property
    def image_hw(self) -> tuple[int, int]:
        """(height, width) of the decoded images: the latent's times the autoencoder's downsampling f."""
        return self.hw[0] * self.autoencoder.downsample, self.hw[1] * self.autoencoder.downsample

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(x / self.scale_factor).clamp(-1, 1)

    def to_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the scaled latents the diffusion works on: scale_factor * E(x), E the
        posterior mean, as the training latents (LDM Sec. 4.3.2: z = scale_factor * E(x)); the inverse
        of `to_images` up to the autoencoder's reconstruction error."""
        return self.autoencoder.encode(images.to(self.device, torch.float32))[0] * self.scale_factor

    def latent_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A (B, 1 or C, H, W) inpainting mask (1 = generate) as (B, 1, H/f, W/f) on the latent grid: a
        latent cell is generated when ANY of its f x f pixels (in any channel) is, by max-pooling, so
        every pixel asked for is generated; the known pixels of a partly generated cell are regenerated too."""
        f = self.autoencoder.downsample
        mask = mask.to(self.device, torch.float32).amax(1, keepdim=True)
        return torch.nn.functional.max_pool2d(mask, f, f)


def attach_decoder(diffusion: Diffusion, cfg: Config, ae_state: dict[str, torch.Tensor] | None,
                   scale_factor: float | None, where: str | Path) -> LatentDiffusion:
    """The LatentDiffusion of a latent run, from the autoencoder weights and scale factor it stores."""
    if ae_state is None or scale_factor is None:
        raise DdpmError(f"{where} is a latent diffusion model but holds no autoencoder weights or scale factor; "
                        "it is damaged or incomplete, export it again from its checkpoint")
    ae = AutoencoderKL(cfg.data.channels, cfg.autoencoder.latent_channels, cfg.autoencoder.downsample,
                       cfg.autoencoder.base_channels)
    load_state(ae, ae_state, where, "autoencoder")
    return LatentDiffusion(diffusion, ae, scale_factor)


def latent_parts(ckpt: dict[str, Any]) -> tuple[dict | None, float | None]:
    """(autoencoder state dict, scale factor) stored in a latent run's checkpoint."""
    state = ckpt.get("task_state") or {}
    return state.get("autoencoder_state_dict"), state.get("scale_factor")


class LatentTask(Task):
    """`ddpm train --autoencoder AE_CKPT`: the diffusion model on the scaled latents of the data set."""

    def data(self, cfg: Config, log: Callable) -> LatentData:
        path = cfg.autoencoder.path
        if cfg.train.class_cond:  # labels are not wired through the latent batches and grids (untested)
            raise DdpmError("class-conditional latent diffusion is not supported yet; drop --class-cond or "
                            "--autoencoder")
        self.device = _device_of(cfg)
        self.ae, a = load_autoencoder(path, self.device)
        images = load_data(cfg.data.path, cfg.data.hw, cfg.data.channels, cfg.data.cache_dir, log)
        _check_match(a, cfg, images.channels, path)
        latents = cached_latents(self.ae, images.images, cfg.data.cache_dir, self.device, False, log)
        flipped = cached_latents(self.ae, images.images, cfg.data.cache_dir, self.device, True, log) \
            if cfg.data.hflip else None
        self.scale = measure_scale_factor(latents)
        log(f"latents: {tuple(latents.shape[1:])} per image from {path}, scale factor {self.scale:.5f}")
        return LatentData(images.images, latents, flipped, images.source, self.scale, images.labels, images.classes)

    def batches(self, data: LatentData, cfg: Config, epoch: int, start: int, rank: int, world: int, device):
        """The scaled latents in `data.epoch_batches`' order and flips (the same generator draws)."""
        g = epoch_generator(cfg.train.seed, epoch)
        n = len(data)
        perm = torch.randperm(n, generator=g)
        flips = torch.rand(n, generator=g) < 0.5
        gb = cfg.train.batch_size * world
        for b in range(start, num_batches(n, cfg.train.batch_size, world)):
            idx = perm[b * gb:(b + 1) * gb][rank::world]
            z = data.latents[idx]
            if data.flipped is not None:
                z = torch.where(flips[idx][:, None, None, None], data.flipped[idx], z)
            yield (z * self.scale).to(device)

    def build(self, cfg: Config, device: torch.device):
        model, diffusion = model_from_config(cfg, device)
        self.diffusion = LatentDiffusion(diffusion, self.ae, self.scale)
        return model, self.diffusion

    def extra_state(self) -> dict[str, Any]:
        return {"kind": LATENT_KIND, "autoencoder_state_dict": self.ae.state_dict(), "scale_factor": self.scale}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """A resumed run keeps the scale factor it started with (its latents are scaled by it)."""
        self.scale = self.diffusion.scale_factor = float(state["scale_factor"])


def _device_of(cfg: Config) -> torch.device:
    from .train import resolve_device  # imported late: train imports tasks, as this module does

    return resolve_device(cfg.train.device)
