"""``ddpm-cars sample`` and ``ddpm-cars classes``: images from a trained run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ddpm_cars import parallel
from ddpm_cars.commands.edits import ImageEdit, Interpolation, deterministic_config, read_image, write_interpolation
from ddpm_cars.conditioning import class_labels
from ddpm_cars.config import DEFAULT_GUIDANCE
from ddpm_cars.editing import ddim_invert, interpolation_weights, slerp, strength_timesteps
from ddpm_cars.errors import UserError
from ddpm_cars.generation import ClassRequest, Watch
from ddpm_cars.run import Run
from ddpm_cars.samplers import StepCallback, image_generators, randn, sampling_description
from ddpm_cars.schedule import visited_timesteps
from ddpm_cars.viz import evenly_spaced_steps, save_rows, save_samples, save_strip

GRID_ROW_PER_CLASS_UP_TO = 16  # images per class that still fit on one grid row


@dataclass(frozen=True)
class SampleRequest:
    """``ddpm-cars sample``: ``num`` images (per class with ``classes``) from the run or
    checkpoint ``checkpoint`` into ``out``; ``sampling`` overrides the run's sampling settings
    (the fields of :class:`~ddpm_cars.config.SampleConfig`, e.g. ``{"sampler": "ddim"}``)."""

    checkpoint: Path
    out: Path
    num: int = 64
    seed: int = 0
    batch_size: int = 64
    classes: tuple[str, ...] = ()  # names (any case) or indices
    guidance: float | None = None  # default: DEFAULT_GUIDANCE with classes
    edit: ImageEdit | None = None
    interpolation: Interpolation | None = None
    trajectory: bool = False
    grid: int | None = None  # images in grid.png (default: all)
    ema: bool = True
    device: str = "auto"
    sampling: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num < 1 or self.batch_size < 1:
            raise UserError(
                f"need at least one image and a batch size of at least 1; got {self.num}, {self.batch_size}"
            )
        if self.guidance is not None and not self.classes:
            raise UserError("--guidance steers towards a class: name one with --class (see: ddpm-cars classes RUN)")
        if self.edit is not None and self.interpolation is not None:
            raise UserError("--init-image and --interpolate/--interpolate-images are separate uses of sample: give one")
        if self.interpolation is not None and len(self.classes) > 1:
            raise UserError("an interpolation stays within one class: give one --class")
        if self.edit is not None:
            self.edit.check_sampler(self.sampling.get("sampler"))

    @property
    def guidance_scale(self) -> float:
        return DEFAULT_GUIDANCE if self.guidance is None else self.guidance


def denoising_frames(
    visited: list[int], count: int = 10
) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]], StepCallback]:
    """Lists of image 0's state x_t and predicted x_0 at ``count`` evenly spaced steps of
    the ``visited`` timesteps, and the sampler callback that fills them."""
    keep = {visited[i] for i in evenly_spaced_steps(len(visited), count)} if len(visited) > 1 else set(visited)
    states: list[tuple[str, torch.Tensor]] = []
    predictions: list[tuple[str, torch.Tensor]] = []

    def callback(step: int, x_t: torch.Tensor, x0_pred: torch.Tensor) -> None:
        if step in keep:
            states.append((f"t={step}", x_t[0].clamp(-1, 1).cpu()))
            predictions.append((f"t={step}", x0_pred[0].clamp(-1, 1).cpu()))

    return states, predictions, callback


def open_for_sampling(request: SampleRequest) -> tuple[Run, str]:
    """The run, opened once, with the sampling settings the request asks for (and those an
    inpainting needs); a note on what was chosen for the user."""
    trained = Run.open(request.checkpoint)
    if request.edit is not None:
        trained.refuse_if_distilled("--init-image (variations and inpainting)")
    if request.interpolation is not None and request.interpolation.images:
        trained.refuse_if_distilled("--interpolate-images (it inverts images to noise)")
    asked, note = request.sampling, ""
    if request.edit is not None:
        asked, note = request.edit.sampling(asked, trained.config.sample, trained.config.diffusion.timesteps)
    return trained.with_sampling(asked), note


def sample(request: SampleRequest) -> torch.Tensor | None:
    """Generate from a run's checkpoint; write grid.png, images/NNNN.png and denoising.png
    (or, with an interpolation, its frames). Under torchrun the images are shared out over
    the processes and rank 0 writes them; it returns them, ``[N, 3, S, S]`` in [-1, 1]
    (the other ranks None)."""
    trained, note = open_for_sampling(request)
    config = trained.config
    labels = class_labels(request.classes, config.model.class_names, request.num) if request.classes else None
    edit = request.edit.read(config.data) if request.edit is not None else None
    world, device = parallel.init_from_env(parallel.resolve_device(request.device))
    denoiser = trained.denoiser(ema=request.ema, device=device)
    classes = None if labels is None else ClassRequest(labels, request.guidance_scale)
    if request.interpolation is not None:
        return _interpolate(trained, denoiser, request, classes, world)
    visited = visited_timesteps(denoiser.schedule, config.sample)
    visited = strength_timesteps(visited, edit.strength if edit else 1.0, denoiser.schedule.timesteps).tolist()
    frames, predictions, callback = denoising_frames(visited)
    images = parallel.generate_across_ranks(
        denoiser,
        len(labels) if labels is not None else request.num,
        config.sample,
        world,
        seed=request.seed,
        batch_size=request.batch_size,
        classes=classes,
        edit=edit,
        watch=Watch(callback=callback),
    )
    if images is None:  # not rank 0
        return None
    _write_samples(request, trained, images, (frames, predictions, len(visited)))
    how, files = sampling_description(config.sample) + note, _written(request, bool(frames))
    if labels is not None:
        names = [config.model.class_names[i] for i in dict.fromkeys(labels.tolist())]
        how += f"; {request.num} each of {', '.join(names)}, guidance {request.guidance_scale:g}"
    if edit is not None:
        edit_how, edit_files = request.edit.write_inputs(request.out, edit)
        how, files = how + edit_how, files + edit_files
    print(f"Wrote {images.shape[0]} images ({how}) from {trained.checkpoint} to {request.out}/ ({files})")
    return images


def _write_samples(request: SampleRequest, trained: Run, images: torch.Tensor, seen: tuple) -> None:
    """grid.png (a row per class when they fit), images/, denoising.png and trajectory.png."""
    frames, predictions, steps = seen
    per_class = request.num if request.classes and request.num <= GRID_ROW_PER_CLASS_UP_TO else None
    save_samples(images, request.out, request.grid, per_class)
    if frames:  # none at strength 0, where nothing is denoised
        save_strip(frames, request.out / "denoising.png", f"Denoising image 0 ({trained.checkpoint.name})")
    if request.trajectory and frames:
        title = f"Image 0 along the way: {trained.config.sample.sampler}, {steps} steps ({trained.checkpoint.name})"
        save_rows([("x_t", frames), ("predicted x_0", predictions)], request.out / "trajectory.png", title)


def _written(request: SampleRequest, denoised: bool) -> str:
    files = "grid.png, images/" + (", denoising.png" if denoised else "")
    return files + (", trajectory.png" if request.trajectory and denoised else "")


def _interpolate(
    trained: Run, denoiser, request: SampleRequest, classes: ClassRequest | None, world
) -> torch.Tensor | None:
    """Frames between two seeds' or two images' starting noises, shared out over the ranks:
    interpolation.png, interpolation.gif and images/."""
    ends, what = request.interpolation, ""
    sample, note = deterministic_config(trained.config.sample, request.sampling)
    size, device = trained.config.data.image_size, denoiser.device
    if classes is not None:  # every frame, and the inversion, in the one class asked for
        denoiser = denoiser.guided(classes.labels[:1].to(device), classes.scale)
    if ends.seeds is not None:
        shape = (denoiser.image_channels, size, size)
        x = torch.cat([randn(shape, image_generators(seed, [0], device), device) for seed in ends.seeds])
        what = f"seeds {ends.seeds[0]} and {ends.seeds[1]}"
    else:
        crop = trained.config.data.crop
        channels = trained.config.image_channels
        images = torch.stack([read_image(p, size, crop, "--interpolate-images", channels) for p in ends.images])
        x = ddim_invert(
            denoiser, images.to(device), timesteps=visited_timesteps(denoiser.schedule, sample), progress=True
        )
        what = f"{Path(ends.images[0]).name} and {Path(ends.images[1]).name} (inverted with DDIM)"
    weights = interpolation_weights(ends.frames)
    x_T = torch.stack([slerp(x[0], x[1], w) for w in weights])
    frames = parallel.decode_across_ranks(denoiser, x_T, sample, world, batch_size=request.batch_size)
    if frames is None:  # not rank 0
        return None
    if classes is not None:
        what += f" in class {trained.config.model.class_names[int(classes.labels[0])]}, guidance {classes.scale:g}"
    description = sampling_description(sample)
    write_interpolation(request.out, frames, weights, f"Interpolating {what}: {description}")
    print(
        f"Wrote {ends.frames} frames between {what} ({description}{note}) from {trained.checkpoint} "
        f"to {request.out}/ (interpolation.png, interpolation.gif, images/)"
    )
    return frames


@dataclass(frozen=True)
class ClassesRequest:
    """``ddpm-cars classes``: the classes of a class-conditional run."""

    run: Path


def classes(request: ClassesRequest) -> list[str]:
    """Print and return the index and name of each class of a class-conditional run."""
    trained = Run.open(request.run)
    names = trained.config.model.class_names
    if not names:
        raise UserError(f"{trained.dir} is not class-conditional: train with --class-conditional to ask for classes")
    width = len(str(len(names) - 1))
    for i, name in enumerate(names):
        print(f"{i:>{width}}  {name}")
    return list(names)
