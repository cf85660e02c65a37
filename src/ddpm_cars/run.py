"""A run directory: its config, its crash-safe checkpoints, and the network they hold.

:meth:`Run.open` is how every command finds a trained model: a run directory or one of
its checkpoint directories in, the :class:`RunConfig`, the checkpoint and -- through
:meth:`Run.denoiser` -- the (EMA) weights ready to sample from out. A run directory
holds::

    config.json                       the RunConfig, written when the run starts
    checkpoints/step_00001200/        one directory per checkpoint, the newest two kept
        model.safetensors             weights and BatchNorm buffers
        ema.safetensors               the moving average of the weights, when kept
        train_state.pt                optimizer, step, epoch, RNG state (weights_only-safe)
    loss.csv, loss.png, samples/      logs and pictures

A checkpoint is written into a temporary directory which is then renamed into
place, so a reader only ever sees complete checkpoints, even after a SIGKILL.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ddpm_cars.config import RunConfig
from ddpm_cars.denoiser import Denoiser
from ddpm_cars.errors import MissingFileError, UserError
from ddpm_cars.files import fsync_dir
from ddpm_cars.models import build_model

CHECKPOINT_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "train_state.pt"
CONFIG_FILE = "config.json"
DISTILL_FILE = "distill.json"  # in a distilled student's directory: how it was distilled
CLASS_EMBEDDING = "label_embed."  # the class embedding's weights, in either network
_NAME = re.compile(r"^step_(\d+)$")


@dataclass
class TrainState:
    step: int  # optimizer steps taken
    epoch: int  # epoch in progress
    batch_in_epoch: int  # batches of that epoch already consumed
    optimizer: dict[str, Any]
    rng: torch.Tensor  # state of the generator drawing t, noise and flips
    ema_updates: int = 0
    skipped_steps: int = 0  # steps whose update was skipped for a non-finite loss
    scaler: dict[str, Any] | None = None  # fp16's gradient scaler: its scale and growth tracker


def save_weights(model: nn.Module, path: Path) -> None:
    """``model``'s weights as a safetensors file at ``path``."""
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(path))


