"""One fast model against diffusers: wall time of 1,000 samples, and their digit-classifier FD.

    python benchmarks/bench_quality.py --systems ddpmkit --rows dpm20 --keep-ckpt teacher.pt
    ddpm prune --ckpt teacher.pt --ratio 0.5 --finetune-images 22500 --run-name p50
    ddpm distill --teacher models/p50/ckpt.pt --method sfd --steps 2 --run-name p50_sfd2
    python benchmarks/bench_combined.py --teacher teacher.pt --model models/p50_sfd2/ckpt.pt --int8

Rows, each timed on the same 1,000 samples (batch --batch-size, --threads torch and ONNX Runtime
threads, one untimed warm-up batch first; the wall time of `Diffusion.generate`, what `ddpm sample`
runs, excluding the scoring):
  * diffusers: the `UNet2DModel` bench_quality.py trains (its layout and a parameter count within 10%
    of the teacher's), sampled with `DPMSolverMultistepScheduler` (DPM-Solver++(2M), 20 steps), the
    reference time. With --diffusers-model (a model saved by `bench_quality.py --keep-diffusers`) its
    FD is scored too; without it the network has random weights: the time does not depend on them,
    and the row has no FD;
  * the teacher with DPM-Solver++(2M) at 20 steps (the FD every row is compared with);
  * each --model with its own sampler and steps (a distilled student's), or `PATH:SAMPLER:STEPS`;
  * with --int8, each --model also quantized to int8 with `ddpm quantize`'s code (ONNX Runtime);
  * with --bf16, each --model also in bf16 autocast (`ddpm sample --precision bf16`), eager and with
    torch.compile (`--compile`; its warm-up batch compiles), on CPUs with native bf16.
FD: bench_quality.py's digit-classifier Frechet distance against its held-out split B (so use
checkpoints trained on split A), the mean over --draws draws of n samples (seeds 0, 100003, ...;
only the first draw is timed). Run it alone on the machine: the times are wall times.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import machine  # noqa: E402
from bench_quality import (Scorer, diffusers_scheduler, digit_splits, diffusers_unet,  # noqa: E402
                           load_diffusers, match_channels)

from ddpmkit import load_model  # noqa: E402

DRAW_SEED = 100003  # draw d samples with seed d * DRAW_SEED (draw 0 = seed 0, as bench_quality.py)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()


def time_ddpmkit(path: str, sampler: str | None, steps: int | None, args, bf16: bool = False,
                 compiled: bool = False) -> tuple[list[np.ndarray], float, dict]:
    """The draws of one ddpmkit model (or int8 folder) and the wall time of the first draw's n samples;
    `bf16`: bf16 autocast (`ddpm sample --precision bf16`), `compiled`: torch.compile (`--compile`)."""
    model, diffusion, cfg = load_model(path, "cpu")
    params = sum(p.numel() for p in model.parameters())
    if compiled:
        from ddpmkit.precision import compile_network
        model = compile_network(model, torch.device("cpu"))
    sampler = sampler or cfg.distill.sampler or "dpm++2m"
    steps = steps or cfg.distill.steps or 20
    kw = dict(sampler=sampler, steps=steps, batch_size=args.batch_size, progress=False, bf16=bf16)
    diffusion.generate(model, args.batch_size, seed=12345, **kw)  # warm-up (ONNX Runtime sessions, allocators)
    draws, seconds = [], 0.0
    for d in range(args.draws):
        start = time.perf_counter()
        x = diffusion.generate(model, args.n, seed=d * DRAW_SEED, **kw)
        if d == 0:
            seconds = time.perf_counter() - start
        draws.append(to_uint8(x))
    return draws, seconds, {"sampler": sampler, "steps": steps, "params": params}


@torch.inference_mode()
def time_diffusers(run: dict, args) -> tuple[list[np.ndarray], float]:
    """DPM-Solver++(2M) 20 steps as bench_quality.py samples diffusers, batch --batch-size."""
    scheduler = diffusers_scheduler("dpm++2m", run["train_config"])

    def draw(n: int, seed: int) -> np.ndarray:
        gen = torch.Generator().manual_seed(seed)
        out = []
        for first in range(0, n, args.batch_size):
            scheduler.set_timesteps(20)
            x = torch.randn(min(args.batch_size, n - first), 1, 16, 16, generator=gen) * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                x = scheduler.step(run["model"](scheduler.scale_model_input(x, t), t).sample, t, x).prev_sample
            out.append(to_uint8(x.clamp(-1, 1)))
        return np.concatenate(out)

    draw(args.batch_size, 12345)  # warm-up
    start = time.perf_counter()
    first = draw(args.n, 0)
    seconds = time.perf_counter() - start
    draws = [first] + ([draw(args.n, d * DRAW_SEED) for d in range(1, args.draws)] if "trained" in run else [])
    return draws, seconds


def label(path: str) -> str:
    """A checkpoint's run name (models/RUN/ckpt.pt), else its file name."""
    p = Path(path)
    return p.parent.name if p.name == "ckpt.pt" else p.name


