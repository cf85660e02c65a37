"""How a network runs on a device: mixed precision, memory layout, compilation."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch import nn

from ddpm_cars.errors import UserError


def autocast(device: torch.device | str, precision: str) -> ContextManager:
    """bf16 autocast on CUDA or CPU for ``precision == "bf16"``; a no-op for fp32.

    Under autocast, convolutions and matrix products run in bfloat16 while weights,
    optimizer state and the loss stay in float32, so no loss scaling is needed.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ValueError(f"precision must be 'fp32' or 'bf16'; got {precision!r}")
    device_type = torch.device(device).type
    if device_type not in ("cpu", "cuda"):
        raise UserError(f"bf16 autocast is supported on cpu and cuda, not {device_type}")
    return torch.autocast(device_type, dtype=torch.bfloat16)


def prepare_model(model: nn.Module, *, channels_last: bool = False, compile: bool = False) -> nn.Module:
    """The module to call: ``model`` in NHWC layout and/or wrapped by ``torch.compile``.

    Parameters are shared with ``model``, so optimizers, EMA and checkpoints keep using
    the plain module.
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compile else model


def to_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
