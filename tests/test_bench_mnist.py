"""benchmarks/bench_mnist.py on a fake MNIST made of scikit-learn's digits (no download): the
EMA snapshots, the classifier metric and the result files."""
import argparse
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def fake_mnist(tmp_path_factory, load_benchmark):
    """scikit-learn digits, upscaled 3x and padded to 28 px, as the four MNIST IDX files."""
    datasets = pytest.importorskip("sklearn.datasets")
    bench = load_benchmark("bench_mnist")
    digits = datasets.load_digits()
    images = np.pad(np.kron(digits.images, np.ones((3, 3))) * (255 / 16), ((0, 0), (2, 2), (2, 2))).round()
    labels = digits.target
    root = tmp_path_factory.mktemp("mnist")
    bench.write_idx(root / "train-images-idx3-ubyte", images[:256])
    bench.write_idx(root / "train-labels-idx1-ubyte", labels[:256])
    for name, arr in (("t10k-images-idx3-ubyte", images[1000:1200]), ("t10k-labels-idx1-ubyte", labels[1000:1200])):
        bench.write_idx(root / name, arr)  # the test set as MNIST ships it, gzipped
        (root / f"{name}.gz").write_bytes(gzip.compress((root / name).read_bytes()))
    return bench, root


def args_for(work: Path, **changes) -> argparse.Namespace:
    args = dict(model_size="tiny", image_size=16, batch_size=32, lr=1e-3, warmup=0, epochs=1, eval_every_images=96,
                eval_n=32, nfe=[2, 3], curve_nfe=2, subset=0, device="cpu", threads=0, bf16=False, sample_batch=32,
                extractor="classifier", classifier_epochs=1)
    args.update(changes)
    return argparse.Namespace(**args)


def test_snapshots_metric_and_results(fake_mnist, tmp_path):
    bench, root = fake_mnist
    args = args_for(tmp_path)
    assert bench.run(args, tmp_path, root / "train-images-idx3-ubyte", root) == 0
    out = json.loads((tmp_path / "results.json").read_text())
    rows = out["over_time"]
    # 256 images / batch 32 = 8 steps; a copy every 3 steps (96 images), plus the last step.
    assert [r["step"] for r in rows] == [3, 6, 8]
    assert [r["images"] for r in rows] == [96, 192, 256]
    assert all(b["train_s"] > a["train_s"] > 0 for a, b in zip(rows, rows[1:]))
    assert all(np.isfinite(r["fid"]) and 0 <= r["recognized"] <= 1 for r in rows)
    assert set(out["final"]) == {"2", "3"} and out["final"]["2"]["fid"] == rows[-1]["fid"]
    assert "test accuracy" in out["metric"]
    table = (tmp_path / "results.md").read_text()
    assert "| 6 | 192 |" in table and "| 3 |" in table


def test_snapshot_copies_the_ema_weights(fake_mnist, tmp_path):
    """The copy taken at the last step is exactly the checkpoint's EMA model, not the raw weights."""
    from ddpmkit import load_model
    from ddpmkit.train import prepare, train

    bench, root = fake_mnist
    cfg, _ = prepare({"data": {"path": str(root / "train-images-idx3-ubyte"), "image_size": 16, "channels": 1},
                      "model": {"size": "tiny"},
                      "train": {"workdir": str(tmp_path), "epochs": 1, "batch_size": 64, "lr": 1e-3,
                                "sample_every_epochs": 0, "device": "cpu"}}, fresh=True, log=lambda *a: None)
    task = bench.snapshot_task(2)
    summary = train(cfg, None, log=lambda *a: None, progress=False, task=task)
    assert [s["step"] for s in task.snaps] == [2, 4]
    ema, _, _ = load_model(str(summary["ckpt"]), "cpu")
    for key, value in ema.state_dict().items():
        assert torch.equal(task.snaps[-1]["weights"][key], value), key
    raw = torch.load(summary["ckpt"], map_location="cpu", weights_only=False)["model_state_dict"]
    assert any(not torch.equal(raw[k], v) for k, v in task.snaps[-1]["weights"].items())
    # the first copy was taken two steps earlier, and kept: it differs from the last
    assert any(not torch.equal(task.snaps[0]["weights"][k], v) for k, v in task.snaps[-1]["weights"].items())


def test_classifier_extractor_separates_digits_from_noise(fake_mnist, tmp_path):
    """The metric's features tell real digits from noise: FD(real, real') << FD(real, noise), and
    the classifier recognizes held-out digits, not noise."""
    from ddpmkit.data import load_data
    from ddpmkit.metrics import evaluate_features

    bench, _ = fake_mnist
    digits = pytest.importorskip("sklearn.datasets").load_digits()
    bench.write_idx(tmp_path / "all-images-idx3-ubyte",
                    np.pad(np.kron(digits.images, np.ones((3, 3))) * (255 / 16), ((0, 0), (2, 2), (2, 2))).round())
    images = load_data(str(tmp_path / "all-images-idx3-ubyte"), 16, 1).images
    net = bench.train_digit_cnn(images[:1200], digits.target[:1200], epochs=20)
    assert bench.classifier_accuracy(net, images[1200:], digits.target[1200:]) > 0.9
    extractor = bench.classifier_extractor(net)
    to_nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)  # noqa: E731
    real, other = extractor(to_nchw(images[1200:1500])), extractor(to_nchw(images[1500:]))
    noise = extractor(torch.randint(0, 256, (300, 1, 16, 16), dtype=torch.uint8,
                                    generator=torch.Generator().manual_seed(0)))
    assert real.shape == (300, 128)
    fd_real = evaluate_features(real.numpy(), other.numpy())["fid"]
    fd_noise = evaluate_features(real.numpy(), noise.numpy())["fid"]
    assert fd_noise > 10 * fd_real
    assert extractor.recognized(other) > 0.4 > 0.1 > extractor.recognized(noise)
