"""Distilling a trained run into a student of few network calls: progressive distillation
(Salimans & Ho 2022, Algorithm 2), round by round, crash-safe like training.

    the first round's teacher: the run's DDIM on ``teacher_calls`` steps
    each round, for ``round_steps`` steps:
        x_0 ~ data, a student step k ~ U{0..N-1}, eps ~ N(0, I), z_t = q(x_0, t_k, eps)
        x~ = the teacher's two DDIM steps solved for one              distillation.teacher_target
        loss max(SNR, 1) ||x^ - x~||^2, a guarded step at a learning rate falling linearly to 0
    then the student is saved (students/calls_N.safetensors) and teaches the next round, of N / 2

The round is the step count divided by ``round_steps``, so a checkpoint's step says where the
distillation stands; the teacher of a round after the first is read back from the file the
round before wrote. The student directory is an ordinary run: its config.json samples with
deterministic DDIM on the trailing grid of ``calls`` steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from ddpm_cars import diffusion, parallel
from ddpm_cars import run as ckpt
from ddpm_cars.config import DistillConfig, RunConfig, SampleConfig
from ddpm_cars.data import build_dataset
from ddpm_cars.denoiser import Denoiser
from ddpm_cars.distillation import student_loss, student_steps, teacher_target
from ddpm_cars.errors import MissingFileError, UserError
from ddpm_cars.files import atomic_write_text
from ddpm_cars.generation import QUIET, generate
from ddpm_cars.models import build_model
from ddpm_cars.run import Run
from ddpm_cars.runtime import resolve_precision, use_tf32
from ddpm_cars.training.batches import Batches, Position
from ddpm_cars.training.checkpoints import Checkpoints
from ddpm_cars.training.logs import LossLog, PendingSteps
from ddpm_cars.training.loop import guarded_update, with_class_names, with_image_channels
from ddpm_cars.training.optim import build_optimizer
from ddpm_cars.training.signals import StopRequest, TrainingInterrupted
from ddpm_cars.training.trackers import Tracker, open_tracker
from ddpm_cars.training.trainee import Trainee
from ddpm_cars.viz import grid_image, save_rows

SETTINGS_FILE = ckpt.DISTILL_FILE
STUDENTS_DIR = "students"
PICTURE_SEED = 0  # the student-against-teacher pictures all start from the same noise
PICTURE_IMAGES = 8
LOSS_LABEL = "x_0 error against the teacher, x max(SNR, 1)"


def save_settings(settings: DistillConfig, path: Path) -> None:
    atomic_write_text(path, json.dumps(dataclasses.asdict(settings), indent=2) + "\n")


def load_settings(path: Path) -> DistillConfig:
    """The settings a distillation saved in its student directory."""
    if not path.is_file():
        raise MissingFileError(f"nothing to resume: {path} does not exist (not a student directory?)")
    try:
        return DistillConfig(**json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        raise UserError(f"{path} is not a distillation's settings file: {err}") from err


@dataclass
class DistillResult:
    run_dir: Path
    step: int
    calls: int


def student_sampling(calls: int) -> SampleConfig:
    """How a student of ``calls`` calls samples: deterministic DDIM on the trailing grid."""
    return SampleConfig(sampler="ddim", eta=0.0, steps=calls, spacing="trailing")


def student_config(teacher: RunConfig, settings: DistillConfig) -> RunConfig:
    """The teacher's config for its student: its network with one output per image channel,
    v-prediction (its x_0 stays finite at pure noise), no EMA, the distillation's steps, and
    the student's own sampler as the default."""
    sample = dataclasses.replace(student_sampling(settings.calls), num_images=teacher.sample.num_images)
    return dataclasses.replace(teacher, sample=sample).replace(
        diffusion={"prediction": "v", "learn_variance": False, "min_snr_gamma": 0.0},
        train={
            "lr": settings.lr,
            "batch_size": settings.batch_size or teacher.train.batch_size,
            "max_steps": settings.rounds * settings.round_steps,
            "seed": settings.seed,
            "ema_decay": None,
            "warmup_steps": 0,
            "grad_accum_steps": 1,
            "eval_every_steps": 0,
            "checkpoint_every_steps": settings.checkpoint_every,
            "init_from": None,
            "log_with": settings.log_with,
        },
    )


def student_weights(weights: dict[str, torch.Tensor], student: nn.Module) -> dict[str, torch.Tensor]:
    """The teacher's ``weights`` for the ``student`` network: the same, except an output that
    also gave the variance (2C channels) keeps its first C, the mean's."""
    own = student.state_dict()
    out = {}
    for name, value in weights.items():
        if name in own and value.shape != own[name].shape and value.shape[1:] == own[name].shape[1:]:
            value = value[: own[name].shape[0]]
        out[name] = value
    return out


def _frozen(denoiser: Denoiser) -> Denoiser:
    denoiser.network.eval().requires_grad_(False)
    return denoiser


