"""`ddpm train --init-from`: a new run starts from the network in a checkpoint, an export (either
format) or the seed tutorial's checkpoint; a different network is refused in one line; the
fine-tune resumes exactly; and `ddpm sample` reads the seed tutorial's checkpoint."""
import pytest
import torch

import ddpmkit.train as train_module
from ddpmkit import UNet
from ddpmkit.checkpoint import model_from_config
from ddpmkit.cli import main
from ddpmkit.config import apply_overrides, new_run_config, validate
from ddpmkit.export.init_from import _options_for, check_source, read_source
from ddpmkit.loading import load_model
from ddpmkit.models.registry import build_model
from test_train import assert_same_training_state, states

ADM68 = {"size": "custom", "arch": "adm", "base_channels": 68, "channel_mults": [1, 2], "attn_levels": [1],
         "num_heads": 4, "time_dim": 68, "num_res_blocks": 1}
ADM68_FLAGS = ["--set", "model.size=custom", "--set", "model.arch=adm", "--set", "model.base_channels=68",
               "--set", "model.channel_mults=1,2", "--set", "model.attn_levels=1", "--set", "model.num_heads=4",
               "--set", "model.time_dim=68", "--set", "model.num_res_blocks=1"]


@pytest.fixture(autouse=True)
def no_curves(monkeypatch):
    monkeypatch.setattr(train_module, "DRAW_CURVES", False)


def randomize(net, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return net.eval()


def perturb(net, seed, scale=0.02):
    """The initial weights plus small noise: no layer stays zero, and a deep preset's activations stay of order one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return net.eval()


def checkpoint(path, model=ADM68, channels=3, learn_sigma=False, weights=randomize):
    """A ddpmkit checkpoint of `model` with random raw and (different) EMA weights; returns (cfg, ema network)."""
    cfg = validate(apply_overrides(new_run_config(), {"model": model, "diffusion": {"learn_sigma": learn_sigma},
                                                      "data": {"channels": channels, "image_size": 8}}))
    raw, ema = (weights(model_from_config(cfg)[0], seed) for seed in (1, 2))
    torch.save({"format_version": 1, "config": cfg.to_dict(), "model_state_dict": raw.state_dict(),
                "ema_state_dict": ema.state_dict(), "epoch": 0}, path)
    return cfg, ema


def seed_checkpoint(path, prefix=""):
    """The seed tutorial's ckpt.pt: its UNet's weights, AdamW's state after one step, the epoch."""
    torch.manual_seed(0)
    net = UNet()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-4)
    net(torch.randn(1, 3, 8, 8), torch.tensor([5])).square().mean().backward()
    opt.step()
    state = {prefix + k: v for k, v in net.state_dict().items()}
    torch.save({"model_state_dict": state, "optimizer_state_dict": opt.state_dict(), "epoch": 7}, path)
    return net.eval()


