"""Many one-change ddpmkit trainings, scored as bench_quality.py scores them, several at a time.

    python benchmarks/sweep_quality.py runs.json --device cuda --parallel 10 --draws 10 \\
        --base-set train.lr=1e-3 --base-set train.warmup_steps=100 --base-set train.batch_size=64 --json sweep.json

runs.json lists the runs, each a name, `ddpm train --set` overrides on top of --base-set, and a
training seed (default 0):

    [{"name": "v"}, {"name": "eps", "set": ["diffusion.prediction=eps"]},
     {"name": "eps-seed1", "set": ["diffusion.prediction=eps"], "seed": 1}]

Each run is one process (started fresh, so one crash or CUDA context does not touch the others)
that does what `bench_quality.py --systems ddpmkit --rows dpm20clip --sample-seeds K` does: trains
`tiny` on split A of the 16x16 digits through `ddpmkit.train` for --images images, then draws K
sets of --n samples with DPM-Solver++(2M), 20 steps, x0 clipping, sampling seeds 0..K-1 (the same
initial noises as bench_quality's draws), and scores each set with bench_quality's Scorer. Up to
--parallel runs go at once; on the CPU each gets --threads torch threads.

The scorer's FD scale depends on its classifier's weights, which differ between machines even
with the same seed. The classifier is trained once per sweep, or loaded with --classifier PATH
(written there when the file does not exist yet), so a sweep on a GPU machine can score on the
same scale as bench_quality.py runs on another machine: train it there, carry the file.

Prints one markdown table: FD mean and standard deviation over the K draws, and the paired
difference from the --baseline run (default: the first), draw by draw on the same initial noise,
with its standard error; recognized and speckled shares are means over the draws. On a GPU the
training runs draw other random numbers than on a CPU, so a seed-0 run there is a different
training run from bench_quality's seed-0 run here, and runs sharing one GPU are not a speed
measurement.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402

NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def load_runs(path: str) -> list[dict]:
    """The runs of a JSON file, checked: unique names, SECTION.KEY=VALUE overrides, integer seeds."""
    try:
        runs = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"cannot read the runs file {path}: {e}")
    if not isinstance(runs, list) or not runs:
        sys.exit(f"{path} must hold a non-empty JSON list of runs, e.g. [{{\"name\": \"v\"}}]")
    seen, out = set(), []
    for k, run in enumerate(runs):
        if not isinstance(run, dict) or not isinstance(run.get("name"), str) or not NAME.match(run["name"]):
            sys.exit(f"run {k} of {path} needs a \"name\" of letters, digits, '.', '_' or '-'")
        if run["name"] in seen:
            sys.exit(f"run name '{run['name']}' appears twice in {path}")
        seen.add(run["name"])
        sets, seed = run.get("set", []), run.get("seed", 0)
        if not isinstance(sets, list) or not all(isinstance(s, str) for s in sets):
            sys.exit(f"run '{run['name']}': \"set\" must be a list of SECTION.KEY=VALUE strings")
        bq.parse_sets(sets)  # exits on a malformed override
        if not isinstance(seed, int) or isinstance(seed, bool):
            sys.exit(f"run '{run['name']}': \"seed\" must be an integer, got {seed!r}")
        out.append({"name": run["name"], "set": sets, "seed": seed})
    return out


def load_classifier(path: str) -> bq.DigitNet:
    """A digit classifier saved by `classifier`."""
    net = bq.DigitNet()
    try:
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:  # a wrong or damaged file: say which, without a traceback
        sys.exit(f"--classifier {path} is not a saved digit classifier ({type(e).__name__}); delete it to retrain")
    return net.eval()


def classifier(splits: dict, path: str, epochs: int) -> None:
    """Make sure `path` holds the scorer's classifier: check an existing file, else train one and save it."""
    if Path(path).exists():
        load_classifier(path)
        return
    net = bq.train_classifier(splits["a"], splits["a_labels"], epochs, 0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)


def one_run(run: dict, opts: dict) -> dict:
    """Train one run and score its draws (in a fresh process)."""
    torch.set_num_threads(opts["threads"])
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 as on the CPU
    torch.backends.cudnn.allow_tf32 = False
    splits = bq.digit_splits(0)
    score = bq.Scorer(splits, net=load_classifier(opts["classifier"]))
    args = SimpleNamespace(images=opts["images"], model_size="tiny", batch_size=64, train_seed=run["seed"],
                           ddpmkit_set=opts["base_set"] + run["set"], device=opts["device"])
    with tempfile.TemporaryDirectory(prefix=f"sweep_{run['name']}_") as tmp:
        trained = bq.train_ddpmkit(Path(opts["folder"]), len(splits["a"]), args, Path(tmp))
    draws = [score(bq.sample_ddpmkit(trained, "dpm++2m", 20, opts["n"], True, seed)) for seed in range(opts["draws"])]
    return {**run, "params": trained["params"], "train_s": trained["train_s"],
            **{key: [d[key] for d in draws] for key in ("fd", "recognized", "speckled")}}


