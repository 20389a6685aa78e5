"""The `ddpm prune` and `ddpm quantize` subcommands: their flags and their calls."""
from __future__ import annotations

import argparse

# Every line here and every `ddpm ...` quoted in the descriptions must parse (tests/test_compress.py checks).
EXAMPLES = """examples:
  ddpm prune --ckpt models/digits/ckpt.pt --ratio 0.5 --run-name digits_p50
  ddpm prune --ckpt models/digits/ckpt.pt --ratio 0.6 --ratio-of macs --distill-weight 0 --run-name digits_m60
  ddpm quantize --ckpt models/digits_p50/ckpt.pt --out models/digits_p50_int8
  ddpm sample --model models/digits_p50_int8 -n 16
  ddpm eval --ckpt models/digits_p50_int8 --ref builtin:digits -n 2000
"""


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def add_parsers(sub, positive_int, add_run_options) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("prune", help="prune a trained model's channels, then fine-tune it", epilog=EXAMPLES,
                       formatter_class=fmt,
                       description="Structural pruning with Torch-Pruning and Diff-Pruning's timestep-aware Taylor "
                       "importance of the noise-prediction error (Fang et al. 2023), whatever the model predicts; "
                       "attention heads stay whole, the output conv keeps its outputs. --ratio is the share of "
                       "parameters (or of MACs per image) to remove: the channel ratio that removes it is searched "
                       "for, and the log shows both shares. The fine-tune mixes the unpruned model's prediction "
                       "into the target (--distill-weight) and decays the LR on a cosine to 0 at its last step. "
                       "It is a training run (resume, SIGTERM saves, EMA) writing WORKDIR/models/RUN/ckpt.pt; "
                       "the same command again resumes, and a larger --finetune-images continues a run with the "
                       "cosine stretched to the new length. Needs `pip install -e .[compress]`.")
    p.add_argument("--ckpt", required=True, metavar="CKPT", help="checkpoint of the model to prune")
    p.add_argument("--ratio", required=True, type=float, help="share to remove, in (0, 1), of what --ratio-of names")
    p.add_argument("--ratio-of", default="params", choices=("params", "macs", "channels"),
                   help="params: the network's parameters (default); macs: its multiply-accumulates per image; "
                   "channels: Torch-Pruning's uniform channel ratio itself")
    p.add_argument("--run-name", required=True, help="names models/RUN, results/RUN and runs/RUN")
    p.add_argument("--finetune-images", type=positive_int, default=None, help="fine-tuning images, rounded up "
                   "to whole epochs (default: 10%% of the images the model was trained on)")
    p.add_argument("--distill-weight", type=float, default=None, metavar="W",
                   help="fine-tune loss: W x the error to the unpruned model's prediction + (1 - W) x the usual "
                   "loss, in [0, 1] (default: 0.7, as Diff-Pruning's fine-tunes; 0: the usual loss only; "
                   "a resumed run keeps its own)")
    p.add_argument("--lr-schedule", default=None, choices=("cosine", "constant"),
                   help="after the warm-up: cosine to 0 at the last fine-tune step (default) or constant "
                   "(a resumed run keeps its own unless given)")
    p.add_argument("--warmup-steps", type=_non_negative_int, default=None,
                   help="linear LR warm-up steps (default: 0; a resumed run keeps its own unless given)")
    add_run_options(p, "model", "0.3 x the model's")
    q = sub.add_parser("quantize", help="int8 post-training quantization for CPU (ONNX Runtime)", epilog=EXAMPLES,
                       formatter_class=fmt,
                       description="Static int8 quantization calibrated on (x_t, t) pairs from the model's own sampling "
                       "trajectories, spread evenly over the timesteps. Writes OUT/model.onnx and OUT/config.json, "
                       "which `ddpm sample --model OUT` and `ddpm eval --ckpt OUT --ref DATA` run. Needs "
                       "`pip install -e .[compress]`.")
    q.add_argument("--ckpt", required=True, metavar="CKPT", help="checkpoint of the model to quantize")
    q.add_argument("--out", required=True, metavar="DIR", help="folder to write model.onnx and config.json to")
    q.add_argument("--calib-n", type=positive_int, default=256, help="calibration pairs (default: 256)")
    q.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "onnxruntime-fp32"),
                   help="onnxruntime: static int8 (default); onnxruntime-fp32: the same runtime without quantization, "
                   "for CPUs where int8 is not faster (see benchmarks/bench_compress.py)")


def run(args: argparse.Namespace) -> int:
    if args.command == "prune":
        from .prune import prune

        summary = prune(args.ckpt, args.ratio, args.run_name, args.finetune_images, args.batch_size, args.lr,
                        args.device, args.workdir, progress=not args.no_progress, ratio_of=args.ratio_of,
                        distill_weight=args.distill_weight, lr_schedule=args.lr_schedule,
                        warmup_steps=args.warmup_steps)
        if summary["status"] == "finished":
            print(f"done: {summary['step']} steps; pruned checkpoint {summary['ckpt']}")
        return 0
    from .quantize import quantize

    out = quantize(args.ckpt, args.out, calib_n=args.calib_n, backend=args.backend)
    print(f"quantized model written to {out}")
    return 0
