"""Same-budget sample quality: ddpmkit against diffusers on the built-in 16x16 digits.

    pip install diffusers        # benchmark-only; see benchmarks/README.md ("bench_quality.py")
    python benchmarks/bench_quality.py --threads 2 --json /tmp/quality.json

Data. scikit-learn's 1,797 digits, upscaled to 16x16 exactly as `builtin:digits` does it
(`ddpmkit.data.load_data("builtin:digits", 16, 1)`). Labels come from `load_digits().target`; the
script checks that they are in the builtin's order (each upscaled image, pooled back to 8x8,
correlates best with the raw digit of the same index). A stratified split with a fixed seed holds
out a third of every class:
  * split A (about 1,200 images): trains BOTH diffusion models, and the digit classifier;
  * split B (about 600 images): held out; neither diffusion model sees it. The Frechet distance is
    measured against it, and the classifier's accuracy on it is printed.

Metric, the same for both systems. A small CNN classifier is trained on split A (its held-out
accuracy is printed). For a set of generated images:
  * FD: the Frechet distance (Heusel et al. 2017) between Gaussians fitted to the classifier's
    64-d penultimate features of the samples and of split B. It depends on the sample count, so
    compare rows with the same n (DDPM rows use the smaller --n-ddpm);
  * recognized: the share of samples whose top softmax probability exceeds 0.9;
  * speckled: the share of samples whose high-frequency energy, the mean absolute value of the
    3x3 discrete Laplacian (4-neighbour stencil, replicated border, pixels in [0, 1]), exceeds the
    99.9th percentile of that value over all 1,797 real images. Real data scores about 0.1%.
With --sample-seeds K, each row draws K sets of n samples (sampling seeds --seed .. --seed+K-1) and
reports the metrics' means, and FD's standard deviation over the draws: one draw of 1,000 is a
noisy measurement (on the 150k-image `tiny` model, five draws of DPM-Solver++ 20 scored FD 19.5
to 24.4). --train-seed changes only the trainings' seed, to measure the spread between runs.
The "real" rows score split B itself (FD 0 by construction; its recognized share is the classifier's
confidence on unseen real digits) and split A, the training images (the FD of a model that
reproduced its training set exactly).

ddpmkit is trained through its own code path (`ddpmkit.train.prepare` and `train`, what `ddpm
train` runs) on split A written out as a folder of PNGs (class subfolders), with the defaults of
`ddpm train` plus: 16x16 grey, --model-size (default tiny), --batch-size, epochs = round(--images /
|A|), no sample grids; then anything given with --ddpmkit-set SECTION.KEY=VALUE (repeatable, as
`ddpm train --set`). It samples with its EMA weights through `load_model` and
`Diffusion.generate`, with each sampler's default spacing.

diffusers is trained as its unconditional training example (examples/unconditional_image_generation)
does it: `UNet2DModel` (levels at 16, 8 and 4 px, attention at 8 px, 2 ResNet blocks per level,
channels (c, 2c, d) in multiples of 8 searched so that the parameter count is closest to ddpmkit's,
which must be within 10%; GroupNorm uses the largest of 32, 16 or 8 groups that divides every width),
`DDPMScheduler` (1000 linear-schedule steps), eps-prediction MSE, AdamW (lr 1e-3, betas (0.95, 0.999), weight decay
1e-6), a cosine learning-rate schedule with min(500, steps/5) warm-up steps, gradient clipping at
1, and `EMAModel` with decay 0.999 and its warm-up (inv_gamma 1, power 3/4). No flips (digits are
not mirror-symmetric; ddpmkit does not flip either). It sees the same images in the same number
of epochs of batch --batch-size. It samples with DDIMScheduler (its default clip_sample),
DPMSolverMultistepScheduler (DPM-Solver++(2M), with and without thresholding; thresholding with
sample_max_value 1 clamps the x0 estimate to [-1, 1], like ddpmkit's clipping) and
DDPMScheduler at all 1000 steps, each with diffusers' default timestep spacing.

Both run in this process with the same torch thread count (--threads). --device cuda trains and
samples ddpmkit on a GPU (diffusers and the classifier stay on the CPU); a GPU draws other random
numbers, so its runs are other training runs than the CPU's with the same seed. "train wall s" is the whole
training call (for ddpmkit it includes reading the PNG folder and its per-epoch checkpoints);
"train img/s" is the training images seen per second of it.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ddpmkit.data import load_data
from ddpmkit.metrics import feature_stats, frechet_distance

SIZE = 16
HELD_OUT = 1 / 3
DIFFUSERS_HINT = "diffusers is not installed: pip install diffusers (see benchmarks/README.md, 'bench_quality.py')"


# --------------------------------------------------------------------------- data


def digit_splits(seed: int = 0) -> dict[str, np.ndarray]:
    """uint8 (N, 16, 16) images and labels of the builtin digits, split A (train) and B (held out)."""
    from sklearn.datasets import load_digits

    images = load_data("builtin:digits", SIZE, 1, log=lambda *a: None).images[..., 0]
    raw = load_digits()
    labels = raw.target.astype(np.int64)
    # the labels belong to the builtin's images only if both are in the same order: pool each 16x16
    # image back to 8x8 and check that it correlates best with the raw digit of the same index
    pooled = images.reshape(-1, 8, 2, 8, 2).astype(np.float64).mean(axis=(2, 4)).reshape(len(images), -1)
    small = raw.images.reshape(len(raw.images), -1)
    pooled = (pooled - pooled.mean(1, keepdims=True)) / (pooled.std(1, keepdims=True) + 1e-9)
    small = (small - small.mean(1, keepdims=True)) / (small.std(1, keepdims=True) + 1e-9)
    if len(images) != len(labels) or not np.array_equal((pooled @ small.T).argmax(1), np.arange(len(images))):
        sys.exit("builtin:digits is not in load_digits() order; the labels would be wrong")
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        held[idx[: round(len(idx) * HELD_OUT)]] = True
    return {"all": images, "a": images[~held], "a_labels": labels[~held], "b": images[held], "b_labels": labels[held]}


def write_png_folder(images: np.ndarray, labels: np.ndarray, root: Path) -> Path:
    """Split A as a user's image folder: root/<digit>/<index>.png."""
    from PIL import Image

    for k, (img, lab) in enumerate(zip(images, labels)):
        folder = root / str(int(lab))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(folder / f"{k:05d}.png")
    return root


