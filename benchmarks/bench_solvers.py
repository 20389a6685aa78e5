"""Few-step ODE solvers on one checkpoint: sample quality per sampler, noise-level spacing and NFE.

    python benchmarks/bench_quality.py --systems ddpmkit --rows dpm20 --keep-ckpt /tmp/digits.pt
    python benchmarks/bench_solvers.py --ckpt /tmp/digits.pt -n 1000 --json /tmp/solvers.json

Metric: bench_quality.py's, imported from it: its stratified split of the builtin digits, the
small CNN classifier trained on split A, and the Frechet distance (FD) between the classifier's
64-d features of the samples and of the held-out split B. Use a checkpoint trained on split A
(bench_quality.py --keep-ckpt), so that split B is unseen. FD depends on the sample count, so
compare cells of one table (one -n).

Cells: every --samplers entry x --spacings entry x --nfe entry. NFE is the model calls a cell makes:
Heun makes 2*steps - 1, so its even NFE columns hold its next lower odd count. Spacings are those
of `ddpm sample --spacing` (`ddpmkit.samplers.SPACINGS`), "default" (the sampler's own spacing for
that NFE, what `ddpm sample` uses without --spacing) and "calibrated": the levels `ddpm calibrate`
finds (GITS, Chen et al. 2024; `ddpmkit.calibrate`), from one teacher run of --calib-n
trajectories with sample seed 1000 (the scored samples use --seed, 0), searched once per step
count. Every cell draws the same n start noises (per-sample seeds), x0 clipping as --clip, so
cells differ only by the solver: compare them pairwise. (Independent draws of n = 500 samples
of one cell can differ by 10 FD or more on a 16 px digits model; paired cells differ far less.)

A second table gives each cell's distance to the ODE's solution: the root-mean-square pixel
difference (images in [-1, 1]) from the same start noises solved with --reference-nfe steps of
DPM-Solver++(2M) on karras levels. It measures the solver alone, without FD's sampling noise,
but not what a viewer sees: a blurred sample can be nearer to it than a sharp one.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import Scorer, digit_splits  # noqa: E402

from ddpmkit import calibrate, samplers  # noqa: E402
from ddpmkit.loading import load_model  # noqa: E402

ODE_SAMPLERS = ("ddim", "dpm++2m", "dpm++3m", "euler", "heun", "ipndm")
CALIBRATION_SEED = 1000  # the teacher's start noise: other seeds than the scored samples'


def steps_for(sampler: str, nfe: int) -> int:
    """The most steps of `sampler` within `nfe` model calls."""
    return max(s for s in range(1, nfe + 1) if samplers.nfe(sampler, s) <= nfe)


def parse_list(text: str, kind=str) -> list:
    return [kind(t.strip()) for t in text.split(",") if t.strip()]


def levels_for(run: dict, denoiser, sampler: str, steps: int, spacing: str) -> torch.Tensor:
    if spacing == "calibrated":
        if steps not in run["calibrated"]:
            run["calibrated"][steps] = calibrate.schedule(*run["costs"], steps)[0]
        return run["calibrated"][steps]
    if spacing == "default":
        return samplers.sampler_sigmas(denoiser, sampler, steps)
    return samplers.sampler_sigmas(denoiser, sampler, steps, spacing)


def sample(run: dict, sampler: str, sigmas: torch.Tensor, n: int, seed: int, batch_size: int) -> torch.Tensor:
    """Images in [-1, 1] (the diffusion's own clamp)."""
    return run["diffusion"].generate(run["model"], n, sampler=sampler, seed=seed, batch_size=batch_size,
                                     spacing=sigmas, progress=False, clip=run["clip"])


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()


def markdown(rows: list[dict], nfes: list[int], key: str = "fd", digits: int = 2) -> str:
    """One line per (sampler, spacing), one column per NFE; the best `key` of each column in bold."""
    best = {c: min(r[key] for r in rows if r["column"] == c) for c in nfes if any(r["column"] == c for r in rows)}
    lines = ["| sampler | spacing | " + " | ".join(f"{c} NFE" for c in nfes) + " |",
             "|---|---|" + "---|" * len(nfes)]
    keys = list(dict.fromkeys((r["sampler"], r["spacing"]) for r in rows))
    for sampler, spacing in keys:
        cells = []
        for c in nfes:
            r = next((r for r in rows if (r["sampler"], r["spacing"], r["column"]) == (sampler, spacing, c)), None)
            if r is None:
                cells.append("-")
            else:
                text = f"{r[key]:.{digits}f}" + (f" ({r['nfe']})" if r["nfe"] != c else "")
                cells.append(f"**{text}**" if r[key] == best[c] else text)
        lines.append(f"| {sampler} | {spacing} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="ddpmkit checkpoint of a 16x16 grey digits model (trained on "
                   "bench_quality's split A, e.g. bench_quality.py --keep-ckpt)")
    p.add_argument("-n", type=int, default=1000, help="samples per cell (default: 1000)")
    p.add_argument("--nfe", default="4,5,6,8,10,20", help="model-call budgets (default: 4,5,6,8,10,20)")
    p.add_argument("--samplers", default=",".join(ODE_SAMPLERS), help=f"default: {','.join(ODE_SAMPLERS)}")
    p.add_argument("--spacings", default="karras,trailing,uniform,calibrated",
                   help="spacings (SPACINGS, default, calibrated) (default: karras,trailing,uniform,calibrated)")
    p.add_argument("--clip", choices=("auto", "on", "off"), default="off",
                   help="x0 clipping inside the solvers; auto = the checkpoint's (default: off, the ODE itself)")
    p.add_argument("--reference-nfe", type=int, default=100,
                   help="DPM-Solver++(2M) steps of the ODE solution the distances are taken to (default: 100)")
    p.add_argument("--calib-n", type=int, default=calibrate.DEFAULT_SAMPLES,
                   help=f"teacher trajectories of the calibration (default: {calibrate.DEFAULT_SAMPLES})")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of every cell (default: 0)")
    p.add_argument("--split-seed", type=int, default=0, help="bench_quality's split and classifier seed (default: 0)")
    p.add_argument("--classifier-epochs", type=int, default=40, help="digit classifier epochs (default: 40)")
    p.add_argument("--batch-size", type=int, default=250, help="images per sampling batch (default: 250)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help=f"torch threads (default: {torch.get_num_threads()})")
    p.add_argument("--json", metavar="PATH", help="also write every cell as JSON")
    args = p.parse_args(argv)
    args.nfe, args.samplers, args.spacings = parse_list(args.nfe, int), parse_list(args.samplers), parse_list(args.spacings)
    bad = [s for s in args.samplers if s not in samplers.SAMPLERS or samplers.SAMPLERS[s].stochastic]
    if bad:
        p.error(f"--samplers: {','.join(bad)} not deterministic samplers; choose from {','.join(ODE_SAMPLERS)}")
    bad = [s for s in args.spacings if s not in samplers.SPACINGS + ("default", "calibrated")]
    if bad:
        p.error(f"--spacings: unknown {','.join(bad)}; choose from {','.join(samplers.SPACINGS)},default,calibrated")
    if not args.nfe or min(args.nfe) < 1:
        p.error("--nfe takes positive whole numbers, e.g. 4,6,8")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, diffusion, cfg = load_model(args.ckpt)
    if (cfg.data.image_size, cfg.data.channels) != (16, 1):
        sys.exit(f"{args.ckpt} is a {cfg.data.image_size}px {cfg.data.channels}-channel model; the metric needs 16px grey")
    run = {"model": model, "diffusion": diffusion, "clip": {"auto": None, "on": True, "off": False}[args.clip],
           "calibrated": {}}
    denoiser = diffusion.denoiser(model, clip=run["clip"])
    splits = digit_splits(args.split_seed)
    score = Scorer(splits, args.split_seed, args.classifier_epochs)
    print(f"{args.ckpt}: {sum(p.numel() for p in model.parameters()):,} parameters, {cfg.diffusion.schedule} "
          f"schedule, {cfg.diffusion.prediction}-prediction; classifier accuracy on split B {score.accuracy:.3f}; "
          f"n {args.n}, clip {args.clip}", file=sys.stderr)
    if "calibrated" in args.spacings:
        start = time.perf_counter()
        run["costs"] = calibrate.calibration_costs(denoiser, (diffusion.channels, diffusion.img_size,
                                                              diffusion.img_size), n=args.calib_n,
                                                   seed=CALIBRATION_SEED, device=diffusion.device)
        print(f"calibration: {args.calib_n} teacher trajectories in {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
    reference = sample(run, "dpm++2m", samplers.sampler_sigmas(denoiser, "dpm++2m", args.reference_nfe, "karras"),
                       args.n, args.seed, args.batch_size)
    ref_score = score(to_uint8(reference))
    print(f"ODE solution (DPM-Solver++(2M), {args.reference_nfe} NFE): FD {ref_score['fd']:.2f}", file=sys.stderr)
    rows = []
    for sampler in args.samplers:
        for spacing in args.spacings:
            for column in args.nfe:
                steps = steps_for(sampler, column)
                sigmas = levels_for(run, denoiser, sampler, steps, spacing)
                x = sample(run, sampler, sigmas, args.n, args.seed, args.batch_size)
                rows.append({"sampler": sampler, "spacing": spacing, "column": column, "steps": steps,
                             "nfe": samplers.nfe(sampler, steps), "n": args.n,
                             "sigmas": [round(float(s), 5) for s in sigmas], **score(to_uint8(x)),
                             "rmse": (x - reference).square().mean().sqrt().item()})
                print(f"  {sampler} {spacing} {rows[-1]['nfe']} NFE: FD {rows[-1]['fd']:.2f}, distance to the ODE "
                      f"solution {rows[-1]['rmse']:.4f}", file=sys.stderr)
    print(f"FD (n {args.n}; the ODE solution, {args.reference_nfe} NFE: {ref_score['fd']:.2f})\n")
    print(markdown(rows, args.nfe))
    print(f"\nRMS distance to the ODE solution ({args.reference_nfe} NFE)\n")
    print(markdown(rows, args.nfe, "rmse", 4))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "json"},
                                               "classifier_accuracy": score.accuracy, "reference": ref_score,
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
