"""Calibrated step schedules: the N noise levels of a few-step ODE sampler, searched per model.

GITS, Chen et al. (2024), "On the Trajectory Regularity of ODE-based Diffusion Sampling" (ICML):
the sampling trajectories of a diffusion model are regular enough that one schedule, found by
dynamic programming on a few hundred of them, serves every sample. The search has three parts.

1. Candidates. `levels` noise levels of Eq. (5) of Karras et al. (2022) (rho = 7) from the
   sampler's top level to sigma_min, then 0: g_0 > g_1 > ... > g_M = 0.
2. Teacher. `n` trajectories of the probability-flow ODE through every candidate, solved by
   DPM-Solver++(2M) with `substeps` steps per candidate interval; at each g_m the state x_m and the
   denoiser's estimate D_m = D(x_m, g_m) are kept (D_m costs nothing extra: the teacher evaluates it).
3. Dynamic programming. One cheap step from the teacher's state at g_i to g_j (DDIM, which in these
   coordinates is Euler on dx/dsigma = (x - D) / sigma: x_j' = D_i + (g_j / g_i)(x_i - D_i)) has the
   local error e_ij = x_j - x_j'. Its cost is the root-mean-square of e_ij over the n samples,
   scaled by w_j = s / sqrt(s^2 + g_j^2): the factor by which the exact flow of Gaussian data with
   standard deviation s, x(0) = x(sigma) s / sqrt(s^2 + sigma^2), shrinks an error made at g_j on
   its way to sigma = 0 (s: the teacher samples' standard deviation). Unweighted, an error at
   sigma ~ 100 counts ~200 times too much: on the digits model of benchmarks/bench_solvers.py
   (n = 500, paired) iPNDM scored FD 36.6 / 30.2 / 28.2 at 4 / 6 / 8 NFE on the weighted cost's
   levels and 75.6 / 42.5 / 30.6 on the unweighted's (DPM-Solver++(2M): 40.6 / 33.4 / 29.2 and
   103 / 49.9 / 31.4).
   Bellman's recursion over (steps taken, candidate reached) then finds the path
   g_0 -> ... -> g_M of exactly N steps with the least summed cost.

The path's first N levels are where the N model calls happen; its last step ends at 0 (DDIM's
step to 0 returns D). Any of the deterministic samplers then runs on those levels (GITS pairs them
with iPNDM); a sampler of 2 calls per step (Heun) gets (NFE + 1) / 2 steps. GITS's own code
searches the 61 levels of an iPNDM teacher and uses another cost; the grid, teacher and cost here
are this module's choices.

The costs only need inner products of the kept states, so each batch of trajectories adds its Gram
matrix of [x_0 .. x_M, D_0 .. D_{M-1}] and is then dropped: memory is one batch of trajectories.

`ddpm calibrate` stores the result in `schedules.json` beside the checkpoint, under the
checkpoint's file name and SHA-256, keyed by sampler and NFE; `ddpm sample` and `ddpm eval` use a
stored schedule when no --spacing is given.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import samplers, schedules
from .errors import DdpmError

DEFAULT_LEVELS = 100      # candidate levels (GITS's reference code: 61)
DEFAULT_SAMPLES = 256     # teacher trajectories, as GITS's reference code
DEFAULT_SUBSTEPS = 2      # teacher DPM-Solver++(2M) steps per candidate interval
SCHEDULES_FILE = "schedules.json"
FILE_FORMAT = 1
# The deterministic ODE samplers a schedule is calibrated for (the others have no single trajectory).
CALIBRATED_SAMPLERS = ("ddim", "euler", "heun", "dpm++2m", "dpm++3m", "ipndm")


def nfe_to_steps(sampler: str, nfe: int) -> int:
    """Steps of `sampler` that make exactly `nfe` model calls, or a one-line DdpmError."""
    if sampler not in CALIBRATED_SAMPLERS:
        raise DdpmError(f"cannot calibrate sampler '{sampler}'; choose one of {', '.join(CALIBRATED_SAMPLERS)}")
    steps = next((s for s in range(1, nfe + 1) if samplers.nfe(sampler, s) == nfe), None) if nfe >= 1 else None
    if steps is None:
        raise DdpmError(f"--nfe {nfe} is not a model-call count of {sampler}; " +
                        ("use an odd number (Heun makes 2*steps-1 calls)" if sampler == "heun" and nfe >= 1
                         else "use a positive whole number"))
    return steps


def candidate_levels(denoiser, count: int = DEFAULT_LEVELS) -> torch.Tensor:
    """`count` Karras et al. (2022) Eq. (5) levels from the karras spacing's top (capped on a
    discrete model) to sigma_min, then 0: float64, descending."""
    if count < 2:
        raise DdpmError(f"candidate levels must be >= 2, got {count}")
    lo, hi = samplers.karras_range(getattr(denoiser, "discrete_sigmas", None), getattr(denoiser, "sigma_min", None),
                                   getattr(denoiser, "sigma_max", None))
    return torch.cat([schedules.karras_sigmas(count, lo, hi), torch.zeros(1, dtype=torch.float64)])


def refine(levels: torch.Tensor, substeps: int) -> torch.Tensor:
    """`levels` with substeps - 1 geometric means inserted in each interval between positive levels; the
    step to 0 stays one step. Every `substeps`-th entry of the result is an entry of `levels`."""
    pos = levels[levels > 0].double()
    fine = [pos[:1]]
    frac = torch.arange(1, substeps, dtype=torch.float64) / substeps
    for a, b in zip(pos[:-1], pos[1:]):
        fine += [torch.exp(torch.log(a) + frac * (torch.log(b) - torch.log(a))), b.view(1)]
    return torch.cat(fine + [levels.new_zeros(1).double()] * int(levels[-1] == 0))


@torch.no_grad()
def trajectory_gram(denoiser, levels: torch.Tensor, shape: Sequence[int], n: int = DEFAULT_SAMPLES, *, seed: int = 0,
                    substeps: int = DEFAULT_SUBSTEPS, batch_size: int = 64, device="cpu",
                    progress: bool = False) -> tuple[np.ndarray, int, float]:
    """Teacher trajectories through `levels` (descending, ending with 0); returns (G, count, std):
    G the summed Gram matrix of the flattened vectors [x_0 .. x_M, D_0 .. D_{M-1}] (x_M the
    teacher's sample at 0), count the number of scalars each vector holds over all n samples, std the
    samples' standard deviation. Sample k's start noise is seeded by (seed, k), as `samplers.run`."""
    M = len(levels) - 1
    fine = refine(levels, substeps)
    gram = np.zeros((2 * M + 1, 2 * M + 1))
    total, sq, count = 0.0, 0.0, 0
    bar = tqdm(total=n, desc="teacher trajectories", unit="traj", disable=not progress, leave=False)
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        noise = samplers.PerSampleNoise(samplers.sample_seeds(seed, range(start, start + b)))
        x = noise(torch.empty((b, *shape), device=device)) * denoiser.prior_std(float(fine[0]))
        xs, ds = [None] * M, [None] * M

        def keep(i, sigma, state, denoised):
            if i % substeps == 0:  # a candidate level
                xs[i // substeps], ds[i // substeps] = state.flatten(), denoised.flatten()

        out = samplers.sample_dpmpp_2m(denoiser, x, fine.to(device=device, dtype=torch.float32), callback=keep)
        vectors = torch.stack(xs + [out.flatten()] + ds).double().cpu()
        gram += (vectors @ vectors.T).numpy()
        count += out.numel()
        total, sq = total + out.double().sum().item(), sq + out.double().square().sum().item()
        bar.update(b)
    bar.close()
    mean = total / count
    return gram, count, math.sqrt(max(sq / count - mean**2, 0.0))


def step_costs(gram: np.ndarray, count: int, levels: torch.Tensor, data_std: float | None) -> np.ndarray:
    """cost[i, j] (i < j; inf elsewhere): the weighted RMS local error of one DDIM step from the
    teacher's state at levels[i] to levels[j], from `trajectory_gram`'s Gram matrix (module docstring).
    data_std None: unweighted."""
    M = len(levels) - 1
    g = levels.double().numpy()
    i, j = np.triu_indices(M + 1, k=1)
    r = g[j] / g[i]                          # x_j' = r x_i + (1 - r) D_i
    xi, xj, di = i, j, M + 1 + i
    err2 = (gram[xj, xj] + r**2 * gram[xi, xi] + (1 - r) ** 2 * gram[di, di]
            - 2 * r * gram[xj, xi] - 2 * (1 - r) * gram[xj, di] + 2 * r * (1 - r) * gram[xi, di])
    rms = np.sqrt(np.maximum(err2, 0.0) / count)
    if data_std is not None:
        rms = rms * data_std / np.sqrt(data_std**2 + g[j] ** 2)
    cost = np.full((M + 1, M + 1), np.inf)
    cost[i, j] = rms
    return cost


def best_path(cost: np.ndarray, steps: int) -> tuple[list[int], float]:
    """The path 0 = k_0 < k_1 < ... < k_steps = last index of `cost` with the least sum of
    cost[k_n, k_n+1], by dynamic programming over (steps taken, index reached); returns (path, its cost)."""
    last = len(cost) - 1
    if not 1 <= steps <= last:
        raise DdpmError(f"cannot place {steps} steps on {last + 1} candidate levels; use 1..{last} steps")
    best = np.full(last + 1, np.inf)
    best[0] = 0.0
    parents = []
    for _ in range(steps):
        total = best[:, None] + cost          # total[i, j]: reach i, then step i -> j
        parent = np.argmin(total, axis=0)
        best = total[parent, np.arange(last + 1)]
        parents.append(parent)
    path = [last]
    for parent in reversed(parents):
        path.append(int(parent[path[-1]]))
    return path[::-1], float(best[last])


def path_cost(cost: np.ndarray, path: Sequence[int]) -> float:
    return float(sum(cost[a, b] for a, b in zip(path[:-1], path[1:])))


def nearest_path(levels: torch.Tensor, sigmas: torch.Tensor) -> list[int]:
    """Indices of the candidates nearest (in log sigma) to `sigmas` (0 maps to the final 0), ascending, each once."""
    pos = torch.log(levels[:-1].double())
    path = [len(levels) - 1 if float(s) == 0 else int((pos - math.log(float(s))).abs().argmin()) for s in sigmas]
    return sorted(set(path))  # levels above the top candidate all map to it


def calibration_costs(denoiser, shape: Sequence[int], *, n: int = DEFAULT_SAMPLES, levels: int = DEFAULT_LEVELS,
                      substeps: int = DEFAULT_SUBSTEPS, seed: int = 0, batch_size: int = 64, device="cpu",
                      weighted: bool = True, progress: bool = False) -> tuple[torch.Tensor, np.ndarray]:
    """(candidate levels, step cost matrix) of `denoiser`: the teacher run and the costs of the module
    docstring; `schedule` then finds the best path of any length on them."""
    if n < 2:
        raise DdpmError(f"calibration needs at least 2 samples, got -n {n}")
    if substeps < 1:
        raise DdpmError(f"teacher substeps must be >= 1, got {substeps}")
    cand = candidate_levels(denoiser, levels)
    gram, count, data_std = trajectory_gram(denoiser, cand, shape, n, seed=seed, substeps=substeps,
                                            batch_size=batch_size, device=device, progress=progress)
    return cand, step_costs(gram, count, cand, data_std if weighted else None)


def schedule(cand: torch.Tensor, cost: np.ndarray, steps: int) -> tuple[torch.Tensor, float]:
    """The `steps`-step levels (ending with 0) of least summed cost, and that cost."""
    path, total = best_path(cost, steps)
    return cand[path].float(), total


def calibration_plan(nfes: Sequence[int], names: Sequence[str] | None = None) -> dict[str, dict[int, int]]:
    """{sampler: {nfe: steps}} to calibrate. `names` None: every sampler of CALIBRATED_SAMPLERS that can
    make each NFE (Heun only odd ones); named samplers must make every one (else a one-line DdpmError)."""
    if names is not None:
        return {name: {nfe: nfe_to_steps(name, nfe) for nfe in nfes} for name in names}
    plan = {}
    for name in CALIBRATED_SAMPLERS:
        valid = {nfe: steps for nfe in nfes if (steps := _steps_or_none(name, nfe)) is not None}
        if valid:
            plan[name] = valid
    return plan


def _steps_or_none(sampler: str, nfe: int) -> int | None:
    try:
        return nfe_to_steps(sampler, nfe)
    except DdpmError:
        return None


def calibrate(denoiser, shape: Sequence[int], nfes: Sequence[int], names: Sequence[str] | None = None, *,
              n: int = DEFAULT_SAMPLES, levels: int = DEFAULT_LEVELS, substeps: int = DEFAULT_SUBSTEPS,
              seed: int = 0, batch_size: int = 64, device="cpu", weighted: bool = True,
              progress: bool = False) -> dict[str, dict[int, dict]]:
    """Calibrated levels on `denoiser` for each of `nfes` and each sampler of `names` (None: every
    one that can make that NFE, see `calibration_plan`): {sampler: {nfe: {"sigmas": levels ending
    with 0, "cost": the path's summed cost, "compare": {spacing: the summed cost of that spacing's
    levels, each moved to its nearest candidate}}}}. The step cost is the same for every sampler, so
    samplers of one call per step share the levels of an NFE; Heun gets (NFE + 1) / 2 steps."""
    plan = calibration_plan(nfes, names)
    for table in plan.values():
        for nfe, k in table.items():
            if k > levels:
                raise DdpmError(f"--nfe {nfe} needs {k} steps, more than the {levels} candidate levels; use fewer")
    cand, cost = calibration_costs(denoiser, shape, n=n, levels=levels, substeps=substeps, seed=seed,
                                   batch_size=batch_size, device=device, weighted=weighted, progress=progress)
    spacings = ("karras", "trailing") if getattr(denoiser, "discrete_sigmas", None) is not None else ("karras",)
    found: dict[int, dict] = {}  # by steps
    for k in sorted({k for table in plan.values() for k in table.values()}):
        sigmas, total = schedule(cand, cost, k)
        compare = {sp: path_cost(cost, nearest_path(cand, samplers.make_sigmas(
            getattr(denoiser, "discrete_sigmas", None), k, sp, getattr(denoiser, "sigma_min", None),
            getattr(denoiser, "sigma_max", None)))) for sp in spacings}
        found[k] = {"sigmas": sigmas, "cost": total, "compare": compare}
    return {name: {nfe: found[k] for nfe, k in table.items()} for name, table in plan.items()}


# --------------------------------------------------------------------------- the stored file


def checkpoint_identity(path: str | Path) -> str:
    """SHA-256 of the checkpoint file: a schedule belongs to these exact weights."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def schedules_path(ckpt: str | Path) -> Path:
    return Path(ckpt).parent / SCHEDULES_FILE