def outputs(net, channels=3, y=None):
    x = torch.randn(3, channels, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return net(x, torch.tensor([0, 400, 999]), y)


@pytest.mark.parametrize("source", ["checkpoint", "ddpmkit export", "diffusers pipeline", "diffusers unet"])
def test_each_source_gives_back_the_exported_network(tmp_path, capsys, source):
    cfg, ema = checkpoint(tmp_path / "ckpt.pt")
    path = tmp_path / "ckpt.pt"
    if source != "checkpoint":
        fmt = "ddpmkit" if source == "ddpmkit export" else "diffusers"
        assert main(["export", "--ckpt", str(path), "--out", str(tmp_path / "exp"), "--format", fmt]) == 0
        path = tmp_path / "exp" / ("unet" if source == "diffusers unet" else "")
    src = read_source(path)
    assert "EMA" in src.kind or "ema" in src.kind or "diffusers" in src.kind
    net = model_from_config(cfg)[0].eval()
    net.load_state_dict(src.state)
    assert torch.equal(outputs(net), outputs(ema))  # export -> diffusers -> init-from: the same network


@pytest.mark.parametrize("preset", ["tiny", "small", "cifar"])
def test_a_diffusers_export_of_each_preset_comes_back_as_that_preset(tmp_path, preset):
    cfg, ema = checkpoint(tmp_path / "ckpt.pt", {"size": preset}, weights=perturb)
    assert main(["export", "--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "pipe"),
                 "--format", "diffusers"]) == 0
    src = read_source(tmp_path / "pipe")
    m = src.model
    assert (m.time_dim, m.time_features, m.norm_groups) == \
        (cfg.model.time_dim, cfg.model.time_features, cfg.model.norm_groups)
    assert _options_for(m) == f"--model-size {preset}"  # what init-from's refusals would suggest
    net = model_from_config(cfg)[0].eval()
    check_source(src, net, cfg)  # a run with --model-size PRESET takes the folder without a difference
    net.load_state_dict(src.state)
    assert outputs(ema).abs().mean() > 0.05 and torch.equal(outputs(net), outputs(ema))
    own = build_model(m, 3, 3).eval()  # the config read from the folder builds the same network by itself
    own.load_state_dict(src.state)
    assert torch.equal(outputs(own), outputs(ema))


@pytest.mark.parametrize("freq_shift", [0, 4])
def test_an_adm_shaped_unet2dmodel_with_its_default_time_width_is_read_exactly(tmp_path, freq_shift):
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(  # time_embedding_dim left to diffusers: 4 * block_out_channels[0] = 128
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, attn_norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=16, flip_sin_to_cos=False, freq_shift=freq_shift, resnet_time_scale_shift="scale_shift")
    perturb(unet, seed=freq_shift)
    with torch.no_grad():  # a shift leaves 2 * shift frequencies ddpmkit does not have: the MLP must not read them
        w = unet.time_embedding.linear_1.weight
        w[:, 16 - freq_shift:16] = 0
        w[:, 32 - freq_shift:] = 0
    unet.save_pretrained(tmp_path / "unet")
    src = read_source(tmp_path / "unet")
    m = src.model
    assert (m.time_dim, m.time_features, m.norm_groups, m.num_heads) == (128, 32 - 2 * freq_shift, 8, 4)
    net = build_model(m, 3, 3).eval()
    net.load_state_dict(src.state)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0, 400, 999])
    with torch.no_grad():
        ours, theirs = net(x, t), unet(x, t).sample
    assert ours.abs().mean() > 0.05 and (ours - theirs).abs().max() < 1e-5


def train_args(folder, workdir, epochs, *extra):
    return ["train", "--data", str(folder), "--workdir", str(workdir), "--run-name", "r", "--epochs", str(epochs),
            "--batch-size", "8", "--image-size", "8", "--channels", "3", "--device", "cpu", "--sample-every", "0",
            "--ema-decay", "0.9", "--lr-schedule", "constant", "--no-progress", *extra]


def test_a_new_run_starts_from_the_files_weights(image_folder, tmp_path, capsys):
    _, ema = checkpoint(tmp_path / "ckpt.pt")
    assert main(["export", "--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "pipe"),
                 "--format", "diffusers"]) == 0
    # A learning rate of 1e-9 moves no weight by more than 3 steps x 1e-9 (AdamW's step is about lr).
    args = train_args(image_folder, tmp_path / "w", 1, "--lr", "1e-9", "--init-from", str(tmp_path / "pipe"), *ADM68_FLAGS)
    assert main(args) == 0
    assert f"init-from: starting from the diffusers UNet2DModel in {tmp_path / 'pipe'}" in capsys.readouterr().out
    trained = states(tmp_path / "w")
    for key, value in ema.state_dict().items():  # the network and its EMA both started from the file's weights
        assert (trained["model_state_dict"][key] - value).abs().max() < 1e-7, key
        assert (trained["ema_state_dict"][key] - value).abs().max() < 1e-7, key
    assert main(train_args(image_folder, tmp_path / "w2", 1, "--lr", "1e-9", *ADM68_FLAGS)) == 0  # without it
    fresh = states(tmp_path / "w2")["model_state_dict"]
    assert (fresh["conv_in.weight"] - ema.state_dict()["conv_in.weight"]).abs().max() > 0.1


