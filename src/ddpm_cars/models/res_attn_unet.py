"""The improved U-Net: residual blocks, self-attention and adaptive group norm.

The architecture of Nichol & Dhariwal (2021) with the changes of Dhariwal & Nichol
(2021, Sec. 3): GroupNorm + SiLU residual blocks, the timestep injected by adaptive
group norm ``GroupNorm(h) * (1 + scale) + shift``, multi-head self-attention at chosen
resolutions with a fixed number of channels per head, optional BigGAN-style
resampling inside residual blocks, and zero-initialised last convolutions so every
residual branch (and the whole network) starts as the identity (or zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ddpm_cars.errors import UserError
from ddpm_cars.models.embeddings import ClassEmbedding, SinusoidalPositionEmbeddings, add_class_embedding

NORM_GROUPS = 32


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (fewer for narrow test models: the largest divisor <= 32)."""
    return nn.GroupNorm(math.gcd(NORM_GROUPS, channels), channels)


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _resample(x: torch.Tensor, mode: str | None) -> torch.Tensor:
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


class ResBlock(nn.Module):
    """GN-SiLU-conv, then AdaGN(emb)-SiLU-dropout-conv(zero init), plus a skip connection.

    ``resample`` ("up", "down" or None) resamples both paths between the first norm and
    the first convolution (BigGAN, Brock et al. 2019).
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0, resample: str | None = None):
        super().__init__()
        self.resample = resample
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)  # -> (scale, shift)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(x))
        h = self.conv1(_resample(h, self.resample))
        x = _resample(x, self.resample)
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift  # adaptive group norm
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all positions of a feature map, residual."""

    def __init__(self, channels: int, head_channels: int = 64):
        super().__init__()
        if channels % head_channels and head_channels < channels:
            raise UserError(f"attention width {channels} is not a multiple of {head_channels} channels per head")
        self.heads = max(1, channels // head_channels)
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # [B, heads, HW, C/heads]
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class TimestepSequential(nn.ModuleList):
    """Residual and attention blocks in order; residual blocks also get the embedding.

    With ``checkpointing`` on, each block keeps only its input while gradients are
    recorded and runs again in the backward pass (``torch.utils.checkpoint``, with the
    dropout draws replayed): the same gradients for less memory and about a third more
    compute."""

    checkpointing = False

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        recompute = self.checkpointing and torch.is_grad_enabled()
        for layer in self:
            args = (x, emb) if isinstance(layer, ResBlock) else (x,)
            x = checkpoint(layer, *args, use_reentrant=False) if recompute else layer(*args)
        return x


@dataclass(frozen=True)
class UnetLayout:
    """The shape of a :class:`ResAttnUnet`: its level widths, top to bottom (``channels``:
    base width times the multipliers), ``num_res_blocks`` residual blocks per level, the
    feature-map sizes that get self-attention (``attention_resolutions``, in pixels) with
    ``head_channels`` channels per head, and whether residual blocks resample (BigGAN,
    ``resblock_updown``) instead of plain convolutions."""

    channels: tuple[int, ...] = (128, 256, 384, 512)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16, 8)
    head_channels: int = 64
    resblock_updown: bool = False


class ResAttnUnet(nn.Module):
    """``model(x_t [B, in_channels, S, S], t [B], y [B] | None) -> [B, out_channels, S, S]``;
    S divisible by 2^(levels-1).

    ``layout`` places the widths, blocks and attention: attention is used at every level
    whose feature map is one of ``layout.attention_resolutions`` pixels wide for
    ``image_size`` inputs (and always in the middle block). With ``num_classes`` the
    network is class-conditional: a learned embedding of the label ``y`` is added to the
    timestep embedding (Dhariwal & Nichol 2021, Sec. 3), and label ``num_classes`` (also
    what ``y=None`` means) is the null class of classifier-free guidance.
    """

    def __init__(
        self,
        image_size: int = 64,
        layout: UnetLayout = UnetLayout(),
        *,
        dropout: float = 0.0,
        in_channels: int = 3,
        out_channels: int = 3,
        num_classes: int = 0,
    ):
        super().__init__()
        channels, num_res_blocks, head_channels = layout.channels, layout.num_res_blocks, layout.head_channels
        attention_resolutions, resblock_updown = layout.attention_resolutions, layout.resblock_updown
        if len(channels) < 2:
            raise ValueError(f"channels needs at least two widths, got {channels}")
        self.downsample_factor = 2 ** (len(channels) - 1)
        if image_size % self.downsample_factor:
            raise ValueError(f"image size must be divisible by {self.downsample_factor}, got {image_size}")
        base, emb_dim = channels[0], 4 * channels[0]
        self.time_embed = nn.Sequential(
            SinusoidalPositionEmbeddings(base), nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.label_embed = ClassEmbedding(num_classes, emb_dim) if num_classes else None

        def res(i: int, o: int, resample: str | None = None) -> ResBlock:
            return ResBlock(i, o, emb_dim, dropout, resample)

        def attends(level: int) -> bool:
            return image_size // 2**level in attention_resolutions

        self.input_conv = nn.Conv2d(in_channels, base, 3, padding=1)
        self.down = nn.ModuleList()
        skip_widths, width = [base], base
        for level, out in enumerate(channels):
            for _ in range(num_res_blocks):
                layers = [res(width, out)] + ([AttentionBlock(out, head_channels)] if attends(level) else [])
                self.down.append(TimestepSequential(layers))
                width = out
                skip_widths.append(width)
            if level < len(channels) - 1:
                resample = res(width, width, "down") if resblock_updown else Downsample(width)
                self.down.append(TimestepSequential([resample]))
                skip_widths.append(width)
        self.middle = TimestepSequential([res(width, width), AttentionBlock(width, head_channels), res(width, width)])
        self.up = nn.ModuleList()
        for level, out in reversed(list(enumerate(channels))):
            for i in range(num_res_blocks + 1):
                layers = [res(width + skip_widths.pop(), out)]
                width = out
                if attends(level):
                    layers.append(AttentionBlock(width, head_channels))
                if level > 0 and i == num_res_blocks:
                    layers.append(res(width, width, "up") if resblock_updown else Upsample(width))
                self.up.append(TimestepSequential(layers))
        self.out = nn.Sequential(group_norm(width), nn.SiLU(), zero_init(nn.Conv2d(width, out_channels, 3, padding=1)))

    def set_activation_checkpointing(self, on: bool) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them."""
        for module in self.modules():
            if isinstance(module, TimestepSequential):
                module.checkpointing = on

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] % self.downsample_factor or x.shape[-2] % self.downsample_factor:
            raise ValueError(f"image size must be divisible by {self.downsample_factor}, got {tuple(x.shape[-2:])}")
        emb = self.time_embed(t)
        emb = add_class_embedding(emb, self.label_embed, y)
        h = self.input_conv(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        h = self.middle(h, emb)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