def to_unit(images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, 16, 16) or (N, 1, 16, 16) -> float (N, 1, 16, 16) in [0, 1]."""
    x = torch.as_tensor(np.asarray(images_uint8)).float() / 255.0
    return x.view(len(x), 1, SIZE, SIZE)


# --------------------------------------------------------------------------- the metric


class DigitNet(nn.Module):
    """A small CNN digit classifier; `features` is its 64-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 4 * 4, 64), nn.ReLU(),
        )
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def fit_classifier(net: nn.Module, images_uint8: torch.Tensor, labels: torch.Tensor, epochs: int, batch_size: int,
                   seed: int = 0) -> nn.Module:
    """Adam (lr 1e-3) with random shifts of up to 2 pixels (pad with black, crop back); images uint8
    (N, 1, H, W), scaled to [0, 1] a batch at a time. Its batch order and shifts depend only on `seed`.
    bench_mnist.py trains its MNIST classifier with it too."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    size = images_uint8.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(images_uint8), generator=gen)
        for start in range(0, len(images_uint8), batch_size):
            idx = perm[start:start + batch_size]
            dy, dx = torch.randint(0, 5, (2,), generator=gen).tolist()
            batch = F.pad(images_uint8[idx].float() / 255.0, (2, 2, 2, 2))[:, :, dy:dy + size, dx:dx + size]
            loss = F.cross_entropy(net(batch), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def train_classifier(images: np.ndarray, labels: np.ndarray, epochs: int = 40, seed: int = 0) -> DigitNet:
    """The metric's DigitNet, trained on split A: batch 64, `fit_classifier`'s shifted crops."""
    torch.manual_seed(seed)
    net = DigitNet()
    x = torch.as_tensor(np.asarray(images)).view(len(images), 1, SIZE, SIZE)
    return fit_classifier(net, x, torch.as_tensor(labels), epochs, 64, seed)


def laplacian_energy(images_uint8) -> np.ndarray:
    """Mean |discrete Laplacian| per image (4-neighbour stencil, replicated border, pixels in [0, 1])."""
    x = F.pad(to_unit(images_uint8), (1, 1, 1, 1), mode="replicate")
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    return F.conv2d(x, kernel).abs().mean(dim=(1, 2, 3)).numpy()


class Scorer:
    """FD against split B in the classifier's feature space, recognized share, speckled share."""

    def __init__(self, splits: dict[str, np.ndarray], seed: int = 0, epochs: int = 40, net: DigitNet | None = None):
        """`net`: an already trained classifier (its weights decide the FD scale), else one is trained."""
        self.net = net.eval() if net is not None else train_classifier(splits["a"], splits["a_labels"], epochs, seed)
        feats, probs = self._outputs(splits["b"])
        self.accuracy = float((probs.argmax(1) == splits["b_labels"]).mean())
        self.ref = feature_stats(feats)
        self.speckle_threshold = float(np.quantile(laplacian_energy(splits["all"]), 0.999))

    @torch.inference_mode()
    def _outputs(self, images_uint8) -> tuple[np.ndarray, np.ndarray]:
        x = to_unit(images_uint8)
        feats = torch.cat([self.net.features(x[i:i + 500]) for i in range(0, len(x), 500)])
        return feats.double().numpy(), self.net.head(feats).softmax(1).double().numpy()

    def __call__(self, images_uint8) -> dict[str, float]:
        feats, probs = self._outputs(images_uint8)
        return {"fd": frechet_distance(*feature_stats(feats), *self.ref),
                "recognized": float((probs.max(1) > 0.9).mean()),
                "speckled": float((laplacian_energy(images_uint8) > self.speckle_threshold).mean())}


