r"""Whether a grayscale folder should train a one-channel network: the demo recipe on toy
cars converted to gray (PIL's luma, written as mode-L PNGs), trained as one channel
(``--image-channels auto``, which finds 1) and as three identical channels
(``--image-channels 3``), from the same seeds for the same steps, arms alternating.

Each training is timed alone (its data already decoded into the cache): images per second
of training. Each model then draws ``--num`` images with the demo's own sampler (seed 0),
scored against the gray training images in one channel by SWD (x1e3) and the toy-car
judge's FD and KID: a three-channel model's samples are reduced to one channel by the same
luma first, which is what a user of its samples would do. For the three-channel arm the
record also holds how far its channels disagree: the mean absolute difference, in 8-bit
levels, between each channel and the sample's luma (colour where the data has none).

Usage (one JSON line a training into RECORD):

    python -m studies.channels --root runs/channels --record docs/benchmarks/channels/record.jsonl --seeds 1,2,3

It prints each arm's means and the difference one channel minus three with its 95% interval
by Welch's t over the trainings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddpm_cars import run as ckpt
from ddpm_cars.config import DataConfig
from ddpm_cars.data import build_dataset
from ddpm_cars.data.dataset import to_uint8
from ddpm_cars.data.folder import luma
from ddpm_cars.data.toy_cars import generate_toy_cars
from ddpm_cars.evaluation import scores
from ddpm_cars.generation import QUIET, generate
from ddpm_cars.presets import DEMO
from ddpm_cars.run import Run
from ddpm_cars.training import train
from studies.provenance import provenance
from studies.recipe import welch_interval

ARMS = {"one": "auto", "three": "3"}  # arm -> --image-channels


def grey_cars(folder: Path) -> Path:
    """The demo's training images (toy cars of seed 0, at its size and count) as mode-L PNGs."""
    count, size = DEMO.data.toy_count, DEMO.data.image_size
    if len(list(folder.glob("*.png"))) == count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    images, _ = generate_toy_cars(count, size, seed=0)
    for i, grey in enumerate(luma(torch.from_numpy(images))):
        Image.fromarray(grey[0].numpy(), mode="L").save(folder / f"{i:05d}.png")
    return folder


def train_arm(folder: Path, out: Path, channels: str, seed: int) -> dict:
    """Train the demo recipe on ``folder`` into ``out``; the training's seconds and images/s."""
    config = DEMO.replace(data={"source": str(folder), "image_channels": channels}, train={"seed": seed})
    build_dataset(config.data, progress=False)  # decoded (or opened) before the clock starts
    shutil.rmtree(out, ignore_errors=True)  # a training cut short starts again
    tic = time.perf_counter()
    result = train(config, out, progress=False, final_grid=False)
    seconds = time.perf_counter() - tic
    images = result.step * config.train.batch_size
    return {"train_seconds": round(seconds, 1), "images_per_second": round(images / seconds, 1), "steps": result.step}


def score_run(out: Path, reference: scores.ReferenceData, num: int) -> dict:
    """The run's ``num`` samples (seed 0, its own sampler), in one channel, against ``reference``."""
    trained = Run.open(out)
    images = to_uint8(generate(trained.denoiser(), num, trained.config.sample, seed=0, batch_size=36, watch=QUIET))
    cell: dict = {"sampler": f"{trained.config.sample.sampler} {trained.config.sample.steps} steps"}
    if images.shape[1] == 3:
        grey = luma(images)
        cell["channel_spread"] = round(float((images.float() - grey.float()).abs().mean()), 3)
        images = grey
    metrics, _ = scores.score(images, reference, memorization=False, progress=False)
    cell.update({name: round(float(metrics[name]), 4) for name in ("swd", "judge_fd", "judge_kid")})
    weights = ckpt.latest_checkpoint(out) / ckpt.MODEL_FILE
    cell["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    return cell


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="folder of the gray images and the runs")
    parser.add_argument("--record", type=Path, required=True, help="JSON-lines record, one line a training")
    parser.add_argument("--seeds", default="1,2", help="training seeds, comma-separated (default: 1,2)")
    parser.add_argument("--num", type=int, default=144, help="images scored a model (default: 144)")
    args = parser.parse_args(argv)
    folder = grey_cars(args.root / "grey-cars")
    grey = DataConfig(source=str(folder), image_size=DEMO.data.image_size, image_channels="1")
    reference = scores.load_reference(grey, 0, progress=False)
    done = set()
    if args.record.is_file():
        done = {(c["arm"], c["seed"]) for c in map(json.loads, args.record.read_text().splitlines())}
    args.record.parent.mkdir(parents=True, exist_ok=True)
    for seed in map(int, args.seeds.split(",")):
        for arm, channels in ARMS.items():
            if (arm, seed) in done:
                continue
            out = args.root / f"{arm}-s{seed}"
            cell = {"arm": arm, "image_channels": channels, "seed": seed, **train_arm(folder, out, channels, seed)}
            cell.update(score_run(out, reference, args.num))
            cell.update(provenance(torch.device("cpu")))
            print(json.dumps(cell), flush=True)
            with open(args.record, "a") as handle:
                handle.write(json.dumps(cell) + "\n")
    summarise([json.loads(line) for line in args.record.read_text().splitlines()])


def summarise(cells: list[dict]) -> None:
    """Each arm's means, and one channel minus three with its 95% interval (Welch's t over
    the trainings) on each figure."""
    figures = ("images_per_second", "swd", "judge_fd", "judge_kid")
    arms = {arm: [c for c in cells if c["arm"] == arm] for arm in ARMS}
    for arm, mine in arms.items():
        means = ", ".join(f"{k} {np.mean([c[k] for c in mine]):.3f}" for k in figures)
        print(f"{arm}: {len(mine)} trainings, {means}")
    if min(map(len, arms.values())) >= 2:
        for k in figures:
            diff, low, high = welch_interval([c[k] for c in arms["one"]], [c[k] for c in arms["three"]])
            print(f"one - three, {k}: {diff:+.3f} [{low:+.3f}, {high:+.3f}]")


if __name__ == "__main__":
    main()
