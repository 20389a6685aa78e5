"""Progressive distillation, Salimans & Ho (2022), Algorithm 2, in variance-exploding coordinates.

A student with N steps learns to land, in one deterministic DDIM step, where two DDIM steps of
its teacher (the student of the previous stage, 2N steps) land. The levels are
`samplers.nested_sigmas`: student step i goes from s = g_N[i] to s'' = g_N[i+1], and the
teacher passes through s' = g_2N[2i + 1] in between.

DDIM from s to s'' with an x0 estimate x^ is x'' = x^ + (s'' / s)(x - x^) (Song et al. 2021,
Eq. 12 with eta = 0, in the coordinates x = x0 + sigma eps). The student's x^ that reproduces
the teacher's two-step result x''_T solves x''_T = x^ + (s''/s)(x - x^):

    x~ = (x''_T - (s''/s) x) / (1 - s''/s) = (s x''_T - s'' x) / (s - s'').          (*)

This is the x-target of Salimans & Ho (2022), Eq. 8, x~ = (z'' - (sigma''/sigma) z) /
(alpha'' - (sigma''/sigma) alpha), after dividing its VP variables by alpha (z = alpha x,
sigma_VP = alpha s); on the last step (s'' = 0) it is x''_T itself. The loss is
max(SNR, 1) ||x^ - x~||^2 with SNR = 1 / s^2, their truncated-SNR weighting ("max(||x - x^||^2,
||eps - eps^||^2)", §4).

The student keeps the teacher's network and parameterization when the teacher predicts x0 or v
or is an EDM model; an eps teacher gets a v-predicting student (Salimans & Ho §4: eps-prediction
is unstable at few steps), whose output layer then relearns its meaning in the first stage. The
first stage's teacher is still read as the eps model it is (`ProgressiveLoss`).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..samplers import nested_sigmas


def ddim_step(denoiser, x: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step from levels s to s_next (per-sample (n,) tensors)."""
    bc = lambda v: v.view(-1, *([1] * (x.ndim - 1)))
    x0 = denoiser(x, s)
    return x0 + bc(s_next / s) * (x - x0)


def x_target(x: torch.Tensor, x_teacher: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor) -> torch.Tensor:
    """Eq. (*) of the module docstring: the x0 estimate whose DDIM step s -> s_next from x gives x_teacher."""
    bc = lambda v: v.view(-1, *([1] * (x.ndim - 1)))
    return (bc(s) * x_teacher - bc(s_next) * x) / bc(s - s_next)


class ProgressiveLoss:
    """Loss of one halving stage: `state()` gives (teacher network, the teacher's Diffusion, student steps N) now.

    The teacher is read with its own Diffusion: in the first stage that is the teacher
    checkpoint's (an eps teacher stays an eps model even though its student predicts v), later
    the run's own, since the previous stage's student is the teacher.
    """

    def __init__(self, diffusion, state):
        self.diffusion, self.state = diffusion, state

    def draw(self, n: int, like: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """u ~ U[0, 1) (the student step is floor(u N), so the draw does not depend on N) and eps ~ N(0, I)."""
        u = torch.rand(n, generator=generator, device=like.device)
        eps = torch.randn((n, *like.shape[1:]), generator=generator, device=like.device, dtype=like.dtype)
        return {"u": u, "eps": eps}

    def target(self, x0: torch.Tensor, draws: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x at level s, s, x~): the student's input, its level and Eq. (*)'s target from two teacher steps."""
        teacher_net, teacher_diffusion, steps = self.state()
        teacher = teacher_diffusion.denoiser(teacher_net, clip=False)
        fine = nested_sigmas(teacher, 2 * steps).to(x0.device)
        i = (draws["u"] * steps).long().clamp(max=steps - 1)
        s, s_mid, s_next = fine[2 * i], fine[2 * i + 1], fine[2 * i + 2]
        x = x0 + s.view(-1, *([1] * (x0.ndim - 1))) * draws["eps"]
        with torch.no_grad():
            x_teacher = ddim_step(teacher, ddim_step(teacher, x, s, s_mid), s_mid, s_next)
            return x, s, x_target(x, x_teacher, s, s_next)

    def __call__(self, net: nn.Module, x0: torch.Tensor, draws: dict) -> torch.Tensor:
        x, s, target = self.target(x0, draws)
        student = self.diffusion.denoiser(net, clip=False)
        weight = torch.clamp(1 / s**2, min=1.0)  # max(SNR, 1), SNR = 1 / s^2 in these coordinates
        return weight * ((student(x, s).float() - target) ** 2).flatten(1).mean(1)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A teacher: a copy of `model` in eval mode without gradients."""
    return copy.deepcopy(model).eval().requires_grad_(False)
