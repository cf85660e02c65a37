"""The loss log of a run: ``loss.csv`` (one row per optimizer step) and ``loss.png``, and
the losses of the steps not yet read from the device."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import torch

from ddpm_cars.config import DiffusionConfig
from ddpm_cars.files import atomic_write_text
from ddpm_cars.viz import save_loss_curve

LOSS_CSV = "loss.csv"


def read_loss_log(path: Path, up_to_step: int) -> list[tuple[int, float]]:
    """Rows of ``loss.csv`` up to ``up_to_step``; anything later or malformed is dropped."""
    if not path.is_file():
        return []
    rows = []
    for row in csv.reader(path.read_text().splitlines()[1:]):
        try:
            step, loss = int(row[0]), float(row[1])
        except (ValueError, IndexError):
            continue
        if step <= up_to_step:
            rows.append((step, loss))
    return rows


def loss_label(config: DiffusionConfig) -> str:
    """What the logged loss is, for the loss curve's axis."""
    target = {"eps": "the noise", "x0": "x_0", "v": "v"}[config.prediction]
    label = f"{config.loss.upper()} loss on {target}"
    return f"{label} + {config.vlb_weight:g} L_vlb" if config.learn_variance else label


def write_loss_log(run_dir: Path, rows: list[tuple[int, float]], loss_name: str) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["step", "loss"])
    writer.writerows((s, f"{v:.6f}") for s, v in rows)
    atomic_write_text(run_dir / LOSS_CSV, buf.getvalue())
    if rows:
        save_loss_curve([s for s, _ in rows], [v for _, v in rows], run_dir / "loss.png", loss_name)


class LossLog:
    """The losses of a run so far (those a resume keeps), written with every checkpoint."""

    def __init__(self, run_dir: Path, config: DiffusionConfig, resume_step: int = 0):
        self.run_dir, self.label = run_dir, loss_label(config)
        self.rows = read_loss_log(run_dir / LOSS_CSV, resume_step)

    def append(self, step: int, loss: float) -> None:
        self.rows.append((step, loss))

    @property
    def last(self) -> float:
        return self.rows[-1][1] if self.rows else float("nan")

    def write(self) -> None:
        write_loss_log(self.run_dir, self.rows, self.label)


class PendingSteps:
    """The steps since the last read: each one's loss and whether its update was
    applied, kept on the device until :meth:`read` brings them over in one transfer."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.records: list[torch.Tensor] = []
        self.since = time.perf_counter()

    def __len__(self) -> int:
        return len(self.steps)

    def add(self, step: int, loss: torch.Tensor, applied: torch.Tensor) -> None:
        self.steps.append(step)
        self.records.append(torch.stack([loss.detach().float(), applied.float()]))

    def read(self, batch_size: int) -> tuple[list[tuple[int, float, bool]], float]:
        """``(step, loss, applied)`` of each pending step, and the images per second since
        the last read; then nothing is pending."""
        values = torch.stack(self.records).tolist() if self.records else []
        now = time.perf_counter()
        rate = batch_size * len(self.steps) / max(now - self.since, 1e-9)
        rows = [(step, loss, applied > 0.5) for step, (loss, applied) in zip(self.steps, values)]
        self.steps, self.records, self.since = [], [], now
        return rows, rate

    def restart_clock(self) -> None:
        """Start the images/s clock afresh: after work between steps (an evaluation, a
        checkpoint, a grid) that the next rate should not count as training."""
        self.since = time.perf_counter()
