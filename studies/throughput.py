"""Throughput of the pieces that set training and sampling time, on this machine.

    python -m studies.throughput            # prints a Markdown table

Each number is the median of several timed repetitions after warm-up. The networks run
at their preset's precision (the demo preset: bf16 autocast), as they train and sample.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from ddpm_cars.config import RunConfig
from ddpm_cars.data.toy_cars import generate_toy_cars
from ddpm_cars.denoiser import Denoiser
from ddpm_cars.models import build_model, count_parameters
from ddpm_cars.presets import DEMO, SEED


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step_rate(config: RunConfig, batch_size: int, device: torch.device, repeats: int) -> tuple[float, int]:
    """Images per second through one Adam step of the config's model and loss."""
    denoiser = Denoiser.for_run(build_model(config).to(device).train(), config)
    optimizer = torch.optim.Adam(denoiser.network.parameters(), lr=config.train.lr)
    size = config.data.image_size
    x0 = torch.rand(batch_size, 3, size, size, device=device) * 2 - 1
    g = torch.Generator(device).manual_seed(0)

    def step() -> None:
        t = torch.randint(0, denoiser.schedule.timesteps, (batch_size,), generator=g, device=device)
        loss = denoiser.loss(x0, t, torch.randn(x0.shape, generator=g, device=device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)

    return batch_size / median_seconds(step, repeats), count_parameters(denoiser.network)


def sampling_step_seconds(config: RunConfig, batch_size: int, device: torch.device, repeats: int) -> float:
    """Seconds for one reverse step (one network evaluation, read as a prediction) on a batch."""
    denoiser = Denoiser.for_run(build_model(config).to(device).eval(), config)
    size = config.data.image_size
    x = torch.randn(batch_size, 3, size, size, device=device)
    t = torch.full((batch_size,), denoiser.schedule.timesteps // 2, device=device)

    @torch.no_grad()
    def step() -> None:
        denoiser.predict(x, t)
        _sync(device)

    return median_seconds(step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device to measure")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per measurement")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, device {device}\n"
    )
    print("| measurement | value |\n| --- | --- |")
    for size in (32, 64):
        rate = 500 / median_seconds(lambda: generate_toy_cars(500, size, seed=1), max(1, args.repeats // 2), 1)
        print(f"| toy cars generated, {size}x{size} | {rate:,.0f} images/s |")
    for name, config, batch in (
        ("demo", DEMO, DEMO.train.batch_size),
        ("seed", SEED, 16 if device.type == "cpu" else 128),
    ):
        rate, params = train_step_rate(config, batch, device, args.repeats)
        size = config.data.image_size
        print(
            f"| training, {name} preset ({params / 1e6:.1f} M params, {size}x{size}, batch {batch}) | {rate:,.1f} "
            "images/s |"
        )
        seconds = sampling_step_seconds(config, 64, device, args.repeats)
        print(
            f"| sampling, {name} preset, 64 images x {config.diffusion.timesteps} steps | "
            f"{seconds * config.diffusion.timesteps:,.1f} s |"
        )


if __name__ == "__main__":
    main()
