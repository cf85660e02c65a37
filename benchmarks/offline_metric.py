"""Does the offline metric (SWD) rank real images, a late checkpoint and an early one?

Scores, against the run's training images, (1) held-out real images, (2) samples of a
late checkpoint and (3) samples of an early one, each in ``--groups`` disjoint groups of
``--num`` images, and prints the mean and spread per group as a Markdown table. Then times
the offline evaluation of 1,000 images at ``--timing-size`` pixels (SWD, pixel
precision/recall and the memorisation check against the training set), sampling aside.

Usage:
    python benchmarks/offline_metric.py --early runs/early --late runs/demo --num 300 --groups 3
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from ddpm_cars.config import RunConfig
from ddpm_cars.data import build_dataset, toy_cars_dataset
from ddpm_cars.data.dataset import to_uint8
from ddpm_cars.evaluation.memorization import memorization_check
from ddpm_cars.evaluation.sample_metrics import sample_metrics
from ddpm_cars.models import build_model
from ddpm_cars.samplers import generate
from ddpm_cars.schedule import build_schedule
from ddpm_cars.training import checkpoint as ckpt

COLUMNS = ["swd", "swd_32", "swd_16", "precision_pixels", "recall_pixels"]


def checkpoint_images(run: Path, num: int) -> tuple[torch.Tensor, str]:
    run_dir, checkpoint = ckpt.resolve_checkpoint(run)
    config = RunConfig.load(run_dir / ckpt.CONFIG_FILE)
    model = ckpt.load_weights(build_model(config), checkpoint, ema=True)
    images = generate(model, build_schedule(config.diffusion), num, config.data.image_size, 0, config.sample,
                      diffusion_config=config.diffusion, batch_size=256, precision=config.train.precision)
    return to_uint8(images), f"{checkpoint.parent.parent.name}/{checkpoint.name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--early", type=Path, required=True, help="run (or checkpoint) trained briefly")
    parser.add_argument("--late", type=Path, required=True, help="run (or checkpoint) trained longer, same data")
    parser.add_argument("--num", type=int, default=300, help="images per group (default: 300)")
    parser.add_argument("--groups", type=int, default=3, help="disjoint groups per row (default: 3)")
    parser.add_argument("--timing-size", type=int, default=64, help="pixels of the timed 1,000 images (default: 64)")
    args = parser.parse_args()

    run_dir, _ = ckpt.resolve_checkpoint(args.late)
    data = RunConfig.load(run_dir / ckpt.CONFIG_FILE).data
    train = build_dataset(data, progress=False).images
    total = args.num * args.groups
    heldout = build_dataset(dataclasses.replace(data, split="test", toy_count=total), progress=False).images[:total]
    rows = [("held-out real images", heldout)]
    for label, run in (("late", args.late), ("early", args.early)):
        images, name = checkpoint_images(run, total)
        rows.append((f"samples, {label} ({name})", images))

    print(f"\nAgainst {train.shape[0]} training images ({data.source}, {data.image_size}px); {args.groups} groups "
          f"of {args.num} images per row; mean +- std over the groups\n")
    print("| images | " + " | ".join(COLUMNS) + " |")
    print("| --- |" + " ---: |" * len(COLUMNS))
    for label, images in rows:
        per_group = [sample_metrics(images[g * args.num:(g + 1) * args.num], train, description="", seed=g)[0]
                     for g in range(args.groups)]
        cells = []
        for column in COLUMNS:
            values = [m[column] for m in per_group]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3g} +- {spread:.2g}")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)

    size = args.timing_size
    reference = toy_cars_dataset(8192, size).images
    scored = toy_cars_dataset(1000, size, seed=1).images
    heldout = toy_cars_dataset(2000, size, seed=1).images[1000:]
    tic = time.perf_counter()
    sample_metrics(scored, reference, description="")
    middle = time.perf_counter()
    memorization_check(scored, reference, heldout)
    done = time.perf_counter()
    print(f"\n1,000 images at {size}x{size} against 8,192 training images, {torch.get_num_threads()} threads: "
          f"SWD + pixel precision/recall {middle - tic:.1f} s, memorisation check (1,000 held-out too) "
          f"{done - middle:.1f} s, total {done - tic:.1f} s")


if __name__ == "__main__":
    main()
