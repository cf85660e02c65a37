"""The seed's U-Net: plain conv blocks with BatchNorm, ReLU and strided (transposed) convs.

At the default widths (64 -> 1024) it has exactly 62,438,883 parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from ddpm_cars.models.embeddings import ClassEmbedding, SinusoidalPositionEmbeddings, add_class_embedding


class Block(nn.Module):
    """conv3x3-ReLU-BN, + time embedding, conv3x3-ReLU-BN, then a 4x4 stride-2 resample."""

    def __init__(self, in_ch: int, out_ch: int, time_emb_dim: int, up: bool = False):
        super().__init__()
        self.time_mlp = nn.Linear(time_emb_dim, out_ch)
        if up:  # input is the previous output concatenated with the skip: 2 * in_ch channels
            self.conv1 = nn.Conv2d(2 * in_ch, out_ch, 3, padding=1)
            self.transform = nn.ConvTranspose2d(out_ch, out_ch, 4, 2, 1)
        else:
            self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
            self.transform = nn.Conv2d(out_ch, out_ch, 4, 2, 1)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.bnorm1 = nn.BatchNorm2d(out_ch)
        self.bnorm2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        h = self.bnorm1(self.relu(self.conv1(x)))
        h = h + self.relu(self.time_mlp(t_emb))[:, :, None, None]
        h = self.bnorm2(self.relu(self.conv2(h)))
        return self.transform(h)


class SimpleUnet(nn.Module):
    """``model(x_t [B, image_channels, H, W], t [B], y [B] | None) -> [B, out_channels, H, W]``;
    H, W divisible by 2^(levels-1). With ``num_classes`` a label embedding is added to the time embedding
    (label ``num_classes``, or ``y=None``, is the null class)."""

    def __init__(
        self,
        channels: tuple[int, ...] = (64, 128, 256, 512, 1024),
        time_emb_dim: int = 32,
        image_channels: int = 3,
        out_channels: int | None = None,
        num_classes: int = 0,
    ):
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"channels needs at least two widths, got {channels}")
        down, up = tuple(channels), tuple(reversed(channels))
        self.downsample_factor = 2 ** (len(channels) - 1)
        self.time_mlp = nn.Sequential(
            SinusoidalPositionEmbeddings(time_emb_dim),
            nn.Linear(time_emb_dim, time_emb_dim),
            nn.ReLU(),
        )
        self.label_embed = ClassEmbedding(num_classes, time_emb_dim) if num_classes else None
        self.conv0 = nn.Conv2d(image_channels, down[0], 3, padding=1)
        self.downs = nn.ModuleList(Block(down[i], down[i + 1], time_emb_dim) for i in range(len(down) - 1))
        self.ups = nn.ModuleList(Block(up[i], up[i + 1], time_emb_dim, up=True) for i in range(len(up) - 1))
        self.output = nn.Conv2d(up[-1], out_channels or image_channels, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] % self.downsample_factor or x.shape[-2] % self.downsample_factor:
            raise ValueError(f"image size must be divisible by {self.downsample_factor}, got {tuple(x.shape[-2:])}")
        t_emb = add_class_embedding(self.time_mlp(t), self.label_embed, y)
        x = self.conv0(x)
        skips = []
        for down in self.downs:
            x = down(x, t_emb)
            skips.append(x)
        for up in self.ups:
            x = up(torch.cat((x, skips.pop()), dim=1), t_emb)
        return self.output(x)
