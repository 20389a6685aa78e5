"""Latent diffusion: the autoencoder, `ddpm train-ae`, and `ddpm train --autoencoder` checkpoints."""
import os
import signal
from dataclasses import replace
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch

import ddpmkit.train as train_module
from ddpmkit import latent, samplers, scoring
from ddpmkit.cli import main
from ddpmkit.config import Config, apply_overrides, validate
from ddpmkit.data import ImageData, epoch_batches, load_data, to_model_range
from ddpmkit.diffusion import Diffusion
from ddpmkit.errors import DdpmError
from ddpmkit.guidance import InpaintDenoiser, build_denoiser, generate
from ddpmkit.loading import load_model
from ddpmkit.models.autoencoder import AutoencoderKL, AutoencoderWithDisc, kl_standard_normal

AE_FLAGS = ["--image-size", "8", "--downsample", "2", "--latent-channels", "2", "--ae-channels", "8",
            "--batch-size", "8", "--device", "cpu", "--no-progress", "--log-every", "1", "--ema-decay", "0.9"]
LDM_FLAGS = ["--model-size", "custom", "--set", "model.base_channels=8", "--set", "model.channel_mults=1",
             "--set", "model.attn_levels=", "--set", "model.time_dim=16", "--timesteps", "20", "--batch-size", "8",
             "--device", "cpu", "--no-progress", "--sample-every", "0", "--epochs", "1"]


@pytest.fixture(autouse=True)
def quiet_and_fast(monkeypatch, one_torch_thread):
    monkeypatch.setattr(train_module, "DRAW_CURVES", False)


