"""Car bounding boxes of Stanford Cars and the square crops made from them.

The Kaggle copy ships ``anno_train.csv`` and ``anno_test.csv`` beside
``car_data/``: header-less rows ``file name, x1, y1, x2, y2, class id`` such as
``00001.jpg,39,116,569,375,14``. File names are unique within a split only, so
each split reads its own file. Coordinates are pixels of the image as stored
(before any EXIF rotation); a box covers ``x1 <= x < x2`` and ``y1 <= y < y2``.
(The original annotations are 1-based and inclusive; the one-pixel difference is
immaterial once a margin is added around the box.)

A crop is a square around the box, so the car keeps its aspect ratio when the
square is resized to the training size: see :func:`square_crop_region`.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ddpm_cars.data.dataset import DataError

_FIELDS = 6  # file name, x1, y1, x2, y2, class id
_SEARCH_LEVELS = 3  # split dir's parent, grandparent, great-grandparent: car_data/car_data, car_data, root


class BoxWarning(UserWarning):
    """Some images were used uncropped because they had no usable bounding box."""


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixel coordinates: ``x1 <= x < x2``, ``y1 <= y < y2``."""

    x1: float
    y1: float
    x2: float
    y2: float

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1


def annotation_file_name(split: str) -> str:
    """``anno_train.csv`` or ``anno_test.csv``."""
    return f"anno_{split}.csv"


def annotation_dirs(split_dir: Path) -> list[Path]:
    """Folders searched for a split's CSV, nearest first: the split folder's parent and two levels up."""
    return list(Path(split_dir).parents)[:_SEARCH_LEVELS]


def find_annotations(split_dir: Path, split: str) -> Path | None:
    """``anno_<split>.csv`` in the nearest of :func:`annotation_dirs`, or None if there is none."""
    for folder in annotation_dirs(split_dir):
        candidate = folder / annotation_file_name(split)
        if candidate.is_file():
            return candidate
    return None


def _number(text: str) -> float:
    """A finite number; integral values come back as ``int``. Raises ValueError otherwise."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {text!r}")
    return int(value) if value.is_integer() else value


def _parse_row(row: list[str]) -> tuple[str, Box]:
    """``(file name, box)`` of one CSV row; raises ValueError if the row is malformed."""
    if len(row) != _FIELDS:
        raise ValueError(f"expected {_FIELDS} fields, got {len(row)}")
    name, *coords, class_id = (field.strip() for field in row)
    x1, y1, x2, y2 = (_number(c) for c in coords)
    int(class_id)  # unused (classes come from the folders) but must be an integer
    if not name:
        raise ValueError("empty file name")
    if min(x1, y1) < 0 or x2 <= x1 or y2 <= y1:
        raise ValueError("need 0 <= x1 < x2 and 0 <= y1 < y2")
    return name, Box(x1, y1, x2, y2)


def parse_annotations(path: Path) -> tuple[dict[str, Box], list[str]]:
    """Boxes by file name, and the file-name field of every malformed row.

    A row is malformed if it does not have six fields, a coordinate or the class
    id is not a number, a coordinate is negative, ``x2 <= x1`` or ``y2 <= y1``,
    or its file name was already seen (the first row for a name wins). Blank
    lines are skipped. A missing or unreadable file raises :class:`DataError`.
    """
    path = Path(path)
    boxes: dict[str, Box] = {}
    malformed: list[str] = []
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as file:
            rows = list(csv.reader(file))
    except FileNotFoundError:
        raise DataError(f"Annotation file {path} does not exist") from None
    except OSError as exc:
        raise DataError(f"Cannot read annotation file {path} ({exc.strerror or exc})") from exc
    for row in rows:
        if not any(field.strip() for field in row):
            continue
        try:
            name, box = _parse_row(row)
        except ValueError:
            malformed.append(row[0].strip())
            continue
        if name in boxes:
            malformed.append(name)
        else:
            boxes[name] = box
    return boxes, malformed


def clip_box(box: Box, width: int, height: int) -> Box | None:
    """The part of ``box`` inside a ``width x height`` image, or None if nothing is inside."""
    x1, y1 = max(box.x1, 0), max(box.y1, 0)
    x2, y2 = min(box.x2, width), min(box.y2, height)
    if x2 <= x1 or y2 <= y1:
        return None
    return Box(x1, y1, x2, y2)


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def square_crop_region(box: Box, width: int, height: int, margin: float) -> tuple[int, int, int, int] | None:
    """The square ``(left, top, right, bottom)`` to crop around ``box``, in integer pixels.

    The box is first clipped to the ``width x height`` image; None if it lies
    entirely outside (the caller then uses the image uncropped). The square's
    side is the box's longer side times ``1 + 2 * margin`` (rounded), and it is
    centred on the box. Along each axis where the side fits in the image the
    square is shifted as little as needed to lie inside it. Where the side is
    longer than the image, the square covers the whole image along that axis
    and reaches past one or both edges (those parts are to be padded), still
    as close to centred on the box as that allows.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    clipped = clip_box(box, width, height)
    if clipped is None:
        return None
    side = max(1, _round_half_up(max(clipped.width, clipped.height) * (1 + 2 * margin)))

    def start(low_edge: float, high_edge: float, image_length: int) -> int:
        ideal = _round_half_up((low_edge + high_edge) / 2 - side / 2)  # centred on the box
        # side <= image: any start in [0, image - side] keeps the square inside.
        # side > image: any start in [image - side, 0] makes it cover the whole image.
        lowest, highest = min(0, image_length - side), max(0, image_length - side)
        return min(max(ideal, lowest), highest)

    left = start(clipped.x1, clipped.x2, width)
    top = start(clipped.y1, clipped.y2, height)
    return left, top, left + side, top + side


def crop_to_box(img: Image.Image, box: Box, margin: float) -> Image.Image | None:
    """``img`` cropped to :func:`square_crop_region`; None if the box lies outside it.

    Parts of the square beyond the image are filled by repeating the image's
    edge pixels, so the result is always square and the car is not stretched.
    Works for RGB, greyscale and palette images (convert other modes first).
    """
    region = square_crop_region(box, img.width, img.height, margin)
    if region is None:
        return None
    left, top, right, bottom = region
    inside = img.crop((max(left, 0), max(top, 0), min(right, img.width), min(bottom, img.height)))
    padding = [max(-left, 0), max(-top, 0), max(right - img.width, 0), max(bottom - img.height, 0)]
    if not any(padding):
        return inside
    from torchvision.transforms.v2 import functional as F  # here: importing torchvision takes seconds

    return F.pad(inside, padding, padding_mode="edge")  # [left, top, right, bottom]
