"""Quality and speed of each sampler against its step count, on a trained run.

Quality is the offline sample metric of ``ddpm-cars eval``: the sliced Wasserstein
distance on Laplacian-pyramid patches (x1e3; lower is better) against the run's training
images, per level and averaged, with pixel precision/recall. Residual noise, the typical
failure of a sampler with too few steps, shows at the finest level. The first row scores
held-out real images the same way: the floor a perfect sampler would reach.

Usage:
    python -m ddpm_cars.benchmarks.sampler_quality --run runs/demo --num 500 --groups 3 --out docs/benchmarks/samplers.png

With ``--groups G`` each setting draws G x NUM samples (seeds 0 to G x NUM - 1) and scores
them as G groups: the table gives the mean and, for SWD, the range of the groups.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from ddpm_cars.data import build_dataset
from ddpm_cars.data.dataset import to_uint8
from ddpm_cars.evaluation.sample_metrics import sample_metrics
from ddpm_cars.run import Run
from ddpm_cars.generation import generate
from ddpm_cars.viz import save_grid

SETTINGS = "ddpm:1000,ddpm:250,ddpm:100,ddpm:50,ddim:100,ddim:50,ddim:20,dpm++:50,dpm++:20,dpm++:10"


def network_calls(sampler: str, steps: int) -> int:
    """Network evaluations per image: one per step, except Heun's two (one on the last)."""
    return 2 * steps - 1 if sampler == "heun" else steps


def _row(label: str, steps: str, rate: str, groups: list[dict[str, float]], levels: list[str]) -> str:
    """One table row: each score's mean over the groups, SWD with its spread (the range
    of the group scores) when there is more than one group."""
    mean = {k: statistics.fmean(g[k] for g in groups) for k in groups[0]}
    swd = f"{mean['swd']:.2f}"
    if len(groups) > 1:
        swd += f" ({min(g['swd'] for g in groups):.1f}-{max(g['swd'] for g in groups):.1f})"
    cells = [swd, *(f"{mean[k]:.2f}" for k in levels),
             f"{mean['precision_pixels']:.2f} / {mean['recall_pixels']:.2f}"]
    return f"| {label} | {steps} | {rate} | " + " | ".join(cells) + " |"


def score_groups(images: torch.Tensor, train: torch.Tensor, groups: int) -> list[dict[str, float]]:
    """The offline metric of each of ``groups`` equal, consecutive parts of ``images``."""
    size = images.shape[0] // groups
    return [sample_metrics(images[i * size:(i + 1) * size], train, description="")[0] for i in range(groups)]


def parse_settings(text: str) -> list[tuple[str, int, str, dict[str, float | str]]]:
    """``sampler:steps[:spacing][:field=value...],...`` as (sampler, steps, spacing, other
    sampling fields) (uniform spacing by default): ``heun:10:karras:churn=40``."""
    out = []
    for item in text.split(","):
        name, steps, *rest = item.split(":")
        spacing = rest.pop(0) if rest and "=" not in rest[0] else "uniform"
        fields = dict(part.split("=", 1) for part in rest)
        out.append((name, int(steps), spacing, {k: _number_or_text(v) for k, v in fields.items()}))
    return out


def _number_or_text(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="trained run directory")
    parser.add_argument("--num", type=int, default=500, help="samples per setting (default: 500)")
    parser.add_argument("--out", type=Path, default=None, help="PNG with the first 6 samples of each setting")
    parser.add_argument("--settings", default=None, metavar="S:N[:SPACING][:FIELD=V],...",
                        help="sampler:steps[:spacing][:field=value] to run, e.g. ddim:50,dpm++:20:karras,heun:10:karras:churn=40 "
                             "(default: the full list)")
    parser.add_argument("--groups", type=int, default=1,
                        help="score GROUPS x NUM samples as GROUPS groups of NUM and report the mean and the range (default: 1)")
    parser.add_argument("--batch-size", type=int, default=50, help="images per sampling batch (default: 50)")
    return parser.parse_args()


def main() -> None:
    args = parse_arguments()
    settings = parse_settings(args.settings or SETTINGS)

    run = Run.open(args.run)
    config = run.config
    denoiser = run.denoiser(ema=True)
    train = build_dataset(config.data, progress=False).images
    total = args.num * args.groups
    heldout = build_dataset(dataclasses.replace(config.data, split="test", toy_count=total), progress=False).images
    floor = score_groups(heldout[:total], train, args.groups)
    levels = [k for k in floor[0] if k.startswith("swd_")]
    what = f"{args.groups} groups of {args.num}" if args.groups > 1 else f"{args.num}"
    print(f"{run.checkpoint}, {what} samples per setting, seed 0; against {train.shape[0]} training images\n")
    print("| sampler | steps (calls) | img/s | SWD | " + " | ".join(f"SWD {k[4:]}px" for k in levels) + " | precision / recall |")
    print("| --- | ---: | ---: | ---: |" + " ---: |" * len(levels) + " ---: |")
    print(_row("held-out real images", "", "", floor, levels), flush=True)
    rows = []
    for sampler, steps, spacing, extra in settings:
        if steps > denoiser.schedule.timesteps:
            continue
        sample = dataclasses.replace(config.sample, sampler=sampler, steps=steps, spacing=spacing, **extra)
        tic = time.perf_counter()
        images = generate(denoiser, total, sample, seed=0, batch_size=min(total, args.batch_size), progress=False)
        rate = total / (time.perf_counter() - tic)
        metrics = score_groups(to_uint8(images), train, args.groups)
        calls = network_calls(sampler, steps)
        label = ", ".join([sampler] + ([spacing] if spacing != "uniform" else []) + [f"{k} {v:g}" if isinstance(v, float)
                                                                                     else f"{k} {v}" for k, v in extra.items()])
        print(_row(label, f"{steps}" if calls == steps else f"{steps} ({calls})", f"{rate:.2f}", metrics, levels),
              flush=True)
        rows.append(images[:6])
    if args.out is not None:
        save_grid(torch.cat(rows), args.out, nrow=6)
        print(f"\nWrote {args.out}: one row per setting, in the table's order")


if __name__ == "__main__":
    main()
