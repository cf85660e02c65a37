"""The training loop: Algorithm 1 of Ho et al. (2020), readable top to bottom.

    repeat
        x_0 ~ data (flipped), t ~ U{0..T-1}, eps ~ N(0, I)     Batches.draw
        loss and its gradient over micro-batches                 loss_and_gradients
        a guarded optimizer step, then the EMA                   guarded_update
        log, evaluate, checkpoint, a grid at each epoch's end    LossLog, PeriodicEval, Checkpoints, SampleGrids
    until the step count or a stop signal

The objects around the loop each have one job: :class:`Batches` draws, :class:`Trainee`
holds what is trained, :class:`PendingSteps` keeps the losses on the device between reads,
:class:`Checkpoints` writes, :class:`SampleGrids` draws pictures, a :class:`Tracker` also
sends it all to TensorBoard or W&B. In the steady state a step never waits for the
device: the host reads it once every ``log_every_steps``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ddpm_cars import parallel
from ddpm_cars import run as ckpt
from ddpm_cars.config import RunConfig, TrainConfig
from ddpm_cars.data import build_dataset
from ddpm_cars.data.dataset import ImageSet
from ddpm_cars.denoiser import Denoiser
from ddpm_cars.errors import UserError
from ddpm_cars.generation import QUIET, generate
from ddpm_cars.parallel import World
from ddpm_cars.runtime import to_layout, use_tf32
from ddpm_cars.training.batches import Batch, Batches, Position
from ddpm_cars.training.checkpoints import Checkpoints
from ddpm_cars.training.logs import LossLog, PendingSteps
from ddpm_cars.training.optim import NonFiniteLossError, gradients_usable, lr_factor, set_lr, step_unless
from ddpm_cars.training.periodic_eval import PeriodicEval
from ddpm_cars.training.signals import StopRequest, TrainingInterrupted
from ddpm_cars.training.trackers import Tracker, open_tracker
from ddpm_cars.training.trainee import Trainee
from ddpm_cars.viz import grid_image, save_picture

SAMPLE_SEED = 0  # the training-time grids all start from the same noise


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    last_loss: float


def loss_and_gradients(trainee: Trainee, batch: Batch, tcfg: TrainConfig, world: World) -> torch.Tensor:
    """The batch's loss, over ``grad_accum_steps`` micro-batches whose gradients add up to
    the whole batch's (less memory, same gradient); averaged over the processes."""
    accum = tcfg.grad_accum_steps
    micro_size = batch.x0.shape[0] // accum
    loss = torch.zeros((), device=batch.x0.device)
    for part in range(accum):
        micro = slice(part * micro_size, (part + 1) * micro_size)
        with parallel.no_sync(trainee.denoiser.network, sync=part == accum - 1):  # DDP averages only on the last
            micro_loss = (
                trainee.denoiser.loss(
                    to_layout(batch.x0[micro], tcfg.channels_last),
                    batch.t[micro],
                    to_layout(batch.noise[micro], tcfg.channels_last),
                    None if batch.y is None else batch.y[micro],
                )
                / accum
            )
            trainee.backward(micro_loss)
        loss += micro_loss.detach()
    return parallel.mean_over_ranks(loss, world)  # the whole batch's loss, on every rank


def guarded_update(
    trainee: Trainee,
    loss: torch.Tensor,
    tcfg: TrainConfig,
    step: int,
    total_steps: int | None = None,
    lr: float | None = None,
) -> torch.Tensor:
    """Clip, then step the optimizer (at ``lr``, by default the schedule's learning rate for
    ``step`` of ``total_steps``) and the EMA, unless the loss or the gradient is not finite:
    then the weights stay. Decided on the device; returns whether the update was applied, as
    a boolean tensor there."""
    scaler = trainee.scaler
    if scaler is not None:
        scaler.unscale_(trainee.optimizer)  # the true gradients, before clipping
    applied = gradients_usable(trainee.model, loss, tcfg.grad_clip, check_gradients=scaler is not None)
    if lr is None:
        lr = tcfg.lr * lr_factor(step, tcfg.warmup_steps, tcfg.lr_schedule, total_steps)
    set_lr(trainee.optimizer, lr)
    step_unless(trainee.optimizer, applied)
    if scaler is not None:
        scaler.update()  # halves the scale after an overflow, grows it after a long good run
    if trainee.ema is not None:
        trainee.ema.update(trainee.model, applied)
    return applied


