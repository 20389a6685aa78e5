"""Class-conditional training, classifier-free guidance, inpainting and SDEdit (issue 13)."""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import ddpmkit.train as train_module
from ddpmkit import load_model, samplers
from ddpmkit.cli import main
from ddpmkit.config import ModelConfig, from_dict
from ddpmkit.data import ImageData, epoch_batches, epoch_labels, load_data, load_folder
from ddpmkit.diffusion import Diffusion
from ddpmkit.errors import DdpmError
from ddpmkit.guidance import (GuidedDenoiser, InpaintDenoiser, LabelledNet, build_denoiser, generate, rescale,
                              start_sigma)
from ddpmkit.guidance import sampling as guided_sampling
from ddpmkit.models import ADMUNet, UNet, build_model
from ddpmkit.train import prepare, train

TINY = {"size": "custom", "arch": "adm", "base_channels": 16, "channel_mults": [1, 2], "attn_levels": [],
        "time_dim": 32, "num_res_blocks": 1}


@pytest.fixture(autouse=True)
def quiet(monkeypatch, one_torch_thread):
    monkeypatch.setattr(train_module, "DRAW_CURVES", False)


def _jiggle(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere (ADM zero-initializes its output conv, which would hide the class)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def _nets(k=3):
    return [_jiggle(ADMUNet(c_in=1, c_out=1, time_dim=32, base_channels=16, channel_mults=(1, 2), attn_levels=(1,),
                            num_res_blocks=1, num_classes=k)),
            _jiggle(UNet(c_in=1, c_out=1, time_dim=32, base_channels=8, channel_mults=(1, 2), attn_levels=(1,),
                         num_classes=k))]


# --- models -------------------------------------------------------------------------------------

@pytest.mark.parametrize("net", _nets(), ids=["adm", "unet"])
def test_guidance_weight_one_is_conditional_and_zero_is_null_exactly(net):
    d = Diffusion(img_size=8, channels=1, noise_steps=50)
    x, sigma = torch.randn(4, 1, 8, 8), torch.tensor(3.0)
    y = torch.tensor([0, 1, 2, 1])
    def plain(labels):
        den = d.denoiser(LabelledNet(net, labels))
        den.clip_denoised = False
        return den(x, sigma)

    cond, null = plain(y), plain(torch.full((4,), 3))
    guided = lambda w: build_denoiser(d, net, y, guidance=w, clip=False)(x, sigma)
    assert torch.equal(guided(1.0), cond)
    assert torch.equal(guided(0.0), null)
    assert not torch.allclose(cond, null)  # the class matters, so the two checks above mean something
    torch.testing.assert_close(guided(2.5), null + 2.5 * (cond - null), rtol=1e-5, atol=1e-5)
    # Lin et al. (2024) rescale with phi = 1: the guided estimate takes the conditional one's std.
    resc = build_denoiser(d, net, y, guidance=4.0, rescale_phi=1.0, clip=False)(x, sigma)
    torch.testing.assert_close(resc.flatten(1).std(1), cond.flatten(1).std(1), rtol=1e-4, atol=1e-5)
    # phi = 0.5: the average of that rescaled estimate and the plain guided one (their Eq. 16).
    guided4 = null + 4.0 * (cond - null)
    half = build_denoiser(d, net, y, guidance=4.0, rescale_phi=0.5, clip=False)(x, sigma)
    torch.testing.assert_close(half, (_std_matched(guided4, cond) + guided4) / 2, rtol=1e-4, atol=1e-5)


def _std_matched(guided, cond):
    """Lin et al. (2024) Eq. 15 written out: guided * std(cond) / std(guided), std over each row's pixels."""
    std = lambda t: t.flatten(1).std(1).view(-1, *[1] * (t.dim() - 1))
    return guided * std(cond) / std(guided)


def test_rescale_closed_form():
    """Lin et al. (2024) Eqs. 15-16 on x0 estimates: phi = 1 gives the conditional std exactly, phi = 0.5
    the mean of the rescaled and the guided estimate, phi = 0 the guided one untouched."""
    g = torch.Generator().manual_seed(0)
    guided = torch.randn(3, 2, 8, 8, generator=g) * torch.tensor([3.0, 0.5, 1.7]).view(3, 1, 1, 1) + 0.4
    cond = torch.randn(3, 2, 8, 8, generator=g) * torch.tensor([0.8, 1.2, 0.3]).view(3, 1, 1, 1) - 0.1
    torch.testing.assert_close(rescale(guided, cond, 1.0).flatten(1).std(1), cond.flatten(1).std(1))
    torch.testing.assert_close(rescale(guided, cond, 0.5), 0.5 * _std_matched(guided, cond) + 0.5 * guided)
    torch.testing.assert_close(rescale(guided, cond, 0.25), 0.25 * _std_matched(guided, cond) + 0.75 * guided)
    assert torch.equal(rescale(guided, cond, 0.0), guided)


def test_guided_variance_path_matches_the_plain_path():
    """return_variance=True (a learned-variance model, Improved DDPM): the same x0 as the plain call, and
    the conditional model's variance (the null model's at w = 0) at the x and sigma it was given."""
    torch.manual_seed(0)
    net = _jiggle(ADMUNet(c_in=1, c_out=2, time_dim=32, base_channels=16, channel_mults=(1, 2), attn_levels=(),
                          num_res_blocks=1, num_classes=3))
    d = Diffusion(img_size=8, channels=1, noise_steps=50, learn_sigma=True)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    variances = []
    for w, phi in ((1.0, 0.0), (0.0, 0.0), (2.5, 0.0), (2.5, 0.5)):
        den = build_denoiser(d, net, y, guidance=w, rescale_phi=phi, clip=False)
        plain = d.denoiser(LabelledNet(net, y if w else torch.full_like(y, 3)))
        plain.clip_denoised = False
        for sigma in (torch.tensor(0.5), torch.tensor(3.0)):
            x0, var = den(x, sigma, return_variance=True)
            torch.testing.assert_close(x0, den(x, sigma), rtol=0, atol=1e-6)
            torch.testing.assert_close(var, plain(x, sigma, return_variance=True)[1], rtol=1e-5, atol=1e-6)
            variances.append(var)
    assert not torch.allclose(variances[0], variances[1])  # sigma matters, so passing it on is checked


def test_guidance_interval_guides_inside_and_is_conditional_outside():
    """Kynkaanniemi et al. (2024): guidance only for lo < sigma <= hi, the conditional model elsewhere,
    for a scalar sigma and for one sigma per row."""
    net = _nets()[0]
    d = Diffusion(img_size=8, channels=1, noise_steps=50)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])

    def den(interval, sigma, w=3.0):
        return build_denoiser(d, net, y, guidance=w, clip=False, interval=interval)(x, sigma)

    for sigma in (0.5, 3.0, 20.0):
        full, cond = den(None, torch.tensor(sigma)), den(None, torch.tensor(sigma), w=1.0)
        assert not torch.allclose(full, cond)
        assert torch.equal(den((1.0, 10.0), torch.tensor(sigma)), full if 1.0 < sigma <= 10.0 else cond)
    assert torch.equal(den((1.0, 3.0), torch.tensor(3.0)), den(None, torch.tensor(3.0)))  # hi is inside
    rows = torch.tensor([0.5, 3.0, 20.0, 5.0])
    mixed, full, cond = den((1.0, 10.0), rows), den(None, rows), den(None, rows, w=1.0)
    inside = torch.tensor([False, True, False, True])
    torch.testing.assert_close(mixed[inside], full[inside], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[~inside], cond[~inside], rtol=0, atol=1e-6)


