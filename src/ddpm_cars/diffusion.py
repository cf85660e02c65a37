"""The diffusion math of Ho et al. (2020): forward noising, reverse means, losses.

Nothing here knows about networks beyond calling ``model(x_t, t)`` once.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ddpm_cars.schedule import NoiseSchedule

LossType = Literal["l1", "l2"]
VarianceType = Literal["beta", "beta_tilde"]


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alphabar_t) x_0 + sqrt(1 - alphabar_t) eps  (Eq. 4, Ho et al. 2020)."""
    return (
        schedule.gather(schedule.sqrt_alphas_cumprod, t, x0) * x0
        + schedule.gather(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise
    )


def predict_x0_from_eps(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Invert Eq. 4: x_0 = (x_t - sqrt(1 - alphabar_t) eps) / sqrt(alphabar_t)."""
    return (x_t - schedule.gather(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) / schedule.gather(
        schedule.sqrt_alphas_cumprod, t, x_t
    )


def posterior_mean(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """mu_tilde(x_t, x_0) of q(x_{t-1} | x_t, x_0)  (Eq. 7, Ho et al. 2020)."""
    return schedule.gather(schedule.posterior_mean_coef1, t, x_t) * x0 + schedule.gather(
        schedule.posterior_mean_coef2, t, x_t
    ) * x_t


def eps_mean(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """mu_theta = (x_t - beta_t / sqrt(1 - alphabar_t) eps) / sqrt(alpha_t)  (Eq. 11, Ho et al. 2020)."""
    coef = schedule.gather(schedule.betas, t, x_t) / schedule.gather(schedule.sqrt_one_minus_alphas_cumprod, t, x_t)
    return schedule.gather(schedule.sqrt_recip_alphas, t, x_t) * (x_t - coef * eps)


def reverse_std(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor, variance: VarianceType) -> torch.Tensor:
    """sigma_t of p(x_{t-1} | x_t): sqrt(beta_t) or sqrt(beta_tilde_t) (Sec. 3.2, Ho et al. 2020)."""
    var = schedule.betas if variance == "beta" else schedule.posterior_variance
    return schedule.gather(var, t, like).sqrt()


def training_loss(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    loss_type: LossType = "l1",
) -> torch.Tensor:
    """One term of Algorithm 1: noise x0 to x_t, predict the noise, compare.

    ``l2`` is L_simple (Eq. 14); ``l1`` is the seed's choice.
    """
    eps_pred = model(q_sample(schedule, x0, t, noise), t)
    if loss_type == "l1":
        return F.l1_loss(eps_pred, noise)
    if loss_type == "l2":
        return F.mse_loss(eps_pred, noise)
    raise ValueError(f"loss must be 'l1' or 'l2', got {loss_type!r}")
