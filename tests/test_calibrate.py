"""Calibrated step schedules (GITS): the search, its costs, the stored file and the CLI around them."""
import dataclasses
import itertools
import json
import math
import re

import numpy as np
import pytest
import torch

from ddpmkit import calibrate, samplers
from ddpmkit.cli import main
from ddpmkit.errors import DdpmError
from test_samplers import ExactDenoiser, TangentGaussian


def brute_force(cost, steps):
    last = len(cost) - 1
    paths = ([0, *mid, last] for mid in itertools.combinations(range(1, last), steps - 1))
    return min((calibrate.path_cost(cost, p), p) for p in paths)


def test_dynamic_program_finds_the_cheapest_path_of_each_length():
    rng = np.random.default_rng(0)
    for trial in range(20):
        cost = np.triu(rng.exponential(size=(9, 9)), k=1)
        cost[np.tril_indices(9)] = np.inf
        for steps in range(1, 9):
            path, total = calibrate.best_path(cost, steps)
            want, want_path = brute_force(cost, steps)
            assert len(path) == steps + 1 and path[0] == 0 and path[-1] == 8
            assert total == pytest.approx(want) and calibrate.path_cost(cost, path) == pytest.approx(want)
            assert path == want_path or total == pytest.approx(calibrate.path_cost(cost, want_path))
    # a toy with a known optimum: a convex cost of the step length is least for equal steps
    g = np.arange(13.0)
    cost = np.where(g[None, :] > g[:, None], (g[None, :] - g[:, None]) ** 2, np.inf)
    assert calibrate.best_path(cost, 4) == ([0, 3, 6, 9, 12], 4 * 9.0)
    with pytest.raises(DdpmError, match=r"^cannot place 13 steps on 13 candidate levels; use 1\.\.12 steps$"):
        calibrate.best_path(cost, 13)


def test_step_costs_are_the_rms_error_of_a_ddim_step_between_stored_states():
    # The costs come from inner products only; compare them with the errors of explicit DDIM steps.
    gen = torch.Generator().manual_seed(0)
    levels = torch.tensor([9.0, 3.0, 1.2, 0.4, 0.0], dtype=torch.float64)
    xs = torch.randn(5, 60, generator=gen, dtype=torch.float64) * levels.clamp(min=0.3)[:, None]
    ds = torch.randn(4, 60, generator=gen, dtype=torch.float64) * 0.5
    v = torch.cat([xs, ds])
    for std in (None, 0.7):
        cost = calibrate.step_costs((v @ v.T).numpy(), 60, levels, std)
        for i, j in itertools.combinations(range(5), 2):
            r = float(levels[j] / levels[i])
            err = xs[j] - (ds[i] + r * (xs[i] - ds[i]))       # DDIM: D_i + (s_j / s_i)(x_i - D_i)
            want = err.square().mean().sqrt().item()
            if std is not None:
                want *= std / math.sqrt(std**2 + float(levels[j]) ** 2)
            assert cost[i, j] == pytest.approx(want, rel=1e-9), (i, j, std)
        assert np.isinf(cost[np.tril_indices(5)]).all()


def test_teacher_gram_holds_the_states_and_estimates_at_the_candidate_levels():
    den = ExactDenoiser("gauss")
    levels = calibrate.candidate_levels(den, 6)
    gram, count, std = calibrate.trajectory_gram(den, levels, (2, 1, 1), 10, seed=3, substeps=3, batch_size=4)
    # the same teacher by hand: DPM-Solver++(2M) on the refined levels, from the per-sample seeded noise
    fine = calibrate.refine(levels, 3)
    assert len(fine) == 3 * 5 + 2 and torch.equal(fine[::3], levels[:-1]) and fine[-1] == 0
    x = samplers.PerSampleNoise(samplers.sample_seeds(3, range(10)))(torch.empty(10, 2, 1, 1)) * den.prior_std(
        float(levels[0]))
    seen = {}
    out = samplers.sample_dpmpp_2m(den, x, fine.float(), callback=lambda i, s, state, d: seen.setdefault(i, (state, d)))
    v = torch.stack([seen[3 * m][0].flatten() for m in range(6)] + [out.flatten()]
                    + [seen[3 * m][1].flatten() for m in range(6)]).double()
    np.testing.assert_allclose(gram, (v @ v.T).numpy(), rtol=1e-5, atol=1e-4)
    assert count == 20 and std == pytest.approx(out.double().std(unbiased=False).item(), rel=1e-5)


