"""Training, checkpoints and exact resume."""
import math
import os
import signal

import pytest
import torch

import ddpmkit.train as train_module
from ddpmkit import checkpoint, curves, load_model, losses
from ddpmkit.errors import DdpmError
from ddpmkit.train import prepare, train

# With dropout, whose masks a resumed run must draw as an uninterrupted one does.
SMALL_MODEL = {"size": "custom", "base_channels": 8, "channel_mults": [1, 2], "attn_levels": [1], "time_dim": 16,
               "dropout": 0.1}


@pytest.fixture(autouse=True)
def no_curves(monkeypatch):
    """curves.png costs about a second per run; the tests of the curves hook turn it back on."""
    monkeypatch.setattr(train_module, "DRAW_CURVES", False)


def overrides(folder, workdir, **train_kw):
    t = {"workdir": str(workdir), "run_name": "r", "epochs": 2, "batch_size": 8, "sample_every_epochs": 0,
         "log_every": 1, "ema_decay": 0.9, "warmup_steps": 2, "device": "cpu"}
    t.update(train_kw)
    return {"data": {"path": str(folder), "image_size": 8, "hflip": True}, "model": SMALL_MODEL,
            "diffusion": {"timesteps": 50}, "train": t}


def run(ov, fresh=False):
    cfg, ckpt = prepare(ov, fresh=fresh)
    return train(cfg, ckpt, progress=False, log=lambda *a: None)


def states(workdir):
    return torch.load(workdir / "models" / "r" / "ckpt.pt", weights_only=True)


