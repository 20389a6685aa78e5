"""Class-conditional digits: class accuracy and FD of guided samples, plus example pictures.

    python benchmarks/bench_conditional.py --threads 2 --out-dir /tmp/cond --json /tmp/cond/cond.json

Data and metric: those of bench_quality.py (imported from it, so both benchmarks measure alike).
scikit-learn's 1,797 digits as `builtin:digits` makes them at 16x16, with `load_digits().target`
as labels (the order is checked there). A stratified third of every class is held out (split B);
split A (about 1,200 images) is written as a class-folder tree A/<digit>/<k>.png, the seed's
layout, so `--class-cond` reads the labels from the folder names exactly as a user's data would.

  * classifier: bench_quality's small CNN, trained on split A (its accuracy on split B is printed);
  * class accuracy: the share of samples drawn for class c that the classifier labels c;
  * FD: the Frechet distance between Gaussians fitted to the classifier's 64-d penultimate
    features of the samples and of split B (NOT Inception FID; comparable only inside this table,
    at the same sample count);
  * recognized: the share of samples whose top softmax probability exceeds 0.9.

Models. Both are trained through ddpmkit's own path (`prepare` + `train`, what `ddpm train`
runs) with the same budget: --model-size (default tiny), --batch-size, epochs = round(--images /
|A|). The conditional one adds train.class_cond=true (cond_drop 0.1, the default); the
unconditional one (skip with --no-uncond) is the baseline for "FD no worse than unconditional".
Samples: --n per row (an equal share per class), --sampler/--steps (default dpm++2m, 20), the
EMA weights, guidance w in --guidance (default 1 2 4; w = 1 is the plain conditional model), and
with --interval LO HI the same w != 1 again with guidance only at LO < sigma <= HI (Kynkaanniemi
et al. 2024). --keep-ckpt keeps the conditional model; --cond-ckpt reuses one instead of training.

Pictures written to --out-dir: grid.png (one labelled row per digit at w = 2),
inpaint.png (rows: held-out digits; columns: the digit, the given left half, three inpaintings of
the right half with the null class, i.e. without telling the model the digit) and sdedit.png
(rows: held-out digits; columns: SDEdit at strengths 0, 0.25, 0.5, 0.75, 1, null class).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import Scorer, digit_splits, train_ddpmkit, write_png_folder  # noqa: E402

from ddpmkit import load_model  # noqa: E402
from ddpmkit.guidance import class_rows, generate, save_labelled_grid  # noqa: E402
from ddpmkit.images import save_images  # noqa: E402


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()


def guided_rows(run: dict, score: Scorer, args) -> list[dict]:
    """One row per guidance w over all noise levels, then (with --interval) one per w != 1 with
    guidance limited to the interval."""
    per_class = max(1, args.n // 10)
    labels = class_rows(10, per_class)
    runs = [(w, None) for w in args.guidance]
    if args.interval:
        runs += [(w, tuple(args.interval)) for w in args.guidance if w != 1.0]
    rows = []
    for w, interval in runs:
        start = time.perf_counter()
        x = generate(run["diffusion"], run["model"], len(labels), labels=labels, guidance=w, interval=interval,
                     sampler=args.sampler, steps=args.steps, seed=args.seed, batch_size=250)
        secs = time.perf_counter() - start
        images = to_uint8(x)
        pred = score._outputs(images)[1].argmax(1)
        rows.append({"model": "conditional", "guidance": w, "interval": interval, "n": len(labels),
                     "class_accuracy": float((pred == labels.numpy()).mean()), **score(images),
                     "sample_s": round(secs, 1)})
    return rows


def unconditional_row(run: dict, score: Scorer, args) -> dict:
    n = max(1, args.n // 10) * 10
    start = time.perf_counter()
    x = generate(run["diffusion"], run["model"], n, sampler=args.sampler, steps=args.steps, seed=args.seed,
                 batch_size=250)
    return {"model": "unconditional", "guidance": None, "interval": None, "n": n, "class_accuracy": None, **score(to_uint8(x)),
            "sample_s": round(time.perf_counter() - start, 1)}


def pictures(run: dict, splits: dict, args, out: Path) -> list[Path]:
    """grid.png, inpaint.png and sdedit.png (see the module docstring)."""
    diffusion, model, common = run["diffusion"], run["model"], dict(sampler=args.sampler, steps=args.steps)
    per_class = 8
    grid = generate(diffusion, model, 10 * per_class, labels=class_rows(10, per_class), guidance=2.0,
                    seed=args.seed, **common)
    paths = [save_labelled_grid(grid, tuple("0123456789"), per_class, out / "grid.png")]
    # One held-out example of each of the first 6 digits.
    picks = [int(np.flatnonzero(splits["b_labels"] == d)[0]) for d in range(6)]
    real = torch.from_numpy(splits["b"][picks]).float().div(127.5).sub(1)[:, None]
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 8:] = 1  # white = generate: the right half; the left half is given
    cells = []
    for k in range(len(real)):
        filled = generate(diffusion, model, 3, known=real[k:k + 1], mask=mask, seed=args.seed + k, **common)
        cells += [real[k:k + 1], real[k:k + 1] * (1 - mask) - mask, filled]
    paths.append(save_images(torch.cat(cells), out / "inpaint.png", nrow=5))
    strengths = (0.0, 0.25, 0.5, 0.75, 1.0)
    cells = [generate(diffusion, model, 1, init=real[k:k + 1], strength=s, seed=args.seed + k, **common)
             for k in range(len(real)) for s in strengths]
    paths.append(save_images(torch.cat(cells), out / "sdedit.png", nrow=len(strengths)))
    return paths


def markdown(rows: list[dict]) -> str:
    lines = ["| model | guidance | interval (sigma) | n | class accuracy | FD (classifier features) | recognized "
             "| sample s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = "-" if r["class_accuracy"] is None else f"{100 * r['class_accuracy']:.1f}%"
        w = "-" if r["guidance"] is None else f"{r['guidance']:g}"
        span = "all" if r["interval"] is None else f"({r['interval'][0]:g}, {r['interval'][1]:g}]"
        lines.append(f"| {r['model']} | {w} | {span if r['guidance'] is not None else '-'} | {r['n']} | {acc} "
                     f"| {r['fd']:.2f} | {100 * r['recognized']:.1f}% | {r['sample_s']} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=300_000, help="training images per model (default: 300000)")
    p.add_argument("--model-size", default="tiny")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n", type=int, default=1000, help="samples per table row (default: 1000)")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    p.add_argument("--interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="also sample every w != 1 with guidance limited to LO < sigma <= HI")
    p.add_argument("--keep-ckpt", metavar="PATH", help="copy the conditional checkpoint here")
    p.add_argument("--cond-ckpt", metavar="PATH", help="use this conditional checkpoint instead of training one "
                   "(e.g. a --keep-ckpt copy; it must have been trained on split A of the same --seed)")
    p.add_argument("--sampler", default="dpm++2m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--classifier-epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-uncond", action="store_true", help="skip the unconditional baseline")
    p.add_argument("--ddpmkit-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra config for both models, as `ddpm train --set`")
    p.add_argument("--out-dir", default="bench_conditional_out")
    p.add_argument("--json", metavar="FILE")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = digit_splits(args.seed)
    score = Scorer(splits, args.seed, args.classifier_epochs)
    print(f"classifier accuracy on held-out real digits: {100 * score.accuracy:.1f}%", flush=True)
    rows, timings = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_png_folder(splits["a"], splits["a_labels"], Path(tmp) / "A")
        if args.cond_ckpt:
            model, diffusion, cfg = load_model(args.cond_ckpt)
            cond = {"model": model, "diffusion": diffusion, "cfg": cfg}
            print(f"conditional: loaded {args.cond_ckpt}", flush=True)
        else:
            cond_args = argparse.Namespace(**{**vars(args),
                                              "ddpmkit_set": args.ddpmkit_set + ["train.class_cond=true"]})
            cond = train_ddpmkit(folder, len(splits["a"]), cond_args, Path(tmp) / "cond")
            timings["conditional_train_s"] = round(cond["train_s"], 1)
            print(f"conditional: trained in {cond['train_s']:.0f} s ({cond['params'] / 1e6:.2f}M parameters)",
                  flush=True)
            if args.keep_ckpt:
                Path(args.keep_ckpt).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(cond["ckpt"], args.keep_ckpt)
        assert cond["cfg"].model.class_names == tuple("0123456789"), cond["cfg"].model.class_names
        rows += guided_rows(cond, score, args)
        if not args.no_uncond:
            uncond = train_ddpmkit(folder, len(splits["a"]), args, Path(tmp) / "uncond")
            timings["unconditional_train_s"] = round(uncond["train_s"], 1)
            rows.append(unconditional_row(uncond, score, args))
        written = pictures(cond, splits, args, out)
    print(markdown(rows))
    print("wrote " + ", ".join(map(str, written)))
    if args.json:
        Path(args.json).write_text(json.dumps({"classifier_accuracy": score.accuracy, "rows": rows,
                                               "timings": timings, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
