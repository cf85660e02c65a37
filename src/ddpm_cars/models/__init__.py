"""Networks. Each is ``model(x_t, t, y=None) -> tensor`` and knows nothing about diffusion."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from ddpm_cars.config import ModelConfig
from ddpm_cars.models.simple_unet import SimpleUnet

__all__ = ["SimpleUnet", "build_model", "count_parameters", "batchnorm_uses_batch_stats"]


def build_model(config: ModelConfig) -> nn.Module:
    if config.name == "simple_unet":
        return SimpleUnet(channels=config.channels, time_emb_dim=config.time_emb_dim)
    raise ValueError(f"unknown model {config.name!r}; available: 'simple_unet'")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@contextmanager
def batchnorm_uses_batch_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Put the model in eval mode except that BatchNorm normalises with the current
    batch's statistics; the stored running statistics are left untouched."""
    was_training = model.training
    model.eval()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.train()
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        yield model
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)
        model.train(was_training)
