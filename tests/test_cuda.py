"""The GPU path: sampling, batching and training on DDPMKIT_TEST_DEVICE (default cuda).

Skipped without a CUDA GPU; benchmarks/gpu_check.sh runs this file on one. With
DDPMKIT_TEST_DEVICE=cpu the same checks run on the CPU (that is how they are tested here).
"""
import os

import numpy as np
import pytest
import torch

from ddpmkit.checkpoint import model_from_config
from ddpmkit.config import Config, preset
from ddpmkit.data import ImageData, epoch_batches

DEVICE = os.environ.get("DDPMKIT_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                reason="no CUDA GPU (set DDPMKIT_TEST_DEVICE=cpu to run these on the CPU)")


@pytest.fixture(autouse=True)
def exact_fp32():
    """No TF32 while comparing devices: the check is about the code path, not about TF32 rounding."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def tiny(objective="vp", size=8):
    cfg = Config()
    cfg.model = preset("tiny")
    cfg.data.image_size, cfg.data.channels, cfg.diffusion.timesteps = size, 3, 50
    cfg.diffusion.objective = objective
    torch.manual_seed(0)
    model, _ = model_from_config(cfg)
    return cfg, model


@pytest.mark.parametrize("objective", ["vp", "edm"])
@pytest.mark.parametrize("sampler", ["ddpm", "dpm++2m", "heun"])
def test_samples_match_cpu(objective, sampler):
    """Per-sample seeded noise is drawn on the CPU, so the device only changes rounding."""
    cfg, model = tiny(objective)
    images = {}
    for device in ("cpu", DEVICE):
        _, diffusion = model_from_config(cfg, device)
        images[device] = diffusion.generate(model.to(device), 4, sampler=sampler, steps=6, seed=3, progress=False)
    assert images[DEVICE].device.type == "cpu" and images[DEVICE].shape == (4, 3, 8, 8)
    assert torch.allclose(images["cpu"], images[DEVICE], atol=2e-3)


def test_bf16_sampling_runs_and_stays_close():
    cfg, model = tiny()
    _, diffusion = model_from_config(cfg, DEVICE)
    model = model.to(DEVICE)
    a = diffusion.generate(model, 8, sampler="dpm++2m", steps=8, seed=0, progress=False)
    b = diffusion.generate(model, 8, sampler="dpm++2m", steps=8, seed=0, progress=False, bf16=True)
    assert torch.isfinite(b).all() and (a - b).abs().mean() < 0.05


def test_batches_on_device_match_cpu():
    rng = np.random.default_rng(0)
    data = ImageData(rng.integers(0, 256, (37, 8, 8, 3), dtype=np.uint8), "test")
    cpu = list(epoch_batches(data, 8, seed=1, epoch=2, hflip=True))
    dev = list(epoch_batches(data, 8, seed=1, epoch=2, hflip=True, device=DEVICE))
    assert len(cpu) == len(dev) == 5
    for a, b in zip(cpu, dev):
        assert b.device.type == torch.device(DEVICE).type and torch.equal(a, b.cpu())


@pytest.mark.parametrize("bf16", [False, True])
def test_training_on_device(tmp_path, bf16):
    from ddpmkit.train import prepare, train

    np.save(tmp_path / "d.npy", np.random.default_rng(0).integers(0, 256, (64, 8, 8, 3), dtype=np.uint8))
    overrides = {"data": {"path": str(tmp_path / "d.npy"), "image_size": 8},
                 "model": {"size": "tiny"}, "diffusion": {"timesteps": 50},
                 "train": {"workdir": str(tmp_path), "run_name": "cuda", "epochs": 2, "batch_size": 16,
                           "bf16": bf16, "device": DEVICE, "sample_every_epochs": 2, "sample_steps": 4,
                           "log_every": 2}}
    cfg, ckpt = prepare(overrides, log=lambda *a: None)
    summary = train(cfg, ckpt, log=lambda *a: None, progress=False)
    assert summary["status"] == "finished" and summary["step"] == 8 and summary["nonfinite_skipped"] == 0
    assert (tmp_path / "results" / "cuda" / "1.jpg").is_file()
