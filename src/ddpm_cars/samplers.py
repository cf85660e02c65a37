"""Samplers: pure functions from noise to images (no global RNG, no file I/O).

Randomness comes from one ``torch.Generator`` per image, so image ``i`` of a
request with seed ``s`` is the same whatever batch it is drawn in.
"""

from __future__ import annotations

import math

from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ddpm_cars import diffusion
from ddpm_cars.config import DiffusionConfig, SampleConfig
from ddpm_cars.diffusion import VarianceType
from ddpm_cars.conditioning import ClassifierFreeGuidance
from ddpm_cars.models import batchnorm_uses_batch_stats, num_classes
from ddpm_cars.runtime import autocast
from ddpm_cars.schedule import NoiseSchedule, sampling_timesteps

# callback(t, x, x0_pred): called after each reverse step with the training timestep t the
# network was just called at, the new state and the predicted x_0.
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


def image_generators(seed: int, indices: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per image; image ``i`` draws from seed ``(seed, i)`` alone."""
    return [torch.Generator(device).manual_seed(seed * 1_000_003 + i) for i in indices]


def randn(shape: Sequence[int], generators: Sequence[torch.Generator], device: torch.device | str) -> torch.Tensor:
    """Standard normal ``[len(generators), *shape]``, row ``i`` drawn from ``generators[i]``."""
    return torch.stack([torch.randn(tuple(shape), generator=g, device=device) for g in generators])


def _network_steps(schedule: NoiseSchedule, timesteps: torch.Tensor | None) -> list[int]:
    """The training timestep the network is told at each step of ``schedule``."""
    if timesteps is None:
        return list(range(schedule.timesteps))
    if len(timesteps) != schedule.timesteps:
        raise ValueError(f"{len(timesteps)} network timesteps for a schedule of {schedule.timesteps} steps")
    return [int(t) for t in timesteps]


def _steps(schedule: NoiseSchedule, timesteps: torch.Tensor | None, desc: str, progress: bool):
    """(i, network t) from the noisiest step down to step 0, with a progress bar."""
    network = _network_steps(schedule, timesteps)
    return tqdm([(i, network[i]) for i in reversed(range(schedule.timesteps))], desc=desc, disable=not progress, leave=False)


def _call(model: nn.Module, x: torch.Tensor, t: int, precision: str) -> torch.Tensor:
    with autocast(x.device, precision):
        return model(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)).float()


@torch.no_grad()
def ancestral_sample(
    model: nn.Module,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    generators: Sequence[torch.Generator],
    *,
    timesteps: torch.Tensor | None = None,
    diffusion_config: DiffusionConfig | None = None,
    variance: VarianceType = "beta",
    clip_x0: bool = True,
    precision: str = "fp32",
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Algorithm 2 of Ho et al. (2020), from x_T ``[B, C, H, W]``.

    Each step draws x_{t-1} ~ N(mu, sigma^2 I) with mu the posterior mean (Eq. 7) around
    the predicted x_0 (clipped to [-1, 1] with ``clip_x0``) and sigma^2 the model's learned
    variance when it has one, else the fixed ``variance``. ``schedule`` may be respaced
    (:meth:`NoiseSchedule.respace`); ``timesteps`` then says which training step each of
    its steps is. The network runs under ``precision`` autocast; the update is float32.
    """
    if len(generators) != x_T.shape[0]:
        raise ValueError(f"need one generator per image: {len(generators)} for a batch of {x_T.shape[0]}")
    config = diffusion_config or DiffusionConfig()
    x = x_T
    for i, t in _steps(schedule, timesteps, "Sampling (DDPM)", progress):
        idx = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        output = _call(model, x, t, precision)
        mean, log_var, x0_pred = diffusion.p_mean_variance(schedule, output, x, idx, config, variance=variance, clip_x0=clip_x0)
        if i > 0:  # no noise on the last step
            x = mean + torch.exp(0.5 * log_var) * randn(x.shape[1:], generators, x.device)
        else:
            x = mean
        if callback is not None:
            callback(t, x, x0_pred)
    return x


def _predict(schedule, output, x, idx, config, clip_x0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_0, eps) predicted from a network output; eps is recomputed from the clipped x_0."""
    mean_out, _ = diffusion.split_output(output, config)
    x0 = diffusion.predict_x0(schedule, x, idx, mean_out, config.prediction)
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
    return x0, diffusion.predict_eps(schedule, x, idx, x0)


@torch.no_grad()
def ddim_sample(
    model: nn.Module,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    generators: Sequence[torch.Generator],
    *,
    timesteps: torch.Tensor | None = None,
    diffusion_config: DiffusionConfig | None = None,
    eta: float = 0.0,
    clip_x0: bool = True,
    precision: str = "fp32",
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12) from x_T, on ``schedule`` (usually respaced):

        x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
        sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev).

    ``eta = 0`` is deterministic; ``eta = 1`` on all T steps is ancestral sampling with
    sigma^2 = beta-tilde. A learned variance is not used. ``generators`` are only drawn
    from when ``eta > 0``.
    """
    if len(generators) != x_T.shape[0]:
        raise ValueError(f"need one generator per image: {len(generators)} for a batch of {x_T.shape[0]}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0; got {eta}")
    config = diffusion_config or DiffusionConfig()
    x = x_T
    for i, t in _steps(schedule, timesteps, "Sampling (DDIM)", progress):
        idx = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        x0, eps = _predict(schedule, _call(model, x, t, precision), x, idx, config, clip_x0)
        ab = schedule.gather(schedule.alphas_cumprod, idx, x)
        ab_prev = schedule.gather(schedule.alphas_cumprod_prev, idx, x)
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
        x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and i > 0:
            x = x + sigma * randn(x.shape[1:], generators, x.device)
        if callback is not None:
            callback(t, x, x0)
    return x


# With few steps, the last step into t = 0 is much longer in lambda than the one before,
# and the second-order extrapolation overshoots: DPM-Solver++ takes it at first order.
LOWER_ORDER_FINAL_BELOW = 15


@torch.no_grad()
def dpm_solver_sample(
    model: nn.Module,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    generators: Sequence[torch.Generator] | None = None,
    *,
    timesteps: torch.Tensor | None = None,
    diffusion_config: DiffusionConfig | None = None,
    clip_x0: bool = True,
    precision: str = "fp32",
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): a second-order multistep solver of
    the diffusion ODE in data-prediction form, deterministic.

    With alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma) and
    h_i = lambda_{i-1} - lambda_i, each step is
    x_{i-1} = (sigma_{i-1} / sigma_i) x_i - alpha_{i-1} (exp(-h_i) - 1) D_i, with D_i the
    predicted x_0 on the first step and (1 + 1/(2r)) x0_i - 1/(2r) x0_{i+1}, r = h_{i+1} / h_i,
    after it; with fewer than 15 steps the step into t = 0 is first order again (Lu et al.'s
    "lower order final"). The last network call, at step 0, returns its predicted x_0.
    """
    config = diffusion_config or DiffusionConfig()
    ab = torch.cumprod(1.0 - schedule.betas_float64, dim=0)  # float64 scalars per step
    alpha, sigma = ab.sqrt().tolist(), (1.0 - ab).sqrt().tolist()
    lam = [math.log(a / s) for a, s in zip(alpha, sigma)]
    x, prev_x0, prev_h = x_T, None, None
    for i, t in _steps(schedule, timesteps, "Sampling (DPM-Solver++)", progress):
        idx = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        x0, _ = _predict(schedule, _call(model, x, t, precision), x, idx, config, clip_x0)
        if i == 0:
            x = x0
        else:
            h = lam[i - 1] - lam[i]
            if prev_x0 is None or (i == 1 and schedule.timesteps < LOWER_ORDER_FINAL_BELOW):
                d = x0
            else:
                r = prev_h / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
            x = (sigma[i - 1] / sigma[i]) * x - alpha[i - 1] * math.expm1(-h) * d
            prev_x0, prev_h = x0, h
        if callback is not None:
            callback(t, x, x0)
    return x


def generate(
    model: nn.Module,
    schedule: NoiseSchedule,
    num_images: int,
    image_size: int,
    seed: int,
    config: SampleConfig,
    *,
    diffusion_config: DiffusionConfig | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    callback: StepCallback | None = None,
    progress: bool = True,
    indices: Sequence[int] | None = None,
    labels: torch.Tensor | None = None,
    guidance: float = 1.0,
) -> torch.Tensor:
    """``num_images`` samples in [-1, 1], ``[N, 3, S, S]`` on the CPU, drawn in batches with
    ``config.sampler`` on ``config.steps`` of the schedule's steps (all by default).
    ``indices`` picks which images of the request to draw instead of ``0..num_images-1``
    (a share of a request spread over processes): image ``i`` is the same either way.

    ``labels`` (``[num_images]``, a class-conditional model only) asks for class
    ``labels[i]`` in image ``i``, with classifier-free ``guidance`` (0: unconditional,
    1: conditional, more: stronger); without labels a conditional model samples
    unconditionally.

    The model is put in eval mode; with ``config.batchnorm == "batch"`` BatchNorm layers
    normalise with each sampling batch's statistics instead (running stats untouched).
    ``callback`` sees the first batch only.
    """
    if num_images < 1 or batch_size < 1:
        raise ValueError(f"num_images and batch_size must be >= 1; got {num_images}, {batch_size}")
    wanted = list(range(num_images)) if indices is None else list(indices)
    classes = num_classes(model)
    if labels is not None:
        if not classes:
            raise ValueError("class labels given, but the model is not class-conditional")
        if labels.shape != (num_images,):
            raise ValueError(f"need one label per image: labels of shape {tuple(labels.shape)} for {num_images} images")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):  # once, not in every step
            raise ValueError(f"labels must be classes 0..{classes - 1} of the model")
    timesteps = sampling_timesteps(schedule.timesteps, config.steps, config.spacing)
    steps_schedule = schedule if len(timesteps) == schedule.timesteps else schedule.respace(timesteps)
    sample_fn, extra = {
        "ddpm": (ancestral_sample, {"variance": config.variance}),
        "ddim": (ddim_sample, {"eta": config.eta}),
        "dpm++": (dpm_solver_sample, {}),
    }[config.sampler]
    was_training = model.training
    out = []
    starts = range(0, len(wanted), batch_size)
    try:
        for start in tqdm(starts, desc="Sampling batches", disable=not progress or len(starts) == 1):
            gens = image_generators(seed, wanted[start:start + batch_size], device)
            x_T = randn((3, image_size, image_size), gens, device)
            if config.batchnorm == "batch":
                ctx = batchnorm_uses_batch_stats(model)
            else:
                model.eval()
                ctx = torch.no_grad()
            net = model
            if labels is not None:
                net = ClassifierFreeGuidance(model, labels[wanted[start:start + batch_size]].to(device), guidance, classes)
            with ctx:
                x = sample_fn(
                    net, steps_schedule, x_T, gens, timesteps=timesteps, diffusion_config=diffusion_config,
                    clip_x0=config.clip_x0, precision=precision, callback=callback if start == 0 else None,
                    progress=progress, **extra,
                )
            out.append(x.clamp(-1, 1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 3, image_size, image_size)
