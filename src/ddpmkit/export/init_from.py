"""`ddpm train --init-from PATH`: a new run whose network starts from existing weights.

PATH may be
  * a ddpmkit checkpoint (its EMA weights when it has them) or a `ddpm export` folder;
  * a diffusers UNet2DModel folder, or a pipeline folder with unet/, whose layout is an ADM
    network (`export.diffusers.read_unet`, the inverse of `ddpm export --format diffusers`);
  * the seed tutorial's checkpoint {model_state_dict, optimizer_state_dict, epoch}, whose network
    is the seed UNet (`--model-size seed`).

The run's own config decides the network; the file must hold that same network. A difference
in its structure stops the run with one line naming each difference and the options that
match the file. A different diffusion (prediction, schedule, T) is allowed -- fine-tuning adapts
the network to it -- and noted. Only the network's weights are taken: the optimizer, EMA and
data position start fresh, and the run's seed fixes everything else. Once the run has saved a
checkpoint it resumes from that, and --init-from is ignored (`cli.cmd_train` says so).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoint import config_of, load_checkpoint
from ..config import PRESETS, Config, ModelConfig
from ..errors import DdpmError
from . import diffusers as diffusers_format
from . import native


@dataclass
class Source:
    """The weights in an --init-from file and what is known of the network and process they came from."""

    kind: str                                # e.g. "ddpmkit checkpoint (EMA weights)"
    model: ModelConfig                       # the network's structure
    state: dict[str, torch.Tensor]           # its weights, in ddpmkit's layout
    diffusion: dict[str, Any] | None = None  # prediction / schedule / timesteps / objective, when known


def _io_channels(state: dict[str, torch.Tensor]) -> tuple[int | None, int | None]:
    """(input, output) channels of an ADM or seed-UNet state dict."""
    for first, last in (("conv_in.weight", "out.2.weight"), ("inc.double_conv.0.weight", "outc.weight")):
        if first in state and last in state:
            return int(state[first].shape[1]), int(state[last].shape[0])
    return None, None


def _diffusion_of(cfg: Config) -> dict[str, Any]:
    d = cfg.diffusion
    return {"prediction": d.prediction, "schedule": d.schedule, "timesteps": d.timesteps, "objective": d.objective}


def _from_scheduler(folder: Path) -> dict[str, Any] | None:
    """The diffusion a diffusers scheduler config describes, in ddpmkit's words (None if absent or unknown)."""
    path = folder / diffusers_format.SCHEDULER_DIR / diffusers_format.SCHEDULER_CONFIG
    try:
        s = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    prediction = {v: k for k, v in diffusers_format.PREDICTION.items()}.get(s.get("prediction_type", "epsilon"))
    schedule = {v: k for k, v in diffusers_format.SCHEDULE.items()}.get(s.get("beta_schedule", "linear"))
    if prediction is None or schedule is None:
        return None
    return {"prediction": prediction, "schedule": schedule, "timesteps": int(s.get("num_train_timesteps", 1000)),
            "objective": "vp"}


def read_source(path: str | Path) -> Source:
    """The network weights in `path` (see the module docstring for what it may be)."""
    from ..compress.quantize import is_quantized
    from ..latent import refuse_autoencoder_checkpoint

    path = Path(path)
    if not path.exists():
        raise DdpmError(f"init-from: {path} not found; pass a checkpoint, a `ddpm export` folder or a diffusers "
                        "UNet2DModel / pipeline folder")
    if path.is_dir():
        if is_quantized(path):
            raise DdpmError(f"init-from: {path} is an int8 ONNX model (`ddpm quantize`), which cannot be trained; "
                            "start from the checkpoint it was made from")
        if native.is_exported(path):
            cfg, state, meta = native.read_exported(path)
            return Source(f"ddpmkit export ({meta.get('weights', 'ema')} weights)", cfg.model, state,
                          _diffusion_of(cfg))
        unet = diffusers_format.unet_folder(path)
        if unet is None:
            raise DdpmError(f"init-from: {path} is neither a `ddpm export` folder nor a diffusers UNet2DModel or "
                            "pipeline folder (with unet/config.json)")
        try:
            model, _, _, state = diffusers_format.read_unet(unet)
        except DdpmError as exc:
            raise DdpmError(f"init-from: {unet}: {exc}") from None
        return Source("diffusers UNet2DModel", model, state, _from_scheduler(unet.parent) if unet != path else None)
    ckpt = load_checkpoint(path, accept_seed=True)
    refuse_autoencoder_checkpoint(ckpt, path)
    cfg = config_of(ckpt, path)
    if ckpt.get("seed_tutorial"):
        return Source("seed tutorial checkpoint", cfg.model, ckpt["model_state_dict"], _diffusion_of(cfg))
    ema = ckpt.get("ema_state_dict") is not None
    return Source(f"ddpmkit checkpoint ({'EMA' if ema else 'raw'} weights)", cfg.model,
                  ckpt["ema_state_dict" if ema else "model_state_dict"], _diffusion_of(cfg))