def _read(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise DdpmError(f"cannot read {file}: {exc}; delete it and run `ddpm calibrate` again") from None
    if not isinstance(data, dict) or data.get("format") != FILE_FORMAT or not isinstance(data.get("checkpoints"), dict):
        raise DdpmError(f"{file} is not a ddpmkit schedules file (format {FILE_FORMAT}); delete it and run "
                        "`ddpm calibrate` again")
    return data


def save_schedules(ckpt: str | Path, results: dict[str, dict[int, dict]], settings: dict) -> Path:
    """Merge `results` (from `calibrate`: {sampler: {nfe: result}}) into schedules.json beside `ckpt`,
    under its file name and SHA-256 (entries stored for an older version of that file are dropped);
    written atomically."""
    ckpt = Path(ckpt)
    file = schedules_path(ckpt)
    data = _read(file) if file.exists() else {"format": FILE_FORMAT, "checkpoints": {}}
    identity = checkpoint_identity(ckpt)
    entry = data["checkpoints"].get(ckpt.name)
    if not isinstance(entry, dict) or entry.get("sha256") != identity:
        entry = {"sha256": identity, "schedules": {}}
    for sampler, table in results.items():
        stored = entry["schedules"].setdefault(sampler, {})
        for nfe, result in table.items():
            stored[str(nfe)] = {"sigmas": [float(s) for s in result["sigmas"]], "cost": result["cost"],
                                "compare": result["compare"], **settings}
    data["checkpoints"][ckpt.name] = entry
    tmp = file.with_name(f".{file.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)
    return file


def load_schedule(ckpt: str | Path, sampler: str, nfe: int) -> torch.Tensor | None:
    """The levels calibrated for `sampler` at `nfe` calls on this checkpoint, or None if none is stored.
    A schedules.json entry made for another version of the checkpoint is a one-line DdpmError."""
    ckpt = Path(ckpt)
    file = schedules_path(ckpt)
    if not file.is_file():
        return None
    entry = _read(file)["checkpoints"].get(ckpt.name)
    stored = None if entry is None else entry.get("schedules", {}).get(sampler, {}).get(str(nfe))
    if stored is None:
        return None
    # Hashed only when a schedule is stored: `ddpm sample` calls this on every run, and a large
    # checkpoint takes a while to read.
    if entry.get("sha256") != checkpoint_identity(ckpt):
        raise DdpmError(f"{file} was calibrated for another version of {ckpt.name}; run `ddpm calibrate --ckpt "
                        f"{ckpt} --nfe {nfe}` again")
    return torch.tensor(stored["sigmas"], dtype=torch.float32)


def default_schedule(ckpt: str | Path | None, sampler: str, steps: int | None, cfg,
                     log: Callable[[str], None] = print) -> torch.Tensor | None:
    """For `ddpm sample` / `ddpm eval` without --spacing: the stored schedule of `sampler` at these
    steps' NFE for checkpoint `ckpt` (whose config is `cfg`), announced through `log`, or None (none
    stored; or stored for an older version of the checkpoint, which `log` reports): then the
    sampler's own spacing applies."""
    if ckpt is None or sampler not in CALIBRATED_SAMPLERS or not Path(ckpt).is_file():
        return None
    if steps is None:
        steps = samplers.default_steps(sampler, cfg.diffusion.timesteps if cfg.diffusion.objective == "vp" else None)
    nfe = samplers.nfe(sampler, steps)
    try:
        sigmas = load_schedule(ckpt, sampler, nfe)
    except DdpmError as exc:
        log(f"warning: {exc}; sampling with the default spacing")
        return None
    if sigmas is not None:
        log(f"sampling on the calibrated {nfe}-NFE schedule of {sampler} in {schedules_path(ckpt)} "
            "(--spacing overrides)")
    return sigmas
