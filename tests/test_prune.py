"""`ddpm prune`'s amount (shares of parameters / MACs), its fine-tune objective (the teacher term) and LR
schedule, and exact resume with them. Needs the [compress] extra, as tests/test_compress.py."""
import math
import os
import re
import signal

import pytest
import torch
from torch import nn

from test_compress import ADM, QUIET, MU, STD, GaussianEDM, GaussianVP, _compress_extra, _random_model, _teacher

_compress_extra("torch_pruning")

from ddpmkit.cli import main  # noqa: E402
from ddpmkit.compress import prune as P  # noqa: E402
from ddpmkit.diffusion import Diffusion, EDMDenoiser, target  # noqa: E402
from ddpmkit.guidance.cfg import LabelledNet  # noqa: E402
from ddpmkit.losses import EDMLoss, VPLoss  # noqa: E402
from ddpmkit.train import lr_factor  # noqa: E402

WIDE = {**ADM, "base_channels": 16}  # fine enough channel steps for a 1-point tolerance at 30-70%


def _with_grads(spec: dict):
    """A random network of `spec` with gradients of a random loss in .grad (Taylor importance), eval mode."""
    model, _ = _random_model(spec)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 5, 10, 19])
    model(x, t).pow(2).mean().backward()
    return model.eval(), (x[:2], t[:2])


# --- the amount: shares of parameters and MACs ---------------------------------------------------

