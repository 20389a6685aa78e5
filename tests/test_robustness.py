"""Never lose a run: non-finite losses, storage faults, safe loading, exports and hostile data."""
import ast
import errno
import io
import json
import os
import struct
import subprocess
import sys
import threading
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import ddpmkit.train as train_module
from ddpmkit import checkpoint, data as data_module, losses
from ddpmkit.cli import main
from ddpmkit.data import load_folder, load_image
from ddpmkit.errors import DdpmError
from ddpmkit.train import prepare, train

SRC = Path(__file__).resolve().parents[1] / "src" / "ddpmkit"
SMALL_MODEL = {"size": "custom", "base_channels": 8, "channel_mults": [1, 2], "attn_levels": [1], "time_dim": 16}
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def overrides(folder, workdir, **train_kw):
    t = {"workdir": str(workdir), "run_name": "r", "epochs": 1, "batch_size": 8, "sample_every_epochs": 0,
         "ema_decay": 0.9, "device": "cpu"}
    t.update(train_kw)
    return {"data": {"path": str(folder), "image_size": 8}, "model": SMALL_MODEL,
            "diffusion": {"timesteps": 50}, "train": t}


def run(ov, log=lambda *a: None):
    cfg, ckpt = prepare(ov)
    return train(cfg, ckpt, progress=False, log=log)


def cli_train(folder, workdir, *extra):
    return main(["train", "--data", str(folder), "--workdir", str(workdir), "--run-name", "r", "--image-size", "8",
                 "--set", "model.size=custom", "--set", "model.base_channels=8", "--set", "model.channel_mults=1,2",
                 "--set", "model.attn_levels=1", "--set", "model.time_dim=16", "--timesteps", "50",
                 "--batch-size", "8", "--sample-every", "0", "--device", "cpu", "--no-progress", *extra])


def one_line_error(capsys, code):
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpm: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def tensors(obj, where=""):
    if isinstance(obj, torch.Tensor):
        yield where, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{where}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{where}[{i}]")


def nonfinite(obj):
    return [w for w, t in tensors(obj) if t.is_floating_point() and not torch.isfinite(t).all()]



pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


@pytest.fixture(autouse=True)
def no_curves(monkeypatch):
    """No curves.png in in-process runs here (about a second each); tests/test_train.py tests it."""
    monkeypatch.setattr(train_module, "DRAW_CURVES", False)


# --- 3. a non-finite loss never reaches a checkpoint ---------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_loss_never_reaches_a_checkpoint(image_folder, tmp_path, monkeypatch, bad):
    real_call = losses.VPLoss.__call__
    calls = {"n": 0}

    def bad_for_two_calls(self, net, x0, draws=None):
        calls["n"] += 1
        loss = real_call(self, net, x0, draws)
        return loss * bad if calls["n"] in (3, 4) else loss  # steps 3 and 4 of 6 (3 batches per epoch)

    monkeypatch.setattr(losses.VPLoss, "__call__", bad_for_two_calls)
    written = []
    real_save = checkpoint.atomic_save

    def checked_save(obj, path):
        assert not nonfinite(obj), f"non-finite tensors about to be saved: {nonfinite(obj)}"
        real_save(obj, path)
        written.append(obj["global_step"])

    monkeypatch.setattr(checkpoint, "atomic_save", checked_save)
    logs = []
    summary = run(overrides(image_folder, tmp_path, epochs=2, ckpt_every_steps=1), log=logs.append)
    assert summary["status"] == "finished" and summary["nonfinite_skipped"] == 2
    # batches 3 and 4 are skipped: the epoch-end save after batch 3 still holds step 2
    assert written == [1, 2, 2, 3, 4]
    assert sum("non-finite loss or gradient" in m for m in logs) == 2
    ckpt = checkpoint.load_checkpoint(summary["ckpt"])
    assert not nonfinite(ckpt)
    assert ckpt["nonfinite_skipped"] == 2 and ckpt["global_step"] == 4 and ckpt["next_epoch"] == 2
    # the count survives a resume
    monkeypatch.setattr(losses.VPLoss, "__call__", real_call)
    assert run(overrides(image_folder, tmp_path, epochs=3))["nonfinite_skipped"] == 2