def test_unconditional_models_keep_their_state_dict():
    """Only a conditional network has the class table; an unconditional one is exactly as before."""
    for arch in ("adm", "unet"):
        cfg = ModelConfig(arch=arch, base_channels=8, channel_mults=(1, 2), attn_levels=(1,), time_dim=16)
        plain = build_model(cfg, 1)
        cond = build_model(ModelConfig(**{**cfg.__dict__, "num_classes": 4}), 1)
        assert not any("label" in k for k in plain.state_dict())
        assert set(cond.state_dict()) - set(plain.state_dict()) == {"label_emb.weight"}
        assert cond.state_dict()["label_emb.weight"].shape == (5, 16)  # 4 classes + the null class
    # The seed UNet's size is pinned (23.3M at 3 channels): the class code adds nothing to it.
    assert sum(p.numel() for p in build_model(ModelConfig(), 3).parameters()) == 23_332_739
    # A checkpoint config from before num_classes existed loads as unconditional.
    stored = from_dict({"model": {"arch": "adm"}})
    assert stored.model.num_classes == 0 and stored.model.class_names == ()


def test_unconditional_network_refuses_labels():
    net = UNet(c_in=1, c_out=1, time_dim=16, base_channels=8, channel_mults=(1, 2), attn_levels=())
    with pytest.raises(ValueError, match="unconditional"):
        net(torch.zeros(1, 1, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long))


# --- data ---------------------------------------------------------------------------------------

def test_class_folders_give_labels_and_names(image_folder):
    data = load_folder(image_folder, 8, 3)
    assert data.classes == ("a", "b")
    # conftest writes image i into "a" when i is odd; files are listed sorted, a/ before b/.
    assert list(data.labels) == [0] * 12 + [1] * 12
    flat = load_data("builtin:digits", 8)
    assert flat.classes == tuple("0123456789") and len(flat.labels) == len(flat) == 1797


def test_epoch_labels_follow_epoch_batches():
    n = 37
    images = np.arange(n, dtype=np.uint8)[:, None, None, None].repeat(4, 1).repeat(4, 2)
    data = ImageData(images, "ids", labels=np.arange(n) * 3)
    for rank in (0, 1):
        xs = epoch_batches(data, 5, seed=3, epoch=2, start=1, rank=rank, world=2)
        ys = epoch_labels(data, 5, seed=3, epoch=2, start=1, rank=rank, world=2)
        for x, y in zip(xs, ys, strict=True):
            ids = ((x[:, 0, 0, 0] + 1) * 127.5).round().long()
            assert torch.equal(ids * 3, y)


# --- training and the class of the samples ------------------------------------------------------

