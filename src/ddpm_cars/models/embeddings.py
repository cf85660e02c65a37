"""Timestep and class-label embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn


class SinusoidalPositionEmbeddings(nn.Module):
    """Transformer-style sinusoidal embedding of the timestep (Vaswani et al. 2017, Sec. 3.5).

    ``[B]`` integer or float timesteps -> ``[B, dim]``: sines of all frequencies, then cosines.
    """

    def __init__(self, dim: int):
        super().__init__()
        if dim < 4 or dim % 2:
            raise ValueError(f"embedding dim must be even and >= 4, got {dim}")
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
        args = t.float()[:, None] * freqs[None, :]  # [B, half]
        return torch.cat([args.sin(), args.cos()], dim=-1)


class ClassEmbedding(nn.Module):
    """A learned vector per class plus one for the null class (label ``num_classes``), the
    "no label" of classifier-free guidance (Ho & Salimans 2022). ``[B]`` labels -> ``[B, dim]``."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if y.dtype not in (torch.int32, torch.int64) or y.ndim != 1:
            raise ValueError(f"labels must be a 1-d integer tensor, got {y.dtype} of shape {tuple(y.shape)}")
        # checked where it costs no device sync; on a GPU an out-of-range label fails in the lookup
        if y.device.type == "cpu" and y.numel() and (int(y.min()) < 0 or int(y.max()) > self.num_classes):
            raise ValueError(f"labels must be in 0..{self.num_classes} ({self.num_classes} is the null class)")
        return self.table(y)


def add_class_embedding(emb: torch.Tensor, label_embed: ClassEmbedding | None, y: torch.Tensor | None) -> torch.Tensor:
    """The time embedding ``[B, D]`` plus the label's (the null class's when ``y`` is None);
    unchanged for an unconditional network, which refuses labels."""
    if label_embed is None:
        if y is not None:
            raise ValueError("labels given to a network that is not class-conditional")
        return emb
    if y is None:
        y = torch.full((emb.shape[0],), label_embed.null_label, dtype=torch.long, device=emb.device)
    if y.shape[0] != emb.shape[0]:
        raise ValueError(f"{y.shape[0]} labels for a batch of {emb.shape[0]}")
    return emb + label_embed(y).to(emb.dtype)
