"""Optimizer, learning-rate warm-up and the guarded update step, decided on the device.

A step whose loss or gradient is not finite is skipped without the host reading
anything: the fused Adam(W) kernels take a ``found_inf`` flag (the protocol
``torch.amp.GradScaler`` uses) and leave the weights, the moments and the step count as
they were where it is set, and the moving average is updated with a weight of zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ddpm_cars.config import TrainConfig
from ddpm_cars.errors import RunDiverged

FUSED_DEVICES = ("cpu", "cuda")  # where torch's fused Adam(W) kernels run


class NonFiniteLossError(RunDiverged):
    """The loss stayed non-finite for too many consecutive steps."""


def build_optimizer(params: Iterable[nn.Parameter], config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam (the seed's) or AdamW (decoupled weight decay, Loshchilov & Hutter 2019), fused
    into one kernel per step where torch has one for ``device``."""
    kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=config.lr, weight_decay=config.weight_decay, fused=device.type in FUSED_DEVICES or None)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-indexed): linear ramp to 1."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def lr_factor(step: int, warmup_steps: int, schedule: str = "constant", total_steps: int | None = None) -> float:
    """The warm-up's multiplier, then with ``schedule="cosine"`` half a cosine from 1 at the
    end of the warm-up to 0 at ``total_steps`` (the last step, ``total_steps - 1``, still
    moves a little). A function of the step alone, so a resumed run continues it exactly
    with no scheduler state to save."""
    if schedule == "constant" or total_steps is None or step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def gradients_usable(
    model: nn.Module, loss: torch.Tensor, max_norm: float | None, *, check_gradients: bool = False
) -> torch.Tensor:
    """Clip the gradient norm (when asked) and say, as a boolean tensor on the device,
    whether the update may be applied: the loss must be finite, and so must the gradient
    norm when it is clipped or ``check_gradients`` (loss scaling) asks for it."""
    usable = torch.isfinite(loss)
    if max_norm is not None:
        usable &= torch.isfinite(nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    elif check_gradients:
        usable &= torch.isfinite(nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
    return usable


def step_unless(optimizer: torch.optim.Optimizer, usable: torch.Tensor) -> None:
    """``optimizer.step()`` where ``usable`` holds: on the device for fused optimizers, else
    by reading the flag (the only host read of a step, on devices without fused kernels)."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (~usable).float()  # read by the fused kernel, as GradScaler sets it
        optimizer.step()
    elif bool(usable):
        optimizer.step()