def two_classes(root, n=512, seed=0):
    """8x8 greyscale images in class folders: 'top' has a bright top half, 'bottom' a bright bottom half."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        name = ("top", "bottom")[i % 2]
        (root / name).mkdir(parents=True, exist_ok=True)
        a = rng.normal(40, 20, (8, 8))
        a[:4] += 170 if name == "top" else 0
        a[4:] += 170 if name == "bottom" else 0
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L").save(root / name / f"{i}.png")
    return root


def train_conditional(tmp_path, epochs, n=512, **train_kw):
    folder = two_classes(tmp_path / "data", n)
    t = {"workdir": str(tmp_path), "run_name": "c", "epochs": epochs, "batch_size": 32, "sample_every_epochs": 0,
         "log_every": 50, "ema_decay": 0.0, "lr": 2e-3, "device": "cpu", "class_cond": True, **train_kw}
    cfg, ckpt = prepare({"data": {"path": str(folder), "image_size": 8, "channels": 1}, "model": TINY,
                         "diffusion": {"timesteps": 100, "schedule": "cosine"}, "train": t}, fresh=True)
    train(cfg, ckpt, progress=False, log=lambda *a: None)
    return folder, tmp_path / "models" / "c" / "ckpt.pt"


def class_accuracy(folder, ckpt, guidance, per_class=16):
    """Accuracy of a nearest-centroid classifier, fitted on the training images, on guided samples."""
    data = load_data(str(folder), 8, 1)
    x = torch.from_numpy(np.asarray(data.images, np.float32)).flatten(1) / 127.5 - 1
    centroids = torch.stack([x[torch.from_numpy(data.labels) == k].mean(0) for k in range(2)])
    model, diffusion, cfg = load_model(ckpt)
    assert cfg.model.class_names == ("bottom", "top")  # stored in the checkpoint
    labels = torch.arange(2).repeat_interleave(per_class)
    samples = generate(diffusion, model, len(labels), labels=labels, guidance=guidance, sampler="ddim", steps=20,
                       seed=1)
    predicted = torch.cdist(samples.flatten(1), centroids).argmin(1)
    return (predicted == labels).float().mean().item()


def test_conditional_samples_have_their_class_quick(tmp_path):
    """The default suite's weaker version: 5 epochs of 8 steps on 256 images."""
    folder, ckpt = train_conditional(tmp_path, epochs=5, n=256)
    assert class_accuracy(folder, ckpt, guidance=3.0) >= 0.8


@pytest.mark.slow
def test_conditional_samples_have_their_class(tmp_path):
    folder, ckpt = train_conditional(tmp_path, epochs=15)  # 240 steps
    assert class_accuracy(folder, ckpt, guidance=1.0) >= 0.9
    assert class_accuracy(folder, ckpt, guidance=3.0) >= 0.97


# --- inpainting, SDEdit and the command line ----------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(unconditional, conditional) checkpoints of a barely trained tiny model on the two classes."""
    root = tmp_path_factory.mktemp("ckpts")
    folder = two_classes(root / "data", n=64)
    out = []
    for name, cond in (("u", False), ("c", True)):
        t = {"workdir": str(root), "run_name": name, "epochs": 1, "batch_size": 32, "sample_every_epochs": 0,
             "ema_decay": 0.0, "device": "cpu", "class_cond": cond}
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            cfg, ckpt = prepare({"data": {"path": str(folder), "image_size": 8, "channels": 1}, "model": TINY,
                                 "diffusion": {"timesteps": 100, "schedule": "cosine"}, "train": t}, fresh=True)
            train(cfg, ckpt, progress=False, log=lambda *a: None)
        finally:
            torch.set_num_threads(old)
        out.append(root / "models" / name / "ckpt.pt")
    return out


def _png(path, arr, mode="L"):
    Image.fromarray(np.asarray(arr, np.uint8), mode).save(path)
    return str(path)


def test_inpainting_sampler_keeps_known_pixels_before_the_paste(checkpoints, monkeypatch):
    """The sampler's own output (before generate's final paste) already holds the known pixels: the
    replacement acts inside the sampling, not only at the end. RePaint's resampling changes the result."""
    seen = {}
    real_paste = InpaintDenoiser.paste

    def paste(self, x0):  # the last call is generate's final paste of the sampler's output
        seen["x"] = x0.clone()
        return real_paste(self, x0)

    monkeypatch.setattr(InpaintDenoiser, "paste", paste)
    known = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:] = 1  # generate the right half
    for ckpt in checkpoints:
        model, diffusion, _ = load_model(ckpt)
        labels = torch.tensor([1]) if ckpt.parent.name == "c" else None
        for sampler in ("euler", "ddpm"):
            out = {}
            for resample in (1, 2):
                out[resample] = generate(diffusion, model, 3, labels=labels, known=known, mask=mask, sampler=sampler,
                                         steps=6, seed=5, resample=resample)
                raw = seen.pop("x")
                assert (raw[..., :4] - known[..., :4]).abs().max() < 1e-4, (ckpt, sampler, resample)
                assert (raw[..., 4:] - known[..., 4:]).abs().max() > 0.1  # the masked half was generated
                assert torch.equal(out[resample][..., :4], known[..., :4].expand(3, 1, 8, 4))
            assert not torch.allclose(out[1][..., 4:], out[2][..., 4:], atol=1e-3), (ckpt, sampler)


def test_inpainting_keeps_known_pixels(checkpoints, tmp_path):
    rng = np.random.default_rng(1)
    known = rng.integers(0, 256, (8, 8)).astype(np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 4:] = 255  # generate the right half
    image, mask_path = _png(tmp_path / "known.png", known), _png(tmp_path / "mask.png", mask)
    for ckpt in checkpoints:
        for sampler, extra in (("euler", ["--steps", "6"]), ("ddpm", ["--steps", "5", "--resample", "2"])):
            out = tmp_path / f"{ckpt.parent.name}_{sampler}.png"
            assert main(["sample", "--ckpt", str(ckpt), "--inpaint", image, "--mask", mask_path, "-n", "3",
                         "--sampler", sampler, "--out-dir", str(out.with_suffix("")), "--no-progress",
                         "--device", "cpu", *extra] + (["--class", "top"] if ckpt.parent.name == "c" else [])) == 0
            for f in sorted(out.with_suffix("").glob("*.png")):
                got = np.asarray(Image.open(f).convert("L"), np.int16)
                assert np.abs(got[:, :4] - known[:, :4]).max() <= 1, (ckpt, sampler)
                assert np.abs(got[:, 4:] - known[:, 4:]).max() > 1  # the masked half was generated


