"""Requests for images: :func:`generate` draws N images from a denoiser (from pure noise, or
from given images: variations and inpainting), :func:`decode` draws from given starting
noises (interpolation). Both work in batches, each image with its own seed, so image ``i``
is the same whatever batch it is drawn in.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ddpm_cars.config import SampleConfig
from ddpm_cars.denoiser import Denoiser
from ddpm_cars.editing import Edit, Inpainting, edit_sample
from ddpm_cars.errors import UserError
from ddpm_cars.models import batchnorm_uses_batch_stats
from ddpm_cars.samplers import StepCallback, image_generators, is_deterministic, randn, run_sampler
from ddpm_cars.schedule import visited_timesteps


@dataclass(frozen=True)
class ClassRequest:
    """Class ``labels[i]`` for image ``i`` of a request (``[N]``), drawn with classifier-free
    guidance ``scale`` (0: unconditional, 1: conditional, more: stronger)."""

    labels: torch.Tensor
    scale: float = 1.0


@dataclass(frozen=True)
class Watch:
    """What the caller sees while images are drawn, never what is drawn: progress bars, and
    a ``callback`` that sees each step of the first batch (see :data:`~ddpm_cars.samplers.StepCallback`)."""

    progress: bool = True
    callback: StepCallback | None = None


QUIET = Watch(progress=False)


def generate(
    denoiser: Denoiser,
    images: int | Sequence[int],
    config: SampleConfig,
    *,
    seed: int = 0,
    batch_size: int = 64,
    classes: ClassRequest | None = None,
    edit: Edit | None = None,
    watch: Watch = Watch(),
) -> torch.Tensor:
    """Samples in [-1, 1], ``[N, C, S, S]`` on the CPU (C: the denoiser's image channels),
    drawn in batches with ``config``'s sampler on ``config.steps`` of the T steps (all by
    default). ``images`` is how many to draw, or which images of a request (a share of one
    spread over processes): image ``i`` is the same either way.

    ``classes`` (a class-conditional model only) asks for a class per image, with
    guidance; without it a conditional model samples unconditionally. ``edit`` draws
    variations (SDEdit) or inpaintings (RePaint, ancestral or DDIM sampler) of given images:
    see :class:`~ddpm_cars.editing.Edit`; each image is noised with the noise its image would
    have started from.

    The network is put in eval mode; with ``config.batchnorm == "batch"`` BatchNorm layers
    normalise with each sampling batch's statistics instead (running stats untouched).
    """
    wanted = list(range(images)) if isinstance(images, int) else list(images)
    if classes is not None:  # one label per image of the request
        count = images if isinstance(images, int) else max(wanted, default=-1) + 1
        _check_labels(classes.labels, count, isinstance(images, int), denoiser.num_classes)
    if edit is not None:
        edit = edit.checked(denoiser.image_size, max(wanted, default=-1) + 1, config.sampler, denoiser.image_channels)
    _check_sampler(denoiser, config)
    timesteps = visited_timesteps(denoiser.schedule, config)
    device, size, channels = denoiser.device, denoiser.image_size, denoiser.image_channels
    out = []
    starts = range(0, len(wanted), batch_size)
    with _sampling_mode(denoiser.network, config) as ctx:
        for start in tqdm(starts, desc="Sampling batches", disable=not watch.progress or len(starts) == 1):
            batch = wanted[start : start + batch_size]
            gens = image_generators(seed, batch, device)
            x_T = randn((channels, size, size), gens, device)
            den = denoiser if classes is None else denoiser.guided(classes.labels[batch].to(device), classes.scale)
            steps = {"timesteps": timesteps, "callback": watch.callback if start == 0 else None}
            with ctx():
                if edit is None:
                    x = run_sampler(den, x_T, gens, config, progress=watch.progress, **steps)
                else:
                    x = edit_sample(
                        den, x_T, gens, config, _rows_of(edit, batch, device), progress=watch.progress, **steps
                    )
            out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out) if out else torch.empty(0, channels, size, size)


def decode(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    config: SampleConfig,
    *,
    batch_size: int = 64,
    progress: bool = True,
) -> torch.Tensor:
    """Images in [-1, 1] ``[N, C, S, S]`` on the CPU drawn from the given starting noises
    ``x_T`` ``[N, C, S, S]`` with ``config``'s sampler, which must be deterministic (see
    :func:`~ddpm_cars.samplers.is_deterministic`): from the noise of image ``i`` of seed ``s``
    it draws image ``i`` of ``generate(..., seed=s)``."""
    require_deterministic(config)
    _check_sampler(denoiser, config)
    timesteps = visited_timesteps(denoiser.schedule, config)
    out = []
    starts = range(0, x_T.shape[0], batch_size)
    with _sampling_mode(denoiser.network, config) as ctx:
        for start in tqdm(starts, desc="Decoding batches", disable=not progress or len(starts) == 1):
            x = x_T[start : start + batch_size].to(denoiser.device)
            gens = image_generators(0, range(x.shape[0]), denoiser.device)  # never drawn from
            with ctx():
                out.append(
                    run_sampler(denoiser, x, gens, config, timesteps=timesteps, progress=progress).clamp(-1, 1).cpu()
                )
    return torch.cat(out) if out else torch.empty(0, *x_T.shape[1:])


def require_deterministic(config: SampleConfig) -> None:
    """A one-line ValueError unless ``config``'s sampler draws no noise after x_T."""
    if not is_deterministic(config):
        noise = {"ddim": f" with eta {config.eta:g}", "heun": f" with churn {config.churn:g}"}.get(config.sampler, "")
        raise ValueError(
            f"decoding given noise needs a deterministic sampler (ddim with eta 0, dpm++, dpm++3m, "
            f"heun without churn), not {config.sampler}{noise}"
        )


