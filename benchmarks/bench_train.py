"""ddpmkit (its real `ddpm train` / `ddpm sample` code paths) against diffusers' UNet2DModel training
example: training img/s, sampling img/s and images x NFE/s, peak memory, and the ratios.

    pip install --dry-run diffusers   # benchmark-only; the list must not contain torch
    python benchmarks/bench_train.py --model-size tiny --image-size 16 --channels 1 --data digits \\
        --batch-size 64 --steps 20 --bf16 both --threads 2
    python benchmarks/bench_train.py --device cuda --model-size cifar --image-size 32 --channels 3 \\
        --data random --batch-size 128 --precision fp32,bf16,fp16 --compile both --channels-last both

ddpmkit side, as bench_speed.py's workers (read its docstring) but on --device and with the
network options of `ddpm train`: `ddpmkit.train.prepare` + `ddpmkit.train.train` (train.precision,
train.compile, train.channels_last) on a temporary .npy of (warm-up + steps) x batch images, one
epoch, the median of the trainer's own logged img/s over the timed steps; then `load_model` +
`Diffusion.generate` with --sampler (default dpm++2m, 20 steps), the network compiled and in
channels_last as `ddpm sample --compile` and the trainer do it.

diffusers side, written here after diffusers' unconditional training example
(examples/unconditional_image_generation/train_unconditional.py) without accelerate:
`UNet2DModel`, `DDPMScheduler(1000, "linear")`, eps-prediction MSE, AdamW (lr 1e-4, betas
(0.95, 0.999), weight decay 1e-6, eps 1e-8), cosine LR schedule with 500 warm-up steps, gradient
clipping at 1, `EMAModel` (decay 0.9999, EMA warm-up, power 3/4), and the loss read back every
step as the example logs it. Precision as accelerate's `mixed_precision` does it: bf16 is
`torch.autocast(device, bfloat16)` around the network; fp16 is autocast(float16) plus a
`torch.amp.GradScaler`, unscaled before clipping; compile is `torch.compile(unet)` (accelerate's
`dynamo_backend="inductor"`) and channels_last `unet.to(memory_format=torch.channels_last)`.
Batches are drawn from the same .npy in a random order. Each optimizer step is timed with
perf_counter, and the figure is the median of batch / step time over the timed steps (the same
per-step measure as ddpmkit's log). Sampling:
`DPMSolverMultistepScheduler` (dpmsolver++, order 2; only dpm++2m has this counterpart) at the same
steps and batch, timed like ddpmkit's.

The network mirrors the ddpmkit preset's layout: as many levels, the same channel multipliers
(levels at the largest multiplier may be narrowed), attention at the same levels with the same
head count, num_res_blocks ResNet blocks per level, the preset's dropout; the base width is
chosen so that the parameter count is within 10% of ddpmkit's (checked; the script stops if not).

Only option sets the CLI offers are compared: --precision fp32 (the default), bf16, fp16 (`ddpm
train --precision`, `ddpm sample --precision`; --bf16 true/both is the older spelling of fp32/bf16),
each optionally with --compile and --channels-last (`ddpm train --compile --channels-last`). Every
configuration runs in a fresh subprocess with the same batch and --threads. Peak memory: on the
CPU VmHWM as in bench_speed.py, on a GPU torch.cuda.max_memory_allocated; reset for training
before the model and the data are built on both sides (ddpmkit's train() builds them), and for
sampling after the warm-up call. A compiled configuration compiles during the warm-up steps
(give it --warmup 3 or more) and the first sampling call. Run it alone on the machine.
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
PRECISIONS = ("fp32", "bf16", "fp16")


def _autocast_dtypes():
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


# --------------------------------------------------------------------------- shared by the workers


def variant_name(spec: dict) -> str:
    """fp32 / bf16 / fp16, + compile, + channels_last."""
    return " + ".join([spec["precision"]] + ["compile"] * spec["compile"] + ["channels_last"] * spec["channels_last"])


def reset_memory(spec: dict):
    import torch

    if spec["device"] == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return bs.reset_peak()


def peak_memory(spec: dict, base) -> dict:
    """{peak_mib, delta_mib}: GPU memory allocated by torch, or the process's VmHWM on the CPU."""
    import torch

    if spec["device"] == "cuda":
        torch.cuda.synchronize()
        top = torch.cuda.max_memory_allocated()
        return {"peak_mib": top / 2**20, "delta_mib": (top - base) / 2**20}
    return bs.peak(base)