def exact_error(sampler, sigmas, schedule="linear"):
    """Max error of the output's mean and covariance for the Gaussian data, exactly (TangentGaussian)."""
    den = TangentGaussian("gauss", schedule)
    x = torch.zeros(3, 2, 1, 1, dtype=torch.float64)
    x[1:, :, 0, 0] = torch.eye(2, dtype=torch.float64) * den.prior_std(float(sigmas[0]))
    out = samplers.SAMPLERS[sampler].fn(den, x, sigmas.double()).flatten(1)
    return max((out[1:].T @ out[1:] - den.cov).abs().max().item(), (out[0] - den.mu).abs().max().item())


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_calibrated_levels_beat_karras_and_trailing_on_gaussian_data(schedule):
    den = ExactDenoiser("gauss", schedule)
    results = calibrate.calibrate(den, (2, 1, 1), [3, 4, 6, 8], ["ddim"], n=64, batch_size=64)
    assert list(results) == ["ddim"]
    for nfe, r in results["ddim"].items():
        sigmas = r["sigmas"]
        assert len(sigmas) == nfe + 1 and sigmas[-1] == 0 and sigmas[0] == pytest.approx(min(den.sigma_max, 160))
        assert r["cost"] < min(r["compare"].values())  # the search's own objective
        for sampler in ("ddim", "ipndm"):  # the cost's own step, and the multistep solver GITS pairs it with
            cal = exact_error(sampler, sigmas, schedule)
            for spacing in ("karras", "trailing"):
                other = exact_error(sampler, samplers.sampler_sigmas(den, sampler, nfe, spacing), schedule)
                assert cal <= other, (schedule, nfe, sampler, spacing, cal, other)


def _checkpoint(path, timesteps=20):
    from ddpmkit.checkpoint import model_from_config
    from ddpmkit.config import Config, DataConfig, DiffusionConfig, ModelConfig

    cfg = Config(model=ModelConfig(size="custom", base_channels=8, channel_mults=(1, 2), attn_levels=(), time_dim=16),
                 diffusion=DiffusionConfig(timesteps=timesteps), data=DataConfig(image_size=4, channels=1))
    torch.manual_seed(0)
    state = model_from_config(cfg)[0].state_dict()
    torch.save({"format_version": 1, "config": cfg.to_dict(), "model_state_dict": state}, path)
    return path


def _result(*levels):
    return {"sigmas": torch.tensor(levels), "cost": 0.5, "compare": {"karras": 1.0}}


def test_schedules_file_round_trips_and_refuses_another_checkpoint(tmp_path):
    a, b = _checkpoint(tmp_path / "ckpt.pt"), _checkpoint(tmp_path / "steps4.pt", timesteps=30)
    file = calibrate.save_schedules(a, {"ipndm": {4: _result(80.0, 2.0, 0.5, 0.1, 0.0)}}, {"samples": 8})
    calibrate.save_schedules(a, {"ipndm": {3: _result(80.0, 1.0, 0.2, 0.0)}, "heun": {5: _result(80.0, 1.0, 0.2, 0.0)}},
                             {"samples": 8})
    calibrate.save_schedules(b, {"ipndm": {4: _result(60.0, 3.0, 0.7, 0.2, 0.0)}}, {"samples": 8})
    assert file == tmp_path / "schedules.json" and not list(tmp_path.glob(".*tmp*"))
    assert calibrate.load_schedule(a, "ipndm", 4).tolist() == pytest.approx([80.0, 2.0, 0.5, 0.1, 0.0])
    assert calibrate.load_schedule(a, "ipndm", 3).tolist() == pytest.approx([80.0, 1.0, 0.2, 0.0])
    assert calibrate.load_schedule(a, "heun", 5).tolist() == pytest.approx([80.0, 1.0, 0.2, 0.0])
    assert calibrate.load_schedule(b, "ipndm", 4).tolist() == pytest.approx([60.0, 3.0, 0.7, 0.2, 0.0])
    assert calibrate.load_schedule(a, "ipndm", 6) is None and calibrate.load_schedule(a, "ddim", 4) is None
    stored = json.loads(file.read_text())["checkpoints"]["ckpt.pt"]
    assert stored["sha256"] == calibrate.checkpoint_identity(a) and stored["schedules"]["ipndm"]["4"]["samples"] == 8
    # the checkpoint changes (training went on): its stored schedules are refused, in one line
    _checkpoint(a, timesteps=25)
    message = (f"{file} was calibrated for another version of ckpt.pt; run `ddpm calibrate --ckpt {a} --nfe 4` again")
    with pytest.raises(DdpmError, match="^" + re.escape(message) + "$"):
        calibrate.load_schedule(a, "ipndm", 4)
    assert calibrate.load_schedule(b, "ipndm", 4) is not None  # the other checkpoint's entry still holds
    calibrate.save_schedules(a, {"ipndm": {6: _result(80.0, 5.0, 2.0, 1.0, 0.5, 0.2, 0.0)}}, {})
    assert calibrate.load_schedule(a, "ipndm", 4) is None  # a new calibration drops the stale entries
    assert len(calibrate.load_schedule(a, "ipndm", 6)) == 7
    file.write_text("{not json")
    with pytest.raises(DdpmError, match=r"^cannot read .*schedules\.json: .*; delete it and run `ddpm calibrate` again$"):
        calibrate.load_schedule(a, "ipndm", 6)


