"""Progressive distillation (Salimans & Ho 2022): what a student of N steps learns from a
teacher of 2N.

A deterministic DDIM sampler on N steps takes ``N`` network calls. The student starts as a
copy of the teacher and learns to make, in one DDIM step, the two DDIM steps the teacher
makes: from z_t to z_t'' through z_t'. Its target x~ is the x_0 for which one DDIM step from
z_t lands exactly on the teacher's z_t'' (Algorithm 2; Appendix G, Eq. 8-10 solved for x):

    z_t'  = alpha_t'  x^(z_t)  + sigma_t'  eps^(z_t)          teacher, DDIM (eta 0)
    z_t'' = alpha_t'' x^(z_t') + sigma_t'' eps^(z_t')         teacher again
    x~    = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)

with alpha = sqrt(alphabar) and sigma = sqrt(1 - alphabar). The student's last step ends at
x_0 itself (alpha 1, sigma 0), where x~ is the teacher's z_t''. The loss is the squared error
of the student's x_0 with the paper's "truncated SNR" weight max(SNR_t, 1), so the steps at
pure noise, where an eps-parameterised x_0 is meaningless, still count.

The student's steps for N calls are the trailing grid t_i = round(T - i T / N) - 1
(:func:`~ddpm_cars.schedule.trailing_timesteps`): N's steps are every other one of 2N's, so
the teacher's midpoint t' is always a step of its own grid. Halving N each round from a
teacher's many-step DDIM gives students of 64, 32, ..., 4, 2, 1 calls.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ddpm_cars.denoiser import Denoiser
from ddpm_cars.schedule import NoiseSchedule, trailing_timesteps

FINAL = -1  # the "step" after a sampler's last: x_0 itself, alphabar = 1


class StudentSteps(NamedTuple):
    """Each student step k of a round, from the noisiest (k = 0): the training steps ``t`` it
    starts from, ``mid`` the teacher's step between, and ``next`` where it ends (FINAL for
    x_0), each ``[N]``."""

    t: torch.Tensor
    mid: torch.Tensor
    next: torch.Tensor


def student_steps(timesteps: int, calls: int) -> StudentSteps:
    """The steps of a student of ``calls`` steps and of its teacher of twice as many, on a
    schedule of ``timesteps`` training steps."""
    teacher = trailing_timesteps(timesteps, 2 * calls).flip(0)  # [2N], noisiest first
    ends = torch.cat([teacher, torch.tensor([FINAL])])
    return StudentSteps(ends[0:-1:2], ends[1::2], ends[2::2])


def alpha_sigma(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) = (sqrt(alphabar_t), sqrt(1 - alphabar_t)) at training steps ``t``
    ``[B]``, shaped to broadcast against ``like``; (1, 0) where t is FINAL."""
    abar = schedule.gather(schedule.alphas_cumprod, t.clamp(min=0), like)
    abar = torch.where((t == FINAL).view(-1, *([1] * (like.dim() - 1))), torch.ones_like(abar), abar)
    return abar.sqrt(), (1 - abar).clamp(min=0).sqrt()


def ddim_jump(
    denoiser: Denoiser, z: torch.Tensor, t: torch.Tensor, to: torch.Tensor, y: torch.Tensor | None
) -> torch.Tensor:
    """One deterministic DDIM step of ``denoiser`` (on its training steps) from z at ``t`` to
    step ``to`` (Song et al. 2021, Eq. 12 with sigma 0): alpha_to x^ + sigma_to eps^, with x^
    clipped to [-1, 1] as the samplers clip it."""
    pred = denoiser.read(denoiser.output(z, t, y), z, t)
    alpha_to, sigma_to = alpha_sigma(denoiser.schedule, to, z)
    return alpha_to * pred.x0 + sigma_to * pred.eps


@torch.no_grad()
def teacher_target(
    teacher: Denoiser,
    z_t: torch.Tensor,
    steps: StudentSteps,
    k: torch.Tensor,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """x~ for each row of z_t ``[B, C, H, W]``, at student step ``k[b]`` of ``steps``: the
    teacher's two DDIM steps, solved for the x_0 of one (see the module's docstring)."""
    t, mid, nxt = steps.t[k].to(z_t.device), steps.mid[k].to(z_t.device), steps.next[k].to(z_t.device)
    z_mid = ddim_jump(teacher, z_t, t, mid, y)
    z_next = ddim_jump(teacher, z_mid, mid, nxt, y)
    alpha_t, sigma_t = alpha_sigma(teacher.schedule, t, z_t)
    alpha_n, sigma_n = alpha_sigma(teacher.schedule, nxt, z_t)
    ratio = sigma_n / sigma_t
    return (z_next - ratio * z_t) / (alpha_n - ratio * alpha_t)


def student_loss(
    student: Denoiser, z_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor, y: torch.Tensor | None = None
) -> torch.Tensor:
    """max(SNR_t, 1) ||x^_student(z_t) - x~||^2, the mean over pixels, then over the batch;
    the student's x_0 unclipped."""
    x0 = student.read(student.output(z_t, t, y), z_t, t, clip_x0=False).x0
    alpha, sigma = alpha_sigma(student.schedule, t, z_t)
    weight = (alpha**2 / sigma**2).clamp(min=1.0).flatten()
    return (weight * (x0 - target).square().flatten(1).mean(1)).mean()
