"""Inception FID figures for the README: the real-vs-real floor, the demo model per sampler, eval cost.

    DDPMKIT_INCEPTION=/path/to/default_1.pt python benchmarks/bench_fid.py [--ckpt ...] [-n 1000]

1. Floor: FID between a 1,200-image split of the built-in digits and the other 597 (both at
   the demo's 16x16, upscaled to 299x299 by the standard resize inside the extractor).
2. The demo model: FID of n samples per (sampler, NFE) against all 1,797 digits.
3. Cost: measured Inception and sampling throughput, extrapolated to `ddpm eval -n 10000`.
Small n biases FID upwards (2048-d features); compare rows with each other, not with papers.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from ddpmkit import load_model
from ddpmkit.data import builtin_digits
from ddpmkit.extractors import compute_features
from ddpmkit.metrics import evaluate_features
from ddpmkit.scoring import make_extractor

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(ROOT / "models/demo_digits/ckpt.pt"))
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--runs", nargs="+", default=["dpm++2m:20", "dpm++2m:10", "ddpm:100"],
                   help="sampler:NFE pairs (default: dpm++2m:20 dpm++2m:10 ddpm:100)")
    args = p.parse_args()
    extractor = make_extractor("inception")
    model, diffusion, cfg = load_model(args.ckpt)
    size = cfg.data.image_size

    real = torch.from_numpy(builtin_digits(size)).permute(0, 3, 1, 2)
    t0 = time.perf_counter()
    real_feats = compute_features(extractor, real, 50).numpy()
    inception_rate = len(real) / (time.perf_counter() - t0)
    perm = np.random.default_rng(0).permutation(len(real))
    floor = evaluate_features(real_feats[perm[:1200]], real_feats[perm[1200:]], kid_subset_size=500)
    print(f"extractor: {extractor.name} ({inception_rate:.1f} img/s); digits at {size}x{size}")
    rows = [("real-vs-real floor (1200 vs 597 digits)", "-", floor)]
    gen_rate = None
    for run in args.runs:
        sampler, nfe = run.split(":")
        t0 = time.perf_counter()
        images = diffusion.sample(model, args.n, sampler=sampler, steps=int(nfe), seed=0, batch_size=500,
                                  progress=False)
        rate = args.n / (time.perf_counter() - t0)
        if run == args.runs[0]:
            gen_rate = rate
        fake = compute_features(extractor, images, 50).numpy()
        rows.append((f"demo model, {sampler}", nfe, evaluate_features(real_feats, fake, kid_subset_size=500)))
        print(f"  {sampler} NFE {nfe}: FID {rows[-1][2]['fid']:.2f}", flush=True)
    print(f"\n| samples | NFE | FID | KID x1e3 | precision | recall | n |")
    print("|---|---|---|---|---|---|---|")
    for label, nfe, m in rows:
        print(f"| {label} | {nfe} | {m['fid']:.2f} | {1e3 * m['kid_mean']:.2f} +- {1e3 * m['kid_std']:.2f} | "
              f"{m['precision']:.3f} | {m['recall']:.3f} | {m['n_fake']} |")
    total = 10000 / inception_rate + 10000 / gen_rate + len(real) / inception_rate
    print(f"\n`ddpm eval -n 10000` ({args.runs[0]}) on this machine: about {total / 60:.0f} min "
          f"(Inception {inception_rate:.1f} img/s, sampling {gen_rate:.0f} img/s, reference once)")


if __name__ == "__main__":
    main()
