"""Never lose a run: SIGKILL at any moment, graceful SIGTERM/SIGINT, periodic checkpoints, run locks.

The process-level tests start real `python -m ddpmkit train` processes. They all get the same
environment (scripts/crash_soak.py `child_env`: one thread, unbuffered output). Long-running
processes of this module are started together by the `trainers` fixture, so their start-ups
(importing torch takes seconds here) overlap; each test then waits for its own process to be
training (its checkpoint exists) before it signals it.
"""
import importlib.util
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ddpmkit.train as train_module
from ddpmkit import checkpoint
from ddpmkit.cli import main
from ddpmkit.runlock import RunLock
from ddpmkit.train import prepare, train

ROOT = Path(__file__).resolve().parents[1]


def _import_soak():
    spec = importlib.util.spec_from_file_location("crash_soak", ROOT / "scripts" / "crash_soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("crash_soak", module)
    spec.loader.exec_module(module)
    return module


soak = _import_soak()

STEPS_PER_EPOCH = soak.STEPS_PER_EPOCH  # 24 images, batch 4
LONG = "100000"  # epochs of a run that only a signal ends
# The `tiny` preset's widths at 32x32 (later --set pairs win), and one optimizer step per epoch
# (6 micro-batches): a step takes about a second, so a graceful stop requested at the start of a
# step is still under way when the second Ctrl-C comes.
SLOW_STEPS = ["--image-size", "32", "--set", "model.base_channels=32", "--set", "model.channel_mults=1,2,2",
              "--set", "model.attn_levels=2", "--set", "model.time_dim=128", "--grad-accum", "6"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


@pytest.fixture(autouse=True)
def no_curves(monkeypatch):
    """No curves.png in in-process runs here (about a second each); tests/test_train.py tests it."""
    monkeypatch.setattr(train_module, "DRAW_CURVES", False)


# --- 1. SIGKILL at random moments --------------------------------------------------------------

def _check_soak(summary, kills):
    assert summary["kills"] == kills, summary
    assert not summary["problems"], summary["problems"]
    assert summary["checkpoints_loaded_after_kills"] >= 1  # every existing one loaded; at least one existed
    assert summary["identical"], summary["differences"]
    assert summary["ok"]


def test_sigkill_soak_3_kills_resumes_bit_identical(tmp_path):
    """3 SIGKILLs (start-up, inside a checkpoint write, anytime); every checkpoint loads after each kill;
    the final model, EMA and optimizer state equal an uninterrupted run's, bit for bit."""
    summary = soak.soak(3, tmp_path, seed=0)
    _check_soak(summary, 3)
    assert summary["modes"] == {"startup": 1, "save": 1, "training": 1, "anytime": 0}


@pytest.mark.slow
def test_sigkill_soak_20_kills_resumes_bit_identical(tmp_path):
    summary = soak.soak(20, tmp_path, seed=1)
    print({k: v for k, v in summary.items() if k != "records"})
    _check_soak(summary, 20)
    assert summary["modes"] == {"startup": 5, "save": 5, "training": 5, "anytime": 5}
    assert summary["kills_inside_a_save"] >= 1  # at least one kill provably tore a checkpoint write
    assert summary["restarts_seen_resuming"] >= 5


# --- helpers for real processes -------------------------------------------------------------------

def _cmd(data, workdir, run, epochs, *extra):
    return [sys.executable, "-m", "ddpmkit", "train", "--data", str(data), "--workdir", str(workdir),
            "--epochs", str(epochs), *[a if a != soak.RUN else run for a in soak.TRAIN_ARGS], *extra]


class Trainer:
    """A `ddpm train` process whose stdout and stderr go to files."""

    def __init__(self, data, workdir, run, epochs=LONG, *extra):
        self.workdir, self.run = Path(workdir), run
        self.ckpt = self.workdir / "models" / run / "ckpt.pt"
        self.out, self.err = self.workdir / f"{run}.out", self.workdir / f"{run}.err"
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(_cmd(data, workdir, run, epochs, *extra), stdout=out, stderr=err,
                                         env=soak.child_env(), cwd=self.workdir)

    def stdout(self):
        return self.out.read_text(errors="replace")

    def stderr(self):
        return self.err.read_text(errors="replace")

    def wait_training(self, min_step=1, timeout=180):
        """Wait until a checkpoint with global_step >= min_step exists (the stop handler is installed then)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"exited {self.proc.returncode}: {self.stdout()} {self.stderr()}"
            if self.ckpt.exists():
                ckpt = checkpoint.load_checkpoint(self.ckpt)
                if ckpt["global_step"] >= min_step:
                    return ckpt
            time.sleep(0.05)
        raise AssertionError(f"{self.run}: no checkpoint after {timeout} s: {self.stdout()} {self.stderr()}")

    def wait_output(self, text, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.stdout():
                return
            if self.proc.poll() is not None and text not in self.stdout():
                raise AssertionError(f"exited {self.proc.returncode} without printing {text!r}: {self.stdout()}")
            time.sleep(0.0005)
        raise AssertionError(f"{text!r} not printed in {timeout} s")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return soak.make_image_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trainers(tmp_path_factory, data):
    """Long runs started together: one per signal test and two for the run-lock tests."""
    root = tmp_path_factory.mktemp("trainers")
    procs = {
        "SIGTERM": Trainer(data, root / "term", "g"),
        "SIGINT": Trainer(data, root / "int", "g"),
        "SIGINTx2": Trainer(data, root / "int2", "g", LONG, *SLOW_STEPS),
        "holder": Trainer(data, root / "lock", "x"),
        "killed": Trainer(data, root / "lock", "y"),
    }
    yield procs
    for t in procs.values():
        t.kill()


# --- 2. graceful stop -----------------------------------------------------------------------------

@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_finishes_step_saves_and_exits_0(trainers, data, sig, capsys):
    t = trainers[sig]
    before = t.wait_training(min_step=2)
    t.proc.send_signal(getattr(signal, sig))
    assert t.proc.wait(timeout=120) == 0, t.stderr()
    out = t.stdout()
    assert f"{sig} received: finishing this step and saving a checkpoint" in out
    stopped = re.search(r"stopped at epoch (\d+), step (\d+); checkpoint saved to (\S+)\. "
                        r"Run the same `ddpm train` command again to resume\.", out)
    assert stopped, out
    epoch, step = int(stopped.group(1)), int(stopped.group(2))
    assert Path(stopped.group(3)) == t.ckpt
    ckpt = checkpoint.load_checkpoint(t.ckpt)
    # the checkpoint holds the step that was running when the signal came, at its data position
    assert ckpt["global_step"] == step >= before["global_step"]
    assert ckpt["next_epoch"] == epoch
    assert ckpt["next_epoch"] * STEPS_PER_EPOCH + ckpt["batch_in_epoch"] == step
    assert "Traceback" not in t.stderr()
    # the same command resumes from there (in-process, one more epoch)
    capsys.readouterr()
    assert main(_cmd(data, t.workdir, "g", epoch + 1)[3:]) == 0
    assert f"resuming run 'g' from {t.ckpt}: epoch {epoch}, batch {ckpt['batch_in_epoch']}, step {step}" \
        in capsys.readouterr().out


def test_second_ctrl_c_aborts_at_once(trainers):
    t = trainers["SIGINTx2"]
    t.wait_training(min_step=1)
    # Time one optimizer step (= one epoch here: every epoch end saves), then send the first Ctrl-C
    # a fifth of a step after a save, i.e. early in a step: the graceful stop it asks for cannot
    # finish before the second Ctrl-C. (Right after a save, the loop's own stop check at the epoch
    # boundary would end the run at once.)
    def next_save():
        inode = t.ckpt.stat().st_ino
        deadline = time.monotonic() + 120
        while t.ckpt.stat().st_ino == inode:
            assert time.monotonic() < deadline and t.proc.poll() is None, (t.stdout(), t.stderr())
            time.sleep(0.0005)
        return time.monotonic()

    t0 = next_save()
    t1 = next_save()
    time.sleep(0.2 * (t1 - t0))
    assert t.proc.poll() is None, (t.stdout(), t.stderr())
    t.proc.send_signal(signal.SIGINT)
    t.wait_output("SIGINT received")  # the first one was handled: a graceful stop is under way
    t.proc.send_signal(signal.SIGINT)
    rc = t.proc.wait(timeout=60)
    what = f"exit {rc}\nstdout: {t.stdout()[-1500:]}\nstderr: {t.stderr()[-3000:]}"
    assert rc == 130, what
    assert t.stderr().strip().splitlines()[-1] == "ddpm: aborted", what
    assert "stopped at epoch" not in t.stdout(), what  # it did not complete the graceful stop
    assert "Traceback" not in t.stderr()
    checkpoint.load_checkpoint(t.ckpt)  # whatever the abort interrupted, the checkpoint is intact


# --- periodic checkpoints (in-process) ------------------------------------------------------------

SMALL_MODEL = {"size": "custom", "base_channels": 8, "channel_mults": [1, 2], "attn_levels": [1], "time_dim": 16}


def _overrides(folder, workdir, **train_kw):
    t = {"workdir": str(workdir), "run_name": "r", "epochs": 2, "batch_size": 4, "sample_every_epochs": 0,
         "device": "cpu"}
    t.update(train_kw)
    return {"data": {"path": str(folder), "image_size": 8}, "model": SMALL_MODEL,
            "diffusion": {"timesteps": 50}, "train": t}


def _record_saves(monkeypatch):
    saves = []
    real = checkpoint.atomic_save

    def spy(obj, path):
        real(obj, path)
        ckpt = checkpoint.load_checkpoint(path)  # what reached the disk
        saves.append((ckpt["next_epoch"], ckpt["batch_in_epoch"], ckpt["global_step"]))

    monkeypatch.setattr(checkpoint, "atomic_save", spy)
    return saves


def _run(ov):
    cfg, ckpt = prepare(ov)
    return train(cfg, ckpt, progress=False, log=lambda *a: None)


def test_step_checkpoints_are_written_mid_epoch(image_folder, tmp_path, monkeypatch):
    saves = _record_saves(monkeypatch)
    _run(_overrides(image_folder, tmp_path, ckpt_every_steps=2))
    mid = [s for s in saves if s[1] > 0]
    assert mid == [(0, 2, 2), (0, 4, 4), (1, 2, 8), (1, 4, 10)]  # 6 batches per epoch
    assert [s for s in saves if s[1] == 0] == [(1, 0, 6), (2, 0, 12)]  # epoch ends always save


def test_time_checkpoints_are_written_mid_epoch(image_folder, tmp_path, monkeypatch):
    saves = _record_saves(monkeypatch)
    _run(_overrides(image_folder, tmp_path, epochs=1, ckpt_every_minutes=1e-7))  # 6 microseconds: every step
    assert [s[1] for s in saves] == [1, 2, 3, 4, 5, 0]


def test_without_periodic_checkpoints_only_epoch_ends_save(image_folder, tmp_path, monkeypatch):
    saves = _record_saves(monkeypatch)
    _run(_overrides(image_folder, tmp_path, epochs=2))
    assert saves == [(1, 0, 6), (2, 0, 12)]


# --- 8. concurrent runs ----------------------------------------------------------------------------

def test_second_process_on_same_run_fails_at_once_first_unharmed(trainers, data):
    holder = trainers["holder"]
    holder.wait_training(min_step=1)
    with open(holder.workdir / "b.out", "wb") as out, open(holder.workdir / "b.err", "wb") as err:
        t0 = time.monotonic()
        rc = subprocess.run(_cmd(data, holder.workdir, "x", 1), stdout=out, stderr=err, env=soak.child_env(),
                            cwd=holder.workdir, timeout=120).returncode
        elapsed = time.monotonic() - t0
    err = (holder.workdir / "b.err").read_text()
    lock = holder.workdir / "models" / "x" / ".lock"
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("ddpm: error: ") and "Traceback" not in err
    assert f"run 'x' is being trained by another process (pid {holder.proc.pid}, lock {lock})" in err
    assert holder.proc.poll() is None, "the first run was disturbed"
    before = checkpoint.load_checkpoint(holder.ckpt)["global_step"]
    holder.wait_training(min_step=before + 1)  # ... and is still making progress
    holder.proc.send_signal(signal.SIGTERM)
    assert holder.proc.wait(timeout=120) == 0
    assert checkpoint.load_checkpoint(holder.ckpt)["global_step"] > before
    assert elapsed < 60  # failed at once (start-up included), not after waiting for the lock


def test_lock_of_a_sigkilled_run_does_not_block(trainers, data, capsys):
    t = trainers["killed"]
    t.wait_training(min_step=1)
    lock = t.workdir / "models" / "y" / ".lock"
    assert lock.read_text().strip() == str(t.proc.pid)
    t.proc.send_signal(signal.SIGKILL)
    t.proc.wait()
    assert lock.exists()  # the file stays; the kernel dropped the flock with the process
    with RunLock(lock.parent, "y"):
        pass
    ckpt = checkpoint.load_checkpoint(t.ckpt)
    capsys.readouterr()
    assert main(_cmd(data, t.workdir, "y", ckpt["next_epoch"] + 1)[3:]) == 0
    assert "resuming run 'y'" in capsys.readouterr().out