def sync(spec: dict) -> None:
    import torch

    if spec["device"] == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- ddpmkit workers


def ddpmkit_train(spec: dict) -> dict:
    """`ddpm train` with the spec's device, precision, compile and channels_last; its logged img/s."""
    bs.set_threads(spec["threads"])
    import torch

    from ddpmkit.checkpoint import load_checkpoint
    from ddpmkit.models import build_model
    from ddpmkit.train import prepare, train

    total = spec["warmup"] + spec["steps"]
    overrides = {
        "model": {"size": spec["model_size"]},
        "data": {"path": spec["data"], "image_size": spec["image_size"], "channels": spec["channels"]},
        "train": {"workdir": spec["workdir"], "run_name": "bench", "epochs": 1, "device": spec["device"],
                  "batch_size": spec["batch"], "precision": spec["precision"], "compile": spec["compile"],
                  "channels_last": spec["channels_last"], "log_every": 1, "sample_every_epochs": 0,
                  "sample_every_steps": 0, "ckpt_every_minutes": 0.0, "logger": "none"},
    }
    cfg, _ = prepare(overrides, fresh=True, log=bs._quiet)
    base = reset_memory(spec)
    start = time.perf_counter()
    summary = train(cfg, None, log=bs._quiet, progress=False)
    wall = time.perf_counter() - start
    mem = peak_memory(spec, base)
    logged = load_checkpoint(summary["ckpt"])["history"]["img_per_sec"]
    if summary["step"] != total or len(logged) != total:
        raise SystemExit(f"expected {total} logged steps, got {summary['step']} steps and {len(logged)} log points")
    timed = [v for step, v in logged if step > spec["warmup"]]
    with torch.device("meta"):
        params = sum(p.numel() for p in build_model(cfg.model, spec["channels"]).parameters())
    return {**spec, "params": params, "per_s": statistics.median(timed), "min_per_s": min(timed),
            "max_per_s": max(timed), "timed_steps": len(timed), "train_wall_s": wall, "ckpt": str(summary["ckpt"]),
            "torch": torch.__version__, "threads_used": torch.get_num_threads(), **mem}


def ddpmkit_sample(spec: dict) -> dict:
    """load_model + Diffusion.generate (what `ddpm sample --precision P [--compile]` runs)."""
    bs.set_threads(spec["threads"])
    from ddpmkit.loading import load_model
    from ddpmkit.precision import channels_last, compile_network

    model, diffusion, _ = load_model(spec["ckpt"], spec["device"])
    params = sum(p.numel() for p in model.parameters())
    if spec["channels_last"]:
        channels_last(model)
    net = compile_network(model, diffusion.device) if spec["compile"] else model
    counter = bs.CallCounter(net)

    def gen(steps: int):
        return diffusion.generate(net, spec["sample_n"], sampler=spec["sampler"], steps=steps, seed=0,
                                  bf16=spec["precision"], progress=False)

    gen(2)  # warm-up: first calls allocate, pick kernels (and compile)
    base = reset_memory(spec)
    counter.n = 0
    times = bs.timed_calls(lambda: gen(spec["sample_steps"]), spec["sample_reps"])
    nfe = counter.n / spec["sample_reps"]
    return {**bs.sample_result(spec, times, nfe, None, params), **peak_memory(spec, base)}


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

    device = torch.device(spec["device"])
    base = reset_memory(spec)  # before the model and the data, as ddpmkit's train() builds both
    torch.manual_seed(0)
    unet = diffusers_unet(spec, tuple(spec["diffusers_channels"])).to(device)
    if spec["channels_last"]:
        unet = unet.to(memory_format=torch.channels_last)
    step_unet = torch.compile(unet) if spec["compile"] else unet
    data = load_images(spec["data"]).to(device)
    total = spec["warmup"] + spec["steps"]
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_sched = get_scheduler("cosine", optimizer=opt, num_warmup_steps=500, num_training_steps=total)
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    autocast = torch.autocast(device.type, dtype=_autocast_dtypes()[spec["precision"]] or torch.bfloat16,
                              enabled=spec["precision"] != "fp32")
    scaler = torch.amp.GradScaler(device.type, enabled=spec["precision"] == "fp16")
    order = torch.randperm(len(data), device=device)
    unet.train()
    times = []
    for i in range(total):
        t0 = time.perf_counter()
        clean = data[order[i * spec["batch"]:(i + 1) * spec["batch"]]]
        noise = torch.randn(clean.shape, device=device)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(clean),), device=device)
        with autocast:
            pred = step_unet(noise_sched.add_noise(clean, noise, t), t).sample
        loss = F.mse_loss(pred.float(), noise.float())
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
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
            **peak_memory(spec, base)}


