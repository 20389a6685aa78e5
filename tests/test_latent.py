"""Latent diffusion: the autoencoder, `ddpm train-ae`, and `ddpm train --autoencoder` checkpoints."""
import os
import signal

import numpy as np
import pytest
import torch

import ddpmkit.train as train_module
from ddpmkit import latent, samplers, scoring
from ddpmkit.cli import main
from ddpmkit.config import Config, apply_overrides, validate
from ddpmkit.data import to_model_range
from ddpmkit.guidance import InpaintDenoiser, build_denoiser, generate
from ddpmkit.loading import load_model
from ddpmkit.models.autoencoder import AutoencoderKL, kl_standard_normal

AE_FLAGS = ["--image-size", "8", "--downsample", "2", "--latent-channels", "2", "--ae-channels", "8",
            "--batch-size", "8", "--device", "cpu", "--no-progress", "--log-every", "1", "--ema-decay", "0.9"]
LDM_FLAGS = ["--model-size", "custom", "--set", "model.base_channels=8", "--set", "model.channel_mults=1",
             "--set", "model.attn_levels=", "--set", "model.time_dim=16", "--timesteps", "20", "--batch-size", "8",
             "--device", "cpu", "--no-progress", "--sample-every", "0", "--epochs", "1"]


@pytest.fixture(autouse=True)
def quiet_and_fast(monkeypatch, one_torch_thread):
    monkeypatch.setattr(train_module, "DRAW_CURVES", False)


@pytest.fixture
def blobs(tmp_path):
    """24 smooth coloured blobs, 8x8 RGB, as a .npy array (N, H, W, C) uint8."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:8, 0:8]
    arr = np.stack([np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 6.0)[..., None] * rng.uniform(0.3, 1, 3)
                    for cy, cx in rng.uniform(2, 6, (24, 2))])
    path = tmp_path / "blobs.npy"
    np.save(path, (arr * 255).astype(np.uint8))
    return path


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

    from ddpmkit.errors import DdpmError
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
    assert "trained on 8x8 images" in error_line(capsys)
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
    assert "latent_channels" in error_line(capsys) and not (tmp_path / "models/ae/ckpt.prev.pt").exists()
