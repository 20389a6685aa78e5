"""`ddpm prune` (Torch-Pruning) and `ddpm quantize` (ONNX Runtime int8): needs the [compress] extra."""
import dataclasses
import importlib
import io
import math
import os
import re
import shlex

import numpy as np
import pytest
import torch
from torch import nn


def _compress_extra(module: str):
    """Import a module of the [compress] extra. Missing, it skips this file -- except under CI (env CI set),
    which installs the extra: there it fails, so these tests cannot silently stop running."""
    try:
        return importlib.import_module(module)
    except ImportError:
        reason = f"the [compress] extra is not installed ({module} is missing; pip install -e .[compress])"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI installs it, so this is a failure", pytrace=False)
        pytest.skip(reason, allow_module_level=True)


_compress_extra("torch_pruning")
_compress_extra("onnxruntime")
onnx = _compress_extra("onnx")

import ddpmkit.train as train_module  # noqa: E402
from ddpmkit.checkpoint import model_from_config  # noqa: E402
from ddpmkit.cli import build_parser, main  # noqa: E402
from ddpmkit.compress import prune as P  # noqa: E402
from ddpmkit.compress import quantize as Q  # noqa: E402
from ddpmkit.config import Config, ModelConfig  # noqa: E402
from ddpmkit.data import ImageData  # noqa: E402
from ddpmkit.diffusion import Diffusion, target  # noqa: E402
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
    # A constant LR makes the fine-tune open-ended: one epoch, then a larger budget, is the two-epoch run.
    # (With the default cosine a larger budget stretches the schedule: tests/test_prune.py.)
    kw = dict(workdir=str(tmp_path), lr_schedule="constant", **QUIET)
    straight = P.prune(teacher, 0.5, "straight", finetune_images=48, **kw)
    P.prune(teacher, 0.5, "stopped", finetune_images=24, **kw)   # one epoch ...
    resumed = P.prune(teacher, 0.5, "stopped", finetune_images=48, **kw)  # ... then two
    assert straight["step"] == resumed["step"] == 6
    a = torch.load(tmp_path / "models" / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "models" / "stopped" / "ckpt.pt", weights_only=True)
    for key in ("model_state_dict", "ema_state_dict"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    state = a["task_state"]
    assert a["config"]["model"]["pruned"] and state == b["task_state"]
    assert {k: state[k] for k in ("method", "ratio", "ratio_of", "teacher", "distill_weight")} == {
        "method": "prune", "ratio": 0.5, "ratio_of": "params", "teacher": teacher,
        "distill_weight": P.DEFAULT_DISTILL_WEIGHT}
    assert abs(state["params_removed"] - 0.5) < 0.1 and 0 < state["channel_ratio"] < 0.5  # 8-channel layers: coarse
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


@pytest.fixture(scope="module")
def int8_adm(tmp_path_factory):
    """(fp32 model, calibration pairs, int8 model.onnx) of the small random ADM, built once for the tests below."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, cfg = _random_model(ADM)
        model.eval()
        diffusion = model_from_config(Config(model=cfg, data=Config().data.__class__(image_size=8, channels=1)))[1]
        calib = Q.collect_calibration(model, diffusion, 40)
        path = Q.quantize_model(model, calib, tmp_path_factory.mktemp("int8") / "m.onnx")
    finally:
        torch.set_num_threads(threads)
    return model, calib, path


def test_quantized_outputs_stay_close_to_fp32_on_calibration_inputs(int8_adm, one_torch_thread):
    model, calib, path = int8_adm
    assert len(calib) == 40
    assert len({round(float(t), 3) for _, t in calib}) == Q.CALIB_STEPS  # every sampler step contributes
    net = Q.QuantizedNet(path, threads=1)
    x, t = torch.cat([c[0] for c in calib]), torch.cat([c[1] for c in calib])
    with torch.no_grad():
        ref = model(x, t)
    err = (net(x, t) - ref).abs().mean() / ref.abs().mean()
    assert err < 0.10  # stated tolerance: mean |int8 - fp32| below 10% of mean |fp32| on calibration inputs


def _qdq_layout(path) -> dict:
    """For each Conv/MatMul/Gemm node of an ONNX graph: its op, whether each input is made by a
    DequantizeLinear, the ops reading its output, and the element type of the initializer behind its
    weight (through a DequantizeLinear for a quantized weight; None for MatMul of two activations)."""
    graph = onnx.load(str(path)).graph
    made_by = {out: node for node in graph.node for out in node.output}
    read_by: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            read_by.setdefault(name, []).append(node.op_type)
    inits = {init.name: init.data_type for init in graph.initializer}
    layout = {}
    for node in graph.node:
        if node.op_type not in Q.QUANT_OPS:
            continue
        dq = [name in made_by and made_by[name].op_type == "DequantizeLinear" for name in node.input]
        weight = node.input[1]
        if weight in made_by and made_by[weight].op_type == "DequantizeLinear":
            weight = made_by[weight].input[0]
        layout[node.name] = (node.op_type, dq, read_by.get(node.output[0], []), inits.get(weight))
    return layout


def test_int8_graph_has_qdq_on_its_quantized_layers_and_none_on_the_fp32_ones(int8_adm):
    layout = _qdq_layout(int8_adm[2])
    fp32 = {name for name in layout if any(part in name for part in Q.FP32_NAMES)}
    int8 = set(layout) - fp32
    # The layers kept in fp32 by design: input conv, output conv, time MLP and every block's time projection.
    assert {part for part in Q.FP32_NAMES for name in fp32 if part in name} >= {
        "/conv_in/", "/out/", "/time_mlp/", "/emb/"}
    assert sum(layout[name][0] == "Conv" for name in int8) >= 25  # 31 of the small ADM's 33 convs
    for name in int8:
        op, dq, readers, weight = layout[name]
        assert all(dq), f"{name}: an input does not come through DequantizeLinear"
        assert readers and all(r == "QuantizeLinear" for r in readers), f"{name}: output not re-quantized"
        if op == "Conv":
            assert weight == onnx.TensorProto.INT8, f"{name}: weight is not stored as int8"
    for name in fp32:
        op, dq, readers, weight = layout[name]
        assert not any(dq) and "QuantizeLinear" not in readers, f"{name} is quantized, but is on the fp32 list"
        assert weight == onnx.TensorProto.FLOAT, f"{name}: weight is not fp32"


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
    assert any(all(dq) for _, dq, _, _ in _qdq_layout(tmp_path / "q" / Q.ONNX).values())  # the default is int8
    ops = {node.op_type for node in onnx.load(str(tmp_path / "f" / Q.ONNX)).graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear"}  # ... and onnxruntime-fp32 is not


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
                                                               one_torch_thread, capsys):
    teacher = _teacher(image_folder, tmp_path, monkeypatch)
    ckpt = P.load_checkpoint(teacher)
    cfg = P.config_of(ckpt, teacher)
    data = P.Task().data(cfg, lambda *a: None)
    _, expected, result = P._pruned(cfg, ckpt, teacher, 0.5, data, lambda *a: None, "channels")
    assert 1 - P.channel_count(result.model) / P.channel_count(model_from_config(cfg)[0]) == 0.5  # ADM: exactly half
    # A fine-tune at a vanishing learning rate must end where it started: the teacher's pruned weights.
    capsys.readouterr()
    lines = []
    P.prune(teacher, 0.5, "frozen", finetune_images=8, lr=1e-12, workdir=str(tmp_path), progress=False,
            log=lines.append, ratio_of="channels")
    # Its log names the shares removed, and the fine-tune logs to the same callable: nothing reaches stdout.
    found = [m.group(1) for m in map(re.compile(r"removed (\d+\.\d)% of parameters.* at channel ratio 0\.500").search,
                                     lines) if m]
    assert found == [f"{100 * result.removed('params'):.1f}"] and len(lines) > 1 and capsys.readouterr().out == ""
    got = torch.load(tmp_path / "models" / "frozen" / "ckpt.pt", weights_only=True)["model_state_dict"]
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.allclose(got[k], expected[k], atol=1e-6), k


# --- Diff-Pruning's importance: the eps error over the levels its threshold keeps ---------------------

MU, STD = 0.2, 0.8  # Gaussian data N(MU, STD^2) per pixel; STD puts every threshold crossing >= 13% from 5%


def _gaussian_batch() -> torch.Tensor:
    return MU + STD * torch.randn(P.TAYLOR_BATCH, 1, 8, 8, generator=torch.Generator().manual_seed(1234))


class GaussianVP(nn.Module):
    """The Bayes-optimal network for data N(MU, STD^2 I) on a VP schedule, predicting eps, x0 or v: with
    x_t = a x0 + s eps and D = (x_t - a m) / (a^2 STD^2 + s^2), E[eps | x_t] = s D and
    E[x0 | x_t] = m + STD^2 a D (Gaussian conditioning), at m = MU and gain k = 1. The parameters k and m
    (eps_hat = k s D) give it gradients; the dropout on its input is only active in train mode."""

    def __init__(self, alpha_bar: torch.Tensor, prediction: str, gain: float = 1.0, mean: float = MU):
        super().__init__()
        self.register_buffer("ab", alpha_bar.float())
        self.prediction, self.drop = prediction, nn.Dropout(0.5)
        self.gain, self.mean = nn.Parameter(torch.tensor(gain)), nn.Parameter(torch.tensor(mean))

    def forward(self, x, t):
        ab = self.ab[t.long()].view(-1, 1, 1, 1)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        d = (self.drop(x) - a * self.mean) / (ab * STD**2 + 1 - ab)
        eps = self.gain * s * d
        return target(self.prediction, (x - s * eps) / a, eps, a, s)


class GaussianEDM(nn.Module):
    """F of EDM's D = c_skip x + c_out F(c_in x, c_noise) (Karras et al. 2022, Table 1) for data N(MU, STD^2 I):
    the Bayes-optimal D(x, sigma) = MU + STD^2 / (STD^2 + sigma^2) (x - MU), solved for F."""

    def __init__(self, sigma_data: float):
        super().__init__()
        self.sd, self.mean = sigma_data, nn.Parameter(torch.tensor(MU))

    def forward(self, y, c_noise):
        sigma = torch.exp(c_noise / 250).view(-1, 1, 1, 1)  # c_noise = 250 ln sigma (diffusion.EDMDenoiser)
        norm = (sigma**2 + self.sd**2).sqrt()
        x = y * norm
        d = self.mean + STD**2 / (STD**2 + sigma**2) * (x - self.mean)
        return (d - self.sd**2 / norm**2 * x) / (sigma * self.sd / norm)


def _kept(errors: list[float]) -> int:
    """How many levels Diff-Pruning's threshold keeps: up to the first L_t < 5% of the largest before it."""
    return next((i for i in range(1, len(errors)) if errors[i] < P.TAYLOR_THRESHOLD * max(errors[:i])), len(errors))


@pytest.mark.parametrize("schedule, expected", [("linear", 10), ("cosine", 16)])
def test_diff_pruning_keeps_the_same_levels_for_an_eps_a_v_and_an_x0_teacher(schedule, expected):
    # Three Bayes-optimal teachers of the same data make the same noise prediction, so the criterion
    # (the eps error, Diff-Pruning) must see the same L_t and keep the same levels. Their training
    # losses differ (x0 and v weight the noisy levels up): on those, v and x0 kept all 20 levels.
    x0 = _gaussian_batch()
    runs = {}
    for prediction in ("eps", "v", "x0"):
        d = Diffusion(img_size=8, channels=1, schedule=schedule, prediction=prediction)
        runs[prediction] = P.accumulate_taylor_grads(GaussianVP(d.alpha_bar64, prediction), d, x0, seed=0)
    # The exact L_t of these teachers: Var(eps | x_t) = a^2 STD^2 / (a^2 STD^2 + s^2) per pixel.
    ab = [float(d.alpha_bar64[P.noise_level(d, level)]) for level in range(P.TAYLOR_LEVELS)]
    assert _kept([a * STD**2 / (a * STD**2 + 1 - a) for a in ab]) == expected
    assert {p: len(losses) for p, losses in runs.items()} == {"eps": expected, "v": expected, "x0": expected}
    for losses in runs.values():
        assert losses == pytest.approx(runs["eps"], rel=1e-4)


def test_diff_pruning_threshold_drops_the_noisiest_levels_of_an_edm_teacher():
    d = Diffusion(img_size=8, channels=1, objective="edm")
    losses = P.accumulate_taylor_grads(GaussianEDM(d.sigma_data), d, _gaussian_batch(), seed=0)
    sigmas = [P.noise_level(d, level) for level in range(P.TAYLOR_LEVELS)]
    exact = [STD**2 / (STD**2 + s**2) for s in sigmas]  # Var(n | x0 + sigma n) for x0 ~ N(MU, STD^2)
    assert len(losses) == _kept(exact) == 14  # of 20; the EDM training loss kept all 20
    assert losses == pytest.approx(exact[:14], rel=0.15)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_taylor_grads_are_the_eps_error_gradients_summed_over_the_kept_levels(prediction):
    d = Diffusion(img_size=8, channels=1, prediction=prediction)
    k, m = 1.05, MU + 0.1  # off the optimum, so every level has a gradient
    net = GaussianVP(d.alpha_bar64, prediction, gain=k, mean=m).train()  # dropout on, unless eval mode is used
    x0 = _gaussian_batch()
    losses = P.accumulate_taylor_grads(net, d, x0, seed=3)
    assert net.training  # the caller's mode comes back
    # By hand, in float64: the same noise draw at every level, eps_hat = k s D with D = (x_t - a m) / var,
    # L_t = mean (eps_hat - n)^2, dL_t/dk = mean 2 r s D, dL_t/dm = mean 2 r k s (-a / var), r = eps_hat - n.
    n = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3)).double()
    errors, d_gain, d_mean = [], [], []
    for level in range(P.TAYLOR_LEVELS):
        ab = float(d.alpha_bar64[round(level * (d.noise_steps - 1) / (P.TAYLOR_LEVELS - 1))])
        a, s, var = math.sqrt(ab), math.sqrt(1 - ab), ab * STD**2 + 1 - ab
        dd = (a * x0.double() + s * n - a * m) / var
        r = k * s * dd - n
        errors.append(r.pow(2).mean().item())
        d_gain.append((2 * r * s * dd).mean().item())
        d_mean.append((2 * r * k * s * (-a / var)).mean().item())
    kept = _kept(errors)
    assert kept == 10  # of 20: the threshold cuts, and several levels are summed
    assert losses == pytest.approx(errors[:kept], rel=1e-4)
    assert net.gain.grad.item() == pytest.approx(sum(d_gain[:kept]), rel=1e-3)
    assert net.mean.grad.item() == pytest.approx(sum(d_mean[:kept]), rel=1e-3)


