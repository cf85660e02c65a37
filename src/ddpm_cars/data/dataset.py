"""The in-memory image set every data source produces."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ddpm_cars.errors import UserError

IMAGE_CHANNELS = (1, 3)  # grayscale, RGB


class DataError(UserError):
    """A data source that cannot be used; the message says what to do about it."""


class ImageSet(Dataset):
    """Images decoded once and held as uint8, resized to the training size.

    ``images`` is ``[N, C, H, W]`` uint8 with C = 1 (grayscale) or 3 (RGB), ``labels`` is
    ``[N]`` int64 indexing ``class_names``. Items are ``(image in [-1, 1] float32, label)``; random
    flipping happens per batch in the training loop, with an explicit generator.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: list[str]):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in IMAGE_CHANNELS:
            raise ValueError(f"images must be uint8 [N, 1 or 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be [N]={images.shape[0]}, got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        self.class_names = list(class_names)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return to_model_range(self.images[index]), self.labels[index]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    @property
    def channels(self) -> int:
        """1 for grayscale images, 3 for RGB."""
        return self.images.shape[1]


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] (the seed's ToTensor then 2x - 1)."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], clamping what lies outside."""
    return images.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)