class Rounds:
    """The teachers of the rounds: the run for the first, then each round's saved student."""

    def __init__(self, settings: DistillConfig, teacher: RunConfig, student: RunConfig, out: Path, device, precision):
        self.settings, self.teacher_config, self.student_config = settings, teacher, student
        self.out, self.device, self.precision = out, device, precision

    def student_file(self, calls: int) -> Path:
        return self.out / STUDENTS_DIR / f"calls_{calls:04d}.safetensors"

    @functools.cached_property
    def first(self) -> Denoiser:
        """The first round's teacher, the run's network: read once."""
        net = Run.open(self.settings.teacher).network(ema=self.settings.ema, device=self.device)
        return _frozen(dataclasses.replace(Denoiser.for_run(net, self.teacher_config), precision=self.precision))

    @functools.cached_property
    def first_images(self) -> torch.Tensor:
        """The first teacher's picture row, the same for every round: drawn once."""
        return _draw(self.first, self.settings.teacher_calls)

    def teacher(self, r: int) -> Denoiser:
        """The teacher of round ``r``: the run's network for the first, else round r-1's student."""
        if r == 0:
            return self.first
        path = self.student_file(self.settings.calls_in_round(r - 1))
        if not path.is_file():
            raise MissingFileError(f"{path} is missing: the teacher of round {r + 1} cannot be read back")
        net = build_model(self.student_config).to(self.device)
        net.load_state_dict(load_file(str(path), device=str(self.device)))
        return _frozen(dataclasses.replace(Denoiser.for_run(net, self.student_config), precision=self.precision))

    def save_student(self, model: nn.Module, calls: int) -> None:
        path = self.student_file(calls)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        ckpt.save_weights(model, tmp)
        tmp.replace(path)


def _draw(denoiser: Denoiser, calls: int) -> torch.Tensor:
    """The picture row of ``denoiser`` with DDIM on ``calls`` trailing steps, from the pictures' noise."""
    return generate(denoiser, PICTURE_IMAGES, student_sampling(calls), seed=PICTURE_SEED, watch=QUIET)


def _save_pictures(rows: list[tuple[str, int, torch.Tensor]], calls: int, path: Path) -> None:
    """Rows ``(name, calls, images)`` drawn from the same noise, the student's last."""
    labelled = [(f"{name}\n{_calls(steps)}", [("", image) for image in images]) for name, steps, images in rows]
    save_rows(labelled, path, f"From the same noise: the student of {_calls(calls)} and its teachers")


def _calls(n: int) -> str:
    return f"{n} call" if n == 1 else f"{n} calls"


def distill(
    out: str | Path, settings: DistillConfig | None = None, *, device: str = "auto", progress: bool = True
) -> DistillResult:
    """Distil ``settings.teacher`` into a student of ``settings.calls`` calls in ``out``, or
    without ``settings`` continue the distillation there (its settings from its distill.json)."""
    loop = _start(Path(out), settings, device, progress)
    settings, position = loop.settings, loop.position
    bar = tqdm(
        total=settings.rounds * settings.round_steps,
        initial=position.step,
        desc="Distilling",
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
    )
    with contextlib.closing(loop.tracker):
        with StopRequest() as stop, contextlib.closing(bar):
            stopped = loop.run(bar, stop)
        loop.checkpoints.save(position)
    if stopped:
        print(f"Interrupted: checkpoint saved at step {position.step}; continue with --resume")
        raise TrainingInterrupted(stop.signum or signal.SIGINT, position.step)
    return DistillResult(Path(out), position.step, settings.calls)


def _checked(settings: DistillConfig) -> tuple[DistillConfig, RunConfig]:
    """The settings with the teacher's checkpoint directory in full, and the teacher's config."""
    teacher = Run.open(settings.teacher)
    timesteps = teacher.config.diffusion.timesteps
    if settings.teacher_calls > timesteps // 2:
        raise UserError(
            f"--teacher-calls {settings.teacher_calls} is more than half the run's {timesteps} training steps; "
            "ask for fewer"
        )
    return dataclasses.replace(settings, teacher=str(teacher.checkpoint.resolve())), teacher.config


def _start(out: Path, settings: DistillConfig | None, device: str, progress: bool) -> _Loop:
    """Check the student directory and the teacher, build (or restore) the student."""
    resume = settings is None
    settings, teacher = _checked(load_settings(out / SETTINGS_FILE) if settings is None else settings)
    world, dev = parallel.init_from_env(parallel.resolve_device(device))
    if world.size > 1:
        raise UserError("distill runs in one process; start it without torchrun")
    use_tf32(dev)
    latest = ckpt.latest_checkpoint(out)
    if latest is not None and not resume:
        raise UserError(f"{out} already holds checkpoints; pass --resume to continue it or pick another --out")
    if resume and latest is None:
        raise UserError(f"nothing to resume: {out} holds no checkpoint")
    config = student_config(teacher, settings)
    data = build_dataset(config.data, progress=progress)
    config = with_image_channels(with_class_names(config, data.class_names), data.channels)
    if len(data) < config.train.batch_size:
        raise UserError(f"the dataset has {len(data)} images, fewer than one batch of {config.train.batch_size}")
    trainee = Trainee.build(config, world, dev)
    rng = torch.Generator(dev).manual_seed(settings.seed)
    rounds = Rounds(settings, teacher, config, out, dev, resolve_precision(config.train.precision, dev))
    if resume:
        position = trainee.restore(latest, rng, dev)
    else:
        first = rounds.first.network
        trainee.model.load_state_dict(student_weights(first.state_dict(), trainee.model))
        position = Position()
        out.mkdir(parents=True, exist_ok=True)
        save_settings(settings, out / SETTINGS_FILE)
    config.save(out / ckpt.CONFIG_FILE)
    log = LossLog(out, config.diffusion, position.step)
    log.label = LOSS_LABEL
    tracker = open_tracker(config, out, position.step, enabled=True)
    checkpoints = Checkpoints(out, trainee, rng, log, tracker, enabled=True)
    return _Loop(settings, rounds, trainee, Batches(data, config, world, dev), rng, position, log, checkpoints, tracker)