def test_default_schedule_is_used_announced_or_skipped(tmp_path):
    from ddpmkit.checkpoint import config_of, load_checkpoint

    path = _checkpoint(tmp_path / "ckpt.pt")
    cfg = config_of(load_checkpoint(path))
    said = []
    assert calibrate.default_schedule(path, "ipndm", 4, cfg, said.append) is None and said == []  # no file
    calibrate.save_schedules(path, {"ipndm": {4: _result(80.0, 2.0, 0.5, 0.1, 0.0),
                                              20: _result(*torch.linspace(80, 0.1, 20).tolist(), 0.0)}}, {})
    assert calibrate.default_schedule(path, "ipndm", 4, cfg, said.append).tolist() == pytest.approx(
        [80.0, 2.0, 0.5, 0.1, 0.0])
    assert said == [f"sampling on the calibrated 4-NFE schedule of ipndm in {tmp_path / 'schedules.json'} "
                    "(--spacing overrides)"]
    assert len(calibrate.default_schedule(path, "ipndm", None, cfg, said.append)) == 21  # ipndm's default 20 steps
    for sampler, steps in (("ipndm", 5), ("ddim", 4), ("ddpm", 4), ("dpm++2m-sde", 4)):
        assert calibrate.default_schedule(path, sampler, steps, cfg, said.append) is None
    said.clear()
    _checkpoint(path, timesteps=25)  # another version of the checkpoint: a warning, then the sampler's own spacing
    assert calibrate.default_schedule(path, "ipndm", 4, cfg, said.append) is None
    assert len(said) == 1 and said[0].startswith("warning: ") and said[0].endswith("; sampling with the default spacing")


def test_explicit_levels_are_checked():
    den = ExactDenoiser("gauss")
    levels = torch.tensor([50.0, 2.0, 0.3, 0.0])
    assert torch.equal(samplers.sampler_sigmas(den, "ipndm", 3, levels), levels)
    assert torch.equal(samplers.sampler_sigmas(den, "ipndm", None, levels), levels)
    with pytest.raises(DdpmError, match=r"^this schedule has 3 steps, not 4; drop --steps or calibrate for 4 steps$"):
        samplers.sampler_sigmas(den, "ipndm", 4, levels)
    for bad in ([50.0, 2.0, 0.3], [2.0, 50.0, 0.0], [50.0, 2.0, 2.0, 0.0], [float("nan"), 1.0, 0.0], [0.0]):
        with pytest.raises(DdpmError, match="^a schedule must be strictly descending noise levels ending with 0"):
            samplers.sampler_sigmas(den, "ipndm", None, torch.tensor(bad))


