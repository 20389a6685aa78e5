#!/usr/bin/env bash
# One GPU check, about 8 minutes on one GPU (each stage has its own time limit):
#   1. the CUDA tests (tests/test_cuda.py, and fp16 training in tests/test_precision.py) on the GPU;
#   2. benchmarks/gpu_check.py: the cifar preset at 32 px, batch 128, through ddpmkit's trainer in
#      fp32 (TF32), bf16 and fp16, eager and compiled (img/s, peak memory, MFU); 1000 samples at
#      20 NFE per precision; a two-process DDP step (two GPUs with NCCL, else CPU with gloo);
#   3. benchmarks/bench_train.py --device cuda: ddpmkit against diffusers' training example at the
#      matched layout (cifar preset, fp32 and bf16), when diffusers is installed.
# Without a CUDA GPU it says so and exits 0. GPU_CHECK_CPU=1 runs stages 2 and 3 on the CPU at a
# tiny size, fp16 and compile included (to check the scripts; a couple of minutes). Extra
# arguments go to gpu_check.py (e.g. --no-compile). Results: printed, and with OUT set also
# written to $OUT/gpu_check.json and $OUT/bench_train.json. Exit status 1 when a stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
status=0

if [[ -z "${GPU_CHECK_CPU:-}" ]]; then
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "no CUDA GPU found"
        exit 0
    fi
    "$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__)"
    echo "== CUDA tests (tests/test_cuda.py, tests/test_precision.py -k test_device) =="
    DDPMKIT_TEST_DEVICE=cuda timeout -k 10 100 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py \
        "tests/test_precision.py::test_fp16_and_bf16_train_on_the_test_device" || status=1
    bench=(--device cuda --model-size cifar --image-size 32 --channels 3 --data random --batch-size 128
           --steps 30 --warmup 5 --sample-n 128 --sample-steps 20 --sample-reps 3 --precision fp32,bf16)
    limit_check=260
    limit_bench=120
else
    bench=(--device cpu --model-size tiny --image-size 16 --channels 3 --data random --batch-size 8
           --steps 2 --warmup 1 --sample-n 4 --sample-steps 2 --sample-reps 1 --precision fp32 --threads 1)
    limit_check=300
    limit_bench=150
fi

echo "== training and sampling speed, DDP (benchmarks/gpu_check.py) =="
json=()
if [[ -n "${OUT:-}" ]]; then json=(--json "$OUT/gpu_check.json"); fi
# The trainer turns SIGTERM into a graceful stop, so the limit ends the script with SIGKILL 10 s later.
timeout -k 10 "$limit_check" "$PY" benchmarks/gpu_check.py "${json[@]}" "$@" || status=1

echo "== ddpmkit against diffusers (benchmarks/bench_train.py ${bench[*]}) =="
if "$PY" -c "import diffusers" 2>/dev/null; then
    if [[ -n "${OUT:-}" ]]; then bench+=(--json "$OUT/bench_train.json"); fi
    timeout -k 10 "$limit_bench" "$PY" benchmarks/bench_train.py "${bench[@]}" || status=1
else
    echo "skipped: diffusers is not installed (pip install diffusers; it is a benchmark-only dependency)"
fi
exit $status
