"""Samplers: pure functions from noise to images (no global RNG, no file I/O).

Each is a function of a :class:`~ddpm_cars.denoiser.Denoiser`, the starting noise x_T,
one ``torch.Generator`` per image and the training timesteps to visit, so image ``i``
of a request with seed ``s`` is the same whatever batch it is drawn in, and no sampler
knows how the network is parameterised. :func:`run_sampler` runs the one a
:class:`~ddpm_cars.config.SampleConfig` names; :mod:`ddpm_cars.generation` draws whole requests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ddpm_cars import diffusion
from ddpm_cars.config import NOISE_LEVEL_SPACINGS, SIGMA_MAX, DdimSigma, SampleConfig, Variance
from ddpm_cars.denoiser import Denoiser
from ddpm_cars.schedule import sigmas

# callback(t, x, x0_pred): called once after each reverse step with the training timestep t
# of the step visited (one of the sampler's ``timesteps``, from the noisiest down), the new
# state and the predicted x_0. Heun's churn calls the network at a noisier step than t, but
# reports t.
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


def image_generators(seed: int, indices: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per image; image ``i`` draws from seed ``(seed, i)`` alone."""
    return [torch.Generator(device).manual_seed(seed * 1_000_003 + i) for i in indices]


def randn(shape: Sequence[int], generators: Sequence[torch.Generator], device: torch.device | str) -> torch.Tensor:
    """Standard normal ``[len(generators), *shape]``, row ``i`` drawn from ``generators[i]``."""
    return torch.stack([torch.randn(tuple(shape), generator=g, device=device) for g in generators])


def _steps(denoiser: Denoiser, timesteps: torch.Tensor | None, x: torch.Tensor, desc: str, progress: bool):
    """The denoiser on ``timesteps`` and its steps from the noisiest down to 0, each as
    (i, the training step t the network is told, i as a batch ``[B]``), with a progress bar."""
    den = denoiser if timesteps is None else denoiser.respaced(timesteps)
    steps = [(i, den.network_step(i)) for i in reversed(range(den.schedule.timesteps))]
    bar = tqdm(steps, desc=desc, disable=not progress, leave=False)
    return den, ((i, t, torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)) for i, t in bar)