@pytest.mark.parametrize("ratio_of, ratio", [("params", 0.5), ("params", 0.7), ("macs", 0.5), ("macs", 0.3)])
def test_the_search_removes_the_asked_share_of_parameters_or_macs(ratio_of, ratio, one_torch_thread):
    model, example = _with_grads(WIDE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    notes = []
    got = P.prune_to_target(model, example, ratio, ratio_of, notes.append)
    # Counted here from scratch: parameters of the result, MACs by the flop counter on one image.
    params = 1 - P.param_count(got.model) / P.param_count(model)
    one = tuple(x[:1] for x in example)
    macs = 1 - P.mac_count(got.model, one) / P.mac_count(model, one)
    assert abs({"params": params, "macs": macs}[ratio_of] - ratio) <= P.TOLERANCE and not notes
    assert got.removed("params") == pytest.approx(params) and got.removed("macs") == pytest.approx(macs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    # The channel ratio it reports is the one that did it.
    again = P.prune_to_target(model, example, got.channel_ratio, "channels")
    assert P.param_count(again.model) == P.param_count(got.model)
    assert got.model(*example).shape == example[0].shape


def test_mac_count_is_the_convolutions_and_matrix_products_of_one_call():
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(5 * 4 * 4, 7))
    assert P.mac_count(net, (torch.randn(1, 3, 4, 4),)) == 3 * 5 * 9 * 16 + 80 * 7
    assert P.mac_count(net, (torch.randn(2, 3, 4, 4),)) == 2 * (3 * 5 * 9 * 16 + 80 * 7)


def test_a_share_that_whole_channels_cannot_reach_takes_the_closest_with_a_note(one_torch_thread):
    # With 8 channels per layer the parameter shares jump from 21.9% to 33.5% near 30%.
    model, example = _with_grads(ADM)
    notes = []
    got = P.prune_to_target(model, example, 0.3, "params", notes.append)
    assert abs(got.removed("params") - 0.3) > P.TOLERANCE
    shares = [P.prune_to_target(model, example, r, "channels").removed("params") for r in (0.05, 0.1, 0.15, 0.2)]
    assert abs(got.removed("params") - 0.3) == pytest.approx(min(abs(s - 0.3) for s in shares))
    assert len(notes) == 1 and "closest share of params" in notes[0]


@pytest.mark.parametrize("argv, message", [
    (["--ratio", "1"], "--ratio must lie strictly between 0 and 1 (the share of parameters to remove)"),
    (["--ratio", "1.5", "--ratio-of", "macs"], "--ratio must lie strictly between 0 and 1 (the share of MACs"),
    (["--ratio", "0", "--ratio-of", "channels"], "--ratio must lie strictly between 0 and 1 (the share of channels"),
    (["--ratio", "-0.1"], "--ratio must lie strictly between 0 and 1"),
    (["--ratio", "0.5", "--distill-weight", "1.2"], "--distill-weight must lie in [0, 1]"),
    (["--ratio", "0.5", "--distill-weight", "-0.1"], "--distill-weight must lie in [0, 1]"),
    (["--ratio", "0.5", "--ratio-of", "flops"], "invalid choice"),
    (["--ratio", "0.5", "--warmup-steps", "-3"], "must be 0 or more"),
])
def test_an_unreachable_amount_or_bad_weight_is_a_one_line_error(argv, message, tmp_path, capsys):
    try:
        code = main(["prune", "--ckpt", "missing.pt", "--run-name", "x", "--workdir", str(tmp_path)] + argv)
    except SystemExit as exc:  # argparse's own checks (choices, types) exit
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


# --- the fine-tune objective: the teacher term ------------------------------------------------------

class Constant(nn.Module):
    """A 'teacher' whose output is the constant c everywhere (a known teacher prediction)."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x, t, y=None):
        return torch.full_like(x, self.c)


def _vp_case(prediction: str, weighting: str = "none"):
    d = Diffusion(img_size=8, channels=1, prediction=prediction)
    base = VPLoss(d.alpha_bar64, prediction, weighting, 5.0)
    x0 = MU + STD * torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    draws = base.draw(6, x0, torch.Generator().manual_seed(1))
    return d, base, x0, draws


@pytest.mark.parametrize("prediction, weighting", [("eps", "none"), ("v", "min_snr"), ("x0", "min_snr")])
def test_the_teacher_term_has_the_closed_form_in_the_models_own_output_space(prediction, weighting):
    d, base, x0, draws = _vp_case(prediction, weighting)
    student = GaussianVP(d.alpha_bar64, prediction, gain=1.1).eval()
    w = 0.7
    got = P.TeacherLoss(base, Constant(0.25), w)(student, x0, draws)
    # By hand: x_t = a x0 + s eps; per sample w(t) [W mean (out - 0.25)^2 + (1 - W) mean (out - target)^2].
    ab = d.alpha_bar64[draws["t"]].float()
    a, s = ab.sqrt().view(-1, 1, 1, 1), (1 - ab).sqrt().view(-1, 1, 1, 1)
    out = student(a * x0 + s * draws["eps"], draws["t"])
    true = (out - target(prediction, x0, draws["eps"], a, s)).pow(2).mean((1, 2, 3))
    taught = (out - 0.25).pow(2).mean((1, 2, 3))
    assert torch.allclose(got, base.weight(ab) * (w * taught + (1 - w) * true), rtol=1e-5)
    if prediction == "eps":  # Diff-Pruning's 0.7 ||eps_T - eps_theta||^2 + 0.3 ||eps - eps_theta||^2, unweighted
        assert torch.allclose(got, 0.7 * taught + 0.3 * (out - draws["eps"]).pow(2).mean((1, 2, 3)), rtol=1e-5)
    # ... and (1 - W) of it is the usual loss, on the same draws.
    assert torch.allclose(got, w * base.weight(ab) * taught + (1 - w) * base(student, x0, draws), rtol=1e-5)


def test_with_weight_0_the_loss_is_the_usual_one_and_the_teacher_is_never_called():
    d, base, x0, draws = _vp_case("v", "min_snr")
    student = GaussianVP(d.alpha_bar64, "v", gain=1.1).eval()
    assert torch.equal(P.TeacherLoss(base, None, 0.0)(student, x0, draws), base(student, x0, draws))


def test_the_edm_teacher_term_is_on_the_denoised_image_with_edms_weight():
    loss = EDMLoss(0.5)
    x0 = MU + STD * torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    draws = loss.draw(6, x0, torch.Generator().manual_seed(1))
    student, teacher = GaussianEDM(0.5), GaussianEDM(0.5)
    with torch.no_grad():
        student.mean.fill_(MU + 0.3)
    got = P.TeacherLoss(loss, teacher, 0.6)(student, x0, draws)
    sigma = draws["sigma"]
    x = x0 + sigma.view(-1, 1, 1, 1) * draws["noise"]
    d_s, d_t = EDMDenoiser(student, 0.5)(x, sigma), EDMDenoiser(teacher, 0.5)(x, sigma)
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    expected = lam * (0.6 * (d_s - d_t).pow(2).mean((1, 2, 3)) + 0.4 * (d_s - x0).pow(2).mean((1, 2, 3)))
    assert torch.allclose(got, expected, rtol=1e-5)
    # The teacher here is the exact denoiser D = MU + STD^2/(STD^2+sigma^2)(x - MU): a closed form for D_T.
    exact = MU + STD**2 / (STD**2 + sigma.view(-1, 1, 1, 1) ** 2) * (x - MU)
    assert torch.allclose(d_t, exact, atol=1e-4)


def test_a_learned_variance_keeps_part_of_its_vlb_and_matches_the_teachers_variance():
    d = Diffusion(img_size=8, channels=1, prediction="eps", learn_sigma=True)
    base = VPLoss(d.alpha_bar64, "eps", learn_sigma=True)
    x0 = MU + STD * torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    draws = base.draw(6, x0, torch.Generator().manual_seed(1))
    plain = GaussianVP(d.alpha_bar64, "eps", gain=1.1).eval()
    student = lambda x, t: torch.cat([plain(x, t), torch.full_like(x, 0.2)], 1)  # noqa: E731
    teacher = lambda x, t: torch.cat([torch.full_like(x, 0.25), torch.full_like(x, -0.4)], 1)  # noqa: E731
    got = P.TeacherLoss(base, teacher, 0.7)(student, x0, draws)
    ab = d.alpha_bar64[draws["t"]].float()
    a, s = ab.sqrt().view(-1, 1, 1, 1), (1 - ab).sqrt().view(-1, 1, 1, 1)
    out = plain(a * x0 + s * draws["eps"], draws["t"])
    taught = (out - 0.25).pow(2).mean((1, 2, 3)) + 0.6**2  # mean part + variance part (0.2 against -0.4)
    assert torch.allclose(got, 0.7 * taught + 0.3 * base(student, x0, draws), rtol=1e-5)


def test_a_conditional_teacher_sees_the_students_labels():
    d, base, x0, draws = _vp_case("eps")

    class ByLabel(nn.Module):
        def forward(self, x, t, y=None):
            return torch.zeros_like(x) if y is None else y.float().view(-1, 1, 1, 1).expand_as(x)

    labels = torch.arange(6)
    student = LabelledNet(ByLabel(), labels)
    got = P.TeacherLoss(base, ByLabel(), 1.0)(student, x0, draws)
    assert torch.equal(got, torch.zeros(6))  # the same labels reach the teacher: it predicts what the student does
    assert (P.TeacherLoss(base, Constant(0.0), 1.0)(student, x0, draws)[1:] > 0).all()


def test_the_tasks_teacher_is_the_unpruned_ema_model_frozen(image_folder, tmp_path, monkeypatch, one_torch_thread):
    path = _teacher(image_folder, tmp_path, monkeypatch)
    ckpt = P.load_checkpoint(path)
    cfg = P.config_of(ckpt, path)
    assert not all(torch.equal(ckpt["ema_state_dict"][k], v) for k, v in ckpt["model_state_dict"].items())
    task = P.PruneTask(path, cfg, P.teacher_weights(ckpt), {"distill_weight": 0.7})
    student, diffusion = task.build(cfg, torch.device("cpu"))  # unpruned: the teacher's own architecture
    teacher = task.teacher
    assert teacher is not None and not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in ckpt["ema_state_dict"].items())
    # Student = teacher weights: at W = 1 the loss is 0 at every draw; the raw (non-EMA) weights are not 0.
    loss = task.make_loss(diffusion, cfg)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    draws = loss.draw(4, x0, torch.Generator().manual_seed(0))
    loss.weight = 1.0
    student.load_state_dict(ckpt["ema_state_dict"])
    assert torch.equal(loss(student.train(), x0, draws), torch.zeros(4))
    student.load_state_dict(ckpt["model_state_dict"])
    assert (loss(student, x0, draws) > 0).all()


def test_no_teacher_is_built_at_weight_0(image_folder, tmp_path, monkeypatch, one_torch_thread):
    path = _teacher(image_folder, tmp_path, monkeypatch)
    ckpt = P.load_checkpoint(path)
    cfg = P.config_of(ckpt, path)
    task = P.PruneTask(path, cfg, P.teacher_weights(ckpt), {"distill_weight": 0.0})
    _, diffusion = task.build(cfg, torch.device("cpu"))
    assert task.teacher is None and task.make_loss(diffusion, cfg).weight == 0.0


# --- the learning rate: cosine to 0 at the last planned step ----------------------------------------

def _lr_trace(monkeypatch) -> list:
    """Records the optimizer's LR before the first step and after every step of the next prune runs."""
    seen = []
    monkeypatch.setattr(P.PruneTask, "start", lambda self, tr: seen.append(tr.state.opt.param_groups[0]["lr"]))
    monkeypatch.setattr(P.PruneTask, "after_step", lambda self, tr: seen.append(tr.state.opt.param_groups[0]["lr"]))
    return seen


@pytest.mark.parametrize("warmup", [0, 2])
def test_the_fine_tune_lr_follows_a_cosine_to_0_at_the_planned_end(warmup, image_folder, tmp_path, monkeypatch,
                                                                    one_torch_thread):
    teacher = _teacher(image_folder, tmp_path, monkeypatch)
    seen = _lr_trace(monkeypatch)
    # 40 images of 24: 2 epochs of 3 batches, 6 steps; lr is the LR of step k before it, seen[k] (k = 0..5).
    P.prune(teacher, 0.5, "lr", finetune_images=40, lr=1e-3, warmup_steps=warmup, workdir=str(tmp_path), **QUIET)
    assert len(seen) == 7 and seen[-1] == 0.0  # exactly 0 at the planned end, step 6
    for k, lr in enumerate(seen):
        frac = (k + 1) / warmup if k < warmup else 0.5 * (1 + math.cos(math.pi * (k - warmup) / (6 - warmup)))
        assert lr == pytest.approx(1e-3 * frac, abs=1e-12), k
    assert 0 < seen[-2] < seen[warmup]  # it decays, and the last step taken still learns


def test_extending_a_finished_fine_tune_stretches_the_cosine_to_the_new_end(image_folder, tmp_path, monkeypatch,
                                                                            one_torch_thread):
    teacher = _teacher(image_folder, tmp_path, monkeypatch)
    seen = _lr_trace(monkeypatch)
    P.prune(teacher, 0.5, "ext", finetune_images=24, lr=1e-3, workdir=str(tmp_path), **QUIET)  # 3 steps
    assert seen[-1] == 0.0
    seen.clear()
    summary = P.prune(teacher, 0.5, "ext", finetune_images=72, lr=1e-3, workdir=str(tmp_path), **QUIET)  # 9
    assert summary["step"] == 9 and seen[-1] == 0.0
    assert seen[:-1] == pytest.approx([1e-3 * lr_factor(k, 0, 9, "cosine") for k in range(3, 9)], abs=1e-12)


# --- exact resume with the new options ---------------------------------------------------------------

def _stop_at(monkeypatch, n: int):
    """SIGTERM during the n-th fine-tune loss evaluation from now on."""
    real, calls = P.TeacherLoss.__call__, {"n": 0}

    def call(self, net, x0, draws=None):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, net, x0, draws)

    monkeypatch.setattr(P.TeacherLoss, "__call__", call)
    return real


