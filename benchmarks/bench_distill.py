"""Few-step students of one teacher: FID, NFE, sampling time for 1000 images, distillation cost.

Rows: the teacher at DPM-Solver++(2M) 4 / 8 / 20 NFE and ancestral DDPM with all T steps; the
progressive students at 8 / 4 / 2 / 1 steps (one run halving from --start-steps to 1: its
steps{N}.pt snapshots and final ckpt.pt); the one-step student (Luhman & Luhman); consistency
tuning sampled with 1 and 2 steps; SFD students (Zhou et al. 2024) at each of --sfd-steps. FID is
ddpmkit's scoring (`ddpm eval`'s code) with the extractor and n printed in the table; randconv
FIDs are not comparable to published values. Each distilled row also gives the wall time and the
training images (optimizer steps x batch; SFD: noise samples) of the run that made it, next to
the teacher's own training images, read from its checkpoint.

    python benchmarks/bench_distill.py --teacher models/digits/ckpt.pt --ref builtin:digits -n 2000 \
        --per-stage-images 40000 --images 100000
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


def trained_images(ckpt_path) -> int:
    """Images a run trained on: optimizer steps x batch x gradient accumulation x processes (each
    epoch's last batch may be smaller, so this can exceed the true count by under one batch an epoch)."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    t = ckpt["config"]["train"]
    return int(ckpt["global_step"]) * int(t["batch_size"]) * int(t.get("grad_accum", 1)) * int(ckpt.get("world_size", 1))


def _row(name, ckpt, sampler, steps, args, real, extractor, distill_s, n=None, distill_images=None):
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
            "digits_fd": digits, "sample_1000_s": seconds * 1000 / n, "distill_s": distill_s,
            "distill_images": distill_images}


def _tiny_teacher(workdir: Path) -> str:
    from ddpmkit.train import prepare, train

    cfg, ckpt = prepare({"data": {"path": "builtin:digits", "image_size": 8},
                         "model": {"size": "custom", "base_channels": 8, "channel_mults": [1, 2], "attn_levels": [],
                                   "time_dim": 16},
                         "diffusion": {"timesteps": 64, "prediction": "v"},
                         "train": {"workdir": str(workdir), "run_name": "teacher", "epochs": 1, "batch_size": 64,
                                   "sample_every_epochs": 0, "device": "cpu", "precision": "fp32"}})
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
    p.add_argument("--images", type=int, default=None, help="distillation budget of the student, consistency and "
                   "sfd runs (default: ddpm distill's per method)")
    p.add_argument("--per-stage-images", type=int, default=None, help="progressive: training images per halving "
                   "(default: --images, else ddpm distill's)")
    p.add_argument("--pairs", type=int, default=None, help="teacher pairs for the one-step student (default: "
                   "ddpm distill's, --images / 5)")
    p.add_argument("--sfd-steps", type=int, nargs="+", default=[4, 2], help="an SFD student for each of these "
                   "step counts (default: 4 2)")
    p.add_argument("--teacher-steps", type=int, default=None, help="sfd: teacher solver steps per student step "
                   "(default: ddpm distill's)")
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
        args.per_stage_images = args.per_stage_images or 64
        args.teacher = _tiny_teacher(work)
    if not args.teacher:
        p.error("--teacher is required (or --smoke)")
    teacher_model, teacher_diff, tcfg = load_model(args.teacher, args.device)
    extractor = scoring.make_extractor(args.extractor, None, args.device)
    real = scoring.reference_stats(args.ref, tcfg.data.image_size, tcfg.data.channels, extractor,
                                   work / "ref_cache", args.batch_size)
    common = dict(workdir=str(work), batch_size=args.batch_size, device=args.device, progress=False)
    teacher_images = trained_images(args.teacher)

    def run(method, name, images=args.images, **kw):
        """(wall seconds, training images) of one distillation run (resumed runs: this call's time only)."""
        start = time.perf_counter()
        summary = distill(args.teacher, method, name, images=images, **common, **kw)
        return time.perf_counter() - start, trained_images(summary["ckpt"])

    rows = [_row(f"teacher dpm++2m {k}", args.teacher, "dpm++2m", k, args, real, extractor, None) for k in (4, 8, 20)]
    T = tcfg.diffusion.timesteps
    rows.append(_row(f"teacher ddpm {T}", args.teacher, "ddpm", T, args, real, extractor, None, n=args.n_ddpm))
    t_prog, i_prog = run("progressive", "prog", images=args.per_stage_images or args.images, steps=1,
                         start_steps_=args.start_steps)
    for k in (8, 4, 2):
        snap = work / "models" / "prog" / f"steps{k}.pt"
        if snap.exists():
            rows.append(_row(f"progressive {k}", snap, "progressive", k, args, real, extractor, t_prog,
                             distill_images=i_prog))
    rows.append(_row("progressive 1", work / "models" / "prog" / "ckpt.pt", "progressive", 1, args, real, extractor,
                     t_prog, distill_images=i_prog))
    t_student, i_student = run("student", "student", pairs=args.pairs)
    rows.append(_row("one-step student", work / "models" / "student" / "ckpt.pt", "ddim", 1, args, real, extractor,
                     t_student, distill_images=i_student))
    t_ct, i_ct = run("consistency", "ct", steps=2)
    for k in (1, 2):
        rows.append(_row(f"consistency {k}", work / "models" / "ct" / "ckpt.pt", "consistency", k, args, real,
                         extractor, t_ct, distill_images=i_ct))
    for k in args.sfd_steps:
        t_sfd, i_sfd = run("sfd", f"sfd{k}", steps=k, teacher_steps=args.teacher_steps)
        rows.append(_row(f"sfd {k}", work / "models" / f"sfd{k}" / "ckpt.pt", "progressive", k, args, real,
                         extractor, t_sfd, distill_images=i_sfd))
    print(f"FID: {extractor.name}, n={args.n} vs {args.ref}; sampling time: the FID samples' own, scaled to 1000 "
          f"images, on {args.device}; distill s / images: the whole run that made the row (progressive: all stages "
          f"to 1 step; images = optimizer steps x batch, sfd: noise samples); the teacher trained on "
          f"{teacher_images:,} images")
    print("| row | NFE | n | FID | digits FD | s / 1000 img | distill s | distill images | x teacher images |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        d = "" if r["distill_s"] is None else f"{r['distill_s']:.0f}"
        im = "" if r["distill_images"] is None else f"{r['distill_images']:,}"
        share = "" if r["distill_images"] is None else f"{r['distill_images'] / teacher_images:.3f}"
        fd = "-" if r["digits_fd"] is None else f"{r['digits_fd']:.2f}"
        print(f"| {r['row']} | {r['nfe']} | {r['n']} | {r['fid']:.4g} | {fd} | {r['sample_1000_s']:.2f} | {d} | "
              f"{im} | {share} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"extractor": extractor.name, "n": args.n, "teacher": args.teacher,
                                               "teacher_images": teacher_images, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
