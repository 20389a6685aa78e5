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
    width 68, where every GroupNorm of the network has 17 groups, as UNet2DModel needs."""
    return dataclasses.replace(PRESETS[name], size="custom", base_channels=68, time_dim=time_dim, **kw)


def randomize(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere: ADM's zero-initialized layers would hide a wrong mapping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return net.eval()


def unet2d(m, c_in, c_out, size, state):
    config = {k: v for k, v in fmt.unet_config(m, c_in, c_out, size).items() if not k.startswith("_")}
    unet = diffusers.UNet2DModel(**config).eval()
    unet.load_state_dict(fmt.to_diffusers(state, m), strict=True)
    return unet


CASES = {  # name: (model config, image channels, output channels, image size)
    "tiny": (shrunk("tiny"), 3, 3, 16),
    "small-grey-narrow-time": (shrunk("small", time_dim=64), 1, 1, 16),  # 64 < 68: UNet2DModel's freq_shift path
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
    ({"size": "tiny"}, {}, ["GroupNorms use different group counts (8 at 32", "time_dim=256 wide"]),
    ({"size": "seed"}, {}, ["the seed UNet"]),
    (ADM68, {"objective": "edm"}, ["EDM objective"]),
    (dict(ADM68, time_dim=272), {}, ["time_dim=272 wide, UNet2DModel's block_out_channels[0]=68"]),
    (dict(ADM68, channel_mults=[1, 2], attn_levels=[0]), {}, ["attention heads are 17 and 34 channels wide"]),
])
def test_configs_that_cannot_map_exactly_are_refused_in_one_line(tmp_path, capsys, model, diffusion, expected):
    checkpoint(tmp_path / "ckpt.pt", model, diffusion, size=64 if model.get("size") == "seed" else 16)
    err = one_line_error(capsys, main(["export", "--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "o"),
                                       "--format", "diffusers"]))
    assert "cannot export" in err and "--format ddpmkit" in err
    for part in expected:
        assert part in err, err
    assert not (tmp_path / "o").exists()  # nothing written


def test_the_ddpmkit_format_stays_the_default(tmp_path, capsys):
    checkpoint(tmp_path / "ckpt.pt", {"size": "tiny"})
    assert main(["export", "--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "model.safetensors").is_file() and not (tmp_path / "o" / "unet").exists()