# --------------------------------------------------------------------------- ddpmkit


def parse_sets(items: list[str]) -> dict[str, dict[str, str]]:
    """SECTION.KEY=VALUE strings (as `ddpm train --set`) -> {section: {key: value}}."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not (sep and dot and name):
            sys.exit(f"--ddpmkit-set expects SECTION.KEY=VALUE (e.g. train.lr=1e-3), got '{item}'")
        out.setdefault(section, {})[name] = value
    return out


def train_ddpmkit(folder: Path, n_train: int, args, workdir: Path) -> dict:
    """Train through ddpmkit.train (what `ddpm train` runs); returns the EMA model and timings."""
    from ddpmkit.loading import load_model
    from ddpmkit.train import prepare, train

    epochs = max(1, round(args.images / n_train))
    overrides = {
        "model": {"size": args.model_size},
        "data": {"path": str(folder), "image_size": SIZE, "channels": 1},
        "train": {"workdir": str(workdir), "run_name": "bench_quality", "epochs": epochs, "device": args.device,
                  "batch_size": args.batch_size, "sample_every_epochs": 0, "sample_every_steps": 0,
                  "precision": "fp32"},  # as diffusers trains here; --ddpmkit-set train.precision=auto|bf16
    }
    if args.train_seed is not None:
        overrides["train"]["seed"] = args.train_seed
    for section, values in parse_sets(args.ddpmkit_set).items():
        overrides.setdefault(section, {}).update(values)
    cfg, _ = prepare(overrides, fresh=True, log=lambda *a: None)
    start = time.perf_counter()
    summary = train(cfg, None, log=lambda *a: None, progress=False)
    wall = time.perf_counter() - start
    if summary["status"] != "finished":
        sys.exit(f"ddpmkit training ended as '{summary['status']}', not finished")
    model, diffusion, cfg = load_model(summary["ckpt"], device=args.device)
    return {"model": model, "diffusion": diffusion, "cfg": cfg, "train_s": wall, "ckpt": summary["ckpt"], "images": epochs * n_train,
            "params": sum(p.numel() for p in model.parameters())}


def load_ddpmkit(path: str, n_train: int) -> dict:
    """A kept checkpoint, as train_ddpmkit returns a run (its training time is unknown: None)."""
    from ddpmkit.loading import load_model

    model, diffusion, cfg = load_model(path)
    images = int(torch.load(path, map_location="cpu", weights_only=False)["next_epoch"]) * n_train
    return {"model": model, "diffusion": diffusion, "cfg": cfg, "train_s": None, "ckpt": path, "images": images,
            "params": sum(p.numel() for p in model.parameters())}


def sample_ddpmkit(run: dict, sampler: str, steps: int | None, n: int, clip: bool | None, seed: int) -> np.ndarray:
    x = run["diffusion"].generate(run["model"], n, sampler=sampler, steps=steps, seed=seed, batch_size=250,
                                  progress=False, clip=clip)
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()


# --------------------------------------------------------------------------- diffusers


def diffusers_unet(channels: tuple[int, int, int]):
    from diffusers import UNet2DModel

    groups = next(g for g in (32, 16, 8) if all(c % g == 0 for c in channels))
    return UNet2DModel(sample_size=SIZE, in_channels=1, out_channels=1, layers_per_block=2,
                       block_out_channels=channels, norm_num_groups=groups,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))


def match_channels(target: int) -> tuple[tuple[int, int, int], int]:
    """Channels (c, 2c, d), multiples of 8, whose UNet2DModel parameter count is closest to `target`."""
    def count(ch):
        with torch.device("meta"):
            return sum(p.numel() for p in diffusers_unet(ch).parameters())

    best = None
    for c in range(8, 513, 8):  # 2c at the deepest level first, as the example's doubling
        n = count((c, 2 * c, 2 * c))
        if best is None or abs(n - target) < abs(best[1] - target):
            best = ((c, 2 * c, 2 * c), n)
        if n > target:
            break
    c = best[0][0]
    for d in range(max(8, c), 4 * c + 1, 8):  # then tune the deepest level's width
        n = count((c, 2 * c, d))
        if abs(n - target) < abs(best[1] - target):
            best = ((c, 2 * c, d), n)
    return best


def train_diffusers(x_train: np.ndarray, epochs: int, args, target_params: int) -> dict:
    """The unconditional training example's loop (see the module docstring) on split A."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    channels, _ = match_channels(target_params)
    train_seed = args.seed if args.train_seed is None else args.train_seed
    torch.manual_seed(train_seed)
    unet = diffusers_unet(channels)
    data = to_unit(x_train) * 2 - 1
    steps = epochs * math.ceil(len(data) / args.batch_size)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_sched = get_scheduler("cosine", optimizer=opt, num_warmup_steps=min(500, steps // 5), num_training_steps=steps)
    ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    gen = torch.Generator().manual_seed(train_seed)
    unet.train()
    start = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(data), generator=gen)
        for i in range(0, len(data), args.batch_size):
            clean = data[perm[i:i + args.batch_size]]
            noise = torch.randn(clean.shape, generator=gen)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(clean),), generator=gen)
            pred = unet(noise_sched.add_noise(clean, noise, t), t).sample
            loss = F.mse_loss(pred.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            lr_sched.step()
            opt.zero_grad()
            ema.step(unet.parameters())
    wall = time.perf_counter() - start
    ema.copy_to(unet.parameters())
    return {"model": unet.eval(), "train_config": noise_sched.config, "train_s": wall, "images": epochs * len(data),
            "params": sum(p.numel() for p in unet.parameters()), "channels": channels}


def save_diffusers(run: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"channels": run["channels"], "state_dict": run["model"].state_dict(), "train_s": run["train_s"],
                "images": run["images"], "train_config": dict(run["train_config"])}, path)


