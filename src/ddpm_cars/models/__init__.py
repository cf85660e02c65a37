"""Networks. Each is ``model(x_t, t, y=None) -> tensor`` and knows nothing about diffusion."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ddpm_cars.config import RunConfig
from ddpm_cars.errors import UserError
from ddpm_cars.models.embeddings import ClassEmbedding
from ddpm_cars.models.res_attn_unet import ResAttnUnet, UnetLayout
from ddpm_cars.models.simple_unet import SimpleUnet

__all__ = [
    "ResAttnUnet",
    "SimpleUnet",
    "UnetLayout",
    "build_model",
    "count_parameters",
    "num_classes",
    "batchnorm_uses_batch_stats",
]


def build_model(config: RunConfig) -> nn.Module:
    """The network of a run: its model section, sized for its images and their channels,
    its diffusion's output (the image's channels, twice when the variance is learned) and
    its classes."""
    m, channels = config.model, config.image_channels
    out_channels = config.diffusion.out_channels(channels)
    if m.class_conditional and not m.class_names:
        raise UserError(
            "a class-conditional model needs its class names (they come from the data when training starts)"
        )
    if m.name == "simple_unet":
        return SimpleUnet(
            channels=m.channels,
            time_emb_dim=m.time_emb_dim,
            image_channels=channels,
            out_channels=out_channels,
            num_classes=m.num_classes,
        )
    if m.name == "res_attn_unet":
        layout = UnetLayout(m.channels, m.num_res_blocks, m.attention_resolutions, m.head_channels, m.resblock_updown)
        return ResAttnUnet(
            config.data.image_size,
            layout,
            dropout=m.dropout,
            in_channels=channels,
            out_channels=out_channels,
            num_classes=m.num_classes,
        )
    raise ValueError(f"unknown model {m.name!r}; available: 'simple_unet', 'res_attn_unet'")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def num_classes(model: nn.Module) -> int:
    """The classes a network is conditioned on (0: unconditional), looked up through any wrapper."""
    return next((m.num_classes for m in model.modules() if isinstance(m, ClassEmbedding)), 0)


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