def fd_stats(draws: list[np.ndarray], score: Scorer) -> dict:
    rows = [score(d) for d in draws]
    fds = [r["fd"] for r in rows]
    return {"fd": float(np.mean(fds)), "fd_sd": float(np.std(fds, ddof=1)) if len(fds) > 1 else None,
            "recognized": float(np.mean([r["recognized"] for r in rows]))}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="the teacher checkpoint (sampled with dpm++2m, 20 steps)")
    p.add_argument("--model", action="append", default=[], metavar="PATH[:SAMPLER:STEPS]",
                   help="a fast model (repeatable); default sampler: its own (a student's), else dpm++2m 20")
    p.add_argument("--int8", action="store_true", help="also quantize each --model to int8 (ddpm quantize)")
    p.add_argument("--bf16", action="store_true", help="also run each --model in bf16, eager and compiled")
    p.add_argument("--diffusers-model", help="a diffusers model saved by bench_quality.py --keep-diffusers")
    p.add_argument("-n", type=int, default=1000, help="samples per draw (default: 1000)")
    p.add_argument("--draws", type=int, default=5, help="draws of n samples per FD (default: 5)")
    p.add_argument("--batch-size", type=int, default=250, help="sampling batch of every row (default: 250)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and ONNX Runtime threads")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    score = Scorer(digit_splits(0), seed=0)
    rows = []
    teacher_draws, t_s, info = time_ddpmkit(args.teacher, "dpm++2m", 20, args)
    rows.append({"row": "teacher", "path": args.teacher, **info, "seconds": t_s, **fd_stats(teacher_draws, score)})

    if args.diffusers_model:
        run = {**load_diffusers(args.diffusers_model), "trained": True}
    else:  # the same layout, untrained: only its time is reported
        from diffusers import DDPMScheduler
        channels, _ = match_channels(rows[0]["params"])
        run = {"model": diffusers_unet(channels).eval(), "channels": channels,
               "train_config": DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").config}
    d_draws, d_s = time_diffusers(run, args)
    d_params = sum(q.numel() for q in run["model"].parameters())
    rows.insert(0, {"row": "diffusers UNet2DModel", "sampler": "DPM-Solver++(2M)", "steps": 20, "params": d_params,
                    "seconds": d_s, **(fd_stats(d_draws, score) if "trained" in run else {"fd": None})})

    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(args.model):
            path, *rest = spec.split(":")
            sampler, steps = (rest[0], int(rest[1])) if rest else (None, None)
            draws, s, info = time_ddpmkit(path, sampler, steps, args)
            rows.append({"row": "model", "path": path, **info, "seconds": s, **fd_stats(draws, score)})
            if args.int8:
                from ddpmkit.compress.quantize import quantize
                out = quantize(path, Path(tmp) / f"int8_{i}")
                draws, s, info8 = time_ddpmkit(str(out), sampler, steps, args)
                rows.append({"row": "model, int8", "path": path, **info, "seconds": s, **fd_stats(draws, score)})
            if args.bf16:
                for compiled in (False, True):
                    draws, s, _ = time_ddpmkit(path, sampler, steps, args, bf16=True, compiled=compiled)
                    rows.append({"row": "model, bf16" + (" + compile" if compiled else ""), "path": path, **info,
                                 "seconds": s, **fd_stats(draws, score)})

    ref_s, ref_fd = rows[0]["seconds"], rows[1]["fd"]
    avx512 = "avx512_vnni" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
    print(f"machine: {machine()} ({'AVX-512 VNNI' if avx512 else 'no AVX-512 VNNI'}); torch {torch.__version__}; threads {args.threads}; "
          f"n {args.n} per draw, {args.draws} draws, batch {args.batch_size}")
    print("| row | model | sampler, steps | parameters | s / 1000 samples | x diffusers' time | digits FD | "
          "against the teacher's 20 NFE |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        fd = "-" if r["fd"] is None else f"{r['fd']:.2f}" + (f" ± {r['fd_sd']:.2f}" if r.get("fd_sd") else "")
        rel = "-" if r["fd"] is None or r["row"] == "teacher" else f"{100 * (r['fd'] / ref_fd - 1):+.1f}%"
        print(f"| {r['row']} | {label(r['path']) if 'path' in r else '-'} | {r['sampler']}, "
              f"{r['steps']} | {r['params'] / 1e6:.3f}M | {r['seconds'] * 1000 / args.n:.2f} | "
              f"{r['seconds'] / ref_s:.3f} | {fd} | {rel} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
