"""A trained model used on given images: variations (SDEdit), inpainting (RePaint), DDIM
inversion and interpolation between starting noises.

Each is a small layer over the samplers: SDEdit (Meng et al. 2022) starts a sampler part of
the way down, from the image noised with q(x_t | x_0); RePaint (Lugmayr et al. 2022) takes
the sampler's steps one at a time and puts the known pixels back after each, noised to the
new step's level, going back up now and then (resampling) so the fill and the known part
agree; DDIM inversion (Song et al. 2021, Sec. 4.3; Dhariwal & Nichol 2021, App. F) runs the
deterministic ODE from the image up to x_T. Images are ``[B, C, S, S]`` in [-1, 1] (C: 1 or
3); masks are ``[B, 1, S, S]`` with 1 where the model draws and 0 where the image is kept.
Like the samplers, nothing here reads files or draws from a global generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ddpm_cars.config import SampleConfig
from ddpm_cars.denoiser import Denoiser
from ddpm_cars.samplers import DdimNoise, StepCallback, ancestral_step, ddim_step, randn, run_sampler

INPAINTING_SAMPLERS = ("ddpm", "ddim")  # RePaint takes one reverse step at a time from x_t to x_{t-1}


@dataclass(frozen=True)
class Inpainting:
    """What to redraw: ``mask`` (1 = draw, 0 = keep the image), with RePaint's resampling:
    after every ``every`` steps down, go back up ``every`` steps with the forward process and
    come down again, ``jumps`` times (0: no resampling)."""

    mask: torch.Tensor
    jumps: int = 0
    every: int = 10

    def __post_init__(self) -> None:
        if self.jumps < 0 or self.every < 1:
            raise ValueError(f"resampling needs jumps >= 0 and every >= 1; got jumps={self.jumps}, every={self.every}")


@dataclass(frozen=True)
class Edit:
    """Images drawn from given ones: ``init`` (``[C, S, S]`` for every image, or ``[N, C, S, S]``,
    in [-1, 1]) noised to the step ``strength`` x T and denoised (SDEdit: 0 returns the images,
    1 ignores them); with a ``mask`` (1 = redraw; ``[S, S]``, ``[1, S, S]`` or ``[N, 1, S, S]``,
    or an :class:`Inpainting` with RePaint's resampling) the other pixels of ``init`` are kept."""

    init: torch.Tensor
    strength: float = 1.0
    mask: torch.Tensor | Inpainting | None = None

    def checked(self, size: int, count: int, sampler: str, channels: int = 3) -> Edit:
        """This edit with ``init`` as ``[1 or N, C, S, S]`` and the mask as an :class:`Inpainting`
        of ``[1 or N, 1, S, S]``, for a request of ``count`` images of ``channels`` C and ``size``
        pixels drawn with ``sampler``; or a ValueError in one line saying what does not fit."""
        if not (0.0 <= self.strength <= 1.0):
            raise ValueError(f"strength must lie in [0, 1] (0 keeps the image, 1 ignores it); got {self.strength}")
        init = self.init[None] if self.init.ndim == 3 else self.init
        c = channels
        if init.ndim != 4 or tuple(init.shape[1:]) != (c, size, size) or init.shape[0] not in (1, count):
            raise ValueError(
                f"init must be [{c}, {size}, {size}] or [{count}, {c}, {size}, {size}] in [-1, 1]; "
                f"got {tuple(init.shape)}"
            )
        if self.mask is None:
            return Edit(init, self.strength)
        return Edit(init, self.strength, _checked_mask(self.mask, size, count, sampler))


def _checked_mask(mask: torch.Tensor | Inpainting, size: int, count: int, sampler: str) -> Inpainting:
    paint = mask if isinstance(mask, Inpainting) else Inpainting(mask)
    m = paint.mask
    m = m[None] if m.ndim == 2 else m
    m = m[None] if m.ndim == 3 else m
    if m.ndim != 4 or m.shape[1] != 1 or tuple(m.shape[2:]) != (size, size) or m.shape[0] not in (1, count):
        raise ValueError(
            f"the mask must be [{size}, {size}], [1, {size}, {size}] or [{count}, 1, {size}, {size}]; "
            f"got {tuple(paint.mask.shape)}"
        )
    if sampler not in INPAINTING_SAMPLERS:
        raise ValueError(
            f"inpainting replaces the known pixels after every step, which needs a one-step sampler: "
            f"{' or '.join(INPAINTING_SAMPLERS)}, not {sampler}"
        )
    return Inpainting(m.float(), paint.jumps, paint.every)


def strength_timesteps(timesteps: torch.Tensor, strength: float, trained_steps: int) -> torch.Tensor:
    """The steps of ``timesteps`` (training steps, increasing) that SDEdit at ``strength``
    visits: those below strength x T, all of them at strength 1, none at 0."""
    return timesteps if strength >= 1 else timesteps[timesteps < strength * trained_steps]


@torch.no_grad()
def edit_sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    generators: Sequence[torch.Generator],
    config: SampleConfig,
    edit: Edit,
    *,
    timesteps: torch.Tensor,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Images drawn from ``edit`` (init ``[B, C, S, S]``, an :class:`Inpainting` mask of
    ``[B, 1, S, S]`` or none: see :meth:`Edit.checked`) with ``config``'s sampler on the
    training steps ``timesteps``: the init noised with ``noise``
    (the x_T an ordinary request would start from) to the highest step below strength x T,
    then denoised; at strength 1 the start is ``noise`` itself, at strength 0 the init."""
    init, strength, paint = edit.init, edit.strength, edit.mask
    steps = strength_timesteps(timesteps, strength, denoiser.schedule.timesteps)
    if len(steps) == 0:
        return init.clone()
    if strength >= 1:
        x = noise
    else:
        top = torch.full((noise.shape[0],), int(steps[-1]), device=noise.device)
        abar = denoiser.schedule.gather(denoiser.schedule.alphas_cumprod, top, noise)
        x = abar.sqrt() * init + (1 - abar).sqrt() * noise  # q(x_t | x_0), Eq. 4 of Ho et al. 2020
    if paint is None:
        return run_sampler(denoiser, x, generators, config, timesteps=steps, callback=callback, progress=progress)
    return repaint_sample(
        denoiser, x, generators, config, (init, paint), timesteps=steps, callback=callback, progress=progress
    )


def repaint_moves(steps: int, jumps: int, every: int) -> list[int]:
    """The levels RePaint visits on a schedule of ``steps`` steps: from ``steps - 1`` down to -1
    (the image), one step at a time, except that on reaching a multiple L of ``every`` (with
    L + every below ``steps``) it goes back up to L + every, ``jumps`` times, before going on."""
    remaining = {level: jumps for level in range(0, steps - every, every)}
    level, path = steps - 1, [steps - 1]
    while level >= 0:
        level -= 1
        path.append(level)
        if remaining.get(level, 0) > 0:
            remaining[level] -= 1
            level += every
            path.append(level)
    return path


@torch.no_grad()
def repaint_sample(
    denoiser: Denoiser,
    x: torch.Tensor,
    generators: Sequence[torch.Generator],
    config: SampleConfig,
    known: tuple[torch.Tensor, Inpainting],
    *,
    timesteps: torch.Tensor,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """RePaint (Lugmayr et al. 2022, Algorithm 1) from x at the top of ``timesteps``: each
    step down is ``config``'s sampler (ancestral or DDIM) on the whole image, after which the
    kept pixels (mask 0) are replaced by the image noised to the new level with fresh noise,
    q(x_{t-1} | x_0), and by the image itself after the last step; a step up from level L to
    L' is the forward process q(x_L' | x_L). The callback sees each level's last step down."""
    image, paint = known
    den = denoiser.respaced(timesteps)
    abar = den.schedule.alphas_cumprod.to(x.device)
    path = repaint_moves(den.schedule.timesteps, paint.jumps, paint.every)
    mask = paint.mask.to(x.device)
    last_down = {a: n for n, (a, b) in enumerate(zip(path, path[1:])) if b == a - 1}
    for n, (a, b) in enumerate(
        tqdm(list(zip(path, path[1:])), desc="Inpainting (RePaint)", disable=not progress, leave=False)
    ):
        if b > a:  # back up: x_b ~ q(x_b | x_a)
            ratio = abar[b] / abar[a]
            x = ratio.sqrt() * x + (1 - ratio).sqrt() * randn(x.shape[1:], generators, x.device)
            continue
        if config.sampler == "ddpm":
            x, x0 = ancestral_step(den, x, a, generators, clip_x0=config.clip_x0, variance=config.variance)
        else:
            x, x0 = ddim_step(den, x, a, generators, noise=DdimNoise.of(config), clip_x0=config.clip_x0)
        if b >= 0:
            kept = abar[b].sqrt() * image + (1 - abar[b]).sqrt() * randn(x.shape[1:], generators, x.device)
        else:
            kept = image
        x = mask * x + (1 - mask) * kept
        if callback is not None and last_down[a] == n:
            callback(den.network_step(a), x, x0)
    return x


