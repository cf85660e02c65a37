"""Exponential moving average of model weights (Polyak averaging), sampled from instead of the raw weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``shadow = decay * shadow + (1 - decay) * weights`` after every optimizer step.

    The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` over the first updates so
    the average is not dominated by the random initialisation. Buffers (BatchNorm
    running statistics) are copied, not averaged. ``updates`` counts the optimizer steps,
    skipped ones too; one ``torch._foreach_lerp_`` call updates every parameter.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1); got {decay}")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, applied: torch.Tensor | None = None) -> None:
        """Move the average towards ``model``'s weights; not at all where the boolean
        tensor ``applied`` (the optimizer step's, on the device) is false."""
        self.updates += 1
        weight = 1.0 - min(self.decay, (1 + self.updates) / (10 + self.updates))
        shadows = list(self.model.parameters())
        lives = [p.detach() for p in model.parameters()]
        if applied is None:
            torch._foreach_lerp_(shadows, lives, weight)
        else:
            masked = applied.to(torch.float32) * weight
            torch._foreach_lerp_(shadows, lives, [masked] * len(shadows))
        for shadow, live in zip(self.model.buffers(), model.buffers()):
            shadow.copy_(live)
