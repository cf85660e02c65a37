"""Noise schedules (linear, cosine): the betas and every quantity derived from them.

Everything is computed once in float64 (Principle 5) and stored as float32
tensors; :meth:`NoiseSchedule.gather` picks per-timestep coefficients for a
batch. Timesteps are 0-indexed: ``t = 0`` is the paper's ``t = 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ddpm_cars.config import NOISE_LEVEL_SPACINGS, SIGMA_MAX, DiffusionConfig, SampleConfig


def linear_betas(
    timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02, max_beta: float = 0.999
) -> torch.Tensor:
    """Linearly spaced betas (Ho et al. 2020, Sec. 4), float64 ``[T]``.

    ``beta_start`` and ``beta_end`` are the values for T = 1000; for another T both are
    scaled by 1000 / T, as improved-diffusion's ``get_named_beta_schedule("linear")``
    does, so that alphabar_T stays near 0 and x_T near N(0, I) whatever T (capped at
    ``max_beta`` for T < 20, where the scaled end would pass 1).
    """
    assert timesteps >= 1 and 0.0 < beta_start <= beta_end < 1.0, (timesteps, beta_start, beta_end)
    scale = 1000 / timesteps
    return torch.linspace(beta_start * scale, beta_end * scale, timesteps, dtype=torch.float64).clamp(max=max_beta)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the cosine schedule (Eq. 17, Nichol & Dhariwal 2021), float64 ``[T]``.

    alphabar(t) = f(t) / f(0) with f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2), and
    beta_t = 1 - alphabar(t) / alphabar(t - 1), clipped at ``max_beta`` near t = T.
    """
    assert timesteps >= 1, timesteps
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


