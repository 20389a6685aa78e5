"""Image folders, conversions, the decoded-image cache and seeded batches."""
import numpy as np
import pytest
import torch
from PIL import Image

from ddpmkit.cli import main
from ddpmkit.data import ImageData, epoch_batches, list_images, load_data, load_folder, load_image, num_batches
from ddpmkit.errors import DdpmError


def test_seed_layout_and_flat_folder(image_folder, tmp_path):
    data = load_folder(image_folder, 8, 3, log=lambda *a: None)
    assert data.images.shape == (24, 8, 8, 3) and data.images.dtype == np.uint8
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in list(image_folder.rglob("*.png"))[:5]:
        (flat / p.name).write_bytes(p.read_bytes())
    assert len(load_folder(flat, 8, 3)) == 5


@pytest.mark.parametrize("mode,make", [
    ("L", lambda: Image.new("L", (30, 20), 128)),
    ("RGBA", lambda: Image.new("RGBA", (20, 30), (255, 0, 0, 0))),
    ("P", lambda: Image.new("RGB", (16, 16), (0, 255, 0)).convert("P")),
    ("I;16", lambda: Image.fromarray(np.full((12, 12), 65535, np.uint16))),
    ("CMYK", lambda: Image.new("CMYK", (10, 10), (0, 0, 0, 0))),
])
def test_modes_are_converted(tmp_path, mode, make):
    path = tmp_path / ("x.png" if mode != "CMYK" else "x.jpg")
    make().save(path)
    rgb = load_image(path, 8, 3)
    gray = load_image(path, 8, 1)
    assert rgb.shape == (8, 8, 3) and gray.shape == (8, 8, 1)
    if mode == "RGBA":  # fully transparent pixels are composited over white
        assert rgb.min() == 255
    if mode == "I;16":
        assert gray.min() == 255


def test_resize_and_center_crop(tmp_path):
    arr = np.zeros((10, 30, 3), np.uint8)
    arr[:, 10:20] = 255  # white centre third of a wide image
    Image.fromarray(arr).save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png", 10, 3)
    assert out.shape == (10, 10, 3) and out[:, 2:8].min() > 200


def test_symlink_loop_is_followed_once(image_folder):
    (image_folder / "a" / "loop").symlink_to(image_folder, target_is_directory=True)
    paths = list_images(image_folder)
    assert len(paths) == len(set(p.resolve() for p in paths)) == 24


def test_decompression_bomb_is_skipped(tmp_path):
    Image.new("L", (8, 8)).save(tmp_path / "ok.png")
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1000  # treat a 100x100 image as a bomb
    try:
        Image.new("L", (100, 100)).save(tmp_path / "bomb.png")
        logs = []
        data = load_folder(tmp_path, 8, 1, log=logs.append)
    finally:
        Image.MAX_IMAGE_PIXELS = old
    assert len(data) == 1 and data.skipped == 1 and any("bomb.png" in m for m in logs)


def test_memmap_cache_is_reused_and_invalidated(image_folder, tmp_path):
    cache = tmp_path / "cache"
    a = load_folder(image_folder, 8, 3, cache_dir=cache)
    assert isinstance(a.images, np.memmap) and len(list(cache.glob("*.npy"))) == 1
    b = load_folder(image_folder, 8, 3, cache_dir=cache)
    assert np.array_equal(a.images, b.images)
    Image.new("RGB", (8, 8)).save(image_folder / "new.png")
    c = load_folder(image_folder, 8, 3, cache_dir=cache)
    assert len(c) == 25 and len(list(cache.glob("*.npy"))) == 2


@pytest.mark.parametrize("name,channels", [("builtin:digits", 1), ("builtin:shapes", 3)])
def test_builtins(name, channels):
    data = load_data(name, 16)
    assert data.channels == channels and data.images.shape[1:3] == (16, 16) and len(data) > 1000
    assert data.images.std() > 20  # not blank
    assert load_data(name, 16, channels=4 - channels).channels == 4 - channels


def test_unknown_builtin():
    with pytest.raises(DdpmError, match="unknown built-in"):
        load_data("builtin:cifar", 16)


def test_a_file_of_another_kind_names_every_accepted_data_source(tmp_path, capsys):
    """`--data x.pt` (a regular file that is neither an array nor an IDX file) is refused in one line
    that lists what --data takes, not just "is not a folder"; through the CLI: exit 2, no traceback,
    nothing written."""
    pt = tmp_path / "x.pt"
    torch.save({"images": torch.zeros(2, 8, 8)}, pt)
    with pytest.raises(DdpmError) as info:
        load_data(str(pt), 8)
    message = str(info.value)
    assert message.startswith(f"data path {pt} is not a folder") and "\n" not in message
    for accepted in ("folder of images", ".npy", ".npz", "IDX", "-images-idx3-ubyte", ".gz",
                     "builtin:digits", "builtin:shapes"):
        assert accepted in message, (accepted, message)
    code = main(["train", "--data", str(pt), "--workdir", str(tmp_path / "work"), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"ddpm: error: {message}" and "Traceback" not in err
    assert not (tmp_path / "work").exists()


def test_epoch_batches_cover_data_and_resume_mid_epoch():
    images = np.arange(10 * 4 * 4 * 1, dtype=np.uint8).reshape(10, 4, 4, 1)
    data = ImageData(images, "test")
    full = list(epoch_batches(data, 3, seed=1, epoch=2, hflip=True))
    assert len(full) == num_batches(10, 3) == 4 and sum(len(b) for b in full) == 10
    tail = list(epoch_batches(data, 3, seed=1, epoch=2, start=2, hflip=True))
    assert all(torch.equal(x, y) for x, y in zip(full[2:], tail))
    other = list(epoch_batches(data, 3, seed=1, epoch=3, hflip=True))
    assert not all(torch.equal(x, y) for x, y in zip(full, other))
    assert -1.0 <= float(torch.cat(full).min()) and float(torch.cat(full).max()) <= 1.0


def test_rank_sharding_partitions_each_global_batch():
    images = np.random.default_rng(0).integers(0, 255, (11, 4, 4, 1), dtype=np.uint8)
    data = ImageData(images, "test")
    single = torch.cat(list(epoch_batches(data, 4, seed=0, epoch=0)))
    shards = [torch.cat(list(epoch_batches(data, 2, seed=0, epoch=0, rank=r, world=2))) for r in range(2)]
    key = lambda t: sorted(map(tuple, t.flatten(1).tolist()))
    assert key(torch.cat(shards)) == key(single)
