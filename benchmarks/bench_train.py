"""ddpmkit's `cifar` UNet against diffusers' UNet2DModel: training img/s, peak memory, sampling speed.

    python -m venv /tmp/benchenv --system-site-packages      # keeps the installed torch
    /tmp/benchenv/bin/pip install diffusers                   # check first: pip install --dry-run diffusers
    /tmp/benchenv/bin/python benchmarks/bench_train.py        # the table in benchmarks/README.md

Both networks run in the same harness, so only the network differs: a DDPM training step (x_t
from random 32x32 RGB data, eps-prediction MSE of Ho et al. 2020 Eq. 14, backward, gradient
clipping, AdamW, the weights' EMA) at the same batch size and precision; and for sampling, one
network evaluation of a batch in inference mode (what every sampler step costs), reported as
images x steps per second. diffusers' model is a DDPM-CIFAR-10 layout (the google/ddpm-cifar10-32
blocks, attention at 16x16) narrowed to (128, 256, 224, 224) channels so that its parameter count
is within 5% of ours (checked below).

Each configuration runs in a fresh subprocess, so peak memory (VmHWM from /proc, reset after the
model is built via /proc/self/clear_refs) is that configuration's own. "default" is fp32 in
contiguous layout; the other rows add bf16 autocast and channels_last, and "best" is each
network's fastest row. torch.compile is left out by default: on the 2-core CPU of the README it
took 139 s to compile the forward pass alone and then ran slower than eager (--compile adds it).
Run it on a quiet machine; another process on the same cores distorts every number.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

DIFFUSERS_HINT = ("diffusers is not installed in this interpreter; install it in a separate venv that keeps the "
                  "system torch:\n  python -m venv /tmp/benchenv --system-site-packages\n"
                  "  /tmp/benchenv/bin/pip install --dry-run diffusers   # must not list torch\n"
                  "  /tmp/benchenv/bin/pip install diffusers\n"
                  "  /tmp/benchenv/bin/python benchmarks/bench_train.py")
IMAGE = 32
FLAG_SETS = {  # name -> (bf16 autocast, channels_last, torch.compile)
    "fp32 (default)": (False, False, False),
    "bf16": (True, False, False),
    "bf16 + channels_last": (True, True, False),
    "bf16 + channels_last + compile": (True, True, True),
}


def build(impl: str):
    """(model, forward(model, x, t) -> eps) for "ddpmkit" or "diffusers"."""
    import torch

    torch.manual_seed(0)
    if impl == "ddpmkit":
        from ddpmkit.models import PRESETS, build_model

        return build_model(PRESETS["cifar"], 3), lambda m, x, t: m(x, t)
    from diffusers import UNet2DModel

    model = UNet2DModel(
        sample_size=IMAGE, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(128, 256, 224, 224),  # DDPM's (128, 256, 256, 256), narrowed to match 31M parameters
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        dropout=0.1, attention_head_dim=64)  # 4 heads of 64 at 256 channels, as ddpmkit's 16x16 attention
    return model, lambda m, x, t: m(x, t, return_dict=False)[0]


def memory_kib() -> dict[str, int]:
    status = open("/proc/self/status").read()
    return {k: int(re.search(rf"{k}:\s+(\d+)", status).group(1)) for k in ("VmHWM", "VmRSS")}


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def worker(impl: str, mode: str, flags: str, batch: int, steps: int, warmup: int, profile: int = 0) -> dict:
    """Time one configuration in this process; returns a JSON-able dict. With `profile` > 0, print
    torch.profiler's top `profile` operators (self CPU time) of the timed steps instead."""
    import torch
    import torch.nn.functional as F

    from ddpmkit.schedules import alpha_bar_schedule
    from ddpmkit.train import EMA

    bf16, channels_last, compiled = FLAG_SETS[flags]
    model, forward = build(impl)
    params = sum(p.numel() for p in model.parameters())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    net = torch.compile(model) if compiled else model
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    g = torch.Generator().manual_seed(1)
    x0 = (torch.rand(batch, 3, IMAGE, IMAGE, generator=g) * 2 - 1).contiguous(memory_format=fmt)
    ab = alpha_bar_schedule("linear", 1000, 1e-4, 0.02).float()

    if mode == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
        ema = EMA(model, 0.9999)

        def one(i: int) -> None:
            t = torch.randint(0, 1000, (batch,))
            eps = torch.randn_like(x0)
            a = ab[t].view(-1, 1, 1, 1)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
            with autocast:
                out = forward(net, x_t, t)
            loss = F.mse_loss(out.float(), eps)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(model, i)
    else:
        model.eval()
        t_fixed = torch.full((batch,), 500)

        def one(i: int) -> None:
            with torch.inference_mode(), autocast:
                forward(net, x0, t_fixed).float()

    base = memory_kib()["VmRSS"]
    reset_ok = reset_peak()
    t0 = time.perf_counter()
    for i in range(warmup):  # includes compilation and the optimizer's lazily built state
        one(i)
    t_warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    if profile:
        from torch.profiler import ProfilerActivity, profile as profiler

        with profiler(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(steps):
                one(warmup + i)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=profile), file=sys.stderr)
    else:
        for i in range(steps):
            one(warmup + i)
    dt = time.perf_counter() - t0
    mem = memory_kib()
    return {"impl": impl, "mode": mode, "flags": flags, "params": params, "batch": batch, "steps": steps,
            "per_s": batch * steps / dt, "step_s": dt / steps, "warmup_s": t_warm,
            "peak_mib": mem["VmHWM"] / 1024, "delta_mib": (mem["VmHWM"] - base) / 1024 if reset_ok else None}


