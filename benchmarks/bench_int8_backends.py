"""int8 through torchao's PT2E flow (X86InductorQuantizer + torch.compile) against fp32 eager and
fp32 compiled: the time of one network call at batch 1 and 64, and the compile time. It checks
`ddpm quantize`'s choice of ONNX Runtime against the other maintained PyTorch int8 path.

    pip install torchao
    python benchmarks/bench_int8_backends.py CKPT

Calibration here is 20 batches of noise at t = 0, 50, ..., 950 (enough for timing, not for
quality). ONNX Runtime's figures come from bench_compress.py (whole 20-NFE sampling).
"""
import inspect
import sys
import time

import torch
from torch.export import export
from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, convert_pt2e
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer, get_default_x86_inductor_quantization_config
from ddpmkit import load_model
torch.set_num_threads(2)
model, diffusion, cfg = load_model(sys.argv[1])
model.eval()
def bench(f, b, reps):
    x, t = torch.randn(b, 1, 16, 16), torch.full((b,), 500)
    with torch.no_grad():
        for _ in range(3): f(x, t)
        t0 = time.perf_counter()
        for _ in range(reps): f(x, t)
    return (time.perf_counter() - t0) / reps
def time_compiled(compiled, label: str, res: dict) -> None:
    """The first calls at batch 1 and 64 compile (printed as the compile time); then the timed calls."""
    t0 = time.perf_counter()
    bench(compiled, 1, 1)
    bench(compiled, 64, 1)
    print(f"compile {label.split()[0]} s", round(time.perf_counter() - t0, 1), flush=True)
    for b, reps in ((1, 40), (64, 10)):
        res[(f"{label} compiled", b)] = bench(compiled, b, reps)
res = {}
for b, reps in ((1, 40), (64, 10)):
    res[("fp32 eager", b)] = bench(model, b, reps)
with torch.no_grad():
    ex = (torch.randn(64, 1, 16, 16), torch.full((64,), 500))
    batch = torch.export.Dim("b", min=1, max=256)
    dyn = {name: {0: batch} for name in list(inspect.signature(model.forward).parameters)[:2]}  # (x, t)
    t0 = time.perf_counter()
    m = export(model, ex, dynamic_shapes=dyn).module()
    q = X86InductorQuantizer()
    q.set_global(get_default_x86_inductor_quantization_config())
    m = prepare_pt2e(m, q)
    for tt in range(0, 1000, 50):
        m(torch.randn(64, 1, 16, 16), torch.full((64,), tt))
    m = convert_pt2e(m)
    print("quantize s", round(time.perf_counter() - t0, 1), flush=True)
time_compiled(torch.compile(m), "int8 pt2e", res)
time_compiled(torch.compile(model), "fp32", res)
for (k, b), v in res.items():
    print(f"| {k} | batch {b} | {1000*v:.2f} ms/call | {res[('fp32 eager', b)]/v:.2f}x vs fp32 eager |")
