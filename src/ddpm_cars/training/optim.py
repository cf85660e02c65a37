"""Optimizer, learning-rate warm-up and the guarded update step."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ddpm_cars.config import TrainConfig
from ddpm_cars.errors import UserError


class NonFiniteLossError(UserError):
    """The loss stayed non-finite for too many consecutive steps (a learning rate too high, say)."""


def build_optimizer(params: Iterable[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """Adam (the seed's) or AdamW (decoupled weight decay, Loshchilov & Hutter 2019)."""
    kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=config.lr, weight_decay=config.weight_decay)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-indexed): linear ramp to 1."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def gradients_usable(model: nn.Module, loss: torch.Tensor, max_norm: float | None) -> bool:
    """Clip the gradient norm (when asked) and say whether the update may be applied:
    the loss and the gradient norm must both be finite."""
    if not torch.isfinite(loss):
        return False
    if max_norm is None:
        return True
    return bool(torch.isfinite(nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
