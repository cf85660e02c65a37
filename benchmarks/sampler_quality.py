"""Quality and speed of each sampler against its step count, on a trained run.

Until a sample metric (FID/KID) lands, quality is judged by two documented proxies
computed against held-out images of the run's data (toy cars: the test split):

* **HF ratio**: mean absolute response of a 3x3 Laplacian (high-frequency energy) of
  the samples divided by that of the held-out images. Residual noise, the typical
  failure of a sampler with too few steps, pushes it above 1; blur pushes it below.
* **pixel FD**: the Frechet distance between Gaussians fitted to the samples and to the
  held-out images, both average-pooled to 8x8 (192 dimensions).

Usage:
    python benchmarks/sampler_quality.py --run runs/demo --num 36 --out docs/benchmarks/samplers.png
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ddpm_cars.config import RunConfig
from ddpm_cars.data import build_dataset
from ddpm_cars.data.dataset import to_model_range
from ddpm_cars.models import build_model
from ddpm_cars.samplers import generate
from ddpm_cars.schedule import build_schedule
from ddpm_cars.training import checkpoint as ckpt
from ddpm_cars.viz import save_grid

SETTINGS = [("ddpm", 1000), ("ddpm", 250), ("ddpm", 100), ("ddpm", 50), ("ddim", 100), ("ddim", 50), ("ddim", 20),
            ("dpm++", 50), ("dpm++", 20), ("dpm++", 10)]

LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def high_frequency(images: torch.Tensor) -> float:
    """Mean |Laplacian| over pixels and channels, images in [-1, 1]."""
    kernel = LAPLACIAN.view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    return F.conv2d(images, kernel, groups=3).abs().mean().item()


def pixel_fd(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance of Gaussians fitted to 8x8 average-pooled images."""
    fa, fb = (F.adaptive_avg_pool2d(x, 8).flatten(1).double() for x in (a, b))
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    ca, cb = torch.cov(fa.T), torch.cov(fb.T)
    # trace sqrt(ca cb) via the eigenvalues of sqrt(ca) cb sqrt(ca) (symmetric PSD)
    w, v = torch.linalg.eigh(ca)
    sqrt_ca = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    middle = torch.linalg.eigvalsh(sqrt_ca @ cb @ sqrt_ca).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b) ** 2).sum().item() + (ca.trace() + cb.trace() - 2 * middle).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="trained run directory")
    parser.add_argument("--num", type=int, default=36, help="samples per setting (default: 36)")
    parser.add_argument("--reference", type=int, default=256, help="held-out images (default: 256)")
    parser.add_argument("--out", type=Path, default=None, help="PNG with the first 6 samples of each setting")
    parser.add_argument("--settings", default=None, metavar="S:N,...",
                        help="sampler:steps pairs to run, e.g. ddim:50,dpm++:20 (default: the full list)")
    args = parser.parse_args()
    settings = SETTINGS if args.settings is None else [
        (name, int(steps)) for name, steps in (item.split(":") for item in args.settings.split(","))
    ]

    run_dir, checkpoint = ckpt.resolve_checkpoint(args.run)
    config = RunConfig.load(run_dir / ckpt.CONFIG_FILE)
    model = ckpt.load_weights(build_model(config), checkpoint, ema=True)
    schedule = build_schedule(config.diffusion)
    data = dataclasses.replace(config.data, split="test", toy_count=args.reference)
    reference = to_model_range(build_dataset(data, progress=False).images[: args.reference])
    ref_hf = high_frequency(reference)
    print(f"{checkpoint}, {args.num} samples per setting, seed 0; reference: {len(reference)} held-out images\n")
    print("| sampler | steps | img/s | HF ratio | pixel FD |")
    print("| --- | ---: | ---: | ---: | ---: |")
    rows = []
    for sampler, steps in settings:
        if steps > schedule.timesteps:
            continue
        sample = dataclasses.replace(config.sample, sampler=sampler, steps=steps)
        tic = time.perf_counter()
        images = generate(model, schedule, args.num, config.data.image_size, 0, sample, diffusion_config=config.diffusion,
                          batch_size=args.num, precision=config.train.precision, progress=False)
        rate = args.num / (time.perf_counter() - tic)
        print(f"| {sampler} | {steps} | {rate:.2f} | {high_frequency(images) / ref_hf:.2f} | {pixel_fd(images, reference):.3f} |",
              flush=True)
        rows.append(images[:6])
    if args.out is not None:
        save_grid(torch.cat(rows), args.out, nrow=6)
        print(f"\nWrote {args.out}: one row per setting, in the table's order")


if __name__ == "__main__":
    main()
