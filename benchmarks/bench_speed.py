"""Training and sampling throughput of ddpmkit's own code paths: what `ddpm train` and `ddpm sample` run.

    python benchmarks/bench_speed.py --model-size tiny --image-size 16 --channels 1 --data digits \\
        --batch-size 64 --steps 20 --bf16 both --threads 2

Training: `ddpmkit.train.prepare` + `ddpmkit.train.train` (the functions `ddpm train` calls) on a
temporary .npy uint8 array of (warm-up + steps) x batch images, one epoch, so the run is exactly
warm-up + steps optimizer steps (data batching, forward, loss, backward, gradient clipping,
AdamW, LR schedule and EMA: the trainer's whole step). The trainer logs every step
(log_every=1) and its own img/s enters the checkpoint's history ("img_per_sec", (step, value));
the figure reported is the MEDIAN of those logged values over the timed steps, the first
--warmup steps left out. No sample grids (sample_every_epochs=0); the end-of-epoch checkpoint is
written after the last logged step, so it is not in any figure. The wall time of the whole
train() call (start-up, warm-up, checkpoint included) is printed too, for reference.

Sampling: `ddpmkit.loading.load_model` on that run's checkpoint (EMA weights, as `ddpm sample`)
and `Diffusion.generate` with a real sampler (default dpm++2m, 20 steps) on --sample-n images
(default: the batch size) in one batch, bf16 as `ddpm sample --bf16`. One untimed 2-step call
first; then the median wall time of --sample-reps timed calls gives images/s, and images x NFE/s
where NFE is the number of network calls a forward hook counted.

Every configuration runs in a fresh subprocess with --threads torch threads (default: torch's
default, which is what the CLI uses), so its peak memory (VmHWM from /proc/self/status, reset
via /proc/self/clear_refs just before train() or generate(); the bracket is the increase over
the RSS at that moment) is its own. Run it alone: another process on the same cores distorts
every number. bench_train.py uses the workers here for its ddpmkit side.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _quiet(*args, **kwargs) -> None:
    pass


# --------------------------------------------------------------------------- process-level helpers


def memory_kib() -> dict[str, int]:
    status = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", status).group(1)) for k in ("VmHWM", "VmRSS")}


def reset_peak() -> int | None:
    """Reset VmHWM to the current RSS (Linux >= 4.0); returns that RSS in KiB, None where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return memory_kib()["VmRSS"]


def peak(base: int | None) -> dict:
    mem = memory_kib()
    return {"peak_mib": mem["VmHWM"] / 1024, "delta_mib": None if base is None else (mem["VmHWM"] - base) / 1024}


def set_threads(n: int) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = re.search(r"Model name:\s*(.+)", out).group(1).strip()
    except (OSError, AttributeError):
        pass
    return f"{name}, {os.cpu_count()} logical CPUs"


