"""Stanford Cars from the Kaggle copy laid out as class folders.

After ``kagglehub`` downloads :data:`KAGGLE_DATASET`, the images sit in
``<root>/car_data/car_data/{train,test}/<class name>/*.jpg`` (8,144 train and
8,041 test images, 196 classes). A local copy is recognised at ``root``,
``root/car_data`` or ``root/car_data/car_data``: the folder that holds
``train/`` and/or ``test/``.

Beside ``car_data/`` (in ``root``) lie ``anno_train.csv`` and ``anno_test.csv``
with each image's car bounding box; ``crop="bbox"`` crops every image to a
square around its box (:mod:`ddpm_cars.data.boxes`). Each split's CSV is looked
for from its split folder up (``car_data/car_data``, ``car_data``, ``root``),
so it is found whichever of the three folders ``--data`` names. Images without
a usable box are used uncropped, counted in one :class:`BoxWarning` per load.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

from ddpm_cars.config import Crop, ImageChannels, Split
from ddpm_cars.data.boxes import (
    Box,
    BoxWarning,
    annotation_dirs,
    annotation_file_name,
    find_annotations,
    parse_annotations,
)
from ddpm_cars.data.dataset import DataError
from ddpm_cars.data.folder import ImageListing, check_crop, find_images

KAGGLE_DATASET = "jutrera/stanford-car-dataset-by-classes-folder"
_EVERY_SPLIT = "all"  # the split that stands for every split folder present
_SPLIT_FOLDERS = tuple(name for name in get_args(Split) if name != _EVERY_SPLIT)  # train/ and test/
_ROOT_DEPTHS = (".", "car_data", "car_data/car_data")


def _short(exc: BaseException, limit: int = 320) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def download_stanford_cars() -> Path:
    """Download (or reuse kagglehub's cached copy of) the dataset; return its root."""
    try:
        import kagglehub

        return Path(kagglehub.dataset_download(KAGGLE_DATASET))
    except Exception as exc:
        first_step = "Install kagglehub and put" if isinstance(exc, ImportError) else "Put"
        raise DataError(
            f"Could not download Kaggle dataset {KAGGLE_DATASET} ({_short(exc)}). "
            f"{first_step} Kaggle credentials in ~/.kaggle/kaggle.json or set KAGGLE_USERNAME and KAGGLE_KEY, "
            "or use a local copy laid out as car_data/{train,test}/<class>/ with --data /path/to/car_data"
        ) from exc


def find_split_dirs(root: Path) -> dict[str, Path] | None:
    """``{"train": ..., "test": ...}`` (those present) for a Stanford layout, else None."""
    for depth in _ROOT_DEPTHS:
        base = Path(root) / depth
        found = {name: base / name for name in _SPLIT_FOLDERS if (base / name).is_dir()}
        if found:
            return {name: path.resolve() for name, path in found.items()}
    return None


def _require_split_dirs(root: Path) -> dict[str, Path]:
    if not Path(root).is_dir():
        raise DataError(f"Stanford Cars folder {root} does not exist or is not a directory")
    dirs = find_split_dirs(root)
    if dirs is None:
        raise DataError(
            f"No Stanford Cars layout in {root}: expected train/ and/or test/ in it, "
            "in car_data/ or in car_data/car_data/"
        )
    return dirs


def _chosen_splits(root: Path, split: Split) -> dict[str, Path]:
    """``{split name: folder}`` making up ``split`` (one of :data:`ddpm_cars.config.Split`);
    ``"all"`` is every split present."""
    choices = get_args(Split)
    if split not in choices:
        raise DataError(f"Unknown split {split!r}; choose one of {', '.join(choices)}")
    dirs = _require_split_dirs(root)
    if split == _EVERY_SPLIT:
        return dirs
    if split not in dirs:
        raise DataError(f"Split {split!r} is missing from {root} (found: {', '.join(dirs)})")
    return {split: dirs[split]}


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _split_boxes(split_dir: Path, split: str, paths: list[Path]) -> tuple[list[Box | None], int, int, Path]:
    """Each path's box from the split's CSV; also how many paths had a malformed row or no row, and the CSV."""
    csv_path = find_annotations(split_dir, split)
    if csv_path is None:
        looked = ", ".join(str(d) for d in annotation_dirs(split_dir))
        raise DataError(
            f"crop 'bbox' needs {annotation_file_name(split)} (beside car_data/ in the Kaggle copy) "
            f"for split {split!r}; looked in {looked}"
        )
    by_name, malformed_names = parse_annotations(csv_path)
    malformed_names = set(malformed_names)
    boxes = [by_name.get(path.name) for path in paths]
    no_box = [path.name for path, box in zip(paths, boxes) if box is None]
    malformed = sum(name in malformed_names for name in no_box)
    return boxes, malformed, len(no_box) - malformed, csv_path


@dataclass
class BoxCounts:
    """Images of a bbox listing that will stay uncropped: with a malformed row, and
    without a row in each CSV."""

    malformed: int = 0
    without_row: dict[str, int] = field(default_factory=dict)

    def warn(self, total: int, outside: int) -> None:
        """One :class:`BoxWarning` when any image of the ``total`` stays uncropped; a box
        entirely ``outside`` its image counts as a malformed row."""
        malformed = self.malformed + outside
        uncropped = malformed + sum(self.without_row.values())
        if uncropped:
            reasons = [_plural(malformed, "malformed row")] if malformed else []
            reasons += [f"{count} without a row in {csv}" for csv, count in self.without_row.items() if count]
            warnings.warn(
                f"bbox crop: {uncropped} of {total} images used uncropped ({', '.join(reasons)})",
                BoxWarning,
                stacklevel=3,
            )


def list_stanford_cars(
    root: Path,
    split: Split,
    image_size: int,
    crop: Crop = "none",
    margin: float = 0.1,
    image_channels: ImageChannels = "auto",
) -> tuple[ImageListing, BoxCounts]:
    """The images of a split, labelled by class folder; class indices come from all
    splits present, so they agree. Only images inside class folders count; files loose in
    a split folder are ignored. With ``crop="bbox"``, each image's box (``margin`` is added
    around it as a share of its longer side) and how many images have none. The images
    have ``image_channels`` (see :class:`~ddpm_cars.data.folder.ImageListing`)."""
    check_crop(crop)
    chosen = _chosen_splits(root, split)
    every_split = _require_split_dirs(root).values()
    class_names = sorted({d.name for split_dir in every_split for d in _class_dirs(split_dir)})
    index = {name: i for i, name in enumerate(class_names)}
    paths, labels, boxes, csvs = [], [], [], []
    counts = BoxCounts()
    for name, split_dir in chosen.items():
        split_paths = []
        for class_dir in _class_dirs(split_dir):
            images = find_images(class_dir)
            split_paths += images
            labels += [index[class_dir.name]] * len(images)
        paths += split_paths
        if crop == "bbox" and split_paths:
            split_boxes, split_malformed, split_without, csv_path = _split_boxes(split_dir, name, split_paths)
            boxes += split_boxes
            counts.malformed += split_malformed
            counts.without_row[csv_path.name] = split_without
            csvs.append(csv_path)
    if not paths:
        raise DataError(f"No images in class folders of split {split!r} under {root}")
    listing = ImageListing(
        paths,
        labels,
        class_names,
        image_size,
        crop,
        boxes if crop == "bbox" else None,
        margin,
        tuple(csvs),
        image_channels=image_channels,
    )
    return listing, counts