@torch.no_grad()
def ancestral_sample(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    generators: Sequence[torch.Generator],
    *,
    timesteps: torch.Tensor | None = None,
    variance: Variance = "beta",
    clip_x0: bool = True,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Algorithm 2 of Ho et al. (2020), from x_T ``[B, C, H, W]``, on the training steps
    ``timesteps`` (an increasing subsequence of 0..T-1; all of them by default).

    Each step draws x_{t-1} ~ N(mu, sigma^2 I) with mu the posterior mean (Eq. 7) around
    the predicted x_0 (clipped to [-1, 1] with ``clip_x0``) and sigma^2 the model's learned
    variance when it has one, else the fixed ``variance``. On fewer steps the schedule is
    respaced (Nichol & Dhariwal 2021, Sec. 4). The update is float32.
    """
    assert len(generators) == x_T.shape[0], "one generator per image"
    x = x_T
    den, steps = _steps(denoiser, timesteps, x, "Sampling (DDPM)", progress)
    for i, t, _ in steps:
        x, x0 = ancestral_step(den, x, i, generators, clip_x0=clip_x0, variance=variance)
        if callback is not None:
            callback(t, x, x0)
    return x


def ancestral_step(
    den: Denoiser,
    x: torch.Tensor,
    i: int,
    generators: Sequence[torch.Generator],
    *,
    clip_x0: bool = True,
    variance: Variance = "beta",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of :func:`ancestral_sample` from x_i, at step ``i`` of ``den``'s schedule:
    (x_{i-1}, the predicted x_0); the step from i = 0 adds no noise."""
    idx = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
    pred = den.predict(x, idx, clip_x0=clip_x0, variance=variance)
    mean = diffusion.posterior_mean(den.schedule, pred.x0, x, idx)
    if i > 0:
        return mean + torch.exp(0.5 * pred.log_var) * randn(x.shape[1:], generators, x.device), pred.x0
    return mean, pred.x0


@dataclass(frozen=True)
class DdimNoise:
    """The noise each DDIM step adds, sigma_t = ``eta`` times ``sigma``: Song et al.'s
    sigma of Eq. 16 (``"song"``) or the model's learned standard deviation (``"learned"``).
    The default, eta 0, adds none."""

    eta: float = 0.0
    sigma: DdimSigma = "song"

    @classmethod
    def of(cls, sample: SampleConfig) -> DdimNoise:
        """The noise ``sample``'s settings ask for (its eta and DDIM sigma)."""
        return cls(sample.eta, sample.ddim_sigma)


@torch.no_grad()
def ddim_sample(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    generators: Sequence[torch.Generator],
    *,
    timesteps: torch.Tensor | None = None,
    noise: DdimNoise = DdimNoise(),
    clip_x0: bool = True,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12) from x_T, on the training steps ``timesteps``:

        x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
        sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev)   (Eq. 16),

    with eta and the kind of sigma from ``noise``: with ``sigma="learned"``, sigma = eta times
    the model's learned standard deviation (Nichol & Dhariwal 2021, Eq. 15) on the steps
    visited. ``eta = 0`` is deterministic; ``eta = 1`` on all T steps is ancestral sampling
    with sigma^2 = beta-tilde (Eq. 16), and with the learned sigma it differs from ancestral
    sampling only in the mean's form. ``generators`` are only drawn from when ``eta > 0``.
    """
    assert len(generators) == x_T.shape[0] and noise.eta >= 0, "one generator per image; eta >= 0"
    assert noise.sigma == "song" or denoiser.config.learn_variance, (
        "the learned sigma needs a model that learned its variance"
    )
    x = x_T
    den, steps = _steps(denoiser, timesteps, x, "Sampling (DDIM)", progress)
    for i, t, _ in steps:
        x, x0 = ddim_step(den, x, i, generators, noise=noise, clip_x0=clip_x0)
        if callback is not None:
            callback(t, x, x0)
    return x


def ddim_step(
    den: Denoiser,
    x: torch.Tensor,
    i: int,
    generators: Sequence[torch.Generator],
    *,
    noise: DdimNoise = DdimNoise(),
    clip_x0: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of :func:`ddim_sample` from x_i, at step ``i`` of ``den``'s schedule:
    (x_{i-1}, the predicted x_0)."""
    schedule, eta = den.schedule, noise.eta
    idx = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
    x0, eps, log_var = den.predict(x, idx, clip_x0=clip_x0)
    ab = schedule.gather(schedule.alphas_cumprod, idx, x)
    ab_prev = schedule.gather(schedule.alphas_cumprod_prev, idx, x)
    if noise.sigma == "learned":
        std = eta * torch.exp(0.5 * log_var)
    else:
        std = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
    x_prev = ab_prev.sqrt() * x0 + (1 - ab_prev - std**2).clamp(min=0).sqrt() * eps
    if eta > 0 and i > 0:
        x_prev = x_prev + std * randn(x.shape[1:], generators, x.device)
    return x_prev, x0


# The ODE solvers work in log SNR (or sigma = 1 / sqrt(SNR)), infinite where alphabar = 0, the
# last step of a zero-terminal-SNR schedule: there they take alphabar = 2^-24 (as diffusers
# does), or less when the step before it is already below that.
ALPHABAR_FLOOR = 2.0**-24


def _ode_alphabar(denoiser: Denoiser) -> torch.Tensor:
    """alphabar of each step of ``denoiser``'s schedule for the ODE solvers, float64, with
    a zero replaced by a small value below every other step's."""
    ab = denoiser.schedule.alphas_cumprod_float64
    positive = ab[ab > 0]
    floor = min(ALPHABAR_FLOOR, positive.min().item() / 4) if len(positive) else ALPHABAR_FLOOR
    return torch.where(ab > 0, ab, torch.full_like(ab, floor))


# With few steps, the last steps into t = 0 are much longer in lambda than the ones before,
# and a higher-order extrapolation overshoots: DPM-Solver++ lowers its order there
# (Lu et al.'s "lower order final").
LOWER_ORDER_FINAL_BELOW = 15


