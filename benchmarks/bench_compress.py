"""Pruning and int8 quantization of a trained model: size, cost, speed and FID per variant.

    python benchmarks/bench_compress.py --ckpt models/digits/ckpt.pt [-n 1000] [--extractor inception]
        [--finetune-images N] [--threads 1] [--workdir bench_compress]

Rows: fp32; bf16 autocast; pruned 30% and 50% (`ddpm prune`, fine-tuned); int8 (`ddpm quantize`);
pruned 50% + int8. Columns: parameters, MACs per image (one network call, Torch-Pruning's
counter; int8 rows have their fp32 source's MACs), checkpoint size on disk, sampling img/s at
20 NFE (dpm++2m) at batch 1 and batch 64 in this one process and thread count, FID of n samples
against the checkpoint's training data through `ddpm eval`'s scoring (scoring.reference_stats /
sample_features / score; extractor named in the output), and the fine-tuning wall time.
Speeds on a shared machine vary; compare rows of one run, not runs. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ddpmkit import load_model
from ddpmkit.compress.prune import prune
from ddpmkit.compress.quantize import ONNX, quantize
from ddpmkit.scoring import make_extractor, reference_stats, sample_features, score

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
    import torch_pruning as tp

    if not isinstance(model, torch.nn.Module) or not any(True for _ in model.parameters()):
        return None
    s = cfg.data.image_size
    x, t = torch.randn(1, cfg.data.channels or 3, s, s), torch.zeros(1)
    return float(tp.utils.count_ops_and_params(model, (x, t))[0])


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size


def row(name: str, path: Path, args, extractor, real, bf16: bool = False, finetune_s: float | None = None,
        macs_from=None) -> dict:
    model, diffusion, cfg = load_model(path)
    params = sum(p.numel() for p in model.parameters()) if any(True for _ in model.parameters()) else None
    macs = _macs(model, cfg) if macs_from is None else macs_from["macs"]
    params = params if params is not None else (macs_from or {}).get("params")
    fid = None
    if args.n:
        feats = sample_features(model, diffusion, args.n, extractor, sampler="dpm++2m", steps=NFE, seed=0,
                                bf16=bf16, progress=False)
        fid = score(real, feats, extractor)["fid"]
    return {"name": name, "params": params, "macs": macs, "size": _size(path), "b1": _speed(model, diffusion, 1, bf16, 3),
            "b64": _speed(model, diffusion, 64, bf16, 1), "fid": fid, "finetune_s": finetune_s}


def _fmt(r: dict) -> str:
    def num(v, spec):
        return "-" if v is None else format(v, spec)

    return (f"| {r['name']} | {num(r['params'] and r['params'] / 1e6, '.3f')}M | {num(r['macs'] and r['macs'] / 1e6, '.1f')}M "
            f"| {r['size'] / 1e6:.2f} MB | {r['b1']:.2f} | {r['b64']:.2f} | {num(r['fid'], '.2f')} "
            f"| {num(r['finetune_s'], '.0f')} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="the fp32 checkpoint (a converged model)")
    p.add_argument("-n", type=int, default=1000, help="samples per FID (0: skip FID)")
    p.add_argument("--extractor", default="auto", help="inception | randconv | auto")
    p.add_argument("--finetune-images", type=int, default=None, help="per pruned model (default: 10%% of the teacher's)")
    p.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads (the same for every row)")
    p.add_argument("--workdir", default="bench_compress", help="where the pruned runs and int8 folders go")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    extractor = make_extractor(args.extractor)
    _, _, cfg = load_model(args.ckpt)
    real = reference_stats(cfg.data.path, cfg.data.image_size, cfg.data.channels, extractor, log=lambda *a: None)
    rows = [row("fp32", Path(args.ckpt), args, extractor, real), row("bf16 autocast", Path(args.ckpt), args, extractor, real, bf16=True)]
    pruned = {}
    for ratio in (0.3, 0.5):
        name = f"pruned{int(ratio * 100)}"
        start = time.perf_counter()
        prune(args.ckpt, ratio, name, finetune_images=args.finetune_images, workdir=str(work), progress=False,
              log=lambda *a: None)
        pruned[ratio] = work / "models" / name / "ckpt.pt"
        rows.append(row(f"pruned {int(ratio * 100)}% + fine-tune", pruned[ratio], args, extractor, real,
                        finetune_s=time.perf_counter() - start))
    for name, src, ref in (("int8", Path(args.ckpt), rows[0]), ("pruned 50% + int8", pruned[0.5], rows[3])):
        out = quantize(src, work / name.replace(" ", "_").replace("%", "").replace("+", "p"))
        rows.append(row(name, out, args, extractor, real, macs_from=ref))
        rows[-1]["size"] = (out / ONNX).stat().st_size
    print(f"threads {args.threads}; FID: n={args.n}, extractor {extractor.name}, dpm++2m {NFE} steps, vs {cfg.data.path}")
    print("| variant | params | MACs/img | size | img/s b=1 | img/s b=64 | FID | fine-tune s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(_fmt(r))


if __name__ == "__main__":
    main()
