"""Non-square images (`--image-size HxW`): the config, the data loader's crop, and a 2:1 run end to end."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import ddpmkit.train as train_module
from ddpmkit import extractors
from ddpmkit.checkpoint import config_of, load_checkpoint, model_from_config
from ddpmkit.cli import main
from ddpmkit.config import (Config, DataConfig, apply_overrides, from_dict, load_file, new_run_config,
                            parse_image_size, validate, with_default_model)
from ddpmkit.data import builtin_digits, builtin_shapes, fit_arrays, load_data, load_image
from ddpmkit.errors import DdpmError
from ddpmkit.loading import load_model
from ddpmkit.models.registry import build_model

H, W = 16, 8  # 2:1, taller than wide: a transposed shape anywhere shows up as (8, 16)
RUN = ["--image-size", f"{H}x{W}", "--model-size", "tiny", "--batch-size", "32", "--timesteps", "40",
       "--sample-steps", "2", "--device", "cpu", "--no-progress", "--logger", "none", "--native-grids", "true"]


def error_line(capsys, code):
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpm: error: ") and "\n" not in err and "Traceback" not in err
    return err


# --- config ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value, hw", [("64x48", (64, 48)), ("64X48", (64, 48)), (" 64 x 48 ", (64, 48)),
                                       ("64", (64, 0)), (64, (64, 0)), (64.0, (64, 0)), ("64x64", (64, 0))])
def test_image_size_parses_n_or_height_x_width(value, hw):
    assert parse_image_size(value) == hw


@pytest.mark.parametrize("value, match", [("64x", "is not N"), ("x48", "is not N"), ("64x48x2", "is not N"),
                                          ("big", "is not N"), (True, "is not N"), ("0x48", ">= 4 pixels"),
                                          ("64x2", ">= 4 pixels")])
def test_bad_image_sizes_are_refused(value, match):
    with pytest.raises(DdpmError, match=match):
        parse_image_size(value)


def test_height_and_width_round_trip_through_the_dict_toml_and_the_checkpoint(tmp_path):
    cfg = validate(apply_overrides(new_run_config(), with_default_model({"data": {"image_size": "16x8"}})))
    assert (cfg.data.image_size, cfg.data.image_width, cfg.data.hw) == (16, 8, (16, 8))
    assert from_dict(cfg.to_dict()) == cfg
    # "HxW" in a file, or the two keys, are the same config; a plain number stays a square.
    (tmp_path / "a.toml").write_text('[data]\nimage_size = "16x8"\n')
    (tmp_path / "b.toml").write_text("[data]\nimage_size = 16\nimage_width = 8\n")
    (tmp_path / "c.toml").write_text("[data]\nimage_size = 16\n")
    got = [apply_overrides(cfg, load_file(tmp_path / f"{k}.toml")).data.hw for k in "abc"]
    assert got == [(16, 8), (16, 8), (16, 16)]
    # A config stored before image_width existed loads as the square it was.
    old = cfg.to_dict()
    del old["data"]["image_width"]
    old["data"]["image_size"] = 32
    assert from_dict(old).data.hw == (32, 32) and from_dict(old).data.image_width == 0
    # HxH is the square H, spelled one way
    assert validate(apply_overrides(new_run_config(), {"data": {"image_size": 16, "image_width": 16}})).data.image_width == 0
    with pytest.raises(DdpmError, match="disagree"):
        apply_overrides(cfg, {"data": {"image_size": "16x8", "image_width": 4}})


def test_the_default_model_size_follows_the_longer_side():
    assert with_default_model({"data": {"image_size": "32x16"}})["model"]["size"] == "tiny"
    assert with_default_model({"data": {"image_size": "16x48"}})["model"]["size"] == "small"


def test_model_and_diffusion_are_built_at_height_x_width():
    cfg = validate(apply_overrides(new_run_config(), {"data": {"image_size": "16x8", "channels": 1},
                                                      "model": {"size": "tiny"}}))
    model, diffusion = model_from_config(cfg)
    assert diffusion.hw == (16, 8)
    x = torch.randn(2, 1, 16, 8)
    assert model(x, torch.rand(2)).shape == (2, 1, 16, 8)


@pytest.mark.parametrize("size", ["tiny", "seed"])
def test_both_backbones_take_non_square_inputs(size):
    cfg = apply_overrides(Config(), {"model": {"size": size, "base_channels": 8, "num_heads": 2}}).model
    net = build_model(cfg, 1, 1).eval()
    factor = 2 ** (len(cfg.channel_mults) - 1)
    for h, w in ((2 * factor, factor), (factor, 3 * factor)):
        assert net(torch.randn(1, 1, h, w), torch.rand(1)).shape == (1, 1, h, w)
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(1, 1, 2 * factor, factor + 1), torch.rand(1))


# --- data ------------------------------------------------------------------------------------

def test_center_crop_keeps_the_middle_of_the_long_side(tmp_path):
    """A 16 x 32 image of four 8-px wide vertical bands 0 | 80 | 160 | 255 at H x W = 16 x 16 and
    16 x 8 needs no scaling (scale max(H/h, W/w) = 1): the crop keeps exactly columns 8..23 and
    12..19, half 80 and half 160. At 8 x 8 (scale 1/2) the outer bands are cropped away too."""
    src = np.repeat(np.array([0, 80, 160, 255], np.uint8), 8)[None].repeat(16, 0)
    Image.fromarray(src).save(tmp_path / "wide.png")
    Image.fromarray(np.ascontiguousarray(src.T)).save(tmp_path / "tall.png")  # 32 x 16: bands top to bottom
    for (h, w), half in (((16, 16), 8), ((16, 8), 4)):
        out = load_image(tmp_path / "wide.png", (h, w), 1)[..., 0]
        assert out.shape == (h, w)
        assert (out[:, :half] == 80).all() and (out[:, half:] == 160).all()
        out = load_image(tmp_path / "tall.png", (w, h), 1)[..., 0]  # the same, transposed
        assert out.shape == (w, h)
        assert (out[:half] == 80).all() and (out[half:] == 160).all()
    small = load_image(tmp_path / "wide.png", (8, 8), 1)[..., 0].astype(int)
    assert small.shape == (8, 8) and small.min() >= 60 and small.max() <= 180  # no 0 or 255 band left
    assert np.abs(small[:, :3] - 80).max() <= 6 and np.abs(small[:, 5:] - 160).max() <= 6  # bicubic overshoot
    # a square size is the old square crop
    assert np.array_equal(load_image(tmp_path / "wide.png", 16, 1), load_image(tmp_path / "wide.png", (16, 16), 1))


def test_every_source_kind_loads_at_height_x_width(tmp_path):
    assert builtin_digits((H, W)).shape == (1797, H, W, 1)
    assert builtin_shapes((H, W), n=4).shape == (4, H, W, 3)
    arr = np.random.default_rng(0).integers(0, 256, (5, 30, 20, 3), dtype=np.uint8)
    assert fit_arrays(arr, (H, W)).shape == (5, H, W, 3)
    np.save(tmp_path / "a.npy", arr)
    assert load_data(str(tmp_path / "a.npy"), (H, W)).images.shape == (5, H, W, 3)
    (tmp_path / "folder").mkdir()
    for k in range(3):
        Image.fromarray(arr[k]).save(tmp_path / "folder" / f"{k}.png")
    cache = tmp_path / "cache"
    for _ in range(2):  # decoded, then read back from the cache
        assert load_data(str(tmp_path / "folder"), (H, W), 3, str(cache)).images.shape == (3, H, W, 3)
    assert load_data(str(tmp_path / "folder"), (W, H), 3, str(cache)).images.shape == (3, W, H, 3)  # own key


# --- a 2:1 run end to end --------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """256 digits at 16 x 8, one epoch of the tiny model (8 steps), then a resume to epoch 2."""
    root = tmp_path_factory.mktemp("nonsquare")
    data = root / "digits.npy"
    np.save(data, builtin_digits((H, W))[:256])
    old_threads, old_curves = torch.get_num_threads(), train_module.DRAW_CURVES
    torch.set_num_threads(1)
    train_module.DRAW_CURVES = False
    try:
        args = ["train", "--data", str(data), "--workdir", str(root), "--run-name", "tall", *RUN]
        assert main([*args, "--epochs", "1"]) == 0
        first = load_checkpoint(root / "models/tall/ckpt.pt")
        assert main([*args[:-len(RUN)], "--device", "cpu", "--no-progress", "--epochs", "2"]) == 0  # no --image-size
    finally:
        torch.set_num_threads(old_threads)
        train_module.DRAW_CURVES = old_curves
    return root, data, first


def test_training_writes_height_x_width_grids_and_a_checkpoint_that_keeps_the_shape(run):
    root, _, first = run
    for name in ("0.jpg", "1.jpg"):  # 16 images, 4 per row, 2 px padding, native size
        assert Image.open(root / "results/tall" / name).size == (4 * (W + 2) + 2, 4 * (H + 2) + 2)
    ckpt = load_checkpoint(root / "models/tall/ckpt.pt")
    assert (ckpt["config"]["data"]["image_size"], ckpt["config"]["data"]["image_width"]) == (H, W)
    assert config_of(first).data.hw == config_of(ckpt).data.hw == (H, W)
    assert ckpt["global_step"] == 16  # 2 epochs of 8 steps: resumed, without --image-size


def test_resuming_at_another_shape_is_refused(run, capsys, one_torch_thread):
    root, data, _ = run
    base = ["train", "--data", str(data), "--workdir", str(root), "--run-name", "tall", "--epochs", "2",
            "--device", "cpu", "--no-progress"]
    for size in (str(H), f"{W}x{H}"):
        assert "trained at image size 16x8, not " in error_line(capsys, main([*base, "--image-size", size]))


def test_sample_writes_height_x_width_images_grids_and_trajectories(run, tmp_path, one_torch_thread):
    root = run[0]
    ckpt = str(root / "models/tall/ckpt.pt")
    assert main(["sample", "--ckpt", ckpt, "-n", "4", "--steps", "3", "--out", str(tmp_path / "g.png"),
                 "--out-dir", str(tmp_path / "each"), "--native-size", "--no-progress",
                 "--trajectory", str(tmp_path / "t.png")]) == 0
    assert [Image.open(p).size for p in sorted((tmp_path / "each").iterdir())] == [(W, H)] * 4
    assert Image.open(tmp_path / "g.png").size == (2 * (W + 2) + 2, 2 * (H + 2) + 2)  # 2 x 2 grid
    strip = Image.open(tmp_path / "t.png")  # x_t and x0 rows of 4 samples
    assert strip.height == 2 * 4 * (H + 2) + 2
    model, diffusion, cfg = load_model(ckpt)
    assert diffusion.hw == (H, W) and diffusion.generate(model, 1, steps=2, progress=False).shape == (1, 1, H, W)


def test_eval_scores_at_height_x_width(run, tmp_path, monkeypatch, one_torch_thread):
    root, data, _ = run
    seen = set()
    forward = extractors.RandomConvExtractor._forward

    def recording(self, x):
        seen.add(tuple(x.shape[-2:]))
        return forward(self, x)

    monkeypatch.setattr(extractors.RandomConvExtractor, "_forward", recording)
    out = tmp_path / "fid.json"
    assert main(["eval", "--ckpt", str(root / "models/tall/ckpt.pt"), "--ref", str(data), "-n", "8", "--steps", "2",
                 "--extractor", "randconv", "--cache-dir", str(tmp_path / "c"), "--json", str(out),
                 "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert (result["n_fake"], result["n_real"]) == (8, 256) and np.isfinite(result["fid"])
    assert seen == {(H, W)}  # generated and reference images alike
    assert main(["sample", "--ckpt", str(root / "models/tall/ckpt.pt"), "-n", "5", "--steps", "2", "--out-dir",
                 str(tmp_path / "s"), "--no-progress"]) == 0
    seen.clear()
    assert main(["eval", "--samples", str(tmp_path / "s"), "--ref", str(data), "--extractor", "randconv",
                 "--cache-dir", str(tmp_path / "c"), "--no-progress"]) == 0
    assert seen == {(H, W)}


def test_inpainting_and_sdedit_take_height_x_width_inputs(run, tmp_path, capsys, one_torch_thread):
    root = run[0]
    ckpt = str(root / "models/tall/ckpt.pt")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (H, W), dtype=np.uint8)).save(tmp_path / "init.png")
    mask = np.zeros((H, W), np.uint8)
    mask[H // 2:] = 255  # generate the bottom half
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(np.ascontiguousarray(mask.T)).save(tmp_path / "mask_t.png")
    assert main(["sample", "--ckpt", ckpt, "-n", "2", "--steps", "2", "--inpaint", str(tmp_path / "init.png"),
                 "--mask", str(tmp_path / "mask.png"), "--out-dir", str(tmp_path / "ip"), "--no-progress"]) == 0
    got = np.asarray(Image.open(tmp_path / "ip/000000.png"))
    assert got.shape == (H, W)
    assert np.array_equal(got[:H // 2], np.asarray(Image.open(tmp_path / "init.png"))[:H // 2])  # kept pixels
    err = error_line(capsys, main(["sample", "--ckpt", ckpt, "-n", "1", "--inpaint", str(tmp_path / "init.png"),
                                   "--mask", str(tmp_path / "mask_t.png"), "--no-progress"]))
    assert "is 8x16 (height x width) but the model makes 16x8 images" in err
    assert main(["edit", "--ckpt", ckpt, "--init", str(tmp_path / "mask_t.png"), "--strength", "0.5", "--steps", "2",
                 "--out", str(tmp_path / "e.png"), "--native-size"]) == 0
    assert Image.open(tmp_path / "e.png").size == (W, H)  # a wide --init is fitted to the tall model


@pytest.mark.parametrize("method", ["student", "sfd"])
def test_distilled_students_train_and_sample_at_height_x_width(run, tmp_path, method, monkeypatch, one_torch_thread):
    """The methods whose training data is not the images: the student's (noise, image) pairs and
    SFD's noise rows are H x W as well."""
    from ddpmkit.distill import tasks as distill_tasks

    root, shapes = run[0], set()
    noise_batches = distill_tasks.noise_batches

    def recording(data, shape, *args):
        shapes.add(tuple(shape))
        return noise_batches(data, shape, *args)

    monkeypatch.setattr(distill_tasks, "noise_batches", recording)
    extra = ["--pairs", "8"] if method == "student" else ["--steps", "2"]
    assert main(["distill", "--teacher", str(root / "models/tall/ckpt.pt"), "--method", method, "--run-name", method,
                 "--images", "16", "--batch-size", "8", "--device", "cpu", "--workdir", str(tmp_path),
                 "--no-progress", *extra]) == 0
    if method == "student":
        assert np.load(tmp_path / "models/student/pairs.npy", mmap_mode="r").shape == (8, 2, 1, H, W)
    else:
        assert shapes == {(1, H, W)}
    model, diffusion, cfg = load_model(tmp_path / f"models/{method}/ckpt.pt")
    assert cfg.data.hw == diffusion.hw == (H, W)
    assert diffusion.generate(model, 1, steps=1, progress=False).shape == (1, 1, H, W)