@torch.no_grad()
def dpm_solver_sample(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    generators: Sequence[torch.Generator] | None = None,
    *,
    timesteps: torch.Tensor | None = None,
    order: int = 2,
    clip_x0: bool = True,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(2M) or (3M) (Lu et al. 2022): a multistep solver of the diffusion ODE
    in data-prediction form, deterministic.

    With alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma) and
    h = lambda_{i-1} - lambda_i, the exact solution is x_{i-1} = (sigma_{i-1} / sigma_i) x_i
    + sigma_{i-1} int e^lambda x0(lambda) dlambda; expanding x0 to second order around step i,
    x_{i-1} = (sigma_{i-1} / sigma_i) x_i - alpha_{i-1} (phi_1 D_0 - phi_2 D_1 + phi_3 D_2),
    phi_1 = exp(-h) - 1, phi_2 = phi_1 / h + 1, phi_3 = phi_2 / h - 1/2, where D_0 is the
    predicted x_0 and D_1 ~ h x0', D_2 ~ h^2 x0'' are divided differences over the previous
    steps' predictions. Order 2 is Algorithm 2 of Lu et al.: phi_1 (D_0 + D_1 / 2), the
    update (1 + 1/(2r)) x0_i - 1/(2r) x0_{i+1}. (DPM-Solver's and diffusers' third-order
    code multiply phi_3 by half this D_2, which converges at second order on the Gaussian
    problem of the tests; with the full D_2 it converges at third.) The first steps have
    no history and take lower orders; with fewer than 15 steps so do the last ones. The
    last network call, at step 0, returns its predicted x_0.
    """
    assert order in (2, 3), order
    return _dpm_solve(denoiser, x_T, None, timesteps, order, clip_x0, callback, progress)


@torch.no_grad()
def sde_dpm_solver_sample(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    generators: Sequence[torch.Generator],
    *,
    timesteps: torch.Tensor | None = None,
    clip_x0: bool = True,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022; diffusers' "sde-dpmsolver++"): the reverse SDE
    solved at second order in data-prediction form, drawing fresh noise at every step (one
    generator per image).

    Its exact solution differs from the ODE's (see :func:`dpm_solver_sample`) in three
    places: x_i decays by (sigma_{i-1} / sigma_i) exp(-h); the predictions are weighed by
    2 exp(-2 (lambda_{i-1} - lambda)), so phi_1 = exp(-2h) - 1, with the same D_1 / 2
    correction; and the step adds sigma_{i-1} sqrt(1 - exp(-2h)) z. Its first-order step is
    ancestral sampling with sigma^2 = beta-tilde (DDIM with eta 1). Its last step, into
    t = 0, is first order at any number of steps: on uniform steps of the cosine schedule
    that step is far longer in lambda than the rest, and a second-order one there overshoots
    (on the tests' Gaussian problem, 20 steps: output variance 67% high with a second-order
    last step, 6% high with a first-order one; ancestral sampling, 26% low).
    """
    assert len(generators) == x_T.shape[0], "one generator per image"
    return _dpm_solve(denoiser, x_T, generators, timesteps, 2, clip_x0, callback, progress)


def _dpm_solve(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    generators: Sequence[torch.Generator] | None,
    timesteps: torch.Tensor | None,
    order: int,
    clip_x0: bool,
    callback: StepCallback | None,
    progress: bool,
) -> torch.Tensor:
    """The loop of :func:`dpm_solver_sample` (``generators`` None) and of
    :func:`sde_dpm_solver_sample` (``generators`` given: the SDE's steps)."""
    sde = generators is not None
    x = x_T
    den, steps = _steps(denoiser, timesteps, x, f"Sampling (DPM-Solver++ {order}M{' SDE' if sde else ''})", progress)
    ab = _ode_alphabar(den)
    alpha, sigma = ab.sqrt().tolist(), (1.0 - ab).sqrt().tolist()
    lam = [math.log(a / s) for a, s in zip(alpha, sigma)]
    history: list[tuple[torch.Tensor, float]] = []  # (x0, h) of the previous steps, newest first
    for i, t, idx in steps:
        x0 = den.predict(x, idx, clip_x0=clip_x0).x0
        if i == 0:
            x = x0
        else:
            h = lam[i - 1] - lam[i]
            step_order = min(order, len(history) + 1)
            if den.schedule.timesteps < LOWER_ORDER_FINAL_BELOW or sde:
                step_order = min(step_order, i)  # first order into t = 0, at most second the step before
            decay = sigma[i - 1] / sigma[i] * (math.exp(-h) if sde else 1.0)
            x = decay * x - alpha[i - 1] * _dpm_update(x0, history, h, step_order, sde)
            if sde:
                x = x + sigma[i - 1] * math.sqrt(-math.expm1(-2 * h)) * randn(x.shape[1:], generators, x.device)
            history = [(x0, h)] + history[:1]
        if callback is not None:
            callback(t, x, x0)
    return x


