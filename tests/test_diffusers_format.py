"""`ddpm export --format diffusers`: the exported UNet2DModel computes ddpmkit's network, the
scheduler reproduces its process, DDPMPipeline loads and samples the folder, and what cannot map
exactly is refused in one line."""
import dataclasses
import json

import pytest
import torch

from ddpmkit.checkpoint import model_from_config
from ddpmkit.cli import main
from ddpmkit.config import PRESETS, apply_overrides, new_run_config, validate
from ddpmkit.diffusion import to_x0
from ddpmkit.export import diffusers as fmt
from ddpmkit.loading import load_model
from ddpmkit.models.registry import build_model
from ddpmkit.schedules import alpha_bar_schedule

diffusers = pytest.importorskip("diffusers")  # the `test` extra installs it


def shrunk(name: str, time_dim: int = 68, **kw):
    """Preset `name`'s structure (levels, attention levels, residual blocks, heads, dropout) at base
    width 68 with groups chosen per width (norm_groups=0), which gives every GroupNorm 17 groups, and
    time features as wide as time_dim (time_features=0)."""
    return dataclasses.replace(PRESETS[name], size="custom", base_channels=68, time_dim=time_dim,
                               **{"time_features": 0, "norm_groups": 0, **kw})


def randomize(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere: ADM's zero-initialized layers would hide a wrong mapping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return net.eval()


def perturb(net: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """The initial weights plus small noise, so no layer is zero (ADM zero-initializes its output convs)
    and a deep preset's activations stay of order one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return net.eval()


def unet2d(m, c_in, c_out, size, state):
    config = {k: v for k, v in fmt.unet_config(m, c_in, c_out, size).items() if not k.startswith("_")}
    unet = diffusers.UNet2DModel(**config).eval()
    unet.load_state_dict(fmt.to_diffusers(state, m), strict=True)
    return unet


CASES = {  # name: (model config, image channels, output channels, image size)
    "tiny": (shrunk("tiny"), 3, 3, 16),
    "small-grey-narrow-time": (shrunk("small", time_dim=64), 1, 1, 16),  # 64 < 68: UNet2DModel's freq_shift path
    "small-features-under-mlp": (shrunk("small", time_dim=64, time_features=36), 3, 3, 8),  # 36 < 64 <= 68
    "cifar": (shrunk("cifar"), 3, 3, 8),
    "class-conditional": (shrunk("tiny", num_classes=3), 3, 3, 8),
    "learned-variance": (shrunk("tiny"), 3, 6, 8),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_exported_unet_computes_ddpmkits_network(case):
    m, c_in, c_out, size = CASES[case]
    assert fmt.model_problems(m, c_in, c_out) == []
    net = randomize(build_model(m, c_in, c_out), seed=len(case))
    unet = unet2d(m, c_in, c_out, size, net.state_dict())
    x = torch.randn(4, c_in, size, size, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 1, 250, 999])
    y = torch.tensor([0, 1, 2, 3]) if m.num_classes else None  # 3 = ddpmkit's null class, a row of the table
    with torch.no_grad():
        ours, theirs = net(x, t, y), unet(x, t, class_labels=y).sample
    assert ours.abs().mean() > 0.1  # a real signal, not two zero outputs
    assert (ours - theirs).abs().max() < 1e-5
    back = fmt.from_diffusers(unet.state_dict(), m)  # the inverse mapping gives the same tensors back
    assert back.keys() == net.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in net.state_dict().items())


PRESET_CASES = {  # name: (model overrides, image size); the presets as they are today
    "tiny": ({"size": "tiny"}, 16),
    "small": ({"size": "small"}, 16),
    "cifar": ({"size": "cifar"}, 8),
    "tiny-class-conditional": ({"size": "tiny", "num_classes": 3}, 8),
}


def preset_checkpoint(path, model: dict, size: int):
    """A checkpoint of a preset network with perturbed initial weights (no EMA); returns (cfg, network)."""
    cfg = validate(apply_overrides(new_run_config(), {"model": model, "data": {"channels": 3, "image_size": size}}))
    net = perturb(model_from_config(cfg)[0], seed=size + cfg.model.base_channels + cfg.model.num_classes)
    torch.save({"format_version": 1, "config": cfg.to_dict(), "model_state_dict": net.state_dict(), "epoch": 0}, path)
    return cfg, net


@pytest.mark.parametrize("case", sorted(PRESET_CASES))
def test_each_adm_preset_exports_to_a_unet2dmodel_that_computes_it(tmp_path, case):
    model, size = PRESET_CASES[case]
    cfg, net = preset_checkpoint(tmp_path / "ckpt.pt", model, size)
    m = cfg.model
    assert m.arch == "adm" and 0 < m.time_features < m.time_dim and m.norm_groups > 0  # features narrower than the MLP
    fmt.export_diffusers(tmp_path / "ckpt.pt", tmp_path / "pipe")
    unet = diffusers.UNet2DModel.from_pretrained(tmp_path / "pipe" / "unet").eval()
    c = unet.config
    assert (c.block_out_channels[0] - 2 * c.freq_shift, c.time_embedding_dim) == (m.time_features, m.time_dim)
    assert c.norm_num_groups == c.attn_norm_num_groups == m.norm_groups
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, size, size, generator=g)
    y = torch.tensor([0, 1, 2, 3]) if m.num_classes else None  # 3 = the null class, a row of both tables
    for t in ([0, 1, 2, 3], [10, 250, 600, 999], [999, 998, 37, 500]):
        t = torch.tensor(t)
        with torch.no_grad():
            ours, theirs = net(x, t, y), unet(x, t, class_labels=y).sample
        assert ours.abs().mean() > 0.05  # a real signal, not two zero outputs
        assert (ours - theirs).abs().max() < 1e-5, (ours - theirs).abs().max()


def test_ddpmpipeline_samples_the_tiny_preset_export(tmp_path):
    preset_checkpoint(tmp_path / "ckpt.pt", {"size": "tiny"}, 16)
    fmt.export_diffusers(tmp_path / "ckpt.pt", tmp_path / "pipe")
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3) and images.min() >= 0 and images.max() <= 1
    assert images.std() > 0.01  # an image, not a constant


def diffusion_cfg(**kw):
    return dataclasses.replace(new_run_config().diffusion, **kw)


@pytest.mark.parametrize("kw", [
    dict(schedule="linear", prediction="eps"), dict(schedule="cosine", prediction="v"),
    dict(schedule="sigmoid", prediction="x0", beta_start=2e-4, beta_end=0.03),
    dict(schedule="cosine", prediction="v", zero_terminal_snr=True),
])
def test_scheduler_reproduces_the_schedule_and_reads_the_output_as_ddpmkit_does(kw):
    cfg = dataclasses.replace(new_run_config(), diffusion=diffusion_cfg(timesteps=1000, clip_denoised=False, **kw))
    d = cfg.diffusion
    sched = diffusers.DDPMScheduler.from_config(fmt.scheduler_config(cfg))
    ours = alpha_bar_schedule(d.schedule, d.timesteps, d.beta_start, d.beta_end, d.zero_terminal_snr)
    assert (sched.alphas_cumprod.double() - ours).abs().max() < 2e-6
    g = torch.Generator().manual_seed(0)
    for t in (0, 321, 999):
        out, x_t = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
        a = ours[t].sqrt().float()
        x0 = to_x0(d.prediction, out, x_t, a, (1 - ours[t]).sqrt().float())
        step = sched.step(out, t, x_t, generator=g)
        assert (step.pred_original_sample - x0).abs().max() < 1e-4 * max(1.0, float(x0.abs().max()))


def checkpoint(path, model: dict, diffusion: dict | None = None, channels: int = 3, size: int = 16):
    """A ddpmkit checkpoint with random raw and (different) EMA weights."""
    cfg = validate(apply_overrides(new_run_config(), {"model": model, "diffusion": diffusion or {},
                                                      "data": {"channels": channels, "image_size": size}}))
    raw, ema = (randomize(model_from_config(cfg)[0], seed) for seed in (1, 2))
    torch.save({"format_version": 1, "config": cfg.to_dict(), "model_state_dict": raw.state_dict(),
                "ema_state_dict": ema.state_dict(), "epoch": 0}, path)
    return cfg, raw, ema


ADM68 = {"size": "custom", "arch": "adm", "base_channels": 68, "channel_mults": [1, 2], "attn_levels": [1],
         "num_heads": 4, "time_dim": 68, "num_res_blocks": 1}


@pytest.mark.parametrize("diffusion,scheduler", [
    ({"schedule": "cosine", "prediction": "v"}, ("squaredcos_cap_v2", "v_prediction", "fixed_large")),
    ({"schedule": "linear", "prediction": "eps", "learn_sigma": True}, ("linear", "epsilon", "learned_range")),
])
def test_cli_export_loads_in_ddpmpipeline_and_samples(tmp_path, capsys, diffusion, scheduler):
    cfg, raw, ema = checkpoint(tmp_path / "ckpt.pt", ADM68, diffusion)
    out = tmp_path / "pipe"
    assert main(["export", "--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(out), "--format", "diffusers"]) == 0
    assert "DDPMPipeline" in capsys.readouterr().out
    assert json.loads((out / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DModel"]
    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    c = pipe.scheduler.config
    assert (c.beta_schedule, c.prediction_type, c.variance_type) == scheduler
    model, diffusion, _ = load_model(tmp_path / "ckpt.pt")  # the EMA weights, as exported
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 500, 999])
    with torch.no_grad():
        assert (pipe.unet(x, t).sample - model(x, t)).abs().max() < 1e-5
        assert (pipe.unet(x, t).sample - raw.eval()(x, t)).abs().max() > 1e-2  # not the raw weights
    assert (pipe.scheduler.alphas_cumprod.double() - diffusion.alpha_bar64).abs().max() < 2e-6
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3) and images.min() >= 0 and images.max() <= 1


def one_line_error(capsys, code):
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpm: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("model,diffusion,expected", [
    # tiny as it was before its time features and groups matched UNet2DModel: refused, with the fix
    ({"size": "tiny", "time_features": 0, "norm_groups": 0}, {},
     ["GroupNorms use different group counts (8 at 32", "timestep features are 256 wide", "block_out_channels[0]=32",
      "'tiny' network from before the presets matched UNet2DModel", "train a new run with --model-size tiny",
      "--init-from cannot carry these weights", "reads 256 features, the preset's 32"]),
    ({"size": "small", "norm_groups": 0}, {},  # groups per width, today's time features
     ["group counts (16 at 64", "today's small (time_features=64, norm_groups=16) exports exactly",
      "the preset has 16 GroupNorm groups throughout"]),
    (dict(ADM68, time_features=136, time_dim=136), {}, ["features are 136 wide (model.time_features=136"]),
    ({"size": "seed"}, {}, ["the seed UNet"]),
    (ADM68, {"objective": "edm"}, ["EDM objective"]),
    (dict(ADM68, time_dim=272), {}, ["features are 272 wide (model.time_features=0, time_dim=272), UNet2DModel's "
                                     "block_out_channels[0]=68"]),
    (dict(ADM68, channel_mults=[1, 2], attn_levels=[0]), {}, ["attention heads are 17 and 34 channels wide"]),
])
def test_configs_that_cannot_map_exactly_are_refused_in_one_line(tmp_path, capsys, model, diffusion, expected):
    checkpoint(tmp_path / "ckpt.pt", model, diffusion, size=64 if model.get("size") == "seed" else 16)
    err = one_line_error(capsys, main(["export", "--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "o"),
                                       "--format", "diffusers"]))
    assert "cannot export" in err and "--format ddpmkit" in err
    for part in expected:
        assert part in err, err
    assert ("train a new run with --model-size" in err) == (model["size"] in ("tiny", "small"))  # ADM presets only
    assert not (tmp_path / "o").exists()  # nothing written


def test_the_ddpmkit_format_stays_the_default(tmp_path, capsys):
    checkpoint(tmp_path / "ckpt.pt", {"size": "tiny"})
    assert main(["export", "--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "model.safetensors").is_file() and not (tmp_path / "o" / "unet").exists()
