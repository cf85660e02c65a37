"""How good are a run's inpaintings and variations?

Inpainting: held-out real toy cars with their lower half masked are filled in (RePaint,
with and without resampling), and the fills are scored like samples -- SWD x1e3 against the
run's training images -- next to the same number of ordinary samples and of the held-out
images themselves (the floor). Variations (SDEdit): one variation of each held-out car at
each strength, judged by the ``guidance`` command's classifier (trained on the run's own
labelled training images): the share that keeps the input's body type should fall as the
strength rises, towards the 1-in-6 of a fresh sample. Also writes a picture of each.

Usage:
    python -m studies.editing_quality --run runs/demo --num 200 --out docs/benchmarks/editing
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from ddpm_cars.data import build_dataset
from ddpm_cars.data.dataset import to_model_range, to_uint8
from ddpm_cars.editing import Edit, Inpainting, strength_timesteps
from ddpm_cars.evaluation.class_accuracy import ClassifierTraining, predict, train_classifier
from ddpm_cars.evaluation.sample_metrics import sample_metrics
from ddpm_cars.generation import QUIET, generate
from ddpm_cars.run import Run
from ddpm_cars.schedule import visited_timesteps
from ddpm_cars.viz import save_grid

STRENGTHS = (0.25, 0.5, 0.75, 1.0)
SHOWN = 8  # inputs in each picture


def lower_half_mask(size: int) -> torch.Tensor:
    mask = torch.zeros(1, size, size)
    mask[:, size // 2 :] = 1
    return mask


def lower_halves(images: torch.Tensor) -> torch.Tensor:
    """Each image's lower half above itself: a square of the redrawn part alone, so that
    SWD compares fills with the same part of real images, without the kept half."""
    size = images.shape[-1]
    lower = images[..., size // 2 :, :]
    return torch.cat([lower, lower], dim=-2)


def _swd(images: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    return sample_metrics(images if images.dtype == torch.uint8 else to_uint8(images), reference, description="")[0]


def _swd_row(label: str, images: torch.Tensor, train: torch.Tensor, seconds: float | None = None) -> str:
    metrics, lower = (
        _swd(images, train),
        _swd(lower_halves(to_uint8(images) if images.dtype != torch.uint8 else images), lower_halves(train)),
    )
    levels = ", ".join(f"{k[4:]} px {metrics[k]:.1f}" for k in metrics if k.startswith("swd_"))
    rate = "" if seconds is None else f"{images.shape[0] / seconds:.2f}"
    return f"| {label} | {rate} | {metrics['swd']:.1f} | {levels} | {lower['swd']:.1f} |"


def inpainting(
    run: Run, heldout: torch.Tensor, train: torch.Tensor, jumps: list[int], batch: int, out: Path | None
) -> None:
    denoiser, config = run.denoiser(ema=True), run.config
    init, num = to_model_range(heldout), heldout.shape[0]
    print(
        f"Inpainting the lower half of {num} held-out toy cars ({config.sample.sampler}, {config.sample.steps} steps)\n"
    )
    print("| images | img/s | SWD | SWD by level | SWD of the lower halves |\n| --- | ---: | ---: | --- | ---: |")
    print(_swd_row("held-out real images (the floor)", heldout, train), flush=True)
    tic = time.perf_counter()
    samples = generate(denoiser, num, config.sample, seed=0, batch_size=batch, watch=QUIET)
    print(_swd_row("ordinary samples", samples, train, time.perf_counter() - tic), flush=True)
    mask = lower_half_mask(init.shape[-1])
    pictures = [init[:SHOWN], init[:SHOWN] * (1 - mask)]
    for j in jumps:
        tic = time.perf_counter()
        filled = generate(
            denoiser,
            num,
            config.sample,
            seed=0,
            batch_size=batch,
            edit=Edit(init, mask=Inpainting(mask, jumps=j, every=10)),
            watch=QUIET,
        )
        label = "inpainted, no resampling" if j == 0 else f"inpainted, resampling {j} jumps every 10 steps"
        print(_swd_row(label, filled, train, time.perf_counter() - tic), flush=True)
        pictures.append(filled[:SHOWN])
    if out is not None:
        save_grid(torch.cat(pictures), out / "inpainting.png", nrow=SHOWN, scale=2)


def variations(
    run: Run, heldout: torch.Tensor, labels: torch.Tensor, train, train_labels, batch: int, out: Path | None
) -> None:
    denoiser, config = run.denoiser(ema=True), run.config
    names = run.config.model.class_names or build_dataset(config.data, progress=False).class_names
    classifier = train_classifier(train, train_labels, len(names), ClassifierTraining(steps=500, seed=0))
    own = (predict(classifier, heldout) == labels).float().mean().item()
    print(
        f"\nVariations of {heldout.shape[0]} held-out toy cars, one each, judged by a classifier of the "
        f"{len(names)} body types (its accuracy on the inputs themselves: {own:.3f})\n"
    )
    print("| strength | steps run | keeps the body type | RMS change |\n| --- | ---: | ---: | ---: |")
    init, pictures = to_model_range(heldout), [to_model_range(heldout[:SHOWN])]
    for strength in STRENGTHS:
        varied = generate(
            denoiser,
            heldout.shape[0],
            config.sample,
            seed=0,
            batch_size=batch,
            edit=Edit(init, strength=strength),
            watch=QUIET,
        )
        kept = (predict(classifier, varied) == labels).float().mean().item()
        rms = (varied - init).pow(2).mean().sqrt().item()
        visited = visited_timesteps(denoiser.schedule, config.sample)
        steps = len(strength_timesteps(visited, strength, denoiser.schedule.timesteps))
        print(f"| {strength:g} | {steps} | {kept:.3f} | {rms:.3f} |", flush=True)
        pictures.append(varied[:SHOWN])
    if out is not None:
        save_grid(torch.cat(pictures), out / "variations.png", nrow=SHOWN, scale=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="trained run directory (toy cars)")
    parser.add_argument("--num", type=int, default=200, help="held-out images, fills and samples (default: 200)")
    parser.add_argument(
        "--jumps", default="0,4", help="RePaint resampling jumps to measure, comma-separated (default: 0,4)"
    )
    parser.add_argument("--batch-size", type=int, default=50, help="images per sampling batch (default: 50)")
    parser.add_argument("--out", type=Path, default=None, help="folder for inpainting.png and variations.png")
    args = parser.parse_args()
    run = Run.open(args.run)
    data = run.config.data
    train_set = build_dataset(data, progress=False)
    heldout = build_dataset(dataclasses.replace(data, split="test", toy_count=args.num), progress=False)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    print(f"{run.checkpoint}; against its {train_set.images.shape[0]} training images; seed 0\n")
    inpainting(
        run, heldout.images, train_set.images, [int(j) for j in args.jumps.split(",")], args.batch_size, args.out
    )
    variations(run, heldout.images, heldout.labels, train_set.images, train_set.labels, args.batch_size, args.out)


if __name__ == "__main__":
    main()
