"""Precision: fp32 / bf16 / fp16 (autocast + GradScaler) in training and sampling, the bf16 alias."""
import os
import signal

import pytest
import torch
from test_train import assert_same_training_state, overrides, run, states

import ddpmkit.train as train_module
from ddpmkit import checkpoint, losses, precision
from ddpmkit.checkpoint import model_from_config
from ddpmkit.cli import main
from ddpmkit.config import Config, from_dict, new_run_config, preset, validate
from ddpmkit.errors import DdpmError
from ddpmkit.train import prepare


DEVICE = os.environ.get("DDPMKIT_TEST_DEVICE", "cpu")  # benchmarks/gpu_check.sh sets cuda


@pytest.fixture(autouse=True)
def no_curves(monkeypatch):
    monkeypatch.setattr(train_module, "DRAW_CURVES", False)


def fp16(folder, workdir, **train_kw):
    return overrides(folder, workdir, precision="fp16", **train_kw)


def initial_model(ov):
    """The weights a run of `ov` starts from (the trainer seeds torch with train.seed, then builds)."""
    cfg, _ = prepare(ov, fresh=True)
    cfg.data.channels = 3
    torch.manual_seed(cfg.train.seed)
    return model_from_config(cfg)[0].state_dict()


def scaler_state(workdir):
    return states(workdir)["precision_state"]["scaler"]


# --- choosing a precision ------------------------------------------------------------------------