def _dpm_update(
    x0: torch.Tensor,
    history: list[tuple[torch.Tensor, float]],
    h: float,
    order: int,
    sde: bool = False,
) -> torch.Tensor:
    """phi_1 D_0 - phi_2 D_1 + phi_3 D_2 of a DPM-Solver++ step of ``order`` (see
    :func:`dpm_solver_sample`), phi_1 (D_0 + D_1 / 2) of the SDE solver's with ``sde``;
    ``history`` holds (x0, h) of the previous steps, newest first."""
    phi_1 = math.expm1(-2 * h if sde else -h)
    if order == 1:
        return phi_1 * x0
    (x0_1, h_0), rest = history[0], history[1:]
    r0 = h_0 / h
    d1_0 = (x0 - x0_1) / r0  # ~ h x0' (first-order accurate)
    if order == 2:
        return phi_1 * (x0 + 0.5 * d1_0)
    x0_2, h_1 = rest[0]
    r1 = h_1 / h
    d1_1 = (x0_1 - x0_2) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)  # ~ h x0' (second-order accurate)
    d2 = 2 * (d1_0 - d1_1) / (r0 + r1)  # ~ h^2 x0''
    phi_2 = phi_1 / h + 1
    phi_3 = phi_2 / h - 0.5
    return phi_1 * x0 - phi_2 * d1 + phi_3 * d2


# EDM's churn (Karras et al. 2022, Algorithm 2) raises the noise only between these levels
# (their S_tmin and S_tmax for ImageNet-64), by at most a factor 1 + (sqrt(2) - 1) per step.
CHURN_SIGMA_MIN, CHURN_SIGMA_MAX = 0.05, 50.0


