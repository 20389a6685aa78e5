"""The measuring half of gpu_check.sh: training speed, memory and MFU per precision, eager and
compiled; sampling speed; a two-process DDP step.

    python benchmarks/gpu_check.py                  # on a CUDA GPU: the cifar preset at batch 128
    GPU_CHECK_CPU=1 python benchmarks/gpu_check.py  # a tiny setting on the CPU (checks this script)

Training goes through ddpmkit's own trainer (`ddpmkit.train.train`, the code `ddpm train` runs:
data batches, loss draws, autocast and loss scaling, backward, clipping, AdamW, EMA, logging)
once per configuration: --precision fp32, bf16 and fp16, each eager and with --compile, on
random 32x32 RGB images stored as an .npy file of exactly one epoch, so no checkpoint falls
inside the timed steps. fp32 is what `ddpm train` does in fp32 on a GPU: TF32 convolutions
(PyTorch's default cudnn.allow_tf32=True), fp32 matrix products. img/s is the median of the
trainer's own logged img/s (every 10 steps), leaving out the first two windows (compilation,
cuDNN autotuning, allocator warm-up); the compiled rows also report their wall time, which
includes compiling.

MFU (model FLOP utilisation, Chowdhery et al. 2022, App. B) = model FLOPs per image (forward +
backward of the network, counted by torch.utils.flop_counter.FlopCounterMode) x img/s / the
GPU's dense peak for that precision. Peaks (NVIDIA data sheets, dense, no sparsity): the bf16 /
fp16 tensor-core peak for bf16 and fp16 runs, the TF32 tensor-core peak for fp32 runs. Sampling:
1000 images with DPM-Solver++(2M) at 20 network evaluations per precision, and bf16 compiled.
DDP: `torchrun --nproc_per_node 2 -m ddpmkit.cli train` for a few fp16 steps, on two GPUs with
NCCL when the machine has them, else on the CPU with gloo.

With GPU_CHECK_CPU=1 everything runs on the CPU at a tiny size (fp32 / bf16 / fp16 eager, one
compiled row, sampling, DDP) in a couple of minutes: it checks the script, it measures nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

# Dense peak TFLOP/s (bf16 = fp16 tensor, TF32 tensor) by a substring of torch.cuda.get_device_name().
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
        return dict(device="cpu", preset="tiny", size=8, batch=8, steps=12, log_every=4, samples=8, nfe=3,
                    precisions=("fp32", "bf16", "fp16"), compiled=("fp32",), sample_compiled=(),
                    ddp=dict(device="cpu", preset="tiny", size=8, batch=4, steps=3))
    two_gpus = torch.cuda.device_count() >= 2
    return dict(device="cuda", preset="cifar", size=32, batch=128, steps=200, log_every=10, samples=1000, nfe=20,
                precisions=("fp32", "bf16", "fp16"), compiled=("bf16", "fp16", "fp32"), sample_compiled=("bf16",),
                ddp=dict(device="cuda" if two_gpus else "cpu", preset="cifar" if two_gpus else "tiny",
                         size=32 if two_gpus else 8, batch=64 if two_gpus else 4, steps=20 if two_gpus else 3))


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


def train_overrides(s: dict, workdir: Path, data: Path, name: str, **train) -> dict:
    return {"data": {"path": str(data), "image_size": s["size"], "channels": 3, "hflip": False},
            "model": {"size": s["preset"]},
            "train": {"workdir": str(workdir), "run_name": name, "epochs": 1, "batch_size": s["batch"],
                      "device": s["device"], "sample_every_epochs": 0, "log_every": s["log_every"],
                      "eval_every_steps": 0, "ckpt_every_minutes": 0.0, "logger": "none", **train}}


def train_run(s: dict, workdir: Path, data: Path, precision: str, compiled: bool) -> dict:
    """Train one epoch of s['steps'] steps with ddpmkit's trainer; img/s and peak memory."""
    from ddpmkit import checkpoint
    from ddpmkit.train import prepare, train

    name = precision + (" + compile" if compiled else "")
    overrides = train_overrides(s, workdir, data, name.replace(" + ", "_"), precision=precision, compile=compiled)
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
    return {"run": f"train, {name}", "precision": precision, "compiled": compiled,
            "img_s": statistics.median(speeds), "peak_gib": peak, "steps": summary["step"], "wall_s": wall,
            "fp16_overflow_skipped": summary.get("fp16_overflow_skipped", 0), "ckpt": str(summary["ckpt"])}


def sync(s: dict) -> None:
    if s["device"] == "cuda":
        torch.cuda.synchronize()