def run_config(impl, mode, flags, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps([impl, mode, flags]),
           "--batch", str(args.batch), "--train-steps", str(args.train_steps), "--sample-steps", str(args.sample_steps),
           "--warmup", str(args.warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " ".join(proc.stderr.strip().splitlines()[-1:])[:300]
        return {"impl": impl, "mode": mode, "flags": flags, "error": tail or f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = re.search(r"Model name:\s*(.+)", out).group(1).strip()
    except (OSError, AttributeError):
        pass
    return f"{name}, {os.cpu_count()} logical CPUs"


def has_diffusers() -> str | None:
    try:
        import diffusers
    except ImportError:
        return None
    return diffusers.__version__


def cell(r: dict | None, key: str, fmt: str) -> str:
    if r is None:
        return "n/a"
    if "error" in r:
        return "failed"
    return "n/a" if r.get(key) is None else format(r[key], fmt)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="training and sampling batch (default: 8)")
    p.add_argument("--train-steps", type=int, default=2, help="timed training steps per configuration (default: 2)")
    p.add_argument("--sample-steps", type=int, default=3,
                   help="timed network evaluations per configuration (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: 1)")
    p.add_argument("--compile", action="store_true", help="also try torch.compile (minutes of compilation on a CPU)")
    p.add_argument("--profile", nargs=3, metavar=("IMPL", "MODE", "FLAGS"),
                   help="profile one configuration, e.g. ddpmkit train bf16 (prints the top operators)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker or args.profile:
        impl, mode, flags = json.loads(args.worker) if args.worker else args.profile
        steps = args.train_steps if mode == "train" else args.sample_steps
        print(json.dumps(worker(impl, mode, flags, args.batch, steps, args.warmup, 0 if args.worker else 15)))
        return

    import torch

    version = has_diffusers()
    impls = ["ddpmkit"] + (["diffusers"] if version else [])
    if not version:
        print(DIFFUSERS_HINT + "\n(benchmarking ddpmkit alone)\n", file=sys.stderr)
    flag_names = [f for f in FLAG_SETS if args.compile or not FLAG_SETS[f][2]]
    print(f"machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"diffusers {version or 'missing'}; load average before: {os.getloadavg()[0]:.2f}")
    print(f"batch {args.batch}, 32x32 RGB; {args.train_steps} timed training steps and {args.sample_steps} timed "
          f"network evaluations per configuration after {args.warmup} warm-up step(s)\n", flush=True)
    results: dict[tuple, dict] = {}
    started = time.perf_counter()
    for mode in ("train", "sample"):
        for flags in flag_names:
            for impl in impls:
                r = run_config(impl, mode, flags, args)
                results[(impl, mode, flags)] = r
                what = "failed: " + r["error"] if "error" in r else f"{r['per_s']:.2f}/s, peak {r['peak_mib']:.0f} MiB"
                print(f"  {mode:6s} {impl:9s} {flags:32s} {what}", file=sys.stderr, flush=True)
    params = {i: next((r["params"] for (j, _, _), r in results.items() if j == i and "params" in r), None)
              for i in impls}
    print(" ".join(f"{i}: {params[i] / 1e6:.2f}M parameters" for i in impls if params[i]) + (
        f" (diffusers/ddpmkit = {params['diffusers'] / params['ddpmkit']:.3f})" if len(impls) == 2 and all(
            params.values()) else ""))

    def best(impl, mode):
        ok = [r for (i, m, _), r in results.items() if i == impl and m == mode and "error" not in r]
        return max(ok, key=lambda r: r["per_s"]) if ok else None

    print("\n| measure | flags | ddpmkit | diffusers | ddpmkit / diffusers |")
    print("|---|---|---|---|---|")
    for mode, label in (("train", "training img/s"), ("sample", "sampling img x steps/s")):
        rows = [(f, {i: results.get((i, mode, f)) for i in impls}) for f in flag_names]
        rows.append(("best of each", {i: best(i, mode) for i in impls}))
        for flags, rs in rows:
            ours, theirs = rs.get("ddpmkit"), rs.get("diffusers")
            ratio = (f"{ours['per_s'] / theirs['per_s']:.2f}x" if ours and theirs and "error" not in ours
                     and "error" not in theirs else "n/a")
            if flags == "best of each":
                flags += " (" + ", ".join(f"{i}: {r['flags']}" for i, r in rs.items() if r) + ")"
            print(f"| {label} | {flags} | {cell(ours, 'per_s', '.2f')} | {cell(theirs, 'per_s', '.2f')} | {ratio} |")
    for mode, label in (("train", "training peak RSS, MiB (increase while training)"),
                        ("sample", "sampling peak RSS, MiB (increase while sampling)")):
        for flags in flag_names:
            rs = {i: results.get((i, mode, flags)) for i in impls}
            show = {i: (f"{cell(r, 'peak_mib', '.0f')} (+{cell(r, 'delta_mib', '.0f')})" if r else "n/a")
                    for i, r in rs.items()}
            print(f"| {label} | {flags} | {show.get('ddpmkit', 'n/a')} | {show.get('diffusers', 'n/a')} | |")
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
