"""ddpm distill --method sfd (Simple and Fast Distillation, Zhou et al. 2024): its targets against
the closed-form ODE of Gaussian data, a zero loss for the exact ODE map, the student's levels at
training and at sampling time, the annealed learning rate, exact resume, and one-line errors."""
import dataclasses
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import ddpmkit.train as train_module
from ddpmkit import load_model, samplers
from ddpmkit.cli import main
from ddpmkit.diffusion import Diffusion, EDMDenoiser, VPDenoiser, target
from ddpmkit.distill import distill, sfd
from ddpmkit.distill.progressive import ddim_step, x_target
from ddpmkit.errors import DdpmError
from ddpmkit.train import prepare, train

MU, SD = 0.3, 0.5  # the Gaussian data N(MU, SD^2) of the exact networks
TINY = {"size": "custom", "base_channels": 8, "channel_mults": [1, 2], "attn_levels": [], "time_dim": 16}


@pytest.fixture(autouse=True)
def quiet(monkeypatch, one_torch_thread):
    monkeypatch.setattr(train_module, "DRAW_CURVES", False)


def ode(x, a, b):
    """The exact probability-flow ODE map of N(MU, SD^2) data from level a to level b:
    dx/dsigma = (x - D) / sigma with D = MU + SD^2 / (SD^2 + sigma^2) (x - MU) gives
    x(b) - MU = sqrt((SD^2 + b^2) / (SD^2 + a^2)) (x(a) - MU)."""
    bc = lambda v: torch.as_tensor(v, dtype=torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
    return MU + ((SD**2 + bc(b) ** 2) / (SD**2 + bc(a) ** 2)).sqrt() * (x.double() - MU)


def _sigma_of_t(log_sigmas, t):
    """VPDenoiser's interpolation of log sigma over the timesteps, inverted by the exact networks."""
    lo = t.floor().long().clamp(max=len(log_sigmas) - 2)
    return torch.exp(torch.lerp(log_sigmas[lo], log_sigmas[lo + 1], t - lo))


class ExactMapStudent(torch.nn.Module):
    """A v network whose DDIM step from each of `levels` lands exactly on the ODE's next level: its
    x0 is Eq. (*) of progressive.py, x~ = (s x(s'') - s'' x) / (s - s''), with x(s'') = ode(x, s, s'')."""

    def __init__(self, den, levels):
        super().__init__()
        self.log_sigmas, self.levels = den.log_sigmas, levels.double()

    def forward(self, x_vp, t):
        sigma = _sigma_of_t(self.log_sigmas, t).double()
        i = (sigma.log().view(-1, 1) - self.levels[:-1].log().view(1, -1)).abs().argmin(1)
        s, s_next = self.levels[i], self.levels[i + 1]
        bc = lambda v: v.view(-1, 1, 1, 1)
        a = 1 / (1 + sigma**2).sqrt()
        x = x_vp.double() / bc(a)
        x0 = x_target(x, ode(x, s, s_next), s, s_next)
        eps = (x_vp.double() - bc(a) * x0) / bc(sigma * a)
        return target("v", x0, eps, bc(a), bc(sigma * a)).float()


def _exact_loss(steps=4, substeps=4, sampler="dpm++2m", teacher_prediction="eps"):
    """SFDLoss of a run whose teacher is the exact `teacher_prediction` network of N(MU, SD^2) pixels
    (linear schedule, T = 1000), built as `ddpm distill --method sfd` builds it (a v student)."""
    from ddpmkit.config import Config, DataConfig, DiffusionConfig
    from ddpmkit.distill import _run_config
    from ddpmkit.distill.tasks import SFDTask
    from exact_nets import InterpolatingGaussian

    teacher_cfg = Config(diffusion=DiffusionConfig(prediction=teacher_prediction),
                         data=DataConfig(image_size=8, channels=1))
    cfg = _run_config(teacher_cfg, "teacher.pt", "sfd", steps, {"run_name": "x"})
    assert (cfg.diffusion.prediction, cfg.distill.sampler) == ("v" if teacher_prediction == "eps" else
                                                               teacher_prediction, "progressive")
    task = SFDTask("teacher.pt", {}, 8, 8, sampler, substeps, teacher_cfg.diffusion)
    teacher = Diffusion.from_config(teacher_cfg.diffusion, 4, 1)
    task.teacher = InterpolatingGaussian(teacher.denoiser(torch.nn.Identity()), MU, SD, teacher_prediction)
    return task.make_loss(Diffusion.from_config(cfg.diffusion, 4, 1), cfg)


def _draws(loss, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    like = torch.zeros(n, 1, 4, 4)
    return like, loss.draw(n, like, g)


def _vp_error(a, b, level):
    """Mean absolute error in VP units (x / sqrt(1 + sigma^2)), comparable across levels."""
    return float((a.double() - b.double()).abs().mean() / (1 + float(level) ** 2) ** 0.5)


@pytest.mark.parametrize("steps", [2, 4])
@pytest.mark.parametrize("teacher_prediction", ["eps", "v"])
def test_each_segments_target_is_the_exact_ode_solution_of_gaussian_data(steps, teacher_prediction):
    # The teacher's target at the end of segment n is the ODE solution from its own point at the
    # segment's start (and so from x_T) to the segment's end; its solver error shrinks at second
    # order with the teacher's steps. An eps teacher of a v student must be read as eps.
    loss = _exact_loss(steps, 32, teacher_prediction=teacher_prediction)
    like, draws = _draws(loss)
    x_T, levels = loss.start(draws), loss.levels
    assert torch.allclose(x_T, draws["z"] * (1 + levels[0] ** 2) ** 0.5)  # `ddpm sample`'s initial noise
    fine_32 = loss.targets(x_T)
    assert len(fine_32) == steps
    start = x_T
    for n, got in enumerate(fine_32):
        end = float(levels[n + 1])
        assert _vp_error(got, ode(start, float(levels[n]), end), end) < 2e-3, n  # from the segment's start
        assert _vp_error(got, ode(x_T, float(levels[0]), end), end) < 2e-3, n   # from x_T
        start = got
    loss.substeps = 8
    coarse = loss.targets(x_T)
    last = lambda t: _vp_error(t[-1], ode(x_T, float(levels[0]), 0.0), 0.0)
    assert last(coarse) > 6 * last(fine_32)  # 4x the steps: ~16x smaller error for a 2nd-order solver


def test_a_student_equal_to_the_exact_ode_map_has_near_zero_loss_and_the_teacher_itself_does_not():
    loss = _exact_loss(4, 32)
    like, draws = _draws(loss)
    den = loss.diffusion.denoiser(torch.nn.Identity())
    exact = loss(ExactMapStudent(den, loss.levels), like, draws)
    # The untrained student: the teacher's own denoiser, one DDIM step per segment.
    from exact_nets import InterpolatingGaussian

    plain = loss(InterpolatingGaussian(den, MU, SD, "v"), like, draws)
    assert exact.shape == plain.shape == (64,)
    assert float(exact.mean()) < 2e-3 and float(plain.mean()) > 100 * float(exact.mean())
    # Against the closed-form trajectory itself the exact map's loss is zero to float precision.
    x_T = loss.start(draws)
    outs = sfd.student_steps(loss.diffusion.denoiser(ExactMapStudent(den, loss.levels), clip=False), x_T, loss.levels)
    closed = [ode(x_T, float(loss.levels[0]), float(s)) for s in loss.levels[1:]]
    assert float(sfd.l1_per_sample(outs, closed).max()) < 1e-4


def test_the_student_steps_from_its_own_detached_output_and_the_loss_is_l1():
    levels = torch.tensor([10.0, 2.0, 0.5, 0.0])

    class Scaled(torch.nn.Module):  # D(x, s) = w x / (1 + s^2), a student with one weight
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.7))

        def forward(self, x, s):
            return self.w * x / (1 + s.view(-1, 1, 1, 1) ** 2)

    student = Scaled()
    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * 10
    outs = sfd.student_steps(student, x, levels)
    expected, y = [], x
    for n in range(3):
        y = ddim_step(student, y, levels[n].expand(3), levels[n + 1].expand(3)).detach()
        expected.append(y)
    for got, want in zip(outs, expected):
        torch.testing.assert_close(got.detach(), want)
    # Each step's input is the previous output detached: step 2's graph does not reach step 1's output.
    assert torch.autograd.grad(outs[1].sum(), outs[0], allow_unused=True)[0] is None
    targets = [torch.zeros_like(o) for o in outs]
    l1 = sum((o - t).abs().flatten(1).mean(1) for o, t in zip(outs, targets))
    torch.testing.assert_close(sfd.l1_per_sample(outs, targets), l1)


