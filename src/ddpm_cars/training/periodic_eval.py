"""Sample metrics during training (``--eval-every``): a few samples from the current
(EMA) weights, scored against the training images, one row of ``metrics.csv`` each time,
drawn in ``metrics.png``.

The offline metrics (SWD, and FD/KID on the toy-car judge's features: the judge is trained
at the first evaluation, in seconds, then read from the cache) are always computed; FID and
KID too when the Inception weights are already on disk (training never waits for a download).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import torch

from ddpm_cars.config import RunConfig
from ddpm_cars.data.dataset import to_uint8
from ddpm_cars.denoiser import Denoiser
from ddpm_cars.evaluation.scores import ReferenceData, describe, load_inception, score
from ddpm_cars.evaluation.swd import pyramid_resolutions
from ddpm_cars.files import atomic_write_text
from ddpm_cars.generation import QUIET, generate
from ddpm_cars.viz import save_metric_curves

METRICS_CSV = "metrics.csv"
EVAL_SEED = 1  # other noise than the sample grids'


def read_metrics_log(path: Path, up_to_step: int) -> list[dict[str, float]]:
    """Rows of ``metrics.csv`` up to ``up_to_step`` (later rows belong to a lost future)."""
    if not path.is_file():
        return []
    rows = []
    for row in csv.DictReader(io.StringIO(path.read_text())):
        try:
            values = {k: (float(v) if v not in ("", None) else math.nan) for k, v in row.items() if k}
        except ValueError:
            continue
        if values.get("step", math.inf) <= up_to_step:
            values["step"] = int(values["step"])
            rows.append(values)
    return rows


def write_metrics_log(run_dir: Path, rows: list[dict[str, float]]) -> None:
    columns = ["step"] + sorted({k for r in rows for k in r if k != "step"}, key=lambda k: (not k.startswith("swd"), k))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(
            [
                ""
                if row.get(c) is None or (isinstance(row.get(c), float) and math.isnan(row[c]))
                else (row[c] if c == "step" else f"{row[c]:.6g}")
                for c in columns
            ]
        )
    atomic_write_text(run_dir / METRICS_CSV, buf.getvalue())
    if rows:
        save_metric_curves(rows, run_dir / "metrics.png")


class PeriodicEval:
    """Call with the denoiser to score and the step; appends the row and redraws the curves."""

    def __init__(
        self,
        config: RunConfig,
        run_dir: Path,
        train_images: torch.Tensor,
        resume_step: int = 0,
        inception_weights: str | Path | None = None,
        device: torch.device | str = "cpu",
    ):
        pyramid_resolutions(config.data.image_size)  # SWD's sizes: fail now, not at the first evaluation
        self.config, self.run_dir = config, run_dir
        self.reference = ReferenceData(train_images.cpu(), describe(config.data), None)
        self.inception, self.fid_skipped = load_inception(inception_weights, device, download=False)
        self.rows = read_metrics_log(run_dir / METRICS_CSV, resume_step)

    def __call__(self, denoiser: Denoiser, step: int) -> dict[str, float]:
        num = self.config.train.eval_samples
        samples = generate(denoiser, num, self.config.sample, seed=EVAL_SEED, batch_size=min(num, 256), watch=QUIET)
        metrics, _ = score(to_uint8(samples), self.reference, self.inception, memorization=False, progress=False)
        row = {"step": step, **metrics}
        self.rows.append(row)
        write_metrics_log(self.run_dir, self.rows)
        return row
