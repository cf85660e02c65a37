"""Negative log-likelihood in bits per dimension: the variational bound of Ho et al.
(2020, Eq. 5) on held-out images,

    L = L_T (prior) + sum_{t=2..T} L_{t-1} (KL terms) + L_0 (discretised decoder),

each term averaged over the C x H x W dimensions (C = 3 for RGB, 1 for grayscale) and
converted to bits. Images are the 8-bit pixels mapped to [-1, 1], so the number is
comparable with the bits/dim reported in the papers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ddpm_cars import diffusion
from ddpm_cars.config import SampleConfig
from ddpm_cars.denoiser import Denoiser


@dataclass(frozen=True)
class BitsPerDim:
    """Per-image bits/dim of the bound and its three parts (``[N]`` tensors)."""

    total: torch.Tensor
    prior: torch.Tensor
    decoder: torch.Tensor
    kl: torch.Tensor
    monte_carlo_steps: int | None  # None: all T terms computed exactly

    def summary(self) -> dict[str, float]:
        n = self.total.numel()
        return {
            "bits_per_dim": self.total.mean().item(),
            "stderr": (self.total.std().item() / n**0.5) if n > 1 else float("nan"),
            "prior": self.prior.mean().item(),
            "decoder": self.decoder.mean().item(),
            "kl_terms": self.kl.mean().item(),
            "images": n,
            "kl_timesteps": "all" if self.monte_carlo_steps is None else self.monte_carlo_steps,
        }


@torch.no_grad()
def bits_per_dim(
    denoiser: Denoiser,
    images: torch.Tensor,
    sample: SampleConfig | None = None,
    *,
    timesteps: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> BitsPerDim:
    """The bound on ``images`` (``[N, C, S, S]`` in [-1, 1], C = 1 or 3, on the denoiser's device).

    With ``timesteps=None`` every one of the T terms is computed (T network calls per
    batch). With ``timesteps=K`` the decoder term is exact and the KL sum is the unbiased
    Monte-Carlo estimate (T - 1) * mean over K uniformly drawn t in 1..T-1, per image.
    The model's mean uses ``sample.clip_x0``; a fixed variance uses ``sample.variance``,
    whose decoder term (t = 0) uses beta-tilde as the published code does (see
    :func:`~ddpm_cars.diffusion.fixed_log_variance`).
    """
    assert timesteps is None or timesteps >= 1, timesteps
    sample = sample or SampleConfig()
    denoiser.network.eval()
    generator = torch.Generator(images.device).manual_seed(seed)
    batches = range(0, images.shape[0], batch_size)
    calls = denoiser.schedule.timesteps if timesteps is None else timesteps + 1  # network calls per batch
    bar = tqdm(total=len(batches) * calls, desc="Bits/dim", unit="call", disable=not progress)
    parts = []  # (total, prior, decoder, kl) of each batch
    for start in batches:
        parts.append(_batch_bound(denoiser, images[start : start + batch_size], sample, timesteps, generator, bar))
    bar.close()
    totals, priors, decoders, kls = (torch.cat([part[k] for part in parts]) for k in range(4))
    return BitsPerDim(totals, priors, decoders, kls, timesteps)


def _batch_bound(
    denoiser: Denoiser,
    x0: torch.Tensor,
    sample: SampleConfig,
    timesteps: int | None,
    generator: torch.Generator,
    bar: tqdm,
) -> tuple[torch.Tensor, ...]:
    """Bits/dim of the bound on one batch x0 ``[n, C, S, S]`` and of its prior, decoder and
    KL parts, each ``[n]`` on the CPU (see :func:`bits_per_dim`)."""
    schedule, n, device = denoiser.schedule, x0.shape[0], x0.device
    T = schedule.timesteps
    decoder = _term(denoiser, x0, torch.zeros(n, dtype=torch.long, device=device), sample, generator)
    bar.update(1)
    kl = torch.zeros(n, device=device)
    if T > 1:
        if timesteps is None:
            steps = [torch.full((n,), s, dtype=torch.long, device=device) for s in range(1, T)]
        else:
            steps = [torch.randint(1, T, (n,), generator=generator, device=device) for _ in range(timesteps)]
        for t in steps:
            kl += _term(denoiser, x0, t, sample, generator)
            bar.update(1)
        kl *= (T - 1) / len(steps)
    prior = diffusion.prior_bpd(schedule, x0)
    return (prior + decoder + kl).cpu(), prior.cpu(), decoder.cpu(), kl.cpu()


def _term(
    denoiser: Denoiser, x0: torch.Tensor, t: torch.Tensor, sample: SampleConfig, generator: torch.Generator
) -> torch.Tensor:
    """The bound's term at steps ``t`` ``[n]`` (L_0 at t = 0, else L_{t-1}) in bits/dim, on
    x_t drawn from q(x_t | x_0) with fresh noise."""
    schedule = denoiser.schedule
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    pred = denoiser.predict(x_t, t, clip_x0=sample.clip_x0, variance=sample.variance)
    return diffusion.vlb_term(schedule, x0, x_t, t, diffusion.posterior_mean(schedule, pred.x0, x_t, t), pred.log_var)