def save_checkpoint(
    run_dir: Path, model: nn.Module, state: TrainState, ema: nn.Module | None = None, keep: int = 2
) -> Path:
    """Write ``checkpoints/step_N`` atomically and prune all but the newest ``keep``."""
    root = run_dir / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{state.step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        save_weights(model, tmp / MODEL_FILE)
        if ema is not None:
            save_weights(ema, tmp / EMA_FILE)
        torch.save(
            {
                "step": state.step,
                "epoch": state.epoch,
                "batch_in_epoch": state.batch_in_epoch,
                "optimizer": state.optimizer,
                "rng": state.rng.cpu(),
                "ema_updates": state.ema_updates,
                "skipped_steps": state.skipped_steps,
                **({"scaler": state.scaler} if state.scaler is not None else {}),
            },
            tmp / STATE_FILE,
        )
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # a rerun of the same step replaces the old copy
            _discard(final)
        os.rename(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        try:
            _discard(old)
        except OSError:  # pruning is best effort: an old checkpoint left whole is harmless
            pass
    for stale in root.glob(".step_*.tmp"):  # left by a process killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _discard(checkpoint: Path) -> None:
    """Delete a checkpoint directory without ever leaving a partial ``step_N``: it is renamed
    to a temporary name first (one atomic step), so a kill during the deletion leaves a
    ``.step_N.*.tmp`` that the next save sweeps away."""
    trash = Path(tempfile.mkdtemp(dir=checkpoint.parent, prefix=f".{checkpoint.name}.", suffix=".tmp"))
    os.rename(checkpoint, trash / checkpoint.name)
    shutil.rmtree(trash, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are ignored)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """``(run_dir, checkpoint_dir)`` from a run directory or one of its checkpoint directories."""
    path = Path(path)
    if (path / MODEL_FILE).is_file() and path.parent.name == CHECKPOINT_DIR:
        return path.parent.parent, path
    if not path.is_dir():
        raise MissingFileError(f"no run directory or checkpoint at {path}")
    checkpoint = latest_checkpoint(path)
    if checkpoint is None:
        raise MissingFileError(f"{path} holds no checkpoint (expected {path / CHECKPOINT_DIR}/step_*/)")
    return path, checkpoint


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _mismatch(model: nn.Module, weights: dict[str, torch.Tensor]) -> str:
    """How ``weights`` differ from ``model``'s state dict, briefly."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [k for k in own if k in weights and own[k].shape != weights[k].shape]
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(
            f"{len(shapes)} tensors differ in shape (e.g. {k}: {tuple(weights[k].shape)} in the file, "
            f"{tuple(own[k].shape)} in the model)"
        )
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    return "; ".join(parts) or "the tensors do not match"


def load_weights(
    model: nn.Module, checkpoint: Path, device: torch.device | str = "cpu", ema: bool = False
) -> nn.Module:
    """Load the raw weights, or with ``ema`` the moving average (falling back to the raw ones).

    A file that cannot be read, or weights of another architecture or image size than
    ``model`` (config.json edited, say), raise a one-line ``UserError``."""
    path = checkpoint / EMA_FILE
    if not (ema and path.is_file()):
        path = checkpoint / MODEL_FILE
    if not path.is_file():
        raise MissingFileError(f"{checkpoint} is not a complete checkpoint: {path.name} is missing")
    try:
        weights = load_file(str(path), device=str(device))
    except Exception as err:  # safetensors raises its own error type for truncated or corrupt files
        raise UserError(f"cannot read weights {path}: {_first_line(err)}") from err
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise UserError(
            f"the weights in {path} do not fit the model described by the run's {CONFIG_FILE} "
            f"(another architecture or image size?): {_mismatch(model, weights)}"
        ) from err
    return model


# The fields of two runs that must agree for one to start from the other's weights.
def check_init_source(source: str | Path, config: RunConfig) -> tuple[Path, RunConfig]:
    """The checkpoint directory and config of ``source``, a run or checkpoint to fine-tune
    from; a one-line ``UserError`` unless its network and image size are ``config``'s.
    Cheap: training checks it before it reads the data."""
    run_dir, checkpoint = resolve_checkpoint(source)
    theirs = RunConfig.load(run_dir / CONFIG_FILE, saved_run=True)
    for name, was, now in theirs.network_differences(config):
        raise UserError(
            f"cannot start from {source}: its {name} is {was!r}, this run's {now!r} "
            "(--init-from needs the same network and image size)"
        )
    return checkpoint, theirs


def init_weights(model: nn.Module, source: str | Path, config: RunConfig) -> list[str]:
    """Load the weights of the run or checkpoint ``source`` (its moving average when it kept
    one) into ``model``, built from ``config``, to fine-tune from them; the notes to print.

    The network and the image size must be the same (else a one-line ``UserError``); the
    class embedding is loaded only when both runs know the same classes, and otherwise
    keeps ``model``'s fresh one (said in a note)."""
    checkpoint, theirs = check_init_source(source, config)
    path = checkpoint / EMA_FILE if (checkpoint / EMA_FILE).is_file() else checkpoint / MODEL_FILE
    try:
        weights = load_file(str(path))
    except Exception as err:  # safetensors' own error type for truncated or corrupt files
        raise UserError(f"cannot read weights {path}: {_first_line(err)}") from err
    notes = [f"Starting from {path} (step {_step_of(checkpoint)})"]
    if theirs.model.class_names != config.model.class_names:
        weights = {k: v for k, v in weights.items() if not k.startswith(CLASS_EMBEDDING)}
        if config.model.class_conditional:
            notes.append(
                f"The class embedding starts afresh: {len(config.model.class_names)} classes here, "
                f"{len(theirs.model.class_names) or 'none'} in {source}"
            )
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not k.startswith(CLASS_EMBEDDING) for k in missing):
        raise UserError(f"the weights in {path} do not fit this run's network: {_mismatch(model, weights)}")
    for name, was, now in [
        ("prediction", theirs.diffusion.prediction, config.diffusion.prediction),
        ("schedule", theirs.diffusion.schedule, config.diffusion.schedule),
    ]:
        if was != now:
            notes.append(f"Note: {source} was trained with {name} {was!r}, this run uses {now!r}")
    return notes


def _step_of(checkpoint: Path) -> str:
    return checkpoint.name.removeprefix("step_").lstrip("0") or "0"


def load_train_state(checkpoint: Path) -> TrainState:
    """The optimizer, step and RNG state of ``checkpoint``; a one-line ``UserError`` if it is unreadable."""
    path = checkpoint / STATE_FILE
    if not path.is_file():
        raise MissingFileError(f"{checkpoint} is not a complete checkpoint: {STATE_FILE} is missing")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (
        Exception
    ) as err:  # UnpicklingError, RuntimeError, EOFError, ... (torch's advice to unpickle it unsafely does not help)
        raise UserError(
            f"cannot read training state {path}: corrupt, or not written by ddpm-cars ({type(err).__name__})"
        ) from err
    try:
        return TrainState(**raw)
    except TypeError as err:  # not a dict, or other keys
        raise UserError(f"{path} is not a training state of this program: {_first_line(err)}") from err


@dataclass(frozen=True)
class Run:
    """A trained run: its directory, the checkpoint chosen, and its config.

    ``Run.open(path)`` takes a run directory (its latest checkpoint) or a checkpoint
    directory; ``run.with_sampling({"steps": 50})`` overrides the config's sampling settings.
    """

    dir: Path
    checkpoint: Path
    config: RunConfig

    @classmethod
    def open(cls, path: str | Path) -> Run:
        run_dir, checkpoint = resolve_checkpoint(path)
        return cls(run_dir, checkpoint, RunConfig.load(run_dir / CONFIG_FILE, saved_run=True))

    @property
    def distilled(self) -> bool:
        """A student of ``ddpm-cars distill``: it samples on its own few steps only."""
        return (self.dir / DISTILL_FILE).is_file()

    def refuse_if_distilled(self, what: str) -> None:
        """A one-line error for ``what`` on a distilled student."""
        if self.distilled:
            raise UserError(
                f"{self.dir} is a distilled student, which samples from pure noise on its own "
                f"{self.config.sample.steps} steps only: {what} needs the run it was distilled from"
            )

    def with_sampling(self, sample: dict[str, Any]) -> Run:
        """This run with its config's sampling settings overridden (``{"steps": 50}``)."""
        return dataclasses.replace(self, config=self.config.replace(sample=sample)) if sample else self

    def network(self, *, ema: bool = True, device: torch.device | str = "cpu") -> nn.Module:
        """The network built from the config with the checkpoint's weights (the moving
        average with ``ema``, when the run kept one), on ``device``."""
        return load_weights(build_model(self.config), self.checkpoint, ema=ema).to(device)

    def denoiser(self, *, ema: bool = True, device: torch.device | str = "cpu") -> Denoiser:
        """The :class:`~ddpm_cars.denoiser.Denoiser` of :meth:`network`: what samplers,
        the likelihood and the evaluations take."""
        return Denoiser.for_run(self.network(ema=ema, device=device), self.config)
