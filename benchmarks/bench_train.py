"""ddpmkit (its real `ddpm train` / `ddpm sample` code paths) against diffusers' UNet2DModel training
example: training img/s, sampling img/s and images x NFE/s, peak memory, and the ratios.

    pip install --dry-run diffusers   # benchmark-only; the list must not contain torch
    python benchmarks/bench_train.py --model-size tiny --image-size 16 --channels 1 --data digits \\
        --batch-size 64 --steps 20 --bf16 both --threads 2

ddpmkit side: the workers of bench_speed.py (read its docstring): `ddpmkit.train.prepare` +
`ddpmkit.train.train` on a temporary .npy of (warm-up + steps) x batch images, one epoch, the
median of the trainer's own logged img/s over the timed steps; then `load_model` +
`Diffusion.generate` with --sampler (default dpm++2m, 20 steps).

diffusers side, written here after diffusers' unconditional training example
(examples/unconditional_image_generation/train_unconditional.py) without accelerate:
`UNet2DModel`, `DDPMScheduler(1000, "linear")`, eps-prediction MSE, AdamW (lr 1e-4, betas
(0.95, 0.999), weight decay 1e-6, eps 1e-8), cosine LR schedule with 500 warm-up steps, gradient
clipping at 1, `EMAModel` (decay 0.9999, EMA warm-up, power 3/4), and the loss read back every
step as the example logs it; bf16 is `torch.autocast("cpu", bfloat16)` around the network, which
is what accelerate's `mixed_precision="bf16"` does on a CPU. Batches are drawn from the same .npy
in a random order. Each optimizer step is timed with perf_counter, and the figure is the median
of batch / step time over the timed steps (the same per-step measure as ddpmkit's log). Sampling:
`DPMSolverMultistepScheduler` (dpmsolver++, order 2; only dpm++2m has this counterpart) at the same
steps and batch, timed like ddpmkit's.

The network mirrors the ddpmkit preset's layout: as many levels, the same channel multipliers
(levels at the largest multiplier may be narrowed), attention at the same levels with the same
head count, num_res_blocks ResNet blocks per level, the preset's dropout; the base width is
chosen so that the parameter count is within 10% of ddpmkit's (checked; the script stops if not).

Only flag sets the CLI offers are compared: fp32 (the default) and bf16 (`ddpm train --bf16 true`,
`ddpm sample --bf16`). Every configuration runs in a fresh subprocess with the same batch and
--threads; peak memory is VmHWM as in bench_speed.py, reset for training before the model and
the data are built on both sides (ddpmkit's train() builds them), and for sampling after the
warm-up call. Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_speed as bs  # noqa: E402  (the ddpmkit workers and the shared helpers)

DIFFUSERS_HINT = ("diffusers is not installed; it is a benchmark-only dependency:\n"
                  "  pip install --dry-run diffusers   # the list must not contain torch\n"
                  "  pip install diffusers")
PARAM_TOLERANCE = 0.10


# --------------------------------------------------------------------------- the diffusers network


def diffusers_unet(spec: dict, channels: tuple[int, ...], meta: bool = False):
    import torch
    from diffusers import UNet2DModel

    from ddpmkit.config import PRESETS

    pc = PRESETS[spec["model_size"]]
    groups = next(g for g in (32, 16, 8, 4) if all(c % g == 0 for c in channels))
    n = len(channels)
    down = tuple("AttnDownBlock2D" if k in pc.attn_levels else "DownBlock2D" for k in range(n))
    up = tuple("AttnUpBlock2D" if n - 1 - k in pc.attn_levels else "UpBlock2D" for k in range(n))
    heads_dim = channels[pc.attn_levels[0]] // pc.num_heads if pc.attn_levels else None
    with torch.device("meta") if meta else torch.device("cpu"):
        return UNet2DModel(sample_size=spec["image_size"], in_channels=spec["channels"],
                           out_channels=spec["channels"], layers_per_block=pc.num_res_blocks,
                           block_out_channels=channels, down_block_types=down, up_block_types=up,
                           norm_num_groups=groups, attention_head_dim=heads_dim, dropout=pc.dropout)


def match_channels(spec: dict, target: int) -> tuple[tuple[int, ...], int]:
    """block_out_channels base*mults (multiples of 8; the widest levels may be narrowed to `d`) whose
    parameter count is closest to `target`; among those within 2%, the one with the most GroupNorm
    groups (diffusers' default is 32)."""
    from ddpmkit.config import PRESETS

    mults = PRESETS[spec["model_size"]].channel_mults
    top = max(mults)

    def count(ch):
        return sum(p.numel() for p in diffusers_unet(spec, ch, meta=True).parameters())

    found = []
    for c in range(8, 1025, 8):  # the smallest base width at or above the target, unnarrowed
        found.append((tuple(c * m for m in mults), count(tuple(c * m for m in mults))))
        if found[-1][1] >= target:
            break
    c0 = found[-1][0][0] // mults[0]
    for c in sorted({max(8, c0 - 8), c0, c0 + 8}):
        for d in range(c * top - 8, c * top // 2 - 1, -8):  # then narrow the widest levels
            ch = tuple(c * m if m < top else d for m in mults)
            found.append((ch, count(ch)))
    close = [f for f in found if abs(f[1] - target) <= 0.02 * target]
    if close:
        return max(close, key=lambda f: (math.gcd(*f[0], 32), -abs(f[1] - target)))
    return min(found, key=lambda f: abs(f[1] - target))


# --------------------------------------------------------------------------- diffusers workers


def load_images(path: str):
    import numpy as np
    import torch

    a = np.load(path)
    a = a[..., None] if a.ndim == 3 else a
    return torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1


def diffusers_train(spec: dict) -> dict:
    """The training example's loop; median batch / step time over the timed steps."""
    bs.set_threads(spec["threads"])
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    base = bs.reset_peak()  # before the model and the data, as ddpmkit's train() builds both
    torch.manual_seed(0)
    unet = diffusers_unet(spec, tuple(spec["diffusers_channels"]))
    data = load_images(spec["data"])
    total = spec["warmup"] + spec["steps"]
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_sched = get_scheduler("cosine", optimizer=opt, num_warmup_steps=500, num_training_steps=total)
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["bf16"])
    order = torch.randperm(len(data))
    unet.train()
    times = []
    for i in range(total):
        t0 = time.perf_counter()
        clean = data[order[i * spec["batch"]:(i + 1) * spec["batch"]]]
        noise = torch.randn(clean.shape)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(clean),))
        with autocast:
            pred = unet(noise_sched.add_noise(clean, noise, t), t).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        opt.zero_grad()
        ema.step(unet.parameters())
        loss.detach().item()  # the example logs the loss every step
        times.append(time.perf_counter() - t0)
    rates = [spec["batch"] / s for s in times[spec["warmup"]:]]
    torch.save(unet.state_dict(), Path(spec["workdir"]) / "diffusers_unet.pt")
    return {**spec, "params": sum(p.numel() for p in unet.parameters()), "per_s": statistics.median(rates),
            "min_per_s": min(rates), "max_per_s": max(rates), "timed_steps": len(rates),
            "train_wall_s": sum(times), "torch": torch.__version__, "threads_used": torch.get_num_threads(),
            **bs.peak(base)}


