"""ddpm distill: the progressive target, the consistency boundary condition, the pair file, and
each method end to end on a tiny teacher (sample, export, eval from the student), with resume."""
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
    assert seen == {"sampler": "ddpm", "steps": 3}  # an ordinary checkpoint: unchanged


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
