"""Pixel against latent diffusion at 64x64 on builtin:shapes, at equal training wall time.

    python benchmarks/bench_latent.py                 # the real run (defaults: 64 px, minutes per stage)
    python benchmarks/bench_latent.py --smoke         # under 2 minutes on a CPU: checks the script

Stages, all through ddpmkit's own trainer (`train.train`, what the CLI runs):
1. `ddpm train-ae` (latent.AutoencoderTask) for --ae-minutes; then the autoencoder's reconstruction
   PSNR on the whole data set (posterior mean, EMA weights) and the FID of the reconstructions
   against the real images.
2. `ddpm train` in pixels, and `ddpm train --autoencoder` (latent.LatentTask) on its latents, the
   same preset (--model-size), each for --minutes of training wall time. Each run is scored at a
   third of its budget and at the full budget (the run stops by time, then resumes), so the table
   answers "does latent diffusion reach pixel diffusion's FID in a third of the time?". The
   autoencoder's own training time and the one-off encoding of the data set are reported apart.
Training img/s is images seen / training wall time; sampling img/s is the time of drawing
--eval-n images (DPM-Solver++(2M), --steps steps, decoding included for the latent model).
FID uses `ddpmkit.scoring` with --extractor (auto: Inception when its weights are installed,
otherwise the random-conv extractor, comparable only between these runs); the table says which.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ddpmkit import latent, scoring
from ddpmkit.config import Config, apply_overrides, validate
from ddpmkit.data import load_data, to_model_range
from ddpmkit.extractors import compute_features
from ddpmkit.loading import load_model
from ddpmkit.train import prepare, train


def timed(task_cls):
    """`task_cls` that asks the trainer to stop (graceful, with a checkpoint) once `budget_s` has passed."""

    class Timed(task_cls):
        def __init__(self, budget_s: float):
            super().__init__()
            self.budget_s, self.t0 = budget_s, None

        def start(self, trainer):
            super().start(trainer)
            self.t0 = time.perf_counter()

        def after_step(self, trainer):
            super().after_step(trainer)
            if time.perf_counter() - self.t0 >= self.budget_s:
                trainer.stop.requested = True

    return Timed


def run_for(overrides: dict, task_cls, budget_s: float, fresh: bool = False) -> dict:
    """Train (or resume) the run for `budget_s` seconds of training; returns seconds and images seen."""
    cfg, ckpt = prepare(overrides, fresh=fresh)
    step0 = 0 if ckpt is None else ckpt["global_step"]
    task = timed(task_cls)(budget_s)
    t0 = time.perf_counter()
    summary = train(cfg, ckpt, progress=False, log=lambda *a: None, task=task)
    setup = task.t0 - t0  # data loading / encoding and model set-up, before the first step
    return {"train_s": time.perf_counter() - task.t0, "setup_s": setup,
            "images": (summary["step"] - step0) * cfg.train.batch_size * cfg.train.grad_accum}


def psnr_and_recon(ae, images_nhwc: np.ndarray, device, batch: int = 64):
    """Mean PSNR (dB, images in [0, 1]) of the reconstructions, and the reconstructions as uint8 NCHW."""
    out, psnrs = [], []
    with torch.inference_mode():
        for s in range(0, len(images_nhwc), batch):
            x = to_model_range(torch.from_numpy(np.ascontiguousarray(images_nhwc[s:s + batch]))).to(device)
            r = ae.decode(ae.encode(x)[0]).clamp(-1, 1)
            mse = ((r - x) / 2).pow(2).flatten(1).mean(1)
            psnrs += (10 * torch.log10(1.0 / mse.clamp_min(1e-12))).tolist()
            out.append(((r + 1) * 127.5).round().to(torch.uint8).cpu())
    return float(np.mean(psnrs)), torch.cat(out)


def score_run(ckpt: Path, extractor, real, args) -> dict:
    model, diffusion, _ = load_model(ckpt, args.device_t)
    t0 = time.perf_counter()
    feats = scoring.sample_features(model, diffusion, args.eval_n, extractor, "dpm++2m", args.steps, 0,
                                    args.sample_batch, progress=False)
    dt = time.perf_counter() - t0
    fid = scoring.score(real, feats, extractor)["fid"]
    return {"fid": fid, "sample_img_s": args.eval_n / dt}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="bench_latent", help="runs and results (default: bench_latent/)")
    p.add_argument("--data", default="builtin:shapes")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--model-size", default="tiny", help="diffusion preset for both runs (default: tiny)")
    p.add_argument("--downsample", type=int, default=4)
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--ae-minutes", type=float, default=10.0)
    p.add_argument("--minutes", type=float, default=30.0, help="training wall time of each diffusion run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-n", type=int, default=1000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sample-batch", type=int, default=250)
    p.add_argument("--extractor", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--smoke", action="store_true", help="tiny budgets at 32 px: checks the script in < 2 min")
    args = p.parse_args(argv)
    if args.smoke:
        args.image_size, args.ae_minutes, args.minutes, args.eval_n, args.steps = 32, 0.1, 0.2, 16, 4
        args.model_size, args.batch_size = "tiny", 16
    work = Path(args.workdir).resolve()
    from ddpmkit.train import resolve_device

    args.device_t = resolve_device(args.device)
    base = {"data": {"path": args.data, "image_size": args.image_size},
            "train": {"workdir": str(work), "epochs": 10**6, "batch_size": args.batch_size, "device": args.device,
                      "sample_every_epochs": 0, "log_every": 10, "precision": "fp32"}}
    results: dict = {"args": {k: v for k, v in vars(args).items() if k != "device_t"}}

    # 1. the autoencoder
    ae_ov = latent.autoencoder_overrides({**base, "train": {**base["train"], "run_name": "ae"}, "autoencoder": {
        "downsample": args.downsample, "latent_channels": args.latent_channels}})
    ae_run = run_for(ae_ov, latent.AutoencoderTask, args.ae_minutes * 60, fresh=True)
    ae_ckpt = work / "models/ae/ckpt.pt"
    ae, _ = latent.load_autoencoder(ae_ckpt, args.device_t)
    data = load_data(args.data, args.image_size)
    psnr, recon = psnr_and_recon(ae, data.images, args.device_t)
    extractor = scoring.make_extractor(args.extractor, device=args.device_t)
    real = scoring.reference_stats(args.data, args.image_size, data.channels, extractor, work / "ref_cache")
    recon_fid = scoring.score(real, compute_features(extractor, recon, 64), extractor)["fid"]
    results["autoencoder"] = {**ae_run, "train_img_s": ae_run["images"] / ae_run["train_s"], "psnr_db": psnr,
                              "recon_fid": recon_fid}

    # 2. pixel and latent diffusion, each scored at 1/3 and all of the budget
    diff = {**base, "model": {"size": args.model_size}}
    runs = {"pixel": ({**diff, "train": {**base["train"], "run_name": "pixel"}}, None),
            "latent": (latent.latent_overrides(str(ae_ckpt), {**diff, "train": {**base["train"], "run_name": "latent"}}),
                       latent.LatentTask)}
    from ddpmkit.tasks import Task

    for name, (ov, task_cls) in runs.items():
        validate(apply_overrides(Config(), ov))
        rows, spent, images, setup = [], 0.0, 0, 0.0
        for share in (1 / 3, 1.0):
            r = run_for(ov, task_cls or Task, args.minutes * 60 * share - spent, fresh=not rows)
            spent, images, setup = spent + r["train_s"], images + r["images"], setup + r["setup_s"]
            rows.append({"train_min": spent / 60, **score_run(work / f"models/{name}/ckpt.pt", extractor, real, args)})
        results[name] = {"train_img_s": images / spent, "first_setup_s": setup, "scores": rows}

    table = render(results, extractor)
    print(table)
    (work / "results.md").write_text(table + "\n")
    (work / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    model, diffusion, _ = load_model(work / "models/latent/ckpt.pt", args.device_t)
    from ddpmkit.images import save_images

    save_images(diffusion.sample(model, 16, sampler="dpm++2m", steps=args.steps, seed=0, progress=False),
                work / "latent_samples.png")
    model, diffusion, _ = load_model(work / "models/pixel/ckpt.pt", args.device_t)
    save_images(diffusion.sample(model, 16, sampler="dpm++2m", steps=args.steps, seed=0, progress=False),
                work / "pixel_samples.png")
    return 0


def render(r: dict, extractor) -> str:
    a = r["autoencoder"]
    lines = [f"Autoencoder: {a['train_s'] / 60:.1f} min, {a['train_img_s']:.0f} img/s; reconstruction PSNR "
             f"{a['psnr_db']:.2f} dB, reconstruction FID {a['recon_fid']:.4g} ({extractor.name})", "",
             "| run | train img/s | sample img/s | FID at 1/3 budget (min) | FID at full budget (min) |",
             "|---|---|---|---|---|"]
    for name in ("pixel", "latent"):
        x = r[name]
        s1, s2 = x["scores"]
        lines.append(f"| {name} | {x['train_img_s']:.1f} | {s2['sample_img_s']:.1f} | {s1['fid']:.4g} "
                     f"({s1['train_min']:.1f}) | {s2['fid']:.4g} ({s2['train_min']:.1f}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
