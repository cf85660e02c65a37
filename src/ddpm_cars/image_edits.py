"""``ddpm-cars sample`` on given images and seeds: variations (``--init-image``), inpainting
(``--mask``) and interpolation (``--interpolate``, ``--interpolate-images``).

This module reads the user's files (prepared like the run's training images), checks them
once, and writes the pictures; the diffusion work is :mod:`ddpm_cars.editing`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from ddpm_cars import parallel
from ddpm_cars.config import SampleConfig
from ddpm_cars.data.dataset import to_model_range, to_uint8
from ddpm_cars.data.folder import DataError, load_image
from ddpm_cars.editing import INPAINTING_SAMPLERS, Inpainting, ddim_invert, interpolation_weights, slerp
from ddpm_cars.errors import MissingFileError, UserError
from ddpm_cars.generation import decode, require_deterministic
from ddpm_cars.run import Run
from ddpm_cars.samplers import image_generators, is_deterministic, randn, sampling_description
from ddpm_cars.schedule import visited_timesteps
from ddpm_cars.viz import save_image, save_samples, save_strip

VARIATION_STRENGTH = 0.5  # --strength without --mask
INTERPOLATION_SPACING = "karras"  # of the DDIM chosen for interpolation when no sampler is named
INPAINTING_STEPS = 50  # of the ancestral sampler for --mask when no sampler is named (docs/benchmarks/editing.md)
GIF_SCALE = 4  # the animation's pixels per image pixel
GIF_FRAME_MS = 150


def _size_of(path: Path, flag: str) -> tuple[int, int]:
    from PIL import Image

    if not path.exists():
        raise MissingFileError(f"{flag} {path}: no such file")
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError) as err:
        raise UserError(f"{flag} {path} is not an image this tool can read ({type(err).__name__}: {err})") from None


def read_image(path: Path, size: int, crop: str, flag: str = "--init-image") -> torch.Tensor:
    """The image at ``path`` as ``[3, S, S]`` in [-1, 1], cropped and resized like training images."""
    _size_of(path, flag)
    try:
        return to_model_range(load_image(path, size, crop))  # "bbox" without a box: squashed, as "none"
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


def edit_request(args: argparse.Namespace, crop: str, size: int) -> dict:
    """The ``generate`` keywords (init, strength, mask) of ``--init-image``/``--mask``."""
    init = read_image(args.init_image, size, crop)
    strength = args.strength if args.strength is not None else (1.0 if args.mask else VARIATION_STRENGTH)
    if args.mask is None:
        return {"init": init, "strength": strength}
    mask = Inpainting(read_mask(args.mask, args.init_image, size, crop), args.resample_jumps, args.resample_every)
    return {"init": init, "strength": strength, "mask": mask}


def check_edit_options(args: argparse.Namespace, sampler: str | None) -> None:
    """One line for each combination of the editing options that cannot work (``sampler``:
    the one asked for, if any)."""
    interpolating = args.interpolate is not None or args.interpolate_images is not None
    if interpolating and args.init_image is not None:
        raise UserError("--init-image and --interpolate/--interpolate-images are separate uses of sample: give one")
    if interpolating and args.classes:
        raise UserError("--class does not combine with --interpolate/--interpolate-images")
    if args.init_image is None and (args.mask is not None or args.strength is not None):
        raise UserError(
            f"{'--mask' if args.mask is not None else '--strength'} needs --init-image, the image it applies to"
        )
    if args.mask is None and (args.resample_jumps or args.resample_every != 10):
        raise UserError("--resample-jumps/--resample-every are RePaint's resampling: they need --mask")
    if args.mask is not None and sampler is not None and sampler not in INPAINTING_SAMPLERS:
        raise UserError(
            f"--mask replaces the known pixels after every step, which needs --sampler ddpm or ddim (one "
            f"step at a time), not {sampler}"
        )


def inpainting_overrides(
    args: argparse.Namespace, overrides: dict, run_sample: SampleConfig, timesteps: int
) -> tuple[dict, str]:
    """The sample overrides for ``--mask``, and a note for the closing line: as given, unless
    no sampler was asked for and the run samples with a multistep solver, which cannot
    replace the known pixels after each step; then ancestral sampling on 50 uniform steps
    (at most T; or the ``--steps``/``--spacing`` given), DDIM if ``--eta`` was given, and a
    one-line error for ``--churn``, which is Heun's."""
    if args.mask is None or "sampler" in overrides or run_sample.sampler in INPAINTING_SAMPLERS:
        return overrides, ""
    if "churn" in overrides:
        raise UserError(
            "--churn is Heun's, which cannot inpaint (--mask needs one step at a time): "
            "drop it, or name --sampler ddpm or ddim"
        )
    sampler = "ddim" if "eta" in overrides else "ddpm"
    chosen = {"steps": min(INPAINTING_STEPS, timesteps), "spacing": "uniform", **overrides, "sampler": sampler}
    return chosen, f"; the run samples with {run_sample.sampler}, which cannot inpaint"


