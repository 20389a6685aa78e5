"""Array data sets as --data: IDX (MNIST layout), .npy and .npz, and their bad-input cases."""
import gzip
import pickle
import struct

import numpy as np
import pytest

from ddpmkit import formats
from ddpmkit.data import fit_arrays, load_data
from ddpmkit.errors import DdpmError


def idx_bytes(arr: np.ndarray, type_code: int = 0x08) -> bytes:
    """An IDX file as published with MNIST: 0, 0, element type, ndim, big-endian dims, data."""
    return bytes([0, 0, type_code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def digits(n=12, h=28):
    rng = np.random.default_rng(0)
    imgs = np.zeros((n, h, h), np.uint8)
    imgs[:, 4:-4, 4:-4] = rng.integers(1, 256, (n, h - 8, h - 8))
    return imgs, (np.arange(n) % 10).astype(np.uint8)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_file_and_folder_with_labels(tmp_path, gz):
    imgs, labels = digits()
    suffix = ".gz" if gz else ""
    write = (lambda p, b: p.write_bytes(gzip.compress(b))) if gz else (lambda p, b: p.write_bytes(b))
    write(tmp_path / f"train-images-idx3-ubyte{suffix}", idx_bytes(imgs))
    write(tmp_path / f"train-labels-idx1-ubyte{suffix}", idx_bytes(labels))
    write(tmp_path / f"t10k-images-idx3-ubyte{suffix}", idx_bytes(imgs[:3]))  # folder picks 'train'
    for source in (tmp_path / f"train-images-idx3-ubyte{suffix}", tmp_path):
        data = load_data(str(source), 32)
        assert data.images.shape == (12, 32, 32, 1) and data.channels == 1
        # 28 px padded to 32 with the (black) border: the digit is unscaled and centred
        assert np.array_equal(data.images[:, 2:30, 2:30, 0], imgs) and data.images[:, :2].max() == 0
        assert np.array_equal(data.labels, labels) and data.classes == tuple("0123456789")
    assert len(load_data(str(tmp_path / f"t10k-images-idx3-ubyte{suffix}"), 28)) == 3


def test_idx_without_labels_and_rgb_request(tmp_path):
    imgs, _ = digits(5)
    (tmp_path / "x-images-idx3-ubyte").write_bytes(idx_bytes(imgs))
    data = load_data(str(tmp_path / "x-images-idx3-ubyte"), 16, channels=3)
    assert data.images.shape == (5, 16, 16, 3) and data.labels is None and data.classes == ()


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[:-10], "truncated"),
    (lambda b: b + b"\0", "size does not match"),
    (lambda b: b"\x01\x00" + b[2:], "bad magic"),
    (lambda b: b[:2] + b"\x0d" + b[3:], "element type"),
    (lambda b: b[:3] + b"\x02" + b[4:], "dimensions"),
    (lambda b: b[:9], "header is truncated"),
])
def test_bad_idx_is_one_line_error(tmp_path, damage, message):
    imgs, _ = digits(4)
    p = tmp_path / "bad-images-idx3-ubyte"
    p.write_bytes(damage(idx_bytes(imgs)))
    with pytest.raises(DdpmError, match=message) as exc:
        load_data(str(p), 28)
    assert "\n" not in str(exc.value)


def test_idx_size_limit_checked_before_reading(tmp_path, monkeypatch):
    # A 4-byte body claiming 60000 x 1000 x 1000 images: refused from the header alone.
    p = tmp_path / "huge-images-idx3-ubyte"
    p.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 60000, 1000, 1000) + b"\0" * 4)
    with pytest.raises(DdpmError, match="over the limit"):
        load_data(str(p), 28)
    monkeypatch.setattr(formats, "MAX_ARRAY_BYTES", 100)
    imgs, _ = digits(4)
    (tmp_path / "a-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(imgs)))
    with pytest.raises(DdpmError, match="over the limit"):
        load_data(str(tmp_path / "a-images-idx3-ubyte.gz"), 28)


def test_label_count_mismatch(tmp_path):
    imgs, labels = digits(6)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(imgs))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels[:5]))
    with pytest.raises(DdpmError, match="expected 6 integers"):
        load_data(str(tmp_path), 28)
    np.savez(tmp_path / "m.npz", images=imgs, labels=labels[:4])
    with pytest.raises(DdpmError, match="expected 6 integers"):
        load_data(str(tmp_path / "m.npz"), 28)