@torch.no_grad()
def heun_sample(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    generators: Sequence[torch.Generator] | None = None,
    *,
    timesteps: torch.Tensor | None = None,
    churn: float = 0.0,
    clip_x0: bool = True,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """EDM's sampler (Karras et al. 2022, Algorithm 2; Algorithm 1 with ``churn=0``):
    Heun's second-order method on the probability-flow ODE in the variance-exploding view.

    With x~ = x / sqrt(abar) and sigma = sqrt((1 - abar) / abar) the ODE is
    dx~/dsigma = (x~ - D(x~, sigma)) / sigma, D the predicted x_0. Each step from sigma_i
    to sigma_{i-1} takes an Euler step, evaluates the slope again at its end and moves by
    the mean of the two slopes; the step from sigma_0 to 0 is Euler alone (it returns the
    predicted x_0). So n steps cost 2n - 1 network evaluations; the callback sees each step
    once, with the step's timestep t.

    ``churn`` (EDM's S_churn) first raises each step's noise from sigma_i to
    sigma_i (1 + gamma), gamma = min(churn / n, sqrt(2) - 1), where sigma_i lies in
    [0.05, 50], by adding fresh noise of variance sigma_hat^2 - sigma_i^2 (one generator per
    image); the step then starts from sigma_hat. A discrete-time model is only trained at
    its T steps, so sigma_hat is the trained step nearest in log sigma (no churn where
    that is step i itself).
    """
    path = torch.arange(denoiser.schedule.timesteps) if timesteps is None else timesteps.long()
    raised = _churned_steps(denoiser.schedule.alphas_cumprod_float64, path, churn)
    assert generators is not None or bool((raised == path).all()), "churn draws noise: one generator per image"
    visited = torch.unique(torch.cat([path, raised]))  # sorted: the steps the network is called at
    den = denoiser if len(visited) == denoiser.schedule.timesteps else denoiser.respaced(visited)
    index = {t: k for k, t in enumerate(visited.tolist())}
    ab = _ode_alphabar(den)
    scale, sigma = ab.sqrt().tolist(), sigmas(ab).tolist()
    batch = torch.ones(x_T.shape[0], dtype=torch.long, device=x_T.device)

    def slope(x_ve: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = den.predict(scale[k] * x_ve, k * batch, clip_x0=clip_x0).x0
        return (x_ve - x0) / sigma[k], x0

    steps = [(index[t], index[r]) for t, r in zip(reversed(path.tolist()), reversed(raised.tolist()))]
    x = x_T / scale[steps[0][0]]
    for n, (k, k_hat) in enumerate(tqdm(steps, desc="Sampling (Heun)", disable=not progress, leave=False)):
        if k_hat != k:  # churn: back up to sigma_hat with fresh noise
            x = x + math.sqrt(sigma[k_hat] ** 2 - sigma[k] ** 2) * randn(x.shape[1:], generators, x.device)
        d, x0 = slope(x, k_hat)
        if n == len(steps) - 1:
            x = x0
        else:
            k_next = steps[n + 1][0]
            euler = x + (sigma[k_next] - sigma[k_hat]) * d
            d_next, _ = slope(euler, k_next)
            x = x + (sigma[k_next] - sigma[k_hat]) * 0.5 * (d + d_next)
        if callback is not None:
            callback(den.network_step(k), x * scale[k_next] if n < len(steps) - 1 else x, x0)
    return x


def _churned_steps(alphas_cumprod: torch.Tensor, path: torch.Tensor, churn: float) -> torch.Tensor:
    """For each step t of ``path`` (training steps, increasing), the trained step nearest in
    log sigma to sigma_t (1 + gamma) that Heun's churn raises it to (t itself without churn;
    never below t)."""
    if churn <= 0:
        return path
    log_sigma = sigmas(alphas_cumprod).log()
    gamma = min(churn / len(path), math.sqrt(2) - 1)
    raised = []
    for t in path.tolist():
        s = math.exp(log_sigma[t].item())
        if CHURN_SIGMA_MIN <= s <= CHURN_SIGMA_MAX:
            t = t + int((log_sigma[t:] - math.log(s * (1 + gamma))).abs().argmin())
        raised.append(t)
    return torch.tensor(raised)


def sampling_description(sample: SampleConfig) -> str:
    """How ``sample`` draws, in a few words: "ddpm, 50 steps", "dpm++, 20 steps (karras)",
    "dpm++, 20 steps (karras from sigma 10)"."""
    steps = f", {sample.steps} steps" if sample.steps else ", all steps"
    churn = f", churn {sample.churn:g}" if sample.sampler == "heun" and sample.churn else ""
    moved = sample.spacing in NOISE_LEVEL_SPACINGS and sample.sigma_max != SIGMA_MAX
    spacing = sample.spacing + (f" from sigma {sample.sigma_max:g}" if moved else "")
    return sample.sampler + steps + ("" if sample.spacing == "uniform" or not sample.steps else f" ({spacing})") + churn


def run_sampler(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    generators: Sequence[torch.Generator],
    config: SampleConfig,
    *,
    timesteps: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Draw from x_T ``[B, C, H, W]`` with ``config``'s sampler and its settings (eta, sigma,
    churn, variance, clipping) on the training steps ``timesteps`` (all by default)."""
    sample_fn, extra = {
        "ddpm": (ancestral_sample, {"variance": config.variance}),
        "ddim": (ddim_sample, {"noise": DdimNoise.of(config)}),
        "dpm++": (dpm_solver_sample, {}),
        "dpm++3m": (dpm_solver_sample, {"order": 3}),
        "dpm++sde": (sde_dpm_solver_sample, {}),
        "heun": (heun_sample, {"churn": config.churn}),
    }[config.sampler]
    return sample_fn(
        denoiser,
        x_T,
        generators,
        timesteps=timesteps,
        clip_x0=config.clip_x0,
        callback=callback,
        progress=progress,
        **extra,
    )


def is_deterministic(config: SampleConfig) -> bool:
    """Whether ``config``'s sampler draws no noise after x_T (DDIM with eta 0, the ODE solvers,
    Heun without churn): the same x_T always gives the same image."""
    return {
        "ddpm": False,
        "ddim": config.eta == 0,
        "dpm++": True,
        "dpm++3m": True,
        "dpm++sde": False,
        "heun": config.churn == 0,
    }[config.sampler]
