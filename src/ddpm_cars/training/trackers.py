"""Experiment trackers next to ``loss.csv``: TensorBoard or Weights & Biases (``--log-with``).

Rank 0 logs, at the steps they belong to: the loss of every step (``train/loss``), the
learning rate, the skipped steps and the images per second at every read
(``train/lr``, ``train/skipped_steps``, ``train/images_per_s``), every ``--eval-every``
metric (``eval/...``) and the sample grids (``samples/...``). Both are optional
dependencies, imported only here and only when asked for. A resumed run continues the
same curves: TensorBoard drops what the interrupted session logged after the checkpoint
(``purge_step``); a W&B run is resumed by the id kept in the run directory.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import torch

from ddpm_cars.config import RunConfig
from ddpm_cars.errors import UserError
from ddpm_cars.viz import picture_image

TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_id.txt"


class Tracker:
    """Logs nothing: the base of the real trackers, and what ``--log-with none`` gets."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Each ``values[name]`` at ``step``."""

    def image(self, name: str, step: int, grid: torch.Tensor) -> None:
        """A uint8 picture ``[C, H, W]`` at ``step``, C = 1 (grayscale) or 3 (RGB)."""

    def flush(self) -> None:
        """Everything logged so far onto the disk (at every checkpoint)."""

    def close(self) -> None:
        """Flush and let go of the files."""


class TensorBoard(Tracker):
    """Event files in ``RUN/tensorboard/`` (``tensorboard --logdir RUN``)."""

    def __init__(self, run_dir: Path, start_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(
                "--log-with tensorboard needs TensorBoard: pip install tensorboard (the extra ddpm-cars[tensorboard])"
            ) from None
        # a run resumed at start_step logs from start_step + 1: what the interrupted one logged from there is dropped
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def image(self, name: str, step: int, grid: torch.Tensor) -> None:
        # one channel is fine: TensorBoard stores it as an RGB picture of equal channels
        self.writer.add_image(name, grid, step, dataformats="CHW")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB(Tracker):
    """A Weights & Biases run named after the run directory, in project ``ddpm-cars``
    (``WANDB_MODE=offline`` keeps it on the disk, for ``wandb sync`` later)."""

    def __init__(self, run_dir: Path, config: RunConfig):
        try:
            import wandb
        except ImportError:
            raise UserError(
                "--log-with wandb needs Weights & Biases: pip install wandb (the extra ddpm-cars[wandb])"
            ) from None
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)  # W&B's id format
        id_file.write_text(run_id + "\n")
        self.wandb = wandb
        self.run = wandb.init(
            project="ddpm-cars", name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir), config=config.to_dict()
        )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def image(self, name: str, step: int, grid: torch.Tensor) -> None:
        # a PIL image (mode L or RGB), taken as it is: no guessing of the mode or range from an array
        self.run.log({name: self.wandb.Image(picture_image(grid))}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_tracker(config: RunConfig, run_dir: Path, start_step: int, enabled: bool) -> Tracker:
    """The tracker ``config.train.log_with`` asks for (on rank 0: ``enabled``), else one that logs nothing."""
    kind: Any = config.train.log_with
    if not enabled or kind == "none":
        return Tracker()
    run_dir.mkdir(parents=True, exist_ok=True)
    return TensorBoard(run_dir, start_step) if kind == "tensorboard" else WandB(run_dir, config)