class SampleGrids:
    """``samples/NAME.png``: a grid from the same noise each time (rank 0 draws it), also
    given to the tracker."""

    def __init__(self, run_dir: Path, config: RunConfig, tracker: Tracker, enabled: bool):
        self.run_dir, self.config, self.tracker, self.enabled = run_dir, config, tracker, enabled
        self.last_step = -1

    def draw(self, name: str, denoiser: Denoiser, step: int) -> None:
        self.last_step = step
        if self.enabled:
            num = self.config.sample.num_images
            samples = generate(
                denoiser, num, self.config.sample, seed=SAMPLE_SEED, batch_size=min(num, 256), watch=QUIET
            )
            grid = grid_image(samples)  # [C, H', W'] uint8: the file's picture and the tracker's
            save_picture(grid, self.run_dir / "samples" / f"{name}.png")
            self.tracker.image("samples", step, grid)


def with_class_names(config: RunConfig, class_names: list[str]) -> RunConfig:
    """A class-conditional config with the classes of its data; a resumed run's must match."""
    if not config.model.class_conditional:
        return config
    names = tuple(class_names)
    if config.model.class_names and config.model.class_names != names:
        raise UserError(
            f"the run was trained on {len(config.model.class_names)} classes "
            f"({', '.join(config.model.class_names[:3])}, ...) "
            f"but the data has {len(names)} ({', '.join(names[:3])}, ...); use the data the run was trained on"
        )
    return config.replace(model={"class_names": names})


def with_image_channels(config: RunConfig, channels: int) -> RunConfig:
    """The config with the channel count of its data (1 or 3) in place of ``auto``; one that
    names a count must have data of that count."""
    if config.data.image_channels == "auto":
        return config.replace(data={"image_channels": str(channels)})
    if config.image_channels != channels:
        raise UserError(
            f"the config says {config.image_channels} image channels (data.image_channels) but the data has "
            f"{channels}; convert the data, or train with its count"
        )
    return config


