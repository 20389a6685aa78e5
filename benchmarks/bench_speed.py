"""Training and sampling throughput of ddpmkit's UNet sizes, fp32 vs bf16 autocast, on this machine.

    python benchmarks/bench_speed.py [--sizes tiny seed] [--device cpu]

Training img/s: full optimizer steps (forward, backward, AdamW, EMA) at the given batch size.
Sampling img/s at 1000 steps: per-step time of the DDPM sampler measured over --sample-steps
steps (after a warm-up step) and scaled to 1000 steps, since the cost of a step does not
depend on t. Run it alone: a second torch process on 2 cores distorts the numbers.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from ddpmkit import Diffusion
from ddpmkit.losses import VPLoss
from ddpmkit.models import PRESETS, build_model
from ddpmkit.train import EMA

IMAGE_SIZE = {"tiny": 32, "small": 32, "seed": 64, "cifar": 32}


def bench_train(size: str, bf16: bool, batch: int, steps: int, device: torch.device) -> float:
    torch.manual_seed(0)
    model = build_model(PRESETS[size], 3).to(device)
    ema = EMA(model, 0.995)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    d = Diffusion(img_size=IMAGE_SIZE[size], device=device)
    loss_fn = VPLoss(d.alpha_bar64)
    x = torch.randn(batch, 3, IMAGE_SIZE[size], IMAGE_SIZE[size], device=device)

    def step(i):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model, x).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model, i)

    step(0)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i + 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def bench_sample(size: str, bf16: bool, n: int, steps: int, device: torch.device) -> float:
    torch.manual_seed(0)
    model = build_model(PRESETS[size], 3).to(device).eval()
    d = Diffusion(img_size=IMAGE_SIZE[size], device=device)
    d.generate(model, n, sampler="ddpm", steps=1, seed=0, bf16=bf16, progress=False)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    d.generate(model, n, sampler="ddpm", steps=steps, seed=0, bf16=bf16, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_step = (time.perf_counter() - t0) / steps
    return n / (per_step * 1000)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "seed"], choices=sorted(PRESETS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=16, help="training batch and sampling batch (default: 16)")
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--sample-steps", type=int, default=10)
    args = p.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"| size | image | params | precision | train img/s (batch {args.batch}) | 1000-step sampling img/s |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        params = sum(p.numel() for p in build_model(PRESETS[size], 3).parameters()) / 1e6
        for bf16 in (False, True):
            tr = bench_train(size, bf16, args.batch, args.train_steps, device)
            sa = bench_sample(size, bf16, args.batch, args.sample_steps, device)
            s = IMAGE_SIZE[size]
            print(f"| {size} | {s}x{s} | {params:.1f}M | {'bf16' if bf16 else 'fp32'} | {tr:.1f} | {sa:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
