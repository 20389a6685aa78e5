"""`ddpm quantize`: static int8 post-training quantization for CPU with ONNX Runtime.

    quantize(ckpt, out, calib_n=256) -> out         load_quantized(out) -> (model, diffusion, config)

Calibration is time-step aware (Shang et al. 2023, "Post-training Quantization on Diffusion
Models" (PTQ4DM), §4; Li et al. 2023, "Q-Diffusion", §4.1): the (x_t, t) inputs the network
receives along its own DDIM sampling trajectories (`CALIB_STEPS` steps, recorded by a forward
pre-hook on the network, i.e. exactly what it sees), taken evenly from every step, because
activation ranges change with t. ONNX Runtime's static quantizer turns the ranges it observes
on them into int8 scales (QDQ format, per-channel int8 weights, uint8 activations).

What stays fp32: the input convolution, the output convolution (or head), the time-embedding
MLP and every per-block time projection (`emb`/`emb_layer`), and the normalizations and
attention softmax (never quantized by the int8 operator set used here: Conv, MatMul, Gemm).

The output folder holds model.onnx (a protobuf graph, no pickled code) and config.json (the
run's config plus a "quantized" record); `load_quantized` and `loading.load_model` run it
through an `nn.Module` wrapper, so `ddpm sample` and `ddpm eval` take it like any model.
"""
from __future__ import annotations

import json
import logging
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoint import config_of, load_checkpoint, load_state, model_from_config
from ..config import from_dict, validate
from ..errors import DdpmError
from . import require

ONNX, CONFIG = "model.onnx", "config.json"
CALIB_STEPS = 20                       # DDIM steps of the calibration trajectories
QUANT_OPS = ["Conv", "MatMul", "Gemm"]
BACKENDS = ("onnxruntime", "onnxruntime-fp32")
FP32_NAMES = ("/conv_in/", "/inc/", "/out/", "/outc/", "/time_mlp/", "/emb/", "/emb_layer/")


def is_quantized(path: str | Path) -> bool:
    """True for a folder (or its model.onnx) written by `quantize`."""
    path = Path(path)
    if path.suffix == ".onnx":
        return True
    return path.is_dir() and (path / ONNX).is_file()