def _check_start(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a new run); refuses to overwrite a run."""
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is not None and not resume:
        raise UserError(f"{run_dir} already holds checkpoints; pass --resume to continue it or pick another --out")
    if resume and latest is None:
        raise UserError(f"nothing to resume: {run_dir} holds no checkpoint")
    return latest


def _check_data(data: ImageSet, config: RunConfig, world: World) -> None:
    tcfg = config.train
    if len(data) < tcfg.batch_size:
        raise UserError(f"the dataset has {len(data)} images, fewer than one batch of {tcfg.batch_size}")
    if data.image_size != config.data.image_size:
        raise UserError(f"dataset images are {data.image_size}px, config says {config.data.image_size}px")
    if tcfg.batch_size % (world.size * tcfg.grad_accum_steps):
        raise UserError(
            f"the batch of {tcfg.batch_size} (global) must split evenly over {world.size} processes x "
            f"{tcfg.grad_accum_steps} micro-batches"
        )


@dataclass
class Session:
    """One training session: the run, what is trained, and the objects around the loop."""

    config: RunConfig
    world: World
    trainee: Trainee
    batches: Batches
    rng: torch.Generator  # draws flips, t, noise and label dropout; saved with every checkpoint
    position: Position
    log: LossLog
    checkpoints: Checkpoints
    grids: SampleGrids
    evaluate: PeriodicEval | None  # rank 0, with --eval-every
    tracker: Tracker  # rank 0, with --log-with; logs nothing otherwise
    pending: PendingSteps = dataclasses.field(default_factory=PendingSteps)

    @property
    def total_steps(self) -> int:
        return self.config.train.max_steps or self.config.train.epochs * self.batches.per_epoch

    def run(self, bar: tqdm, stop: StopRequest) -> bool:
        """Algorithm 1 until the step count or a stop signal; True when a signal stopped it.

        Nothing in a step reads the device: the losses and the skip flags stay there
        until :meth:`_read`, every ``log_every_steps`` steps and before anything that
        needs them (an evaluation, a checkpoint, an epoch's end, the last step)."""
        tcfg, position, trainee = self.config.train, self.position, self.trainee
        trainee.model.train()
        while position.step < self.total_steps:
            if position.consumed == self.batches.per_epoch:  # resumed from a checkpoint at an epoch's last step
                self._end_epoch()
            if self._stop_requested(stop):  # Ctrl-C anywhere stops all at one step
                self._read(bar)
                return True
            batch = self.batches.draw(position, self.rng, trainee.denoiser.schedule.timesteps)
            trainee.optimizer.zero_grad(set_to_none=True)
            loss = loss_and_gradients(trainee, batch, tcfg, self.world)
            applied = guarded_update(trainee, loss, tcfg, position.step, self.total_steps)
            position.step, position.consumed = position.step + 1, position.consumed + 1
            self.pending.add(position.step, loss, applied)
            bar.update(1)
            evaluate = self.evaluate is not None and position.step % tcfg.eval_every_steps == 0
            checkpoint = position.step % tcfg.checkpoint_every_steps == 0
            epoch_end = position.consumed == self.batches.per_epoch
            if (
                evaluate
                or checkpoint
                or epoch_end
                or position.step % tcfg.log_every_steps == 0
                or position.step == self.total_steps
            ):
                self._read(bar)
            if evaluate:
                row = self.evaluate(trainee.sampled, position.step)
                self.tracker.scalars(position.step, {f"eval/{k}": v for k, v in row.items() if k != "step"})
                bar.write(
                    f"step {position.step}: SWD x1e3 {row['swd']:.2f}"
                    + (f", FID {row['fid']:.2f}" if "fid" in row else "")
                )
            if checkpoint:
                self.checkpoints.save(position)
            if epoch_end:
                self._end_epoch()
            if evaluate or checkpoint or epoch_end:
                self.pending.restart_clock()
        return False

    def _stop_requested(self, stop: StopRequest) -> bool:
        """A stop signal on any process; with several, asked only right after a read, so the
        steps between stay free of the collective and its host read."""
        if self.world.distributed and self.pending:
            return False
        return parallel.any_rank(stop.requested, self.world, self.batches.device)

    def _read(self, bar: tqdm) -> None:
        """Bring the pending steps' losses and skip flags to the host (one transfer): log
        them, count the skipped steps, stop a diverged run, refresh the progress bar."""
        position = self.position
        rows, rate = self.pending.read(self.config.train.batch_size)
        for step, loss, applied in rows:
            self.log.append(step, loss)
            self.tracker.scalars(step, {"train/loss": loss})
            if applied:
                position.bad_streak = 0
            else:
                position.skipped, position.bad_streak = position.skipped + 1, position.bad_streak + 1
        self._stop_if_diverged()
        if rows:  # all processes together
            bar.set_postfix(
                epoch=position.epoch + 1, loss=f"{self.log.last:.4f}", img_s=f"{rate:.0f}", skipped=position.skipped
            )
            self.tracker.scalars(
                rows[-1][0],
                {
                    "train/lr": self.trainee.optimizer.param_groups[0]["lr"],
                    "train/skipped_steps": position.skipped,
                    "train/images_per_s": rate,
                },
            )

    def _stop_if_diverged(self) -> None:
        """Too many non-finite losses in a row (the same on every rank: the loss is averaged)."""
        position = self.position
        if position.bad_streak >= self.config.train.max_nonfinite_steps:
            self.checkpoints.save(position)
            saved = ckpt.latest_checkpoint(self.checkpoints.run_dir)
            lower = f"{self.config.train.lr / 10:g}"
            raise NonFiniteLossError(
                f"the loss was not finite for {position.bad_streak} steps in a row (up to step {position.step}); "
                f"the weights of the last good step are saved in {saved}: resume from them with a lower learning "
                f"rate or clipped gradients, e.g. ddpm-cars train --out {self.checkpoints.run_dir} --resume "
                f"--lr {lower} --grad-clip 1.0; if it diverges again, start a new run with a lower --lr"
            )

    def _end_epoch(self) -> None:
        """A grid every ``sample_every_epochs`` epochs, a checkpoint at every epoch's end."""
        position = self.position
        position.epoch, position.consumed = position.epoch + 1, 0
        if position.epoch % self.config.train.sample_every_epochs == 0:
            self.grids.draw(f"epoch_{position.epoch:04d}", self.trainee.sampled, position.step)
        self.checkpoints.save(position)


def start_session(
    config: RunConfig,
    run_dir: Path,
    resume: bool,
    device: str,
    dataset: ImageSet | None,
    progress: bool,
    inception_weights: str | Path | None,
) -> Session:
    """Check the run directory and the data, build (or restore) what is trained."""
    world, dev = parallel.init_from_env(parallel.resolve_device(device))
    use_tf32(dev)
    latest = _check_start(run_dir, resume)
    if not resume and config.train.init_from is not None:
        # a wrong network is refused before the data is read, which is then read with the source's channels
        theirs = ckpt.check_init_source(config.train.init_from, config)[1]
        if config.data.image_channels == "auto":
            config = config.replace(data={"image_channels": theirs.data.image_channels})
    data = dataset if dataset is not None else build_dataset(config.data, progress=progress)
    config = with_image_channels(with_class_names(config, data.class_names), data.channels)
    _check_data(data, config, world)
    batches = Batches(data, config, world, dev)
    trainee = Trainee.build(config, world, dev, init_from=None if resume else config.train.init_from)
    rng = torch.Generator(dev).manual_seed(config.train.seed)
    position = trainee.restore(latest, rng, dev) if resume else Position()
    if world.is_main:  # after a resume has loaded: a resume that fails leaves config.json as it was
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / ckpt.CONFIG_FILE)
    log = LossLog(run_dir, config.diffusion, position.step)
    evaluate = None
    if config.train.eval_every_steps and world.is_main:
        evaluate = PeriodicEval(config, run_dir, data.images, position.step, inception_weights, dev)
    tracker = open_tracker(config, run_dir, position.step, enabled=world.is_main)
    checkpoints = Checkpoints(run_dir, trainee, rng, log, tracker, enabled=world.is_main)
    grids = SampleGrids(run_dir, config, tracker, enabled=world.is_main)
    return Session(config, world, trainee, batches, rng, position, log, checkpoints, grids, evaluate, tracker)


