"""``ddpm-cars sample`` on given images and seeds: variations (``--init-image``), inpainting
(``--mask``) and interpolation (``--interpolate``, ``--interpolate-images``).

This module reads the user's files (prepared like the run's training images), checks them
once, and writes the pictures; the diffusion work is :mod:`ddpm_cars.editing`'s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddpm_cars.config import RESAMPLE_EVERY, DataConfig, SampleConfig
from ddpm_cars.data.dataset import to_model_range, to_uint8
from ddpm_cars.data.folder import DataError, load_image
from ddpm_cars.editing import INPAINTING_SAMPLERS, Edit, Inpainting
from ddpm_cars.errors import MissingFileError, UserError
from ddpm_cars.generation import require_deterministic
from ddpm_cars.samplers import is_deterministic
from ddpm_cars.viz import picture_image, save_image, save_samples, save_strip

VARIATION_STRENGTH = 0.5  # --strength without --mask
INTERPOLATION_SPACING = "karras"  # of the DDIM chosen for interpolation when no sampler is named
INPAINTING_STEPS = 50  # of the ancestral sampler for --mask when no sampler is named (docs/benchmarks/editing.md)
GIF_SCALE = 4  # the animation's pixels per image pixel
GIF_FRAME_MS = 150


@dataclass(frozen=True)
class ImageEdit:
    """Variations of an image of the user's (``--init-image``, ``--strength``) or, with a
    ``mask``, an inpainting of it (``--mask``, ``--resample-jumps``, ``--resample-every``)."""

    image: Path
    strength: float | None = None  # default: VARIATION_STRENGTH, 1 with a mask
    mask: Path | None = None
    resample_jumps: int = 0
    resample_every: int = RESAMPLE_EVERY

    def __post_init__(self) -> None:
        if self.mask is None and (self.resample_jumps or self.resample_every != RESAMPLE_EVERY):
            raise UserError("--resample-jumps/--resample-every are RePaint's resampling: they need --mask")
        if self.strength is not None and not 0 <= self.strength <= 1:
            raise UserError(f"--strength must lie in [0, 1]; got {self.strength:g}")

    @property
    def chosen_strength(self) -> float:
        if self.strength is not None:
            return self.strength
        return 1.0 if self.mask is not None else VARIATION_STRENGTH

    def check_sampler(self, sampler: str | None) -> None:
        """A one-line error when the sampler asked for (if any) cannot inpaint."""
        if self.mask is not None and sampler is not None and sampler not in INPAINTING_SAMPLERS:
            raise UserError(
                f"--mask replaces the known pixels after every step, which needs --sampler ddpm or ddim (one "
                f"step at a time), not {sampler}"
            )

    def read(self, data: DataConfig) -> Edit:
        """The :class:`~ddpm_cars.editing.Edit` of this request, its files read and prepared
        like the run's training images (``data``)."""
        init = read_image(self.image, data.image_size, data.crop, channels=data.channel_count)
        if self.mask is None:
            return Edit(init, self.chosen_strength)
        mask = read_mask(self.mask, self.image, data.image_size, data.crop)
        return Edit(init, self.chosen_strength, Inpainting(mask, self.resample_jumps, self.resample_every))

    def sampling(self, asked: dict[str, Any], run_sample: SampleConfig, timesteps: int) -> tuple[dict[str, Any], str]:
        """The sample overrides for a mask, and a note for the closing line: as ``asked``,
        unless no sampler was asked for and the run samples with a multistep solver, which
        cannot replace the known pixels after each step; then ancestral sampling on 50 uniform
        steps (at most T; or the ``--steps``/``--spacing`` given), DDIM if ``--eta`` was given,
        and a one-line error for ``--churn``, which is Heun's."""
        if self.mask is None or "sampler" in asked or run_sample.sampler in INPAINTING_SAMPLERS:
            return asked, ""
        if "churn" in asked:
            raise UserError(
                "--churn is Heun's, which cannot inpaint (--mask needs one step at a time): "
                "drop it, or name --sampler ddpm or ddim"
            )
        sampler = "ddim" if "eta" in asked else "ddpm"
        chosen = {"steps": min(INPAINTING_STEPS, timesteps), "spacing": "uniform", **asked, "sampler": sampler}
        return chosen, f"; the run samples with {run_sample.sampler}, which cannot inpaint"

    def write_inputs(self, out: Path, edit: Edit) -> tuple[str, str]:
        """input.png (the prepared image) and, when inpainting, masked.png (the redrawn part
        grey); returns what was drawn and the files written, for the command's closing line."""
        out.mkdir(parents=True, exist_ok=True)
        save_image(edit.init, out / "input.png")
        if edit.mask is None:
            return f"; variations of {self.image}, strength {edit.strength:g}", ", input.png"
        mask = edit.mask.mask if isinstance(edit.mask, Inpainting) else edit.mask
        save_image(edit.init * (1 - mask[0]), out / "masked.png")
        how = f"; inpainting the white of {self.mask} in {self.image}, strength {edit.strength:g}"
        return how, ", input.png, masked.png"