def test_bad_precision_is_a_one_line_error(image_folder, tmp_path, capsys):
    base = ["--data", str(image_folder), "--workdir", str(tmp_path), "--device", "cpu", "--image-size", "8"]
    assert main(["train", *base, "--precision", "fp64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.precision must be fp32, bf16, fp16 or auto, got 'fp64'" in err
    assert main(["train", *base, "--precision", "fp16", "--bf16", "true"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give only --precision" in err
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "--ckpt", "c.pt", "--precision", "half"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "--precision: invalid choice: 'half'" in err
    assert main(["sample", "--ckpt", "c.pt", "--precision", "fp16", "--bf16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--bf16 is the same as --precision bf16" in err
    with pytest.raises(DdpmError, match="--precision must be one of fp32, bf16, fp16, auto"):
        precision.resolve("fp8", torch.device("cpu"))


def test_bf16_switch_and_old_checkpoints_become_precision_bf16():
    # A config stored before train.precision existed, with the older switch on.
    stored = new_run_config().to_dict()
    del stored["train"]["precision"]
    stored["train"]["bf16"] = True
    cfg = validate(from_dict(stored))
    assert (cfg.train.precision, cfg.train.bf16) == ("bf16", False)
    # The migrated config can be switched back, as a resumed run's --precision fp32 does.
    cfg.train.precision = "fp32"
    assert validate(cfg).train.precision == "fp32"
    assert validate(Config()).train.precision == "fp32"  # the default stays fp32


def test_new_runs_and_ddpm_sample_default_to_auto_and_bf16_false_still_means_fp32(tmp_path):
    from ddpmkit.cli import _precision_arg, build_parser, train_overrides

    def train_precision(*flags):
        args = build_parser().parse_args(["train", "--workdir", str(tmp_path), *flags])
        return prepare(train_overrides(args), fresh=True)[0].train.precision

    assert train_precision() == "auto"
    assert train_precision("--bf16", "false") == "fp32" and train_precision("--bf16", "true") == "bf16"
    assert train_precision("--set", "train.bf16=false") == "fp32"
    assert train_precision("--bf16", "true", "--precision", "bf16") == "bf16"
    assert train_precision("--precision", "fp16") == "fp16"
    for argv, meant in ((["sample", "--ckpt", "c.pt"], "auto"), (["sample", "--ckpt", "c.pt", "--precision", "fp32"],
                        False), (["eval", "--ckpt", "c.pt", "--ref", "r"], False), (["sample", "--ckpt", "c.pt", "--bf16"], True)):
        args = build_parser().parse_args(argv)
        _precision_arg(args)
        assert args.bf16 == meant, argv  # what the samplers take: False fp32, True bf16, or a name
    # A run stored before `auto` became the new-run default keeps its precision when it resumes.
    stored = Config().to_dict()
    del stored["train"]["precision"]
    assert validate(from_dict(stored)).train.precision == "fp32"


def test_auto_picks_bf16_only_where_it_is_native(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    assert precision.resolve("auto", cpu) == "bf16"
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert precision.resolve("auto", cpu) == "bf16"
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert precision.resolve("auto", cpu) == "fp32"
    assert precision.resolve("auto", torch.device("mps")) == "fp32"
    assert precision.resolve(True, cpu) == "bf16" and precision.resolve(False, cpu) == "fp32"


def test_emulated_bf16_warns_once_in_one_line(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(precision, "_warned", set())
    lines = []
    for _ in range(3):
        assert precision.resolve("bf16", torch.device("cpu"), lines.append) == "bf16"
    assert len(lines) == 1 and "\n" not in lines[0] and "emulated and 6-13x slower" in lines[0]
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.setattr(precision, "_warned", set())
    precision.resolve("bf16", torch.device("cpu"), lines.append)
    assert len(lines) == 1  # native: no warning


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_sampling_precision_runs_the_network_in_that_dtype(name):
    cfg = Config()
    cfg.model = preset("tiny")
    cfg.data.image_size, cfg.data.channels, cfg.diffusion.timesteps = 8, 3, 20
    torch.manual_seed(0)
    model, diffusion = model_from_config(cfg)
    seen = []
    model.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    ref = diffusion.generate(model, 2, sampler="ddim", steps=3, seed=0, progress=False)
    low = diffusion.generate(model, 2, sampler="ddim", steps=3, seed=0, progress=False, bf16=name)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[name]
    assert seen[0] == torch.float32 and set(seen[3:]) == {dtype}
    assert low.dtype == torch.float32 and torch.isfinite(low).all() and (ref - low).abs().mean() < 0.05


# --- fp16 loss scaling in the trainer -------------------------------------------------------------

def test_fp16_overflow_is_skipped_counted_and_leaves_weights_and_ema_untouched(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "INIT_SCALE", 2.0 ** 60)  # scaled gradients overflow fp16 at once
    ov = fp16(image_folder, tmp_path, epochs=1, max_nonfinite_steps=2)
    summary = run(ov)  # 3 overflowing steps, more than max_nonfinite_steps: the guard must not trip
    ckpt = states(tmp_path)
    assert summary["status"] == "finished" and summary["fp16_overflow_skipped"] == 3
    assert summary["nonfinite_skipped"] == 0 and ckpt["global_step"] == 0 and ckpt["nonfinite_skipped"] == 0
    assert ckpt["precision_state"]["overflows"] == 3
    assert ckpt["precision_state"]["scaler"]["scale"] == 2.0 ** 57  # halved once per overflow (back-off)
    assert not ckpt["optimizer_state_dict"]["state"]  # AdamW never stepped
    start = initial_model(ov)
    for key in ("model_state_dict", "ema_state_dict"):
        assert all(torch.equal(ckpt[key][k], start[k]) for k in start), key


def test_fp16_scale_grows_after_growth_interval_good_steps(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "INIT_SCALE", 2.0 ** 4)
    monkeypatch.setattr(precision, "GROWTH_INTERVAL", 2)
    summary = run(fp16(image_folder, tmp_path, epochs=2))  # 6 good steps: 3 doublings
    assert summary["step"] == 6 and summary["fp16_overflow_skipped"] == 0
    scaler = scaler_state(tmp_path)
    assert scaler["scale"] == 2.0 ** 7 and scaler["_growth_tracker"] == 0 and scaler["growth_interval"] == 2


def test_fp16_unscales_before_clipping(image_folder, tmp_path, monkeypatch):
    """Clipping sees the true gradient norm, whatever the loss scale: fp16 at two scales and fp32 agree."""
    real_clip = torch.nn.utils.clip_grad_norm_
    norms = []

    def recording(params, max_norm, *a, **k):
        norms.append(float(real_clip(params, max_norm, *a, **k)))
        return torch.tensor(norms[-1])

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    run(overrides(image_folder, tmp_path / "fp32", epochs=1, grad_clip=0.01))
    for scale in (2.0 ** 4, 2.0 ** 14):
        monkeypatch.setattr(precision, "INIT_SCALE", scale)
        run(fp16(image_folder, tmp_path / f"fp16_{scale:g}", epochs=1, grad_clip=0.01))
    first = norms[0::3]  # the first step of each run starts from the same weights and batch
    assert len(norms) == 9 and first[0] > 0.01  # clipping is active
    assert first[1] == pytest.approx(first[0], rel=0.02) and first[2] == pytest.approx(first[0], rel=0.02)


def test_fp16_nonfinite_loss_still_trips_the_guard(image_folder, tmp_path, monkeypatch):
    real_call = losses.VPLoss.__call__
    monkeypatch.setattr(losses.VPLoss, "__call__", lambda self, *a: real_call(self, *a) * float("nan"))
    with pytest.raises(DdpmError, match="3 non-finite steps in a row"):
        run(fp16(image_folder, tmp_path, epochs=2, max_nonfinite_steps=3))


def test_fp16_persistent_overflow_with_a_collapsing_scale_stops_the_run(image_folder, tmp_path, monkeypatch):
    """A finite loss whose gradients overflow fp16 at any scale: the scale halves each step until it
    falls below 1, then the run stops with a message (before the non-finite guard would)."""
    monkeypatch.setattr(precision, "INIT_SCALE", 2.0 ** 3)
    real_call = losses.VPLoss.__call__
    monkeypatch.setattr(losses.VPLoss, "__call__", lambda self, *a: real_call(self, *a) * 1e30)
    with pytest.raises(DdpmError, match=r"loss scale fell to 0\.5 \(below 1\) after 4 skipped steps.*"
                                        r"--precision bf16 or fp32"):
        run(fp16(image_folder, tmp_path, epochs=3, max_nonfinite_steps=2))


def test_fp16_stop_mid_epoch_then_resume_is_bit_identical(image_folder, tmp_path, monkeypatch):
    # A scale that grows during the run, so a resume that lost the scaler's state would differ.
    monkeypatch.setattr(precision, "INIT_SCALE", 2.0 ** 4)
    monkeypatch.setattr(precision, "GROWTH_INTERVAL", 2)
    run(fp16(image_folder, tmp_path / "straight", epochs=2))
    calls = {"n": 0}
    real_call = losses.VPLoss.__call__

    def interrupting(self, net, x0, draws=None):
        calls["n"] += 1
        if calls["n"] == 5:  # during epoch 1's second step (3 steps per epoch)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_call(self, net, x0, draws)

    monkeypatch.setattr(losses.VPLoss, "__call__", interrupting)
    ov = fp16(image_folder, tmp_path / "resumed", epochs=2)
    assert run(ov)["status"] == "stopped"
    mid = states(tmp_path / "resumed")
    assert (mid["next_epoch"], mid["batch_in_epoch"], mid["global_step"]) == (1, 2, 5)
    assert mid["precision_state"]["scaler"]["_growth_tracker"] == 1
    monkeypatch.setattr(losses.VPLoss, "__call__", real_call)
    assert run(ov)["status"] == "finished"
    a, b = states(tmp_path / "straight"), states(tmp_path / "resumed")
    assert_same_training_state(a, b)
    assert a["precision_state"] == b["precision_state"] and a["precision_state"]["scaler"]["scale"] == 2.0 ** 7


def test_switching_precision_on_resume(image_folder, tmp_path):
    """An fp16 checkpoint resumes in fp32 (its scaler state unused) and an old bf16 one in fp16."""
    run(fp16(image_folder, tmp_path, epochs=1))
    summary = run(overrides(image_folder, tmp_path, epochs=2, precision="fp32"))
    ckpt = states(tmp_path)
    assert summary["step"] == 6 and ckpt["config"]["train"]["precision"] == "fp32"
    assert ckpt["precision_state"]["scaler"] is None
    ckpt["config"]["train"].pop("precision")  # as written before train.precision existed
    ckpt["config"]["train"]["bf16"] = True
    checkpoint.atomic_save(ckpt, tmp_path / "models" / "r" / "ckpt.pt")
    cfg, _ = prepare(overrides(image_folder, tmp_path, epochs=3))
    assert cfg.train.precision == "bf16"
    cfg, _ = prepare(fp16(image_folder, tmp_path, epochs=3))
    assert cfg.train.precision == "fp16"


@pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_fp16_and_bf16_train_on_the_test_device(image_folder, tmp_path, monkeypatch, name):
    """On DDPMKIT_TEST_DEVICE (the CPU here, the GPU in gpu_check.sh): the network runs in the
    precision's dtype, the run trains, and a resume carries the loss scale on."""
    seen = set()
    real_call = losses.VPLoss.__call__

    def spying(self, net, x0, draws=None):
        def recording(*args):
            out = net(*args)
            seen.add(out.dtype)
            return out
        return real_call(self, recording, x0, draws)

    monkeypatch.setattr(losses.VPLoss, "__call__", spying)
    monkeypatch.setattr(precision, "GROWTH_INTERVAL", 2)
    ov = overrides(image_folder, tmp_path, epochs=1, precision=name, device=DEVICE)
    assert run(ov)["step"] == 3
    first = states(tmp_path)["precision_state"]
    ov["train"]["epochs"] = 2
    summary = run(ov)
    last = states(tmp_path)["precision_state"]
    assert summary["step"] == 6 and summary["nonfinite_skipped"] == 0
    assert seen == {torch.float16 if name == "fp16" else torch.bfloat16}
    if name == "fp16" and last["overflows"] == 0:  # 2**16, doubled after steps 2, 4 and 6
        assert (first["scaler"]["scale"], last["scaler"]["scale"]) == (2.0 ** 17, 2.0 ** 19)
    elif name == "fp16":  # an overflow (possible on a GPU) halved the scale and restarted the growth count
        assert last["scaler"]["scale"] < 2.0 ** 19
    else:
        assert first["scaler"] is None and last["scaler"] is None


def test_ddp_fp16_overflows_are_skipped_alike_on_every_rank(image_folder, tmp_path):
    """Two gloo processes (as torchrun starts them) with a scale that overflows: every rank skips
    the same steps and backs off the same scale (a rank that decided otherwise would hang or diverge)."""
    from test_ddp import finish, start

    code = ("import sys, ddpmkit.precision as p; p.INIT_SCALE = 2.0 ** 60; from ddpmkit.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    argv = ["train", "--data", str(image_folder), "--workdir", str(tmp_path), "--run-name", "r", "--image-size", "8",
            "--set", "model.size=custom", "--set", "model.base_channels=8", "--set", "model.channel_mults=1,2",
            "--set", "model.attn_levels=1", "--set", "model.time_dim=16", "--timesteps", "50", "--batch-size", "4",
            "--epochs", "1", "--device", "cpu", "--precision", "fp16", "--sample-every", "0", "--logger", "none",
            "--no-progress"]
    ranks = finish(start(argv, tmp_path, 2, module=("-c", code)))
    for rc, out, err in ranks:
        assert rc == 0, err[-3000:]
    assert ranks[0][1].count("fp16 gradient overflow") == 3 and "overflow" not in ranks[1][1]
    ckpt = states(tmp_path)
    assert ckpt["global_step"] == 0 and ckpt["world_size"] == 2 and ckpt["nonfinite_skipped"] == 0
    assert ckpt["precision_state"]["overflows"] == 3 and ckpt["precision_state"]["scaler"]["scale"] == 2.0 ** 57