def run_worker(script: Path, spec: dict) -> dict:
    """Run `script --worker SPEC` in a fresh interpreter; its last stdout line is the JSON result."""
    env = dict(os.environ)
    if spec.get("threads"):
        env.update(OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.run([sys.executable, str(script), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = " ".join(proc.stderr.strip().splitlines()[-1:])[:300]
        return {**spec, "error": tail or f"exit {proc.returncode}"}
    return json.loads(lines[-1])


def write_data(kind: str, n: int, size: int, channels: int, path: Path) -> Path:
    """n uint8 images, (N, H, W) for one channel or (N, H, W, 3), as `ddpm train --data` takes them.

    digits: scikit-learn's digits at `size` px (ddpmkit.data.builtin_digits), repeated to n;
    random: uniform noise (the cost of a step does not depend on the pixels).
    """
    if kind == "digits":
        from ddpmkit.data import builtin_digits

        base = builtin_digits(size)[..., 0]
        images = np.resize(base, (n, size, size))  # repeats the set in order
        if channels == 3:
            images = np.repeat(images[..., None], 3, axis=-1)
    else:
        shape = (n, size, size) if channels == 1 else (n, size, size, channels)
        images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    np.save(path, np.ascontiguousarray(images))
    return path


# --------------------------------------------------------------------------- ddpmkit workers


def ddpmkit_train(spec: dict) -> dict:
    """Train through ddpmkit.train (what `ddpm train` runs) and read its logged img/s."""
    set_threads(spec["threads"])
    from ddpmkit.checkpoint import load_checkpoint
    from ddpmkit.train import prepare, train

    total = spec["warmup"] + spec["steps"]
    overrides = {
        "model": {"size": spec["model_size"]},
        "data": {"path": spec["data"], "image_size": spec["image_size"], "channels": spec["channels"]},
        "train": {"workdir": spec["workdir"], "run_name": "bench", "epochs": 1, "device": "cpu",
                  "batch_size": spec["batch"], "bf16": spec["bf16"], "log_every": 1,
                  "sample_every_epochs": 0, "sample_every_steps": 0},
    }
    cfg, _ = prepare(overrides, fresh=True, log=_quiet)
    base = reset_peak()
    start = time.perf_counter()
    summary = train(cfg, None, log=_quiet, progress=False)
    wall = time.perf_counter() - start
    mem = peak(base)
    ckpt = load_checkpoint(summary["ckpt"])
    logged = ckpt["history"]["img_per_sec"]
    if summary["step"] != total or len(logged) != total:
        raise SystemExit(f"expected {total} logged steps, got {summary['step']} steps and {len(logged)} log points")
    timed = [v for step, v in logged if step > spec["warmup"]]
    import torch

    from ddpmkit.models import build_model

    with torch.device("meta"):
        params = sum(p.numel() for p in build_model(cfg.model, spec["channels"]).parameters())
    return {**spec, "params": params, "per_s": statistics.median(timed), "min_per_s": min(timed),
            "max_per_s": max(timed), "timed_steps": len(timed), "train_wall_s": wall, "ckpt": str(summary["ckpt"]),
            "torch": torch.__version__, "threads_used": torch.get_num_threads(), **mem}


class CallCounter:
    """Counts a module's forward calls (the sampler's NFE)."""

    def __init__(self, module):
        self.n = 0
        module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.n += 1


def timed_calls(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def ddpmkit_sample(spec: dict) -> dict:
    """Sample through load_model + Diffusion.generate (what `ddpm sample` runs)."""
    set_threads(spec["threads"])
    from ddpmkit.loading import load_model

    model, diffusion, _ = load_model(spec["ckpt"], "cpu")
    counter = CallCounter(model)

    def gen(steps: int):
        return diffusion.generate(model, spec["sample_n"], sampler=spec["sampler"], steps=steps, seed=0,
                                  bf16=spec["bf16"], progress=False)

    gen(2)  # warm-up: first calls allocate and pick kernels
    base = reset_peak()
    counter.n = 0
    times = timed_calls(lambda: gen(spec["sample_steps"]), spec["sample_reps"])
    nfe = counter.n / spec["sample_reps"]
    return sample_result(spec, times, nfe, base, sum(p.numel() for p in model.parameters()))


def sample_result(spec: dict, times: list[float], nfe: float, base: int | None, params: int) -> dict:
    import torch

    t = statistics.median(times)
    return {**spec, "params": params, "nfe": nfe, "per_s": spec["sample_n"] / t,
            "nfe_per_s": spec["sample_n"] * nfe / t, "call_s": t, "torch": torch.__version__,
            "threads_used": torch.get_num_threads(), **peak(base)}


# --------------------------------------------------------------------------- the command line


def add_common_args(p: argparse.ArgumentParser, model_size: str = "tiny") -> None:
    p.add_argument("--model-size", default=model_size, help=f"ddpmkit preset (default: {model_size})")
    p.add_argument("--image-size", type=int, default=16, help="image side in px (default: 16)")
    p.add_argument("--channels", type=int, default=1, choices=(1, 3), help="1 or 3 (default: 1)")
    p.add_argument("--data", default="digits", choices=("digits", "random"),
                   help="digits: scikit-learn's digits repeated; random: noise images (default: digits)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch (default: 64)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default: 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first (default: 3)")
    p.add_argument("--bf16", default="false", choices=("false", "true", "both"),
                   help="bf16 autocast as `ddpm train --bf16 true` / `ddpm sample --bf16` (default: false)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (default: torch's default)")
    p.add_argument("--sampler", default="dpm++2m", help="sampler for the sampling figures (default: dpm++2m)")
    p.add_argument("--sample-steps", type=int, default=20, help="its steps (default: 20)")
    p.add_argument("--sample-n", type=int, default=0, help="images per sampling call (default: the batch size)")
    p.add_argument("--sample-reps", type=int, default=3, help="timed sampling calls; the median counts (default: 3)")
    p.add_argument("--worker", help=argparse.SUPPRESS)


def base_spec(args, workdir: Path, data: Path) -> dict:
    return {"model_size": args.model_size, "image_size": args.image_size, "channels": args.channels,
            "batch": args.batch_size, "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
            "sampler": args.sampler, "sample_steps": args.sample_steps, "sample_n": args.sample_n or args.batch_size,
            "sample_reps": args.sample_reps, "workdir": str(workdir), "data": str(data)}


def precisions(flag: str) -> list[bool]:
    return {"false": [False], "true": [True], "both": [False, True]}[flag]


def check_args(args) -> None:
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.sample_reps < 1:
        sys.exit("--steps, --batch-size and --sample-reps must be >= 1 and --warmup >= 0")


def header(args, extra: str = "") -> str:
    import torch

    return (f"machine: {machine()}; torch {torch.__version__}; threads {args.threads or torch.get_num_threads()}"
            f"{extra}; load average before: {os.getloadavg()[0]:.2f}\n"
            f"{args.model_size} preset, {args.image_size}x{args.image_size}x{args.channels} {args.data} data, "
            f"batch {args.batch_size}: {args.steps} timed optimizer steps after {args.warmup} warm-up steps; "
            f"sampling {args.sampler} {args.sample_steps} steps on {args.sample_n or args.batch_size} images, "
            f"median of {args.sample_reps} calls")


def fmt(r: dict, key: str, spec: str) -> str:
    if "error" in r:
        return "failed"
    return "n/a" if r.get(key) is None else format(r[key], spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    args = p.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(ddpmkit_train(spec) if spec["mode"] == "train" else ddpmkit_sample(spec)))
        return
    check_args(args)
    print(header(args), flush=True)
    started = time.perf_counter()
    print("\n| precision | params | train img/s (median; min-max) | train() wall s | train peak MiB (+increase) "
          f"| sample img/s | sample img x NFE/s (NFE) | sample peak MiB (+increase) |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench_speed_") as tmp:
        data = write_data(args.data, (args.warmup + args.steps) * args.batch_size, args.image_size, args.channels,
                          Path(tmp) / "data.npy")
        for bf16 in precisions(args.bf16):
            spec = {**base_spec(args, Path(tmp) / f"run_{int(bf16)}", data), "bf16": bf16}
            tr = run_worker(Path(__file__), {**spec, "mode": "train"})
            sa = run_worker(Path(__file__), {**spec, "mode": "sample", "ckpt": tr["ckpt"]}) if "ckpt" in tr else tr
            for r in (tr, sa):
                if "error" in r:
                    print(f"{r.get('mode', 'sample')} failed: {r['error']}", file=sys.stderr)
            params = f"{tr['params'] / 1e6:.2f}M" if tr.get("params") else "n/a"
            print(f"| {'bf16' if bf16 else 'fp32'} | {params} | {fmt(tr, 'per_s', '.1f')} "
                  f"({fmt(tr, 'min_per_s', '.1f')}-{fmt(tr, 'max_per_s', '.1f')}) | {fmt(tr, 'train_wall_s', '.1f')} "
                  f"| {fmt(tr, 'peak_mib', '.0f')} (+{fmt(tr, 'delta_mib', '.0f')}) | {fmt(sa, 'per_s', '.2f')} "
                  f"| {fmt(sa, 'nfe_per_s', '.1f')} ({fmt(sa, 'nfe', '.0f')}) "
                  f"| {fmt(sa, 'peak_mib', '.0f')} (+{fmt(sa, 'delta_mib', '.0f')}) |", flush=True)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