def diffusers_sample(spec: dict) -> dict:
    """DPM-Solver++(2M) through DPMSolverMultistepScheduler on the trained UNet2DModel."""
    bs.set_threads(spec["threads"])
    import torch
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    unet = diffusers_unet(spec, tuple(spec["diffusers_channels"]))
    unet.load_state_dict(torch.load(Path(spec["workdir"]) / "diffusers_unet.pt"))
    unet.eval()
    counter = bs.CallCounter(unet)
    config = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").config
    sched = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["bf16"])
    shape = (spec["sample_n"], spec["channels"], spec["image_size"], spec["image_size"])

    @torch.inference_mode()
    def gen(steps: int):
        g = torch.Generator().manual_seed(0)
        sched.set_timesteps(steps)
        x = torch.randn(shape, generator=g) * sched.init_noise_sigma
        for t in sched.timesteps:
            with autocast:
                eps = unet(sched.scale_model_input(x, t), t).sample
            x = sched.step(eps.float(), t, x).prev_sample
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    gen(2)
    base = bs.reset_peak()
    counter.n = 0
    times = bs.timed_calls(lambda: gen(spec["sample_steps"]), spec["sample_reps"])
    nfe = counter.n / spec["sample_reps"]
    return bs.sample_result(spec, times, nfe, base, sum(p.numel() for p in unet.parameters()))


WORKERS = {("ddpmkit", "train"): bs.ddpmkit_train, ("ddpmkit", "sample"): bs.ddpmkit_sample,
           ("diffusers", "train"): diffusers_train, ("diffusers", "sample"): diffusers_sample}


# --------------------------------------------------------------------------- the comparison


