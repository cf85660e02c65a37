"""Does the offline metric (SWD) rank real images, a late checkpoint and an early one?

Scores, against the run's training images, (1) held-out real images, (2) samples of a
late checkpoint and (3) samples of an early one, each in ``--groups`` disjoint groups of
``--num`` images, and prints the mean and spread per group as a Markdown table. Then times
the offline evaluation of 1,000 images at ``--timing-size`` pixels (SWD, pixel
precision/recall and the memorisation check against the training set), sampling aside.

Usage:
    python -m studies.offline_metric --early runs/early --late runs/demo --num 300 --groups 3
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from ddpm_cars.data import build_dataset, toy_cars_dataset
from ddpm_cars.data.dataset import to_uint8
from ddpm_cars.evaluation.memorization import memorization_check
from ddpm_cars.evaluation.sample_metrics import sample_metrics
from ddpm_cars.generation import generate
from ddpm_cars.run import Run


def checkpoint_images(path: Path, num: int) -> tuple[torch.Tensor, str]:
    """``num`` samples (uint8) of the run's EMA weights with its sampling settings, seed 0,
    and a short name of the checkpoint."""
    run = Run.open(path)
    images = generate(run.denoiser(ema=True), num, run.config.sample, seed=0, batch_size=256)
    return to_uint8(images), f"{run.dir.name}/{run.checkpoint.name}"


def print_scores(rows: list[tuple[str, torch.Tensor]], train: torch.Tensor, num: int, groups: int) -> None:
    """One table row per image set: mean +- std of each metric over its ``groups`` groups.
    The SWD columns are the pyramid levels the image size has (one at 16 px, two at 32)."""
    columns: list[str] = []
    for label, images in rows:
        per_group = [
            sample_metrics(images[g * num : (g + 1) * num], train, description="", seed=g)[0] for g in range(groups)
        ]
        if not columns:
            levels = [key for key in per_group[0] if key.startswith("swd_")]
            columns = ["swd", *levels, "precision_pixels", "recall_pixels"]
            print("| images | " + " | ".join(columns) + " |")
            print("| --- |" + " ---: |" * len(columns))
        cells = []
        for column in columns:
            values = [m[column] for m in per_group]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3g} +- {spread:.2g}")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


def time_offline_evaluation(size: int) -> None:
    """Time SWD + pixel precision/recall and the memorisation check of 1,000 toy images."""
    reference = toy_cars_dataset(8192, size).images
    scored = toy_cars_dataset(1000, size, seed=1).images
    heldout = toy_cars_dataset(2000, size, seed=1).images[1000:]
    tic = time.perf_counter()
    sample_metrics(scored, reference, description="")
    middle = time.perf_counter()
    memorization_check(scored, reference, heldout)
    done = time.perf_counter()
    print(
        f"\n1,000 images at {size}x{size} against 8,192 training images, {torch.get_num_threads()} threads: "
        f"SWD + pixel precision/recall {middle - tic:.1f} s, memorisation check (1,000 held-out too) "
        f"{done - middle:.1f} s, total {done - tic:.1f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--early", type=Path, required=True, help="run (or checkpoint) trained briefly")
    parser.add_argument("--late", type=Path, required=True, help="run (or checkpoint) trained longer, same data")
    parser.add_argument("--num", type=int, default=300, help="images per group (default: 300)")
    parser.add_argument("--groups", type=int, default=3, help="disjoint groups per row (default: 3)")
    parser.add_argument("--timing-size", type=int, default=64, help="pixels of the timed 1,000 images (default: 64)")
    args = parser.parse_args()

    data = Run.open(args.late).config.data
    train = build_dataset(data, progress=False).images
    total = args.num * args.groups
    heldout = build_dataset(dataclasses.replace(data, split="test", toy_count=total), progress=False).images[:total]
    rows = [("held-out real images", heldout)]
    for label, run in (("late", args.late), ("early", args.early)):
        images, name = checkpoint_images(run, total)
        rows.append((f"samples, {label} ({name})", images))

    print(
        f"\nAgainst {train.shape[0]} training images ({data.source}, {data.image_size}px); {args.groups} groups "
        f"of {args.num} images per row; mean +- std over the groups\n"
    )
    print_scores(rows, train, args.num, args.groups)
    time_offline_evaluation(args.timing_size)


if __name__ == "__main__":
    main()