def test_sdedit_strength_zero_returns_image_and_one_is_a_sample(checkpoints):
    model, diffusion, _ = load_model(checkpoints[0])
    init = torch.rand(1, 1, 8, 8) * 2 - 1
    for sampler in ("ddpm", "ddim", "heun"):
        kw = dict(sampler=sampler, steps=8, seed=4)
        assert torch.equal(generate(diffusion, model, 2, init=init, strength=0.0, **kw), init.expand(2, 1, 8, 8))
        assert torch.equal(generate(diffusion, model, 2, init=init, strength=1.0, **kw),
                           diffusion.generate(model, 2, progress=False, **kw))
    # In between, the result stays closer to the image the smaller the strength.
    dist = [(generate(diffusion, model, 8, init=init, strength=s, sampler="ddim", steps=20) - init).abs().mean()
            for s in (0.1, 0.5, 1.0)]
    assert dist[0] < dist[1] < dist[2]
    # sigma(S T) rises with S, and S = 1 is the model's largest sigma.
    den = diffusion.denoiser(model)
    sig = [start_sigma(den, s, den.sigma_max) for s in (0.05, 0.3, 0.7, 1.0)]
    assert sig == sorted(sig) and sig[-1] == pytest.approx(den.sigma_max, rel=1e-6)


class _FirstCall(Exception):
    pass


class _Recorder(nn.Module):
    """A denoiser that records the (x, sigma) of its first call and stops the sampler there."""

    def __init__(self, base: nn.Module, seen: list):
        super().__init__()
        self.base, self.seen = base, seen
        for name in ("discrete_sigmas", "sigma_min", "sigma_max"):
            setattr(self, name, getattr(base, name))

    def prior_std(self, sigma_max: float) -> float:
        return self.base.prior_std(sigma_max)

    def forward(self, x, sigma, return_variance=False):
        self.seen.append((x.clone(), float(torch.as_tensor(sigma).reshape(-1)[0])))
        raise _FirstCall


def test_sdedit_noises_the_image_to_the_schedules_sigma_at_s_t(checkpoints, monkeypatch):
    """SDEdit (Meng et al. 2022, Eq. 3, VE form): the sampler starts from x = init + sigma(t0) z with
    t0 = S T; sigma(t0) = sqrt((1 - abar) / abar), abar the cosine schedule's (Nichol & Dhariwal 2021,
    Eq. 17) at t0, computed here from its formula; std(x - init) = sigma(t0) and mean(x - init) = 0."""
    model, diffusion, _ = load_model(checkpoints[0])  # cosine schedule, T = 100
    T, s = diffusion.noise_steps, 0.008
    seen = []
    real = guided_sampling.build_denoiser
    monkeypatch.setattr(guided_sampling, "build_denoiser", lambda *a, **k: _Recorder(real(*a, **k), seen))
    init = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    for strength, sampler in ((0.3, "ddim"), (0.5, "euler"), (0.8, "ddpm")):
        abar = f(strength * T) / f(0)
        sigma = math.sqrt((1 - abar) / abar)
        with pytest.raises(_FirstCall):
            generate(diffusion, model, 512, init=init, strength=strength, sampler=sampler, steps=10, seed=3)
        x, first_sigma = seen.pop()
        assert first_sigma == pytest.approx(sigma, rel=1e-5), strength
        den = diffusion.denoiser(model)
        assert start_sigma(den, strength, den.sigma_max) == pytest.approx(sigma, rel=1e-5)
        d = (x - init).double()  # 512 x 64 draws: the std is within 1% of sigma with near certainty
        assert d.std().item() == pytest.approx(sigma, rel=0.02), strength
        assert abs(d.mean().item()) < 0.02 * sigma, strength


def _error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpm: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs_are_one_line_errors(checkpoints, tmp_path, capsys):
    uncond, cond = map(str, checkpoints)
    image = _png(tmp_path / "img.png", np.zeros((8, 8)))
    common = ["--no-progress", "--device", "cpu", "--steps", "2", "--out", str(tmp_path / "o.png")]
    assert "unknown class 'seven'" in _error(capsys, ["sample", "--ckpt", cond, "--class", "seven", *common])
    assert "class-conditional" in _error(capsys, ["sample", "--ckpt", uncond, "--class", "top", *common])
    assert "class-conditional" in _error(capsys, ["sample", "--ckpt", uncond, "--guidance", "3", *common])
    assert "class-conditional" in _error(capsys, ["sample", "--ckpt", uncond, "--guidance-interval", "1", "9",
                                                  *common])
    assert "0 <= LO < HI" in _error(capsys, ["sample", "--ckpt", cond, "--guidance", "2", "--guidance-interval", "5",
                                             "1", *common])
    big = _png(tmp_path / "big.png", np.zeros((16, 16)))
    assert "16x16" in _error(capsys, ["sample", "--ckpt", uncond, "--inpaint", image, "--mask", big, *common])
    rgb = _png(tmp_path / "rgb.png", np.zeros((8, 8, 3)), "RGB")
    assert "single-channel" in _error(capsys, ["sample", "--ckpt", uncond, "--inpaint", image, "--mask", rgb, *common])
    assert "does not exist" in _error(capsys, ["sample", "--ckpt", uncond, "--inpaint", image, "--mask",
                                               str(tmp_path / "nope.png"), *common])
    edit = ["edit", "--ckpt", uncond, "--init", image, "--device", "cpu", "--out", str(tmp_path / "e.png")]
    for s in ("1.5", "-0.1"):
        assert "[0, 1]" in _error(capsys, [*edit, "--strength", s])
    assert "does not exist" in _error(capsys, ["edit", "--ckpt", uncond, "--init", str(tmp_path / "none.png"),
                                               "--strength", "0.5", "--device", "cpu"])


