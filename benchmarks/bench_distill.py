"""Few-step students of one teacher (issue 11): FID, NFE, sampling time for 1000 images, distillation time.

Rows: the teacher at DPM-Solver++(2M) 4 / 8 / 20 NFE and ancestral DDPM with all T steps; the
progressive students at 8 / 4 / 2 / 1 steps (one run halving from --start-steps to 1: its
steps{N}.pt snapshots and final ckpt.pt); the one-step student (Luhman & Luhman); consistency
tuning sampled with 1 and 2 steps. FID is ddpmkit's scoring (`ddpm eval`'s code) with the
extractor and n printed in the table; randconv FIDs are not comparable to published values.

    python benchmarks/bench_distill.py --teacher models/digits/ckpt.pt --ref builtin:digits -n 2000
    python benchmarks/bench_distill.py --smoke      # a tiny teacher and budgets: checks the script only
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ddpmkit import load_model, scoring
from ddpmkit.distill import distill
from ddpmkit.samplers import nfe


def _row(name, ckpt, sampler, steps, args, real, extractor, distill_s, n=None):
    """FID of n samples; the sampling time of those same samples (features excluded), scaled to 1000."""
    model, diffusion, _ = load_model(ckpt, args.device)
    n = n or args.n
    images, seconds = [], 0.0
    for first in range(0, n, args.batch_size):
        start = time.perf_counter()
        images.append(diffusion.sample(model, min(args.batch_size, n - first), sampler=sampler, steps=steps, seed=0,
                                       first_index=first, progress=False))
        seconds += time.perf_counter() - start
    feats = torch.cat([extractor(x) for x in images])
    fid = scoring.score(real, feats, extractor)["fid"]
    digits = None
    if args.scorer is not None:  # bench_quality's digit-classifier FD on the same samples
        digits = args.scorer(torch.cat(images).cpu()[:, 0].numpy())["fd"]  # sample() gives uint8 already
    return {"row": name, "sampler": sampler, "steps": steps, "nfe": nfe(sampler, steps), "fid": fid, "n": n,
            "digits_fd": digits, "sample_1000_s": seconds * 1000 / n, "distill_s": distill_s}


def _tiny_teacher(workdir: Path) -> str:
    from ddpmkit.train import prepare, train

    cfg, ckpt = prepare({"data": {"path": "builtin:digits", "image_size": 8},
                         "model": {"size": "custom", "base_channels": 8, "channel_mults": [1, 2], "attn_levels": [],
                                   "time_dim": 16},
                         "diffusion": {"timesteps": 64, "prediction": "v"},
                         "train": {"workdir": str(workdir), "run_name": "teacher", "epochs": 1, "batch_size": 64,
                                   "sample_every_epochs": 0, "device": "cpu"}})
    train(cfg, ckpt, progress=False)
    return str(workdir / "models" / "teacher" / "ckpt.pt")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", help="teacher checkpoint (required unless --smoke)")
    p.add_argument("--ref", default="builtin:digits", help="reference data for FID")
    p.add_argument("-n", type=int, default=2000, help="samples per FID")
    p.add_argument("--n-ddpm", type=int, default=200,
                   help="samples for the teacher's T-step DDPM row (its FID is biased up at small n)")
    p.add_argument("--extractor", default="randconv", choices=("randconv", "inception", "auto"))
    p.add_argument("--images", type=int, default=None, help="distillation budget (see ddpm distill --images)")
    p.add_argument("--pairs", type=int, default=5000, help="teacher pairs for the one-step student")
    p.add_argument("--start-steps", type=int, default=64, help="progressive: teacher DDIM steps to halve from")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workdir", default="bench_distill_runs")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--digits-fd", action="store_true", help="also score bench_quality's digit-classifier FD (a "
                   "teacher trained by bench_quality.py --keep-ckpt on its split A)")
    p.add_argument("--smoke", action="store_true", help="tiny teacher, tiny budgets, n=64: checks the script")
    args = p.parse_args()
    args.scorer = None
    if args.digits_fd:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_quality import Scorer, digit_splits

        args.scorer = Scorer(digit_splits(0))
    work = Path(args.workdir)
    if args.smoke:
        args.n, args.n_ddpm, args.images, args.pairs, args.start_steps = 64, 16, 64, 64, 16
        args.teacher = _tiny_teacher(work)
    if not args.teacher:
        p.error("--teacher is required (or --smoke)")
    teacher_model, teacher_diff, tcfg = load_model(args.teacher, args.device)
    extractor = scoring.make_extractor(args.extractor, None, args.device)
    real = scoring.reference_stats(args.ref, tcfg.data.image_size, tcfg.data.channels, extractor,
                                   work / "ref_cache", args.batch_size)
    common = dict(workdir=str(work), batch_size=args.batch_size, device=args.device, images=args.images,
                  progress=False)

    def run(method, name, **kw):
        start = time.perf_counter()
        distill(args.teacher, method, name, **common, **kw)
        return time.perf_counter() - start

    rows = [_row(f"teacher dpm++2m {k}", args.teacher, "dpm++2m", k, args, real, extractor, None) for k in (4, 8, 20)]
    T = tcfg.diffusion.timesteps
    rows.append(_row(f"teacher ddpm {T}", args.teacher, "ddpm", T, args, real, extractor, None, n=args.n_ddpm))
    t_prog = run("progressive", "prog", steps=1, start_steps_=args.start_steps)
    for k in (8, 4, 2):
        snap = work / "models" / "prog" / f"steps{k}.pt"
        if snap.exists():
            rows.append(_row(f"progressive {k}", snap, "progressive", k, args, real, extractor, t_prog))
    rows.append(_row("progressive 1", work / "models" / "prog" / "ckpt.pt", "progressive", 1, args, real, extractor,
                     t_prog))
    t_student = run("student", "student", pairs=args.pairs)
    rows.append(_row("one-step student", work / "models" / "student" / "ckpt.pt", "ddim", 1, args, real, extractor,
                     t_student))
    t_ct = run("consistency", "ct", steps=2)
    for k in (1, 2):
        rows.append(_row(f"consistency {k}", work / "models" / "ct" / "ckpt.pt", "consistency", k, args, real,
                         extractor, t_ct))
    print(f"FID: {extractor.name}, n={args.n} vs {args.ref}; sampling time: the FID samples' own, scaled to 1000 "
          f"images, on {args.device}; distill_s = the whole run that made the row (progressive: all stages to 1 step)")
    print("| row | NFE | n | FID | digits FD | s / 1000 img | distill s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        d = "" if r["distill_s"] is None else f"{r['distill_s']:.0f}"
        fd = "-" if r["digits_fd"] is None else f"{r['digits_fd']:.2f}"
        print(f"| {r['row']} | {r['nfe']} | {r['n']} | {r['fid']:.4g} | {fd} | {r['sample_1000_s']:.2f} | {d} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"extractor": extractor.name, "n": args.n, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
