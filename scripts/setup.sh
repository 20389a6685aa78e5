#!/usr/bin/env bash
# Install ddpmkit (editable, with matplotlib for training curves) into the current Python.
# With --test, also the test tools and the compression extra.
# A torch that is already installed is kept; otherwise the CPU wheel torch==2.13.0 goes in first,
# so that pip does not pull a multi-GB CUDA build for `torch>=2.4`.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==2.13.0" || python -m pip install -q "torch>=2.4"
fi
# plots: matplotlib for results/RUN/curves.png. --test adds the test tools and the [compress]
# extra (Torch-Pruning, ONNX, ONNX Runtime), whose tests are part of the default suite.
extras="plots"
if [ "${1:-}" = "--test" ]; then extras="plots,test,compress"; fi
python -m pip install -q -e ".[${extras}]"
