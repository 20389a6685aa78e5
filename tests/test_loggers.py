"""Training logs: TensorBoard, Weights & Biases (a fake backend, and the real one offline) or none."""
import importlib.util
import math
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import ddpmkit.train as train_module
from ddpmkit import loggers
from ddpmkit.cli import main
from ddpmkit.config import Config
from ddpmkit.errors import DdpmError
from ddpmkit.train import prepare, train

HAVE_WANDB = importlib.util.find_spec("wandb") is not None
TINY = {"size": "custom", "base_channels": 8, "channel_mults": [1, 2], "attn_levels": [], "time_dim": 16}


@pytest.fixture(autouse=True)
def no_curves(monkeypatch):
    monkeypatch.setattr(train_module, "DRAW_CURVES", False)  # a plot costs ~1 s and is not tested here


def overrides(folder, workdir, **train_kw):
    t = {"workdir": str(workdir), "run_name": "r", "epochs": 1, "batch_size": 8, "sample_every_epochs": 1,
         "sample_n": 4, "sample_steps": 2, "sample_sampler": "ddim", "log_every": 1, "device": "cpu",
         "logger": "wandb", "ckpt_every_minutes": 0.0}
    t.update(train_kw)
    return {"data": {"path": str(folder), "image_size": 8}, "model": TINY, "diffusion": {"timesteps": 20},
            "train": t}


def run(ov, fresh=False, log=None):
    cfg, ckpt = prepare(ov, fresh=fresh)
    return train(cfg, ckpt, progress=False, log=log or (lambda *a: None))


def stored_history(workdir, key):
    ckpt = torch.load(Path(workdir) / "models" / "r" / "ckpt.pt", weights_only=True)
    return [(int(s), float(v)) for s, v in ckpt["history"][key]]


class FakeWandb(types.ModuleType):
    """Stands in for the `wandb` module: records what the logger asks of it; `fail_log_after` makes
    run.log raise after that many calls, `fail_init` makes init raise."""

    def __init__(self, fail_log_after=None, fail_init=False):
        super().__init__("wandb")
        self.inits, self.rows, self.defined, self.finished = [], [], {}, 0
        self.fail_log_after, self.fail_init = fail_log_after, fail_init
        self.config = {}
        fake = self

        class Image:
            def __init__(self, arr):
                self.arr = np.asarray(arr)

        class Config_:
            def update(self, d, allow_val_change=False):
                assert allow_val_change
                fake.config.update(d)

        class Run:
            config = Config_()

            def define_metric(self, key, step_metric=None):
                fake.defined[key] = step_metric

            def log(self, row):
                if fake.fail_log_after is not None and len(fake.rows) >= fake.fail_log_after:
                    raise ConnectionError("backend gone")
                fake.rows.append(dict(row))

            def finish(self):
                fake.finished += 1

        self.Image = Image
        self._run = Run()

    def init(self, **kwargs):
        if self.fail_init:
            raise RuntimeError("api key not configured (no-tty)\ncall wandb.login")
        self.inits.append(kwargs)
        return self._run


def test_fake_wandb_gets_the_scalars_grids_and_resume_id(image_folder, tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    run(overrides(image_folder, tmp_path))
    (init,) = fake.inits
    run_id = (tmp_path / "runs/r" / loggers.RUN_ID_FILE).read_text().strip()
    assert init["id"] == run_id and init["resume"] == "allow" and init["name"] == "r"
    assert init["dir"] == str(tmp_path / "runs/r") and fake.config["train"]["logger"] == "wandb"
    # the same scalars the history (and TensorBoard) gets, one row per step, against our own step key
    scalars = [r for r in fake.rows if "loss" in r]
    assert [(r["step"], r["loss"]) for r in scalars] == stored_history(tmp_path, "loss")
    assert [(r["step"], r["lr"]) for r in scalars] == stored_history(tmp_path, "lr")
    assert all(math.isfinite(r["grad_norm"]) and r["img_per_sec"] > 0 for r in scalars)
    assert fake.defined["loss"] == "step" and fake.defined["grad_norm"] == "step"
    grids = [r for r in fake.rows if "samples" in r]
    assert len(grids) == 1 and grids[0]["step"] == scalars[-1]["step"]
    img = grids[0]["samples"].arr
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.std() > 0
    assert fake.finished == 1 and len(fake.rows) == len(scalars)  # the grid shares its step's row
    last = scalars[-1]["step"]

    # resuming from the checkpoint continues the same W&B run, with later steps
    run(overrides(image_folder, tmp_path, epochs=2))
    assert fake.inits[1]["id"] == run_id and fake.inits[1]["resume"] == "allow"
    later = [r["step"] for r in fake.rows[len(scalars):] if "loss" in r]
    assert later and min(later) == last + 1
    # --fresh starts a new training run, so a new W&B run
    run(overrides(image_folder, tmp_path, epochs=1), fresh=True)
    assert fake.inits[2]["id"] != run_id
    assert (tmp_path / "runs/r" / loggers.RUN_ID_FILE).read_text().strip() == fake.inits[2]["id"]


def test_a_failing_backend_never_ends_training(image_folder, tmp_path, monkeypatch):
    fake = FakeWandb(fail_log_after=1)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    lines = []
    summary = run(overrides(image_folder, tmp_path), log=lines.append)
    assert summary["status"] == "finished" and len(fake.rows) == 1
    warned = [line for line in lines if "W&B logging failed" in line]
    assert len(warned) == 1 and "ConnectionError: backend gone" in warned[0]
    # a backend that cannot start is a one-line error before any training
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb(fail_init=True))
    with pytest.raises(DdpmError, match=r"could not start the W&B run \(api key not configured \(no-tty\) call"):
        run(overrides(image_folder, tmp_path / "b"))
    assert not (tmp_path / "b/models/r/ckpt.pt").exists()