@dataclass
class _Loop:
    settings: DistillConfig
    rounds: Rounds
    trainee: Trainee
    batches: Batches
    rng: torch.Generator
    position: Position
    log: LossLog
    checkpoints: Checkpoints
    tracker: Tracker
    pending: PendingSteps = dataclasses.field(default_factory=PendingSteps)

    def run(self, bar: tqdm, stop: StopRequest) -> bool:
        """The rounds until the last step or a stop signal; True when a signal stopped it."""
        settings, position, trainee = self.settings, self.position, self.trainee
        schedule = trainee.denoiser.schedule
        teacher, current = None, -1
        trainee.model.train()
        while position.step < settings.rounds * settings.round_steps:
            r, in_round = divmod(position.step, settings.round_steps)
            if r != current:  # a new round, or the one a resume continues
                if in_round == 0 and position.step > 0:  # each round starts a fresh optimizer
                    trainee.optimizer = build_optimizer(
                        trainee.model.parameters(), self.batches.config.train, trainee.denoiser.device
                    )
                teacher, current = self.rounds.teacher(r), r
                steps = student_steps(schedule.timesteps, settings.calls_in_round(r))
            if stop.requested:
                self._read(bar, current)
                return True
            batch = self.batches.draw(position, self.rng, schedule.timesteps)
            k = torch.randint(0, len(steps.t), (batch.x0.shape[0],), generator=self.rng, device=self.rng.device)
            t = steps.t.to(k.device)[k]
            z_t = diffusion.q_sample(schedule, batch.x0, t, batch.noise)
            target = teacher_target(teacher, z_t, steps, k, batch.y)
            trainee.optimizer.zero_grad(set_to_none=True)
            loss = student_loss(trainee.denoiser, z_t, t, target, batch.y)
            trainee.backward(loss)
            applied = self._update(loss, 1 - in_round / settings.round_steps)
            position.step, position.consumed = position.step + 1, position.consumed + 1
            if position.consumed == self.batches.per_epoch:
                position.epoch, position.consumed = position.epoch + 1, 0
            self.pending.add(position.step, loss, applied)
            bar.update(1)
            round_end = position.step % settings.round_steps == 0
            if round_end or position.step % self.batches.config.train.log_every_steps == 0:
                self._read(bar, current)
            if round_end:
                self._end_round(r, teacher)
            elif position.step % settings.checkpoint_every == 0:
                self.checkpoints.save(position)
        return False

    def _update(self, loss: torch.Tensor, lr_fraction: float) -> torch.Tensor:
        tcfg = self.batches.config.train
        return guarded_update(self.trainee, loss, tcfg, self.position.step, lr=tcfg.lr * lr_fraction)

    def _read(self, bar: tqdm, r: int) -> None:
        rows, rate = self.pending.read(self.batches.config.train.batch_size)
        for step, loss, applied in rows:
            self.log.append(step, loss)
            self.tracker.scalars(step, {"distill/loss": loss})
            if not applied:
                self.position.skipped += 1
        if rows:
            calls = self.settings.calls_in_round(r)
            bar.set_postfix(round=f"{r + 1}/{self.settings.rounds}", calls=calls, loss=f"{self.log.last:.4f}")
            self.tracker.scalars(
                rows[-1][0],
                {
                    "distill/round": r + 1,
                    "distill/calls": calls,
                    "distill/lr": self.trainee.optimizer.param_groups[0]["lr"],
                },
            )

    def _end_round(self, r: int, teacher: Denoiser) -> None:
        """Save the round's student (the next round's teacher) before the checkpoint that
        moves past it, and draw it beside its teachers."""
        calls = self.settings.calls_in_round(r)
        self.rounds.save_student(self.trainee.model, calls)
        rows = [("teacher", self.settings.teacher_calls, self.rounds.first_images)]
        if r > 0:
            rows.append(("its teacher", 2 * calls, _draw(teacher, 2 * calls)))
        rows.append(("student", calls, _draw(self.trainee.denoiser, calls)))
        picture = self.rounds.out / "samples" / f"calls_{calls:04d}.png"
        picture.parent.mkdir(parents=True, exist_ok=True)
        _save_pictures(rows, calls, picture)
        self.tracker.image("distill/student", self.position.step, grid_image(rows[-1][2]))
        self.checkpoints.save(self.position)
        self.pending.restart_clock()
