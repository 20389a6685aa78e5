"""Sample quality against the number of model evaluations (NFE), for every sampler.

    python benchmarks/bench_samplers.py [--ckpt models/demo_digits/ckpt.pt] [-n 1000]

Metric: the Frechet distance between generated and held-out real digits in the 64-d
penultimate features of a small CNN classifier trained here on the other digits (the
"classifier FD"; lower is better; its real-vs-real floor is printed too). It is an honest,
cheap stand-in for FID on 16x16 grayscale digits, where Inception features mean little.
Without --ckpt it trains the README demo model first (a few minutes).
Run it alone: another torch process on 2 cores distorts the times.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ddpmkit import load_model, samplers
from ddpmkit.data import builtin_digits
from ddpmkit.evaluate import feature_stats, frechet_distance

ROOT = Path(__file__).resolve().parents[1]


class DigitNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.ReLU(),
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.features(x))


def to_input(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float() / 127.5 - 1


def train_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = 30) -> DigitNet:
    torch.manual_seed(0)
    net = DigitNet()
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(images))
        for i in range(0, len(images), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(net(to_input(images[idx])), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@torch.inference_mode()
def features(net: DigitNet, images_uint8: torch.Tensor) -> np.ndarray:
    return torch.cat([net.features(to_input(images_uint8[i:i + 512])) for i in range(0, len(images_uint8), 512)]).numpy()


def classifier_fd(net, images_uint8, ref_stats) -> float:
    mu, sigma = feature_stats(features(net, images_uint8))
    return frechet_distance(mu, sigma, *ref_stats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(ROOT / "models/demo_digits/ckpt.pt"))
    p.add_argument("-n", type=int, default=1000, help="samples per sampler and NFE (default: 1000)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50])
    p.add_argument("--samplers", nargs="+", default=["ddpm", "ddim", "dpm++2m", "dpm++3m", "dpm++2m-sde", "euler", "heun"])
    args = p.parse_args()

    if not Path(args.ckpt).is_file():
        print(f"{args.ckpt} not found: training the README demo model first", flush=True)
        subprocess.run([sys.executable, "-m", "ddpmkit", "train", "--config", str(ROOT / "examples/demo.toml"),
                        "--workdir", str(ROOT), "--no-progress"], check=True)
    model, diffusion, cfg = load_model(args.ckpt)
    size = cfg.data.image_size

    from sklearn.datasets import load_digits
    labels = torch.from_numpy(load_digits().target)
    real = torch.from_numpy(builtin_digits(size)).permute(0, 3, 1, 2)
    rng = np.random.default_rng(0)
    perm = torch.from_numpy(rng.permutation(len(real)))
    train_idx, held_idx = perm[:1200], perm[1200:]
    net = train_classifier(real[train_idx], labels[train_idx])
    with torch.inference_mode():
        acc = (net(to_input(real[held_idx])).argmax(1) == labels[held_idx]).float().mean().item()
    ref_stats = feature_stats(features(net, real[held_idx]))
    floor = classifier_fd(net, real[train_idx], ref_stats)
    print(f"model: {args.ckpt} ({cfg.model.size}, {size}x{size}, prediction {cfg.diffusion.prediction}); "
          f"classifier held-out accuracy {acc:.3f}; n = {args.n}; torch threads {torch.get_num_threads()}")
    print(f"real-vs-real floor (1200 train digits vs {len(held_idx)} held-out): classifier FD {floor:.3f}\n")

    rows = []
    for name in args.samplers:
        nfes = list(args.nfe) + ([diffusion.noise_steps] if name == "ddpm" else [])  # the 1000-step baseline
        for nfe in nfes:
            steps = (nfe + 1) // 2 if samplers.SAMPLERS[name].calls_per_step == 2 else nfe
            t0 = time.perf_counter()
            images = diffusion.sample(model, args.n, sampler=name, steps=steps, seed=0, batch_size=args.batch_size,
                                      progress=False)
            dt = time.perf_counter() - t0
            rows.append((name, samplers.nfe(name, steps), dt, classifier_fd(net, images, ref_stats)))
            print(f"  {name:12s} NFE {rows[-1][1]:5d}  {dt:7.1f} s  FD {rows[-1][3]:.3f}", flush=True)
    base = next((r[3] for r in rows if r[0] == "ddpm" and r[1] == diffusion.noise_steps), None)
    print("\n| sampler | NFE | time (s) | img/s | classifier FD | vs DDPM-1000 |")
    print("|---|---|---|---|---|---|")
    for name, nfe, dt, fd in rows:
        ratio = f"{fd / base:.2f}x" if base else "-"
        print(f"| {name} | {nfe} | {dt:.1f} | {args.n / dt:.0f} | {fd:.3f} | {ratio} |")


if __name__ == "__main__":
    main()