@torch.no_grad()
def ddim_invert(
    denoiser: Denoiser,
    images: torch.Tensor,
    *,
    timesteps: torch.Tensor | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """The x_T from which DDIM with eta 0 on ``timesteps`` draws about ``images``: the
    deterministic DDIM update run upwards, x_i = sqrt(abar_i) x0(x_{i-1}) + sqrt(1 - abar_i)
    eps(x_{i-1}), each step's prediction taken at the level it starts from (the step from
    the image to the first level takes the image as that level's x). No clipping of x_0,
    which would make the map many-to-one."""
    den = denoiser if timesteps is None else denoiser.respaced(timesteps)
    abar = den.schedule.alphas_cumprod.to(images.device)
    x = images
    for i in tqdm(range(1, den.schedule.timesteps), desc="Inverting (DDIM)", disable=not progress, leave=False):
        idx = torch.full((x.shape[0],), i - 1, device=x.device, dtype=torch.long)
        x0, eps, _ = den.predict(x, idx, clip_x0=False)
        x = abar[i].sqrt() * x0 + (1 - abar[i]).sqrt() * eps
    return x


def slerp(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """Spherical interpolation between noises ``a`` and ``b`` (same shape; per image when
    batched, ``[B, ...]``), 0 giving ``a`` and 1 giving ``b`` exactly; linear where they are
    (nearly) parallel. Norms of Gaussian noise stay about sqrt(dim) along the way, which a
    straight line would shrink."""
    if weight == 0:
        return a.clone()
    if weight == 1:
        return b.clone()
    rows = a.shape[0] if a.ndim == 4 else 1
    flat_a, flat_b = a.reshape(rows, -1).double(), b.reshape(rows, -1).double()
    cos = (flat_a * flat_b).sum(1) / (flat_a.norm(dim=1) * flat_b.norm(dim=1)).clamp(min=1e-12)
    theta = torch.arccos(cos.clamp(-1, 1))[:, None]
    small = theta < 1e-4
    sin = torch.sin(theta).where(~small, torch.ones_like(theta))
    wa = torch.where(small, 1 - weight, torch.sin((1 - weight) * theta) / sin)
    wb = torch.where(small, torch.full_like(theta, weight), torch.sin(weight * theta) / sin)
    return (wa * flat_a + wb * flat_b).to(a.dtype).reshape(a.shape)


def interpolation_weights(frames: int) -> list[float]:
    """``frames`` evenly spaced weights from 0 to 1, both ends included."""
    if frames < 2:
        raise ValueError(f"an interpolation needs at least 2 frames; got {frames}")
    return [k / (frames - 1) for k in range(frames)]
