"""Writing a run's checkpoints during training: the loss log first, then the weights,
optimizer and generator state, atomically; a failed write stops training in one line."""

from __future__ import annotations

from pathlib import Path

import torch

from ddpm_cars import run as ckpt
from ddpm_cars.errors import EnvironmentFailure
from ddpm_cars.training.batches import Position
from ddpm_cars.training.logs import LossLog
from ddpm_cars.training.trackers import Tracker
from ddpm_cars.training.trainee import Trainee


class CheckpointWriteError(EnvironmentFailure):
    """A checkpoint could not be written (a full disk, a lost mount); the previous one is intact."""


class Checkpoints:
    """Writes the loss log, then the checkpoint (rank 0 only); a failed write stops
    training in one line and leaves the previous checkpoint as it was."""

    def __init__(
        self, run_dir: Path, trainee: Trainee, rng: torch.Generator, log: LossLog, tracker: Tracker, enabled: bool
    ):
        self.run_dir, self.trainee, self.rng, self.log, self.tracker, self.enabled = (
            run_dir,
            trainee,
            rng,
            log,
            tracker,
            enabled,
        )

    def save(self, position: Position) -> None:
        if not self.enabled:
            return
        ema, scaler = self.trainee.ema, self.trainee.scaler
        state = ckpt.TrainState(
            position.step,
            position.epoch,
            position.consumed,
            self.trainee.optimizer.state_dict(),
            self.rng.get_state(),
            ema.updates if ema is not None else 0,
            position.skipped,
            scaler.state_dict() if scaler is not None else None,
        )
        try:  # the log first: rows past the checkpoint a resume starts from are dropped on reading
            self.log.write()
            ckpt.save_checkpoint(self.run_dir, self.trainee.model, state, ema.model if ema is not None else None)
        except OSError as err:  # each write is atomic: what was there before is untouched
            previous = ckpt.latest_checkpoint(self.run_dir)
            kept = f"the last checkpoint, {previous.name}, is intact" if previous else "no earlier checkpoint exists"
            raise CheckpointWriteError(
                f"cannot write the checkpoint of step {position.step} in {self.run_dir} ({err.strerror or err}); "
                f"training stopped and {kept}: make room, then continue with --resume"
            ) from err
        self.tracker.flush()
