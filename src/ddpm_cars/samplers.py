"""Samplers: pure functions from noise to images (no global RNG, no file I/O).

Randomness comes from one ``torch.Generator`` per image, so image ``i`` of a
request with seed ``s`` is the same whatever batch it is drawn in.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ddpm_cars import diffusion
from ddpm_cars.config import DiffusionConfig, SampleConfig
from ddpm_cars.diffusion import VarianceType
from ddpm_cars.models import batchnorm_uses_batch_stats
from ddpm_cars.runtime import autocast
from ddpm_cars.schedule import NoiseSchedule

# callback(t, x_t, x0_pred): called after each reverse step with the new state x_{t}.
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


def image_generators(seed: int, indices: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per image; image ``i`` draws from seed ``(seed, i)`` alone."""
    return [torch.Generator(device).manual_seed(seed * 1_000_003 + i) for i in indices]


def randn(shape: Sequence[int], generators: Sequence[torch.Generator], device: torch.device | str) -> torch.Tensor:
    """Standard normal ``[len(generators), *shape]``, row ``i`` drawn from ``generators[i]``."""
    return torch.stack([torch.randn(tuple(shape), generator=g, device=device) for g in generators])


@torch.no_grad()
def ancestral_sample(
    model: nn.Module,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    generators: Sequence[torch.Generator],
    *,
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
    variance when it has one, else the fixed ``variance``. The network runs under
    ``precision`` autocast; the update itself is float32.
    """
    if len(generators) != x_T.shape[0]:
        raise ValueError(f"need one generator per image: {len(generators)} for a batch of {x_T.shape[0]}")
    diffusion_config = diffusion_config or DiffusionConfig()
    x = x_T
    for step in tqdm(range(schedule.timesteps - 1, -1, -1), desc="Sampling", disable=not progress, leave=False):
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        with autocast(x.device, precision):
            output = model(x, t)
        mean, log_var, x0_pred = diffusion.p_mean_variance(
            schedule, output, x, t, diffusion_config, variance=variance, clip_x0=clip_x0
        )
        z = randn(x.shape[1:], generators, x.device)
        nonzero = (t > 0).to(x.dtype).view(-1, 1, 1, 1)  # no noise on the last step, per element
        x = mean + nonzero * torch.exp(0.5 * log_var) * z
        if callback is not None:
            callback(step, x, x0_pred)
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
) -> torch.Tensor:
    """``num_images`` samples in [-1, 1], ``[N, 3, S, S]`` on the CPU, drawn in batches.

    The model is put in eval mode; with ``config.batchnorm == "batch"`` BatchNorm layers
    normalise with each sampling batch's statistics instead (running stats untouched).
    ``callback`` sees the first batch only.
    """
    if num_images < 1 or batch_size < 1:
        raise ValueError(f"num_images and batch_size must be >= 1; got {num_images}, {batch_size}")
    was_training = model.training
    out = []
    starts = range(0, num_images, batch_size)
    try:
        for start in tqdm(starts, desc="Sampling batches", disable=not progress or len(starts) == 1):
            indices = range(start, min(start + batch_size, num_images))
            gens = image_generators(seed, indices, device)
            x_T = randn((3, image_size, image_size), gens, device)
            if config.batchnorm == "batch":
                ctx = batchnorm_uses_batch_stats(model)
            else:
                model.eval()
                ctx = torch.no_grad()
            with ctx:
                x = ancestral_sample(
                    model, schedule, x_T, gens,
                    diffusion_config=diffusion_config, variance=config.variance, clip_x0=config.clip_x0, precision=precision,
                    callback=callback if start == 0 else None, progress=progress,
                )
            out.append(x.clamp(-1, 1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)