def write_inputs(out: Path, request: dict, args: argparse.Namespace) -> tuple[str, str]:
    """input.png (the prepared image) and, when inpainting, masked.png (the redrawn part grey);
    returns what was drawn and the files written, for the command's closing line."""
    out.mkdir(parents=True, exist_ok=True)
    save_image(request["init"], out / "input.png")
    if "mask" not in request:
        return f"; variations of {args.init_image}, strength {request['strength']:g}", ", input.png"
    save_image(request["init"] * (1 - request["mask"].mask[0]), out / "masked.png")
    how = f"; inpainting the white of {args.mask} in {args.init_image}, strength {request['strength']:g}"
    return how, ", input.png, masked.png"


def deterministic_config(sample: SampleConfig, overrides: dict) -> tuple[SampleConfig, str]:
    """``sample`` if it is deterministic; else, when no sampler was asked for, DDIM with eta 0
    on its number of steps, spaced by noise level (karras) unless a spacing was asked for --
    on the demo model that halves DDIM inversion's reconstruction error against uniform
    spacing (docs/benchmarks/editing.md); else a one-line error. Also a note on what was chosen."""
    if is_deterministic(sample):
        return sample, ""
    if "sampler" in overrides or "eta" in overrides or "churn" in overrides:
        try:
            require_deterministic(sample)
        except ValueError as err:
            raise UserError(f"interpolation: {err}") from None
    spacing = overrides.get("spacing", INTERPOLATION_SPACING)
    chosen = dataclasses.replace(sample, sampler="ddim", eta=0.0, spacing=spacing)
    return chosen, f"; the run samples with {sample.sampler}, frames need a deterministic sampler"


def interpolate(args: argparse.Namespace) -> int:
    """--interpolate SEED_A SEED_B or --interpolate-images A B: frames, strip and GIF."""
    overrides = args.overrides.get("sample", {})
    trained = Run.open(args.checkpoint, sample=overrides)
    config = trained.config
    sample, note = deterministic_config(config.sample, overrides)
    world, dev = parallel.init_from_env(parallel.resolve_device(args.device))  # under torchrun: rank 0 writes
    den = trained.denoiser(ema=args.ema, device=dev)
    size = config.data.image_size
    if args.interpolate is not None:
        ends = torch.cat([randn((3, size, size), image_generators(seed, [0], dev), dev) for seed in args.interpolate])
        what = f"seeds {args.interpolate[0]} and {args.interpolate[1]}"
    else:
        images = torch.stack(
            [read_image(p, size, config.data.crop, "--interpolate-images") for p in args.interpolate_images]
        )
        timesteps = visited_timesteps(den.schedule, sample)
        ends = ddim_invert(den, images.to(dev), timesteps=timesteps, progress=True)
        what = (
            f"{Path(args.interpolate_images[0]).name} and {Path(args.interpolate_images[1]).name} (inverted with DDIM)"
        )
    weights = interpolation_weights(args.frames)
    x_T = torch.stack([slerp(ends[0], ends[1], w) for w in weights])
    frames = decode(den, x_T, sample, batch_size=args.batch_size)
    if not world.is_main:
        return 0
    write_interpolation(args.out, frames, weights, f"Interpolating {what}: {sampling_description(sample)}")
    print(
        f"Wrote {args.frames} frames between {what} ({sampling_description(sample)}{note}) from {trained.checkpoint} "
        f"to {args.out}/ (interpolation.png, interpolation.gif, images/)"
    )
    return 0


def write_interpolation(out: Path, frames: torch.Tensor, weights: list[float], title: str) -> None:
    """images/NNNN.png, interpolation.png (the strip) and interpolation.gif (there and back)."""
    from PIL import Image

    save_samples(frames, out, nrow=len(frames))
    save_strip([(f"{w:.2f}", f) for w, f in zip(weights, frames)], out / "interpolation.png", title)
    pixels = to_uint8(frames).permute(0, 2, 3, 1).numpy()
    size = frames.shape[-1] * GIF_SCALE
    pictures = [Image.fromarray(p).resize((size, size), Image.NEAREST) for p in pixels]
    loop = pictures + pictures[-2:0:-1]
    loop[0].save(out / "interpolation.gif", save_all=True, append_images=loop[1:], duration=GIF_FRAME_MS, loop=0)