def save_blobs(folder):
    """24 smooth coloured blobs, 8x8 RGB, as FOLDER/blobs.npy, an array (N, H, W, C) uint8."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:8, 0:8]
    arr = np.stack([np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 6.0)[..., None] * rng.uniform(0.3, 1, 3)
                    for cy, cx in rng.uniform(2, 6, (24, 2))])
    path = folder / "blobs.npy"
    np.save(path, (arr * 255).astype(np.uint8))
    return path


@pytest.fixture
def blobs(tmp_path):
    return save_blobs(tmp_path)


def train_ae(data, workdir, *extra):
    return main(["train-ae", "--data", str(data), "--workdir", str(workdir), "--run-name", "ae", *AE_FLAGS, *extra])


@pytest.mark.parametrize("f", [2, 4, 8])
def test_autoencoder_round_trips_shapes_for_every_downsample(f):
    ae = AutoencoderKL(channels=3, latent_channels=4, downsample=f, base_channels=8)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, logvar = ae.encode(x)
    assert mean.shape == logvar.shape == (2, 4, 32 // f, 32 // f)
    recon, m2, _ = ae(x, torch.randn_like(mean))
    assert recon.shape == x.shape and torch.equal(m2, mean)
    assert ae.decode(mean).shape == x.shape


def test_kl_is_zero_exactly_at_the_standard_normal():
    zero = torch.zeros(3, 4, 2, 2)
    assert torch.equal(kl_standard_normal(zero, zero), torch.zeros(3))
    for mean, logvar in ((zero + 0.1, zero), (zero, zero + 0.1), (zero, zero - 0.1)):
        assert (kl_standard_normal(mean, logvar) > 0).all()
    # closed form against a Monte-Carlo estimate of E_q[log q(z) - log p(z)]
    mean, logvar = torch.full((1, 1), 0.7), torch.full((1, 1), -0.5)
    q, p = torch.distributions.Normal(0.7, (-0.25 * torch.ones(())).exp()), torch.distributions.Normal(0.0, 1.0)
    z = q.sample(torch.Size([200_000]))
    assert abs(kl_standard_normal(mean, logvar).item() - (q.log_prob(z) - p.log_prob(z)).mean().item()) < 0.01


def test_scale_factor_gives_unit_variance_on_its_data(blobs, tmp_path):
    z = torch.randn(50, 4, 3, 3) * 3.7 + 0.4
    assert abs((z * latent.measure_scale_factor(z)).double().std().item() - 1.0) < 1e-6
    assert train_ae(blobs, tmp_path, "--epochs", "1", "--sample-every", "0") == 0
    ov = latent.latent_overrides(str(tmp_path / "models/ae/ckpt.pt"), {"data": {"path": str(blobs)}, "model": {"size": "tiny"},
                                                                       "train": {"device": "cpu"}})
    cfg = validate(apply_overrides(Config(), ov))
    task = latent.LatentTask()
    data = task.data(cfg, lambda *a: None)
    batches = torch.cat(list(task.batches(data, cfg, 0, 0, 0, 1, "cpu")))
    assert abs(batches.double().std().item() - 1.0) < 1e-5 and len(batches) == 24


def stopping_at(monkeypatch, n):
    """SIGTERM during the n-th loss evaluation of the next run."""
    real, calls = latent.AutoencoderLoss.__call__, {"n": 0}

    def call(self, net, x0, draws):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, net, x0, draws)

    monkeypatch.setattr(latent.AutoencoderLoss, "__call__", call)
    return real


def test_train_ae_stop_and_resume_is_bit_identical(blobs, tmp_path, monkeypatch, capsys):
    # The discriminator joins at step 4, after the stop (step 4 of 6): the resumed run must know its step.
    flags = ["--epochs", "2", "--disc-weight", "0.5", "--disc-start", "4", "--sample-every", "1"]
    assert train_ae(blobs, tmp_path / "straight", *flags) == 0
    real = stopping_at(monkeypatch, 5)  # epoch 1, second batch (3 batches per epoch)
    assert train_ae(blobs, tmp_path / "resumed", *flags) == 0
    assert "Run the same `ddpm train-ae` command again" in capsys.readouterr().out
    mid = torch.load(tmp_path / "resumed/models/ae/ckpt.pt", weights_only=True)
    assert mid["next_epoch"] == 1 and mid["batch_in_epoch"] == 2
    monkeypatch.setattr(latent.AutoencoderLoss, "__call__", real)
    assert train_ae(blobs, tmp_path / "resumed", *flags) == 0
    a, b = (torch.load(tmp_path / w / "models/ae/ckpt.pt", weights_only=True) for w in ("straight", "resumed"))
    assert a["global_step"] == b["global_step"] == 6 and a["task_state"]["kind"] == "autoencoder"
    for key in ("model_state_dict", "ema_state_dict"):
        assert any(k.startswith("disc.") for k in a[key])
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert (tmp_path / "straight/results/ae/1.jpg").is_file()


def test_autoencoder_grid_pairs_inputs_with_reconstructions(blobs, tmp_path, monkeypatch):
    saved = {}
    monkeypatch.setattr(latent, "save_images", lambda images, path, **kw: saved.update(images=images, **kw))
    assert train_ae(blobs, tmp_path, "--epochs", "1", "--sample-every", "1") == 0
    images = saved["images"]
    assert images.shape == (16, 3, 8, 8) and saved["nrow"] == 8
    real = torch.from_numpy(np.load(blobs)[:8]).permute(0, 3, 1, 2)
    assert torch.equal(images[0::2], real)  # inputs at even places, their reconstructions next to them
    assert not torch.equal(images[1::2], real)


def test_latent_checkpoint_samples_after_the_autoencoder_file_is_deleted(blobs, tmp_path, monkeypatch):
    assert train_ae(blobs, tmp_path, "--epochs", "1", "--sample-every", "0") == 0
    ae_path = tmp_path / "models/ae/ckpt.pt"
    assert main(["train", "--autoencoder", str(ae_path), "--data", str(blobs), "--workdir", str(tmp_path),
                 "--run-name", "ldm", *LDM_FLAGS]) == 0
    ckpt = str(tmp_path / "models/ldm/ckpt.pt")
    ae, _ = latent.load_autoencoder(ae_path)
    # LDM's scale factor, measured here on the training data: 1 / std of all posterior-mean elements.
    with torch.no_grad():
        measured = 1.0 / ae.encode(to_model_range(torch.from_numpy(np.load(blobs))))[0].double().std().item()
    assert torch.load(ckpt, weights_only=True)["task_state"]["scale_factor"] == pytest.approx(measured, rel=1e-5)
    model, diffusion, cfg = load_model(ckpt)
    assert diffusion.scale_factor == pytest.approx(measured, rel=1e-5) and abs(measured - 1) > 0.1
    z = samplers.run(diffusion.denoiser(model), (3, 2, 4, 4), "ddim", 5, seed=1, first_index=0)
    expected = ae.decode(z / diffusion.scale_factor).clamp(-1, 1)
    ae_path.unlink()
    model, diffusion, cfg = load_model(ckpt)  # from the latent checkpoint alone
    images = diffusion.generate(model, 3, sampler="ddim", steps=5, seed=1, progress=False)
    assert images.shape == (3, 3, 8, 8) and torch.allclose(images, expected, atol=1e-5)
    assert main(["export", "--ckpt", ckpt, "--out", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp/autoencoder.safetensors").is_file()
    model, diffusion, _ = load_model(tmp_path / "exp")
    assert diffusion.scale_factor == pytest.approx(measured, rel=1e-5)
    assert torch.allclose(diffusion.generate(model, 3, sampler="ddim", steps=5, seed=1, progress=False), expected,
                          atol=1e-5)
    assert main(["sample", "--ckpt", ckpt, "-n", "2", "--steps", "3", "--sampler", "ddim", "--no-progress",
                 "--out-dir", str(tmp_path / "s")]) == 0
    from PIL import Image
    assert Image.open(tmp_path / "s/000000.png").size == (8, 8)
    shapes = []
    real_make = scoring.make_extractor

    def spying(*a, **k):
        ex = real_make(*a, **k)
        call = ex.__call__

        class Spy:
            def __getattr__(self, name):
                return getattr(ex, name)

            def __call__(self, images):
                shapes.append(tuple(images.shape[1:]))
                return call(images)
        return Spy()

    monkeypatch.setattr(scoring, "make_extractor", spying)
    assert main(["eval", "--ckpt", ckpt, "--ref", str(blobs), "-n", "4", "--steps", "2", "--extractor", "randconv",
                 "--no-progress"]) == 0
    assert shapes and set(shapes) == {(3, 8, 8)}  # eval scores decoded images, not (2, 4, 4) latents


def test_latent_inpainting_and_edit_encode_the_guide_and_decode_the_result(blobs, tmp_path, monkeypatch):
    """Inpainting and SDEdit of a latent model, as LDM (Rombach et al. 2022): the guide image encoded
    (scale_factor * E(x)), the mask on the latent grid (a cell is generated when any of its pixels is),
    sampling on the latents, the result decoded; the known pixels within the reconstruction error."""
    assert train_ae(blobs, tmp_path, "--epochs", "20", "--lr", "1e-2", "--ema-decay", "0", "--sample-every", "0") == 0
    assert main(["train", "--autoencoder", str(tmp_path / "models/ae/ckpt.pt"), "--data", str(blobs),
                 "--workdir", str(tmp_path), "--run-name", "ldm", *LDM_FLAGS]) == 0
    ckpt = str(tmp_path / "models/ldm/ckpt.pt")
    model, diffusion, _ = load_model(ckpt)
    pixels = np.load(blobs)[:1]
    guide = to_model_range(torch.from_numpy(pixels))  # (1, 3, 8, 8): latents are (2, 4, 4), f = 2
    one = torch.zeros(1, 1, 8, 8)
    one[..., 5, 2] = 1
    expected = torch.zeros(1, 1, 4, 4)
    expected[..., 2, 1] = 1  # the cell of pixel (5, 2): only it
    assert torch.equal(diffusion.latent_mask(one), expected)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 3:] = 1  # generate columns 3-7: column 3 shares latent column 1 with the known column 2
    cells = diffusion.latent_mask(mask)
    assert torch.equal(cells[0, 0, 0], torch.tensor([0.0, 1, 1, 1]))

    assert diffusion.clip_denoised and not build_denoiser(diffusion, model).clip_denoised  # latents are not in [-1, 1]
    ae, scale = diffusion.autoencoder, diffusion.scale_factor
    decode = lambda z: ae.decode(z / scale).clamp(-1, 1)
    with torch.no_grad():
        z_guide = ae.encode(guide)[0] * scale  # LDM: z = scale_factor * E(x), posterior mean
    seen, to_images, pasted, paste = [], diffusion.to_images, [], InpaintDenoiser.paste
    monkeypatch.setattr(diffusion, "to_images", lambda z: seen.append(z.clone()) or to_images(z))
    monkeypatch.setattr(InpaintDenoiser, "paste", lambda self, x0: pasted.append(x0.clone()) or paste(self, x0))
    out = generate(diffusion, model, 3, known=guide, mask=mask, sampler="ddim", steps=5, seed=0)
    z = torch.cat(seen)
    assert z.shape == (3, 2, 4, 4) and out.shape == (3, 3, 8, 8)
    torch.testing.assert_close(z[..., :1], z_guide[..., :1].expand(3, 2, 4, 1), rtol=0, atol=1e-6)  # known cells
    # ... and so already before generate's last paste (whose input is the sampler's own output).
    torch.testing.assert_close(pasted[-1][..., :1], z_guide[..., :1].expand(3, 2, 4, 1), rtol=0, atol=1e-5)
    assert (z[..., 1:] - z_guide[..., 1:]).abs().amax((1, 2, 3)).min() > 0.1  # generated cells
    torch.testing.assert_close(out[..., 3:], decode(z)[..., 3:], rtol=0, atol=1e-6)  # the decoded result
    keep = (mask == 0).expand_as(out)
    recon_error = (ae(guide)[0].clamp(-1, 1) - guide).abs()[keep[:1]].mean().item()  # through E, then D
    for image in out:
        assert (image - guide[0]).abs()[keep[0]].mean().item() <= recon_error + 1e-6

    with pytest.raises(DdpmError, match=r"needs \(1, 3, 8, 8\) at its image size"):
        generate(diffusion, model, 1, known=z_guide, mask=mask)  # latents are not what it takes
    with pytest.raises(DdpmError, match="give both"):
        generate(diffusion, model, 1, known=guide)

    # The command line: both read the guide at the image size (not the latent's) and write decoded images.
    from PIL import Image
    Image.fromarray(pixels[0]).save(tmp_path / "guide.png")
    Image.fromarray((mask[0, 0].numpy() * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    assert main(["sample", "--ckpt", ckpt, "--inpaint", str(tmp_path / "guide.png"), "--mask",
                 str(tmp_path / "mask.png"), "-n", "2", "--steps", "3", "--sampler", "ddim", "--no-progress",
                 "--device", "cpu", "--out-dir", str(tmp_path / "inpainted")]) == 0
    for f in sorted((tmp_path / "inpainted").glob("*.png")):
        got = np.asarray(Image.open(f).convert("RGB"), np.int16)
        assert got.shape == (8, 8, 3) and np.abs(got[:, :3] - pixels[0, :, :3]).max() <= 1
    # SDEdit: at a small strength the edit is the guide's reconstruction through the autoencoder.
    edited = generate(diffusion, model, 2, init=guide, strength=0.05, sampler="ddim", steps=20, seed=0)
    assert (edited - decode(z_guide)).abs().mean() < 0.3 * recon_error
    assert main(["edit", "--ckpt", ckpt, "--init", str(tmp_path / "guide.png"), "--strength", "0.5",
                 "--native-size", "--out", str(tmp_path / "edited.png"), "--device", "cpu"]) == 0
    assert Image.open(tmp_path / "edited.png").size == (8, 8)


def error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_bad_autoencoders_are_one_line_errors(blobs, tmp_path, capsys):
    assert train_ae(blobs, tmp_path, "--epochs", "1", "--sample-every", "0") == 0
    ae_path = str(tmp_path / "models/ae/ckpt.pt")
    run = ["--data", str(blobs), "--workdir", str(tmp_path), *LDM_FLAGS]
    capsys.readouterr()
    assert main(["train", "--autoencoder", ae_path, "--run-name", "a", "--image-size", "16", *run]) == 2
    err = error_line(capsys)
    assert "trained on 8x8 images" in err and ae_path in err  # names the autoencoder file
    assert main(["train", "--autoencoder", ae_path, "--run-name", "b", "--channels", "1", *run]) == 2
    assert "with 3 channel(s)" in error_line(capsys)
    assert main(["train", "--run-name", "pix", "--image-size", "8", *run]) == 0
    capsys.readouterr()
    pixel = str(tmp_path / "models/pix/ckpt.pt")
    assert main(["train", "--autoencoder", pixel, "--run-name", "c", *run]) == 2
    assert "is not an autoencoder checkpoint" in error_line(capsys)
    assert main(["sample", "--ckpt", ae_path, "-n", "1", "--no-progress"]) == 2
    assert "is an autoencoder" in error_line(capsys)
    assert main(["train", "--autoencoder", ae_path, "--run-name", "pix", *run]) == 2  # a pixel run, resumed
    assert "trained on pixels" in error_line(capsys)
    assert train_ae(blobs, tmp_path, "--epochs", "1", "--image-size", "12", "--downsample", "8", "--run-name",
                    "odd") == 2
    assert "not a multiple of --downsample 8" in error_line(capsys)


def test_resuming_an_autoencoder_run_with_another_shape_is_refused(blobs, tmp_path, capsys):
    assert train_ae(blobs, tmp_path, "--epochs", "1", "--sample-every", "0") == 0
    capsys.readouterr()
    assert train_ae(blobs, tmp_path, "--epochs", "2", "--latent-channels", "3") == 2
    err = error_line(capsys)
    assert "latent_channels" in err and not (tmp_path / "models/ae/ckpt.prev.pt").exists()
    assert "--run-name" in err and "--fresh" in err  # the ways out


# --- unit tests of latent.py's parts (fast; most share one tiny autoencoder run) ----------------

@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    """(blobs.npy, ckpt.pt) of one `ddpm train-ae` epoch (f = 2, 2 latent channels, EMA 0.9): read-only."""
    root = tmp_path_factory.mktemp("ae_run")
    data, threads = save_blobs(root), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(train_module, "DRAW_CURVES", False)
            assert train_ae(data, root, "--epochs", "1", "--sample-every", "0") == 0
    finally:
        torch.set_num_threads(threads)
    return data, root / "models/ae/ckpt.pt"


def ae_config(**autoencoder) -> Config:
    """`ddpm train-ae`'s config for the tests' autoencoder (f = 2, 2 latent channels, width 8), 8x8 RGB."""
    ov = latent.autoencoder_overrides({"data": {"image_size": 8, "channels": 3},
                                       "autoencoder": {"downsample": 2, "latent_channels": 2, "base_channels": 8,
                                                       **autoencoder}})
    return validate(apply_overrides(Config(), ov))


def test_autoencoder_overrides_set_a_one_level_model_and_refuse_training_time_fid():
    given = {"data": {"path": "x"}}
    out = latent.autoencoder_overrides(given)
    assert out["model"]["channel_mults"] == [1] and out["data"] == {"path": "x"} and "model" not in given
    assert latent.autoencoder_overrides({"train": {"eval_every_steps": 0}})["train"] == {"eval_every_steps": 0}
    with pytest.raises(DdpmError, match="no training-time FID.*eval_every_steps"):
        latent.autoencoder_overrides({"train": {"eval_every_steps": 100}})


def test_the_discriminator_exists_only_with_a_positive_disc_weight():
    assert type(latent.build_autoencoder(ae_config(), 3)) is AutoencoderKL  # disc_weight 0 (the default)
    assert isinstance(latent.build_autoencoder(ae_config(disc_weight=0.5), 3), AutoencoderWithDisc)
    assert type(latent.build_autoencoder(ae_config(disc_weight=0.5), 3, with_disc=False)) is AutoencoderKL
    plain, with_disc = latent.AutoencoderTask(), latent.AutoencoderTask()
    model, diffusion = plain.build(ae_config(), torch.device("cpu"))
    assert type(model) is AutoencoderKL and diffusion is None
    with_disc.build(ae_config(disc_weight=0.5), torch.device("cpu"))
    assert plain.extra_state() == {"kind": "autoencoder", "shape": [2, 2, 8, 0]}
    assert with_disc.extra_state()["shape"] == [2, 2, 8, 1]
    with pytest.raises(DdpmError, match="discriminator"):  # a run without one, resumed with one
        with_disc.load_extra_state(plain.extra_state())


def test_autoencoder_loss_is_l1_plus_kl_per_pixel_with_the_trainers_noise():
    loss = latent.AutoencoderLoss(ae_config(kl_weight=0.25), 3)
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    noise = loss.draw(2, x0, torch.Generator().manual_seed(5))["noise"]
    assert torch.equal(noise, torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(5)))
    recon, mean, logvar = torch.rand(2, 3, 8, 8), torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4) * 0.1
    net = lambda x, eps: (recon, mean, logvar) if x is x0 and eps is noise else None  # noqa: E731
    expected = (recon - x0).abs().mean((1, 2, 3)) + 0.25 * kl_standard_normal(mean, logvar) / (3 * 8 * 8)
    torch.testing.assert_close(loss(net, x0, {"noise": noise}), expected)


@pytest.mark.parametrize("size, f, suggested", [(10, 4, 8), (8, 8, 16), (30, 4, 28)])
def test_train_ae_refuses_an_image_size_without_a_whole_latent_of_2x2(blobs, size, f, suggested):
    cfg = apply_overrides(Config(), latent.autoencoder_overrides({"data": {"path": str(blobs), "image_size": size},
                                                                  "autoencoder": {"downsample": f}}))
    with pytest.raises(DdpmError, match=f"--image-size {size} is not a multiple of --downsample {f}.* "
                                        f"--image-size {suggested}$"):
        latent.AutoencoderTask().data(cfg, print)


@pytest.mark.parametrize("f", [2, 4])
def test_train_ae_takes_an_image_size_with_a_latent_of_at_least_2x2(blobs, f):
    cfg = apply_overrides(Config(), latent.autoencoder_overrides({"data": {"path": str(blobs), "image_size": 8},
                                                                  "autoencoder": {"downsample": f}}))
    assert len(latent.AutoencoderTask().data(cfg, print)) == 24


@pytest.mark.parametrize("native, size", [(False, (328, 88)), (True, (82, 22))])
def test_autoencoder_grid_is_enlarged_to_256_px_unless_native_grids(blobs, tmp_path, native, size):
    from PIL import Image
    task, ae = latent.AutoencoderTask(), AutoencoderKL(3, 2, 2, 8)
    task.grid_images = to_model_range(torch.from_numpy(np.load(blobs)[:8]))
    trainer = NS(_sampling_model=lambda: ae, device="cpu", paths=NS(results=tmp_path),
                 cfg=NS(train=NS(native_grids=native)))
    assert task.grid(trainer, "g").shape == (16, 3, 8, 8) and ae.training  # training mode restored
    # 2 rows of 8 images of 8 px, 2 px apart: 82 x 22 px, or x4 (the smallest whole factor to >= 256 px)
    assert Image.open(tmp_path / "g.jpg").size == size


def test_latent_cache_is_written_once_read_back_and_keyed_by_images_weights_and_flip(blobs, tmp_path, monkeypatch):
    torch.manual_seed(0)
    ae, images = AutoencoderKL(3, 2, 2, 8).eval(), np.load(blobs)
    x = to_model_range(torch.from_numpy(images))
    with torch.no_grad():
        plain, mirrored = ae.encode(x)[0], ae.encode(x.flip(3))[0]
    assert (plain - mirrored).abs().max() > 1e-3  # the test tells them apart
    torch.testing.assert_close(latent.encode_images(ae, images, "cpu"), plain)  # posterior means, not flipped
    torch.testing.assert_close(latent.encode_images(ae, images, "cpu", flip=True, batch=5), mirrored)
    logs, cache = [], tmp_path / "not/yet/there"
    for flip, want in ((False, plain), (True, mirrored)):
        torch.testing.assert_close(latent.cached_latents(ae, images, "", "cpu", flip, logs.append), want)  # no cache
        torch.testing.assert_close(latent.cached_latents(ae, images, str(cache), "cpu", flip, logs.append), want)
    names = sorted(p.name for p in cache.iterdir())  # no temporary file left
    assert len(names) == 2 and names[0] == names[1].replace(".npy", "-flip.npy") and names[1].startswith("latents-")
    assert [line.startswith("cached the latents of 24 images") for line in logs] == [True, True]

    def no_encoding(*a, **k):
        raise AssertionError("encoded again")
    monkeypatch.setattr(latent, "encode_images", no_encoding)
    for flip, want in ((False, plain), (True, mirrored)):  # read back, not encoded again
        assert torch.equal(latent.cached_latents(ae, images, str(cache), "cpu", flip, logs.append), want)
    with pytest.raises(AssertionError, match="encoded again"):  # other images: another key
        latent.cached_latents(ae, images[1:], str(cache), "cpu", False, logs.append)
    with torch.no_grad():
        next(ae.parameters()).add_(0.01)
    with pytest.raises(AssertionError, match="encoded again"):  # other weights: another key
        latent.cached_latents(ae, images, str(cache), "cpu", False, logs.append)


def test_latents_are_encoded_on_the_given_device(blobs):
    seen = []

    class Spy:  # an autoencoder that records where its input is; "meta" stands in for an accelerator
        def encode(self, x):
            seen.append(x.device.type)
            return torch.zeros(len(x), 2, 4, 4), None

    z = latent.cached_latents(Spy(), np.load(blobs), "", torch.device("meta"), False, print)
    assert seen == ["meta"] and z.shape == (24, 2, 4, 4)


@pytest.mark.parametrize("bad", [torch.zeros(4, 2, 2, 2), torch.full((4, 2, 2, 2), float("nan"))])
def test_latents_without_variance_are_an_error(bad):
    with pytest.raises(DdpmError, match="no variance; retrain the autoencoder"):
        latent.measure_scale_factor(bad)


def test_task_for_picks_the_runs_kind_and_refuses_to_resume_another(tmp_path):
    path = tmp_path / "ckpt.pt"
    pixels = replace(Config(), train=replace(Config().train, run_name="r"))
    latents = replace(pixels, autoencoder=replace(pixels.autoencoder, path="ae.pt"))
    ckpt = lambda kind: {"task_state": {"kind": kind}} if kind else {}  # noqa: E731
    assert type(latent.task_for("train-ae", pixels, None, path)) is latent.AutoencoderTask
    assert type(latent.task_for("train-ae", pixels, ckpt("autoencoder"), path)) is latent.AutoencoderTask
    assert latent.task_for("train", pixels, None, path) is None
    assert latent.task_for("train", pixels, ckpt(None), path) is None
    assert type(latent.task_for("train", latents, None, path)) is latent.LatentTask
    assert type(latent.task_for("train", latents, ckpt("latent"), path)) is latent.LatentTask
    for command, cfg, kind, words in (("train-ae", pixels, None, ["holds a diffusion model", "another --run-name"]),
                                      ("train-ae", pixels, "latent", ["holds a diffusion model"]),
                                      ("train", pixels, "autoencoder", ["resume it with `ddpm train-ae`",
                                                                        "another --run-name"]),
                                      ("train", latents, None, ["trained on pixels", "drop --autoencoder",
                                                                "another --run-name"])):
        with pytest.raises(DdpmError) as err:
            latent.task_for(command, cfg, ckpt(kind), path)
        assert all(w in str(err.value) for w in ["run 'r'", str(path), *words]), str(err.value)


def test_load_autoencoder_takes_the_ema_weights_and_says_what_is_wrong(ae_run, tmp_path):
    _, ae_path = ae_run
    ckpt = torch.load(ae_path, weights_only=True)
    ae, cfg = latent.load_autoencoder(ae_path)
    assert (cfg.autoencoder.downsample, cfg.data.image_size) == (2, 8)
    assert not ae.training and not any(p.requires_grad for p in ae.parameters())
    ema, raw = ckpt["ema_state_dict"], ckpt["model_state_dict"]
    assert any(not torch.equal(raw[k], v) for k, v in ema.items())  # one epoch at EMA 0.9: they differ
    assert ae.state_dict().keys() == ema.keys() and all(torch.equal(ae.state_dict()[k], v) for k, v in ema.items())

    def saved(name, **changes):
        torch.save({**ckpt, **changes}, tmp_path / name)
        return tmp_path / name

    no_ema, _ = latent.load_autoencoder(saved("no_ema.pt", ema_state_dict=None))  # a run without EMA
    assert all(torch.equal(no_ema.state_dict()[k], v) for k, v in raw.items())
    for name, kind, written_by in (("pixels.pt", None, "`ddpm train`)"),
                                   ("ldm.pt", "latent", "`ddpm train --autoencoder`)")):
        path = saved(name, task_state={"kind": kind} if kind else None)
        for load in (latent.load_autoencoder, lambda p: latent.latent_overrides(str(p), {})):
            with pytest.raises(DdpmError) as err:
                load(path)
            assert all(w in str(err.value) for w in [f"{path} is not an autoencoder checkpoint",
                                                     f"written by {written_by}", "`ddpm train-ae`"]), str(err.value)
    config = {k: dict(v) for k, v in ckpt["config"].items()}
    config["autoencoder"]["downsample"] = 3
    path = saved("bad_config.pt", config=config)
    with pytest.raises(DdpmError, match=f"{path} holds an invalid config.*downsample"):
        latent.load_autoencoder(path)
    path = saved("bad_weights.pt", ema_state_dict={k: v for k, v in list(ema.items())[1:]})
    with pytest.raises(DdpmError) as err:
        latent.load_autoencoder(path)
    assert f"the autoencoder weights in {path} do not match" in str(err.value)


def test_latent_overrides_take_the_autoencoders_shape_size_and_channels(ae_run):
    _, ae_path = ae_run
    out = latent.latent_overrides(str(ae_path), {})
    assert out["data"] == {"image_size": 8, "channels": 3} and out["autoencoder"]["path"] == str(ae_path)
    assert [out["autoencoder"][k] for k in ("downsample", "latent_channels", "base_channels")] == [2, 2, 8]
    given = {"data": {"image_size": 16}}
    assert latent.latent_overrides(str(ae_path), given)["data"] == {"image_size": 16, "channels": 3}
    assert given == {"data": {"image_size": 16}}


def test_latent_task_data_encodes_and_caches_both_orientations_and_keeps_the_labels(ae_run, image_folder, tmp_path):
    _, ae_path = ae_run
    cache = tmp_path / "cache"
    ov = latent.latent_overrides(str(ae_path), {"data": {"path": str(image_folder), "hflip": True,
                                                         "cache_dir": str(cache)},
                                                "model": {"size": "tiny"}, "train": {"device": "cpu"}})
    cfg, logs, task = validate(apply_overrides(Config(), ov)), [], latent.LatentTask()
    data = task.data(cfg, logs.append)
    images = load_data(str(image_folder), 8, 3)
    assert np.array_equal(data.images, images.images) and data.source == images.source
    assert np.array_equal(data.labels, images.labels) and data.classes == images.classes == ("a", "b")
    ae, _ = latent.load_autoencoder(ae_path)
    torch.testing.assert_close(data.latents, latent.encode_images(ae, images.images, "cpu"))
    torch.testing.assert_close(data.flipped, latent.encode_images(ae, images.images, "cpu", flip=True))
    assert data.scale_factor == task.scale == pytest.approx(1 / data.latents.double().std().item(), rel=1e-12)
    names = sorted(p.name for p in cache.iterdir())  # the decoded images' cache, and both latents' caches
    assert len(names) == 3 and [n.startswith("latents-") for n in names] == [False, True, True], names
    assert names[1] == names[2].replace(".npy", "-flip.npy")
    assert any(line.startswith("latents: (2, 4, 4) per image") for line in logs), logs
    with pytest.raises(DdpmError, match="class-conditional latent diffusion is not supported.*--class-cond"):
        latent.LatentTask().data(replace(cfg, train=replace(cfg.train, class_cond=True)), print)


def test_latent_batches_are_the_image_batches_order_and_flips_scaled():
    images = np.random.default_rng(1).integers(0, 256, (14, 4, 4, 2), dtype=np.uint8)
    z = to_model_range(torch.from_numpy(images))  # as if the encoder were the identity (so it commutes with flips)
    cfg = replace(Config(), train=replace(Config().train, batch_size=3, seed=4))
    task = latent.LatentTask()
    task.scale = 2.0
    for flipped, hflip in ((z.flip(3), True), (None, False)):
        data = latent.LatentData(images, z, flipped, "x", 2.0)
        for rank in (0, 1):  # 2 ranks: global batches of 6, from batch 1 on
            got = list(task.batches(data, cfg, 2, 1, rank, 2, "cpu"))
            want = list(epoch_batches(ImageData(images, "x"), 3, 4, 2, 1, hflip, rank=rank, world=2))
            assert len(got) == len(want) == 2 and all(torch.equal(g, 2.0 * w) for g, w in zip(got, want))
    unflipped = torch.cat(list(epoch_batches(ImageData(images, "x"), 3, 4, 2, 0, False)))
    assert not torch.equal(torch.cat(list(epoch_batches(ImageData(images, "x"), 3, 4, 2, 0, True))), unflipped)


def test_latent_diffusion_brings_guides_and_masks_to_its_latents_and_device():
    ae = AutoencoderKL(3, 2, 2, 8)
    cpu = latent.LatentDiffusion(Diffusion(img_size=4, channels=2, timesteps=20), ae, 2.0)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(cpu.to_latents(x), ae.encode(x)[0] * 2.0)
    mask = torch.zeros(1, 3, 8, 8)
    mask[0, 2, 7, 0] = 1  # one pixel of one channel: its cell
    assert torch.equal(cpu.latent_mask(mask)[0, 0], torch.eye(4).flip(0) * torch.eye(4)[3].view(4, 1))
    # "meta" stands in for an accelerator: CPU guides and masks are moved to the model's device
    meta = latent.LatentDiffusion(Diffusion(img_size=4, channels=2, device="meta", timesteps=20),
                                  AutoencoderKL(3, 2, 2, 8), 2.0)
    z = meta.to_latents(x)
    assert z.device.type == "meta" and z.shape == (2, 2, 4, 4)
    cells = meta.latent_mask(mask)
    assert cells.device.type == "meta" and cells.shape == (1, 1, 4, 4)