@contextmanager
def _sampling_mode(network: torch.nn.Module, config: SampleConfig) -> Iterator:
    """The network in eval mode (or BatchNorm on batch statistics with ``config.batchnorm ==
    "batch"``) until the end, restored after; yields the context each batch runs in."""
    was_training = network.training
    try:
        if config.batchnorm == "batch":
            yield lambda: batchnorm_uses_batch_stats(network)
        else:
            network.eval()
            yield torch.no_grad
    finally:
        network.train(was_training)


def _check_sampler(denoiser: Denoiser, config: SampleConfig) -> None:
    if config.sampler == "ddim" and config.ddim_sigma == "learned" and not denoiser.config.learn_variance:
        raise UserError("--ddim-sigma learned needs a run trained with a learned variance (--learn-variance)")


def _rows(tensor: torch.Tensor, batch: list[int]) -> torch.Tensor:
    """The rows of ``tensor`` (``[1 or N, ...]``) for the images ``batch``: its one row for every image."""
    return tensor.expand(len(batch), *tensor.shape[1:]) if tensor.shape[0] == 1 else tensor[batch]


def _rows_of(edit: Edit, batch: list[int], device: torch.device) -> Edit:
    """The rows of a checked ``edit`` for the images ``batch``, on ``device``."""
    paint = edit.mask
    if paint is not None:
        paint = Inpainting(_rows(paint.mask, batch).to(device), paint.jumps, paint.every)
    return Edit(_rows(edit.init, batch).to(device), edit.strength, paint)


def _check_labels(labels: torch.Tensor, count: int, exact: bool, classes: int) -> None:
    """Labels fit the request (``count`` images, or at least so many when a share of a
    larger request is drawn) and the model, checked once rather than in every step."""
    if not classes:
        raise ValueError("class labels given, but the model is not class-conditional")
    if labels.ndim != 1 or labels.shape[0] < count or (exact and labels.shape[0] != count):
        raise ValueError(f"need one label per image: labels of shape {tuple(labels.shape)} for {count} images")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ValueError(f"labels must be classes 0..{classes - 1} of the model")