def ddpmkit_params(spec: dict) -> int:
    import torch

    from ddpmkit.config import PRESETS
    from ddpmkit.models import build_model

    with torch.device("meta"):
        return sum(p.numel() for p in build_model(PRESETS[spec["model_size"]], spec["channels"]).parameters())


def ratio(a: dict, b: dict, key: str) -> str:
    if "error" in a or "error" in b or not b.get(key):
        return "n/a"
    return f"{a[key] / b[key]:.2f}x"


def table(results: dict, bf16s: list[bool], sampler: str) -> None:
    print("\n| measure | precision | ddpmkit | diffusers | ddpmkit / diffusers |")
    print("|---|---|---|---|---|")
    rows = (("train", "per_s", "training img/s (median per step)", ".1f"),
            ("sample", "per_s", f"sampling img/s ({sampler})", ".2f"),
            ("sample", "nfe_per_s", "sampling img x NFE/s", ".1f"))
    for mode, key, label, spec in rows:
        for bf16 in bf16s:
            a, b = results[("ddpmkit", mode, bf16)], results[("diffusers", mode, bf16)]
            prec = "bf16" if bf16 else "fp32 (default)"
            print(f"| {label} | {prec} | {bs.fmt(a, key, spec)} | {bs.fmt(b, key, spec)} | {ratio(a, b, key)} |")
    for mode, label in (("train", "training peak RSS MiB (+increase)"),
                        ("sample", "sampling peak RSS MiB (+increase)")):
        for bf16 in bf16s:
            cells = [f"{bs.fmt(results[(i, mode, bf16)], 'peak_mib', '.0f')} "
                     f"(+{bs.fmt(results[(i, mode, bf16)], 'delta_mib', '.0f')})" for i in ("ddpmkit", "diffusers")]
            print(f"| {label} | {'bf16' if bf16 else 'fp32 (default)'} | {cells[0]} | {cells[1]} | |")
    nfe = {i: results[(i, "sample", bf16s[0])].get("nfe") for i in ("ddpmkit", "diffusers")}
    print(f"\nNFE per sampling call: ddpmkit {nfe['ddpmkit']}, diffusers {nfe['diffusers']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bs.add_common_args(p)
    args = p.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(WORKERS[(spec["impl"], spec["mode"])](spec)))
        return
    bs.check_args(args)
    if args.sampler != "dpm++2m":
        sys.exit("bench_train.py compares dpm++2m only (diffusers' DPMSolverMultistepScheduler); "
                 "use bench_speed.py for other samplers")
    try:
        import diffusers
    except ImportError:
        sys.exit(DIFFUSERS_HINT)
    print(bs.header(args, f"; diffusers {diffusers.__version__}"), flush=True)
    started = time.perf_counter()
    bf16s = bs.precisions(args.bf16)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        data = bs.write_data(args.data, (args.warmup + args.steps) * args.batch_size, args.image_size,
                             args.channels, Path(tmp) / "data.npy")
        common = bs.base_spec(args, Path(tmp), data)
        ours = ddpmkit_params(common)
        channels, theirs = match_channels(common, ours)
        print(f"parameters: ddpmkit {ours / 1e6:.3f}M, diffusers {theirs / 1e6:.3f}M (block_out_channels "
              f"{channels}; diffusers / ddpmkit = {theirs / ours:.3f})", flush=True)
        if abs(theirs / ours - 1) > PARAM_TOLERANCE:
            sys.exit(f"no UNet2DModel layout within {PARAM_TOLERANCE:.0%} of ddpmkit's parameter count")
        results = {}
        for bf16 in bf16s:
            for impl in ("ddpmkit", "diffusers"):
                workdir = Path(tmp) / f"{impl}_{int(bf16)}"
                workdir.mkdir()
                spec = {**common, "workdir": str(workdir), "bf16": bf16, "impl": impl,
                        "diffusers_channels": list(channels)}
                for mode in ("train", "sample"):
                    if mode == "sample" and "error" in results[(impl, "train", bf16)]:
                        results[(impl, mode, bf16)] = results[(impl, "train", bf16)]
                        continue
                    extra = {"ckpt": results[(impl, "train", bf16)].get("ckpt")} if mode == "sample" else {}
                    r = bs.run_worker(Path(__file__), {**spec, **extra, "mode": mode})
                    results[(impl, mode, bf16)] = r
                    what = "failed: " + r["error"] if "error" in r else f"{r['per_s']:.2f} img/s"
                    print(f"  {mode:6s} {impl:9s} {'bf16' if bf16 else 'fp32'} {what}", file=sys.stderr, flush=True)
    table(results, bf16s, args.sampler)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