def test_cli_labelled_grid_and_edit(checkpoints, tmp_path, capsys):
    cond = str(checkpoints[1])
    grid = tmp_path / "grid.png"
    assert main(["sample", "--ckpt", cond, "-n", "4", "--steps", "2", "--sampler", "ddim", "--native-size",
                 "--out", str(grid), "--no-progress", "--device", "cpu"]) == 0
    assert "rows: bottom, top" in capsys.readouterr().out
    img = Image.open(grid)
    assert img.height == 2 + 2 * (8 + 2)  # two rows of 8 px images (two per class), captions on the left
    image = _png(tmp_path / "img.png", np.full((8, 8), 200))
    out = tmp_path / "edit.png"
    assert main(["edit", "--ckpt", cond, "--init", image, "--strength", "0", "--class", "1", "--guidance", "2",
                 "--native-size", "--out", str(out), "--device", "cpu"]) == 0
    assert np.array_equal(np.asarray(Image.open(out).convert("L")), np.full((8, 8), 200))
    with pytest.raises(DdpmError, match="no class labels"):
        list(epoch_labels(ImageData(np.zeros((2, 4, 4, 1), np.uint8), "x"), 1, 0, 0))


def test_train_flags_parse():
    from ddpmkit.cli import build_parser, train_overrides

    args = build_parser().parse_args(["train", "--class-cond", "--cond-drop", "0.2"])
    assert train_overrides(args)["train"] == {"class_cond": "true", "cond_drop": 0.2}
    assert "class_cond" not in train_overrides(build_parser().parse_args(["train"])).get("train", {})


def test_export_keeps_the_classes(checkpoints, tmp_path, capsys):
    folder = tmp_path / "exported"
    assert main(["export", "--ckpt", str(checkpoints[1]), "--out", str(folder)]) == 0
    model, _, cfg = load_model(folder)
    assert cfg.model.class_names == ("bottom", "top") and model.num_classes == 2
    assert main(["sample", "--model", str(folder), "--class", "top", "-n", "2", "--steps", "2", "--sampler", "ddim",
                 "--out", str(tmp_path / "s.png"), "--no-progress", "--device", "cpu"]) == 0


@pytest.mark.parametrize("kind", ["edm", "vp"])
def test_wrappers_keep_what_the_consistency_sampler_reads(kind):
    # The consistency function's c_skip / c_out use the base model's sigma_data (0.5 for EDM): a
    # wrapper that generates every pixel (mask 1) or guides nothing must sample exactly as its base.
    d = Diffusion(img_size=4, channels=1, objective="edm") if kind == "edm" else \
        Diffusion(img_size=4, channels=1, timesteps=100, prediction="v")
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    base = d.denoiser(lambda x, t, y=None: net(x))
    x = torch.randn(2, 1, 4, 4) * 20
    sigmas = samplers.sampler_sigmas(base, "consistency", 2)
    run = lambda den: samplers.SAMPLERS["consistency"].fn(den, x, sigmas, noise=lambda v: torch.ones_like(v))
    ref = run(base)
    inpaint = InpaintDenoiser(base, torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 1, 1))
    guided = GuidedDenoiser(base, LabelledNet(lambda x, t, y=None: net(x)), null=0)
    for wrapped in (inpaint, guided):
        assert getattr(wrapped, "sigma_data", None) == getattr(base, "sigma_data", None)
        torch.testing.assert_close(run(wrapped), ref, rtol=1e-5, atol=1e-5)


# --- closed forms and checked inputs of the guidance package (mutation-test follow-ups) ---------

def test_build_denoiser_default_weight_is_the_conditional_model():
    """guidance defaults to w = 1: exactly the conditional prediction, no mixing with the null class."""
    net = _jiggle(ADMUNet(c_in=1, c_out=1, time_dim=16, base_channels=8, channel_mults=(1,), attn_levels=(),
                          num_res_blocks=1, num_classes=2))
    d = Diffusion(img_size=4, channels=1, noise_steps=20)
    x, sigma, y = torch.randn(2, 1, 4, 4), torch.tensor(2.0), torch.tensor([0, 1])
    default = build_denoiser(d, net, y, clip=False)
    assert default.guidance == 1.0
    assert torch.equal(default(x, sigma), build_denoiser(d, net, y, guidance=1.0, clip=False)(x, sigma))
    assert not torch.allclose(default(x, sigma), build_denoiser(d, net, y, guidance=2.0, clip=False)(x, sigma))


def test_start_sigma_log_interpolates_the_discrete_sigmas():
    """S T - 1 as a fractional timestep, log sigma interpolated between its two neighbours (up to T - 1)."""
    class Den:
        discrete_sigmas = torch.tensor([1.0, 2.0, 4.0, 8.0])  # T = 4

    for strength, expected in ((0.1, 1.0), (0.5, 2.0), (0.625, math.sqrt(8.0)), (0.875, math.sqrt(32.0)),
                               (0.9375, 2 ** 2.75), (1.0, 8.0)):
        assert start_sigma(Den(), strength, 8.0) == pytest.approx(expected, rel=1e-9), strength


