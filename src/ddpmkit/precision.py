"""How the network runs: its precision (fp32, bf16, fp16 with loss scaling) and torch.compile.

Precisions (`ddpm train/sample/eval --precision`, config `train.precision`):

* fp32: no autocast (on a CUDA GPU, PyTorch's default TF32 convolutions);
* bf16: the forward pass under `torch.autocast(bfloat16)`; bf16 has fp32's exponent range, so
  gradients need no scaling;
* fp16: autocast(float16) plus dynamic loss scaling (Micikevicius et al. 2018, "Mixed Precision
  Training", Sec. 3.2), through `torch.amp.GradScaler`: the loss is multiplied by a scale S before
  backward so small gradients survive fp16, the gradients are divided by S before clipping, a step
  whose gradients overflowed is skipped and S halved, and S doubles after GROWTH_INTERVAL good
  steps in a row;
* auto: bf16 where the hardware runs it natively (a CUDA GPU with bf16 support; a CPU whose
  /proc/cpuinfo flags include avx512_bf16 or amx_bf16), fp32 elsewhere.

`Precision` is the trainer's policy object: it owns the autocast and the GradScaler, and the
trainer calls it at the points of the fp16 step order (scale, backward, unscale, clip, step,
update). Sampling only needs `autocast_dtype`. `compile_network` wraps a network in torch.compile
after checking that this machine can compile it.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import DdpmError

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# GradScaler's settings (PyTorch's defaults). A scale below MIN_LOSS_SCALE means the gradients
# overflow fp16 even unscaled (PyTorch's GradScaler.update docs: "If the scale falls below 1 ...
# something is likely wrong"), so loss scaling cannot help and the run stops.
INIT_SCALE = 2.0 ** 16
GROWTH_INTERVAL = 2000
MIN_LOSS_SCALE = 1.0

_warned: set[str] = set()


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it does not exist, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively (not by emulation)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    return False


def check_name(name: Any, where: str = "--precision") -> str:
    """`name` as a precision name; True / False (the older bf16 switch) mean bf16 / fp32."""
    if name is True or name is False or name is None:
        return "bf16" if name else "fp32"
    if name not in PRECISIONS:
        raise DdpmError(f"{where} must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return name


def _warn_once(key: str, message: str, log: Callable) -> None:
    if key not in _warned:
        _warned.add(key)
        log(message)


def resolve(name: Any, device: torch.device, log: Callable = print) -> str:
    """The precision to run on `device`: fp32, bf16 or fp16 (auto decided; see the module docstring).

    On a CPU whose flags are known and lack native support, bf16 and fp16 are emulated: one
    warning line, once per process.
    """
    name = check_name(name)
    device = torch.device(device)
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    flags = cpu_flags() if device.type == "cpu" else frozenset()
    if name == "bf16" and flags and not native_bf16(device):
        _warn_once("bf16", "warning: this CPU has no native bf16 (no avx512_bf16 or amx_bf16 flag), so bf16 is "
                   "emulated and 6-13x slower than fp32; use --precision fp32 (or auto)", log)
    if name == "fp16" and flags and not {"avx512_fp16", "amx_fp16"} & flags:
        _warn_once("fp16", "warning: this CPU has no native fp16 (no avx512_fp16 or amx_fp16 flag), so fp16 is "
                   "emulated and slower than fp32; fp16 is meant for GPUs", log)
    return name


def autocast_dtype(name: Any, device: torch.device, log: Callable = print) -> torch.dtype | None:
    """The autocast dtype of precision `name` on `device` (None: fp32, no autocast)."""
    return _DTYPES[resolve(name, device, log)]


class Precision:
    """The trainer's precision policy: autocast for the forward pass and, for fp16, a GradScaler.

    The trainer's optimizer step, for every precision:

        precision.backward(loss)            # fp16: backward of loss * scale
        precision.unscale(opt)              # fp16: gradients / scale, before clipping
        norm = clip_grad_norm_(...)
        if norm is finite: precision.step(opt)        # fp16: also updates the scale
        elif precision.overflowed(loss_finite): skip  # an fp16 overflow: scale halved, counted
        else: the trainer's non-finite guard
    """

    def __init__(self, name: Any, device: torch.device, log: Callable = print):
        self.device = torch.device(device)
        self.name = resolve(name, self.device, log)
        self.dtype = _DTYPES[self.name]
        self.scaler = (torch.amp.GradScaler(self.device.type, init_scale=INIT_SCALE, growth_interval=GROWTH_INTERVAL)
                       if self.name == "fp16" else None)
        self.overflows = 0  # optimizer steps skipped for an fp16 gradient overflow, in all

    def autocast(self):
        """The context of the forward pass and the loss."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, opt: torch.optim.Optimizer) -> None:
        """Divide the accumulated gradients by the scale (fp16), so clipping sees the true norm."""
        if self.scaler is not None:
            self.scaler.unscale_(opt)

    def step(self, opt: torch.optim.Optimizer) -> None:
        """Apply finite gradients; fp16 also counts the good step towards growing the scale."""
        if self.scaler is None:
            opt.step()
            return
        self.scaler.step(opt)
        self.scaler.update()

    def scale(self) -> float | None:
        """The current loss scale (fp16), else None."""
        return None if self.scaler is None else float(self.scaler.get_scale())

    def overflowed(self, loss_finite: bool) -> bool:
        """After a step with a non-finite gradient norm: True when it was an fp16 overflow, which
        the scaler has now backed off from (the caller skips the step; it is counted here); False
        when the caller's non-finite guard applies (fp32 / bf16, a non-finite loss, or gradients
        the scaler saw as finite). Raises when the scale has collapsed below MIN_LOSS_SCALE."""
        if self.scaler is None:
            return False
        before = self.scaler.get_scale()
        if not loss_finite:  # not the scaler's concern: clear its record of this step, keep the scale
            self.scaler.update(new_scale=before)
            return False
        self.scaler.update()
        after = self.scaler.get_scale()
        if after >= before:
            return False
        self.overflows += 1
        if after < MIN_LOSS_SCALE:
            raise DdpmError(f"fp16 gradients keep overflowing: the loss scale fell to {after:g} (below "
                            f"{MIN_LOSS_SCALE:g}) after {self.overflows} skipped steps, so the gradients overflow "
                            f"fp16 even unscaled; use --precision bf16 or fp32, or lower --lr")
        return True

    def state_dict(self) -> dict[str, Any]:
        """Plain values for the checkpoint (weights_only loading accepts them)."""
        return {"name": self.name, "overflows": self.overflows,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; a scaler state applies only when this run uses fp16 too."""
        self.overflows = int(state.get("overflows", 0))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


# --- torch.compile -------------------------------------------------------------------------------

def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot run on `device` here, or None when it can."""
    try:
        supported = torch._dynamo.is_dynamo_supported()
    except Exception:  # noqa: BLE001 - an older or newer torch without this check
        supported = True
    if not supported:
        return f"torch {torch.__version__} does not support torch.compile on this Python or platform"
    device = torch.device(device)
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "compiling for a CUDA GPU needs the triton package (pip install triton)"
    if device.type == "cpu" and _cpp_compiler() is None:
        return ("compiling for the CPU needs a C++ compiler and none was found (install g++, e.g. "
                "`apt-get install g++`, or set CXX)")
    return None


def _cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend (inductor) would use, or None."""
    try:
        from torch._inductor import config as inductor_config

        names = inductor_config.cpp.cxx
        names = [n for n in (names if isinstance(names, (list, tuple)) else (names,)) if n]
    except Exception:  # noqa: BLE001 - inductor's config moved: look for the usual names
        names = [os.environ.get("CXX") or "g++"]
    return next((found for n in names if (found := shutil.which(n))), None)


def compile_network(net: nn.Module, device: torch.device) -> nn.Module:
    """torch.compile(net), or a one-line DdpmError naming why this machine cannot compile.

    The compiled module shares `net`'s parameters; save `net` itself (or strip the `_orig_mod.`
    prefix, as checkpoint.py does) so checkpoints stay the same with and without compile."""
    why = compile_unavailable(device)
    if why is not None:
        raise DdpmError(f"--compile is not available: {why}; or drop --compile")
    try:
        return torch.compile(net)
    except RuntimeError as exc:  # e.g. "torch.compile is not supported on Python 3.x+"
        raise DdpmError(f"--compile is not available: {' '.join(str(exc).split())[:200]}; drop --compile") from None


def channels_last(model: nn.Module) -> nn.Module:
    """The model's 4-d weights in channels_last (NHWC) memory format, in place; convolutions then run
    NHWC kernels (cuDNN's fastest layout for tensor cores). Values and state_dict keys are unchanged."""
    return model.to(memory_format=torch.channels_last)