def test_weights_made_nonfinite_by_a_step_never_reach_a_checkpoint(image_folder, tmp_path, monkeypatch):
    # A finite gradient whose optimizer step still breaks the weights (as an absurd lr * weight
    # decay would; `validate` refuses such values, so the step itself is patched): the save after
    # that step must refuse them, and the checkpoint of the step before must survive.
    run(overrides(image_folder, tmp_path, epochs=1))  # steps 1-3 (3 batches per epoch)
    real_step = torch.optim.AdamW.step
    steps = {"n": 0}

    def poisoning_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        steps["n"] += 1
        if steps["n"] == 2:  # global step 5
            self.param_groups[0]["params"][0].data.view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    written = []  # (step, non-finite tensors) of each checkpoint as it is written (it holds live tensors)
    real_save = checkpoint.atomic_save
    monkeypatch.setattr(checkpoint, "atomic_save",
                        lambda obj, path: (written.append((obj["global_step"], nonfinite(obj))), real_save(obj, path)))
    with pytest.raises(DdpmError, match="weights became non-finite at step 5.*last good checkpoint is .*ckpt.pt"):
        run(overrides(image_folder, tmp_path, epochs=2, ckpt_every_steps=1))
    assert written == [(4, [])]  # step 5's save was refused before writing
    ckpt = checkpoint.load_checkpoint(tmp_path / "models" / "r" / "ckpt.pt")
    assert ckpt["global_step"] == 4 and not nonfinite(ckpt)


def test_run_whose_every_step_was_skipped_is_an_error(image_folder, tmp_path, monkeypatch, capsys):
    real_call = losses.VPLoss.__call__
    monkeypatch.setattr(losses.VPLoss, "__call__", lambda self, *a: real_call(self, *a) * float("nan"))
    err = one_line_error(capsys, cli_train(image_folder, tmp_path, "--epochs", "1"))  # 3 steps, 20 allowed in a row
    assert "all 3 optimizer steps of this run were skipped (non-finite loss or gradient)" in err
    assert "done:" not in capsys.readouterr().out


def test_same_seed_gives_same_stored_rng_states(image_folder, tmp_path):
    import random
    a = checkpoint.load_checkpoint(run(overrides(image_folder, tmp_path / "a"))["ckpt"])
    np.random.seed(12345)  # another process starts with other (OS-seeded) global RNG states
    random.seed(12345)
    b = checkpoint.load_checkpoint(run(overrides(image_folder, tmp_path / "b"))["ckpt"])
    assert torch.equal(a["rng_state"]["torch"], b["rng_state"]["torch"])
    assert torch.equal(a["rng_state"]["numpy"]["keys"], b["rng_state"]["numpy"]["keys"])
    assert a["rng_state"]["python"] == b["rng_state"]["python"]

# --- 4. storage faults ---------------------------------------------------------------------------