def test_teacher_levels_hold_the_students_levels_and_k_steps_per_segment_on_average():
    for diff in (Diffusion(img_size=4, timesteps=1000), Diffusion(img_size=4, timesteps=1000, schedule="cosine"),
                 Diffusion(img_size=4, objective="edm")):
        den = diff.denoiser(torch.nn.Identity())
        for steps in (1, 2, 4, 8):
            levels = sfd.student_levels(den, steps)
            assert torch.equal(levels, samplers.sampler_sigmas(den, "progressive", steps))  # `ddpm sample`'s
            for k in (1, 3, 4):
                fine, knots = sfd.substep_levels(levels, k, den.sigma_min)
                assert len(fine) == k * steps + 2  # k N steps to sigma_min, one to 0
                assert torch.equal(fine[knots], levels[1:]) and float(fine[0]) == float(levels[0])
                assert bool((fine[1:] < fine[:-1]).all()) and float(fine[-2]) == pytest.approx(den.sigma_min)
    assert sfd.split_steps([1.0, 3.0], 8) == [2, 6] and sfd.split_steps([1.0, 100.0], 2) == [1, 1]
    assert sfd.split_steps([0.1, 1.0, 10.0], 6) == [1, 1, 4] and sfd.split_steps([2.0, 1.0, 1.0], 5) == [3, 1, 1]
    with pytest.raises(DdpmError, match="must lie above the teacher's sigma_min"):
        sfd.substep_levels(torch.tensor([1.0, 0.01, 0.0]), 2, 0.01)


