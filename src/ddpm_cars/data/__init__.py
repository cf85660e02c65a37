"""Data sources: toy cars (embedded), Stanford Cars (Kaggle or local copy), any image folder.

Each produces an :class:`ImageSet` of uint8 images already resized to the training size.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ddpm_cars.config import DataConfig
from ddpm_cars.data.dataset import DataError, ImageSet
from ddpm_cars.data.folder import load_image_folder
from ddpm_cars.data.stanford_cars import download_stanford_cars, find_split_dirs, load_stanford_cars
from ddpm_cars.data.toy_cars import BODY_TYPES, generate_toy_cars

__all__ = ["DataError", "ImageSet", "build_dataset", "toy_cars_dataset"]

TOY_CARS_SEED = 0
TOY_CARS_TEST_SEED = 1  # the held-out toy cars: same generator, other images


def toy_cars_dataset(count: int, image_size: int, seed: int = TOY_CARS_SEED) -> ImageSet:
    images, labels = generate_toy_cars(count, image_size, seed)
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), list(BODY_TYPES))


def build_dataset(config: DataConfig, progress: bool = True) -> ImageSet:
    """The dataset named by ``config.source``: ``toy-cars``, ``stanford-cars`` or a folder path."""
    size, crop = config.image_size, config.crop
    if config.source == "toy-cars":
        if crop == "bbox":
            raise DataError("--crop bbox needs Stanford Cars and its box annotations; toy cars are already framed")
        return toy_cars_dataset(config.toy_count, size, TOY_CARS_TEST_SEED if config.split == "test" else TOY_CARS_SEED)
    if config.source == "stanford-cars":
        return load_stanford_cars(
            download_stanford_cars(), config.split, size, crop, config.bbox_margin, progress=progress
        )
    root = Path(config.source).expanduser()
    if not root.exists():
        raise DataError(f"--data must be 'toy-cars', 'stanford-cars' or an existing folder; {root} does not exist")
    if find_split_dirs(root) is not None:
        return load_stanford_cars(root, config.split, size, crop, config.bbox_margin, progress=progress)
    return load_image_folder(root, size, crop, progress=progress)
