"""The measuring half of gpu_check.sh: training speed, memory and MFU, and sampling speed.

    python benchmarks/gpu_check.py                  # on a CUDA GPU: the cifar preset at batch 128
    GPU_CHECK_CPU=1 python benchmarks/gpu_check.py  # a tiny setting on the CPU (checks this script)

Training goes through ddpmkit's own trainer (`ddpmkit.train.train`, the code `ddpm train` runs:
data batches, loss draws, autocast, backward, clipping, AdamW, EMA, logging), once in fp32 and
once with bf16 autocast, on random 32x32 RGB images stored as an .npy file of exactly one epoch,
so no checkpoint falls inside the timed steps. img/s is the median of the trainer's own logged
img/s (every 10 steps), leaving out the first two windows (cuDNN autotuning, allocator warm-up).
The trainer has no torch.compile switch, so the compile row times the same model and loss in a
small harness step (forward, backward, AdamW) next to an eager run of that harness: it says
whether compiling would pay off, not what `ddpm train` does today.

MFU (model FLOP utilisation, Chowdhery et al. 2022, App. B) = model FLOPs per image (forward +
backward of the network, counted by torch.utils.flop_counter.FlopCounterMode) x img/s / the
GPU's dense peak for that precision. Peaks (NVIDIA data sheets, dense, no sparsity): bf16 tensor
cores and TF32 tensor cores (fp32 runs use TF32 for convolutions, PyTorch's default
cudnn.allow_tf32=True). Sampling: 1000 images with DPM-Solver++(2M) at 20 network evaluations.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# Dense peak TFLOP/s (bf16 tensor, TF32 tensor) by a substring of torch.cuda.get_device_name().
PEAKS = (
    ("H200", (989.4, 494.7)),       # H200 SXM
    ("H100 PCIe", (756.0, 378.0)),
    ("H100", (989.4, 494.7)),       # H100 SXM / HBM3
    ("A100", (312.0, 156.0)),
    ("L40S", (362.1, 181.0)),
    ("RTX 4090", (165.2, 82.6)),
)


def peak_tflops(device_name: str) -> tuple[float, float] | None:
    for key, peaks in PEAKS:
        if key in device_name:
            return peaks
    return None


def settings(cpu: bool) -> dict:
    if cpu:  # seconds on a CPU: exercises every code path, measures nothing useful
        return dict(device="cpu", preset="tiny", size=16, batch=8, steps=24, samples=16, nfe=4, compile_steps=4)
    return dict(device="cuda", preset="cifar", size=32, batch=128, steps=200, samples=1000, nfe=20, compile_steps=60)


def count_flops(s: dict) -> float:
    """Forward + backward FLOPs of the network for one image (FlopCounterMode over one batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, diffusion = build(s)
    x = torch.randn(s["batch"], 3, s["size"], s["size"], device=s["device"])
    t = diffusion.sample_timesteps(s["batch"])
    with FlopCounterMode(display=False) as counter:
        model(x, t).square().mean().backward()
    return counter.get_total_flops() / s["batch"]


def build(s: dict):
    from ddpmkit.checkpoint import model_from_config
    from ddpmkit.config import Config, preset

    cfg = Config()
    cfg.model = preset(s["preset"])
    cfg.data.image_size, cfg.data.channels = s["size"], 3
    torch.manual_seed(0)
    return model_from_config(cfg, s["device"])


def train_run(s: dict, workdir: Path, data: Path, bf16: bool) -> dict:
    """Train one epoch of s['steps'] steps with ddpmkit's trainer; img/s and peak memory."""
    from ddpmkit import checkpoint
    from ddpmkit.train import prepare, train

    name = "bf16" if bf16 else "fp32"
    overrides = {"data": {"path": str(data), "image_size": s["size"], "channels": 3, "hflip": False},
                 "model": {"size": s["preset"]},
                 "train": {"workdir": str(workdir), "run_name": name, "epochs": 1, "batch_size": s["batch"],
                           "bf16": bf16, "device": s["device"], "sample_every_epochs": 0, "log_every": 4 if
                           s["device"] == "cpu" else 10, "eval_every_steps": 0}}
    cfg, ckpt = prepare(overrides, fresh=True, log=lambda *a: None)
    if s["device"] == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    summary = train(cfg, ckpt, log=lambda *a: None, progress=False)
    wall = time.perf_counter() - t0
    history = checkpoint.load_checkpoint(summary["ckpt"])["history"]["img_per_sec"]
    speeds = [v for _, v in history][2:] or [v for _, v in history]
    peak = torch.cuda.max_memory_allocated() / 2**30 if s["device"] == "cuda" else float("nan")
    return {"run": f"trainer, {name}", "img_s": statistics.median(speeds), "peak_gib": peak,
            "steps": summary["step"], "wall_s": wall, "ckpt": summary["ckpt"]}


def harness_run(s: dict, compiled: bool) -> dict:
    """Forward, backward and AdamW of the bare network under bf16 autocast, eager or compiled."""
    model, diffusion = build(s)
    step_model = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(s["batch"], 3, s["size"], s["size"], device=s["device"])
    t = diffusion.sample_timesteps(s["batch"])
    autocast = torch.autocast(s["device"], dtype=torch.bfloat16)

    def step():
        with autocast:
            loss = (step_model(x, t).float() - x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(3):  # warm-up (and compilation)
        step()
    sync(s)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(s["compile_steps"]):
        step()
    sync(s)
    dt = time.perf_counter() - t0
    return {"run": f"harness, bf16{' + compile' if compiled else ''}", "img_s": s["compile_steps"] * s["batch"] / dt,
            "peak_gib": float("nan"), "warmup_s": warm}


def sync(s: dict) -> None:
    if s["device"] == "cuda":
        torch.cuda.synchronize()


def sampling_run(s: dict, ckpt: str, bf16: bool) -> dict:
    from ddpmkit import load_model

    model, diffusion, _ = load_model(ckpt, s["device"])
    kwargs = dict(sampler="dpm++2m", steps=s["nfe"], bf16=bf16, progress=False, batch_size=500)
    diffusion.generate(model, 8, seed=1, **kwargs)  # warm-up
    sync(s)
    t0 = time.perf_counter()
    images = diffusion.generate(model, s["samples"], seed=0, **kwargs)
    sync(s)
    dt = time.perf_counter() - t0
    assert torch.isfinite(images).all()
    return {"run": f"sampling {s['samples']} images, dpm++2m {s['nfe']} NFE, {'bf16' if bf16 else 'fp32'}",
            "img_s": s["samples"] / dt, "wall_s": dt}


def report(rows: list[dict], flops: float, s: dict, device_name: str) -> str:
    peaks = peak_tflops(device_name) if s["device"] == "cuda" else None
    lines = [f"device: {device_name}; preset {s['preset']} at {s['size']}x{s['size']}, batch {s['batch']}; "
             f"model FLOPs per image (fwd+bwd): {flops / 1e9:.2f} GFLOP",
             "peak used for MFU: " + (f"bf16 {peaks[0]} / TF32 {peaks[1]} TFLOP/s (dense)" if peaks
                                     else "unknown for this device, MFU not computed"),
             "", "| run | img/s | peak memory (GiB) | MFU |", "|---|---:|---:|---:|"]
    for r in rows:
        mfu = "n/a"
        if peaks and "sampling" not in r["run"]:
            peak = peaks[0] if "bf16" in r["run"] else peaks[1]
            mfu = f"{100 * flops * r['img_s'] / (peak * 1e12):.1f}%"
        mem = "" if r.get("peak_gib") is None or r["peak_gib"] != r["peak_gib"] else f"{r['peak_gib']:.2f}"
        lines.append(f"| {r['run']} | {r['img_s']:.0f} | {mem} | {mfu} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, help="training steps per run (default 200 on GPU)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    cpu = bool(os.environ.get("GPU_CHECK_CPU"))
    if not cpu and not torch.cuda.is_available():
        print("no CUDA GPU found")
        return 0
    s = settings(cpu)
    s["steps"] = args.steps or s["steps"]
    device_name = torch.cuda.get_device_name() if s["device"] == "cuda" else "cpu"
    flops = count_flops(s)
    rows = []

    def publish():  # after each stage, so a run cut short by the time limit still reports
        print(report(rows, flops, s, device_name), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"device": device_name, "settings": s, "flops_per_image": flops,
                                                   "rows": rows}, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "random.npy"  # exactly one epoch of s['steps'] batches
        rng = np.random.default_rng(0)
        np.save(data, rng.integers(0, 256, (s["steps"] * s["batch"], s["size"], s["size"], 3), dtype=np.uint8))
        for bf16 in (False, True):
            rows.append(train_run(s, Path(tmp), data, bf16))
            print(rows[-1], flush=True)
        ckpt = str(rows[-1].pop("ckpt"))
        rows[0].pop("ckpt")
        for bf16 in (False, True):
            rows.append(sampling_run(s, ckpt, bf16))
            print(rows[-1], flush=True)
    publish()
    if not args.no_compile:
        # the compiled row needs a GPU's time budget: compiling on a small CPU takes minutes (bench_train.py)
        for compiled in (False,) if cpu else (False, True):
            rows.append(harness_run(s, compiled))
            print(rows[-1], flush=True)
        publish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