def test_a_fine_tune_resumes_exactly_and_then_ignores_init_from(image_folder, tmp_path, capsys):
    checkpoint(tmp_path / "ckpt.pt")
    init = ["--init-from", str(tmp_path / "ckpt.pt"), *ADM68_FLAGS]
    assert main(train_args(image_folder, tmp_path / "straight", 2, *init)) == 0
    assert main(train_args(image_folder, tmp_path / "resumed", 1, *init)) == 0
    capsys.readouterr()
    (tmp_path / "ckpt.pt").unlink()  # the resume reads its own checkpoint only
    assert main(train_args(image_folder, tmp_path / "resumed", 2, *init)) == 0
    assert "--init-from is ignored: run 'r' resumes from its own checkpoint" in capsys.readouterr().out
    assert_same_training_state(states(tmp_path / "straight"), states(tmp_path / "resumed"))


def one_line_error(capsys, code):
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpm: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_another_network_is_refused_in_one_line_naming_what_differs(image_folder, tmp_path, capsys):
    checkpoint(tmp_path / "adm68.pt")
    err = one_line_error(capsys, main(train_args(image_folder, tmp_path / "w", 1, "--model-size", "tiny",
                                                 "--init-from", str(tmp_path / "adm68.pt"))))
    assert "init-from: level widths [68, 136] in the file, [32, 64, 64] in this run's model" in err
    assert "time_dim 68 in the file, 256 in this run's model" in err and "--model-size tiny" in err
    assert "time features 68 in the file, 32 in this run's model" in err
    assert "GroupNorm groups 17 in the file, 8 in this run's model" in err
    assert "--set model.base_channels=68" in err
    # tiny as it was before its time features and groups matched UNet2DModel: not today's tiny
    checkpoint(tmp_path / "old_tiny.pt", {"size": "tiny", "time_features": 0, "norm_groups": 0})
    err = one_line_error(capsys, main(train_args(image_folder, tmp_path / "w", 1, "--model-size", "tiny",
                                                 "--init-from", str(tmp_path / "old_tiny.pt"))))
    assert "time features 256 in the file, 32 in this run's model" in err
    assert "GroupNorm groups 8 at 32, 16 at 64" in err and "8 in this run's model" in err
    assert "--set model.time_features" not in err and "model.norm_groups" not in err  # 0 for that file
    checkpoint(tmp_path / "grey.pt", channels=1)
    err = one_line_error(capsys, main(train_args(image_folder, tmp_path / "w", 1, "--init-from",
                                                 str(tmp_path / "grey.pt"), *ADM68_FLAGS)))
    assert "input channels 1 in the file, 3 in this run's model" in err and "--channels 1" in err
    checkpoint(tmp_path / "sigma.pt", learn_sigma=True)
    err = one_line_error(capsys, main(train_args(image_folder, tmp_path / "w", 1, "--init-from",
                                                 str(tmp_path / "sigma.pt"), *ADM68_FLAGS)))
    assert "output channels 6 in the file (a learned variance), 3" in err and "diffusion.learn_sigma=true" in err
    seed_checkpoint(tmp_path / "seed.pt")
    err = one_line_error(capsys, main(train_args(image_folder, tmp_path / "w", 1, "--model-size", "tiny",
                                                 "--init-from", str(tmp_path / "seed.pt"))))
    assert "architecture unet in the file, adm in this run's model" in err and "--model-size seed" in err
    assert not (tmp_path / "w" / "models" / "r" / "ckpt.pt").exists()


