"""Pruning and int8 quantization of a trained model: size, cost, speed and FID per variant.

    python benchmarks/bench_compress.py --ckpt models/digits/ckpt.pt [-n 1000] [--extractor inception]
        [--ratios 0.5 0.7] [--ratio-of params|macs|channels] [--distill-weight W] [--finetune-images N]
        [--no-scratch] [--threads 1] [--workdir bench_compress] [--digits-fd] [--reuse]

Rows: fp32; bf16 autocast; pruned at each --ratios share of --ratio-of (`ddpm prune`: the channel
ratio searched for that share, then the fine-tune with the teacher term --distill-weight and a cosine
LR); the first ratio's pruned architecture trained from scratch on the teacher's whole budget (its
config's training recipe, as many images as the teacher saw; --no-scratch skips it); int8 (`ddpm
quantize`); the last pruned model + int8. Columns: parameters and the share removed, MACs per image
(one network call, `ddpm prune`'s count: torch.utils.flop_counter's convolutions and matrix products;
int8 rows have their fp32 source's MACs) and the share removed, checkpoint size on disk, sampling img/s at
20 NFE (dpm++2m) at batch 1 and batch 64 in this one process and thread count, FID of n samples
against the checkpoint's training data through `ddpm eval`'s scoring (scoring.reference_stats /
score; extractor named in the output), with --digits-fd also bench_quality's
digit-classifier FD against its held-out digits (the metric the quality benchmark trusts; the
randconv FID barely moves on 16 px digits), and the wall time of the fine-tune (of the training, for
the from-scratch row).
Speeds on a shared machine vary; compare rows of one run, not runs. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from ddpmkit import load_model
from ddpmkit.checkpoint import config_of, load_checkpoint
from ddpmkit.compress.prune import DEFAULT_DISTILL_WEIGHT, mac_count, prune, teacher_images
from ddpmkit.compress.quantize import ONNX, quantize
from ddpmkit.data import load_data
from ddpmkit.scoring import make_extractor, reference_stats, score
from ddpmkit.train import train

NFE = 20


def _speed(model, diffusion, batch: int, bf16: bool, repeats: int) -> float:
    """Images per second of `repeats` timed batches of dpm++2m at NFE steps (after one warm-up batch)."""
    run = lambda: diffusion.generate(model, batch, sampler="dpm++2m", steps=NFE, seed=0, progress=False, bf16=bf16)  # noqa: E731
    run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return batch * repeats / (time.perf_counter() - start)


def _macs(model, cfg) -> float | None:
    if not isinstance(model, torch.nn.Module) or not any(True for _ in model.parameters()):
        return None
    s = cfg.data.image_size
    x, t = torch.randn(1, cfg.data.channels or 3, s, s), torch.zeros(1)
    return float(mac_count(model, (x, t)))


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size


def row(name: str, path: Path, args, extractor, real, bf16: bool = False, finetune_s: float | None = None,
        macs_from=None, scorer=None, base=None) -> dict:
    """One variant's figures; `base` (the fp32 row) gives the shares of parameters and MACs removed."""
    model, diffusion, cfg = load_model(path)
    params = sum(p.numel() for p in model.parameters()) if any(True for _ in model.parameters()) else None
    macs = _macs(model, cfg) if macs_from is None else macs_from["macs"]
    params = params if params is not None else (macs_from or {}).get("params")
    n = args.n_bf16 if bf16 else args.n
    fid = digits = None
    if n:  # one draw of n samples (uint8, image k seeded by k) for both scores
        images = [diffusion.sample(model, min(64, n - k), sampler="dpm++2m", steps=NFE, seed=0, first_index=k,
                                   bf16=bf16, progress=False) for k in range(0, n, 64)]
        fid = score(real, torch.cat([extractor(x) for x in images]), extractor)["fid"]
        digits = None if scorer is None else scorer(torch.cat(images)[:, 0].numpy())["fd"]
    removed = lambda key, value: None if base is None or value is None else 1 - value / base[key]  # noqa: E731
    return {"name": name, "params": params, "params_removed": removed("params", params), "macs": macs,
            "macs_removed": removed("macs", macs), "size": _size(path), "b1": _speed(model, diffusion, 1, bf16, 3),
            "b64": _speed(model, diffusion, 64, bf16, 1), "n": n, "fid": fid, "digits_fd": digits,
            "finetune_s": finetune_s}


