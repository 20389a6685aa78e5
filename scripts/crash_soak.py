#!/usr/bin/env python
"""Crash soak: SIGKILL a real `ddpm train` process at random moments, restart it, and check that
nothing is lost.

    python scripts/crash_soak.py --kills 20            # ~3-4 minutes on 2 CPU cores
    python scripts/crash_soak.py --kills 3 --seed 7 --keep /tmp/soak

One run ("straight") trains without interruption; a second run of the same length ("crashed") is
killed with SIGKILL `--kills` times, each time restarted with the same command, and finally left
to finish. Kill moments are drawn from a seeded RNG and cycle through four kinds:

* startup:  a uniform delay inside the process's start-up (imports, data decoding, model build,
            sometimes before Python is even running);
* save:     the moment the process's checkpoint temp file `models/RUN/.ckpt.pt.tmp<PID>` appears
            (after 1-6 such writes), plus 0-4 ms: inside torch.save, the fsync or the rename;
* training: a uniform delay of 0-`--window` seconds after the process's first checkpoint write;
* anytime:  a uniform delay over start-up plus `--window` seconds.

After every kill `ddpmkit.checkpoint.load_checkpoint` must read models/RUN/ckpt.pt, its
global_step must never go backwards and must match (next_epoch, batch_in_epoch). Every restart
must resume from exactly the step that checkpoint holds. At the end both runs' checkpoints must
be bit-identical: model, EMA, optimizer and scheduler state, step counters, the torch RNG
state and the steps of the logged curves. (Differences in the stored config other than workdir -- e.g. a field added to ddpmkit
while the soak ran -- and in numpy's/Python's unseeded RNG states are reported, not required.) Every process gets the same environment, with one thread
(OMP_NUM_THREADS=1), so float summation order cannot differ between the runs.

Exit status 0 when every check passed, 1 otherwise; `--json FILE` writes the summary.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

IMAGES, BATCH = 24, 4
STEPS_PER_EPOCH = math.ceil(IMAGES / BATCH)
RUN = "soak"
TRAIN_ARGS = [
    "--run-name", RUN, "--image-size", "8", "--batch-size", str(BATCH),
    "--set", "model.size=custom", "--set", "model.base_channels=8", "--set", "model.channel_mults=1,2",
    "--set", "model.attn_levels=1", "--set", "model.time_dim=16",
    "--timesteps", "50", "--sample-every", "0", "--device", "cpu", "--no-progress",
    "--hflip", "true", "--warmup-steps", "5", "--ema-decay", "0.9", "--log-every", "5", "--seed", "3",
]
MODES = ("startup", "save", "training", "anytime")


def make_image_folder(root: Path) -> Path:
    """The 24 smooth coloured blobs of tests/conftest.py `image_folder` (png and jpg, two sub-folders)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:24, 0:20]
    for i in range(IMAGES):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        cy, cx = rng.uniform(4, 16, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 20.0)
        color = rng.uniform(0.3, 1.0, 3)
        arr = (blob[..., None] * color * 255).astype(np.uint8)
        Image.fromarray(arr).save(sub / f"img{i}.{'png' if i % 3 else 'jpg'}")
    return root


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONHASHSEED="0",
               PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def command(data: Path, workdir: Path, epochs: int) -> list[str]:
    return [sys.executable, "-m", "ddpmkit", "train", "--data", str(data), "--workdir", str(workdir),
            "--epochs", str(epochs), *TRAIN_ARGS]


def _inode(path: Path):
    try:
        st = path.stat()
        return st.st_ino, st.st_mtime_ns
    except OSError:
        return None