def test_with_resampling_renoises_between_repeats_but_not_after_the_last_step():
    """RePaint (jump length 1): each step U times, x += sqrt(s_i^2 - s_{i+1}^2) z in between; the step that
    lands on sigma = 0 runs once (nothing to re-noise to)."""
    from ddpmkit.guidance import with_resampling

    calls = []

    def step(den, x, pair, noise=None, **options):
        calls.append(tuple(float(s) for s in pair))
        return x - 1

    sigmas = torch.tensor([3.0, 2.0, 0.0])
    out = with_resampling(step, 2)(None, torch.zeros(1), sigmas, noise=torch.ones_like)
    assert calls == [(3.0, 2.0), (3.0, 2.0), (2.0, 0.0)]
    # 0 -> -1, re-noised by sqrt(9 - 4) -> -1 + sqrt(5), again -> -2 + sqrt(5), last step -> -3 + sqrt(5)
    assert float(out) == pytest.approx(-3 + math.sqrt(5.0))
    assert with_resampling(step, 1) is step


def test_inpaint_denoiser_variance_path_pastes_x0_and_keeps_the_variance():
    class Base(nn.Module):
        def forward(self, x, sigma, return_variance=False):
            return (2 * x, x + sigma) if return_variance else 2 * x

    known, mask = torch.full((1, 1, 2, 2), 0.5), torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    den = InpaintDenoiser(Base(), known, mask)
    x = torch.arange(4.0).view(1, 1, 2, 2)
    x0, var = den(x, torch.tensor(3.0), return_variance=True)
    assert torch.equal(x0, torch.tensor([[[[0.0, 0.5], [0.5, 6.0]]]]))
    assert torch.equal(x0, den(x, torch.tensor(3.0)))
    assert torch.equal(var, x + 3)


def test_load_mask_thresholds_at_half_grey(tmp_path):
    from ddpmkit.guidance import load_mask

    path = _png(tmp_path / "m.png", [[0, 127], [128, 255]])
    assert torch.equal(load_mask(path, 2), torch.tensor([[[[0.0, 0.0], [1.0, 1.0]]]]))


class _Unused(nn.Module):
    """A model that generate's early returns and checks never call."""

    def forward(self, x, t):
        raise AssertionError("the model should not run")


def test_generate_checks_the_shapes_of_its_guide_images(monkeypatch):
    """known: (n or 1, C, H, W); mask: (n or 1, 1 or C, H, W); a wrong channel count or size alone is refused."""
    monkeypatch.setattr(guided_sampling, "_run_chunk", lambda den, shape, *a: torch.zeros(shape))
    d = Diffusion(img_size=8, channels=3, noise_steps=20)
    net, ok = _Unused(), torch.zeros(1, 3, 8, 8)
    for mask in (torch.ones(1, 1, 8, 8), torch.ones(1, 3, 8, 8), torch.ones(2, 1, 8, 8)):
        assert generate(d, net, 2, known=ok, mask=mask).shape == (2, 3, 8, 8)
    bad = [("image", torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8)),  # channels only
           ("image", torch.zeros(1, 3, 4, 4), torch.ones(1, 1, 8, 8)),  # size only
           ("image", torch.zeros(3, 3, 8, 8), torch.ones(1, 1, 8, 8)),  # rows
           ("mask", ok, torch.ones(1, 2, 8, 8)),
           ("mask", ok, torch.ones(1, 1, 4, 4)),
           ("mask", ok, torch.ones(1, 8, 8))]
    for what, known, mask in bad:
        with pytest.raises(DdpmError, match=f"the inpainting {what} has shape"):
            generate(d, net, 2, known=known, mask=mask)
    with pytest.raises(DdpmError, match="the SDEdit image has shape"):
        generate(d, net, 1, init=torch.zeros(1, 3, 4, 4), strength=0.5)


def test_sdedit_strength_zero_clamps_the_image_to_the_model_range():
    d = Diffusion(img_size=2, channels=1, noise_steps=20)
    init = torch.tensor([[[[1.5, -1.5], [0.25, -2.0]]]])
    out = generate(d, _Unused(), 2, init=init, strength=0.0)
    assert torch.equal(out, torch.tensor([[[[1.0, -1.0], [0.25, -1.0]]]]).expand(2, 1, 2, 2))


def _record_resampling(monkeypatch):
    """Replace the RePaint runner by one that records the start x and the levels it is given."""
    seen = []

    def fake(fn, resample):
        def run(den, x, sigmas, noise=None, **options):
            seen.append((x.clone(), sigmas.clone()))
            return x
        return run

    monkeypatch.setattr(guided_sampling, "with_resampling", fake)
    return seen


def test_resampled_inpainting_runs_on_the_spacing_asked_for_and_strength_one_is_the_prior(monkeypatch):
    seen = _record_resampling(monkeypatch)
    d = Diffusion(img_size=4, channels=1, noise_steps=50)
    net = _Unused()
    known, mask = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    levels = {}
    for spacing in ("uniform", "karras"):
        generate(d, net, 1, known=known, mask=mask, resample=2, sampler="ddim", steps=5, spacing=spacing)
        levels[spacing] = seen.pop()[1]
        torch.testing.assert_close(levels[spacing], samplers.sampler_sigmas(build_denoiser(d, net), "ddim", 5,
                                                                             spacing), rtol=0, atol=0)
    assert not torch.allclose(levels["uniform"], levels["karras"])
    # S = 1 starts from the ordinary prior, with or without an init image, as samplers.run does.
    kw = dict(known=known, mask=mask, resample=2, sampler="ddim", steps=5, seed=3)
    generate(d, net, 2, **kw)
    generate(d, net, 2, init=torch.ones(1, 1, 4, 4), strength=1.0, **kw)
    (plain, plain_levels), (with_init, init_levels) = seen
    assert torch.equal(with_init, plain) and torch.equal(init_levels, plain_levels)
    sigma_max = float(plain_levels[0])
    assert plain.std().item() == pytest.approx(math.sqrt(1 + sigma_max ** 2), rel=0.5)  # the prior's scale