def _fmt(r: dict) -> str:
    def num(v, spec):
        return "-" if v is None else format(v, spec)

    share = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    return (f"| {r['name']} | {num(r['params'] and r['params'] / 1e6, '.3f')}M | {share(r.get('params_removed'))} "
            f"| {num(r['macs'] and r['macs'] / 1e6, '.1f')}M | {share(r.get('macs_removed'))} "
            f"| {r['size'] / 1e6:.2f} MB | {r['b1']:.2f} | {r['b64']:.2f} | {r['n']} | {num(r['fid'], '.4g')} "
            f"| {num(r['digits_fd'], '.2f')} | {num(r['finetune_s'], '.0f')} |")


def _timed(name: str, work: Path, args, run) -> tuple[Path, float | None]:
    """WORKDIR/models/NAME/ckpt.pt made by run() (or, with --reuse, the run an earlier call left), and the
    seconds run() took, kept in WORKDIR/finetune_s.json."""
    ckpt, times = work / "models" / name / "ckpt.pt", work / "finetune_s.json"
    known = json.loads(times.read_text()) if times.exists() else {}
    if args.reuse and ckpt.exists():
        return ckpt, known.get(name)
    start = time.perf_counter()
    run()
    known[name] = time.perf_counter() - start
    times.write_text(json.dumps(known))
    return ckpt, known[name]


def _name(prefix: str, args, ratio: float) -> str:
    return f"{prefix}{args.ratio_of}{round(ratio * 100)}"


def _pruned(args, ratio: float, work: Path) -> tuple[Path, float | None]:
    """`ddpm prune` removing `ratio` of --ratio-of, fine-tuned; its checkpoint and fine-tune seconds."""
    return _timed(_name("pruned_", args, ratio), work, args, lambda: prune(
        args.ckpt, ratio, _name("pruned_", args, ratio), finetune_images=args.finetune_images, workdir=str(work),
        progress=False, log=lambda *a: None, ratio_of=args.ratio_of, distill_weight=args.distill_weight))


