"""`ddpm prune` (Torch-Pruning) and `ddpm quantize` (ONNX Runtime int8): needs the [compress] extra."""
import io

import pytest
import torch

pytest.importorskip("torch_pruning", reason="the [compress] extra is not installed (pip install -e .[compress])")
pytest.importorskip("onnxruntime", reason="the [compress] extra is not installed (pip install -e .[compress])")

import ddpmkit.train as train_module  # noqa: E402
from ddpmkit.checkpoint import model_from_config  # noqa: E402
from ddpmkit.cli import main  # noqa: E402
from ddpmkit.compress import prune as P  # noqa: E402
from ddpmkit.compress import quantize as Q  # noqa: E402
from ddpmkit.config import Config, ModelConfig  # noqa: E402
from ddpmkit.errors import DdpmError  # noqa: E402
from ddpmkit.loading import load_model  # noqa: E402
from ddpmkit.models import build_model, widths  # noqa: E402
from ddpmkit.train import prepare, train  # noqa: E402

ADM = {"size": "custom", "arch": "adm", "base_channels": 8, "channel_mults": [1, 2], "attn_levels": [1],
       "num_heads": 2, "num_res_blocks": 1, "time_dim": 16}
UNET = {"size": "custom", "arch": "unet", "base_channels": 8, "channel_mults": [1, 2], "attn_levels": [1],
        "num_heads": 2, "time_dim": 16}
QUIET = dict(progress=False, log=lambda *a: None)


def _random_model(model_cfg: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in model_cfg.items()})
    model = build_model(cfg, 1)
    for p in model.parameters():  # non-zero everywhere (ADM zero-initializes its last convs)
        torch.nn.init.normal_(p, std=0.2)
    return model, cfg


def _pruned(model_cfg: dict, ratio: float):
    model, cfg = _random_model(model_cfg)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 5, 10, 19])
    model(x, t).pow(2).mean().backward()
    P.prune_model(model, (x[:2], t[:2]), ratio)
    return model, cfg, (x, t)


@pytest.mark.parametrize("arch", ["adm", "unet"])
def test_pruning_removes_the_share_of_channels_and_keeps_the_output_shape(arch, one_torch_thread):
    spec = ADM if arch == "adm" else UNET
    before = P.channel_count(_random_model(spec)[0])
    model, cfg, (x, t) = _pruned(spec, 0.5)
    share = 1 - P.channel_count(model) / before
    # ADM: exactly half of every prunable layer. The seed UNet's residual blocks over a skip
    # concatenation tie several streams together, so its layers lose unequal shares; the total is ~R.
    assert share == 0.5 if arch == "adm" else abs(share - 0.5) < 0.05
    assert model(x, t).shape == x.shape
    attn = [m for m in model.modules() if hasattr(m, "qkv")]
    assert attn and all(m.qkv.weight.shape[0] == 3 * 16 for m in attn)  # heads whole: inner width as trained
    assert P.output_layer(model).out_channels == 1


@pytest.mark.parametrize("arch", ["adm", "unet"])
def test_pruned_model_rebuilds_from_its_config_and_reloads_bit_identically(arch, one_torch_thread):
    model, cfg, (x, t) = _pruned(ADM if arch == "adm" else UNET, 0.3)
    cfg.pruned = widths.record(model, build_model(ModelConfig(**{**cfg.__dict__, "pruned": ()}), 1))
    assert cfg.pruned
    buf = io.BytesIO()
    torch.save({"config": Config(model=cfg).to_dict(), "state": model.state_dict()}, buf)
    buf.seek(0)
    stored = torch.load(buf, weights_only=True)
    again = build_model(ModelConfig(**{**cfg.__dict__, "pruned": tuple(stored["config"]["model"]["pruned"])}), 1)
    again.load_state_dict(stored["state"])
    model.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(model(x, t), again(x, t))


def _teacher(image_folder, tmp_path, monkeypatch, spec=ADM):
    monkeypatch.setattr(train_module, "DRAW_CURVES", False)
    t = {"workdir": str(tmp_path), "run_name": "teacher", "epochs": 1, "batch_size": 8, "sample_every_epochs": 0,
         "device": "cpu"}
    cfg, ckpt = prepare({"data": {"path": str(image_folder), "image_size": 8, "channels": 1}, "model": spec,
                         "diffusion": {"timesteps": 20}, "train": t})
    train(cfg, ckpt, **QUIET)
    return str(tmp_path / "models" / "teacher" / "ckpt.pt")