def diffusers_sample(spec: dict) -> dict:
    """DPM-Solver++(2M) through DPMSolverMultistepScheduler on the trained UNet2DModel."""
    bs.set_threads(spec["threads"])
    import torch
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    device = torch.device(spec["device"])
    unet = diffusers_unet(spec, tuple(spec["diffusers_channels"]))
    unet.load_state_dict(torch.load(Path(spec["workdir"]) / "diffusers_unet.pt"))
    unet = unet.to(device).eval()
    if spec["channels_last"]:
        unet = unet.to(memory_format=torch.channels_last)
    net = torch.compile(unet) if spec["compile"] else unet
    counter = bs.CallCounter(net)
    config = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").config
    sched = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    autocast = torch.autocast(device.type, dtype=_autocast_dtypes()[spec["precision"]] or torch.bfloat16,
                              enabled=spec["precision"] != "fp32")
    shape = (spec["sample_n"], spec["channels"], spec["image_size"], spec["image_size"])

    @torch.inference_mode()
    def gen(steps: int):
        g = torch.Generator().manual_seed(0)
        sched.set_timesteps(steps, device=device)
        x = (torch.randn(shape, generator=g) * sched.init_noise_sigma).to(device)
        for t in sched.timesteps:
            with autocast:
                eps = net(sched.scale_model_input(x, t), t).sample
            x = sched.step(eps.float(), t, x).prev_sample
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()  # .cpu() waits for the GPU

    gen(2)
    base = reset_memory(spec)
    counter.n = 0
    times = bs.timed_calls(lambda: gen(spec["sample_steps"]), spec["sample_reps"])
    nfe = counter.n / spec["sample_reps"]
    return {**bs.sample_result(spec, times, nfe, None, sum(p.numel() for p in unet.parameters())),
            **peak_memory(spec, base)}