def _fail_open(monkeypatch, err):
    real_open = open

    def failing(file, mode="r", *a, **k):
        if "w" in mode and ".ckpt.pt.tmp" in str(file):
            raise OSError(err, os.strerror(err), str(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(checkpoint, "open", failing, raising=False)  # the module's name `open` only


def _fail_replace(monkeypatch, err):
    real = os.replace

    def failing(src, dst, *a, **k):
        if str(dst).endswith("ckpt.pt"):
            raise OSError(err, os.strerror(err), str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(checkpoint.os, "replace", failing)


def _fail_fsync(monkeypatch, err):
    def failing(fd):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(checkpoint.os, "fsync", failing)


FAULTS = {
    # a read-only models folder: creating the temp file fails (EACCES as a user, EROFS on a read-only mount)
    "open-EACCES": (_fail_open, errno.EACCES, "Permission denied; check the folder's permissions"),
    "open-EROFS": (_fail_open, errno.EROFS, "Read-only file system; choose a writable --workdir"),
    # the temp file was written but the rename fails
    "replace-EROFS": (_fail_replace, errno.EROFS, "Read-only file system; choose a writable --workdir"),
    "replace-EACCES": (_fail_replace, errno.EACCES, "Permission denied; check the folder's permissions"),
    # disk full / I/O error while flushing
    "fsync-ENOSPC": (_fail_fsync, errno.ENOSPC, "No space left on device; free some disk space"),
    "fsync-EIO": (_fail_fsync, errno.EIO, "Input/output error; check the output folder"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_storage_fault_at_save_keeps_previous_checkpoint(image_folder, tmp_path, monkeypatch, fault):
    run(overrides(image_folder, tmp_path, epochs=1))
    path = tmp_path / "models" / "r" / "ckpt.pt"
    before = path.read_bytes()
    patch, err, text = FAULTS[fault]
    with monkeypatch.context() as m:
        patch(m, err)
        with pytest.raises(DdpmError) as exc:
            run(overrides(image_folder, tmp_path, epochs=2))
    assert str(exc.value) == f"cannot write {path}: {text} (the previous checkpoint is intact)"
    assert path.read_bytes() == before
    assert {p.name for p in path.parent.iterdir()} - {".lock"} == {"ckpt.pt"}  # no temp file left behind
    assert checkpoint.load_checkpoint(path)["next_epoch"] == 1
    assert run(overrides(image_folder, tmp_path, epochs=2))["epoch"] == 2  # storage fixed: the run goes on


@pytest.mark.skipif(IS_ROOT or not hasattr(os, "geteuid"), reason="root ignores permission bits; the "
                    "patched-open variants of test_storage_fault_at_save_keeps_previous_checkpoint cover this")
def test_real_read_only_models_folder(image_folder, tmp_path):
    run(overrides(image_folder, tmp_path, epochs=1))
    folder = tmp_path / "models" / "r"
    before = (folder / "ckpt.pt").read_bytes()
    folder.chmod(0o555)
    try:
        with pytest.raises(DdpmError, match="Permission denied.*previous checkpoint is intact"):
            run(overrides(image_folder, tmp_path, epochs=2))
    finally:
        folder.chmod(0o755)
    assert (folder / "ckpt.pt").read_bytes() == before


@pytest.mark.parametrize("fault", ["open-EROFS", "replace-EACCES", "fsync-ENOSPC"])
def test_storage_fault_cli_one_line_exit_2(image_folder, tmp_path, monkeypatch, capsys, fault):
    assert cli_train(image_folder, tmp_path, "--epochs", "1") == 0
    path = tmp_path / "models" / "r" / "ckpt.pt"
    before = path.read_bytes()
    patch, err, text = FAULTS[fault]
    patch(monkeypatch, err)
    capsys.readouterr()
    msg = one_line_error(capsys, cli_train(image_folder, tmp_path, "--epochs", "2"))
    assert msg == f"ddpm: error: cannot write {path}: {text} (the previous checkpoint is intact)"
    assert path.read_bytes() == before



def test_temp_file_of_a_killed_save_is_cleaned_up(image_folder, tmp_path):
    run(overrides(image_folder, tmp_path, epochs=1))
    stale = tmp_path / "models" / "r" / ".ckpt.pt.tmp999999"
    stale.write_bytes(b"PK\x03\x04 half a checkpoint from a killed process")
    run(overrides(image_folder, tmp_path, epochs=2))
    assert not stale.exists()

# --- 5. safe loading ------------------------------------------------------------------------------

def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func):
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def test_source_only_loads_weights_safely():
    """Every torch.load passes weights_only=True; nothing unpickles or loads YAML unsafely."""
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 10
    torch_loads, jit_loads = [], []
    for path in files:
        text = path.read_text()
        assert "weights_only=False" not in text.replace(" ", ""), path
        for call in _calls(ast.parse(text)):
            name = _name(call.func)
            kw = {k.arg: k.value for k in call.keywords}
            where = f"{path.relative_to(SRC)}:{call.lineno}"
            if "weights_only" in kw:
                assert isinstance(kw["weights_only"], ast.Constant) and kw["weights_only"].value is True, where
            if name in ("torch.load", "torch.serialization.load"):
                torch_loads.append(where)
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, where
            assert name not in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "joblib.load",
                                "yaml.load", "yaml.unsafe_load", "yaml.full_load", "marshal.loads"), where
            if name in ("np.load", "numpy.load") and "allow_pickle" in kw:
                assert isinstance(kw["allow_pickle"], ast.Constant) and kw["allow_pickle"].value is False, where
            if name == "torch.jit.load":
                jit_loads.append(where)
    assert torch_loads  # the scan sees the checkpoint loader
    # The one code-loading path: the FID Inception network is TorchScript, a program by design; it is
    # loaded only from a file the user names (docs/guarantees.md says so).
    assert all(w.startswith("extractors.py") for w in jit_loads), jit_loads


class _WriteMarker:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


class _ShellMarker:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture
def trained(image_folder, tmp_path):
    summary = run(overrides(image_folder, tmp_path / "w", epochs=1))
    return Path(summary["ckpt"])


@pytest.mark.parametrize("payload", [_WriteMarker, _ShellMarker])
def test_malicious_checkpoint_is_refused_and_never_runs(trained, image_folder, tmp_path, capsys, payload):
    marker = tmp_path / "PWNED"
    ckpt = torch.load(trained, weights_only=True)
    ckpt["extra"] = payload(marker)  # an otherwise valid checkpoint with one poisoned entry
    evil = tmp_path / "evil.pt"
    torch.save(ckpt, evil)
    assert zipfile.is_zipfile(evil)
    # the payload is live: an unsafe load runs it (proving the test could detect execution)
    torch.load(evil, weights_only=False)
    assert marker.exists()
    marker.unlink()

    refused = "refusing to load {}: it contains Python objects other than tensors, which could run code"
    capsys.readouterr()
    err = one_line_error(capsys, main(["sample", "--ckpt", str(evil), "-n", "1", "--no-progress"]))
    assert refused.format(evil) in err
    err = one_line_error(capsys, main(["export", "--ckpt", str(evil), "--out", str(tmp_path / "exp")]))
    assert refused.format(evil) in err
    err = one_line_error(capsys, main(["eval", "--ckpt", str(evil), "--ref", "builtin:digits", "-n", "1",
                                       "--extractor", "randconv", "--no-progress"]))
    assert refused.format(evil) in err
    # `ddpm train` resuming a run whose checkpoint was replaced by the poisoned file
    trained.write_bytes(evil.read_bytes())
    err = one_line_error(capsys, cli_train(image_folder, tmp_path / "w", "--epochs", "2"))
    assert refused.format(trained) in err
    assert not marker.exists()
    assert not (tmp_path / "exp").exists()


def test_export_then_sample_gives_identical_images(trained, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", "--ckpt", str(trained), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["config"]["model"]["base_channels"] == 8
    common = ["-n", "6", "--seed", "11", "--steps", "8", "--batch-size", "4", "--device", "cpu", "--no-progress"]
    assert main(["sample", "--ckpt", str(trained), "--out-dir", str(tmp_path / "a"), *common]) == 0
    assert main(["sample", "--model", str(out), "--out-dir", str(tmp_path / "b"), *common]) == 0
    for k in range(6):
        a = np.asarray(Image.open(tmp_path / f"a/{k:06d}.png"))
        b = np.asarray(Image.open(tmp_path / f"b/{k:06d}.png"))
        assert np.array_equal(a, b), k


def _damage(out, how):
    weights, config = out / "model.safetensors", out / "config.json"
    if how == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "garbage-weights":
        weights.write_bytes(b"\x00garbage" * 64)
    elif how == "pickle-as-weights":
        buf = io.BytesIO()
        torch.save({"x": torch.zeros(1)}, buf)
        weights.write_bytes(buf.getvalue())
    elif how == "missing-weights":
        weights.unlink()
    elif how == "bad-json":
        config.write_text("{not json")
    elif how == "no-config-key":
        config.write_text(json.dumps({"export_version": 1}))
    elif how == "wrong-shapes":
        meta = json.loads(config.read_text())
        meta["config"]["model"]["base_channels"] = 16
        config.write_text(json.dumps(meta))
    elif how == "invalid-model-config":
        meta = json.loads(config.read_text())
        meta["config"]["model"]["num_heads"] = 3  # does not divide the widths 8 and 16
        config.write_text(json.dumps(meta))


DAMAGE = {
    "truncated-weights": "is damaged", "garbage-weights": "is damaged", "pickle-as-weights": "is damaged",
    "missing-weights": "is not an exported model", "bad-json": "is not a valid ddpmkit export config",
    "no-config-key": "is not a valid ddpmkit export config", "wrong-shapes": "do not match its model config",
    "invalid-model-config": "num_heads",
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_export_is_a_one_line_error(trained, tmp_path, capsys, how):
    out = tmp_path / "exported"
    assert main(["export", "--ckpt", str(trained), "--out", str(out)]) == 0
    _damage(out, how)
    capsys.readouterr()
    err = one_line_error(capsys, main(["sample", "--model", str(out), "-n", "1", "--no-progress"]))
    assert DAMAGE[how] in err


def test_checkpoint_with_invalid_config_is_a_one_line_error(trained, tmp_path, capsys):
    ckpt = torch.load(trained, weights_only=True)
    ckpt["config"]["model"]["num_heads"] = 3
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    capsys.readouterr()
    assert "num_heads" in one_line_error(capsys, main(["sample", "--ckpt", str(bad), "-n", "1", "--no-progress"]))


# --- 6. hostile data ---------------------------------------------------------------------------------

def _png(w, h, bit_depth=8, color_type=2, raw=None):
    """A PNG written byte by byte: any header, with `raw` (filtered scanlines) or a tiny IDAT."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(raw if raw is not None else b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _good(folder, n=3):
    for i in range(n):
        Image.new("RGB", (12, 10), (40 * i, 100, 200)).save(folder / f"good{i}.png")


def _load(folder, timeout=60, **kw):
    """load_folder in a thread with a deadline, so that a file that blocks (a FIFO) fails the test, not the run."""
    result, logs = {}, []

    def go():
        try:
            result["data"] = load_folder(folder, 8, 3, log=logs.append, **kw)
        except BaseException as exc:  # noqa: BLE001
            result["error"] = exc

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "load_folder hung"
    if "error" in result:
        raise result["error"]
    return result["data"], logs


def _skip_line(logs, name):
    lines = [m for m in logs if m.startswith("warning: skipping ") and name in m]
    assert len(lines) == 1, (name, logs)
    return lines[0]


def test_hostile_files_are_skipped_with_path_and_reason(tmp_path, monkeypatch):
    d = tmp_path / "hostile"
    d.mkdir()
    _good(d)
    good_png = (d / "good0.png").read_bytes()
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    jpeg = buf.getvalue()
    (d / "zero.png").write_bytes(b"")
    (d / "cut.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])
    (d / "cut.png").write_bytes(good_png[: len(good_png) // 2])
    (d / "text.png").write_text("just some text\n")
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("x.txt", "hello")
    (d / "archive.jpg").write_bytes(zbuf.getvalue())
    (d / "drawing.png").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    (d / "bomb.png").write_bytes(_png(20000, 20000))  # > 2x the limit: Pillow refuses at open
    (d / "bomb-mild.png").write_bytes(_png(10000, 10000))  # 1x-2x the limit: only a warning in Pillow
    (d / "bomb.bmp").write_bytes(b"BM" + struct.pack("<IHHI", 0, 0, 0, 54) +
                                 struct.pack("<IiiHHIIiiII", 40, 30000, 30000, 1, 24, 0, 0, 0, 0, 0, 0))
    os.symlink("loop-b.png", d / "loop-a.png")
    os.symlink("loop-a.png", d / "loop-b.png")
    os.symlink("gone.png", d / "dangling.png")
    os.symlink("/dev/zero", d / "zeros.png")
    if hasattr(os, "mkfifo"):
        os.mkfifo(d / "pipe.jpg")  # opening it for reading used to block the load forever
    weird = os.fsdecode(b"bad-\xff-name\n.png")  # undecodable byte and a newline in the name
    (d / weird).write_bytes(b"not an image")

    decoded = []
    real_load = ImageFile.ImageFile.load

    def spy_load(self):
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy_load)
    import PIL.EpsImagePlugin as eps
    ghostscript = []

    def no_ghostscript(*a, **k):
        ghostscript.append(a)
        raise AssertionError("Ghostscript was run on a data file")

    monkeypatch.setattr(eps, "Ghostscript", no_ghostscript, raising=False)

    data, logs = _load(d)
    assert len(data) == 3 and data.images.shape == (3, 8, 8, 3)
    expected = {
        "zero.png": "empty file (0 bytes)",
        "cut.jpg": "OSError: image file is truncated",
        "cut.png": "",  # Pillow's wording for a cut PNG varies (truncated / broken data stream)
        "text.png": "not a JPEG, PNG, WebP, BMP or GIF image (starts with b'just som')",
        "archive.jpg": "not a JPEG, PNG, WebP, BMP or GIF image (starts with b'PK\\x03\\x04",
        "drawing.png": "not a JPEG, PNG, WebP, BMP or GIF image (starts with b'%!PS-Ado')",
        "bomb.png": "DecompressionBombError",
        "bomb-mild.png": "DecompressionBombError: 10000x10000 = 100000000 pixels is over Pillow's limit",
        "bomb.bmp": "DecompressionBombError",
        "loop-a.png": "Too many levels of symbolic links",
        "loop-b.png": "Too many levels of symbolic links",
        "dangling.png": "No such file or directory",
        "zeros.png": "not a regular file",
        "bad-\\udcff-name\\n.png": "not a JPEG, PNG",
    }
    if hasattr(os, "mkfifo"):
        expected["pipe.jpg"] = "not a regular file (a FIFO, device or socket)"
    for name, reason in expected.items():
        line = _skip_line(logs, f"{d}/{name}: ")
        assert reason in line, line
        assert "\n" not in line
    assert data.skipped == len(expected)
    assert f"warning: skipped {len(expected)} of {len(expected) + 3} files that could not be read as images" in logs
    assert max(w * h for w, h in decoded) <= 64 * 64  # no bomb was decoded
    assert not ghostscript


def test_real_decompression_bomb_does_not_exhaust_memory(tmp_path):
    """A genuine 20000x20000 PNG (400 MB of pixels in 400 KB) and one just over the limit are skipped
    without being decoded: the process's peak memory stays far below the pixel count."""
    d = tmp_path / "bombs"
    d.mkdir()
    _good(d, 1)
    for name, side in (("bomb.png", 20000), ("mild.png", 9500)):  # 9500^2 = 90.25M: just over the limit
        z = zlib.compressobj(9)
        row = b"\0" * (side + 1)  # filter byte + one row of black 8-bit grey pixels
        body = b"".join(z.compress(row) for _ in range(side)) + z.flush()
        with open(d / name, "wb") as f:
            f.write(_png(side, side, 8, 0)[:33])  # signature + IHDR (grey, 8 bit)
            f.write(struct.pack(">I", len(body)) + b"IDAT" + body + struct.pack(">I", zlib.crc32(b"IDAT" + body)))
            f.write(struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))
    assert (d / "bomb.png").stat().st_size < 2_000_000
    with pytest.warns(Image.DecompressionBombWarning), Image.open(d / "mild.png") as im:
        assert im.size == (9500, 9500)  # a valid PNG, which Pillow itself would only warn about, then decode
    code = ("import resource, sys\n"
            "from ddpmkit.data import load_folder\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "logs = []\n"
            "data = load_folder(sys.argv[1], 8, 3, log=logs.append)\n"
            "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "print(len(data), data.skipped, (after - before) // 1024)\n")
    out = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    n, skipped, grew_mb = map(int, out.stdout.split())
    assert (n, skipped) == (1, 2)
    assert grew_mb < 60, f"peak memory grew by {grew_mb} MB while loading"


def _png16_rgb(w, h, value):
    arr = np.zeros((h, w, 3), ">u2")
    arr[...] = value
    return _png(w, h, 16, 2, b"".join(b"\0" + arr[y].tobytes() for y in range(h)))


def test_odd_but_usable_images_are_kept(tmp_path):
    d = tmp_path / "odd"
    d.mkdir()
    Image.new("RGB", (1, 1), (250, 10, 10)).save(d / "one-pixel.png")
    Image.new("L", (1, 300), 77).save(d / "one-by-300.png")
    (d / "rgb48.png").write_bytes(_png16_rgb(5, 5, (65535, 0, 32768)))  # 16 bits per channel
    Image.new("1", (9, 9), 1).save(d / "bilevel.png")
    Image.new("LA", (9, 9), (0, 0)).save(d / "gray-alpha.png")  # fully transparent -> white
    pal = Image.new("P", (9, 9), 1)
    pal.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    pal.save(d / "palette-transparency.png", transparency=0)
    Image.new("CMYK", (9, 9), (0, 255, 255, 0)).save(d / "cmyk.jpg")  # red in CMYK
    Image.new("RGB", (9, 9), (10, 20, 250)).save(d / "really-a-jpeg.png", "JPEG")  # wrong extension
    Image.new("RGB", (9, 9), (10, 250, 20)).save(d / "really-a-gif.png", "GIF")
    Image.new("RGBA", (9, 9), (0, 0, 255, 255)).save(d / "alpha.webp", "WEBP", lossless=True)
    data, logs = _load(d)
    assert not [m for m in logs if "skipping" in m], logs
    got = {p.name: load_image(p, 8, 3) for p in sorted(d.iterdir())}
    assert len(data) == len(got) == 10
    assert (got["one-pixel.png"] == [250, 10, 10]).all()  # upscaled, colour kept
    assert (got["one-by-300.png"] == 77).all()
    assert (got["rgb48.png"] == [255, 0, 128]).all()
    assert (got["gray-alpha.png"] == 255).all()
    assert (got["palette-transparency.png"] == [10, 200, 10]).all()
    assert got["cmyk.jpg"][..., 0].min() > 200 and got["cmyk.jpg"][..., 1:].max() < 60
    assert got["really-a-jpeg.png"][..., 2].min() > 200
    assert (got["alpha.webp"] == [0, 0, 255]).all()


def test_unreadable_file_and_folder_are_skipped_with_reason(tmp_path, monkeypatch):
    """As root, chmod 000 does not stop reads, so os.open / os.scandir are patched to fail like it."""
    d = tmp_path / "perm"
    (d / "locked").mkdir(parents=True)
    _good(d)
    Image.new("RGB", (8, 8)).save(d / "secret.png")
    Image.new("RGB", (8, 8)).save(d / "locked" / "inside.png")
    real_open, real_scandir = os.open, os.scandir

    def deny_open(path, *a, **k):
        if str(path).endswith("secret.png"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *a, **k)

    def deny_scandir(path="."):
        if str(path).endswith("locked"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "open", deny_open)
    monkeypatch.setattr(os, "scandir", deny_scandir)
    data, logs = _load(d)
    assert len(data) == 3
    assert "Permission denied" in _skip_line(logs, f"{d}/secret.png: ")
    assert f"warning: skipping folder {d}/locked: Permission denied" in logs


@pytest.mark.skipif(IS_ROOT or not hasattr(os, "geteuid"), reason="root reads chmod-000 files; "
                    "test_unreadable_file_and_folder_are_skipped_with_reason simulates it")
def test_chmod_000_file_is_skipped(tmp_path):
    d = tmp_path / "perm"
    d.mkdir()
    _good(d)
    Image.new("RGB", (8, 8)).save(d / "secret.png")
    (d / "secret.png").chmod(0)
    data, logs = _load(d)
    assert len(data) == 3 and "Permission denied" in _skip_line(logs, "secret.png")


def test_files_removed_or_added_during_training_do_not_matter(image_folder, tmp_path, monkeypatch):
    """Images are decoded once, before the first step: deleting every file (and adding junk and a FIFO)
    mid-run changes nothing for that run."""
    real_call = losses.VPLoss.__call__
    calls = {"n": 0}

    def vandal(self, net, x0, draws=None):
        calls["n"] += 1
        if calls["n"] == 2:
            for p in list(image_folder.rglob("*.*")):
                p.unlink()
            (image_folder / "a" / "junk.png").write_text("junk")
            if hasattr(os, "mkfifo"):
                os.mkfifo(image_folder / "a" / "new-pipe.png")
        return real_call(self, net, x0, draws)

    monkeypatch.setattr(losses.VPLoss, "__call__", vandal)
    summary = run(overrides(image_folder, tmp_path, epochs=2))
    assert summary["status"] == "finished" and summary["step"] == 6  # 24 images, batch 8, 2 epochs
    assert not nonfinite(checkpoint.load_checkpoint(summary["ckpt"]))


def test_file_vanishing_between_listing_and_decoding_is_skipped(image_folder, monkeypatch):
    real_list = data_module.list_images
    ghost = image_folder / "a" / "ghost.png"
    monkeypatch.setattr(data_module, "list_images", lambda root, log=None: real_list(root, log) + [ghost])
    data, logs = _load(image_folder)
    assert len(data) == 24 and "No such file or directory" in _skip_line(logs, "ghost.png")


def test_unusable_cache_dir_falls_back_to_memory(image_folder, tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    data, logs = _load(image_folder, cache_dir=blocker)
    assert len(data) == 24 and isinstance(data.images, np.ndarray) and not isinstance(data.images, np.memmap)
    assert any(m.startswith(f"warning: cannot write the image cache {blocker}/") and "keeping the images in memory"
               in m for m in logs), logs
    capsys.readouterr()
    assert cli_train(image_folder, tmp_path / "w", "--epochs", "1", "--data-cache", str(blocker)) == 0


@pytest.mark.parametrize("argv", [["sample", "--ckpt", "y" * 300], ["sample", "--ckpt", "CKPT", "-n", "1", "--sampler",
                                                                    "ddim", "--steps", "2", "--out", "y" * 300 + "/x.png"]])
def test_a_path_the_os_refuses_is_a_one_line_error(argv, image_folder, tmp_path, capsys, monkeypatch):
    """A name longer than the file system allows raises OSError deep in pathlib; the CLI says so in one line."""
    monkeypatch.chdir(tmp_path)
    if "CKPT" in argv:
        assert cli_train(image_folder, tmp_path, "--epochs", "1") == 0
        capsys.readouterr()
        argv = [str(next(tmp_path.glob("models/r/ckpt.pt"))) if a == "CKPT" else a for a in argv]
    err = one_line_error(capsys, main(argv))
    assert "too long" in err