def load_diffusers(path: str) -> dict:
    from diffusers import DDPMScheduler

    saved = torch.load(path, map_location="cpu", weights_only=False)
    unet = diffusers_unet(tuple(saved["channels"]))
    unet.load_state_dict(saved["state_dict"])
    return {"model": unet.eval(), "train_config": DDPMScheduler.from_config(saved["train_config"]).config,
            "train_s": saved["train_s"], "images": saved["images"], "channels": saved["channels"],
            "params": sum(p.numel() for p in unet.parameters())}


def diffusers_scheduler(kind: str, train_config, thresholding: bool = False):
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    if kind == "ddim":
        return DDIMScheduler.from_config(train_config)
    if kind == "dpm++2m":
        return DPMSolverMultistepScheduler.from_config(train_config, algorithm_type="dpmsolver++", solver_order=2,
                                                       thresholding=thresholding, sample_max_value=1.0)
    return DDPMScheduler.from_config(train_config)


@torch.inference_mode()
def sample_diffusers(run: dict, scheduler, steps: int, n: int, seed: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, 250):
        scheduler.set_timesteps(steps)  # also resets the multistep solver's history
        x = torch.randn(min(250, n - start), 1, SIZE, SIZE, generator=gen) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            eps = run["model"](scheduler.scale_model_input(x, t), t).sample
            x = scheduler.step(eps, t, x, generator=gen).prev_sample
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0])
    return torch.cat(out).numpy()