@dataclass(frozen=True)
class Interpolation:
    """Frames along the sphere between the starting noises of two seeds (``--interpolate``)
    or of two images inverted with DDIM (``--interpolate-images``), both ends included."""

    seeds: tuple[int, int] | None = None
    images: tuple[Path, Path] | None = None
    frames: int = 9

    def __post_init__(self) -> None:
        if (self.seeds is None) == (self.images is None):
            raise UserError("an interpolation goes between two seeds or between two images: give one pair")
        if self.frames < 2:
            raise UserError(f"--frames must be at least 2 (both ends); got {self.frames}")


def _size_of(path: Path, flag: str) -> tuple[int, int]:
    from PIL import Image

    if not path.exists():
        raise MissingFileError(f"{flag} {path}: no such file")
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError) as err:
        raise UserError(f"{flag} {path} is not an image this tool can read ({type(err).__name__}: {err})") from None


def read_image(path: Path, size: int, crop: str, flag: str = "--init-image", channels: int = 3) -> torch.Tensor:
    """The image at ``path`` as ``[channels, S, S]`` in [-1, 1] (3: RGB, 1: grayscale), cropped
    and resized like training images."""
    _size_of(path, flag)
    try:
        # "bbox" without a box: squashed, as "none"
        return to_model_range(load_image(path, size, crop, channels=channels))
    except (OSError, ValueError, DataError) as err:
        raise UserError(f"{flag} {path} could not be decoded ({err})") from None


def read_mask(path: Path, image: Path, size: int, crop: str) -> torch.Tensor:
    """``[1, S, S]``: 1 where the mask at ``path`` is light (redraw), 0 where it is dark (keep);
    it must have the pixel size of ``image`` and is cropped and resized like it."""
    mask_size, image_size = _size_of(path, "--mask"), _size_of(image, "--init-image")
    if mask_size != image_size:
        raise UserError(
            f"--mask {path} is {mask_size[0]}x{mask_size[1]} pixels but --init-image {image} is "
            f"{image_size[0]}x{image_size[1]}: the mask must have the image's size"
        )
    grey = (read_image(path, size, crop, "--mask") + 1).mean(0, keepdim=True) / 2
    return (grey > 0.5).float()


def deterministic_config(sample: SampleConfig, asked: dict[str, Any]) -> tuple[SampleConfig, str]:
    """``sample`` if it is deterministic; else, when no sampler was ``asked`` for, DDIM with eta 0
    on its number of steps, spaced by noise level (karras) unless a spacing was asked for --
    on the demo model that halves DDIM inversion's reconstruction error against uniform
    spacing (docs/benchmarks/editing.md); else a one-line error. Also a note on what was chosen."""
    if is_deterministic(sample):
        return sample, ""
    if "sampler" in asked or "eta" in asked or "churn" in asked:
        try:
            require_deterministic(sample)
        except ValueError as err:
            raise UserError(f"interpolation: {err}") from None
    spacing = asked.get("spacing", INTERPOLATION_SPACING)
    chosen = dataclasses.replace(sample, sampler="ddim", eta=0.0, spacing=spacing)
    return chosen, f"; the run samples with {sample.sampler}, frames need a deterministic sampler"


def write_interpolation(out: Path, frames: torch.Tensor, weights: list[float], title: str) -> None:
    """images/NNNN.png, interpolation.png (the strip) and interpolation.gif (there and back)."""
    from PIL import Image

    save_samples(frames, out, nrow=len(frames))
    save_strip([(f"{w:.2f}", f) for w, f in zip(weights, frames)], out / "interpolation.png", title)
    size = frames.shape[-1] * GIF_SCALE
    pictures = [picture_image(p).resize((size, size), Image.NEAREST) for p in to_uint8(frames)]
    loop = pictures + pictures[-2:0:-1]
    loop[0].save(out / "interpolation.gif", save_all=True, append_images=loop[1:], duration=GIF_FRAME_MS, loop=0)
