"""The training loop (Algorithm 1, Ho et al. 2020), readable top to bottom.

batch -> flip -> t -> noise -> loss -> backward -> step -> log -> sample -> checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import io
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ddpm_cars.conditioning import drop_labels
from ddpm_cars.config import DiffusionConfig, RunConfig
from ddpm_cars.data import build_dataset
from ddpm_cars.data.dataset import ImageSet, to_model_range
from ddpm_cars.diffusion import training_loss
from ddpm_cars.errors import UserError
from ddpm_cars.models import build_model
from ddpm_cars.runtime import autocast, prepare_model, to_layout
from ddpm_cars.samplers import generate
from ddpm_cars.schedule import build_schedule
from ddpm_cars.training import checkpoint as ckpt
from ddpm_cars.training import distributed
from ddpm_cars.training.ema import EMA
from ddpm_cars.training.periodic_eval import PeriodicEval
from ddpm_cars.training.optim import NonFiniteLossError, build_optimizer, gradients_usable, set_lr, warmup_factor
from ddpm_cars.viz import save_grid, save_loss_curve

LOSS_CSV = "loss.csv"
SAMPLE_SEED = 0  # the training-time grids all start from the same noise


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    last_loss: float


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT or SIGTERM after saving a checkpoint at the current step."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a lost mount); the previous one is intact."""


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the step in progress, so the
    checkpoint it then saves is consistent; a second signal of either kind acts at once
    (Ctrl-C raises KeyboardInterrupt, SIGTERM terminates; the last checkpoint stands)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum
        self._restore()
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: stopping after this step to save a checkpoint (signal again to stop at once)", flush=True)

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def __exit__(self, *exc: object) -> None:
        self._restore()


