"""``ddpm-cars distill``: a trained run made into a student of few network calls."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from ddpm_cars.config import DistillConfig, Tracking
from ddpm_cars.errors import UserError
from ddpm_cars.training.distill import DistillResult, distill

# the settings a new distillation takes; --resume reads them from the student's distill.json
SETTINGS = tuple(f.name for f in dataclasses.fields(DistillConfig) if f.name != "teacher")


@dataclass(frozen=True)
class DistillRequest:
    """Distil the run ``checkpoint`` into the student directory ``out`` (unset settings keep
    :class:`DistillConfig`' defaults), or with ``resume`` continue the one in ``out``."""

    out: Path
    checkpoint: Path | None = None
    calls: int | None = None
    teacher_calls: int | None = None
    round_steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    seed: int | None = None
    checkpoint_every: int | None = None
    ema: bool | None = None
    log_with: Tracking | None = None
    resume: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        given = [f"--{name.replace('_', '-')}" for name in SETTINGS if getattr(self, name) is not None]
        if self.resume and (given or self.checkpoint is not None):
            flags = ", ".join(given + (["--checkpoint"] if self.checkpoint is not None else []))
            raise UserError(f"--resume continues with the settings in {self.out}/distill.json; drop {flags}")
        if not self.resume and self.checkpoint is None:
            raise UserError("--checkpoint RUN is required: the trained run to distil")

    def settings(self) -> DistillConfig | None:
        """The new distillation's settings (None with ``resume``: the saved ones)."""
        if self.resume:
            return None
        given = {name: getattr(self, name) for name in SETTINGS if getattr(self, name) is not None}
        return DistillConfig(teacher=str(self.checkpoint), **given)


def distill_run(request: DistillRequest) -> DistillResult:
    """Distil (or resume distilling); say where the student went."""
    settings = request.settings()
    tic = time.perf_counter()
    result = distill(request.out, settings, device=request.device)
    calls = "1 network call" if result.calls == 1 else f"{result.calls} network calls"
    print(f"Distilled to {calls} (step {result.step}) in {time.perf_counter() - tic:.0f} s")
    print(f"Student: {result.run_dir}  (sample with: ddpm-cars sample --checkpoint {result.run_dir} --out DIR)")
    return result