# --- end to end on a tiny teacher ---------------------------------------------------------------

def _train_teacher(root, diffusion):
    """A teacher trained for one epoch on 16 random 8x8 images; (root, its checkpoint)."""
    folder = root / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray((rng.uniform(0, 1, (8, 8, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    train_module.DRAW_CURVES = False
    cfg, ckpt = prepare({"data": {"path": str(folder), "image_size": 8}, "model": TINY, "diffusion": diffusion,
                         "train": {"workdir": str(root), "run_name": "teacher", "epochs": 1, "batch_size": 8,
                                   "sample_every_epochs": 0, "device": "cpu", "sample_n": 4}})
    train(cfg, ckpt, progress=False, log=lambda *a: None)
    train_module.DRAW_CURVES = True
    torch.set_num_threads(old)
    return root, str(root / "models" / "teacher" / "ckpt.pt")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A VP teacher (eps prediction, T = 32), trained once for this module."""
    return _train_teacher(tmp_path_factory.mktemp("sfd"), {"timesteps": 32, "prediction": "eps"})


@pytest.fixture(scope="module")
def edm_teacher(tmp_path_factory):
    """An EDM teacher, whose student levels (Karras et al. 2022, Eq. 5 with ramp k / N) are not DDIM's."""
    return _train_teacher(tmp_path_factory.mktemp("sfd_edm"), {"objective": "edm"})


def _distill(teacher, name, **kw):
    root, ckpt = teacher
    kw = {"steps": 2, "images": 24, **kw}
    return distill(ckpt, "sfd", name, workdir=str(root), batch_size=8, device="cpu", progress=False,
                   log=lambda *a: None, **kw)


def _record_levels(monkeypatch):
    """(network in training mode?, sigma) of every denoiser call."""
    calls = []
    for cls in (VPDenoiser, EDMDenoiser):
        def forward(self, x, sigma, *args, real=cls.forward, **kw):
            values = torch.as_tensor(sigma).reshape(-1).tolist()
            calls.extend((self.net.training, v) for v in values)
            return real(self, x, sigma, *args, **kw)

        monkeypatch.setattr(cls, "forward", forward)
    return calls


@pytest.mark.parametrize("objective", ["vp", "edm"])
def test_the_students_levels_at_sampling_time_are_those_it_was_trained_at(objective, request, tmp_path, monkeypatch):
    teacher = request.getfixturevalue("teacher" if objective == "vp" else "edm_teacher")
    calls = _record_levels(monkeypatch)
    summary = _distill(teacher, "levels", steps=4)
    trained = sorted({s for training, s in calls if training}, reverse=True)  # the student's calls
    taught = {s for training, s in calls if not training}                     # the teacher's (and the grid's)
    calls.clear()
    assert main(["sample", "--ckpt", str(summary["ckpt"]), "-n", "2", "--out", str(tmp_path / "s.png"),
                 "--no-progress", "--device", "cpu"]) == 0
    sampled = sorted({s for _, s in calls}, reverse=True)
    assert len(trained) == 4 and trained == sampled
    _, diffusion, cfg = load_model(summary["ckpt"])
    den = diffusion.denoiser(torch.nn.Identity())
    assert trained == samplers.sampler_sigmas(den, "progressive", 4)[:-1].tolist()
    assert set(trained) <= taught and len(taught) > 4 * 4  # the teacher passes through them, with sub-steps
    if objective == "edm":  # DDIM's own levels there would end at sigma_min: not the student's
        assert trained != samplers.sampler_sigmas(den, "ddim", 4)[:-1].tolist()


def test_sfd_end_to_end_then_sample_with_its_own_defaults_export_and_load(teacher, tmp_path, monkeypatch):
    import ddpmkit.distributed as distributed

    root, teacher_ckpt = teacher
    summary = _distill(teacher, "e2e", steps=2)
    assert summary["status"] == "finished"
    model, diffusion, cfg = load_model(summary["ckpt"])
    assert (cfg.distill.method, cfg.distill.steps, cfg.distill.sampler, cfg.distill.teacher) == \
        ("sfd", 2, "progressive", teacher_ckpt)
    assert cfg.diffusion.prediction == "v" and cfg.diffusion.clip_denoised is False  # sampled as trained
    state = torch.load(summary["ckpt"], weights_only=True)["task_state"]
    assert (state["method"], state["rows"], state["teacher_sampler"], state["teacher_steps"]) == \
        ("sfd", 24, sfd.DEFAULT_TEACHER_SAMPLER, sfd.DEFAULT_TEACHER_STEPS)
    assert (root / "results" / "e2e" / "step3.jpg").is_file()  # the end-of-run grid with the student's sampler
    seen = {}
    real = distributed.generate_distributed

    def spy(*args, **kw):
        seen.update(sampler=kw["sampler"], steps=kw["steps"])
        return real(*args, **kw)

    monkeypatch.setattr(distributed, "generate_distributed", spy)
    assert main(["sample", "--ckpt", str(summary["ckpt"]), "-n", "3", "--out", str(tmp_path / "g.png"),
                 "--no-progress", "--device", "cpu"]) == 0
    assert seen == {"sampler": "progressive", "steps": 2} and (tmp_path / "g.png").is_file()
    assert main(["export", "--ckpt", str(summary["ckpt"]), "--out", str(tmp_path / "exp")]) == 0
    assert load_model(tmp_path / "exp")[2].distill.method == "sfd"


def test_sfd_needs_no_training_images(teacher, tmp_path):
    # The teacher's data folder is gone: SFD trains from noise alone.
    root, teacher_ckpt = teacher
    ckpt = torch.load(teacher_ckpt, weights_only=True)
    ckpt["config"]["data"]["path"] = str(tmp_path / "missing")
    torch.save(ckpt, tmp_path / "t.pt")
    summary = distill(str(tmp_path / "t.pt"), "sfd", "no_data", steps=1, images=8, workdir=str(root), batch_size=8,
                      device="cpu", progress=False, log=lambda *a: None)
    assert summary["status"] == "finished" and summary["step"] == 1


def test_sfd_kill_and_resume_is_exact(teacher, monkeypatch):
    # 24 noise draws in batches of 8: 3 steps; SIGTERM during step 2, then the same command again.
    _distill(teacher, "straight", images=24)
    calls = {"n": 0}
    real = sfd.SFDLoss.__call__

    def interrupting(self, net, x0, draws):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, net, x0, draws)

    monkeypatch.setattr(sfd.SFDLoss, "__call__", interrupting)
    assert _distill(teacher, "resumed", images=24)["status"] == "stopped"
    root = teacher[0]
    assert torch.load(root / "models" / "resumed" / "ckpt.pt", weights_only=True)["global_step"] == 2
    monkeypatch.setattr(sfd.SFDLoss, "__call__", real)
    assert _distill(teacher, "resumed", images=24)["status"] == "finished"
    a, b = (torch.load(root / "models" / n / "ckpt.pt", weights_only=True) for n in ("straight", "resumed"))
    assert a["global_step"] == b["global_step"] == 3
    for key in ("model_state_dict", "ema_state_dict"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


def test_sfd_learning_rate_decays_linearly_to_zero_over_the_run(teacher, monkeypatch):
    seen, real = [], torch.optim.AdamW.step

    def step(self, *args, **kw):
        seen.append(self.param_groups[0]["lr"])
        return real(self, *args, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    summary = _distill(teacher, "lr", images=32, lr=2e-4)  # 4 steps
    assert seen == pytest.approx([2e-4, 1.5e-4, 1e-4, 0.5e-4], rel=1e-9)
    assert torch.load(summary["ckpt"], weights_only=True)["optimizer_state_dict"]["param_groups"][0]["lr"] == 0


def test_bad_sfd_options_are_one_line_errors(teacher, tmp_path):
    with pytest.raises(DdpmError, match="exceeds this model's 32 timesteps"):
        _distill(teacher, "too_many", steps=64)
    with pytest.raises(DdpmError, match="unknown --teacher-sampler 'ddpm'"):
        _distill(teacher, "bad_solver", teacher_sampler="ddpm")
    with pytest.raises(DdpmError, match="--teacher-sampler and --teacher-steps set the teacher solver of --method sfd"):
        distill(teacher[1], "consistency", "x", teacher_steps=3, workdir=str(tmp_path), progress=False)
    _distill(teacher, "solver", images=8, teacher_steps=2)
    with pytest.raises(DdpmError, match="distils with --teacher-sampler dpm\\+\\+2m --teacher-steps 2; resume it"):
        _distill(teacher, "solver", images=8, teacher_steps=3)
    root = teacher[0]
    with pytest.raises(DdpmError, match="is itself a sfd model"):  # only accurate on its own N-step grid
        distill(str(root / "models" / "solver" / "ckpt.pt"), "sfd", "x", workdir=str(tmp_path), progress=False)
    ckpt = torch.load(teacher[1], weights_only=True)
    ckpt["config"]["autoencoder"] = {**ckpt["config"].get("autoencoder", {}), "path": "ae.pt"}
    torch.save(ckpt, tmp_path / "latent.pt")
    with pytest.raises(DdpmError, match="is a latent diffusion model; ddpm distill takes pixel-space teachers"):
        distill(str(tmp_path / "latent.pt"), "sfd", "x", workdir=str(tmp_path), progress=False)