def test_a_latent_run_works_on_height_over_f_by_width_over_f_latents(run, tmp_path, one_torch_thread, monkeypatch):
    monkeypatch.setattr(train_module, "DRAW_CURVES", False)
    data = str(run[1])
    common = ["--data", data, "--workdir", str(tmp_path), "--batch-size", "32", "--epochs", "1", "--device", "cpu",
              "--no-progress", "--logger", "none", "--sample-every", "0"]
    assert main(["train-ae", "--run-name", "ae", "--image-size", f"{H}x{W}", "--downsample", "2",
                 "--latent-channels", "2", "--ae-channels", "8", *common]) == 0
    ae = str(tmp_path / "models/ae/ckpt.pt")
    assert config_of(load_checkpoint(ae)).data.hw == (H, W)
    # the image size comes from the autoencoder; the diffusion model works on 8 x 4 latents
    assert main(["train", "--autoencoder", ae, "--run-name", "ldm", "--model-size", "tiny", "--timesteps", "20",
                 *common]) == 0
    model, diffusion, cfg = load_model(tmp_path / "models/ldm/ckpt.pt")
    assert (diffusion.hw, diffusion.image_hw, cfg.data.hw) == ((H // 2, W // 2), (H, W), (H, W))
    assert diffusion.generate(model, 2, steps=2, progress=False).shape == (2, 1, H, W)


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("args, match", [
    (["--image-size", "64x"], "image size '64x' is not N \\(a square\\) or HxW"),
    (["--image-size", "0x48"], "height and width must each be >= 4"),
    (["--image-size", "64x46"], "image size 64x46 is not divisible by 4 on each side.*--image-size 64x48"),
    (["--image-size", "64x48", "--set", "data.image_width=40"], "disagree"),
    (["--image-size", "16", "--set", "data.image_width=6"], "image size 16x6 is not divisible.*--image-size 16x8"),
])
def test_bad_image_sizes_are_one_line_cli_errors(run, tmp_path, capsys, args, match):
    import re
    code = main(["train", "--data", str(run[1]), "--workdir", str(tmp_path), "--model-size", "tiny",
                 "--epochs", "0", "--device", "cpu", "--no-progress", *args])
    assert re.search(match, error_line(capsys, code))


def test_bad_latent_image_sizes_are_one_line_cli_errors(run, tmp_path, capsys):
    ae = ["train-ae", "--data", str(run[1]), "--workdir", str(tmp_path), "--epochs", "0", "--no-progress"]
    err = error_line(capsys, main([*ae, "--image-size", "16x10", "--downsample", "4"]))
    assert "--image-size 16x10 is not a multiple of --downsample 4 on each side" in err and err.endswith("16x8")
    cfg = Config(data=DataConfig(image_size=16, image_width=12))
    cfg.autoencoder.path, cfg.autoencoder.downsample = "ae.pt", 4
    with pytest.raises(DdpmError, match="latent size 4x3 is not divisible by 4 on each side"):
        validate(apply_overrides(cfg, {"model": {"size": "tiny"}}))


def test_the_diffusers_export_samples_at_height_x_width(run, tmp_path, one_torch_thread):
    diffusers = pytest.importorskip("diffusers")  # the `test` extra installs it
    root, _, _ = run
    assert main(["export", "--ckpt", str(root / "models/tall/ckpt.pt"), "--out", str(tmp_path / "pipe"),
                 "--format", "diffusers"]) == 0
    assert json.loads((tmp_path / "pipe/unet/config.json").read_text())["sample_size"] == [H, W]
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=1, num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, H, W, 1)
