"""What a run trains: the network, its denoiser, optimizer, moving average and gradient
scaler, built fresh (or fine-tuned from another run) or restored from a checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ddpm_cars import parallel
from ddpm_cars import run as ckpt
from ddpm_cars.config import RunConfig
from ddpm_cars.denoiser import Denoiser
from ddpm_cars.errors import UserError
from ddpm_cars.models import build_model
from ddpm_cars.parallel import World
from ddpm_cars.runtime import prepare_model, resolve_precision, wants_compile
from ddpm_cars.training.batches import Position
from ddpm_cars.training.ema import EMA
from ddpm_cars.training.optim import build_optimizer


@dataclass
class Trainee:
    """What is trained: the plain module (which the optimizer, the EMA and checkpoints
    use), the denoiser over the network that is called (DDP and/or compiled), the
    optimizer, the moving average and, for fp16, the gradient scaler."""

    model: nn.Module
    denoiser: Denoiser
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def build(cls, config: RunConfig, world: World, device: torch.device, init_from: str | None = None) -> Trainee:
        """A fresh model (from the run's seed, or fine-tuned from ``init_from``'s weights),
        its optimizer, EMA and scaler, wrapped for the processes and compiled as asked."""
        tcfg = config.train
        with torch.random.fork_rng(devices=[]):  # initial weights from the run's seed, global RNG untouched
            torch.manual_seed(tcfg.seed)
            model = build_model(config).to(device)
        if init_from is not None:
            for note in ckpt.init_weights(model, init_from, config):
                if world.is_main:
                    print(note)
        if tcfg.channels_last:
            model.to(memory_format=torch.channels_last)
        if tcfg.activation_checkpointing:
            model.set_activation_checkpointing(True)
        net = prepare_model(parallel.wrap(model, world, device), compile=wants_compile(tcfg.compile, device))
        optimizer = build_optimizer(model.parameters(), tcfg, device)
        ema = EMA(model, tcfg.ema_decay) if tcfg.ema_decay else None
        precision = resolve_precision(tcfg.precision, device)
        scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        denoiser = dataclasses.replace(Denoiser.for_run(net, config), precision=precision)
        return cls(model, denoiser, optimizer, ema, scaler)

    @property
    def sampled(self) -> Denoiser:
        """The denoiser samples are drawn from: the moving average when there is one."""
        return dataclasses.replace(self.denoiser, network=self.ema.model if self.ema is not None else self.model)

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of ``loss``, scaled up by the fp16 gradient scaler when there is one."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def restore(self, checkpoint: Path, rng: torch.Generator, device: torch.device) -> Position:
        """Weights, optimizer, EMA, scaler and generator from ``checkpoint``; where training stood."""
        ckpt.load_weights(self.model, checkpoint, device)
        state = ckpt.load_train_state(checkpoint)
        if not state.optimizer:  # written by `ddpm-cars import`
            raise UserError(
                f"{checkpoint} holds weights but no optimizer state (an imported run); start a new run "
                "from it with --init-from instead of --resume"
            )
        self.optimizer.load_state_dict(state.optimizer)
        try:
            rng.set_state(state.rng)
        except RuntimeError:
            raise UserError(
                f"{checkpoint} was trained on another kind of device than {device}; resume with that --device"
            ) from None
        if self.ema is not None:
            ckpt.load_weights(self.ema.model, checkpoint, device, ema=True)
            self.ema.updates = state.ema_updates
        if self.scaler is not None and state.scaler is not None:
            self.scaler.load_state_dict(state.scaler)
        return Position(state.step, state.epoch, state.batch_in_epoch, state.skipped_steps)