def _scratch(args, pruned: Path, ratio: float, work: Path) -> tuple[Path, float | None]:
    """The pruned architecture of `pruned`, freshly initialized and trained with the teacher's recipe
    on as many of its images as the teacher saw (whole epochs); its checkpoint and training seconds."""
    name = _name("scratch_", args, ratio)
    ckpt = load_checkpoint(args.ckpt)
    teacher = config_of(ckpt, args.ckpt)
    n = len(load_data(teacher.data.path, teacher.data.image_size, teacher.data.channels, teacher.data.cache_dir,
                      lambda *a: None))
    epochs = max(1, -(-(teacher_images(ckpt, teacher) or teacher.train.epochs * n) // n))
    model = config_of(load_checkpoint(pruned), pruned).model
    cfg = dataclasses.replace(teacher, model=model, train=dataclasses.replace(
        teacher.train, run_name=name, workdir=str(work), epochs=epochs, sample_every_epochs=epochs,
        eval_every_steps=0))
    path = work / "models" / name / "ckpt.pt"
    return _timed(name, work, args, lambda: train(cfg, load_checkpoint(path) if path.exists() else None,
                                                  log=lambda *a: None, progress=False))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="the fp32 checkpoint (a converged model)")
    p.add_argument("-n", type=int, default=1000, help="samples per FID (0: skip FID)")
    p.add_argument("--extractor", default="auto", help="inception | randconv | auto")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7], help="shares of --ratio-of to remove, one "
                   "pruned row each (default: 0.5 0.7)")
    p.add_argument("--ratio-of", default="params", choices=("params", "macs", "channels"),
                   help="what --ratios are shares of (ddpm prune --ratio-of; default: params)")
    p.add_argument("--distill-weight", type=float, default=None, help="the fine-tune's teacher weight (ddpm prune "
                   "--distill-weight; default: ddpm prune's)")
    p.add_argument("--finetune-images", type=int, default=None, help="per pruned model (default: 10%% of the teacher's)")
    p.add_argument("--no-scratch", action="store_true", help="skip the from-scratch row (it trains as long as the "
                   "teacher did)")
    p.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads (the same for every row)")
    p.add_argument("--workdir", default="bench_compress", help="where the pruned runs and int8 folders go")
    p.add_argument("--n-bf16", type=int, default=250, help="samples for the bf16 row's FID (slow where bf16 is "
                   "emulated)")
    p.add_argument("--digits-fd", action="store_true", help="also score bench_quality's digit-classifier FD (a "
                   "model trained by bench_quality.py --keep-ckpt on its split A)")
    p.add_argument("--reuse", action="store_true", help="reuse the pruned runs and int8 folders in --workdir")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    extractor = make_extractor(args.extractor)
    _, _, cfg = load_model(args.ckpt)
    real = reference_stats(cfg.data.path, cfg.data.image_size, cfg.data.channels, extractor, log=lambda *a: None)
    scorer = None
    if args.digits_fd:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_quality import Scorer, digit_splits

        scorer = Scorer(digit_splits(0))
    kw = dict(args=args, extractor=extractor, real=real, scorer=scorer)
    rows = [row("fp32", Path(args.ckpt), **kw)]
    kw["base"] = rows[0]
    rows.append(row("bf16 autocast", Path(args.ckpt), bf16=True, **kw))
    unit = {"params": "params", "macs": "MACs", "channels": "channels"}[args.ratio_of]
    pruned = {}
    for ratio in args.ratios:
        pruned[ratio], seconds = _pruned(args, ratio, work)
        rows.append(row(f"pruned {ratio:.0%} of {unit} + fine-tune", pruned[ratio], finetune_s=seconds, **kw))
    if not args.no_scratch:
        ratio = args.ratios[0]
        path, seconds = _scratch(args, pruned[ratio], ratio, work)
        rows.append(row(f"pruned {ratio:.0%} of {unit}, trained from scratch", path, finetune_s=seconds, **kw))
    last = args.ratios[-1]
    ref = next(r for r in rows if r["name"].startswith(f"pruned {last:.0%} of {unit} + fine-tune"))
    for name, src, macs_from in (("int8", Path(args.ckpt), rows[0]), (f"pruned {last:.0%} of {unit} + int8",
                                                                       pruned[last], ref)):
        folder = work / name.replace(" ", "_").replace("%", "").replace("+", "p")
        out = folder if args.reuse and (folder / ONNX).exists() else quantize(src, folder)
        rows.append(row(name, out, macs_from=macs_from, **kw))
        rows[-1]["size"] = (out / ONNX).stat().st_size
    print(f"threads {args.threads}; FID: extractor {extractor.name}, dpm++2m {NFE} steps, n per row, vs "
          f"{cfg.data.path}" + ("; digits FD: bench_quality's classifier features vs its held-out split B"
                                if scorer else ""))
    weight = DEFAULT_DISTILL_WEIGHT if args.distill_weight is None else args.distill_weight
    images = args.finetune_images or "a tenth of the teacher's"
    print(f"fine-tunes: teacher weight {weight}, {images} images, cosine LR; from scratch: the teacher's images "
          "and training recipe")
    print("| variant | params | params removed | MACs/img | MACs removed | size | img/s b=1 | img/s b=64 | n | FID "
          "| digits FD | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(_fmt(r))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
