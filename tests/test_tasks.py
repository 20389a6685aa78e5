"""The trainer's task hook (tasks.Task): another command's model, loss and checkpoint content."""
import pytest
import torch

import ddpmkit.train as train_module
from ddpmkit.tasks import Task
from ddpmkit.train import prepare, train

SMALL = {"size": "custom", "base_channels": 8, "channel_mults": [1], "attn_levels": [], "time_dim": 16}


class Counting(Task):
    """Counts its steps in extra_state; its loss is the default one plus a constant."""

    command = "ddpm counting"

    def __init__(self):
        self.steps, self.restored, self.grids = 0, None, []

    def make_loss(self, diffusion, cfg):
        base = super().make_loss(diffusion, cfg)

        class Plus:
            draw = base.draw

            def __call__(self, net, x0, draws):
                return base(net, x0, draws) + 1.0

        return Plus()

    def after_step(self, trainer):
        self.steps += 1

    def grid(self, trainer, name):
        self.grids.append(name)
        return None

    def extra_state(self):
        return {"steps": self.steps, "tensor": torch.arange(3)}

    def load_extra_state(self, state):
        self.restored = state
        self.steps = state["steps"]


def test_task_hook_runs_its_loss_steps_grids_and_resumes_its_state(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "DRAW_CURVES", False)
    t = {"workdir": str(tmp_path), "run_name": "r", "epochs": 1, "batch_size": 8, "sample_every_epochs": 1,
         "log_every": 1, "device": "cpu"}
    ov = {"data": {"path": str(image_folder), "image_size": 8}, "model": SMALL, "diffusion": {"timesteps": 20},
          "train": t}
    task = Counting()
    cfg, ckpt = prepare(ov)
    assert train(cfg, ckpt, progress=False, log=lambda *a: None, task=task)["step"] == 3
    assert task.steps == 3 and task.grids == ["0"]
    stored = torch.load(tmp_path / "models" / "r" / "ckpt.pt", weights_only=True)
    assert stored["task_state"]["steps"] == 3 and stored["history"]["loss"][0][1] > 1.0  # the task's loss
    t["epochs"] = 2
    again = Counting()
    cfg, ckpt = prepare(ov)
    train(cfg, ckpt, progress=False, log=lambda *a: None, task=again)
    assert again.restored["steps"] == 3 and torch.equal(again.restored["tensor"], torch.arange(3))
    assert again.steps == 6


def test_default_task_writes_no_task_state(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "DRAW_CURVES", False)
    t = {"workdir": str(tmp_path), "run_name": "r", "epochs": 1, "batch_size": 12, "sample_every_epochs": 0,
         "device": "cpu"}
    cfg, ckpt = prepare({"data": {"path": str(image_folder), "image_size": 8}, "model": SMALL,
                         "diffusion": {"timesteps": 20}, "train": t})
    train(cfg, ckpt, progress=False, log=lambda *a: None)
    assert "task_state" not in torch.load(tmp_path / "models" / "r" / "ckpt.pt", weights_only=True)