WORKERS = {("ddpmkit", "train"): ddpmkit_train, ("ddpmkit", "sample"): ddpmkit_sample,
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


def table(results: dict, variants: list[dict], sampler: str) -> None:
    print("\n| measure | configuration | ddpmkit | diffusers | ddpmkit / diffusers |")
    print("|---|---|---|---|---|")
    rows = (("train", "per_s", "training img/s (median per step)", ".1f"),
            ("sample", "per_s", f"sampling img/s ({sampler})", ".2f"),
            ("sample", "nfe_per_s", "sampling img x NFE/s", ".1f"))
    for mode, key, label, spec in rows:
        for v in variants:
            a, b = results[("ddpmkit", mode, v["name"])], results[("diffusers", mode, v["name"])]
            print(f"| {label} | {v['name']} | {bs.fmt(a, key, spec)} | {bs.fmt(b, key, spec)} | {ratio(a, b, key)} |")
    what = "GPU memory allocated" if variants[0]["device"] == "cuda" else "RSS"
    for mode, label in (("train", f"training peak {what} MiB (+increase)"),
                        ("sample", f"sampling peak {what} MiB (+increase)")):
        for v in variants:
            found = [results[(i, mode, v["name"])] for i in ("ddpmkit", "diffusers")]
            cells = [f"{bs.fmt(r, 'peak_mib', '.0f')} (+{bs.fmt(r, 'delta_mib', '.0f')})" for r in found]
            print(f"| {label} | {v['name']} | {cells[0]} | {cells[1]} | |")
    nfe = {i: results[(i, "sample", variants[0]["name"])].get("nfe") for i in ("ddpmkit", "diffusers")}
    print(f"\nNFE per sampling call: ddpmkit {nfe['ddpmkit']}, diffusers {nfe['diffusers']}")


def both(flag: str) -> list[bool]:
    return {"false": [False], "true": [True], "both": [False, True]}[flag]


def variants_of(args) -> list[dict]:
    """Every (precision, compile, channels_last) asked for, named as in the table."""
    if args.precision:
        precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
        bad = [p for p in precisions if p not in PRECISIONS]
        if bad or not precisions:
            sys.exit(f"--precision takes a comma list of {', '.join(PRECISIONS)}, got {args.precision!r}")
    else:  # the older --bf16 false | true | both
        precisions = ["bf16" if b else "fp32" for b in bs.precisions(args.bf16)]
    out = []
    for precision in precisions:
        for compiled in both(args.compile):
            for cl in both(args.channels_last):
                v = {"precision": precision, "bf16": precision == "bf16", "compile": compiled, "channels_last": cl,
                     "device": args.device}
                out.append({**v, "name": variant_name(v)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bs.add_common_args(p)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where both sides run (default: cpu)")
    p.add_argument("--precision", help="comma list of fp32, bf16, fp16 (default: from --bf16)")
    p.add_argument("--compile", default="false", choices=("false", "true", "both"),
                   help="torch.compile the network on both sides (default: false)")
    p.add_argument("--channels-last", default="false", choices=("false", "true", "both"),
                   help="channels_last memory format on both sides (default: false)")
    p.add_argument("--json", help="also write every result here")
    args = p.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(WORKERS[(spec["impl"], spec["mode"])](spec)))
        return
    bs.check_args(args)
    if args.sampler != "dpm++2m":
        sys.exit("bench_train.py compares dpm++2m only (diffusers' DPMSolverMultistepScheduler); "
                 "use bench_speed.py for other samplers")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA GPU is available")
    try:
        import diffusers
    except ImportError:
        sys.exit(DIFFUSERS_HINT)
    variants = variants_of(args)
    gpu = ""
    if args.device == "cuda":
        import torch

        gpu = f"; GPU {torch.cuda.get_device_name()}"
    print(bs.header(args, f"; diffusers {diffusers.__version__}{gpu}"), flush=True)
    started = time.perf_counter()
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
        for k, v in enumerate(variants):
            for impl in ("ddpmkit", "diffusers"):
                workdir = Path(tmp) / f"{impl}_{k}"
                workdir.mkdir()
                spec = {**common, **v, "workdir": str(workdir), "impl": impl, "diffusers_channels": list(channels)}
                for mode in ("train", "sample"):
                    if mode == "sample" and "error" in results[(impl, "train", v["name"])]:
                        results[(impl, mode, v["name"])] = results[(impl, "train", v["name"])]
                        continue
                    extra = {"ckpt": results[(impl, "train", v["name"])].get("ckpt")} if mode == "sample" else {}
                    r = bs.run_worker(Path(__file__), {**spec, **extra, "mode": mode})
                    results[(impl, mode, v["name"])] = r
                    what = "failed: " + r["error"] if "error" in r else f"{r['per_s']:.2f} img/s"
                    print(f"  {mode:6s} {impl:9s} {v['name']} {what}", file=sys.stderr, flush=True)
    table(results, variants, args.sampler)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps([{"impl": i, "mode": m, **r} for (i, m, _), r in results.items()],
                                              indent=1, default=str))


if __name__ == "__main__":
    main()