@pytest.mark.parametrize("shape", [(7, 20, 20), (7, 20, 20, 1), (7, 20, 20, 3)])
@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_npy_shapes_and_dtypes(tmp_path, shape, dtype):
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, shape).astype(np.uint8)
    np.save(tmp_path / "a.npy", arr if dtype == "uint8" else arr.astype(np.float32) / 255)
    data = load_data(str(tmp_path / "a.npy"), 20)
    c = 1 if len(shape) == 3 else shape[-1]
    assert data.images.shape == (7, 20, 20, c) and data.images.dtype == np.uint8
    assert np.array_equal(data.images, arr.reshape(7, 20, 20, c))  # exact round trip at native size
    assert load_data(str(tmp_path / "a.npy"), 12).images.shape == (7, 12, 12, c)  # resized


@pytest.mark.parametrize("keys", [("images", "labels"), ("x", "y"), ("only",)])
def test_npz_keys(tmp_path, keys):
    imgs, labels = digits(8, 16)
    arrays = {keys[0]: imgs} | ({keys[1]: labels} if len(keys) > 1 else {})
    np.savez_compressed(tmp_path / "d.npz", **arrays)
    data = load_data(str(tmp_path / "d.npz"), 16)
    assert data.images.shape == (8, 16, 16, 1)
    assert (data.labels is None) == (len(keys) == 1)


def test_npz_ambiguous_keys(tmp_path):
    np.savez(tmp_path / "d.npz", a=np.zeros((2, 8, 8), np.uint8), b=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(DdpmError, match="name the images array"):
        load_data(str(tmp_path / "d.npz"), 8)


def test_pickles_are_refused(tmp_path):
    obj = np.empty(3, dtype=object)
    obj[:] = [np.zeros((8, 8)), "x", 1]
    np.save(tmp_path / "p.npy", obj, allow_pickle=True)
    np.savez(tmp_path / "p.npz", images=obj)
    # a raw pickle renamed to .npy
    (tmp_path / "raw.npy").write_bytes(pickle.dumps(np.zeros((2, 8, 8), np.uint8)))
    for name in ("p.npy", "p.npz", "raw.npy"):
        with pytest.raises(DdpmError) as exc:
            load_data(str(tmp_path / name), 8)
        assert "\n" not in str(exc.value)
    with pytest.raises(DdpmError, match="pickles"):
        load_data(str(tmp_path / "p.npy"), 8)


@pytest.mark.parametrize("arr,message", [
    (np.zeros((8, 8), np.uint8), "expected \\(N, H, W\\)"),
    (np.zeros((2, 8, 8, 3, 1), np.uint8), "expected \\(N, H, W\\)"),
    (np.zeros((2, 3, 8, 8), np.uint8), "channels-first"),
    (np.zeros((2, 8, 8), np.int32), "dtype int32"),
    (np.full((2, 8, 8), 1.5, np.float32), "must lie in \\[0, 1\\]"),
    (np.full((2, 8, 8), -0.1, np.float64), "must lie in \\[0, 1\\]"),
    (np.full((2, 8, 8), np.nan, np.float32), "must lie in \\[0, 1\\]"),
    (np.zeros((0, 8, 8), np.uint8), "N > 0"),
])
def test_bad_arrays(tmp_path, arr, message):
    np.save(tmp_path / "bad.npy", arr)
    with pytest.raises(DdpmError, match=message):
        load_data(str(tmp_path / "bad.npy"), 8)


def test_truncated_npy_and_npz(tmp_path):
    np.save(tmp_path / "t.npy", np.zeros((50, 8, 8), np.uint8))
    (tmp_path / "t.npy").write_bytes((tmp_path / "t.npy").read_bytes()[:-100])
    with pytest.raises(DdpmError, match="cannot read t.npy"):
        load_data(str(tmp_path / "t.npy"), 8)
    np.savez(tmp_path / "t.npz", images=np.zeros((50, 8, 8), np.uint8))
    (tmp_path / "t.npz").write_bytes((tmp_path / "t.npz").read_bytes()[:-300])
    with pytest.raises(DdpmError, match="t.npz"):
        load_data(str(tmp_path / "t.npz"), 8)


def test_npz_size_checked_before_loading(tmp_path, monkeypatch):
    np.savez(tmp_path / "big.npz", images=np.zeros((10, 8, 8), np.uint8))
    monkeypatch.setattr(formats, "MAX_ARRAY_BYTES", 200)
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load reached before the size check"))
    with pytest.raises(DdpmError, match="over the limit"):
        load_data(str(tmp_path / "big.npz"), 8)


def test_fit_pads_small_square_and_resizes_otherwise():
    imgs = np.full((2, 28, 28, 1), 9, np.uint8)
    padded = fit_arrays(imgs, 32)
    assert padded.shape == (2, 32, 32, 1) and padded.min() == 9  # border-median pad = 9
    resized = fit_arrays(np.zeros((2, 8, 12, 3), np.uint8), 32)
    assert resized.shape == (2, 32, 32, 3)