def _group_counts(m: ModelConfig) -> str | None:
    """The ADM network's GroupNorm groups as they are built: one count ("8"), or per width ("8 at 32,
    16 at 64 channels") when `model.norm_groups` is 0 and the widths get different counts."""
    if m.arch != "adm":
        return None
    if m.norm_groups:
        return str(m.norm_groups)
    counts = diffusers_format._norm_groups(m, 3, 3)  # channels -> groups; image channels do not matter
    if len(set(counts.values())) == 1:
        return str(next(iter(counts.values())))
    return ", ".join(f"{g} at {c}" for c, g in sorted(counts.items())) + " channels"


# Structure that decides the weights and what they compute: (name in messages, how to read it).
# time features and groups are compared as built, so 0 ("as time_dim", "per width") equals its value.
_STRUCTURE: list[tuple[str, Callable[[ModelConfig], Any]]] = [
    ("architecture", lambda m: m.arch),
    ("level widths", lambda m: [m.base_channels * k for k in m.channel_mults]),
    ("attention levels", lambda m: list(m.attn_levels)),
    ("residual blocks per level", lambda m: m.num_res_blocks if m.arch == "adm" else None),
    ("attention heads", lambda m: m.num_heads),
    ("time_dim", lambda m: m.time_dim),
    ("time features", lambda m: m.time_features or m.time_dim),
    ("GroupNorm groups", _group_counts),
    ("classes", lambda m: m.num_classes),
    ("pruned layers", lambda m: len(m.pruned)),
]


def _same_structure(a: ModelConfig, b: ModelConfig) -> bool:
    """Same network apart from the class table (which the data's labels decide)."""
    return all(read(a) == read(b) for what, read in _STRUCTURE if what != "classes")


def _options_for(m: ModelConfig) -> str:
    """Training options that build the network `m`."""
    for name, p in PRESETS.items():
        if _same_structure(m, p):
            return f"--model-size {name}"
    sets = [f"model.arch={m.arch}", f"model.base_channels={m.base_channels}",
            f"model.channel_mults={','.join(map(str, m.channel_mults))}",
            f"model.attn_levels={','.join(map(str, m.attn_levels))}", f"model.num_heads={m.num_heads}",
            f"model.time_dim={m.time_dim}"] + ([f"model.num_res_blocks={m.num_res_blocks}"] if m.arch == "adm" else [])
    sets += [f"model.{k}={getattr(m, k)}" for k in ("time_features", "norm_groups") if getattr(m, k)]
    return "--set model.size=custom " + " ".join(f"--set {s}" for s in sets)


def check_source(source: Source, model: torch.nn.Module, cfg: Config) -> None:
    """Refuse, in one line, a source whose network differs from this run's `model` (built from `cfg.model`)."""
    diffs = []
    for what, read in _STRUCTURE:
        if read(source.model) != read(cfg.model):
            diffs.append(f"{what} {read(source.model)} in the file, {read(cfg.model)} in this run's model")
            if what == "architecture":  # the rest of the comparison would only list the consequences
                break
    (src_in, src_out), (run_in, run_out) = _io_channels(source.state), _io_channels(model.state_dict())
    hints = []
    if src_in != run_in:
        diffs.append(f"input channels {src_in} in the file, {run_in} in this run's model")
        hints.append(f"--channels {src_in}" if src_in in (1, 3) else "data with as many channels")
    elif src_out != run_out:
        learned = src_out == 2 * src_in
        diffs.append(f"output channels {src_out} in the file{' (a learned variance)' if learned else ''}, "
                     f"{run_out} in this run's model")
        hints.append(f"--set diffusion.learn_sigma={'true' if learned else 'false'}")
    if source.model.num_classes != cfg.model.num_classes:
        hints.append(f"--class-cond on data with {source.model.num_classes} classes" if source.model.num_classes
                     else "no --class-cond")
    if diffs:
        if not _same_structure(source.model, cfg.model):
            hints.insert(0, _options_for(source.model))
        raise DdpmError(f"init-from: {'; '.join(diffs)} (this run: --model-size {cfg.model.size}); start the run "
                        f"with the file's network: {' '.join(hints)}")


def load_initial_weights(model: torch.nn.Module, cfg: Config, path: str | Path, log: Callable = print) -> None:
    """Load the network weights in `path` into this new run's `model` (`ddpm train --init-from`)."""
    source = read_source(path)
    net = getattr(model, "_orig_mod", model)  # a torch.compile wrapper: load into the network itself
    check_source(source, net, cfg)
    try:
        net.load_state_dict(source.state)
    except RuntimeError as exc:
        first = " ".join(str(exc).split("\n")[:2]).strip()
        raise DdpmError(f"init-from: the weights in {path} do not fit this run's model ({first[:200]})") from None
    log(f"init-from: starting from the {source.kind} in {path}")
    mine = _diffusion_of(cfg)
    if source.diffusion is not None and source.diffusion != mine:
        keys = [k for k in mine if source.diffusion[k] != mine[k]]
        was = ", ".join(f"{k} {source.diffusion[k]}" for k in keys)
        now = ", ".join(f"{mine[k]}" for k in keys)
        flags = " ".join(f"--set diffusion.{k}={source.diffusion[k]}" for k in keys)
        log(f"note: init-from: those weights were trained with {was}; this run uses {now}, which fine-tuning "
            f"adapts them to ({flags} keeps the file's)")