def train(
    config: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    device: str = "auto",
    dataset: ImageSet | None = None,
    progress: bool = True,
    final_grid: bool = True,
    inception_weights: str | Path | None = None,
) -> TrainResult:
    """Train (or with ``resume`` continue) the run in ``run_dir``; returns where it stopped.

    Unless ``final_grid`` is off, ``samples/final.png`` shows the final model (when the
    last epoch's grid does not already).
    """
    run_dir = Path(run_dir)
    session = start_session(config, run_dir, resume, device, dataset, progress, inception_weights)
    world, position = session.world, session.position
    bar = tqdm(
        total=session.total_steps,
        initial=position.step,
        desc="Training",
        unit="step",
        disable=not (progress and world.is_main),
        dynamic_ncols=True,
    )
    with contextlib.closing(session.tracker):  # the tracker's files are closed however the run ends
        with StopRequest() as stop, contextlib.closing(bar):  # the bar ends its line before any error message
            stopped = session.run(bar, stop)
        session.checkpoints.save(position)
        if stopped:
            if world.is_main:
                print(f"Interrupted: checkpoint saved at step {position.step}; continue with --resume")
            parallel.barrier(world)
            raise TrainingInterrupted(stop.signum or signal.SIGINT, position.step)
        if final_grid and session.grids.last_step != position.step:
            session.grids.draw("final", session.trainee.sampled, position.step)
    parallel.barrier(world)  # the other processes wait for rank 0's last writes
    return TrainResult(run_dir, position.step, session.log.last)
