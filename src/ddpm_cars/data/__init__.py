"""Data sources: toy cars (embedded), Stanford Cars (Kaggle or local copy), any image folder.

Each produces an :class:`ImageSet` of uint8 images already resized to the training size.
:func:`build_dataset` is the way in: it lists a source's files
(:func:`~ddpm_cars.data.folder.list_image_folder`, :func:`~ddpm_cars.data.stanford_cars.list_stanford_cars`),
decodes them once through :func:`~ddpm_cars.data.folder.decode_listing` into the data cache
(:mod:`ddpm_cars.data.cache`), or into memory when the cache is ``off``, and memory-maps the
cache from there on every later run.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from ddpm_cars.config import DataConfig
from ddpm_cars.data import boxes, cache, folder, toy_cars
from ddpm_cars.data.dataset import DataError, ImageSet
from ddpm_cars.data.folder import Decoded, ImageListing, decode_listing, list_image_folder, warn_skipped
from ddpm_cars.data.stanford_cars import download_stanford_cars, find_split_dirs, list_stanford_cars
from ddpm_cars.data.toy_cars import BODY_TYPES, generate_toy_cars

__all__ = ["DataError", "ImageSet", "build_dataset", "toy_cars_dataset"]

TOY_CARS_SEED = 0
TOY_CARS_TEST_SEED = 1  # the held-out toy cars: same generator, other images


def toy_cars_dataset(count: int, image_size: int, seed: int = TOY_CARS_SEED) -> ImageSet:
    images, labels = generate_toy_cars(count, image_size, seed)
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), list(BODY_TYPES))


def build_dataset(config: DataConfig, progress: bool = True) -> ImageSet:
    """The dataset named by ``config.source`` (``toy-cars``, ``stanford-cars`` or a folder
    path), through the data cache that ``config.cache`` names."""
    size, crop, channels = config.image_size, config.crop, config.image_channels
    cache_dir = cache.resolve_dir(config.cache)
    if config.source == "toy-cars":
        if crop == "bbox":
            raise DataError("--crop bbox needs Stanford Cars and its box annotations; toy cars are already framed")
        seed = TOY_CARS_TEST_SEED if config.split == "test" else TOY_CARS_SEED
        key = {
            "name": "toy-cars",
            "image_size": size,
            "count": config.toy_count,
            "seed": seed,
            "code": cache.code_stamp(toy_cars),
        }
        if channels == "1":  # "auto" and "3" are the generator's RGB, as before
            key["channels"] = channels
        fill = _toy_cars_fill(config.toy_count, size, seed, grey=channels == "1")
        return cache.load(key, config.toy_count, fill, cache_dir, progress=progress)[0]
    if config.source == "stanford-cars":
        root = download_stanford_cars()
    else:
        root = Path(config.source).expanduser()
        if not root.exists():
            raise DataError(f"--data must be 'toy-cars', 'stanford-cars' or an existing folder; {root} does not exist")
    counts = None
    if config.source == "stanford-cars" or find_split_dirs(root) is not None:
        listing, counts = list_stanford_cars(root, config.split, size, crop, config.bbox_margin, channels)
    else:
        listing = list_image_folder(root, size, crop, channels)
    key = _listing_key(listing, root)
    if listing.image_channels != "auto" and cache_dir is not None:
        # a run that trained with "auto" records the count it found: its entry serves that count
        found_key = {**key, "channels": "auto"}
        found = cache.open_entry(cache_dir / cache.entry_name(found_key))
        if found is not None and found[1].channels == int(listing.image_channels):
            listing, key = dataclasses.replace(listing, image_channels="auto"), found_key
    fill = _listing_fill(listing, progress)
    data, decoded = cache.load(key, len(listing.paths), fill, cache_dir, progress=progress, source=str(root.resolve()))
    warn_skipped(decoded.skipped)
    if counts is not None and crop == "bbox":
        counts.warn(len(listing.paths), decoded.outside)
    return data


def _toy_cars_fill(count: int, size: int, seed: int, grey: bool = False) -> cache.Fill:
    """Toy cars in RGB, or with ``grey`` their luma (:func:`~ddpm_cars.data.folder.luma`)."""

    def fill(write: cache.Writer) -> Decoded:
        images, labels = generate_toy_cars(count, size, seed)
        images = torch.from_numpy(images)
        write(folder.luma(images) if grey else images)
        return Decoded(labels.tolist(), list(BODY_TYPES), channels=1 if grey else 3)

    return fill


def _listing_fill(listing: ImageListing, progress: bool) -> cache.Fill:
    return lambda write: decode_listing(listing, write, progress=progress)


def _listing_key(listing: ImageListing, root: Path) -> dict:
    """What a folder's decoded images depend on: its files, labels, boxes and how they are cropped."""
    return {
        "name": root.resolve().name or "images",
        "image_size": listing.image_size,
        "crop": listing.crop,
        "channels": listing.image_channels,
        "cwd": None if root.is_absolute() else os.getcwd(),  # the paths below are relative to it
        "margin": listing.margin if listing.crop == "bbox" else None,
        "class_names": listing.class_names,
        "labels": cache.digest(listing.labels),
        "boxes": cache.digest(listing.boxes),
        "files": cache.digest(cache.file_stamps(listing.paths + list(listing.also_read))),
        "code": cache.code_stamp(folder, boxes),
    }