class LateChannels(nn.Module):
    """1 -> 16 -> 1 channels; a time gate switches the channels LATE on only for t >= ON_FROM (of 1000): they
    shape the output at the noisiest levels alone, and have the largest weights of all channels."""

    LATE, ON_FROM = (2, 5, 9, 13), 800

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inc, self.outc = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 1, 3, padding=1)
        self.gate = nn.Linear(1, 16)
        late = list(self.LATE)
        with torch.no_grad():
            self.gate.weight.zero_()
            self.gate.bias.fill_(1.0)
            self.gate.weight[late], self.gate.bias[late] = 1.0, 0.0
            self.inc.weight[late] *= 3
            self.outc.weight[:, late] *= 3

    def forward(self, x, t):
        on = (t >= self.ON_FROM).float().view(-1, 1)
        return self.outc(torch.tanh(self.inc(x)) * self.gate(on)[:, :, None, None])


def test_pruning_removes_the_channels_that_the_kept_levels_do_not_use(one_torch_thread):
    # A v-prediction network (the default): its eps error falls below 5% of the largest before t = 800,
    # so the LATE channels take no part in any summed L_t; their Taylor importance is exactly 0 and they
    # must be the 4 of 16 channels that go. Random importance (1 chance in 1820), magnitude, or the v
    # training loss summed over all 20 levels remove others.
    d = Diffusion(img_size=8, channels=1, prediction="v")
    net = LateChannels()
    before = net.inc.weight.detach().clone()
    x0 = torch.rand(P.TAYLOR_BATCH, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    losses = P.accumulate_taylor_grads(net, d, x0, seed=0)
    assert P.noise_level(d, len(losses) - 1) < LateChannels.ON_FROM
    late = torch.zeros(16, dtype=torch.bool)
    late[list(LateChannels.LATE)] = True
    grads = net.inc.weight.grad.flatten(1).abs().sum(1)
    assert (grads[late] == 0).all() and (grads[~late] > 0).all()
    P.prune_model(net, (x0[:2], torch.zeros(2, dtype=torch.long)), 0.25)
    kept = [i for i in range(16) if any(torch.equal(before[i], w) for w in net.inc.weight.detach())]
    assert kept == [i for i in range(16) if not late[i]]


def test_the_importance_batch_is_a_seeded_random_draw_over_all_classes():
    images = np.repeat(np.arange(200, dtype=np.uint8), 8 * 8).reshape(200, 8, 8, 1)  # image i is all i
    rows = lambda batch: sorted(((batch[:, 0, 0, 0] + 1) * 127.5).round().long().tolist())
    first = rows(P.importance_batch(images, seed=0))
    assert len(set(first)) == P.TAYLOR_BATCH and first != list(range(P.TAYLOR_BATCH))
    assert min(first) < 100 <= max(first)  # both halves: a folder sorted by class gives both classes
    assert rows(P.importance_batch(images, seed=0)) == first != rows(P.importance_batch(images, seed=1))
    assert rows(P.importance_batch(images[:10], seed=0)) == list(range(10))  # a small set is used whole


def test_the_prune_command_runs_the_importance_pass_in_eval_mode_on_the_random_batch(monkeypatch,
                                                                                    one_torch_thread):
    spec = {k: tuple(v) if isinstance(v, list) else v for k, v in ADM.items()}
    cfg = Config(model=ModelConfig(**spec, dropout=0.5), data=Config().data.__class__(image_size=8, channels=1),
                 diffusion=Config().diffusion.__class__(timesteps=20))
    model, _ = model_from_config(cfg)
    images = np.repeat(np.arange(200, dtype=np.uint8), 8 * 8).reshape(200, 8, 8, 1)
    seen = {}
    real = P.accumulate_taylor_grads

    def spy(model, diffusion, x0, seed=0):
        modes = []
        hook = model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
        try:
            return real(model, diffusion, x0, seed)
        finally:
            hook.remove()
            seen.update(x0=x0, modes=modes, seed=seed)

    monkeypatch.setattr(P, "accumulate_taylor_grads", spy)
    P._pruned(cfg, {"model_state_dict": model.state_dict()}, "teacher.pt", 0.5, ImageData(images, "test"),
              lambda *a: None)
    assert seen["modes"] and not any(seen["modes"])  # dropout off for every level
    assert torch.equal(seen["x0"], P.importance_batch(images, cfg.train.seed)) and seen["seed"] == cfg.train.seed


# --- the command line -------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["prune", "quantize"])
def test_every_command_in_the_help_parses(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = capsys.readouterr().out
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("ddpm ")]  # the examples
    quoted = re.findall(r"`(ddpm [^`]+)`", text)  # commands named in the description
    assert any(line.startswith(f"ddpm {command} ") for line in lines)
    for line in lines + quoted:
        try:
            build_parser().parse_args(shlex.split(line)[1:])
        except SystemExit:
            pytest.fail(f"`{line}` from `ddpm {command} --help` does not parse: {capsys.readouterr().err.strip()}")


def test_a_missing_compress_extra_fails_under_ci_and_skips_elsewhere(monkeypatch):
    def outcome():
        """(outcome type, message) of importing a missing module; (None, "") when nothing is raised.
        Caught here rather than with pytest.raises: a skip escaping this test would mark it skipped,
        not failed, and hide the break this test guards."""
        try:
            _compress_extra("ddpmkit_no_such_module")
        except (pytest.fail.Exception, pytest.skip.Exception) as exc:
            return type(exc), str(exc)
        return None, ""

    monkeypatch.setenv("CI", "true")
    kind, message = outcome()
    assert kind is pytest.fail.Exception and "CI installs it" in message
    monkeypatch.delenv("CI")
    kind, message = outcome()
    assert kind is pytest.skip.Exception and "pip install -e .[compress]" in message
    assert _compress_extra("onnx") is onnx


# --- found untested by the mutation run of prune.py (scripts/mutation.py) ---------------------------

def _saved_checkpoint(path, cfg: Config, **extra) -> str:
    """A ddpmkit checkpoint file with `cfg` and random weights (plus `extra` top-level keys)."""
    state = model_from_config(cfg)[0].state_dict()
    torch.save({"format_version": 1, "config": cfg.to_dict(), "model_state_dict": state, **extra}, path)
    return str(path)


def _small_config(**sections) -> Config:
    spec = {k: tuple(v) if isinstance(v, list) else v for k, v in ADM.items()}
    cfg = Config(model=ModelConfig(**spec), data=Config().data.__class__(image_size=8, channels=1),
                 diffusion=Config().diffusion.__class__(timesteps=20))
    for name, fields in sections.items():
        setattr(cfg, name, dataclasses.replace(getattr(cfg, name), **fields))
    return cfg


def test_pruning_a_distilled_student_is_a_one_line_error(tmp_path, capsys):
    student = _saved_checkpoint(tmp_path / "student.pt",
                                _small_config(distill={"method": "progressive", "teacher": "t.pt", "steps": 4}))
    assert main(["prune", "--ckpt", student, "--ratio", "0.5", "--run-name", "x", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a pixel-space diffusion model" in err
    assert "student.pt" in err and "the teacher of a distilled one" in err
    P._check_prunable(_small_config(), "teacher.pt")  # the same model, not distilled, is accepted


def test_teacher_images_are_steps_times_batch_times_accumulation_times_processes():
    cfg = _small_config(train={"batch_size": 8, "grad_accum": 3})
    assert P.teacher_images({"global_step": 10, "world_size": 2}, cfg) == 480
    assert P.teacher_images({"global_step": 10}, cfg) == 240   # one process unless recorded
    assert P.teacher_images({}, cfg) == 0                      # no step recorded


@pytest.mark.parametrize("extra, epochs", [({"global_step": 100, "world_size": 2}, 7), ({}, 1)])
def test_the_default_fine_tune_is_a_tenth_of_the_teachers_images(extra, epochs, image_folder, tmp_path,
                                                                  monkeypatch):
    # 100 steps x 8 images x 2 processes = 1600 teacher images; a tenth, 160, of 24 images is 7 epochs.
    # A teacher without a recorded step falls back to one epoch.
    cfg = _small_config(data={"path": str(image_folder)}, train={"batch_size": 8})
    teacher = _saved_checkpoint(tmp_path / "teacher.pt", cfg, **extra)
    seen = {}
    monkeypatch.setattr(P, "_pruned", lambda cfg, *a: (cfg, {}, P.Pruned(None, 0.3, (2, 1), (2, 1))))
    monkeypatch.setattr(train_module, "train", lambda cfg, stored, **kw: seen.update(cfg=cfg) or {})
    P.prune(teacher, 0.5, "default", workdir=str(tmp_path), **QUIET)
    assert seen["cfg"].train.epochs == seen["cfg"].train.sample_every_epochs == epochs


def test_the_pruned_weights_are_the_teachers_ema_weights_when_it_has_them(one_torch_thread):
    cfg = _small_config()
    torch.manual_seed(1)
    raw, ema = (model_from_config(cfg)[0].state_dict() for _ in range(2))
    images = np.repeat(np.arange(200, dtype=np.uint8), 8 * 8).reshape(200, 8, 8, 1)
    quiet = lambda *a: None  # noqa: E731
    _, got, _ = P._pruned(cfg, {"model_state_dict": raw, "ema_state_dict": ema}, "t.pt", 0.5,
                          ImageData(images, "test"), quiet)
    _, expected, _ = P._pruned(cfg, {"model_state_dict": ema, "ema_state_dict": None}, "t.pt", 0.5,
                               ImageData(images, "test"), quiet)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_a_level_exactly_at_the_threshold_is_summed_and_the_first_below_it_stops(monkeypatch):
    # "Below 5% of the largest" is strict: L = 5% of 20 (exactly 1.0) is summed, then 0.5 stops the sum.
    net = nn.Module()
    net.w = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
    errors = [20.0, P.TAYLOR_THRESHOLD * 20.0, 0.5, 30.0]
    monkeypatch.setattr(P, "eps_error", lambda model, diffusion, x0, noise, level: model.w * errors[level])
    assert P.accumulate_taylor_grads(net, None, torch.zeros(1, 1, 2, 2)) == errors[:2]
    assert net.w.grad.item() == sum(errors[:2])


def test_the_default_importance_noise_is_seed_0():
    d = Diffusion(img_size=8, channels=1, prediction="eps")
    net = GaussianVP(d.alpha_bar64, "eps", gain=1.05)
    x0 = _gaussian_batch()
    default = P.accumulate_taylor_grads(net, d, x0)
    assert default == P.accumulate_taylor_grads(net, d, x0, seed=0) != P.accumulate_taylor_grads(net, d, x0, seed=1)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_a_learned_variance_teachers_eps_error_ignores_its_variance_half(prediction):
    # Three channels, so the output's halves are 3 + 3 channels: the variance half (here constant 7)
    # must not enter L_t, which equals the same teacher's without a variance output at every level.
    x0 = MU + STD * torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(6))
    plain = Diffusion(img_size=8, channels=3, prediction=prediction)
    learned = Diffusion(img_size=8, channels=3, prediction=prediction, learn_sigma=True)
    net = GaussianVP(plain.alpha_bar64, prediction, gain=1.05).eval()  # no dropout
    both = lambda x, t: torch.cat([net(x, t), torch.full_like(x, 7.0)], 1)  # noqa: E731
    for level in (0, 7, 19):
        assert P.eps_error(both, learned, x0, noise, level).item() == pytest.approx(
            P.eps_error(net, plain, x0, noise, level).item(), rel=1e-6)


class NormNet(nn.Module):
    """1 -> 8 -> 1 channels through a GroupNorm of 4 groups (of 2 channels), with the time input unused."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inc, self.outc = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 1, 3, padding=1)
        self.norm = nn.GroupNorm(4, 8)

    def forward(self, x, t):
        return self.outc(torch.nn.functional.silu(self.norm(self.inc(x))))


def test_channels_through_a_group_norm_are_pruned_one_by_one_by_their_own_importance(one_torch_thread):
    # Channels 0 and 1 have zero Taylor importance (zero gradient), all others a positive one: at R = 0.25
    # exactly those two go, although they are one GroupNorm group. (Pruned in coupled groups, Torch-Pruning
    # would average importance across groups and remove channels such as 4 or 5 along with 0 and 1.)
    net = NormNet()
    with torch.no_grad():
        net.norm.weight.uniform_(0.5, 1.5), net.norm.bias.uniform_(-0.5, 0.5)
    before = net.inc.weight.detach().clone()
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    for grad in (net.inc.weight.grad, net.inc.bias.grad, net.norm.weight.grad, net.norm.bias.grad):
        grad[:2] = 0
    net.outc.weight.grad[:, :2] = 0
    P.prune_model(net, (torch.randn(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)), 0.25)
    kept = [i for i in range(8) if any(torch.equal(before[i], w) for w in net.inc.weight.detach())]
    assert kept == [2, 3, 4, 5, 6, 7] and net.norm.num_channels == 6 and 6 % net.norm.num_groups == 0