def table(results: list[dict], baseline: str) -> str:
    base = next((r for r in results if r["name"] == baseline), None)
    lines = ["| run | seed | changes | FD mean ± sd | paired diff. from " + baseline + " ± se | recognized | speckled | "
             "train s |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        fd = np.array(r["fd"])
        sd = f" ± {fd.std(ddof=1):.2f}" if len(fd) > 1 else ""
        diff = "-"
        if base is not None and r is not base and len(base["fd"]) == len(fd):
            d = fd - np.array(base["fd"])
            diff = f"{d.mean():+.2f}" + (f" ± {d.std(ddof=1) / math.sqrt(len(d)):.2f}" if len(d) > 1 else "")
        lines.append(f"| {r['name']} | {r['seed']} | {' '.join(r['set']) or '-'} | {fd.mean():.2f}{sd} | {diff} | "
                     f"{np.mean(r['recognized']):.3f} | {100 * np.mean(r['speckled']):.1f}% | {r['train_s']:.0f} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", help="JSON file listing the runs")
    p.add_argument("--device", default="cpu", help="where every run trains and samples, as `ddpm train --device` "
                   "(default: cpu)")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (default: 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (default: CPU cores / --parallel)")
    p.add_argument("--images", type=int, default=150_000, help="training images per run (default: 150000)")
    p.add_argument("--n", type=int, default=1000, help="samples per draw (default: 1000)")
    p.add_argument("--draws", type=int, default=10, help="draws per run, sampling seeds 0..K-1 (default: 10)")
    p.add_argument("--base-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override for every run, before the run's own (repeatable)")
    p.add_argument("--baseline", help="run the paired differences are taken from (default: the first)")
    p.add_argument("--classifier", metavar="PATH", help="load the scorer's classifier from PATH, or save it there")
    p.add_argument("--classifier-epochs", type=int, default=40, help="its epochs when trained (default: 40)")
    p.add_argument("--json", metavar="PATH", help="also write every run's draws as JSON")
    args = p.parse_args(argv)
    for name in ("parallel", "images", "draws"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.n < 2:
        p.error("--n must be >= 2: FD needs a covariance")
    bq.check_device(p, args.device)
    bq.parse_sets(args.base_set)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    runs = load_runs(args.runs)
    baseline = args.baseline or runs[0]["name"]
    if baseline not in {r["name"] for r in runs}:
        sys.exit(f"--baseline {baseline} is not one of the runs' names")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.parallel)
    splits = bq.digit_splits(0)
    with tempfile.TemporaryDirectory(prefix="sweep_quality_") as tmp:
        clf_path = args.classifier or str(Path(tmp) / "classifier.pt")
        torch.set_num_threads(threads * args.parallel)
        classifier(splits, clf_path, args.classifier_epochs)
        folder = bq.write_png_folder(splits["a"], splits["a_labels"], Path(tmp) / "split_a")
        opts = {"threads": threads, "classifier": clf_path, "images": args.images, "base_set": args.base_set,
                "device": args.device, "n": args.n, "draws": args.draws, "folder": str(folder)}
        start, results = time.perf_counter(), {}
        fresh = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}  # 3.10 reuses its workers
        with ProcessPoolExecutor(args.parallel, mp_context=get_context("spawn"), **fresh) as pool:
            futures = {pool.submit(one_run, run, opts): run["name"] for run in runs}
            for future in futures:
                name = futures[future]
                try:
                    results[name] = future.result()
                except (Exception, SystemExit) as e:  # one failed run (a bad override, say) leaves the others' results
                    print(f"{name}: failed: {type(e).__name__}: {e}", file=sys.stderr)
                    continue
                r = results[name]
                print(f"[{time.perf_counter() - start:.0f} s] {name}: FD {np.mean(r['fd']):.2f} over {len(r['fd'])} "
                      f"draws, trained in {r['train_s']:.0f} s", file=sys.stderr)
    done = [results[r["name"]] for r in runs if r["name"] in results]
    if not done:
        sys.exit("every run failed; see the messages above")
    print(table(done, baseline))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "json"},
                                               "runs": done}, indent=1))


if __name__ == "__main__":
    main()