def _tiny_latent_diffusion():
    from ddpmkit.latent import LatentDiffusion
    from ddpmkit.models.autoencoder import AutoencoderKL

    torch.manual_seed(0)
    ae = AutoencoderKL(channels=3, latent_channels=2, downsample=2, base_channels=8)
    return LatentDiffusion(Diffusion(img_size=4, channels=2, noise_steps=20), ae, scale_factor=1.5)


class _LatentNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x)


def test_latent_model_inpainting_encodes_the_guide_and_pastes_the_known_pixels(monkeypatch):
    """A latent model takes guide images at the image size (3 x 8 x 8 here, latents 2 x 4 x 4): the guide is
    encoded, the mask pooled to the latent grid, and the known pixels come back bit-exact after decoding."""
    ld, net = _tiny_latent_diffusion(), _LatentNet()
    g = torch.Generator().manual_seed(0)
    known = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 5:] = 1
    pasted, paste = [], InpaintDenoiser.paste

    def spy(self, x0):
        pasted.append((self.known.clone(), self.mask.clone()))
        return paste(self, x0)

    monkeypatch.setattr(InpaintDenoiser, "paste", spy)
    out = generate(ld, net, 2, known=known, mask=mask, sampler="ddim", steps=2, seed=0)
    assert out.shape == (2, 3, 8, 8)
    assert torch.equal(out[..., :5], known[..., :5].expand(2, 3, 8, 5))
    assert (out[..., 5:] - known[..., 5:]).abs().max() > 0.01
    latent_known, latent_mask = pasted[-1]
    with torch.no_grad():
        torch.testing.assert_close(latent_known, ld.to_latents(known))
    assert torch.equal(latent_mask, torch.tensor([0.0, 0, 1, 1]).expand(1, 1, 4, 4))
    # Two chunks (batch_size 1) with one mask per image: each image keeps its own known pixels.
    masks = torch.stack([mask[0], 1 - mask[0]])
    knowns = torch.stack([known[0], -known[0]])
    two = generate(ld, net, 2, known=knowns, mask=masks, sampler="ddim", steps=2, seed=0, batch_size=1)
    assert torch.equal(two[0, ..., :5], knowns[0, ..., :5]) and torch.equal(two[1, ..., 5:], knowns[1, ..., 5:])
    # And without inpainting, a latent model's samples are the decoded latents.
    plain = generate(ld, net, 1, sampler="ddim", steps=2, seed=0)
    assert plain.shape == (1, 3, 8, 8) and plain.abs().max() <= 1


def test_labelled_grid_centres_each_caption_on_its_row():
    from ddpmkit.guidance import labelled_grid

    names = ("top", "bottom", "mid")
    img = np.asarray(labelled_grid(-torch.ones(6, 1, 8, 8), names, 2, min_width=64))
    margin = 8 + 7 * max(map(len, names))
    ink = img[:, :margin] > 127
    row_h = img.shape[0] / len(names)
    for r in range(len(names)):
        ys = np.nonzero(ink[int(r * row_h):int((r + 1) * row_h)].any(1))[0]
        assert len(ys), r
        centre = (ys.min() + ys.max()) / 2
        assert abs(centre - row_h / 2) <= 0.2 * row_h, (r, ys)


# --- the command line: flags parsed by the real parser, what `sample` and `edit` pass on --------

@pytest.fixture
def fake_ckpt(monkeypatch):
    """cli's checkpoint loading replaced by a 2-class 1 x 8 x 8 model that never runs, and generate by a
    recorder: `calls` gets the loader's (path, device, ema) and generate's keyword arguments."""
    import ddpmkit.cli as cli

    calls = {"load": [], "generate": []}
    cfg = from_dict({"model": {"arch": "adm", "num_classes": 2, "class_names": ["bottom", "top"]}})
    model, diffusion = _Unused(), Diffusion(img_size=8, channels=1, noise_steps=20)
    model.num_classes = 2

    class Ctx:
        enabled = False

        def close(self):
            pass

    def load(path, device, ema=True):
        calls["load"].append((path, device, ema))
        return Ctx(), model, diffusion, cfg

    def fake_generate(diffusion, model, n, **kw):
        calls["generate"].append({"n": n, **kw})
        return torch.zeros(n, 1, 8, 8)

    monkeypatch.setattr(cli, "_load_for_sampling", load)
    monkeypatch.setattr(guided_sampling, "generate", fake_generate)
    return calls


