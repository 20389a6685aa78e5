"""Multi-process training and sampling: 2 CPU processes with gloo, started as torchrun starts them.

Each rank is a fresh `python -m ddpmkit.cli train` process with RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT set, which is all torchrun's launcher adds; the reference runs use one
process with the same global batch.
"""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddpmkit.checkpoint import resume_batch
from ddpmkit.cli import main
from ddpmkit.train import prepare, train

WORLD = 2
# tests/test_train.py's SMALL_MODEL. Without dropout: each process draws its own dropout masks, so
# with dropout an N-process run is not one process's computation (test_train checks that dropout
# resumes exactly).
CONFIG = """
[model]
size = "custom"
base_channels = 8
channel_mults = [1, 2]
attn_levels = [1]
time_dim = 16
[diffusion]
timesteps = 50
[data]
path = "{data}"
image_size = 8
hflip = true
[train]
run_name = "r"
sample_every_epochs = 0
log_every = 1
ema_decay = 0.9
warmup_steps = 2
device = "cpu"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv, cwd, world=WORLD, timeout_s=20, module=("-m", "ddpmkit.cli")):
    """Start `world` processes with a torchrun-style environment; returns the Popen objects."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if k not in ("TORCHELASTIC_RUN_ID", "GROUP_RANK")}
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   DDPMKIT_DDP_TIMEOUT=str(timeout_s), PYTHONUNBUFFERED="1")
        procs.append(subprocess.Popen([sys.executable, *module, *argv], cwd=cwd, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def finish(procs, timeout=120):
    """Wait for every process; returns [(returncode, stdout, stderr)], killing all on a timeout."""
    out = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=timeout)
            out.append((p.returncode, o, e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


def ddp_train(cfg, workdir, *extra, world=WORLD):
    results = finish(start(["train", "--config", str(cfg), "--workdir", str(workdir), "--no-progress", *extra],
                           workdir.parent, world))
    for rc, out, err in results:
        assert rc == 0, err[-3000:]
    return results


def ckpt_of(workdir):
    return torch.load(Path(workdir) / "models" / "r" / "ckpt.pt", weights_only=True)


def wait_for_ckpt(workdir, procs, timeout=60):
    path = Path(workdir) / "models" / "r" / "ckpt.pt"
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), finish(procs, 5)
        time.sleep(0.05)


@pytest.fixture
def setup(image_folder, tmp_path):
    """23 images (so the last global batch splits 4 + 3 over the ranks) and the run config."""
    sorted(image_folder.rglob("*.png"))[0].unlink()
    cfg = tmp_path / "run.toml"
    cfg.write_text(CONFIG.format(data=image_folder.as_posix()))
    return cfg


def test_ddp_matches_one_process_with_the_same_global_batch_and_resumes_exactly(setup, tmp_path):
    # 2 processes x batch 4 x accumulation 2 against 1 process x batch 8 x accumulation 2: global
    # batches of 8 images, 3 per epoch (8, 8, 7), optimizer steps of 2 + 1 batches, 2 epochs.
    # fp32: the tolerances below are fp32 rounding's (the default `auto` is bf16 on some CPUs).
    args = ("--batch-size", "4", "--grad-accum", "2", "--sample-every", "1", "--sample-steps", "2",
            "--precision", "fp32")
    ranks = ddp_train(setup, tmp_path / "ddp", *args, "--epochs", "2")
    assert "starting run" in ranks[0][1] and "starting run" not in ranks[1][1]  # rank 0 alone reports
    assert {p.name for p in (tmp_path / "ddp/results/r").iterdir()} >= {"0.jpg", "1.jpg"}
    assert main(["train", "--config", str(setup), "--workdir", str(tmp_path / "one"), "--no-progress",
                 "--batch-size", "8", "--grad-accum", "2", "--epochs", "2", "--precision", "fp32"]) == 0
    a, b = ckpt_of(tmp_path / "ddp"), ckpt_of(tmp_path / "one")
    assert a["global_step"] == b["global_step"] == 4 and a["world_size"] == 2
    # The weights agree up to float rounding, not bit for bit: each rank's backward sums the
    # weight gradients over its own rows and the all-reduce adds the two partial sums, an order
    # one process never uses. 4 AdamW steps at lr 3e-4 move the weights by ~1e-3, and (t, noise)
    # drawn per rank instead of per global batch gives ~2e-3 differences; rounding gives ~1e-6 (fp32).
    for key in ("model_state_dict", "ema_state_dict"):
        for name in b[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=0, atol=1e-4, msg=f"{key} {name}")
    for sa, sb in zip(a["optimizer_state_dict"]["state"].values(), b["optimizer_state_dict"]["state"].values()):
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=1e-3, atol=1e-6)
    # the logged (global) loss agrees too
    torch.testing.assert_close([v for _, v in a["history"]["loss"]], [v for _, v in b["history"]["loss"]], rtol=1e-3,
                               atol=0)

    # Stop after one epoch, resume to two: bit-identical to the straight run (same processes, same order).
    ddp_train(setup, tmp_path / "resumed", *args, "--epochs", "1")
    ddp_train(setup, tmp_path / "resumed", *args, "--epochs", "2")
    c = ckpt_of(tmp_path / "resumed")
    for key in ("model_state_dict", "ema_state_dict"):
        for name in a[key]:
            assert torch.equal(a[key][name], c[key][name]), (key, name)
    assert c["global_step"] == 4 and [s for s, _ in c["history"]["loss"]] == [1, 2, 3, 4]  # the curve survives


def test_stop_signal_on_one_rank_then_resume_with_one_process(setup, tmp_path):
    # 2 x batch 2 = global batches of 4: 6 per epoch. SIGTERM reaches rank 0 only; both ranks
    # must stop at the same step and exit cleanly.
    work = tmp_path / "w"
    procs = start(["train", "--config", str(setup), "--workdir", str(work), "--no-progress", "--batch-size", "2",
                   "--epochs", "100", "--ckpt-every-steps", "1"], tmp_path)
    wait_for_ckpt(work, procs)
    procs[0].send_signal(signal.SIGTERM)
    results = finish(procs, timeout=60)
    assert [r[0] for r in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    assert "stopped at epoch" in results[0][1]
    mid = ckpt_of(work)
    epoch, k, step = mid["next_epoch"], mid["batch_in_epoch"], mid["global_step"]
    assert mid["world_size"] == 2 and mid["images_in_epoch"] == min(4 * k, 23)

    # One process with batch 2 continues after the same 4k images: batch 2k of 12.
    logs = []
    cfg, ckpt = prepare({"train": {"workdir": str(work), "run_name": "r", "epochs": epoch + 1}})
    summary = train(cfg, ckpt, progress=False, log=logs.append)
    assert summary["status"] == "finished" and summary["epoch"] == epoch + 1
    assert summary["step"] == step + 12 - 2 * k
    if k:
        assert any(f"after {4 * k} images at batch {2 * k}" in line for line in logs), logs
    end = ckpt_of(work)
    assert end["world_size"] == 1 and end["batch_in_epoch"] == 0


def test_resume_position_through_images():
    ckpt = {"batch_in_epoch": 3, "config": {"train": {"batch_size": 3, "grad_accum": 1}}}
    assert resume_batch(ckpt, 23, 3, 1, 1) == (3, None)  # same layout: exact
    # 9 images consumed; 2 processes x batch 2 = 4 per global batch: batch 2, 1 image seen again.
    batch, note = resume_batch(ckpt, 23, 2, 1, 2)
    assert batch == 2 and "after 9 images at batch 2 (1 images are seen again)" in note
    # With accumulation 2 the position is rounded down to whole optimizer steps: batch 2 -> 2, 5 -> 4.
    assert resume_batch(dict(ckpt, world_size=2, images_in_epoch=20), 23, 2, 2, 2)[0] == 4
    assert resume_batch(dict(ckpt, batch_in_epoch=0), 23, 2, 1, 2) == (0, None)


SAMPLE_WORKER = """
import sys, torch, torch.distributed as dist
from ddpmkit import Diffusion
from ddpmkit.distributed import generate_distributed
from ddpmkit.models import UNet
dist.init_process_group("gloo")
torch.manual_seed(0)
model = UNet(3, 3, time_dim=16, base_channels=8, channel_mults=(1, 2), attn_levels=(1,))
diffusion = Diffusion(noise_steps=50, img_size=8)
kw = dict(sampler=sys.argv[2], steps=6, seed=11, progress=False)
everywhere = generate_distributed(diffusion, model, 7, batch_size=2, **kw)
on_zero = generate_distributed(diffusion, model, 5, dst=0, **kw)
torch.save({"all": everywhere, "dst": on_zero}, f"{sys.argv[1]}/rank{dist.get_rank()}.pt")
dist.destroy_process_group()
"""


def test_distributed_sampling_equals_one_process(tmp_path):
    sampler = "ddpm"
    results = finish(start([str(tmp_path), sampler], tmp_path, module=("-c", SAMPLE_WORKER)))
    assert [r[0] for r in results] == [0, 0], results[0][2][-2000:]
    from ddpmkit import Diffusion
    from ddpmkit.models import UNet

    torch.manual_seed(0)
    model = UNet(3, 3, time_dim=16, base_channels=8, channel_mults=(1, 2), attn_levels=(1,))
    diffusion = Diffusion(noise_steps=50, img_size=8)
    kw = dict(sampler=sampler, steps=6, seed=11, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: bit-for-bit needs the same CPU kernels and thread count
    try:
        ref7 = diffusion.generate(model, 7, batch_size=2, **kw)  # batches 0-1, 2-3, 4-5, 6 as the ranks drew them
        ref5 = diffusion.generate(model, 5, batch_size=3, **kw)  # the default split: batches of ceil(5 / 2)
    finally:
        torch.set_num_threads(threads)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert torch.equal(r0["all"], ref7) and torch.equal(r1["all"], ref7)
    assert torch.equal(r0["dst"], ref5) and r1["dst"] is None
    # Another batch size on one process gives the same images up to float rounding.
    torch.testing.assert_close(diffusion.generate(model, 7, batch_size=7, **kw), ref7, rtol=0, atol=1e-5)


@pytest.mark.parametrize("how", ["killed", pytest.param("stopped", marks=pytest.mark.slow)])
def test_dead_or_stuck_rank_makes_the_other_exit_with_a_clear_error(setup, tmp_path, how):
    # A killed peer closes its sockets (gloo notices at once); a stopped one (SIGSTOP) only stops
    # answering, which the process-group timeout (here 5 s) turns into an error. The second case
    # waits out the timeout, so it runs with -m slow only.
    work = tmp_path / "w"
    procs = start(["train", "--config", str(setup), "--workdir", str(work), "--no-progress", "--batch-size", "2",
                   "--epochs", "1000", "--ckpt-every-steps", "1"], tmp_path, timeout_s=5)
    try:
        wait_for_ckpt(work, procs)
        t0 = time.monotonic()
        procs[1].send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        out, err = procs[0].communicate(timeout=40)
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[0].returncode == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpm: error: process 0 of 2 stopped while training: "), err
    assert "Another process crashed, was killed or did not answer within 5 s (DDPMKIT_DDP_TIMEOUT)" in lines[0]
    assert elapsed < (10 if how == "killed" else 30)
