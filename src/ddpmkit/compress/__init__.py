"""Smaller and faster models: structural pruning (`ddpm prune`) and int8 quantization (`ddpm quantize`).

prune.py: Torch-Pruning with Diff-Pruning's timestep-aware Taylor importance of the eps error, then a
fine-tune on the ordinary trainer (a `tasks.Task`). quantize.py: ONNX Runtime static int8 quantization,
calibrated on the model's own sampling trajectories. Both need the optional extra
`pip install -e .[compress]`; `require` says so in one line when it is missing.
"""
from __future__ import annotations

import importlib

from ..errors import DdpmError

EXTRA_HINT = "pip install -e .[compress]"


def require(module: str, what: str):
    """Import an optional dependency of the [compress] extra, or a one-line DdpmError naming the install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DdpmError(f"{what} needs the optional package '{module}'; install it with `{EXTRA_HINT}`") from None