def _run(capsys, *argv):
    try:
        rc = main(list(argv))
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("argv,message", [
    (["--nfe", "4", "--sampler", "heun"], "--nfe 4 is not a model-call count of heun; use an odd number "
                                          "(Heun makes 2*steps-1 calls)"),
    (["--nfe", "0"], "argument --nfe: model-call counts must be >= 1, got '0' (see `ddpm calibrate --help`)"),
    (["--nfe", "six"], "argument --nfe: expects whole numbers separated by commas, e.g. 6,8; got 'six' "
                       "(see `ddpm calibrate --help`)"),
    (["--nfe", "4", "--sampler", "ipndm,ddpm"], "cannot calibrate sampler 'ddpm'; choose one of "
                                                "ddim, euler, heun, dpm++2m, dpm++3m, ipndm"),
    (["--nfe", "3,4", "--sampler", "ipndm,heun"], "--nfe 4 is not a model-call count of heun; use an odd number "
                                                  "(Heun makes 2*steps-1 calls)"),
    (["--nfe", "101"], "--nfe 101 needs 101 steps, more than the 100 candidate levels; use fewer"),
    (["--nfe", "4", "-n", "1"], "calibration needs at least 2 samples, got -n 1"),
])
def test_bad_calibrate_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
    rc, out, err = _run(capsys, "calibrate", "--ckpt", str(_checkpoint(tmp_path / "ckpt.pt")), *argv, "--no-progress")
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert err == f"ddpm: error: {message}\n"
    assert not (tmp_path / "schedules.json").exists()


def test_calibrate_then_sample_and_eval_use_the_stored_levels(tmp_path, capsys, monkeypatch):
    path = str(_checkpoint(tmp_path / "ckpt.pt"))
    rc, out, err = _run(capsys, "calibrate", "--ckpt", path, "--nfe", "3,4", "-n", "6", "--levels", "12",
                        "--no-progress", "--device", "cpu")
    assert rc == 0, err
    assert "  3 NFE (ddim, euler, dpm++2m, dpm++3m, ipndm): sigmas " in out and "  3 NFE (heun): sigmas " in out
    assert "  4 NFE (ddim, euler, dpm++2m, dpm++3m, ipndm): sigmas " in out and "4 NFE (heun)" not in out
    assert out.endswith(f"wrote {tmp_path / 'schedules.json'}\n")
    stored = calibrate.load_schedule(path, "ipndm", 3)
    assert len(stored) == 4 and stored[-1] == 0 and torch.equal(calibrate.load_schedule(path, "dpm++2m", 3), stored)
    assert len(calibrate.load_schedule(path, "heun", 3)) == 3 and calibrate.load_schedule(path, "heun", 4) is None
    used = []
    spec = samplers.SAMPLERS["ipndm"]

    def recording(den, x, sigmas, **kw):
        used.append(sigmas.cpu())
        return spec.fn(den, x, sigmas, **kw)

    monkeypatch.setitem(samplers.SAMPLERS, "ipndm", dataclasses.replace(spec, fn=recording))
    common = ["--ckpt", path, "--sampler", "ipndm", "--steps", "3", "--no-progress", "--device", "cpu"]
    rc, out, err = _run(capsys, "sample", *common, "-n", "2", "--out", str(tmp_path / "a.png"))
    assert rc == 0, err
    assert out.startswith(f"sampling on the calibrated 3-NFE schedule of ipndm in {tmp_path / 'schedules.json'}")
    assert torch.equal(used.pop(), stored)
    rc, out, err = _run(capsys, "sample", *common, "-n", "2", "--out", str(tmp_path / "a.png"), "--spacing", "karras")
    assert rc == 0 and "calibrated" not in out and not torch.equal(used.pop(), stored)

    from ddpmkit import scoring  # eval: stop after sampling's arguments are known

    seen = {}
    monkeypatch.setattr(scoring, "make_extractor", lambda *a, **k: None)
    monkeypatch.setattr(scoring, "reference_stats", lambda *a, **k: {"path": None})
    monkeypatch.setattr(scoring, "sample_features", lambda *a, **k: seen.update(k) or (_ for _ in ()).throw(
        DdpmError("stopped")))
    rc, out, err = _run(capsys, "eval", *common, "--ref", "builtin:digits", "-n", "2")
    assert rc == 2 and err == "ddpm: error: stopped\n" and torch.equal(seen["spacing"], stored)
    _checkpoint(path, timesteps=25)  # retrained: the stale schedule is announced and skipped
    rc, out, err = _run(capsys, "sample", *common, "-n", "2", "--out", str(tmp_path / "a.png"))
    assert rc == 0 and out.startswith(f"warning: {tmp_path / 'schedules.json'} was calibrated for another version")
    assert not torch.equal(used.pop(), stored)