def epoch_order(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled item order of one epoch, a pure function of (seed, epoch)."""
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def random_hflip(x: torch.Tensor, generator: torch.Generator, part: slice = slice(None), count: int | None = None) -> torch.Tensor:
    """Flip each image left-right with probability 1/2 (the seed's RandomHorizontalFlip).
    ``x`` may be the ``part`` of a batch of ``count`` images (the coins of the whole batch
    are drawn, so every process of a distributed run draws the same)."""
    flip = torch.rand(count or x.shape[0], generator=generator, device=generator.device)[part] < 0.5
    return torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)


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
    ckpt.atomic_write_text(run_dir / LOSS_CSV, buf.getvalue())
    if rows:
        save_loss_curve([s for s, _ in rows], [v for _, v in rows], run_dir / "loss.png", loss_name)


def with_class_names(config: RunConfig, class_names: list[str]) -> RunConfig:
    """A class-conditional config with the classes of its data; a resumed run's must match."""
    if not config.model.class_conditional:
        return config
    names = tuple(class_names)
    if config.model.class_names and config.model.class_names != names:
        raise UserError(
            f"the run was trained on {len(config.model.class_names)} classes ({', '.join(config.model.class_names[:3])}, ...) "
            f"but the data has {len(names)} ({', '.join(names[:3])}, ...); use the data the run was trained on"
        )
    return config.replace(model={"class_names": names})


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
    world, dev = distributed.init_from_env(resolve_device(device))
    main_rank = world.is_main  # writes checkpoints, logs, pictures; shows the progress bar
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is not None and not resume:
        raise UserError(f"{run_dir} already holds checkpoints; pass --resume to continue it or pick another --out")
    if resume and latest is None:
        raise UserError(f"nothing to resume: {run_dir} holds no checkpoint")
    tcfg = config.train
    data = dataset if dataset is not None else build_dataset(config.data, progress=progress)
    if len(data) < tcfg.batch_size:
        raise UserError(f"the dataset has {len(data)} images, fewer than one batch of {tcfg.batch_size}")
    if data.image_size != config.data.image_size:
        raise UserError(f"dataset images are {data.image_size}px, config says {config.data.image_size}px")
    if tcfg.batch_size % (world.size * tcfg.grad_accum_steps):
        raise UserError(
            f"the batch of {tcfg.batch_size} (global) must split evenly over {world.size} processes x "
            f"{tcfg.grad_accum_steps} micro-batches"
        )
    config = with_class_names(config, data.class_names)
    images = data.images.to(dev)  # uint8, decoded once; batches are cut from it
    labels = data.labels.to(dev) if config.model.class_conditional else None
    batches_per_epoch = len(data) // tcfg.batch_size  # drop_last, as the seed's DataLoader
    total_steps = tcfg.max_steps or tcfg.epochs * batches_per_epoch
    mine = world.share(tcfg.batch_size)  # this process's part of every batch
    micro_size = tcfg.batch_size // world.size // tcfg.grad_accum_steps

    def layout(x: torch.Tensor) -> torch.Tensor:
        return to_layout(x, tcfg.channels_last)

    schedule = build_schedule(config.diffusion)
    with torch.random.fork_rng(devices=[]):  # initial weights from the run's seed, global RNG untouched
        torch.manual_seed(tcfg.seed)
        model = build_model(config).to(dev)
    if tcfg.channels_last:
        model.to(memory_format=torch.channels_last)
    # what is called: DDP around the model when distributed, compiled when asked
    net = prepare_model(distributed.wrap(model, world, dev), compile=tcfg.compile)
    optimizer = build_optimizer(model.parameters(), tcfg)
    ema = EMA(model, tcfg.ema_decay) if tcfg.ema_decay else None
    rng = torch.Generator(dev).manual_seed(tcfg.seed)
    step, epoch, consumed = 0, 0, 0  # consumed: batches of `epoch` already trained on
    skipped, bad_streak = 0, 0  # steps skipped for a non-finite loss: in all, in a row
    if resume:
        ckpt.load_weights(model, latest, dev)
        state = ckpt.load_train_state(latest)
        optimizer.load_state_dict(state.optimizer)
        try:
            rng.set_state(state.rng)
        except RuntimeError:
            raise UserError(f"{latest} was trained on another kind of device than {dev}; resume with that --device") from None
        step, epoch, consumed, skipped = state.step, state.epoch, state.batch_in_epoch, state.skipped_steps
        if ema is not None:
            ckpt.load_weights(ema.model, latest, dev, ema=True)
            ema.updates = state.ema_updates
    if main_rank:  # after a resume has loaded: a resume that fails leaves config.json as it was
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / ckpt.CONFIG_FILE)
    log = read_loss_log(run_dir / LOSS_CSV, step)
    evaluate = None
    if tcfg.eval_every_steps and main_rank:
        evaluate = PeriodicEval(config, run_dir, data.images, schedule, dev, step, inception_weights)

    def save() -> None:
        if not main_rank:
            return
        ema_updates = ema.updates if ema is not None else 0
        state = ckpt.TrainState(step, epoch, consumed, optimizer.state_dict(), rng.get_state(), ema_updates, skipped)
        try:  # the log first: rows past the checkpoint a resume starts from are dropped on reading
            write_loss_log(run_dir, log, loss_label(config.diffusion))
            ckpt.save_checkpoint(run_dir, model, state, ema.model if ema is not None else None)
        except OSError as err:  # each write is atomic: what was there before is untouched
            previous = ckpt.latest_checkpoint(run_dir)
            kept = f"the last checkpoint, {previous.name}, is intact" if previous else "no earlier checkpoint exists"
            raise CheckpointWriteError(
                f"cannot write the checkpoint of step {step} in {run_dir} ({err.strerror or err}); training stopped "
                f"and {kept}: make room, then continue with --resume"
            ) from err

    last_grid_step = -1

    def sample_grid(name: str) -> None:
        nonlocal last_grid_step
        last_grid_step = step
        if not main_rank:
            return
        sampled = ema.model if ema is not None else model
        num, size = config.sample.num_images, config.data.image_size
        samples = generate(
            sampled, schedule, num, size, SAMPLE_SEED, config.sample, diffusion_config=config.diffusion,
            batch_size=min(num, 256), device=dev, precision=tcfg.precision, progress=False,
        )
        save_grid(samples, run_dir / "samples" / f"{name}.png")

    bar = tqdm(total=total_steps, initial=step, desc="Training", unit="step", disable=not (progress and main_rank), dynamic_ncols=True)
    model.train()
    stopped = False

    def stop_now() -> bool:
        """A Ctrl-C (or SIGTERM from torchrun) seen by any process stops them all at one step."""
        nonlocal stopped
        stopped = stopped or distributed.any_rank(stop.requested, world, dev)
        return stopped

    with StopRequest() as stop, contextlib.closing(bar):  # the bar ends its line before any error message
        while step < total_steps and not stopped:
            order = epoch_order(len(data), tcfg.seed, epoch)
            while consumed < batches_per_epoch and step < total_steps and not stop_now():
                tic = time.perf_counter()
                idx = order[consumed * tcfg.batch_size : (consumed + 1) * tcfg.batch_size][mine].to(dev)
                x0 = to_model_range(images[idx])
                # every process draws for the whole batch and keeps its part: the same draws as one process
                if config.data.flip:
                    x0 = random_hflip(x0, rng, mine, tcfg.batch_size)
                t = torch.randint(0, schedule.timesteps, (tcfg.batch_size,), generator=rng, device=dev)[mine]
                noise = torch.randn((tcfg.batch_size, *x0.shape[1:]), generator=rng, device=dev)[mine]
                y = None
                if labels is not None:  # label dropout: the null class teaches the unconditional model too
                    coins = torch.rand(tcfg.batch_size, generator=rng, device=dev)[mine]
                    y = drop_labels(labels[idx], tcfg.label_dropout, config.model.num_classes, coins)
                optimizer.zero_grad(set_to_none=True)
                loss = torch.zeros((), device=dev)
                for part in range(tcfg.grad_accum_steps):  # micro-batches: same gradient, less memory
                    micro = slice(part * micro_size, (part + 1) * micro_size)
                    last = part == tcfg.grad_accum_steps - 1  # DDP averages gradients over processes only then
                    with distributed.no_sync(net, sync=last):
                        with autocast(dev, tcfg.precision):
                            micro_loss = training_loss(
                                net, schedule, layout(x0[micro]), t[micro], layout(noise[micro]), config.diffusion,
                                None if y is None else y[micro],
                            ) / tcfg.grad_accum_steps
                        micro_loss.backward()
                    loss += micro_loss.detach()
                loss = distributed.mean_over_ranks(loss, world)  # the whole batch's loss, on every rank
                if gradients_usable(model, loss, tcfg.grad_clip):
                    set_lr(optimizer, tcfg.lr * warmup_factor(step - skipped, tcfg.warmup_steps))
                    optimizer.step()
                    if ema is not None:
                        ema.update(model)
                    bad_streak = 0
                else:  # skip the update; the weights stay as they were
                    skipped, bad_streak = skipped + 1, bad_streak + 1

                step, consumed = step + 1, consumed + 1
                log.append((step, loss.item()))
                if bad_streak >= tcfg.max_nonfinite_steps:  # the same on every rank: the loss is averaged
                    save()
                    raise NonFiniteLossError(
                        f"the loss was not finite for {bad_streak} steps in a row (up to step {step}); the weights "
                        f"of the last good step are saved in {run_dir}. Try a lower --lr or --grad-clip 1.0"
                    )
                rate = tcfg.batch_size / (time.perf_counter() - tic)  # all processes together
                bar.set_postfix(epoch=epoch + 1, loss=f"{log[-1][1]:.4f}", img_s=f"{rate:.0f}", skipped=skipped)
                bar.update(1)
                if evaluate is not None and step % tcfg.eval_every_steps == 0:  # rank 0 only
                    row = evaluate(ema.model if ema is not None else model, step)
                    bar.write(f"step {step}: SWD x1e3 {row['swd']:.2f}" + (f", FID {row['fid']:.2f}" if "fid" in row else ""))
                if step % tcfg.checkpoint_every_steps == 0:
                    save()
            if consumed == batches_per_epoch:
                epoch, consumed = epoch + 1, 0
                if epoch % tcfg.sample_every_epochs == 0:
                    sample_grid(f"epoch_{epoch:04d}")
                save()
    bar.close()
    save()
    if stopped:
        if main_rank:
            print(f"Interrupted: checkpoint saved at step {step}; continue with --resume")
        distributed.barrier(world)
        raise TrainingInterrupted(stop.signum or signal.SIGINT, step)
    if final_grid and last_grid_step != step:
        sample_grid("final")
    distributed.barrier(world)  # the other processes wait for rank 0's last writes
    return TrainResult(run_dir, step, log[-1][1] if log else float("nan"))
