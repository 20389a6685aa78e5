#!/usr/bin/env bash
# One GPU check, under 8 minutes on one GPU (H100: see benchmarks/README.md):
#   1. the CUDA test subset (tests/test_cuda.py) on the GPU;
#   2. benchmarks/gpu_check.py: the cifar preset trained at batch 128 through ddpmkit's trainer in
#      fp32 and bf16 (img/s, peak memory, MFU), a torch.compile comparison, and 1000 samples at 20 NFE.
# Without a CUDA GPU it says so and exits 0. GPU_CHECK_CPU=1 runs step 2 on the CPU at a tiny
# size (to check the script itself); extra arguments go to gpu_check.py (e.g. --no-compile).
# Results: printed, and written as JSON to $OUT/gpu_check.json when OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"

if [[ -z "${GPU_CHECK_CPU:-}" ]]; then
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "no CUDA GPU found"
        exit 0
    fi
    "$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__)"
    echo "== CUDA tests (tests/test_cuda.py) =="
    DDPMKIT_TEST_DEVICE=cuda timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
fi

echo "== training and sampling speed =="
json=()
if [[ -n "${OUT:-}" ]]; then json=(--json "$OUT/gpu_check.json"); fi
timeout 330 "$PY" benchmarks/gpu_check.py "${json[@]}" "$@"
