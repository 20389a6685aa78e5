"""ddpm distill: the progressive target, the consistency boundary condition, the pair file, the
annealed learning rate, and each method end to end on a tiny teacher (sample, export, eval from
the student), with resume. SFD's own tests are in test_sfd.py."""
import dataclasses
import json
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import ddpmkit.train as train_module
from ddpmkit import load_model, samplers
from ddpmkit.cli import main
from ddpmkit.diffusion import Diffusion
from ddpmkit.distill import distill
from ddpmkit.distill import progressive
from ddpmkit.distill.consistency import ConsistencyFunction
from ddpmkit.distill.student import make_pairs
from ddpmkit.errors import DdpmError
from ddpmkit.train import prepare, train

TINY = {"size": "custom", "base_channels": 8, "channel_mults": [1, 2], "attn_levels": [], "time_dim": 16}


@pytest.fixture(autouse=True)
def quiet(monkeypatch, one_torch_thread):
    monkeypatch.setattr(train_module, "DRAW_CURVES", False)


class GaussDenoiser:
    """The exact D(x, sigma) = mu + s_d^2 / (s_d^2 + sigma^2) (x - mu) of N(mu, s_d^2 I) data, in float64."""

    def __init__(self, mu=0.3, sd=0.5):
        self.mu, self.sd = mu, sd

    def __call__(self, x, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
        return self.mu + self.sd**2 / (self.sd**2 + sigma**2) * (x - self.mu)


@pytest.mark.parametrize("levels", [(2.0, 0.7, 0.3), (80.0, 3.0, 0.0), (0.5, 0.2, 0.05)])
def test_progressive_target_one_student_step_lands_on_two_teacher_steps(levels):
    s, s_mid, s_next = (torch.full((6,), v, dtype=torch.float64) for v in levels)
    teacher = GaussDenoiser()
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * (1 + levels[0])
    two = samplers.sample_ddim(teacher, x, torch.tensor(levels, dtype=torch.float64))  # the real sampler
    assert torch.allclose(progressive.ddim_step(teacher, progressive.ddim_step(teacher, x, s, s_mid), s_mid, s_next),
                          two, rtol=0, atol=1e-12)
    target = progressive.x_target(x, two, s, s_next)
    one = samplers.sample_ddim(lambda x_, sig: target, x, torch.tensor([levels[0], levels[2]], dtype=torch.float64))
    torch.testing.assert_close(one, two, rtol=0, atol=1e-12)
    # The same target as Salimans & Ho (2022) Eq. 8 in VP variables: z = alpha x, sigma_VP = alpha s.
    alpha = lambda v: 1 / (1 + v**2) ** 0.5
    a, a2 = alpha(s).view(-1, 1, 1, 1), alpha(s_next).view(-1, 1, 1, 1)
    ratio = ((a2 * s_next.view(-1, 1, 1, 1)) / (a * s.view(-1, 1, 1, 1)))
    eq8 = (a2 * two - ratio * a * x) / (a2 - ratio * a)
    torch.testing.assert_close(target, eq8, rtol=1e-10, atol=1e-10)


def _progressive_loss_of_an_exact_teacher(prediction: str, steps: int = 2):
    """The first stage's loss of a progressive run whose teacher is the exact `prediction` network
    of N(0.3, 0.5^2) pixels on the linear 1000-step schedule, built as `ddpm distill` builds it."""
    from ddpmkit.config import Config, DataConfig, DiffusionConfig
    from ddpmkit.distill import _run_config
    from ddpmkit.distill.tasks import ProgressiveTask
    from exact_nets import InterpolatingGaussian

    teacher_cfg = Config(diffusion=DiffusionConfig(prediction=prediction), data=DataConfig(image_size=8, channels=1))
    cfg = _run_config(teacher_cfg, "teacher.pt", "progressive", steps, {"run_name": "x"})
    diffusion = Diffusion.from_config(cfg.diffusion, 4, 1)
    task = ProgressiveTask("teacher.pt", {}, 8, 2 * steps, steps, teacher_cfg.diffusion)
    task.teacher = InterpolatingGaussian(Diffusion.from_config(teacher_cfg.diffusion, 4, 1).denoiser(
        torch.nn.Identity()), 0.3, 0.5, prediction)
    return cfg, task.make_loss(diffusion, cfg)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_first_stage_target_is_two_exact_ddim_steps_of_the_teacher(prediction):
    # Salimans & Ho (2022) Alg. 2: the target is what two DDIM steps of the teacher give. An eps
    # teacher's student predicts v, but the teacher must still be read as eps: read as v, its x0 is
    # off by up to ~3 at the top levels (the bug this guards).
    cfg, loss = _progressive_loss_of_an_exact_teacher(prediction)
    assert cfg.diffusion.prediction == ("v" if prediction == "eps" else prediction)
    g = torch.Generator().manual_seed(0)
    x0 = 0.3 + 0.5 * torch.randn(64, 1, 4, 4, generator=g)
    draws = loss.draw(64, x0, generator=g)
    x, s, target = loss.target(x0, draws)
    fine = samplers.nested_sigmas(loss.diffusion.denoiser(torch.nn.Identity()), 4)
    i = (draws["u"] * 2).long()
    assert set(i.tolist()) == {0, 1}  # both student steps are checked
    exact = GaussDenoiser()
    xd = x.double()
    two = progressive.ddim_step(exact, progressive.ddim_step(exact, xd, s.double(), fine[2 * i + 1].double()),
                                fine[2 * i + 1].double(), fine[2 * i + 2].double())
    expected = progressive.x_target(xd, two, s.double(), fine[2 * i + 2].double())
    torch.testing.assert_close(target.double(), expected, rtol=1e-3, atol=2e-3)


def test_nested_grids_halve_exactly():
    for diff in (Diffusion(img_size=8, timesteps=1000), Diffusion(img_size=8, objective="edm")):
        den = diff.denoiser(torch.nn.Identity())
        for n in (1, 2, 4, 8, 16):
            coarse, fine = samplers.nested_sigmas(den, n), samplers.nested_sigmas(den, 2 * n)
            assert torch.equal(coarse, fine[::2]) and coarse[0] == fine[0] and coarse[-1] == 0


class Wild(torch.nn.Module):
    """A network with large, input-dependent outputs."""

    def __init__(self, seed, channels=3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(channels, channels, generator=g) * 10 ** (seed % 4)

    def forward(self, x, t):
        return torch.einsum("oc,nchw->nohw", self.w, x) + torch.as_tensor(t).float().view(-1, 1, 1, 1) * 1e-3


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["eps", "v", "x0", "edm"])
def test_consistency_boundary_condition_is_exact_for_any_network(seed, kind):
    diff = Diffusion(img_size=4, channels=3, objective="edm") if kind == "edm" else \
        Diffusion(img_size=4, channels=3, timesteps=100, prediction=kind)
    f = ConsistencyFunction(diff.denoiser(Wild(seed), clip=False))
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * 3
    assert torch.equal(f(x, torch.tensor(f.sigma_min)), x)
    c_skip, c_out, _, _ = f.coefficients(torch.tensor([f.sigma_min], dtype=torch.float32))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    assert not torch.allclose(f(x, torch.tensor(1.0)), x)  # away from sigma_min the network acts


def test_gap_schedule_is_ects_mapping_function():
    # Geng et al. (2024) §3: r = t (1 - n(t) / q^(stage + 1)), n(t) = 1 + k sigmoid(-b t), q = 2,
    # k = 8, b = 1; the stage advances every 1/8 of the run.
    from ddpmkit.distill.consistency import gap_ratio

    t = torch.tensor([0.01, 0.3, 1.0, 4.0, 20.0, 80.0])
    total = 800
    for step in (0, 99, 100, 250, 799):
        stage = step // 100
        expected = 1 - (1 + 8 / (1 + torch.exp(t))) / 2.0 ** (stage + 1)
        torch.testing.assert_close(gap_ratio(t, step, total), expected, rtol=0, atol=1e-6)
    # Stage 0 is already a consistency gap (r = t / 2 at large t), not plain denoising at sigma_min,
    # and the last stage's gap is 1/256 of t there.
    assert abs(gap_ratio(torch.tensor(80.0), 0, total) - 0.5) < 1e-6
    assert abs(1 - gap_ratio(torch.tensor(80.0), total - 1, total) - 1 / 256) < 1e-6


class DropoutNet(torch.nn.Module):
    """An identity-like network with dropout that records each forward's mask."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def forward(self, x, t):
        mask = torch.nn.functional.dropout(torch.ones_like(x), 0.5, self.training)
        self.masks.append(mask)
        return x * mask


def test_consistency_passes_share_one_dropout_mask_and_leave_the_rng_as_after_one_pass():
    # ECT (Geng et al. 2024, training/loss.py) replays the RNG so that f(x_t, t) and the target
    # f(x_r, r) see the same dropout mask.
    from ddpmkit.distill.consistency import ConsistencyLoss

    net = DropoutNet().train()
    loss = ConsistencyLoss(Diffusion(img_size=4, channels=1, timesteps=100, prediction="v"), lambda: (0, 8))
    x0 = torch.zeros(3, 1, 4, 4)
    draws = loss.draw(3, x0, torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    loss(net, x0, draws)
    after = torch.rand(4)
    assert len(net.masks) == 2 and torch.equal(net.masks[0], net.masks[1])
    torch.manual_seed(5)
    torch.nn.functional.dropout(torch.ones(3, 1, 4, 4), 0.5, True)
    assert torch.equal(torch.rand(4), after)  # later draws continue from one pass's state


def test_progressive_loss_is_the_truncated_snr_weighted_error_to_the_target():
    # Salimans & Ho (2022) §4: max(SNR, 1) ||x^ - x~||^2 with SNR = 1 / s^2 in VE coordinates.
    cfg, loss = _progressive_loss_of_an_exact_teacher("v", steps=4)
    g = torch.Generator().manual_seed(1)
    x0 = 0.3 + 0.5 * torch.randn(32, 1, 4, 4, generator=g)
    draws = loss.draw(32, x0, generator=g)
    student = Wild(3, channels=1)
    x, s, target = loss.target(x0, draws)
    out = loss.diffusion.denoiser(student, clip=False)(x, s)
    expected = torch.clamp(1 / s**2, min=1) * ((out - target) ** 2).flatten(1).mean(1)
    assert (s < 1).any() and (s > 1).any()  # both sides of the truncation
    torch.testing.assert_close(loss(student, x0, draws), expected, rtol=1e-5, atol=0)


def test_consistency_loss_is_ects_pseudo_huber_over_the_gap():
    # Geng et al. (2024): w(t, r) d(f(x0 + t n, t), f(x0 + r n, r)) with w = 1 / (t - r) here and
    # d the pseudo-Huber metric with c = 0.00054 sqrt(dim) (Song & Dhariwal 2024, §3.3).
    from ddpmkit.distill.consistency import ConsistencyLoss, gap_ratio

    diffusion = Diffusion(img_size=4, channels=1, timesteps=100, prediction="v")
    net = Wild(2, channels=1)
    for step in (0, 5):
        loss = ConsistencyLoss(diffusion, lambda: (step, 8))
        x0 = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(step)) * 2 - 1
        draws = loss.draw(6, x0, torch.Generator().manual_seed(step))
        f = ConsistencyFunction(diffusion.denoiser(net, clip=False))
        t = draws["t"].clamp(f.sigma_min * 1.001, f.denoiser.sigma_max)
        r = torch.maximum(t * gap_ratio(t, step, 8), torch.tensor(f.sigma_min))
        bc = lambda v: v.view(-1, 1, 1, 1)
        a, b = f(x0 + bc(t) * draws["noise"], t), f(x0 + bc(r) * draws["noise"], r)
        c = 0.00054 * 4.0
        expected = (((a - b) ** 2).flatten(1).sum(1) + c**2).sqrt() - c
        torch.testing.assert_close(loss(net, x0, draws), expected / (t - r), rtol=1e-5, atol=0)
        assert (r > f.sigma_min).any() or step == 0


def test_pair_file_resumes_where_a_killed_generation_stopped(tmp_path, monkeypatch):
    den = Diffusion(img_size=4, channels=1, timesteps=50).denoiser(Wild(1, channels=1), clip=False)
    straight = np.array(make_pairs(tmp_path / "a.npy", 10, (1, 4, 4), den, 7, torch.device("cpu"), print, batch=4))
    calls = {"n": 0}

    class Killed(Exception):
        pass

    def write_count(path, done):  # the process dies right after the second chunk's count
        (path).write_text(json.dumps({"done": done}))
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed

    import ddpmkit.distill.student as student

    monkeypatch.setattr(student, "_write_count", write_count)
    with pytest.raises(Killed):
        make_pairs(tmp_path / "b.npy", 10, (1, 4, 4), den, 7, torch.device("cpu"), print, batch=4)
    assert json.loads((tmp_path / "b.npy.done.json").read_text())["done"] == 8
    monkeypatch.setattr(student, "_write_count", lambda path, done: path.write_text(json.dumps({"done": done})))
    seen = []
    resumed = np.array(make_pairs(tmp_path / "b.npy", 10, (1, 4, 4), den, 7, torch.device("cpu"), seen.append,
                                  batch=4))
    assert "2 of 10" in seen[0]
    np.testing.assert_array_equal(resumed, straight)
    assert np.abs(straight[:, 1]).max() <= 1 and straight[:, 0].std() > 0.5


# --- end to end on a tiny teacher ---------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A 3-step teacher on 24 8x8 images (eps prediction, T = 32), trained once for this module."""
    root = tmp_path_factory.mktemp("distill")
    folder = root / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray((rng.uniform(0, 1, (8, 8, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    train_module.DRAW_CURVES = False
    cfg, ckpt = prepare({"data": {"path": str(folder), "image_size": 8}, "model": TINY,
                         "diffusion": {"timesteps": 32, "prediction": "eps"},
                         "train": {"workdir": str(root), "run_name": "teacher", "epochs": 1, "batch_size": 8,
                                   "sample_every_epochs": 0, "device": "cpu", "sample_n": 4}})
    train(cfg, ckpt, progress=False, log=lambda *a: None)
    train_module.DRAW_CURVES = True
    torch.set_num_threads(old)
    return root, str(root / "models" / "teacher" / "ckpt.pt"), folder


def _distill(teacher, method, name, **kw):
    root, ckpt, _ = teacher
    return distill(ckpt, method, name, workdir=str(root), batch_size=8, device="cpu", progress=False,
                   log=lambda *a: None, **kw)


@pytest.mark.parametrize("method,kw,steps,sampler", [
    ("progressive", {"steps": 2, "start_steps_": 8, "images": 8}, 2, "progressive"),
    ("student", {"pairs": 16, "images": 16}, 1, "ddim"),
    ("consistency", {"steps": 2, "images": 24}, 2, "consistency"),
])
def test_each_method_end_to_end_then_sample_export_eval(teacher, method, kw, steps, sampler, tmp_path, capsys):
    root, teacher_ckpt, folder = teacher
    summary = _distill(teacher, method, f"e2e_{method}", **kw)
    assert summary["status"] == "finished"
    ckpt = root / "models" / f"e2e_{method}" / "ckpt.pt"
    model, diffusion, cfg = load_model(ckpt)
    assert (cfg.distill.method, cfg.distill.steps, cfg.distill.sampler) == (method, steps, sampler)
    assert cfg.distill.teacher == teacher_ckpt
    assert cfg.diffusion.prediction == "v"  # an eps teacher gets a v student (x0 error not scaled by sigma_max)
    assert main(["sample", "--ckpt", str(ckpt), "-n", "4", "--out", str(tmp_path / "g.png"), "--no-progress",
                 "--device", "cpu"]) == 0
    assert (tmp_path / "g.png").is_file()
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "exp")]) == 0
    assert load_model(tmp_path / "exp")[2].distill.sampler == sampler
    assert main(["eval", "--ckpt", str(ckpt), "--ref", str(folder), "-n", "8", "--extractor", "randconv",
                 "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "FID" in out
    assert "task_state" in torch.load(ckpt, weights_only=True)


def test_sample_defaults_to_the_students_sampler_and_steps(teacher, tmp_path, monkeypatch):
    root, _, _ = teacher
    _distill(teacher, "consistency", "defaults", steps=2, images=8)
    seen = {}
    import ddpmkit.distributed as distributed

    real = distributed.generate_distributed

    def spy(*args, **kw):
        seen.update(sampler=kw["sampler"], steps=kw["steps"])
        return real(*args, **kw)

    monkeypatch.setattr(distributed, "generate_distributed", spy)
    ckpt = str(root / "models" / "defaults" / "ckpt.pt")
    main(["sample", "--ckpt", ckpt, "-n", "2", "--out", str(tmp_path / "a.png"), "--no-progress", "--device", "cpu"])
    assert seen == {"sampler": "consistency", "steps": 2}
    main(["sample", "--ckpt", ckpt, "-n", "2", "--out", str(tmp_path / "a.png"), "--no-progress", "--device", "cpu",
          "--sampler", "ddim"])
    assert seen == {"sampler": "ddim", "steps": None}  # an explicit sampler keeps its own default steps
    main(["sample", "--ckpt", str(root / "models" / "teacher" / "ckpt.pt"), "-n", "2", "--out",
          str(tmp_path / "a.png"), "--no-progress", "--device", "cpu", "--steps", "3"])
    assert seen == {"sampler": "dpm++2m", "steps": 3}  # an ordinary checkpoint: `ddpm sample`'s default sampler
    main(["sample", "--ckpt", str(root / "models" / "teacher" / "ckpt.pt"), "-n", "2", "--out",
          str(tmp_path / "a.png"), "--no-progress", "--device", "cpu"])
    assert seen == {"sampler": "dpm++2m", "steps": 20}


def test_progressive_kill_and_resume_is_exact_across_a_stage_switch(teacher, monkeypatch):
    # 2 stages (8 -> 4 -> 2) over 2 epochs of 3 steps: the stop comes in stage 2, after the switch.
    _distill(teacher, "progressive", "straight", steps=2, start_steps_=8, images=24)
    calls = {"n": 0}
    real = progressive.ProgressiveLoss.__call__

    def interrupting(self, net, x0, draws):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, net, x0, draws)

    monkeypatch.setattr(progressive.ProgressiveLoss, "__call__", interrupting)
    assert _distill(teacher, "progressive", "resumed", steps=2, start_steps_=8, images=24)["status"] == "stopped"
    root = teacher[0]
    mid = torch.load(root / "models" / "resumed" / "ckpt.pt", weights_only=True)
    assert mid["task_state"]["stage"] == 1 and mid["global_step"] == 5
    monkeypatch.setattr(progressive.ProgressiveLoss, "__call__", real)
    assert _distill(teacher, "progressive", "resumed", steps=2, start_steps_=8, images=24)["status"] == "finished"
    a, b = (torch.load(root / "models" / n / "ckpt.pt", weights_only=True) for n in ("straight", "resumed"))
    for key in ("model_state_dict", "ema_state_dict"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for name in a["task_state"]["teacher_state"]:
        assert torch.equal(a["task_state"]["teacher_state"][name], b["task_state"]["teacher_state"][name])
    assert a["global_step"] == b["global_step"] == 6
    snap = load_model(root / "models" / "straight" / "steps4.pt")[2]  # the finished 4-step stage
    assert snap.distill.steps == 4


def test_a_resume_in_the_first_stage_still_reads_the_eps_teacher_as_eps(teacher, monkeypatch):
    # The fixture's teacher predicts eps; its student predicts v. Stage 1 (8 -> 4) distils the
    # teacher read as eps, stage 2 (4 -> 2) the stage-1 student read as v, with or without a stop
    # and resume in stage 1.
    real = progressive.ProgressiveLoss.target
    seen, calls = [], {"n": 0}

    def spy(self, x0, draws):
        seen.append((self.state()[2], self.state()[1].prediction))
        return real(self, x0, draws)

    def interrupting(self, x0, draws):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return spy(self, x0, draws)

    monkeypatch.setattr(progressive.ProgressiveLoss, "target", spy)
    _distill(teacher, "progressive", "first_straight", steps=2, start_steps_=8, images=24)
    assert seen == [(4, "eps")] * 3 + [(2, "v")] * 3
    seen.clear()
    monkeypatch.setattr(progressive.ProgressiveLoss, "target", interrupting)
    assert _distill(teacher, "progressive", "first_resumed", steps=2, start_steps_=8, images=24)["status"] == "stopped"
    monkeypatch.setattr(progressive.ProgressiveLoss, "target", spy)
    assert _distill(teacher, "progressive", "first_resumed", steps=2, start_steps_=8, images=24)["status"] == "finished"
    assert [p for _, p in seen] == ["eps"] * 3 + ["v"] * 3  # the steps before and after the stop
    root = teacher[0]
    a, b = (torch.load(root / "models" / n / "ckpt.pt", weights_only=True) for n in ("first_straight", "first_resumed"))
    for name in a["model_state_dict"]:
        assert torch.equal(a["model_state_dict"][name], b["model_state_dict"][name]), name


def test_a_v_student_learns_from_pairs_of_the_eps_teacher_read_as_eps(teacher, tmp_path):
    # The one-step student predicts v, but its (noise, image) pairs must be the eps teacher's own
    # samples; a teacher path given as a pathlib.Path must still give a loadable checkpoint.
    from pathlib import Path

    root, teacher_ckpt, _ = teacher
    summary = _distill((root, Path(teacher_ckpt), None), "student", "v_pairs", pairs=8, images=8)
    assert load_model(summary["ckpt"])[2].diffusion.prediction == "v"
    pairs = np.load(root / "models" / "v_pairs" / "pairs.npy")
    model, diffusion, _ = load_model(teacher_ckpt)
    assert diffusion.prediction == "eps"
    den = diffusion.denoiser(model.eval())  # as the task reads it: the config's clipping
    seed = int(np.random.SeedSequence([0, 104729]).generate_state(1)[0] >> 2)
    expected = make_pairs(tmp_path / "p.npy", 8, (3, 8, 8), den, seed, torch.device("cpu"), lambda *a: None)
    np.testing.assert_allclose(pairs, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("objective,teacher_pred,asked,expected", [
    ("vp", "eps", "auto", "v"), ("vp", "x0", "auto", "x0"), ("vp", "v", "auto", "v"), ("vp", "eps", "eps", "eps"),
    ("vp", "v", "x0", "x0"), ("edm", "eps", "auto", "eps"),
])
def test_student_prediction_rule(objective, teacher_pred, asked, expected):
    from ddpmkit.config import Config, DiffusionConfig
    from ddpmkit.distill import student_prediction

    teacher = Config(diffusion=DiffusionConfig(objective=objective, prediction=teacher_pred))
    assert student_prediction(teacher, asked) == expected
    if objective == "edm":
        with pytest.raises(DdpmError, match="EDM model"):
            student_prediction(teacher, "v")


def test_prediction_option_keeps_or_sets_the_students_parameterization(teacher):
    summary = _distill(teacher, "consistency", "keep_eps", steps=1, images=8, prediction="eps")
    assert load_model(summary["ckpt"])[2].diffusion.prediction == "eps"
    with pytest.raises(DdpmError, match="unknown --prediction 'z'"):
        _distill(teacher, "student", "bad_prediction", images=8, prediction="z")


@pytest.mark.parametrize("kw,match", [
    ({"steps": 3, "start_steps_": 8}, "cannot be reached by halving"),
    ({"steps": 2, "start_steps_": 12}, "cannot be reached by halving"),
    ({"steps": 32}, "not below the teacher's 32 steps"),
    ({"steps": 4, "start_steps_": 64}, "the teacher has 32 steps"),
])
def test_impossible_steps_are_one_line_errors(teacher, kw, match):
    with pytest.raises(DdpmError, match=match):
        _distill(teacher, "progressive", "bad", images=8, **kw)


def test_missing_or_wrong_teacher_is_a_one_line_error(teacher, tmp_path, capsys):
    root, _, _ = teacher
    assert main(["distill", "--teacher", str(tmp_path / "none.pt"), "--method", "progressive",
                 "--run-name", "x", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not found" in err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["distill", "--teacher", str(tmp_path / "junk.pt"), "--method", "student",
                 "--run-name", "x", "--workdir", str(tmp_path)]) == 2
    assert "not a PyTorch file" in capsys.readouterr().err
    _distill(teacher, "student", "st_for_teacher", pairs=8, images=8)
    with pytest.raises(DdpmError, match="itself a student model"):
        distill(str(root / "models" / "st_for_teacher" / "ckpt.pt"), "progressive", "x", workdir=str(root),
                images=8, batch_size=8, device="cpu", progress=False, log=lambda *a: None)


# --- units behind the end-to-end runs: the CLI, run setup, the consistency function, pairs, tasks ---

def _distill_parser():
    import argparse

    from ddpmkit.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["distill"]


def test_distill_cli_passes_its_flags_and_defaults_to_distill(monkeypatch, capsys):
    import ddpmkit.distill as distill_pkg

    seen = []
    summary = {"status": "finished", "step": 7, "ckpt": "models/r/ckpt.pt"}
    monkeypatch.setattr(distill_pkg, "distill", lambda *a, **kw: seen.append((a, kw)) or dict(summary))
    assert main(["distill", "--teacher", "t.pt", "--method", "progressive", "--run-name", "r"]) == 0
    assert seen[-1] == (("t.pt", "progressive", "r"), {
        "steps": None, "images": None, "batch_size": None, "lr": None, "device": None, "workdir": ".",
        "pairs": None, "start_steps_": None, "prediction": "auto", "teacher_sampler": None, "teacher_steps": None,
        "progress": True})
    assert "done: 7 steps; student checkpoint models/r/ckpt.pt" in capsys.readouterr().out
    assert main(["distill", "--teacher", "t.pt", "--method", "student", "--run-name", "s", "--steps", "1",
                 "--images", "16", "--pairs", "5", "--start-steps", "8", "--prediction", "x0", "--batch-size", "4",
                 "--lr", "0.001", "--device", "cpu", "--workdir", "w", "--no-progress"]) == 0
    assert seen[-1] == (("t.pt", "student", "s"), {
        "steps": 1, "images": 16, "batch_size": 4, "lr": 0.001, "device": "cpu", "workdir": "w",
        "pairs": 5, "start_steps_": 8, "prediction": "x0", "teacher_sampler": None, "teacher_steps": None,
        "progress": False})
    assert main(["distill", "--teacher", "t.pt", "--method", "sfd", "--run-name", "f", "--teacher-sampler", "heun",
                 "--teacher-steps", "3"]) == 0
    assert (seen[-1][1]["teacher_sampler"], seen[-1][1]["teacher_steps"]) == ("heun", 3)
    assert "done: 7 steps" in capsys.readouterr().out
    summary["status"] = "stopped"  # a stopped run (SIGTERM) has no "done" line
    assert main(["distill", "--teacher", "t.pt", "--method", "consistency", "--run-name", "c"]) == 0
    assert "done:" not in capsys.readouterr().out
    n = len(seen)
    for bad in (["--steps", "0"], ["--images", "0"], ["--pairs", "0"], ["--start-steps", "0"],
                ["--start-steps", "x"], ["--prediction", "z"], ["--batch-size", "0"], ["--teacher-steps", "0"],
                ["--teacher-sampler", "ddpm"]):
        with pytest.raises(SystemExit) as exc:
            main(["distill", "--teacher", "t.pt", "--method", "progressive", "--run-name", "r", *bad])
        assert exc.value.code == 2, bad
    with pytest.raises(SystemExit):
        main(["distill", "--teacher", "t.pt", "--method", "Progressive", "--run-name", "r"])
    assert len(seen) == n  # none of those reached distill


def test_distill_help_describes_every_flag_and_the_defaults_the_code_uses():
    from ddpmkit.distill import DEFAULT_IMAGES, DEFAULT_STEPS, MAX_START_STEPS, PAIR_EPOCHS
    from ddpmkit.distill.sfd import DEFAULT_TEACHER_SAMPLER, DEFAULT_TEACHER_STEPS

    p = _distill_parser()
    flags = {a.option_strings[0]: a for a in p._actions if a.option_strings and a.option_strings[0] != "-h"}
    assert {"--teacher", "--method", "--run-name", "--steps", "--images", "--pairs", "--start-steps",
            "--prediction", "--teacher-sampler", "--teacher-steps"} <= set(flags)
    for name, action in flags.items():
        assert action.help and action.help.strip(), name
    listed = lambda table: ", ".join(f"{m} {n}" for m, n in table.items())
    assert listed(DEFAULT_STEPS) in flags["--steps"].help
    assert listed(DEFAULT_IMAGES) in flags["--images"].help
    assert f"--images / {PAIR_EPOCHS}" in flags["--pairs"].help  # _task's default pair count
    assert f"default {DEFAULT_TEACHER_SAMPLER}" in flags["--teacher-sampler"].help
    assert f"default {DEFAULT_TEACHER_STEPS}" in flags["--teacher-steps"].help
    assert str(MAX_START_STEPS) in flags["--start-steps"].help
    assert "default auto" in flags["--prediction"].help and flags["--prediction"].default == "auto"


def _vp_teacher_config(timesteps=32, method="", steps=0, objective="vp"):
    from ddpmkit.config import Config, DiffusionConfig, DistillConfig

    return Config(diffusion=DiffusionConfig(timesteps=timesteps, objective=objective),
                  distill=DistillConfig(method=method, steps=steps, sampler="progressive" if method else ""))


@pytest.mark.parametrize("timesteps,objective,steps,expected", [
    (32, "vp", 2, 32),      # up to the teacher's T (start == T is allowed)
    (32, "vp", 1, 32), (1000, "vp", 4, 64), (1000, "vp", 3, 48), (16, "vp", 4, 16),
    (1000, "edm", 1, 64),   # a continuous teacher: up to MAX_START_STEPS
])
def test_default_start_steps_is_the_largest_reachable_within_64_and_T(timesteps, objective, steps, expected):
    from ddpmkit.distill import start_steps

    assert start_steps(_vp_teacher_config(timesteps, objective=objective), steps, None) == expected
    assert start_steps(_vp_teacher_config(timesteps, objective=objective), steps, expected) == expected


def test_a_progressive_teacher_is_halved_from_its_own_steps():
    # A progressive student was trained for its own step grid: the next run halves from exactly those
    # steps, never from a smaller power of two of --steps, and no more than those can be asked for.
    from ddpmkit.distill import start_steps

    teacher = _vp_teacher_config(1000, "progressive", 8)
    assert start_steps(teacher, 2, None) == 8 and start_steps(teacher, 4, None) == 8
    with pytest.raises(DdpmError, match=r"cannot be reached by halving the teacher's 6 steps; use one of \[3\]"):
        start_steps(_vp_teacher_config(1000, "progressive", 6), 2, None)
    with pytest.raises(DdpmError, match="the teacher has 8 steps, fewer than the 16 to start from"):
        start_steps(teacher, 2, 16)
    with pytest.raises(DdpmError, match="--steps 8 is not below the teacher's 8 steps"):
        start_steps(teacher, 8, None)


def test_run_config_starts_a_fresh_train_section_from_the_teachers():
    from ddpmkit.distill import _run_config

    teacher = _vp_teacher_config()
    teacher.train = dataclasses.replace(teacher.train, epochs=5, warmup_steps=10, lr_schedule="cosine",
                                        sample_every_epochs=2, eval_every_steps=100, class_cond=True, grad_accum=4,
                                        ckpt_every_steps=50, batch_size=16, seed=3)
    t = _run_config(teacher, "teacher.pt", "consistency", 1, {"run_name": "r", "lr": 1e-4}).train
    assert (t.epochs, t.warmup_steps, t.lr_schedule, t.sample_every_epochs, t.eval_every_steps, t.class_cond,
            t.grad_accum, t.ckpt_every_steps) == (0, 0, "constant", 0, 0, False, 1, 0)
    assert (t.run_name, t.lr, t.batch_size, t.seed) == ("r", 1e-4, 16, 3)  # given, or the teacher's


def test_distill_gives_the_task_its_image_budget_and_the_trainer_its_epochs(teacher, monkeypatch):
    from ddpmkit.distill import DEFAULT_IMAGES

    seen = {}

    def fake_train(cfg, ckpt, log, progress, task):
        seen.update(cfg=cfg, task=task)
        return {"status": "finished"}

    monkeypatch.setattr(train_module, "train", fake_train)
    _distill(teacher, "consistency", "budget", images=40)  # 24 images, batches of 8: 3 steps an epoch
    assert seen["task"].budget == 40 and seen["cfg"].train.epochs == 2 and seen["task"].total_steps == 6
    assert seen["cfg"].train.sample_every_steps == 6 and seen["cfg"].train.lr == 1e-4
    _distill(teacher, "consistency", "budget", lr=3e-4)
    assert seen["task"].budget == DEFAULT_IMAGES["consistency"] and seen["cfg"].train.lr == 3e-4
    _distill(teacher, "progressive", "budget_p", steps=2, start_steps_=8, images=16)
    task = seen["task"]  # two stages of 2 steps (16 images) each: 2 epochs, one grid per stage
    assert (task.budget, task.stages, task.per_stage, seen["cfg"].train.epochs) == (16, 2, 3, 2)
    assert seen["cfg"].train.sample_every_steps == 3


def test_student_method_rejects_more_than_one_step(teacher):
    with pytest.raises(DdpmError, match="one-step students; drop --steps 2"):
        _distill(teacher, "student", "two_steps", steps=2, pairs=8, images=8)


def test_a_run_being_trained_elsewhere_is_a_one_line_error_naming_it(teacher):
    from ddpmkit.runlock import RunLock

    root = teacher[0]
    with RunLock(root / "models" / "busy", "busy"):
        with pytest.raises(DdpmError, match="run 'busy' is being trained by another process"):
            _distill(teacher, "consistency", "busy", images=8)


def test_teacher_weights_are_its_ema_else_its_model_and_conditional_teachers_are_refused(teacher, tmp_path):
    from ddpmkit.distill import _teacher

    path = teacher[1]
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["ema_state_dict"] is not None
    cfg, state = _teacher(path)
    assert all(torch.equal(state[k], ckpt["ema_state_dict"][k]) for k in state)
    no_ema = dict(ckpt, ema_state_dict=None)
    torch.save(no_ema, tmp_path / "no_ema.pt")
    _, state = _teacher(str(tmp_path / "no_ema.pt"))
    assert state.keys() == ckpt["model_state_dict"].keys()
    assert all(torch.equal(state[k], ckpt["model_state_dict"][k]) for k in state)
    cond = dict(ckpt, config={**ckpt["config"], "model": {**ckpt["config"]["model"], "num_classes": 2}})
    torch.save(cond, tmp_path / "cond.pt")
    with pytest.raises(DdpmError, match="cond.pt is class-conditional; ddpm distill takes unconditional"):
        _teacher(str(tmp_path / "cond.pt"))


class ConstNet(torch.nn.Module):
    """A network whose raw output is the fixed tensor `out`, whatever its input."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, t):
        return self.out.to(x.device).expand_as(x)


@pytest.mark.parametrize("kind", ["vp", "edm"])
def test_consistency_function_is_the_boundary_form_of_the_networks_raw_output(kind):
    # f = c_skip x + c_out F with sigma_data = 1 for VP (where a v network's F is -v) and the model's
    # own sigma_data for EDM (F is the network's output), coefficients as in the module docstring.
    g = torch.Generator().manual_seed(0)
    out = torch.randn(4, 1, 2, 2, generator=g)
    if kind == "vp":
        den = Diffusion(img_size=2, channels=1, timesteps=100, prediction="v").denoiser(ConstNet(out), clip=False)
        sd, raw = 1.0, -out
    else:
        den = Diffusion(img_size=2, channels=1, objective="edm").denoiser(ConstNet(out), clip=False)
        sd, raw = den.sigma_data, out
        assert sd != 1
    f = ConsistencyFunction(den)
    x = torch.randn(4, 1, 2, 2, generator=g) * 3
    sigma = torch.tensor([0.3, 1.0, 2.5, 10.0])
    s, smin = sigma.double().view(-1, 1, 1, 1), f.sigma_min
    c_skip = sd**2 / ((s - smin) ** 2 + sd**2)
    c_out = (s - smin) * sd / (s**2 + sd**2).sqrt()
    torch.testing.assert_close(f(x, sigma).double(), c_skip * x.double() + c_out * raw.double(), rtol=1e-5, atol=1e-5)


def test_consistency_function_follows_x_to_its_device_for_a_scalar_sigma():
    class Half(torch.nn.Module):
        def forward(self, x, t):
            return 0.5 * x

    x = torch.zeros(3, 1, 2, 2, device="meta")  # a device other than the CPU, where a float sigma lives
    f = ConsistencyFunction(Diffusion(img_size=2, channels=1, objective="edm").denoiser(Half(), clip=False))
    y = f(x, 0.7)
    assert y.device.type == "meta" and y.shape == x.shape


def test_pseudo_huber_of_one_sample():
    from ddpmkit.distill.consistency import pseudo_huber

    a = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    b = torch.zeros_like(a)
    c = 0.00054 * 48**0.5
    torch.testing.assert_close(pseudo_huber(a, b), ((a**2).sum() + c**2).sqrt().view(1) - c)
    torch.testing.assert_close(pseudo_huber(a, a), torch.zeros(1))


def test_student_loss_is_the_unclipped_one_step_error_to_the_teachers_image():
    # A v network with a constant output: D(sqrt(1 + s^2) z, s) = (z - s v) / sqrt(1 + s^2) at s = sigma_max,
    # far outside [-1, 1] here; the loss must see it unclipped even when the config clips.
    from ddpmkit.config import DiffusionConfig
    from ddpmkit.distill.student import StudentLoss

    g = torch.Generator().manual_seed(0)
    v = torch.full((3, 1, 2, 2), 3.0)
    diffusion = Diffusion.from_config(DiffusionConfig(timesteps=100, prediction="v", clip_denoised=True), 2, 1)
    z, image = torch.randn(3, 1, 2, 2, generator=g), torch.rand(3, 1, 2, 2, generator=g) * 2 - 1
    s = diffusion.denoiser(torch.nn.Identity()).sigma_max
    d = (z.double() - s * v.double()) / (1 + s**2) ** 0.5
    expected = ((d - image.double()) ** 2).flatten(1).mean(1)
    assert d.min() < -2
    loss = StudentLoss(diffusion)(ConstNet(v), torch.cat([z, image], dim=1), {})
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)


class RecordingDenoiser:
    """A denoiser wrapper that records the noise levels it is called at."""

    def __init__(self, base):
        from ddpmkit.diffusion import DenoiserWrapper

        self.inner, self.levels = DenoiserWrapper(base), []
        for name in DenoiserWrapper.SAMPLER_ATTRIBUTES:
            if hasattr(self.inner, name):
                setattr(self, name, getattr(self.inner, name))

    def prior_std(self, sigma_max):
        return self.inner.prior_std(sigma_max)

    def __call__(self, x, sigma):
        self.levels.append(float(torch.as_tensor(sigma).reshape(-1)[0]))
        return self.inner.base(x, sigma)


@pytest.mark.parametrize("kind", ["cosine", "edm"])
def test_pairs_are_the_teachers_dpmpp2m_samples_on_its_karras_grid(kind, tmp_path):
    # The levels are those of `ddpm sample --sampler dpm++2m --steps 20 --spacing karras`: on a cosine
    # schedule (sigma_max ~ 4e3) the discrete model's cap applies; an EDM teacher has no discrete grid.
    from exact_nets import InterpolatingGaussian

    if kind == "cosine":
        diff = Diffusion(img_size=4, channels=1, timesteps=50, schedule="cosine", prediction="eps")
        den = diff.denoiser(torch.nn.Identity())
        den = diff.denoiser(InterpolatingGaussian(den, 0.3, 0.5, "eps"), clip=False)
        assert den.sigma_max > 1000
    else:
        den = Diffusion(img_size=4, channels=1, objective="edm").denoiser(ConstNet(torch.zeros(1)), clip=False)
    rec = RecordingDenoiser(den)
    arr = make_pairs(tmp_path / "p.npy", 3, (1, 4, 4), rec, 7, torch.device("cpu"), lambda *a: None, batch=2)
    assert isinstance(arr, np.memmap) and not arr.flags.writeable  # read from disk, not loaded into memory
    sigmas = samplers.sampler_sigmas(den, "dpm++2m", 20, "karras")
    assert sorted(set(rec.levels), reverse=True) == sigmas[:-1].tolist()
    z = samplers.PerSampleNoise(samplers.sample_seeds(7, range(3)))(torch.empty(3, 1, 4, 4))
    x = samplers.SAMPLERS["dpm++2m"].fn(den, z * den.prior_std(float(sigmas[0])), sigmas).clamp(-1, 1)
    np.testing.assert_array_equal(arr[:, 0], z.numpy())
    np.testing.assert_allclose(arr[:, 1], x.numpy(), rtol=0, atol=1e-6)
    assert 0.1 < np.abs(arr[:, 1]).mean() < 0.7  # images of the teacher's data, not clamped noise


def test_a_pair_file_of_another_size_is_a_one_line_error(tmp_path):
    den = Diffusion(img_size=2, channels=1, objective="edm").denoiser(ConstNet(torch.zeros(1)), clip=False)
    make_pairs(tmp_path / "p.npy", 2, (1, 2, 2), den, 0, torch.device("cpu"), lambda *a: None)
    with pytest.raises(DdpmError, match=r"holds pairs of shape \(2, 2, 1, 2, 2\), not \(3, 2, 1, 2, 2\)"):
        make_pairs(tmp_path / "p.npy", 3, (1, 2, 2), den, 0, torch.device("cpu"), lambda *a: None)


def _tiny_teacher_config(channels=1):
    from ddpmkit.config import Config, DataConfig, DiffusionConfig, ModelConfig

    return Config(model=ModelConfig(**{**TINY, "channel_mults": (1, 2), "attn_levels": ()}),
                  diffusion=DiffusionConfig(timesteps=16), data=DataConfig(image_size=4, channels=channels))


def test_student_task_pairs_have_the_networks_channels_and_a_bad_teacher_is_named(tmp_path):
    from ddpmkit.checkpoint import model_from_config
    from ddpmkit.distill.tasks import StudentTask

    cfg = _tiny_teacher_config(channels=0)  # unresolved: the network's default 3 channels
    state = model_from_config(cfg)[0].state_dict()
    task = StudentTask("t.pt", state, 8, 2, tmp_path / "pairs.npy", cfg)
    assert task.data(cfg, lambda *a: None).images.shape == (2, 2, 3, 4, 4)
    bad = {k: v for k, v in state.items() if not k.endswith("bias")}
    with pytest.raises(DdpmError, match="the teacher weights in t.pt do not match"):
        StudentTask("t.pt", bad, 8, 2, tmp_path / "other.npy", cfg).data(cfg, lambda *a: None)
    with pytest.raises(DdpmError, match="the teacher weights in t.pt do not match"):
        StudentTask("t.pt", bad, 8, 2, tmp_path / "other.npy", cfg).build(cfg, torch.device("cpu"))


def test_student_batches_are_noise_then_image_channels_on_the_given_device():
    from ddpmkit.distill.student import PairData
    from ddpmkit.distill.tasks import StudentTask

    images = np.arange(4 * 2 * 1 * 2 * 2, dtype=np.float32).reshape(4, 2, 1, 2, 2)
    cfg = _tiny_teacher_config()
    cfg.train = dataclasses.replace(cfg.train, batch_size=2)
    task = StudentTask("t.pt", {}, 8, 4, None, cfg)
    batches = list(task.batches(PairData(images, "x"), cfg, 0, 0, 0, 1, torch.device("cpu")))
    assert len(batches) == 2 and batches[0].shape == (2, 2, 2, 2)
    rows = sorted(torch.cat(batches).flatten(1).tolist())
    assert rows == images.reshape(4, -1).tolist()  # every pair once, noise channels first
    meta = next(iter(task.batches(PairData(images, "x"), cfg, 0, 0, 0, 1, torch.device("meta"))))
    assert meta.device.type == "meta"


def test_task_state_round_trips_the_student_pair_count_and_plans_epochs_for_the_budget(tmp_path):
    from ddpmkit.distill import _task

    cfg = _tiny_teacher_config()
    cfg.train = dataclasses.replace(cfg.train, workdir=str(tmp_path), run_name="r")
    task = _task("student", "t.pt", cfg, {}, 24, cfg, None, None, 5, print)
    assert task.extra_state() == {"method": "student", "teacher": "t.pt", "pairs": 5}
    assert task.pairs_path == tmp_path / "models" / "r" / "pairs.npy"
    assert _task("student", "t.pt", cfg, {}, 24, cfg, {"task_state": task.extra_state()}, None, 9, print).pairs == 5
    # By default a few passes over the pairs: 24 images, 5 passes -> 5 pairs; 50,000 -> 10,000.
    assert _task("student", "t.pt", cfg, {}, 24, cfg, None, None, None, print).pairs == 5
    assert _task("student", "t.pt", cfg, {}, 50000, cfg, None, None, None, print).pairs == 10000
    assert [task.plan(n, 8) for n in (3, 2, 1)] == [1, 2, 3]  # ceil(ceil(24 / 8) / n) epochs
    assert _task("student", "t.pt", cfg, {}, 25, cfg, None, None, 5, print).plan(3, 8) == 2


class FakeTrainer:
    """What DistillTask.grid and ProgressiveTask.after_step read of a trainer."""

    def __init__(self, cfg, results, step=0):
        from types import SimpleNamespace

        self.cfg, self.sampled = cfg, []
        self.paths = SimpleNamespace(results=results)
        self.ctx = SimpleNamespace(is_main=False)
        model = torch.nn.Linear(2, 2)
        self.state = SimpleNamespace(step=step, model=model, ema=SimpleNamespace(model=torch.nn.Linear(2, 2)),
                                     opt=torch.optim.SGD(model.parameters(), lr=cfg.train.lr))
        self.diffusion = SimpleNamespace(
            sample=lambda model, n, **kw: self.sampled.append(kw) or torch.zeros(n, 3, 4, 4))

    def _sampling_model(self):
        return None


def test_progressive_grids_use_the_current_stage_steps_and_a_stage_switch_hands_over(tmp_path):
    from ddpmkit.config import DistillConfig
    from ddpmkit.distill.tasks import ProgressiveTask

    cfg = _tiny_teacher_config()
    cfg.distill = DistillConfig(method="progressive", steps=2, sampler="progressive")
    logs = []
    task = ProgressiveTask("t.pt", {}, 16, 8, 2, cfg.diffusion, logs.append)
    task.per_stage, task.teacher, task.run_steps = 3, torch.nn.Linear(2, 2), 6
    trainer = FakeTrainer(cfg, tmp_path, step=2)
    task.grid(trainer, "a")
    assert (trainer.sampled[-1]["sampler"], trainer.sampled[-1]["steps"]) == ("progressive", 4)
    task.after_step(trainer)
    assert task.stage == 0 and logs == []
    trainer.state.step = 3
    task.after_step(trainer)
    assert task.stage == 1 and logs == ["stage 2/2: distilling 4 -> 2 steps"]
    for net in (task.teacher, trainer.state.ema.model):
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                    trainer.state.model.state_dict().values()))
    task.grid(trainer, "b")
    assert trainer.sampled[-1]["steps"] == 2 and (tmp_path / "b.jpg").is_file()


# --- the learning rate: linear to 0 over the run, and within each progressive stage ---------------

def test_lr_factor_is_linear_to_zero_per_stage_and_over_the_run():
    from ddpmkit.distill.tasks import ConsistencyTask, ProgressiveTask

    cfg = _tiny_teacher_config()
    task = ProgressiveTask("t.pt", {}, 16, 8, 2, cfg.diffusion)
    task.per_stage, task.run_steps = 3, 7  # the last stage takes the step that does not divide evenly
    assert [task.lr_factor(k) for k in range(7)] == pytest.approx([1, 2 / 3, 1 / 3, 1, 3 / 4, 2 / 4, 1 / 4])
    assert task.lr_factor(7) == 0  # after the last step
    run = ConsistencyTask("t.pt", {}, 16)
    run.run_steps = 4
    assert [run.lr_factor(k) for k in range(5)] == pytest.approx([1, 3 / 4, 2 / 4, 1 / 4, 0])


def _lr_of_each_step(monkeypatch):
    """The learning rate every AdamW step of this process uses, in order."""
    seen, real = [], torch.optim.AdamW.step

    def step(self, *args, **kw):
        seen.append(self.param_groups[0]["lr"])
        return real(self, *args, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return seen


@pytest.mark.parametrize("method,kw,spans", [
    ("progressive", {"steps": 2, "start_steps_": 8, "images": 24}, [3, 3]),  # two halvings of 3 steps
    ("consistency", {"steps": 1, "images": 24}, [3]),
])
def test_the_learning_rate_decays_to_zero_at_the_end_of_each_stage(teacher, monkeypatch, method, kw, spans):
    seen = _lr_of_each_step(monkeypatch)
    summary = _distill(teacher, method, f"lr_{method}", lr=3e-4, **kw)
    expected = [3e-4 * (1 - k / n) for n in spans for k in range(n)]  # last step of a stage: lr / n
    assert seen == pytest.approx(expected, rel=1e-9)
    ckpt = torch.load(summary["ckpt"], weights_only=True)
    assert ckpt["optimizer_state_dict"]["param_groups"][0]["lr"] == 0  # the end of the last stage