# --------------------------------------------------------------------------- the table


SAMPLE_ROWS = [  # (key, label, ddpmkit sampler, steps (None: all T), x0 clipping (None: the default), small n)
    ("ddim20", "DDIM", "ddim", 20, None, False),
    ("dpm10", "DPM-Solver++(2M), no clip", "dpm++2m", 10, False, False),
    ("dpm10clip", "DPM-Solver++(2M), clip x0", "dpm++2m", 10, True, False),
    ("dpm20", "DPM-Solver++(2M), no clip", "dpm++2m", 20, False, False),
    ("dpm20clip", "DPM-Solver++(2M), clip x0", "dpm++2m", 20, True, False),
    ("ddpm", "DDPM (all steps)", "ddpm", None, None, True),
]
ROW_KEYS = [row[0] for row in SAMPLE_ROWS]


def system_rows(system: str, run: dict, score: Scorer, args) -> list[dict]:
    """One row per sampler: the metrics' means over --sample-seeds draws of n samples each."""
    from ddpmkit.samplers import nfe

    rows = []
    for key, label, sampler, steps, clip, small in SAMPLE_ROWS:
        n = args.n_ddpm if small else args.n
        if n < 2 or key not in args.rows:
            continue
        if system == "ddpmkit":
            calls = nfe(sampler, steps or run["cfg"].diffusion.timesteps)
        else:
            steps = calls = steps or run["train_config"].num_train_timesteps
        draws, wall = [], 0.0
        for seed in range(args.seed, args.seed + args.sample_seeds):
            start = time.perf_counter()
            if system == "ddpmkit":
                images = sample_ddpmkit(run, sampler, steps, n, clip, seed)
            else:
                images = sample_diffusers(run, diffusers_scheduler(sampler, run["train_config"], bool(clip)), steps,
                                          n, seed)
            wall += time.perf_counter() - start
            draws.append(score(images))
        fds = [d["fd"] for d in draws]
        rows.append({"system": system, "sampler": label, "nfe": calls, "n": n, "draws": len(draws),
                     **{k: float(np.mean([d[k] for d in draws])) for k in draws[0]},
                     "fd_sd": float(np.std(fds, ddof=1)) if len(fds) > 1 else None, "fd_draws": fds,
                     "train_s": run["train_s"], "train_img_s": run["images"] / run["train_s"] if run["train_s"] else None,
                     "sample_img_s": n * len(draws) / wall})
        spread = f" (sd {rows[-1]['fd_sd']:.2f} over {len(fds)} draws)" if len(fds) > 1 else ""
        print(f"  {label} {calls} NFE: FD {rows[-1]['fd']:.2f}{spread}", file=sys.stderr)
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| system | sampler | NFE | n | draws | FD ↓ | FD sd | recognized ↑ | speckled ↓ | train wall s "
            "| train img/s | sampling img/s |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        train = (f"{r['train_s']:.0f} | {r['train_img_s']:.0f}" if r.get("train_s") else "- | -")
        sample = f"{r['sample_img_s']:.3g}" if r.get("sample_img_s") else "-"
        sd = f"{r['fd_sd']:.2f}" if r.get("fd_sd") is not None else "-"
        lines.append(f"| {r['system']} | {r['sampler']} | {r['nfe']} | {r['n']} | {r.get('draws', 1)} | {r['fd']:.2f} | "
                     f"{sd} | {r['recognized']:.3f} | {100 * r['speckled']:.1f}% | {train} | {sample} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=150_000, help="training images per system (default: 150000)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size of both (default: 64)")
    p.add_argument("--n", type=int, default=1000, help="samples per sampler row (default: 1000)")
    p.add_argument("--n-ddpm", type=int, default=200, help="samples for the all-steps DDPM rows (default: 200)")
    p.add_argument("--systems", default="ddpmkit,diffusers", help="comma-separated (default: ddpmkit,diffusers)")
    p.add_argument("--model-size", default="tiny", help="ddpmkit model.size (default: tiny)")
    p.add_argument("--ddpmkit-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="ddpmkit config override, as `ddpm train --set` (repeatable)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help=f"torch threads for both (default: {torch.get_num_threads()})")
    p.add_argument("--device", default="cpu", help="where ddpmkit trains and samples, as `ddpm train --device` "
                   "(default: cpu; diffusers and the classifier stay on the CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, classifier, training and sampling")
    p.add_argument("--train-seed", type=int, default=None,
                   help="seed of both trainings only (weights, data order, noise), to measure the spread between "
                        "training runs with the split, classifier and sampling noise fixed (default: ddpmkit keeps "
                        "its train.seed, 0; diffusers uses --seed)")
    p.add_argument("--classifier-epochs", type=int, default=40, help="digit classifier epochs (default: 40; "
                   "fewer only for smoke tests: the metric changes with the classifier)")
    p.add_argument("--sample-seeds", type=int, default=1, metavar="K",
                   help="draws of n samples per row, with sampling seeds --seed .. --seed+K-1; the table gives the "
                        "metrics' means and FD's standard deviation over the draws (default: 1)")
    p.add_argument("--rows", default=",".join(ROW_KEYS),
                   help=f"comma-separated sampler rows to run (default: all of {','.join(ROW_KEYS)})")
    p.add_argument("--ddpmkit-ckpt", metavar="PATH", help="score this ddpmkit checkpoint (for example one kept "
                   "with --keep-ckpt) instead of training one; its training time is not known")
    p.add_argument("--keep-diffusers", metavar="PATH", help="save diffusers' trained EMA model here")
    p.add_argument("--diffusers-model", metavar="PATH", help="score a diffusers model saved with --keep-diffusers "
                   "instead of training one")
    p.add_argument("--json", metavar="PATH", help="also write the rows and settings as JSON")
    p.add_argument("--keep-ckpt", metavar="PATH", help="copy ddpmkit's trained checkpoint here (a teacher for "
                   "bench_distill.py, a model for bench_compress.py)")
    args = p.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(args.rows) - set(ROW_KEYS))
    if unknown:
        p.error(f"unknown --rows {','.join(unknown)}; choose from {','.join(ROW_KEYS)}")
    if args.sample_seeds < 1:
        p.error(f"--sample-seeds must be >= 1, got {args.sample_seeds}")
    check_device(p, args.device)
    return args