def sampling_run(s: dict, ckpt: str, precision: str, compiled: bool = False) -> dict:
    from ddpmkit import load_model
    from ddpmkit.precision import compile_network

    model, diffusion, _ = load_model(ckpt, s["device"])
    net = compile_network(model, diffusion.device) if compiled else model
    kwargs = dict(sampler="dpm++2m", steps=s["nfe"], bf16=precision, progress=False, batch_size=500)
    t0 = time.perf_counter()
    diffusion.generate(net, min(8, s["samples"]), seed=1, **kwargs)  # warm-up (and compilation)
    sync(s)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    images = diffusion.generate(net, s["samples"], seed=0, **kwargs)
    sync(s)
    dt = time.perf_counter() - t0
    assert torch.isfinite(images).all()
    name = precision + (" + compile" if compiled else "")
    return {"run": f"sampling {s['samples']} images, dpm++2m {s['nfe']} NFE, {name}", "precision": precision,
            "compiled": compiled, "img_s": s["samples"] / dt, "wall_s": dt, "warmup_s": warm}


def ddp_run(s: dict, workdir: Path) -> dict:
    """A few fp16 optimizer steps of `ddpm train` in two processes (torchrun)."""
    d = s["ddp"]
    data = workdir / "ddp.npy"
    rng = np.random.default_rng(1)
    np.save(data, rng.integers(0, 256, (2 * d["batch"] * d["steps"], d["size"], d["size"], 3), dtype=np.uint8))
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "ddpmkit.cli", "train", "--data", str(data), "--workdir", str(workdir), "--run-name", "ddp",
            "--model-size", d["preset"], "--image-size", str(d["size"]), "--batch-size", str(d["batch"]),
            "--epochs", "1", "--device", d["device"], "--precision", "fp16", "--sample-every", "0",
            "--logger", "none", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDPMKIT_DDP_TIMEOUT": "120"}
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    backend = "NCCL, 2 GPUs" if d["device"] == "cuda" else "gloo, CPU"
    row = {"run": f"DDP, 2 processes ({backend}), {d['preset']} fp16", "wall_s": wall, "rc": proc.returncode}
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        return row
    from ddpmkit import checkpoint

    ckpt = checkpoint.load_checkpoint(workdir / "models" / "ddp" / "ckpt.pt")
    row.update(steps=ckpt["global_step"], world_size=ckpt["world_size"],
               scale=((ckpt.get("precision_state") or {}).get("scaler") or {}).get("scale"))
    if (row["steps"], row["world_size"]) != (d["steps"], 2):
        row["error"] = f"expected {d['steps']} steps in 2 processes, the checkpoint says {row['steps']} in " \
                       f"{row['world_size']}"
    return row


def report(rows: list[dict], flops: float, s: dict, device_name: str) -> str:
    peaks = peak_tflops(device_name) if s["device"] == "cuda" else None
    lines = [f"device: {device_name}; preset {s['preset']} at {s['size']}x{s['size']}, batch {s['batch']}; "
             f"model FLOPs per image (fwd+bwd): {flops / 1e9:.3f} GFLOP",
             "peak used for MFU: " + (f"bf16/fp16 {peaks[0]} / TF32 {peaks[1]} TFLOP/s (dense)" if peaks
                                     else "unknown for this device, MFU not computed"),
             "", "| run | img/s | peak memory (GiB) | MFU | wall s |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        if "img_s" not in r:
            state = f"FAILED: {r['error']}" if "error" in r else f"ok, {r.get('steps')} steps"
            lines.append(f"| {r['run']} | {state} | | | {r.get('wall_s', float('nan')):.0f} |")
            continue
        mfu = "n/a"
        if peaks and r["run"].startswith("train"):
            peak = peaks[1] if r["precision"] == "fp32" else peaks[0]
            mfu = f"{100 * flops * r['img_s'] / (peak * 1e12):.1f}%"
        mem = "" if r.get("peak_gib") is None or r["peak_gib"] != r["peak_gib"] else f"{r['peak_gib']:.2f}"
        lines.append(f"| {r['run']} | {r['img_s']:.0f} | {mem} | {mfu} | {r.get('wall_s', float('nan')):.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, help="training steps per run (default 200 on GPU)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    p.add_argument("--no-ddp", action="store_true", help="skip the two-process DDP step")
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
    rows: list[dict] = []

    def add(row: dict) -> None:  # publish after each row, so a run cut short by the time limit still reports
        row.pop("ckpt", None)
        rows.append(row)
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"device": device_name, "settings": s, "flops_per_image": flops,
                                                   "rows": rows}, indent=1))

    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "random.npy"  # exactly one epoch of s['steps'] batches
        rng = np.random.default_rng(0)
        np.save(data, rng.integers(0, 256, (s["steps"] * s["batch"], s["size"], s["size"], 3), dtype=np.uint8))
        ckpts = {}
        for precision in s["precisions"]:
            row = train_run(s, Path(tmp), data, precision, False)
            ckpts[precision] = row["ckpt"]
            add(row)
        for precision in s["precisions"]:
            add(sampling_run(s, ckpts[precision], precision))
        if not args.no_ddp:
            row = ddp_run(s, Path(tmp))
            failed |= "error" in row
            add(row)
        if not args.no_compile:
            for precision in s["compiled"]:
                add(train_run(s, Path(tmp), data, precision, True))
            for precision in s["sample_compiled"]:
                add(sampling_run(s, ckpts[precision], precision, compiled=True))
    print(report(rows, flops, s, device_name), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
