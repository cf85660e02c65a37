"""Which BatchNorm statistics should the seed network sample with?

    python -m studies.batchnorm_modes --run runs/demo --num 64 --out bn_modes.png

Samples the same noise with running statistics (eval) and with per-batch statistics
(batch), and compares colour saturation and contrast of the samples with the
training data. Writes both grids side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from ddpm_cars.data import build_dataset
from ddpm_cars.data.dataset import to_model_range
from ddpm_cars.generation import QUIET, generate
from ddpm_cars.run import Run
from ddpm_cars.viz import save_grid


def colour_stats(images: torch.Tensor) -> tuple[float, float]:
    """Mean HSV saturation and mean per-image pixel standard deviation of images in [-1, 1]."""
    rgb = (images + 1) / 2
    top, bottom = rgb.amax(dim=1), rgb.amin(dim=1)
    saturation = torch.where(top > 0, (top - bottom) / top.clamp_min(1e-8), torch.zeros_like(top))
    return saturation.mean().item(), rgb.flatten(1).std(dim=1).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a run directory")
    parser.add_argument("--num", type=int, default=64, help="images per mode")
    parser.add_argument("--batch-size", type=int, default=64, help="sampling batch size")
    parser.add_argument("--out", type=Path, default=Path("bn_modes.png"), help="side-by-side picture")
    args = parser.parse_args()
    run = Run.open(args.run)
    config = run.config
    denoiser = run.denoiser(ema=False)  # the raw weights, not the moving average
    data = build_dataset(config.data, progress=False)
    real = to_model_range(data.images[: args.num])
    print(f"{run.checkpoint}, {args.num} images, batch {args.batch_size}\n")
    print("| images | saturation | per-image std |\n| --- | --- | --- |")
    print("| training data | {:.3f} | {:.3f} |".format(*colour_stats(real)))
    grids = []
    for mode in ("eval", "batch"):
        sample_config = dataclasses.replace(config.sample, batchnorm=mode)
        images = generate(denoiser, args.num, sample_config, seed=0, batch_size=args.batch_size, watch=QUIET)
        print("| samples, --batchnorm {} | {:.3f} | {:.3f} |".format(mode, *colour_stats(images)))
        grids.append(images)
    pad = torch.ones(args.num, 3, config.data.image_size, 4)
    save_grid(torch.cat([grids[0], pad, grids[1]], dim=-1), args.out, nrow=int(args.num**0.5), scale=2)
    print(f"\nWrote {args.out} (left: eval, right: batch)")


if __name__ == "__main__":
    main()