def collect_calibration(model: nn.Module, diffusion, n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` (x_t, t) network inputs from sampling trajectories, taken evenly from every sampler step."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(_module, args):
        x, t = args[0], torch.as_tensor(args[1]).float().expand(args[0].shape[0])
        calls.append((x.detach().cpu().float(), t.detach().cpu()))

    handle = model.register_forward_pre_hook(record)
    try:
        diffusion.generate(model, max(1, math.ceil(n / CALIB_STEPS)), sampler="ddim", steps=CALIB_STEPS,
                           seed=seed, progress=False)
    finally:
        handle.remove()
    pairs = [(x[i:i + 1], t[i:i + 1]) for x, t in calls for i in range(x.shape[0])]
    if len(pairs) > n:  # evenly spaced over the (step-ordered) pairs, so every step keeps its share
        pairs = [pairs[int(k)] for k in np.linspace(0, len(pairs) - 1, n).round()]
    return pairs


class _Net(nn.Module):
    """forward(x, t) of the network alone, the signature the ONNX graph gets."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t)


def _export(model: nn.Module, example: tuple[torch.Tensor, torch.Tensor], path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Net(model).eval(), example, str(path), dynamo=False, input_names=["x", "t"],
                          output_names=["out"], opset_version=17,
                          dynamic_axes={"x": {0: "batch"}, "t": {0: "batch"}, "out": {0: "batch"}})


def quantize_model(model: nn.Module, calib: list[tuple[torch.Tensor, torch.Tensor]], path: str | Path) -> Path:
    """Write the int8 ONNX graph of `model` to `path`, calibrated on `calib`; refuses an empty calibration."""
    if not calib:
        raise DdpmError("calibration collected no (x_t, t) pairs, so there are no activation ranges to quantize "
                        "with; run the model's sampling trajectories first (--calib-n >= 1)")
    require("onnx", "ddpm quantize")
    q = require("onnxruntime.quantization", "ddpm quantize")
    import onnx

    path = Path(path)
    fp32 = path.with_name(f".{path.name}.fp32.onnx")
    _export(model, (torch.cat([calib[0][0]] * 2), torch.cat([calib[0][1]] * 2)), fp32)
    names = [node.name for node in onnx.load(str(fp32)).graph.node if node.op_type in QUANT_OPS]
    keep = [name for name in names if any(part in name for part in FP32_NAMES)]

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.rows = iter({"x": x.numpy(), "t": t.numpy()} for x, t in calib)

        def get_next(self):
            return next(self.rows, None)

    root = logging.getLogger()
    level, _ = root.level, root.setLevel(logging.ERROR)  # ONNX Runtime's advice lines go to the root logger
    try:
        q.quantize_static(str(fp32), str(path), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                          activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                          op_types_to_quantize=QUANT_OPS, nodes_to_exclude=keep)
    finally:
        root.setLevel(level)
        fp32.unlink(missing_ok=True)
    return path


class QuantizedNet(nn.Module):
    """An ONNX Runtime session as a network: forward(x, t, y=None) -> tensor on x's device."""

    def __init__(self, path: str | Path, threads: int | None = None):
        super().__init__()
        ort = require("onnxruntime", "a quantized model")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is not None:
            raise ValueError("a quantized model is unconditional; it takes no class labels")
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        out = self.session.run(None, {"x": x.detach().float().cpu().numpy(), "t": t.detach().cpu().numpy()})[0]
        return torch.from_numpy(out).to(device=x.device, dtype=x.dtype)


def quantize(ckpt_path: str | Path, out_dir: str | Path, calib_n: int = 256, seed: int = 0,
             backend: str = "onnxruntime") -> Path:
    """Quantize a checkpoint's EMA (else raw) weights into OUT_DIR/model.onnx + OUT_DIR/config.json.

    backend "onnxruntime": int8 as above; "onnxruntime-fp32": the same ONNX Runtime path without
    quantization (no calibration), for CPUs and model sizes where int8 kernels are not faster."""
    if backend not in BACKENDS:
        raise DdpmError(f"unknown --backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if is_quantized(ckpt_path):
        raise DdpmError(f"{ckpt_path} is already quantized; pass the fp32 checkpoint (ckpt.pt)")
    ckpt = load_checkpoint(ckpt_path)
    cfg = config_of(ckpt, ckpt_path)
    if cfg.model.num_classes:
        raise DdpmError(f"{ckpt_path} is class-conditional; ddpm quantize takes unconditional models only")
    if cfg.diffusion.objective != "vp" or getattr(getattr(cfg, "autoencoder", None), "path", ""):
        raise DdpmError(f"{ckpt_path} is not a pixel-space VP diffusion model; ddpm quantize supports only those")
    model, diffusion = model_from_config(cfg)
    key = "ema_state_dict" if ckpt.get("ema_state_dict") is not None else "model_state_dict"
    load_state(model, ckpt[key], ckpt_path)
    int8 = backend == "onnxruntime"
    calib = collect_calibration(model.eval(), diffusion, calib_n, seed) if int8 else []
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if int8:
            quantize_model(model, calib, out_dir / ONNX)
        else:
            _export(model, (torch.zeros(2, cfg.data.channels or 3, *cfg.data.hw), torch.zeros(2)), out_dir / ONNX)
        meta = {"quantized": {"backend": backend, "format": "QDQ int8" if int8 else "fp32", "calib_n": len(calib),
                              "calib_steps": CALIB_STEPS, "fp32": list(FP32_NAMES) if int8 else ["all"]},
                "config": cfg.to_dict(), "global_step": ckpt.get("global_step")}
        (out_dir / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    except OSError as exc:
        raise DdpmError(f"cannot write the quantized model to {out_dir}: "
                        f"{os.strerror(exc.errno) if exc.errno else exc}") from None
    return out_dir


def load_quantized(model_dir: str | Path, device: str | torch.device = "cpu"):
    """(model, diffusion, config) of a folder written by `quantize`; the model runs on the CPU."""
    model_dir = Path(model_dir)
    if model_dir.suffix == ".onnx":
        model_dir = model_dir.parent
    try:
        cfg = validate(from_dict(json.loads((model_dir / CONFIG).read_text())["config"]))
    except (OSError, ValueError, KeyError, TypeError, DdpmError) as exc:
        raise DdpmError(f"{model_dir / CONFIG} is not a valid quantized-model config "
                        f"({' '.join(str(exc).split())[:160]})") from None
    _, diffusion = model_from_config(cfg, device)
    return QuantizedNet(model_dir / ONNX).eval(), diffusion, cfg
