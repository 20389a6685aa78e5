"""What a checkpoint write costs: wall seconds of ddpmkit's atomic checkpoint save (torch.save to a
temp file, fsync, rename) for each model preset with its AdamW state and EMA, as `ddpm train` writes
it, and that cost as a share of the default time-based interval (`train.ckpt_every_minutes`).

    python benchmarks/bench_ckpt.py [--presets tiny,small,cifar] [--repeats 3] [--dir /tmp]

Run it alone, on the disk the runs will use (a Colab Drive mount is much slower than a local disk).
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from ddpmkit.checkpoint import atomic_save
from ddpmkit.config import PRESETS, new_run_config, preset
from ddpmkit.models import build_model


def checkpoint_like(name: str) -> dict:
    """Model, EMA and AdamW state after one step: the tensors a training checkpoint holds."""
    cfg = new_run_config()
    cfg.model = preset(name)
    cfg.data.channels = 3
    model = build_model(cfg.model, channels=3)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return {"model": model.state_dict(), "ema": copy.deepcopy(model.state_dict()), "optimizer": opt.state_dict(),
            "config": cfg.to_dict()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,small,cifar", help="comma-separated presets (default: tiny,small,cifar)")
    p.add_argument("--repeats", type=int, default=3, help="saves per preset; the median is reported (default: 3)")
    p.add_argument("--dir", default=None, help="folder to write to (default: a temporary folder)")
    p.add_argument("--interval-min", type=float, default=new_run_config().train.ckpt_every_minutes,
                   help="the time-based interval to compare with (default: the new-run default)")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for name in args.presets.split(","):
            if name not in PRESETS:
                p.error(f"unknown preset {name}; choose from {','.join(PRESETS)}")
            ckpt = checkpoint_like(name)
            path = Path(tmp) / f"{name}.pt"
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                atomic_save(ckpt, path)
                times.append(time.perf_counter() - start)
            params = sum(v.numel() for v in ckpt["model"].values())
            median = sorted(times)[len(times) // 2]
            rows.append((name, params / 1e6, path.stat().st_size / 2**20, median,
                         100 * median / (60 * args.interval_min)))
    print(f"| preset | params (M) | file MiB | save s (median of {args.repeats}) | share of {args.interval_min:g} min |")
    print("|---|---|---|---|---|")
    for name, m, mib, s, share in rows:
        print(f"| {name} | {m:.2f} | {mib:.0f} | {s:.3f} | {share:.3f}% |")


if __name__ == "__main__":
    main()
