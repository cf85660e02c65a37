"""Throughput of the pieces that set training and sampling time, on this machine.

    python benchmarks/throughput.py            # prints a Markdown table

Each number is the median of several timed repetitions after warm-up.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from ddpm_cars.config import DEMO, SEED, RunConfig
from ddpm_cars.data.toy_cars import generate_toy_cars
from ddpm_cars.diffusion import training_loss
from ddpm_cars.models import build_model, count_parameters
from ddpm_cars.schedule import build_schedule


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def train_step_rate(config: RunConfig, batch_size: int, device: torch.device, repeats: int) -> tuple[float, int]:
    """Images per second through one Adam step of the config's model and loss."""
    model = build_model(config).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    schedule = build_schedule(config.diffusion)
    size = config.data.image_size
    x0 = torch.rand(batch_size, 3, size, size, device=device) * 2 - 1
    g = torch.Generator(device).manual_seed(0)

    def step() -> None:
        t = torch.randint(0, schedule.timesteps, (batch_size,), generator=g, device=device)
        loss = training_loss(model, schedule, x0, t, torch.randn(x0.shape, generator=g, device=device), config.diffusion)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return batch_size / median_seconds(step, repeats), count_parameters(model)


def sampling_step_seconds(config: RunConfig, batch_size: int, device: torch.device, repeats: int) -> float:
    """Seconds for one reverse step (one network evaluation) on a batch."""
    model = build_model(config).to(device).eval()
    size = config.data.image_size
    x = torch.randn(batch_size, 3, size, size, device=device)
    t = torch.full((batch_size,), 500, device=device)

    @torch.no_grad()
    def step() -> None:
        model(x, t)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return median_seconds(step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device to measure")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per measurement")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {device}\n")
    print("| measurement | value |\n| --- | --- |")
    for size in (32, 64):
        rate = 500 / median_seconds(lambda: generate_toy_cars(500, size, seed=1), max(1, args.repeats // 2), 1)
        print(f"| toy cars generated, {size}x{size} | {rate:,.0f} images/s |")
    for name, config, batch in (("demo", DEMO, DEMO.train.batch_size), ("seed", SEED, 16 if device.type == "cpu" else 128)):
        rate, params = train_step_rate(config, batch, device, args.repeats)
        size = config.data.image_size
        print(f"| training, {name} preset ({params / 1e6:.1f} M params, {size}x{size}, batch {batch}) | {rate:,.1f} images/s |")
        seconds = sampling_step_seconds(config, 64, device, args.repeats)
        print(f"| sampling, {name} preset, 64 images x {config.diffusion.timesteps} steps | {seconds * config.diffusion.timesteps:,.1f} s |")


if __name__ == "__main__":
    main()