def assert_same_training_state(a, b):
    for key in ("model_state_dict", "ema_state_dict"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for pa, pb in zip(a["optimizer_state_dict"]["state"].values(), b["optimizer_state_dict"]["state"].values()):
        for k in pa:
            assert torch.equal(pa[k], pb[k])
    assert a["global_step"] == b["global_step"] and a["next_epoch"] == b["next_epoch"]
    assert torch.equal(a["rng_state"]["torch"], b["rng_state"]["torch"])


@pytest.mark.parametrize("sigma_rel", [0.0, 0.1])  # the seed's exponential EMA, the power-function EMA
def test_resume_after_one_epoch_is_bit_identical(image_folder, tmp_path, sigma_rel):
    run(overrides(image_folder, tmp_path / "straight", epochs=2, ema_sigma_rel=sigma_rel))
    run(overrides(image_folder, tmp_path / "resumed", epochs=1, ema_sigma_rel=sigma_rel))
    summary = run(overrides(image_folder, tmp_path / "resumed", epochs=2, ema_sigma_rel=sigma_rel))
    assert summary["status"] == "finished" and summary["epoch"] == 2
    assert_same_training_state(states(tmp_path / "straight"), states(tmp_path / "resumed"))


def test_adamw_is_fused_where_the_device_has_the_kernel():
    cpu = train_module.adamw([torch.nn.Parameter(torch.ones(3))], lr=1e-3)
    assert cpu.param_groups[0]["fused"] is True
    meta = train_module.adamw([torch.nn.Parameter(torch.ones(3, device="meta"))], lr=1e-3)  # no fused kernel
    assert not meta.param_groups[0]["fused"] and meta.param_groups[0]["lr"] == 1e-3


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_checkpoint_of_the_unfused_adamw_resumes_on_the_fused_one(image_folder, tmp_path, precision):
    """A checkpoint written by the per-parameter AdamW (its param_groups say fused None) resumes
    with this build's fused kernel: under fp16 a mismatch would hand GradScaler's found_inf to the
    unfused step, which refuses it. The moments carry over, so the result is the straight run's."""
    run(overrides(image_folder, tmp_path / "straight", epochs=2, precision=precision))
    run(overrides(image_folder, tmp_path / "resumed", epochs=1, precision=precision))
    path = tmp_path / "resumed" / "models" / "r" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["optimizer_state_dict"]["param_groups"][0]["fused"] is True
    for group in ckpt["optimizer_state_dict"]["param_groups"]:
        group["fused"] = group["foreach"] = None  # as the unfused AdamW writes it
    checkpoint.atomic_save(ckpt, path)
    assert run(overrides(image_folder, tmp_path / "resumed", epochs=2, precision=precision))["status"] == "finished"
    b = states(tmp_path / "resumed")
    assert b["optimizer_state_dict"]["param_groups"][0]["fused"] is True
    assert_same_training_state(states(tmp_path / "straight"), b)


def test_graceful_stop_mid_epoch_then_step_level_resume(image_folder, tmp_path, monkeypatch):
    ov = overrides(image_folder, tmp_path / "straight", epochs=2, grad_accum=2)
    run(ov)
    calls = {"n": 0}
    real_call = losses.VPLoss.__call__

    def interrupting(self, net, x0, draws=None):
        calls["n"] += 1
        if calls["n"] == 4:  # during epoch 1's second optimizer step (3 batches per epoch)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_call(self, net, x0, draws)

    monkeypatch.setattr(losses.VPLoss, "__call__", interrupting)
    ov2 = overrides(image_folder, tmp_path / "resumed", epochs=2, grad_accum=2)
    summary = run(ov2)
    assert summary["status"] == "stopped"
    mid = states(tmp_path / "resumed")
    assert mid["next_epoch"] == 1 and mid["batch_in_epoch"] == 2  # stopped at a step boundary inside epoch 1
    monkeypatch.setattr(losses.VPLoss, "__call__", real_call)
    assert run(ov2)["status"] == "finished"
    assert_same_training_state(states(tmp_path / "straight"), states(tmp_path / "resumed"))


def test_checkpoint_survives_crash_during_save(image_folder, tmp_path, monkeypatch):
    run(overrides(image_folder, tmp_path, epochs=1))
    path = tmp_path / "models" / "r" / "ckpt.pt"
    before = path.read_bytes()

    def crashing_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the process dies in the middle of writing

    monkeypatch.setattr(checkpoint.torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        run(overrides(image_folder, tmp_path, epochs=2))
    assert path.read_bytes() == before
    assert checkpoint.load_checkpoint(path)["next_epoch"] == 1


def test_failed_write_keeps_previous_checkpoint(image_folder, tmp_path, monkeypatch):
    run(overrides(image_folder, tmp_path, epochs=1))
    path = tmp_path / "models" / "r" / "ckpt.pt"
    before = path.read_bytes()

    def disk_full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(DdpmError, match="No space left on device.*previous checkpoint is intact"):
        run(overrides(image_folder, tmp_path, epochs=2))
    assert path.read_bytes() == before
    assert not [p for p in path.parent.iterdir() if p.name != "ckpt.pt"]  # no temp file left behind


def test_checkpoint_is_weights_only_and_keeps_seed_keys(image_folder, tmp_path):
    run(overrides(image_folder, tmp_path, epochs=1))
    ckpt = torch.load(tmp_path / "models" / "r" / "ckpt.pt", weights_only=True)
    for key in ("model_state_dict", "optimizer_state_dict", "epoch", "ema_state_dict", "scheduler_state_dict",
                "rng_state", "config", "format_version", "global_step"):
        assert key in ckpt
    assert ckpt["epoch"] == 0 and ckpt["config"]["model"]["base_channels"] == 8


def test_resume_with_another_model_config_is_refused(image_folder, tmp_path):
    run(overrides(image_folder, tmp_path, epochs=1))
    ov = overrides(image_folder, tmp_path, epochs=2)
    ov["model"] = dict(SMALL_MODEL, base_channels=16)
    with pytest.raises(DdpmError, match="model.base_channels=8, not 16.*--fresh"):
        prepare(ov)
    prepare(ov, fresh=True)  # starting over is allowed


def test_nonfinite_steps_are_skipped_then_stop(image_folder, tmp_path, monkeypatch):
    real_call = losses.VPLoss.__call__
    monkeypatch.setattr(losses.VPLoss, "__call__", lambda self, *a: real_call(self, *a) * float("nan"))
    with pytest.raises(DdpmError, match="3 non-finite steps in a row"):
        run(overrides(image_folder, tmp_path, epochs=1, max_nonfinite_steps=3))


@pytest.mark.parametrize("diffusion", [
    {"learn_sigma": True}, {"objective": "edm"}, {"prediction": "v", "loss_weighting": "min_snr"},
    {"prediction": "v", "schedule": "cosine", "zero_terminal_snr": True},
])
def test_objectives_train_and_sample_from_checkpoint(image_folder, tmp_path, diffusion):
    ov = overrides(image_folder, tmp_path, epochs=1)
    ov["diffusion"] = dict(ov["diffusion"], **diffusion)
    summary = run(ov)
    assert summary["nonfinite_skipped"] == 0  # every step learned (a NaN loss would be skipped, not fail)
    model, diff, cfg = load_model(summary["ckpt"])
    for key, value in diffusion.items():
        assert getattr(cfg.diffusion, key) == value
    for sampler in ("ddpm", "dpm++2m"):
        images = diff.sample(model, 3, sampler=sampler, steps=5, seed=0, progress=False)
        assert images.shape == (3, 3, 8, 8) and images.dtype == torch.uint8


def test_logged_history_survives_resume_and_is_drawn(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "DRAW_CURVES", True)
    drawn = []
    real_write = curves.write_curves
    monkeypatch.setattr(curves, "write_curves", lambda h, path: (drawn.append(path), real_write(h, path))[1])
    constant = {"lr_schedule": "constant"}
    run(overrides(image_folder, tmp_path, epochs=1, **constant))  # 3 steps, log_every 1
    run(overrides(image_folder, tmp_path, epochs=2, **constant))
    history = states(tmp_path)["history"]
    assert [s for s, _ in history["loss"]] == [1, 2, 3, 4, 5, 6]  # the first run's points survived the resume
    assert history["lr"] == [(s, pytest.approx(3e-4)) for s in range(1, 7)]  # the warm-up of 2 steps ends at step 1
    assert len(history["img_per_sec"]) == 6 and all(v > 0 for _, v in history["img_per_sec"])
    assert history["fid"] == []  # no training-time evaluation in this run
    assert drawn == [tmp_path / "results" / "r" / "curves.png"] * 2  # at the end of each run (runs < 60 s)
    if real_write({"loss": [(1, 1.0)]}, tmp_path / "probe.png") is not None:  # matplotlib is installed
        assert (tmp_path / "results" / "r" / "curves.png").stat().st_size > 0


def test_history_is_thinned_beyond_its_cap(monkeypatch):
    monkeypatch.setattr(train_module, "HISTORY_CAP", 4)
    state = train_module.TrainState(None, None, None, None)
    for step in range(1, 6):
        state.step = step
        state.record("loss", step / 10)
    assert state.history["loss"] == [(1, 0.1), (3, 0.3), (5, 0.5)]


def test_failing_curves_never_stop_training(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "DRAW_CURVES", True)

    def broken(history, path):
        raise RuntimeError("no fonts\nat all")

    monkeypatch.setattr(curves, "write_curves", broken)
    logs = []
    cfg, ckpt = prepare(overrides(image_folder, tmp_path, epochs=1))
    assert train(cfg, ckpt, progress=False, log=logs.append)["status"] == "finished"
    warnings = [m for m in logs if "curves.png" in m]
    assert warnings == [f"warning: could not draw {tmp_path / 'results' / 'r' / 'curves.png'}: RuntimeError: no fonts at all"]


def test_loss_takes_explicit_draws_and_a_rank_gets_its_rows_of_the_global_draw():
    # What the trainer does under DDP: draw for the global batch, give rank r rows r::world.
    from ddpmkit import Diffusion
    from ddpmkit.models import UNet

    torch.manual_seed(0)
    net = UNet(3, 3, time_dim=16, base_channels=8, channel_mults=(1, 2), attn_levels=(1,)).eval()
    x0 = torch.rand(5, 3, 8, 8) * 2 - 1
    for objective in ("vp", "edm"):
        diffusion = Diffusion(noise_steps=50, img_size=8, objective=objective)
        loss_fn = losses.make_loss(diffusion)
        draws = loss_fn.draw(5, x0, torch.Generator().manual_seed(1))
        assert {k: v.shape[0] for k, v in draws.items()} == {k: 5 for k in draws}
        whole = loss_fn(net, x0, draws)
        rank1 = loss_fn(net, x0[1::2], losses.take_rows(draws, slice(1, None, 2)))
        torch.testing.assert_close(rank1, whole[1::2])
        again = loss_fn.draw(5, x0, torch.Generator().manual_seed(1))
        assert all(torch.equal(draws[k], again[k]) for k in draws)  # the generator alone fixes the draws
        other = loss_fn(net, x0, loss_fn.draw(5, x0, torch.Generator().manual_seed(2)))
        assert not torch.allclose(other, whole)  # ... and the loss uses them


def test_trainer_applies_grad_checkpointing_from_the_config(image_folder, tmp_path, monkeypatch):
    from ddpmkit.models import UNet

    flags = []
    real = UNet.set_grad_checkpointing
    monkeypatch.setattr(UNet, "set_grad_checkpointing", lambda self, flag=True: (flags.append(flag), real(self, flag)))
    run(overrides(image_folder, tmp_path, epochs=1, grad_checkpoint=True))
    assert flags == [True]


@pytest.mark.parametrize("native", [False, True])
def test_training_grids_are_readable_unless_native(image_folder, tmp_path, native):
    ov = overrides(image_folder, tmp_path, epochs=1, sample_every_epochs=1, sample_n=4, sample_steps=2,
                   native_grids=native)
    run(ov)
    from PIL import Image

    with Image.open(tmp_path / "results" / "r" / "0.jpg") as img:
        width = img.size[0]
    # 2x2 grid of 8 px images with 2 px padding = 22 px native; enlarged by a whole factor to >= 256.
    assert width == (22 if native else 22 * 12)


def test_lr_factor_warmup_then_cosine_to_zero():
    f = train_module.lr_factor
    assert [f(s, warmup=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert f(4, warmup=4, total=14, schedule="cosine") == 1.0
    assert f(9, warmup=4, total=14, schedule="cosine") == pytest.approx(0.5)
    assert f(14, warmup=4, total=14, schedule="cosine") == pytest.approx(0.0, abs=1e-12)
    assert f(99, warmup=4, total=14, schedule="cosine") == pytest.approx(0.0, abs=1e-12)  # never negative


def test_cosine_schedule_reaches_zero_at_the_last_step_and_resumes_exactly(image_folder, tmp_path, monkeypatch):
    straight = tmp_path / "a"
    run(overrides(image_folder, straight, lr_schedule="cosine", epochs=3))
    lrs = [lr for _, lr in states(straight)["history"]["lr"]]
    assert lrs[-1] < 0.1 * max(lrs) and lrs[-1] < lrs[-2]  # falls to about 0 at the last step
    calls = {"n": 0}
    real_call = losses.VPLoss.__call__

    def interrupting(self, net, x0, draws=None):
        calls["n"] += 1
        if calls["n"] == 5:  # in epoch 1 (3 batches per epoch)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_call(self, net, x0, draws)

    monkeypatch.setattr(losses.VPLoss, "__call__", interrupting)
    ov = overrides(image_folder, tmp_path / "b", lr_schedule="cosine", epochs=3)
    assert run(ov)["status"] == "stopped"
    monkeypatch.setattr(losses.VPLoss, "__call__", real_call)
    assert run(ov)["status"] == "finished"
    assert_same_training_state(states(straight), states(tmp_path / "b"))


@pytest.mark.parametrize("sigma_rel", [0.05, 0.1, 0.2])
def test_power_ema_weighs_step_tau_as_its_closed_form(sigma_rel):
    """Karras et al. 2024's power EMA after T updates is sum_tau w_tau theta_tau / T^(gamma+1), with
    w_tau = tau^(gamma+1) - (tau-1)^(gamma+1) (beta_t = (1 - 1/t)^(gamma+1) telescopes to this)."""
    gamma = train_module.power_ema_gamma(sigma_rel)
    g = gamma + 1
    assert math.sqrt(g / ((gamma + 2) ** 2 * (gamma + 3))) == pytest.approx(sigma_rel, rel=1e-9)
    net = torch.nn.Linear(1, 1, bias=False).double()
    ema = train_module.EMA(net, decay=0.995, sigma_rel=sigma_rel)
    thetas = torch.randn(300, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for step, theta in enumerate(thetas, start=1):
        net.weight.data.fill_(theta)
        ema.update(net, step)
    tau = torch.arange(1, len(thetas) + 1, dtype=torch.float64)
    expected = ((tau ** g - (tau - 1) ** g) * thetas).sum() / len(thetas) ** g
    assert ema.model.weight.item() == pytest.approx(expected.item(), rel=1e-9, abs=1e-12)
    # its width is sigma_rel of the run, whatever the run's length: the weights' sd over tau / T
    w = (tau ** g - (tau - 1) ** g) / len(thetas) ** g
    mean = (w * tau).sum() / len(tau)
    assert math.sqrt((w * (tau / len(tau) - mean) ** 2).sum()) == pytest.approx(sigma_rel, rel=0.03)


def test_power_ema_rejects_widths_no_profile_has():
    for bad in (0.0, -0.1, 0.29, 1.0):
        with pytest.raises(ValueError, match="sigma_rel must be in"):
            train_module.power_ema_gamma(bad)