@dataclass(frozen=True)
class NoiseSchedule:
    """The fixed forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)."""

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    beta_log_variance: torch.Tensor  # log beta_t, with log beta_tilde of step 1 at t = 0 (the decoder)
    betas_float64: torch.Tensor  # the defining betas, kept exact for respacing

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> NoiseSchedule:
        b = betas.to(torch.float64)
        alphas = 1.0 - b
        ab = torch.cumprod(alphas, dim=0)  # alphabar_t = prod_{s<=t} alpha_s
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        # Eq. 7, Ho et al. 2020: posterior q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde I)
        post_var = b * (1.0 - ab_prev) / (1.0 - ab)
        # beta_tilde_1 = 0; log-variance uses beta_tilde_2 there (as in improved-diffusion)
        # (a one-step schedule has no beta_tilde_2: it uses beta_1)
        post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]]) if len(b) > 1 else b)
        coefs = dict(
            betas=b,
            alphas=alphas,
            alphas_cumprod=ab,
            alphas_cumprod_prev=ab_prev,
            sqrt_alphas_cumprod=ab.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1.0 - ab).sqrt(),
            posterior_variance=post_var,
            posterior_log_variance_clipped=post_log_var,
            posterior_mean_coef1=b * ab_prev.sqrt() / (1.0 - ab),
            posterior_mean_coef2=(1.0 - ab_prev) * alphas.sqrt() / (1.0 - ab),
        )
        stored = {k: v.to(torch.float32) for k, v in coefs.items()}
        # the fixed "large" variance: log beta_t, but log beta_tilde at the decoder (as Ho et al.'s
        # code); the log of the stored betas, which sampling has always used
        stored["beta_log_variance"] = torch.cat(
            [stored["posterior_log_variance_clipped"][:1], stored["betas"][1:].log()]
        )
        return cls(**stored, betas_float64=b)

    @classmethod
    def linear(cls, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        return cls.from_betas(linear_betas(timesteps, beta_start, beta_end))

    @property
    def timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def alphas_cumprod_float64(self) -> torch.Tensor:
        """alphabar_t from the defining betas, in float64 (exact near t = 0 and t = T - 1)."""
        return torch.cumprod(1.0 - self.betas_float64, dim=0)

    def respace(self, timesteps: torch.Tensor) -> NoiseSchedule:
        """This schedule on an increasing subsequence of its steps (Nichol & Dhariwal 2021,
        Sec. 4): the same alphabar at the kept steps, betas recomputed as
        beta_i = 1 - alphabar_{t_i} / alphabar_{t_{i-1}}. Step i of the result is step
        ``timesteps[i]`` of this one (what the network must be told)."""
        ts = torch.as_tensor(timesteps, dtype=torch.long)
        if ts.ndim != 1 or len(ts) == 0 or ts[0] < 0 or ts[-1] >= self.timesteps or (ts.diff() <= 0).any():
            raise ValueError(f"timesteps must be an increasing subsequence of 0..{self.timesteps - 1}")
        kept = self.alphas_cumprod_float64[ts]
        previous = torch.cat([torch.ones(1, dtype=torch.float64), kept[:-1]])
        return NoiseSchedule.from_betas(1.0 - kept / previous)

    def gather(self, coef: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``coef[t]`` shaped ``[B, 1, 1, ...]`` to broadcast against ``like`` ``[B, ...]``."""
        out = coef.to(like.device)[t.to(like.device)].to(like.dtype)
        return out.view(-1, *([1] * (like.ndim - 1)))


def zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """``betas`` rescaled so that alphabar_T = 0 (Lin et al. 2024, Algorithm 1): sqrt(alphabar)
    shifted so its last value is 0 and scaled so its first is unchanged; the last beta is 1."""
    root = torch.cumprod(1.0 - betas.to(torch.float64), dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    ab = ((root - last) * first / (first - last)) ** 2
    return 1.0 - torch.cat([ab[:1], ab[1:] / ab[:-1]])


def training_betas(config: DiffusionConfig) -> torch.Tensor:
    """The float64 betas of the T training steps."""
    if config.schedule == "cosine":
        betas = cosine_betas(config.timesteps)
    else:
        betas = linear_betas(config.timesteps, config.beta_start, config.beta_end)
    return zero_terminal_snr(betas) if config.zero_terminal_snr else betas


KARRAS_RHO = 7.0


def sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The noise level of each step in the variance-exploding view, sigma_t =
    sqrt((1 - alphabar_t) / alphabar_t) (x_t / sqrt(alphabar_t) = x_0 + sigma_t eps), float64."""
    ab = alphas_cumprod.to(torch.float64)
    return ((1 - ab) / ab).sqrt()


def sampling_timesteps(
    timesteps: int,
    steps: int | None = None,
    spacing: str = "uniform",
    alphas_cumprod: torch.Tensor | None = None,
    sigma_max: float = SIGMA_MAX,
) -> torch.Tensor:
    """The increasing subsequence of ``0..timesteps-1`` a sampler visits, from the noisiest
    step down to 0.

    ``uniform`` spaces them evenly in t (rounded) and ``quadratic`` packs them towards
    t = 0, t_i = round((i / (steps - 1))^2 (T - 1)); both start at t = T - 1. ``trailing``
    takes t = round(T - i T / N) - 1 for i < N (diffusers' "trailing" spacing, Lin et al.
    2024, Table 2): it starts at T - 1, ends at T/N - 1, and the steps for N are every
    other step for 2N, which progressive distillation needs. ``karras``
    (rho = 7, Karras et al. 2022) and ``logsnr`` (even in log sigma) place them by noise
    level over the schedule's own steps (``alphas_cumprod`` ``[T]``, required for these),
    from sigma_0 up to the trained sigma nearest ``sigma_max`` (T - 1 when the schedule
    ends below it; step ``steps - 1`` when more steps are asked for than lie below it), each
    at the trained step nearest in log sigma. Repeats from rounding
    are pushed apart, so the result is strictly increasing. ``steps=None`` means all of them.
    """
    if steps is None or steps == timesteps:
        return torch.arange(timesteps)
    assert 1 <= steps <= timesteps, (steps, timesteps)
    if spacing in NOISE_LEVEL_SPACINGS:
        assert alphas_cumprod is not None and len(alphas_cumprod) == timesteps, "noise-level spacing needs the schedule"
        return _noise_level_timesteps(sigmas(alphas_cumprod), steps, spacing, sigma_max)
    if spacing == "trailing":
        return trailing_timesteps(timesteps, steps)
    if steps == 1:
        return torch.tensor([timesteps - 1])
    frac = torch.linspace(0, 1, steps, dtype=torch.float64)
    if spacing == "uniform":
        return (frac * (timesteps - 1)).round().long()
    assert spacing == "quadratic", spacing
    return _strictly_increasing((frac**2 * (timesteps - 1)).round().long(), timesteps - 1)


def trailing_timesteps(timesteps: int, steps: int) -> torch.Tensor:
    """``steps`` training steps evenly spaced from T - 1 down, increasing: round(T - i T / N) - 1
    for i = N - 1, ..., 0 (float64, ties to even as NumPy rounds), strictly increasing while
    N <= T / 2."""
    assert 1 <= steps <= timesteps, (steps, timesteps)
    ratio = timesteps / steps
    ts = (timesteps - torch.arange(steps, dtype=torch.float64) * ratio).round().long() - 1
    return _strictly_increasing(ts.flip(0), timesteps - 1)


def visited_timesteps(schedule: NoiseSchedule, sample: SampleConfig) -> torch.Tensor:
    """The training steps of ``schedule`` that a sampler set up by ``sample`` (its steps,
    spacing and starting sigma) visits: :func:`sampling_timesteps` of them."""
    return sampling_timesteps(
        schedule.timesteps, sample.steps, sample.spacing, schedule.alphas_cumprod_float64, sample.sigma_max
    )


def _noise_level_timesteps(sigma: torch.Tensor, steps: int, spacing: str, sigma_max: float) -> torch.Tensor:
    """``steps`` trained steps nearest (in log sigma) to Karras' or log-uniform noise levels
    between sigma_0 and the start (see :func:`sampling_timesteps`)."""
    log_sigma = sigma.log()
    start = int((log_sigma - math.log(sigma_max)).abs().argmin()) if sigma[-1] > sigma_max else len(sigma) - 1
    start = max(start, steps - 1)  # more steps than trained steps below sigma_max: start higher
    if steps == 1:
        return torch.tensor([start])
    lo, hi = sigma[0].item(), sigma[start].item()
    frac = torch.linspace(0, 1, steps, dtype=torch.float64)
    if spacing == "karras":
        inv = 1 / KARRAS_RHO
        levels = (lo**inv + frac * (hi**inv - lo**inv)) ** KARRAS_RHO
    else:
        levels = (math.log(lo) + frac * (math.log(hi) - math.log(lo))).exp()
    nearest = (levels.log()[:, None] - log_sigma[None, : start + 1]).abs().argmin(dim=1)
    nearest[0], nearest[-1] = 0, start
    return _strictly_increasing(nearest, start)


def _strictly_increasing(ts: torch.Tensor, last: int) -> torch.Tensor:
    """``ts`` (non-decreasing, ``ts[-1] == last``, at most ``last + 1`` of them) with each
    repeat pushed up past its predecessor, and pushed back down below its successor where
    that would pass ``last``."""
    ts = ts.clone()
    for i in range(1, len(ts)):
        ts[i] = max(ts[i], ts[i - 1] + 1)
    ts[-1] = last
    for i in range(len(ts) - 2, -1, -1):
        ts[i] = min(ts[i], ts[i + 1] - 1)
    return ts


def build_schedule(config: DiffusionConfig, timesteps: torch.Tensor | None = None) -> NoiseSchedule:
    """The schedule of the T training steps, or respaced onto ``timesteps`` (see
    :meth:`NoiseSchedule.respace`)."""
    schedule = NoiseSchedule.from_betas(training_betas(config))
    return schedule if timesteps is None else schedule.respace(timesteps)