def test_a_diffusers_unet_that_is_not_adm_is_refused(tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    ddpm_like = diffusers.UNet2DModel(sample_size=8, block_out_channels=(32, 64), norm_num_groups=8,
                                      down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                      up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    ddpm_like.save_pretrained(tmp_path / "unet")
    with pytest.raises(Exception, match="not an ADM network: flip_sin_to_cos=True.*resnet_time_scale_shift='default'"):
        read_source(tmp_path / "unet")
    # An ADM layout whose time MLP reads frequencies ddpmkit's embedding does not have.
    _, ema = checkpoint(tmp_path / "ckpt.pt", dict(ADM68, time_dim=64))
    assert main(["export", "--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "pipe"),
                 "--format", "diffusers"]) == 0
    unet = diffusers.UNet2DModel.from_pretrained(tmp_path / "pipe" / "unet")
    with torch.no_grad():
        unet.time_embedding.linear_1.weight[:, 33] = 0.5  # sin of a frequency beyond ddpmkit's 32
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    with pytest.raises(Exception, match="sinusoidal features that ddpmkit's time embedding"):
        read_source(tmp_path / "pipe")


def test_seed_tutorial_checkpoint_samples_exports_and_is_not_resumed(tmp_path, capsys):
    net = seed_checkpoint(tmp_path / "seed.pt", prefix="module.")  # saved from a DataParallel model
    model, diffusion, cfg = load_model(tmp_path / "seed.pt")
    assert (cfg.model.arch, cfg.diffusion.schedule, cfg.diffusion.timesteps, cfg.diffusion.prediction) == \
        ("unet", "linear", 1000, "eps")
    assert (cfg.data.image_size, cfg.data.channels, cfg.diffusion.clip_denoised) == (64, 3, False)
    assert torch.equal(outputs(model), outputs(net))
    assert main(["sample", "--ckpt", str(tmp_path / "seed.pt"), "-n", "1", "--steps", "2", "--no-progress",
                 "--out", str(tmp_path / "s.png")]) == 0 and (tmp_path / "s.png").is_file()
    assert main(["export", "--ckpt", str(tmp_path / "seed.pt"), "--out", str(tmp_path / "exp")]) == 0
    run_dir = tmp_path / "w" / "models" / "r"
    run_dir.mkdir(parents=True)
    (tmp_path / "seed.pt").rename(run_dir / "ckpt.pt")  # the seed's run folder, as the tutorial leaves it
    err = one_line_error(capsys, main(train_args(tmp_path, tmp_path / "w", 1)))
    assert "is the seed tutorial's checkpoint, not a ddpmkit run" in err and "--init-from" in err


@pytest.mark.slow  # the seed UNet's 23M parameters: about 20 s on 2 vCPUs
def test_seed_tutorial_checkpoint_fine_tunes_as_the_seed_unet(image_folder, tmp_path):
    net = seed_checkpoint(tmp_path / "seed.pt")
    assert main(train_args(image_folder, tmp_path / "w", 1, "--model-size", "seed", "--lr", "1e-9",
                           "--init-from", str(tmp_path / "seed.pt"))) == 0
    trained = states(tmp_path / "w")["model_state_dict"]
    for key, value in net.state_dict().items():
        assert (trained[key] - value).abs().max() < 1e-7, key


def test_another_diffusion_is_allowed_and_noted(tmp_path):
    from ddpmkit.export.init_from import load_initial_weights

    checkpoint(tmp_path / "eps.pt")
    ckpt = torch.load(tmp_path / "eps.pt", weights_only=True)
    ckpt["config"]["diffusion"].update(prediction="eps", schedule="linear")
    torch.save(ckpt, tmp_path / "eps.pt")
    cfg = validate(apply_overrides(new_run_config(), {"model": ADM68, "data": {"channels": 3, "image_size": 8}}))
    model, lines = model_from_config(cfg)[0], []
    load_initial_weights(model, cfg, tmp_path / "eps.pt", lines.append)
    assert torch.equal(model.state_dict()["conv_in.weight"], ckpt["ema_state_dict"]["conv_in.weight"])
    assert lines[-1] == ("note: init-from: those weights were trained with prediction eps, schedule linear; this run "
                         "uses v, cosine, which fine-tuning adapts them to (--set diffusion.prediction=eps "
                         "--set diffusion.schedule=linear keeps the file's)")