def test_missing_extra_none_tensorboard_and_bad_value(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    args = ["train", "--data", str(image_folder), "--workdir", str(tmp_path), "--model-size", "tiny",
            "--image-size", "8", "--batch-size", "8", "--epochs", "1", "--timesteps", "20", "--sample-every", "0",
            "--device", "cpu", "--no-progress", "--ckpt-every-minutes", "0"]
    assert main(args + ["--run-name", "w", "--logger", "wandb"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ddpm: error: " + loggers.WANDB_HINT
    assert main(args + ["--run-name", "n", "--logger", "none"]) == 0
    assert (tmp_path / "models/n/ckpt.pt").exists() and not (tmp_path / "runs/n").exists()
    assert main(args + ["--run-name", "t"]) == 0  # tensorboard is the default
    assert list((tmp_path / "runs/t").glob("events.out.tfevents.*"))
    assert main(args + ["--run-name", "x", "--logger", "mlflow"]) == 2
    assert "train.logger must be tensorboard, wandb or none, got 'mlflow'" in capsys.readouterr().err


def test_only_rank_zero_logs(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = Config()
    cfg.train.logger = "wandb"
    # other ranks neither import wandb (it is missing here) nor write anything
    assert isinstance(loggers.make_logger(cfg, tmp_path / "runs", is_main=False), loggers.NullLogger)
    with pytest.raises(DdpmError, match="needs the 'wandb' extra"):
        loggers.make_logger(cfg, tmp_path / "runs", is_main=True)
    cfg.train.logger = "tensorboard"
    assert isinstance(loggers.make_logger(cfg, tmp_path / "tb", is_main=False), loggers.NullLogger)
    assert not (tmp_path / "tb").exists()


# --------------------------------------------------------------------------- the real wandb, offline


def _wandb_records(path: Path):
    """The records of a W&B transaction log (run-ID.wandb): a 7-byte header (":W&B", magic, version),
    then 32 KiB blocks of chunks, each with a 7-byte header (crc32c, length, type: 1 full, 2 first,
    3 middle, 4 last) -- the LevelDB log layout; chunk headers never straddle a block end."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):
            return  # a chunk still being written
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            buf = payload
        elif kind in (3, 4):
            buf += payload
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def _history(run_dir: Path) -> tuple[str, list[dict]]:
    """(run id, history rows) of one offline run folder, the values decoded from JSON. W&B's service
    may still be writing the file when run.finish() has returned: wait for its closing "exit" record."""
    import json

    (log,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + 30
    while True:
        records = list(_wandb_records(log))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    run_id, rows = None, []
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return run_id, rows


@pytest.mark.skipif(not HAVE_WANDB, reason="wandb is not installed (pip install 'ddpmkit[wandb]')")
def test_wandb_offline_run_has_the_scalars_and_a_resume_keeps_the_run_id(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    (tmp_path / "wb").mkdir()
    run(overrides(image_folder, tmp_path / "w"))
    loss = stored_history(tmp_path / "w", "loss")
    (first,) = (tmp_path / "wb/wandb").glob("offline-run-*")
    run_id, rows = _history(first)
    assert run_id == (tmp_path / "w/runs/r" / loggers.RUN_ID_FILE).read_text().strip()
    assert [(r["step"], r["loss"]) for r in rows if "loss" in r] == loss
    assert all({"lr", "img_per_sec", "grad_norm"} <= r.keys() for r in rows if "loss" in r)
    grid = [r for r in rows if "samples/path" in r]
    assert len(grid) == 1 and (first / "files" / grid[0]["samples/path"]).is_file()

    run(overrides(image_folder, tmp_path / "w", epochs=2))
    second = [d for d in (tmp_path / "wb/wandb").glob("offline-run-*") if d != first]
    assert len(second) == 1
    again, more = _history(second[0])
    assert again == run_id  # the same W&B run, continued
    assert [(r["step"], r["loss"]) for r in more if "loss" in r] == stored_history(tmp_path / "w", "loss")[len(loss):]