@pytest.mark.parametrize("options", [
    {},                                                                         # params, W = 0.7, cosine
    {"ratio_of": "macs", "distill_weight": 0.3, "warmup_steps": 2},
    {"ratio_of": "channels", "distill_weight": 0.0, "lr_schedule": "constant"},  # the earlier fine-tune
])
def test_a_fine_tune_killed_mid_run_resumes_to_the_same_weights(options, image_folder, tmp_path, monkeypatch,
                                                                one_torch_thread):
    teacher = _teacher(image_folder, tmp_path, monkeypatch)
    run = lambda name: P.prune(teacher, 0.5, name, finetune_images=48, workdir=str(tmp_path),  # noqa: E731
                               **options, **QUIET)
    assert run("straight")["step"] == 6
    real = _stop_at(monkeypatch, 5)  # epoch 1, second batch
    assert run("resumed")["status"] == "stopped"
    mid = torch.load(tmp_path / "models" / "resumed" / "ckpt.pt", weights_only=True)
    assert mid["global_step"] == 5
    monkeypatch.setattr(P.TeacherLoss, "__call__", real)
    assert run("resumed")["status"] == "finished"
    a, b = (torch.load(tmp_path / "models" / n / "ckpt.pt", weights_only=True) for n in ("straight", "resumed"))
    for key in ("model_state_dict", "ema_state_dict"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert a["task_state"] == b["task_state"]
    weight = options.get("distill_weight", P.DEFAULT_DISTILL_WEIGHT)
    assert a["task_state"]["distill_weight"] == weight and a["task_state"]["ratio_of"] == options.get("ratio_of",
                                                                                                        "params")
    assert a["config"]["train"]["lr_schedule"] == options.get("lr_schedule", "cosine")


def test_resuming_with_another_amount_or_weight_is_a_one_line_error(image_folder, tmp_path, monkeypatch, capsys,
                                                                    one_torch_thread):
    teacher = _teacher(image_folder, tmp_path, monkeypatch)
    P.prune(teacher, 0.5, "r", finetune_images=8, workdir=str(tmp_path), **QUIET)
    base = ["prune", "--ckpt", teacher, "--run-name", "r", "--workdir", str(tmp_path), "--no-progress"]
    for extra, message in ((["--ratio", "0.4"], "was pruned with --ratio 0.5 --ratio-of params"),
                           (["--ratio", "0.5", "--ratio-of", "macs"], "was pruned with --ratio 0.5 --ratio-of params"),
                           (["--ratio", "0.5", "--distill-weight", "0"], "fine-tunes with --distill-weight 0.7")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert main(base + ["--ratio", "0.5", "--distill-weight", "0.7", "--finetune-images", "16"]) == 0


def test_the_log_names_both_shares_and_the_channel_ratio(image_folder, tmp_path, monkeypatch, one_torch_thread):
    teacher = _teacher(image_folder, tmp_path, monkeypatch)
    lines = []
    P.prune(teacher, 0.6, "log", finetune_images=8, ratio_of="macs", workdir=str(tmp_path), progress=False,
            log=lines.append)
    pattern = re.compile(r"removed (\d+\.\d)% of parameters \((\d\.\d+)M of (\d\.\d+)M\) and (\d+\.\d)% of MACs "
                         r".* at channel ratio (0\.\d+)")
    found = [m for m in map(pattern.search, lines) if m]
    assert len(found) == 1
    state = torch.load(tmp_path / "models" / "log" / "ckpt.pt", weights_only=True)["task_state"]
    params, removed, total, macs, r = found[0].groups()
    assert float(macs) == pytest.approx(100 * state["macs_removed"], abs=0.05)
    assert float(params) == pytest.approx(100 * state["params_removed"], abs=0.05)
    assert float(removed) / float(total) == pytest.approx(state["params_removed"], abs=0.02)  # 3 decimals of 0.04M
    assert float(r) == pytest.approx(state["channel_ratio"], abs=1e-3)
