import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# DDPMKIT_TEST_THREADS=1 lets two test runs share the 2-core machine without oversubscribing it.
torch.set_num_threads(int(os.environ.get("DDPMKIT_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def no_inception_download(monkeypatch):
    """No test downloads the FID Inception weights, which `ddpm eval` does on first use; the tests of
    the download serve them from 127.0.0.1 (test_fid_download.py)."""
    monkeypatch.setenv("DDPMKIT_NO_DOWNLOAD", "1")


@pytest.fixture(scope="session")
def load_benchmark():
    """A function that imports benchmarks/NAME.py as a module (the folder is not a package)."""
    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


@pytest.fixture
def one_torch_thread():
    """One intra-op thread in this process: on a shared 2-core machine two threads contend and a
    tiny training step gets ~10x slower. Restored afterwards for other test files."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def image_folder(tmp_path):
    """A small seed-layout folder (dataset/class_folder/*.png|jpg) of smooth coloured blobs."""
    root = tmp_path / "dataset"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:24, 0:20]
    for i in range(24):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        cy, cx = rng.uniform(4, 16, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 20.0)
        color = rng.uniform(0.3, 1.0, 3)
        arr = (blob[..., None] * color * 255).astype(np.uint8)
        Image.fromarray(arr).save(sub / f"img{i}.{'png' if i % 3 else 'jpg'}")
    return root
