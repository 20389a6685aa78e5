"""--compile and --channels-last: torch.compile of the network and NHWC memory format, with unchanged checkpoints."""
import pytest
import torch
from test_train import SMALL_MODEL, assert_same_training_state, overrides, run, states

import ddpmkit.train as train_module
from ddpmkit import load_model, precision
from ddpmkit.checkpoint import load_state, model_from_config, training_checkpoint
from ddpmkit.cli import main
from ddpmkit.config import Config, from_dict
from ddpmkit.train import EMA, TrainState

# torch.compile's first use imports modules that call the deprecated torch.jit.script_method (torch's own warning)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
needs_compiler = pytest.mark.skipif(precision.compile_unavailable(torch.device("cpu")) is not None,
                                    reason="torch.compile cannot run on this CPU (no C++ compiler)")


@pytest.fixture(autouse=True)
def no_curves(monkeypatch):
    monkeypatch.setattr(train_module, "DRAW_CURVES", False)


def small_model():
    cfg = from_dict({"model": SMALL_MODEL, "data": {"image_size": 8, "channels": 3}, "diffusion": {"timesteps": 50}})
    torch.manual_seed(0)
    return model_from_config(cfg)[0]


def test_compile_unavailable_is_a_one_line_error(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(precision, "_cpp_compiler", lambda: None)
    base = ["--data", str(image_folder), "--workdir", str(tmp_path), "--device", "cpu", "--image-size", "8",
            "--epochs", "1", "--no-progress"]
    assert main(["train", *base, "--compile"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--compile is not available: compiling for the CPU needs a C++ compiler" in err
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").rglob("ckpt.pt"))


def test_checkpoints_have_no_compile_prefix_and_load_either_way():
    """torch.compile's wrapper prefixes every state_dict key with `_orig_mod.`; checkpoints never
    store it, and weights with or without it load into plain and compiled models alike."""
    model = small_model()
    compiled = torch.compile(model)  # lazy: nothing is compiled until it is called
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    state = TrainState(compiled, EMA(model, 0.9), opt, sched)
    cfg = Config()
    ckpt = training_checkpoint(state, cfg, 1, 24, torch.device("cpu"))
    assert set(ckpt["model_state_dict"]) == set(model.state_dict()) == set(ckpt["ema_state_dict"])
    for source in (compiled.state_dict(), model.state_dict()):
        for target in (small_model(), torch.compile(small_model())):
            with torch.no_grad():
                for p in target.parameters():
                    p.zero_()
            load_state(target, source, "x.pt")
            assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), model.state_dict().values()))


def test_compile_reaches_the_trainer_sample_and_eval(image_folder, tmp_path, monkeypatch, capsys):
    """--compile wraps the network the trainer steps and the samplers call (a recording stand-in
    for torch.compile here; the slow tests below compile for real)."""
    wrapped = []

    class Recorded(torch.nn.Module):  # what compile_network returns: a wrapper sharing the parameters
        def __init__(self, net):
            super().__init__()
            self._orig_mod = net
            self.calls = 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self._orig_mod(*args, **kwargs)

    def fake_compile(net, device):
        wrapped.append(Recorded(net))
        return wrapped[-1]

    monkeypatch.setattr(train_module, "compile_network", fake_compile)
    monkeypatch.setattr(precision, "compile_network", fake_compile)
    run(overrides(image_folder, tmp_path, epochs=1, compile=True))
    assert len(wrapped) == 1 and wrapped[0].calls == 3  # every training step went through the wrapper
    ckpt = states(tmp_path)
    assert ckpt["config"]["train"]["compile"] and not [k for k in ckpt["model_state_dict"] if "_orig_mod" in k]
    path = str(tmp_path / "models" / "r" / "ckpt.pt")
    assert main(["sample", "--ckpt", path, "-n", "2", "--steps", "2", "--device", "cpu", "--no-progress",
                 "--out", str(tmp_path / "s.png"), "--compile"]) == 0
    assert len(wrapped) == 2 and wrapped[1].calls == 2
    assert main(["eval", "--ckpt", path, "--ref", str(image_folder), "-n", "4", "--steps", "2", "--device", "cpu",
                 "--extractor", "randconv", "--cache-dir", str(tmp_path / "cache"), "--no-progress",
                 "--compile"]) == 0
    assert len(wrapped) == 3 and wrapped[2].calls == 2


@needs_compiler
@pytest.mark.slow
def test_compiled_training_resumes_exactly_and_its_checkpoints_load_uncompiled(image_folder, tmp_path):
    """A compiled run resumed (compiled) equals an uninterrupted compiled run; a compiled run's
    checkpoint resumes uncompiled and samples through `load_model`, and an uncompiled one resumes compiled."""
    run(overrides(image_folder, tmp_path / "straight", epochs=2, compile=True))
    run(overrides(image_folder, tmp_path / "resumed", epochs=1, compile=True))
    assert run(overrides(image_folder, tmp_path / "resumed", epochs=2, compile=True))["step"] == 6
    assert_same_training_state(states(tmp_path / "straight"), states(tmp_path / "resumed"))
    ckpt = states(tmp_path / "straight")
    assert not [k for k in ckpt["model_state_dict"] if "_orig_mod" in k]
    # Either way across: the other mode resumes the checkpoint and trains on.
    assert run(overrides(image_folder, tmp_path / "straight", epochs=3))["step"] == 9
    assert run(overrides(image_folder, tmp_path / "straight", epochs=4, compile=True))["step"] == 12
    model, diffusion, cfg = load_model(tmp_path / "straight" / "models" / "r" / "ckpt.pt")
    assert cfg.train.compile and torch.isfinite(diffusion.generate(model, 2, steps=2, progress=False)).all()


@needs_compiler
@pytest.mark.slow
def test_sample_compile_matches_eager(image_folder, tmp_path, capsys):
    run(overrides(image_folder, tmp_path, epochs=1))
    ckpt = str(tmp_path / "models" / "r" / "ckpt.pt")
    outs = {}
    for flag in ([], ["--compile"]):
        out = tmp_path / f"s{len(flag)}"
        assert main(["sample", "--ckpt", ckpt, "-n", "2", "--steps", "3", "--device", "cpu", "--no-progress",
                     "--out-dir", str(out), *flag]) == 0
        outs[len(flag)] = sorted(out.iterdir())
    import numpy as np
    from PIL import Image
    for a, b in zip(outs[0], outs[1]):
        diff = np.abs(np.asarray(Image.open(a), dtype=int) - np.asarray(Image.open(b), dtype=int))
        assert diff.max() <= 2  # the same images up to the rounding of fused kernels


def test_channels_last_trains_resumes_exactly_and_loads_plainly(image_folder, tmp_path):
    run(overrides(image_folder, tmp_path / "straight", epochs=2, channels_last=True))
    run(overrides(image_folder, tmp_path / "resumed", epochs=1, channels_last=True))
    run(overrides(image_folder, tmp_path / "resumed", epochs=2, channels_last=True))
    a, b = states(tmp_path / "straight"), states(tmp_path / "resumed")
    assert_same_training_state(a, b)
    convs = [v for v in a["model_state_dict"].values() if v.ndim == 4 and v.shape[-1] > 1]
    assert convs and all(v.is_contiguous(memory_format=torch.channels_last) and not v.is_contiguous() for v in convs)
    model, diffusion, _ = load_model(tmp_path / "straight" / "models" / "r" / "ckpt.pt")  # a plain NCHW model
    assert torch.isfinite(diffusion.generate(model, 2, steps=2, progress=False)).all()
