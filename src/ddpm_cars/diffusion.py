"""The diffusion math: forward noising, prediction targets, the posterior, reverse
variances and the terms of the variational bound (Ho et al. 2020; Nichol & Dhariwal 2021).

Pure functions of a :class:`NoiseSchedule` and tensors: nothing here calls a network
(the :class:`~ddpm_cars.denoiser.Denoiser` does, and reads its output with these).
Timesteps are 0-indexed: ``t = 0`` is the paper's ``t = 1``, whose reverse step is the
decoder.
"""

from __future__ import annotations

import math

import torch

from ddpm_cars.config import Prediction, Variance
from ddpm_cars.schedule import NoiseSchedule


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


def v_target(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = sqrt(alphabar_t) eps - sqrt(1 - alphabar_t) x_0  (Salimans & Ho 2022, Sec. 4)."""
    return (
        schedule.gather(schedule.sqrt_alphas_cumprod, t, x0) * noise
        - schedule.gather(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0
    )


def prediction_target(
    schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, prediction: Prediction
) -> torch.Tensor:
    """What the network is trained to output for (x_0, eps) at step t."""
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    assert prediction == "v", prediction
    return v_target(schedule, x0, t, noise)


def min_snr_weight(schedule: NoiseSchedule, t: torch.Tensor, gamma: float, prediction: Prediction) -> torch.Tensor:
    """Per-example loss weights [B] of Min-SNR-gamma (Hang et al. 2023): the x_0 error
    weighted by min(SNR_t, gamma), SNR_t = alphabar_t / (1 - alphabar_t), expressed for
    the target the network predicts (the eps error is SNR times the x_0 error, the v
    error SNR + 1 times)."""
    alphabar = schedule.alphas_cumprod.to(t.device)[t]
    snr = alphabar / (1.0 - alphabar)
    weight = snr.clamp(max=gamma)
    if prediction == "eps":
        return weight / snr
    if prediction == "v":
        return weight / (snr + 1.0)
    return weight


def predict_x0(
    schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor, prediction: Prediction
) -> torch.Tensor:
    """The x_0 implied by a network output of the given prediction type."""
    if prediction == "eps":
        return predict_x0_from_eps(schedule, x_t, t, output)
    if prediction == "x0":
        return output
    assert prediction == "v", prediction  # x_0 = sqrt(alphabar) x_t - sqrt(1 - alphabar) v
    return (
        schedule.gather(schedule.sqrt_alphas_cumprod, t, x_t) * x_t
        - schedule.gather(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * output
    )


def predict_eps(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The noise implied by x_t and x_0: eps = (x_t - sqrt(alphabar_t) x_0) / sqrt(1 - alphabar_t)."""
    return (x_t - schedule.gather(schedule.sqrt_alphas_cumprod, t, x_t) * x0) / schedule.gather(
        schedule.sqrt_one_minus_alphas_cumprod, t, x_t
    )


def posterior_mean(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """mu_tilde(x_t, x_0) of q(x_{t-1} | x_t, x_0)  (Eq. 7, Ho et al. 2020)."""
    return (
        schedule.gather(schedule.posterior_mean_coef1, t, x_t) * x0
        + schedule.gather(schedule.posterior_mean_coef2, t, x_t) * x_t
    )


def fixed_log_variance(
    schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor, variance: Variance
) -> torch.Tensor:
    """log sigma_t^2 of a fixed-variance reverse step (Sec. 3.2, Ho et al. 2020): log beta_t
    ("beta", Algorithm 2) or log beta_tilde_t ("beta_tilde"). At t = 0 both use beta_tilde
    of the next step (beta_tilde there is 0), as the published code does for "a better
    decoder log likelihood" (Ho et al.'s diffusion_utils_2.py, improved-diffusion's
    FIXED_LARGE); only the decoder term L_0 of the bound sees it, as sampling adds no
    noise on its last step."""
    log_var = schedule.beta_log_variance if variance == "beta" else schedule.posterior_log_variance_clipped
    return schedule.gather(log_var, t, like)


def learned_log_variance(schedule: NoiseSchedule, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """log sigma^2 = f log beta_t + (1 - f) log beta_tilde_t with f = (v + 1) / 2
    (Eq. 15, Nichol & Dhariwal 2021); the network outputs v, nominally in [-1, 1]."""
    frac = (v + 1) / 2
    log_beta = schedule.gather(schedule.betas.log(), t, v)
    log_tilde = schedule.gather(schedule.posterior_log_variance_clipped, t, v)
    return frac * log_beta + (1 - frac) * log_tilde


# -- the variational bound ----------------------------------------------------------------


def normal_kl(mean1: torch.Tensor, log_var1: torch.Tensor, mean2: torch.Tensor, log_var2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))) elementwise, in nats."""
    return 0.5 * (
        log_var2 - log_var1 + torch.exp(log_var1 - log_var2) + (mean1 - mean2) ** 2 * torch.exp(-log_var2) - 1.0
    )


def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log P(x) elementwise for images ``x`` in [-1, 1] on 256 levels under N(mean, exp(log_var))
    integrated over each level's bin of width 2/255 (Eq. 13, Ho et al. 2020); the edge bins
    extend to -inf and +inf. In nats."""
    inv_std = torch.exp(-0.5 * log_var)
    upper = _std_normal_cdf(inv_std * (x - mean + 1.0 / 255))
    lower = _std_normal_cdf(inv_std * (x - mean - 1.0 / 255))
    prob = torch.where(x > 0.999, 1.0 - lower, torch.where(x < -0.999, upper, upper - lower))
    # far in the tails the CDF difference underflows: use the density times the bin width there
    log_density = -0.5 * ((x - mean) * inv_std) ** 2 - 0.5 * log_var - 0.5 * math.log(2 * math.pi)
    fallback = log_density + math.log(2.0 / 255)
    return torch.where(prob > 1e-12, prob.clamp(min=1e-12).log(), fallback)


def _mean_over_pixels(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def vlb_term(
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    mean: torch.Tensor,
    log_var: torch.Tensor,
) -> torch.Tensor:
    """L_t per image, in bits per dimension: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for
    t > 0 and the decoder's -log p(x_0 | x_1) at t = 0 (Eq. 5, Ho et al. 2020)."""
    true_mean = posterior_mean(schedule, x0, x_t, t)
    true_log_var = schedule.gather(schedule.posterior_log_variance_clipped, t, x_t)
    kl = _mean_over_pixels(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
    nll = -_mean_over_pixels(discretized_gaussian_log_likelihood(x0, mean, log_var)) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def prior_bpd(schedule: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T per image in bits per dimension: KL(q(x_T | x_0) || N(0, I))."""
    t = torch.full((x0.shape[0],), schedule.timesteps - 1, dtype=torch.long, device=x0.device)
    mean = schedule.gather(schedule.sqrt_alphas_cumprod, t, x0) * x0
    log_var = schedule.gather((1.0 - schedule.alphas_cumprod).log(), t, x0)
    return _mean_over_pixels(
        normal_kl(mean, log_var.expand_as(x0), torch.zeros_like(x0), torch.zeros_like(x0))
    ) / math.log(2.0)