def test_cli_sample_passes_its_condition_flags_on(fake_ckpt, tmp_path, capsys):
    image = _png(tmp_path / "img.png", np.full((8, 8), 255))
    mask = _png(tmp_path / "mask.png", np.full((8, 8), 255))
    assert main(["sample", "--ckpt", "c.pt", "--class", "top", "--guidance", "2.5", "--rescale", "0.25",
                 "--guidance-interval", "0.5", "9", "--inpaint", image, "--mask", mask, "--resample", "3",
                 "--sampler", "ddim", "--steps", "4", "--spacing", "karras", "--seed", "7", "--batch-size", "5",
                 "--eta", "0.5", "--bf16", "--clip", "on", "-n", "3", "--device", "cpu", "--no-ema",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert fake_ckpt["load"] == [("c.pt", "cpu", False)]
    kw = fake_ckpt["generate"].pop()
    assert torch.equal(kw.pop("labels"), torch.tensor([1]))
    assert torch.equal(kw.pop("known"), torch.ones(1, 1, 8, 8)) and torch.equal(kw.pop("mask"), torch.ones(1, 1, 8, 8))
    assert kw == {"n": 3, "guidance": 2.5, "rescale_phi": 0.25, "interval": [0.5, 9.0], "resample": 3,
                  "sampler": "ddim", "steps": 4, "spacing": "karras", "seed": 7, "batch_size": 5, "bf16": True,
                  "clip": True, "eta": 0.5}
    # The defaults: one labelled row per class, no guidance, no rescale, no interval, no resampling.
    assert main(["sample", "--ckpt", "c.pt", "-n", "4", "--out", str(tmp_path / "d.png")]) == 0
    assert fake_ckpt["load"][-1] == ("c.pt", "auto", True)
    kw = fake_ckpt["generate"].pop()
    assert torch.equal(kw.pop("labels"), torch.tensor([0, 0, 1, 1]))
    assert kw == {"n": 4, "guidance": 1.0, "rescale_phi": 0.0, "interval": None, "known": None, "mask": None,
                  "resample": 1, "sampler": "dpm++2m", "steps": 20, "spacing": None, "seed": 0, "batch_size": 64,
                  "bf16": "auto", "clip": None}  # ddpm sample's default precision


def test_cli_edit_passes_its_flags_on(fake_ckpt, tmp_path, capsys):
    image = _png(tmp_path / "img.png", np.full((8, 8), 255))
    out = tmp_path / "e.png"
    assert main(["edit", "--ckpt", "c.pt", "--init", image, "--strength", "0.5", "--class", "top", "--guidance", "2",
                 "--rescale", "0.25", "--guidance-interval", "0.5", "9", "--seed", "7", "--sampler", "euler",
                 "--steps", "4", "-n", "2", "--bf16", "--no-ema", "--device", "cpu", "--out", str(out)]) == 0
    assert fake_ckpt["load"] == [("c.pt", "cpu", False)]
    kw = fake_ckpt["generate"].pop()
    assert torch.equal(kw.pop("labels"), torch.tensor([1])) and torch.equal(kw.pop("init"), torch.ones(1, 1, 8, 8))
    assert kw == {"n": 2, "guidance": 2.0, "rescale_phi": 0.25, "interval": [0.5, 9.0], "strength": 0.5,
                  "sampler": "euler", "steps": 4, "seed": 7, "bf16": True}
    assert out.is_file() and "2 edits at strength 0.5" in capsys.readouterr().out
    assert main(["edit", "--ckpt", "c.pt", "--init", image, "--strength", "1", "--out", str(out)]) == 0
    assert fake_ckpt["load"][-1] == ("c.pt", "auto", True)
    kw = fake_ckpt["generate"].pop()
    assert kw.pop("labels") is None and kw.pop("init").shape == (1, 1, 8, 8)
    assert kw == {"n": 1, "guidance": 1.0, "rescale_phi": 0.0, "interval": None, "strength": 1.0,
                  "sampler": "ddim", "steps": None, "seed": 0, "bf16": False}


def test_cli_condition_errors_name_the_flag(fake_ckpt, tmp_path, capsys):
    common = ["--ckpt", "c.pt", "--out", str(tmp_path / "o.png")]
    for lo, hi in (("2", "2"), ("3", "1"), ("-1", "2")):
        assert "0 <= LO < HI" in _error(capsys, ["sample", *common, "--guidance", "2", "--guidance-interval", lo, hi])
    image, big = _png(tmp_path / "img.png", np.zeros((8, 8))), _png(tmp_path / "big.png", np.zeros((16, 16)))
    err = _error(capsys, ["sample", *common, "--inpaint", big, "--mask", image])
    assert "error: --inpaint image " in err and "16x16" in err
    err = _error(capsys, ["edit", *common, "--init", str(tmp_path / "none.png"), "--strength", "0.5"])
    assert "error: --init image file " in err and "does not exist" in err
    assert not fake_ckpt["generate"]


def _subparser(name):
    import argparse

    from ddpmkit.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub, sub.choices[name]


def test_edit_and_condition_flags_have_help_that_states_the_real_defaults(capsys, monkeypatch):
    import re

    sub, _ = _subparser("edit")
    assert next(a.help for a in sub._choices_actions if a.dest == "edit")  # listed with a summary in ddpm --help
    for name in ("edit", "sample"):
        for action in _subparser(name)[1]._actions:
            if action.dest == "help":
                continue
            assert action.help and action.help.strip(), (name, action.option_strings)
            stated = re.search(r"\(default: ([^ )]+)", action.help)
            if stated and action.default not in (None, False):
                value = stated.group(1)
                assert (float(value) == action.default if isinstance(action.default, (int, float))
                        else value == action.default), (name, action.option_strings, value, action.default)
    # Where the help names the value by a placeholder, the usage line shows that same placeholder.
    placeholders = {"--strength": ("S",), "--guidance": ("W",), "--guidance-interval": ("LO", "HI"),
                    "--resample": ("U",), "--inpaint": ("IMAGE",)}
    for name in ("edit", "sample"):
        for action in _subparser(name)[1]._actions:
            flag = next((f for f in action.option_strings if f in placeholders), None)
            if flag:
                shown = action.metavar if isinstance(action.metavar, tuple) else (action.metavar,)
                assert shown == placeholders[flag], (name, flag, action.metavar)
                assert all(re.search(rf"\b{m}\b", action.help) for m in shown), (name, flag, action.help)
    # The examples keep their lines (a raw epilog, not one reflowed paragraph).
    from ddpmkit.guidance.commands import EDIT_EXAMPLES

    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    lines = capsys.readouterr().out.splitlines()
    for line in EDIT_EXAMPLES.strip("\n").splitlines():
        assert line in lines
