"""One-step students of an eps teacher: does the student's parameterization matter?

An eps network's x0 estimate is (x_VP - s eps) / a, a = 1 / sqrt(1 + sigma^2): at the top noise
level, where a one-step student evaluates, an error in its output reaches x0 multiplied by sigma
(157 on the linear schedule). v-prediction keeps that factor below 1 (Salimans & Ho 2022, §4).
This script trains one eps teacher on bench_quality's split A of the digits (16x16, the `tiny`
preset, the linear schedule), then distils it with `ddpm distill`'s code four ways: the `student`
and `consistency` methods, each with the student predicting eps (the teacher's) and v. Each row
is scored by bench_quality's digit-classifier FD on `-n` one-step samples (lower is better).

    python benchmarks/bench_student_param.py                       # about 12 minutes alone on 2 vCPUs
    python benchmarks/bench_student_param.py --smoke               # checks the script only
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
from bench_quality import SIZE, Scorer, digit_splits, write_png_folder  # noqa: E402

from ddpmkit.distill import distill  # noqa: E402
from ddpmkit.loading import load_model  # noqa: E402
from ddpmkit.train import prepare, train  # noqa: E402


def train_teacher(folder: Path, workdir: Path, images: int, n_train: int, seed: int) -> tuple[str, float]:
    epochs = max(1, round(images / n_train))
    cfg, _ = prepare({"model": {"size": "tiny"}, "data": {"path": str(folder), "image_size": SIZE, "channels": 1},
                      "diffusion": {"prediction": "eps", "schedule": "linear"},
                      "train": {"workdir": str(workdir), "run_name": "teacher", "epochs": epochs, "batch_size": 64,
                                "lr": 1e-3, "warmup_steps": 100, "lr_schedule": "cosine", "seed": seed,
                                "sample_every_epochs": 0, "device": "cpu", "precision": "fp32"}},
                     fresh=True, log=lambda *a: None)
    start = time.perf_counter()
    summary = train(cfg, None, log=lambda *a: None, progress=False)
    return summary["ckpt"], time.perf_counter() - start


def score_one_step(ckpt: str, sampler: str, n: int, scorer: Scorer) -> dict:
    model, diffusion, _ = load_model(ckpt)
    x = diffusion.sample(model, n, sampler=sampler, steps=1, seed=0, batch_size=250, progress=False)
    return scorer(x[:, 0].numpy())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher-images", type=int, default=30000, help="teacher training images")
    p.add_argument("--images", type=int, default=10000, help="distillation images per student")
    p.add_argument("--pairs", type=int, default=1000, help="teacher pairs for the student method")
    p.add_argument("-n", type=int, default=1000, help="samples per score")
    p.add_argument("--seed", type=int, default=0, help="training seed of the teacher")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--smoke", action="store_true", help="tiny budgets: checks the script only")
    args = p.parse_args()
    if args.smoke:
        args.teacher_images, args.images, args.pairs, args.n = 1200, 256, 64, 100
    torch.manual_seed(0)
    splits = digit_splits()
    scorer = Scorer(splits, epochs=2 if args.smoke else 40)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = write_png_folder(splits["a"], splits["a_labels"], work / "data")
        teacher, teacher_s = train_teacher(folder, work, args.teacher_images, len(splits["a"]), args.seed)
        model, diffusion, _ = load_model(teacher)
        x = diffusion.sample(model, args.n, sampler="dpm++2m", steps=20, seed=0, batch_size=250, progress=False)
        rows.append({"row": "eps teacher, DPM-Solver++(2M) 20 NFE", "seconds": round(teacher_s, 1),
                     **scorer(x[:, 0].numpy())})
        for method, sampler, extra in (("student", "ddim", {"pairs": args.pairs}), ("consistency", "consistency", {})):
            for prediction in ("eps", "v"):
                start = time.perf_counter()
                summary = distill(teacher, method, f"{method}_{prediction}", images=args.images, batch_size=64,
                                  device="cpu", workdir=str(work), prediction=prediction, log=lambda *a: None,
                                  progress=False, **extra)
                seconds = time.perf_counter() - start
                rows.append({"row": f"{method}, student predicts {prediction}, 1 NFE", "seconds": round(seconds, 1),
                             **score_one_step(summary["ckpt"], sampler, args.n, scorer)})
    print(f"\nteacher: eps, tiny preset, {args.teacher_images} images; students: {args.images} images"
          f" ({args.pairs} pairs for the student method); n = {args.n}; {torch.get_num_threads()} threads\n")
    print("| row | FD | recognized | speckled | seconds |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['fd']:.1f} | {r['recognized']:.3f} | {r['speckled']:.1%} | {r['seconds']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