def check_device(parser: argparse.ArgumentParser, name: str) -> None:
    """Stop with a usage error unless ddpmkit's trainer can use the device `name` here."""
    from ddpmkit.errors import DdpmError
    from ddpmkit.train import resolve_device

    try:
        resolve_device(name)
    except DdpmError as e:
        parser.error(str(e) if "--device" in str(e) else f"--device {name}: {e}")


def main(argv=None) -> None:
    args = parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not set(systems) <= {"ddpmkit", "diffusers"}:
        sys.exit(f"--systems takes ddpmkit and/or diffusers, got {args.systems}")
    torch.set_num_threads(args.threads)
    splits = digit_splits(args.seed)
    score = Scorer(splits, args.seed, args.classifier_epochs)
    print(f"split A {len(splits['a'])} images (diffusion + classifier training), split B {len(splits['b'])} held out; "
          f"classifier accuracy on B {score.accuracy:.3f}; speckle threshold {score.speckle_threshold:.4f}; "
          f"{args.threads} threads", file=sys.stderr)
    rows = [{"system": "real (split B, the reference)", "sampler": "-", "nfe": 0, "n": len(splits["b"]),
             **score(splits["b"])},
            {"system": "real (split A, the training images)", "sampler": "-", "nfe": 0, "n": len(splits["a"]),
             **score(splits["a"])}]
    epochs, params, info = max(1, round(args.images / len(splits["a"]))), None, {}
    with tempfile.TemporaryDirectory(prefix="bench_quality_") as tmp:
        if "ddpmkit" in systems:
            if args.ddpmkit_ckpt:
                run = load_ddpmkit(args.ddpmkit_ckpt, len(splits["a"]))
            else:
                folder = write_png_folder(splits["a"], splits["a_labels"], Path(tmp) / "split_a")
                run = train_ddpmkit(folder, len(splits["a"]), args, Path(tmp) / "work")
            params = run["params"]
            info["ddpmkit"] = {"params": params, "images": run["images"], "model": str(run["cfg"].model)}
            trained = f"{run['train_s']:.0f} s" if run["train_s"] else "an unknown time (loaded)"
            print(f"ddpmkit: {params:,} parameters, {run['images']} images in {trained}", file=sys.stderr)
            if args.keep_ckpt and not args.ddpmkit_ckpt:
                Path(args.keep_ckpt).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(run["ckpt"], args.keep_ckpt)
            rows += system_rows("ddpmkit", run, score, args)
    if "diffusers" in systems:
        try:
            import diffusers  # noqa: F401
        except ImportError:
            sys.exit(DIFFUSERS_HINT)
        if params is None:
            from ddpmkit.config import apply_overrides, Config
            from ddpmkit.models import build_model
            cfg = apply_overrides(Config(), {"model": {"size": args.model_size}, **parse_sets(args.ddpmkit_set)})
            params = sum(p.numel() for p in build_model(cfg.model, 1).parameters())
        if args.diffusers_model:
            run = load_diffusers(args.diffusers_model)
        else:
            run = train_diffusers(splits["a"], epochs, args, params)
            if args.keep_diffusers:
                save_diffusers(run, args.keep_diffusers)
        info["diffusers"] = {"params": run["params"], "images": run["images"], "channels": run["channels"]}
        print(f"diffusers: {run['params']:,} parameters (channels {run['channels']}; ddpmkit {params:,}, ratio "
              f"{run['params'] / params:.3f}), {run['images']} images in {run['train_s']:.0f} s", file=sys.stderr)
        if abs(run["params"] / params - 1) > 0.10:
            print("warning: diffusers' parameter count is not within 10% of ddpmkit's", file=sys.stderr)
        rows += system_rows("diffusers", run, score, args)
    print(markdown(rows))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        Path(args.json).write_text(json.dumps({"settings": settings, "classifier_accuracy": score.accuracy,
                                               "systems": info, "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
