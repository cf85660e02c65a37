"""``ddpm-cars forward`` and ``ddpm-cars report``: pictures of the process and of a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ddpm_cars.config import DataConfig, DiffusionConfig
from ddpm_cars.data import build_dataset
from ddpm_cars.diffusion import q_sample
from ddpm_cars.errors import UserError
from ddpm_cars.report import write_report
from ddpm_cars.schedule import build_schedule
from ddpm_cars.viz import evenly_spaced_steps, save_strip


@dataclass(frozen=True)
class ForwardRequest:
    """``ddpm-cars forward``: the forward process on image ``index`` of ``data`` at ``frames``
    evenly spaced t of ``diffusion``'s schedule, noise from ``seed``, drawn into ``out``."""

    out: Path = Path("forward_process.png")
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    index: int = 0
    frames: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.index < 0:
            raise UserError(f"--index must be >= 0; got {self.index}")
        if self.frames < 1:
            raise UserError(f"--frames must be >= 1; got {self.frames}")


def forward(request: ForwardRequest) -> Path:
    """Draw the strip: x_0, then x_t at each chosen t (the paper's 1-indexed t)."""
    data, index = request.data, request.index
    if data.source == "toy-cars":  # drawn in a moment: no cache entry for the first index + 1 cars
        data = DataConfig(
            source="toy-cars",
            image_size=data.image_size,
            toy_count=index + 1,
            cache="off",
            image_channels=data.image_channels,
        )
    dataset = build_dataset(data)
    if index >= len(dataset):
        raise UserError(f"--index {index} is out of range: the dataset has {len(dataset)} images")
    x0 = dataset[index][0][None]  # [1, C, S, S]
    schedule = build_schedule(request.diffusion)
    generator = torch.Generator().manual_seed(request.seed)
    strip = [("x_0 (data)", x0[0])]
    for step in evenly_spaced_steps(schedule.timesteps, request.frames):
        noise = torch.randn(x0.shape, generator=generator)
        x_t = q_sample(schedule, x0, torch.tensor([step]), noise)
        strip.append((f"t={step + 1}", x_t[0].clamp(-1, 1)))  # x_t in the paper's 1-indexed t
    request.out.parent.mkdir(parents=True, exist_ok=True)
    save_strip(strip, request.out, "Forward process q(x_t | x_0)")
    print(f"Wrote {request.out}")
    return request.out


@dataclass(frozen=True)
class ReportRequest:
    """``ddpm-cars report``: ``run``'s report.html (or ``out``)."""

    run: Path
    out: Path | None = None


def report(request: ReportRequest) -> Path:
    written = write_report(request.run, request.out)
    print(f"Wrote {written}")
    return written