def test_prune_command_fine_tunes_resumes_exactly_and_loads(image_folder, tmp_path, monkeypatch, one_torch_thread):
    teacher = _teacher(image_folder, tmp_path, monkeypatch)
    straight = P.prune(teacher, 0.5, "straight", finetune_images=48, workdir=str(tmp_path), **QUIET)
    P.prune(teacher, 0.5, "stopped", finetune_images=24, workdir=str(tmp_path), **QUIET)   # one epoch ...
    resumed = P.prune(teacher, 0.5, "stopped", finetune_images=48, workdir=str(tmp_path), **QUIET)  # ... then two
    assert straight["step"] == resumed["step"] == 6
    a = torch.load(tmp_path / "models" / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "models" / "stopped" / "ckpt.pt", weights_only=True)
    for key in ("model_state_dict", "ema_state_dict"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert a["config"]["model"]["pruned"] and a["task_state"]["ratio"] == 0.5
    teacher_lr = torch.load(teacher, weights_only=True)["config"]["train"]["lr"]
    assert a["config"]["train"]["lr"] == pytest.approx(P.FINETUNE_LR_SHARE * teacher_lr)  # the default fine-tune LR
    model, diffusion, cfg = load_model(tmp_path / "models" / "straight" / "ckpt.pt")
    assert sum(p.numel() for p in model.parameters()) < sum(
        p.numel() for p in model_from_config(Config(model=ModelConfig(**{**cfg.model.__dict__, "pruned": ()}),
                                                    data=cfg.data))[0].parameters())
    assert diffusion.generate(model, 2, sampler="ddim", steps=3, seed=0, progress=False).shape == (2, 1, 8, 8)
    assert main(["export", "--ckpt", str(tmp_path / "models" / "straight" / "ckpt.pt"),
                 "--out", str(tmp_path / "exp")]) == 0
    assert load_model(tmp_path / "exp")[2].model.pruned == cfg.model.pruned


def test_quantized_outputs_stay_close_to_fp32_on_calibration_inputs(tmp_path, one_torch_thread):
    model, cfg = _random_model(ADM)
    model.eval()
    diffusion = model_from_config(Config(model=cfg, data=Config().data.__class__(image_size=8, channels=1)))[1]
    calib = Q.collect_calibration(model, diffusion, 40)
    assert len(calib) == 40
    assert len({round(float(t), 3) for _, t in calib}) == Q.CALIB_STEPS  # every sampler step contributes
    Q.quantize_model(model, calib, tmp_path / "m.onnx")
    net = Q.QuantizedNet(tmp_path / "m.onnx", threads=1)
    x, t = torch.cat([c[0] for c in calib]), torch.cat([c[1] for c in calib])
    with torch.no_grad():
        ref = model(x, t)
    err = (net(x, t) - ref).abs().mean() / ref.abs().mean()
    assert err < 0.10  # stated tolerance: mean |int8 - fp32| below 10% of mean |fp32| on calibration inputs


def test_quantization_without_calibration_is_refused(tmp_path):
    model, _ = _random_model(ADM)
    with pytest.raises(DdpmError, match="calibration collected no"):
        Q.quantize_model(model, [], tmp_path / "m.onnx")


def test_quantize_command_output_samples_through_load_model(image_folder, tmp_path, monkeypatch, one_torch_thread):
    teacher = _teacher(image_folder, tmp_path, monkeypatch)
    assert main(["quantize", "--ckpt", teacher, "--out", str(tmp_path / "q"), "--calib-n", "20"]) == 0
    model, diffusion, cfg = load_model(tmp_path / "q")
    assert isinstance(model, Q.QuantizedNet)
    assert diffusion.generate(model, 2, sampler="ddim", steps=3, seed=0, progress=False).shape == (2, 1, 8, 8)
    assert main(["prune", "--ckpt", str(tmp_path / "q"), "--ratio", "0.5", "--run-name", "x"]) == 2
    assert main(["quantize", "--ckpt", teacher, "--out", str(tmp_path / "f"), "--backend", "onnxruntime-fp32"]) == 0
    assert isinstance(load_model(tmp_path / "f")[0], Q.QuantizedNet)


def test_the_fp32_onnx_graph_computes_the_same_function(tmp_path, one_torch_thread):
    model, _ = _random_model(ADM)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.0, 7.5, 19.0])
    Q._export(model.eval(), (x[:2], t[:2]), tmp_path / "f.onnx")
    with torch.no_grad():
        ref = model(x, t)
    assert ref.abs().mean() > 0.1 and torch.allclose(Q.QuantizedNet(tmp_path / "f.onnx", 1)(x, t), ref, atol=1e-4)


@pytest.mark.parametrize("argv, message", [
    (["--ratio", "0"], "--ratio must lie strictly between 0 and 1"),
    (["--ratio", "1"], "--ratio must lie strictly between 0 and 1"),
    (["--ratio", "-0.2"], "--ratio must lie strictly between 0 and 1"),
    (["--ratio", "0.5", "--ckpt", "missing.pt"], "not found"),
    (["--ratio", "0.5", "--ckpt", "model.onnx"], "is a quantized model"),
])
def test_bad_prune_input_is_a_one_line_error(argv, message, tmp_path, capsys):
    args = ["prune", "--run-name", "x", "--workdir", str(tmp_path)] + argv
    if "--ckpt" not in argv:
        args += ["--ckpt", "missing.pt"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_quantize_of_a_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    assert main(["quantize", "--ckpt", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not found" in err and len(err.splitlines()) == 1


def test_a_missing_extra_is_a_one_line_error_naming_the_install(monkeypatch):
    import importlib

    from ddpmkit.compress import require

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "torch_pruning":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(DdpmError, match=r"pip install -e \.\[compress\]"):
        require("torch_pruning", "ddpm prune")


def test_prune_fine_tune_starts_from_the_pruned_teacher_weights(image_folder, tmp_path, monkeypatch,
                                                               one_torch_thread):
    teacher = _teacher(image_folder, tmp_path, monkeypatch)
    ckpt = P.load_checkpoint(teacher)
    cfg = P.config_of(ckpt, teacher)
    data = P.PruneTask(None, 0.5, teacher).data(cfg, lambda *a: None)
    _, expected = P._pruned(cfg, ckpt, teacher, 0.5, data, lambda *a: None)
    # A fine-tune at a vanishing learning rate must end where it started: the teacher's pruned weights.
    P.prune(teacher, 0.5, "frozen", finetune_images=8, lr=1e-12, workdir=str(tmp_path), **QUIET)
    got = torch.load(tmp_path / "models" / "frozen" / "ckpt.pt", weights_only=True)["model_state_dict"]
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.allclose(got[k], expected[k], atol=1e-6), k
