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
import time
from pathlib import Path

import torch

from ddpmkit import load_model, scoring
from ddpmkit.distill import distill
from ddpmkit.samplers import nfe


def _time_1000(model, diffusion, sampler, steps, n_time, batch):
    """Seconds to draw 1000 images, measured on n_time images and scaled."""
    start = time.perf_counter()
    diffusion.generate(model, n_time, sampler=sampler, steps=steps, seed=1, batch_size=batch, progress=False)
    return (time.perf_counter() - start) * 1000 / n_time


def _row(name, ckpt, sampler, steps, args, real, extractor, distill_s):
    model, diffusion, _ = load_model(ckpt, args.device)
    feats = scoring.sample_features(model, diffusion, args.n, extractor, sampler, steps, 0, args.batch_size,
                                    progress=False)
    fid = scoring.score(real, feats, extractor)["fid"]
    return {"row": name, "sampler": sampler, "steps": steps, "nfe": nfe(sampler, steps), "fid": fid,
            "sample_1000_s": _time_1000(model, diffusion, sampler, steps, args.n_time, args.batch_size),
            "distill_s": distill_s}


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
    p.add_argument("--n-time", type=int, default=1000, help="images drawn to time sampling (scaled to 1000)")
    p.add_argument("--extractor", default="randconv", choices=("randconv", "inception", "auto"))
    p.add_argument("--images", type=int, default=None, help="distillation budget (see ddpm distill --images)")
    p.add_argument("--pairs", type=int, default=5000, help="teacher pairs for the one-step student")
    p.add_argument("--start-steps", type=int, default=64, help="progressive: teacher DDIM steps to halve from")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workdir", default="bench_distill_runs")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--smoke", action="store_true", help="tiny teacher, tiny budgets, n=64: checks the script")
    args = p.parse_args()
    work = Path(args.workdir)
    if args.smoke:
        args.n, args.n_time, args.images, args.pairs, args.start_steps = 64, 16, 64, 64, 16
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
    rows.append(_row(f"teacher ddpm {T}", args.teacher, "ddpm", T, args, real, extractor, None))
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
    print(f"FID: {extractor.name}, n={args.n} vs {args.ref}; sampling time scaled from {args.n_time} images on "
          f"{args.device}; distill_s = the whole run that made the row (progressive: all stages to 1 step)")
    print(f"{'row':<22} {'NFE':>5} {'FID':>9} {'s/1000 img':>11} {'distill s':>10}")
    for r in rows:
        d = "" if r["distill_s"] is None else f"{r['distill_s']:.0f}"
        print(f"{r['row']:<22} {r['nfe']:>5} {r['fid']:>9.3f} {r['sample_1000_s']:>11.2f} {d:>10}")
    if args.json:
        Path(args.json).write_text(json.dumps({"extractor": extractor.name, "n": args.n, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
