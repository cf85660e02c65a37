"""Timestep embeddings."""

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