def diff_states(a: Any, b: Any, where: str = "") -> list[str]:
    """Every place where two loaded checkpoints differ (tensors compared bit for bit, dtype included)."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [f"{where}: tensor vs {type(b).__name__}"]
        if a.dtype != b.dtype or a.shape != b.shape:
            return [f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"]
        # bitwise: -0.0 vs 0.0 and NaN payloads count as differences too
        same = torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))
        return [] if same else [f"{where}: values differ"]
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append(f"{where}/{k}: only in one")
            else:
                out += diff_states(a[k], b[k], f"{where}/{k}")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff_states(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


# ddpmkit seeds only torch; nothing in training draws from numpy's or Python's global RNG, whose
# states a fresh process takes from the OS. The checkpoint stores and restores them, but two fresh
# runs start from different ones, so they are compared separately and reported, not required.
UNSEEDED = ("/rng_state/numpy", "/rng_state/python")


def compare_runs(straight: Path, crashed: Path) -> dict[str, list[str]]:
    """Differences between two final checkpoints: "state" (must be empty), "config" (other than
    workdir), "unseeded_rng" (numpy's and Python's global RNG states)."""
    from ddpmkit.checkpoint import load_checkpoint

    a, b = load_checkpoint(straight), load_checkpoint(crashed)
    for ckpt in (a, b):
        ckpt["config"]["train"].pop("workdir")  # the intended difference
        # The logged curves must hold the same steps. Their values cannot agree: the speed is a
        # timing, and a logged loss averages the batches since the last log line or (re)start.
        for key, points in ckpt.get("history", {}).items():
            ckpt["history"][key] = [step for step, _ in points]
    diffs = diff_states(a, b)
    return {"state": [d for d in diffs if not d.startswith(UNSEEDED + ("/config/",))],
            "config": [d for d in diffs if d.startswith("/config/")],
            "unseeded_rng": [d for d in diffs if d.startswith(UNSEEDED)]}


class Soak:
    def __init__(self, kills: int, workdir: Path, seed: int = 0, epochs: int | None = None,
                 window: float = 1.5, log=print):
        self.kills, self.seed, self.window, self.log = kills, seed, window, log
        self.rng = random.Random(seed)
        self.root = Path(workdir)
        self.data = make_image_folder(self.root / "data")
        # Progress per kill is at most `window` seconds of training, a few saves, or nothing (startup);
        # `cap_reserve` below also kills a process that gets near the end, so the run cannot finish early.
        self.epochs = epochs or max(12, math.ceil(kills * 20 / STEPS_PER_EPOCH) + 4)
        self.total_steps = self.epochs * STEPS_PER_EPOCH
        self.cap_reserve = STEPS_PER_EPOCH + 2
        self.env = child_env()
        self.crashed = self.root / "crashed"
        self.ckpt = self.crashed / "models" / RUN / "ckpt.pt"
        self.startup_estimate = 4.0  # seconds from spawn to the first save; updated as observed
        self.records: list[dict[str, Any]] = []
        self.problems: list[str] = []

    # -- one process --------------------------------------------------------------------------
    def _spawn(self, workdir: Path, tag: str) -> tuple[subprocess.Popen, Path]:
        logfile = self.root / f"{tag}.log"
        out = open(logfile, "wb")
        proc = subprocess.Popen(command(self.data, workdir, self.epochs), stdout=out, stderr=subprocess.STDOUT,
                                env=self.env, cwd=self.root)
        out.close()
        return proc, logfile

    def _ckpt_state(self) -> dict[str, Any] | None:
        from ddpmkit.checkpoint import load_checkpoint

        if not self.ckpt.exists():
            return None
        ckpt = load_checkpoint(self.ckpt)  # raises DdpmError for a torn or unreadable file
        return {"global_step": ckpt["global_step"], "next_epoch": ckpt["next_epoch"],
                "batch_in_epoch": ckpt["batch_in_epoch"]}

    def _kill_one(self, index: int, mode: str, before: dict | None) -> dict[str, Any]:
        proc, logfile = self._spawn(self.crashed, f"crashed-{index:02d}")
        tmp = self.ckpt.with_name(f".ckpt.pt.tmp{proc.pid}")
        start_step = before["global_step"] if before else 0
        t0 = time.monotonic()
        saves, appeared, seen_tmp, last_inode, first_save = 0, 0, False, _inode(self.ckpt), None
        target_saves = self.rng.randint(1, 6)
        extra = self.rng.choice([0.0, self.rng.uniform(0.0, 0.004)])
        delay = {"startup": self.rng.uniform(0.0, self.startup_estimate),
                 "training": self.rng.uniform(0.0, self.window),
                 "anytime": self.rng.uniform(0.0, self.startup_estimate + self.window)}.get(mode)
        reason = mode
        while True:
            now = time.monotonic() - t0
            if proc.poll() is not None:
                raise RuntimeError(f"kill {index}: the process ended by itself (exit {proc.returncode}) before "
                                   f"the kill; log {logfile}:\n{logfile.read_text(errors='replace')[-2000:]}")
            inode = _inode(self.ckpt)
            if inode != last_inode:
                last_inode = inode
                saves += 1
                first_save = first_save if first_save is not None else now
            if mode == "save":
                exists = tmp.exists()
                if exists and not seen_tmp:  # a new checkpoint write has begun
                    first_save = first_save if first_save is not None else now
                    appeared += 1
                    if appeared >= target_saves:
                        if extra:
                            time.sleep(extra)
                        break
                seen_tmp = exists
            elif mode == "training":
                if first_save is not None and now - first_save >= delay:
                    break
            elif now >= delay:
                break
            if start_step + saves >= self.total_steps - self.cap_reserve:
                reason = f"{mode} (near the end: killed early)"
                break
            if now > 120:
                raise RuntimeError(f"kill {index}: no checkpoint write seen in 120 s; log {logfile}")
            time.sleep(0.0005 if mode == "save" else 0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        at = time.monotonic() - t0
        if first_save is not None:
            self.startup_estimate = 0.5 * self.startup_estimate + 0.5 * first_save
        leftover = tmp.exists()
        state = self._ckpt_state()  # must load after every kill
        record = {"kill": index, "mode": reason, "at_s": round(at, 3), "tmp_left_behind": leftover,
                  "started_with_ckpt": before is not None,
                  "ckpt_step": state["global_step"] if state else None, "log": str(logfile)}
        resumed = re.search(r"resuming run '\w+' from .*: epoch (\d+), batch (\d+), step (\d+)",
                            logfile.read_text(errors="replace"))
        record["resumed_from_step"] = int(resumed.group(3)) if resumed else None
        if before is not None and resumed and int(resumed.group(3)) != before["global_step"]:
            self.problems.append(f"kill {index}: resumed from step {resumed.group(3)}, "
                                 f"but the checkpoint held step {before['global_step']}")
        if before is not None and (state is None or state["global_step"] < before["global_step"]):
            self.problems.append(f"kill {index}: checkpoint went back from step {before['global_step']} to "
                                 f"{state and state['global_step']}")
        if state is not None and state["global_step"] != state["next_epoch"] * STEPS_PER_EPOCH + state["batch_in_epoch"]:
            self.problems.append(f"kill {index}: inconsistent data position {state}")
        self.log(f"kill {index + 1}/{self.kills}: {reason:<10} at {at:6.3f}s  checkpoint step "
                 f"{record['ckpt_step']}  (resumed from {record['resumed_from_step']}, "
                 f"temp file left: {leftover})")
        record["state"] = state
        return record

    # -- the whole soak -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        t_start = time.monotonic()
        self.log(f"soak: {self.kills} kills, {self.epochs} epochs x {STEPS_PER_EPOCH} steps, seed {self.seed}, "
                 f"folder {self.root}")
        straight, straight_log = self._spawn(self.root / "straight", "straight")  # runs alongside
        modes = [MODES[i % len(MODES)] for i in range(self.kills)]
        self.rng.shuffle(modes)
        state = None
        try:
            for i, mode in enumerate(modes):
                record = self._kill_one(i, mode, state)
                self.records.append(record)
                state = record.pop("state")
            final, final_log = self._spawn(self.crashed, "crashed-final")
            rc_final = final.wait(timeout=900)
            rc_straight = straight.wait(timeout=900)
        finally:
            for proc in (straight,):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        final_text = final_log.read_text(errors="replace")
        resumed = re.search(r"resuming run '\w+' from .*step (\d+)", final_text)
        if rc_final != 0:
            self.problems.append(f"final run exited {rc_final}: {final_text[-1500:]}")
        if rc_straight != 0:
            self.problems.append(f"straight run exited {rc_straight}: {straight_log.read_text()[-1500:]}")
        if state is not None and (not resumed or int(resumed.group(1)) != state["global_step"]):
            self.problems.append(f"final run did not resume from step {state['global_step']}")
        diffs = {"state": ["not compared: a run failed"], "config": [], "unseeded_rng": []}
        if rc_final == 0 and rc_straight == 0:
            diffs = compare_runs(self.root / "straight" / "models" / RUN / "ckpt.pt", self.ckpt)
            final_state = self._ckpt_state()
            if final_state["global_step"] != self.total_steps:
                self.problems.append(f"final step {final_state['global_step']} != {self.total_steps}")
        leftovers = sorted(p.name for p in self.ckpt.parent.glob(".ckpt.pt.tmp*"))
        summary = {
            "kills": len(self.records),
            "kills_requested": self.kills,
            "modes": {m: sum(r["mode"].startswith(m) for r in self.records) for m in MODES},
            "kills_inside_a_save": sum(r["tmp_left_behind"] for r in self.records),
            # restarts that found a checkpoint, and how many of them printed the resume line (a process
            # killed early dies before printing it) -- every printed one matched the checkpoint's step
            "restarts_with_checkpoint": sum(r["started_with_ckpt"] for r in self.records) + (state is not None),
            "restarts_seen_resuming": sum(r["resumed_from_step"] is not None for r in self.records) + bool(resumed),
            "checkpoints_loaded_after_kills": sum(r["ckpt_step"] is not None for r in self.records),
            "total_steps": self.total_steps,
            "identical": not diffs["state"],
            "differences": diffs["state"][:20],
            "config_differences": diffs["config"][:20],
            "unseeded_numpy_python_rng_identical": not diffs["unseeded_rng"],
            "problems": self.problems,
            "stale_temp_files": leftovers,
            "seconds": round(time.monotonic() - t_start, 1),
            "records": self.records,
        }
        summary["ok"] = summary["identical"] and not self.problems and summary["kills"] == self.kills
        return summary


def soak(kills: int, workdir: str | Path | None = None, seed: int = 0, epochs: int | None = None,
         window: float = 1.5, log=print) -> dict[str, Any]:
    """Run the soak in `workdir` (a new temporary folder when None) and return its summary dict."""
    if workdir is None:
        workdir = tempfile.mkdtemp(prefix="ddpm-soak-")
    return Soak(kills, Path(workdir), seed, epochs, window, log).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="number of SIGKILLs (default: 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default: 0)")
    parser.add_argument("--epochs", type=int, default=None, help="run length (default: enough for --kills)")
    parser.add_argument("--window", type=float, default=1.5,
                        help="seconds of training an 'anytime' kill may reach past start-up (default: 1.5)")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR (kept) instead of a temporary folder")
    parser.add_argument("--json", metavar="FILE", help="write the summary as JSON")
    args = parser.parse_args(argv)
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        summary = soak(args.kills, args.keep, args.seed, args.epochs, args.window)
    else:
        with tempfile.TemporaryDirectory(prefix="ddpm-soak-") as tmp:
            summary = soak(args.kills, tmp, args.seed, args.epochs, args.window)
    short = {k: v for k, v in summary.items() if k != "records"}
    print(json.dumps(short, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    print("PASS" if summary["ok"] else "FAIL")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
