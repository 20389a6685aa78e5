import pytest

from ddpmkit.config import Config, apply_overrides, from_dict, load_file, new_run_config, validate
from ddpmkit.errors import DdpmError


def test_defaults_are_the_seeds_launch_values():
    cfg = Config()
    assert (cfg.train.run_name, cfg.train.epochs, cfg.train.batch_size, cfg.data.image_size, cfg.train.lr) == \
        ("DDPM_Unconditional", 500, 8, 64, 3e-4)
    assert (cfg.diffusion.timesteps, cfg.diffusion.beta_start, cfg.diffusion.beta_end) == (1000, 1e-4, 0.02)
    validate(cfg)


def test_a_new_run_gets_the_measured_recipe_and_an_old_config_keeps_its_meaning(tmp_path):
    from ddpmkit.train import prepare

    cfg, _ = prepare({"train": {"workdir": str(tmp_path)}})
    d, t = cfg.diffusion, cfg.train
    assert (d.prediction, d.loss_weighting, d.schedule, t.lr_schedule) == ("v", "min_snr", "cosine", "cosine")
    assert cfg.train.lr == 3e-4  # the seed's launch() value stays
    # The backbone follows the image size (64 px by default); the grids sample as `ddpm sample` does,
    # and a checkpoint is written every 10 minutes.
    assert cfg.model.size == "small" and cfg.model.arch == "adm"
    assert (t.sample_sampler, t.sample_steps, t.ckpt_every_minutes) == ("dpm++2m", 20, 10.0)
    assert prepare({"data": {"image_size": 32}, "train": {"workdir": str(tmp_path)}})[0].model.size == "tiny"
    assert prepare({"data": {"image_size": 48}, "train": {"workdir": str(tmp_path)}})[0].model.size == "small"
    seed = prepare({"model": {"size": "seed"}, "train": {"workdir": str(tmp_path)}})[0].model
    assert (seed.size, seed.arch) == ("seed", "unet")
    tweaked = prepare({"model": {"dropout": 0.1}, "train": {"workdir": str(tmp_path)}})[0].model
    assert (tweaked.size, tweaked.base_channels, tweaked.dropout) == ("small", 64, 0.1)
    assert prepare({"diffusion": {"prediction": "eps"}, "train": {"workdir": str(tmp_path)}})[0] \
        .diffusion.prediction == "eps"
    # A stored config written before these keys existed (or before the recipe) reads as it was meant.
    stored = new_run_config().to_dict()
    for key in ("prediction", "loss_weighting", "schedule"):
        del stored["diffusion"][key]
    del stored["train"]["lr_schedule"]
    old = from_dict(stored)
    assert (old.diffusion.prediction, old.diffusion.loss_weighting, old.diffusion.schedule, old.train.lr_schedule) \
        == ("eps", "none", "linear", "constant")


def test_round_trip_through_dict():
    cfg = apply_overrides(Config(), {"model": {"size": "tiny"}, "train": {"lr": "1e-3", "bf16": "true"}})
    assert cfg.model.base_channels == 32 and cfg.train.lr == 1e-3 and cfg.train.bf16 is True
    assert from_dict(cfg.to_dict()) == cfg


def test_preset_then_explicit_model_keys():
    cfg = apply_overrides(Config(), {"model": {"size": "tiny", "dropout": 0.1}})
    assert cfg.model.size == "tiny" and cfg.model.dropout == 0.1 and cfg.model.channel_mults == (1, 2, 2)


def test_toml_and_yaml(tmp_path):
    (tmp_path / "a.toml").write_text('[model]\nchannel_mults = [1, 2]\n[train]\nlr = 0.001\n')
    (tmp_path / "a.yaml").write_text("model:\n  channel_mults: [1, 2]\ntrain:\n  lr: 0.001\n")
    for name in ("a.toml", "a.yaml"):
        cfg = apply_overrides(Config(), load_file(tmp_path / name))
        assert cfg.model.channel_mults == (1, 2) and cfg.train.lr == 0.001
    (tmp_path / "bad.toml").write_text("[train\n")
    with pytest.raises(DdpmError, match="cannot parse"):
        load_file(tmp_path / "bad.toml")
    with pytest.raises(DdpmError, match="not found"):
        load_file(tmp_path / "missing.toml")


@pytest.mark.parametrize("section,key,value,match", [
    ("model", "attn_levels", [5], "attn_levels must lie in"),
    ("model", "num_heads", 3, "must divide every level's width"),
    ("model", "dropout", 1.0, "dropout must be in"),
    ("diffusion", "prediction", "score", "prediction must be"),
    ("diffusion", "beta_start", 0.0, "beta_start must be in"),
    ("diffusion", "zero_terminal_snr", True, "needs prediction v or x0"),
    ("train", "ema_decay", 1.0, "ema_decay must be in"),
    ("train", "ema_sigma_rel", 0.3, "ema_sigma_rel must be 0"),
    ("train", "grad_accum", 0, "grad_accum must be >= 1"),
    ("train", "run_name", "../x", "plain folder name"),
    ("train", "sample_sampler", "magic", "sample_sampler 'magic'"),
    ("data", "channels", 2, "channels must be 1, 3"),
])
def test_validation_messages(section, key, value, match):
    with pytest.raises(DdpmError, match=match):
        validate(apply_overrides(Config(), {section: {key: value}}))


def test_learn_sigma_with_zero_terminal_snr_is_refused():
    # At SNR 0 the variational bound's x0 estimate is 0/0, so every batch with t = T-1 would be NaN.
    cfg = apply_overrides(Config(), {"diffusion": {"prediction": "v", "zero_terminal_snr": True, "learn_sigma": True}})
    with pytest.raises(DdpmError, match="learn_sigma cannot be combined with zero_terminal_snr"):
        validate(cfg)
    for one_of_them in ({"learn_sigma": False}, {"zero_terminal_snr": False}):
        validate(apply_overrides(cfg, {"diffusion": one_of_them}))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), [1], True, None])
def test_bad_types(value):
    with pytest.raises(DdpmError, match="is not a valid float"):
        apply_overrides(Config(), {"train": {"lr": value}})
