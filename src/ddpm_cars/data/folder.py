"""Load any folder of images into memory as an :class:`ImageSet`.

Labelling rule: every first-level subfolder of ``root`` that holds images (at
any depth) is a class, named after the subfolder. Images lying directly in
``root`` form one more class named after ``root`` itself, so a flat folder is a
single class; if a subfolder already bears that name, ``"_root"`` is appended.
Class names are sorted and a label is the index of its class name.

Hidden files and folders (names starting with ``"."``) below ``root`` are
skipped. Files that cannot be decoded are skipped with an
:class:`ImageDecodeWarning` naming the file.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

from ddpm_cars.data.dataset import DataError, ImageSet

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
_WHITE = (255, 255, 255, 255)


class ImageDecodeWarning(UserWarning):
    """An image file was skipped because it could not be decoded."""


def find_images(root: Path) -> list[Path]:
    """Image files under ``root``, recursively, sorted; hidden entries skipped."""
    found = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(
            Path(folder, name)
            for name in filenames
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
        )
    return sorted(found)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; 16-bit grey is scaled down, alpha is put on white."""
    if img.mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(img, dtype=np.float64).clip(0, 65535) / 257.0
        return Image.fromarray(grey.round().astype(np.uint8)).convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: Path, image_size: int, center_crop: bool) -> torch.Tensor:
    """Decode one image fully into uint8 ``[3, S, S]``.

    By default the image is squashed to ``S x S``; with ``center_crop`` its
    shorter side is resized to ``S`` and the centre ``S x S`` is kept.
    """
    with Image.open(path) as img:
        img.load()
        rgb = to_rgb(ImageOps.exif_transpose(img))
    if center_crop:
        rgb = F.center_crop(F.resize(rgb, [image_size]), [image_size, image_size])
    else:
        rgb = F.resize(rgb, [image_size, image_size])
    return F.pil_to_tensor(rgb)


def label_images(root: Path, paths: list[Path]) -> tuple[list[int], list[str]]:
    """Labels and sorted class names for ``paths`` under ``root`` (module rule)."""
    parts = [path.relative_to(root).parts for path in paths]
    subclasses = {p[0] for p in parts if len(p) > 1}
    loose_name = root.resolve().name or "images"
    while loose_name in subclasses:
        loose_name += "_root"
    names = [p[0] if len(p) > 1 else loose_name for p in parts]
    class_names = sorted(set(names))
    index = {name: i for i, name in enumerate(class_names)}
    return [index[name] for name in names], class_names


def _try_load(path: Path, image_size: int, center_crop: bool) -> torch.Tensor | Exception:
    try:
        return load_image(path, image_size, center_crop)
    except Exception as exc:  # any decoder failure means "skip this file"
        return exc


def load_images(
    paths: list[Path],
    labels: list[int],
    class_names: list[str],
    image_size: int,
    center_crop: bool = False,
    *,
    progress: bool = True,
) -> ImageSet:
    """Decode ``paths`` in a thread pool (order kept); skip undecodable files."""
    if image_size < 1:
        raise DataError(f"image_size must be positive, got {image_size}")
    if not paths:
        raise DataError("No image files to load")
    with ThreadPoolExecutor() as pool:
        results = pool.map(lambda p: _try_load(p, image_size, center_crop), paths)
        bar = tqdm(results, total=len(paths), desc="Loading images", unit="img", disable=not progress)
        decoded = list(bar)
    images, kept = [], []
    for path, label, result in zip(paths, labels, decoded):
        if isinstance(result, Exception):
            warnings.warn(f"Skipping {path}: cannot decode image ({result})", ImageDecodeWarning, stacklevel=2)
        else:
            images.append(result)
            kept.append(label)
    if not images:
        raise DataError(f"None of the {len(paths)} image files could be decoded (first: {paths[0]})")
    return ImageSet(torch.stack(images), torch.tensor(kept, dtype=torch.int64), class_names)


def load_image_folder(
    root: str | Path,
    image_size: int,
    center_crop: bool = False,
    *,
    progress: bool = True,
) -> ImageSet:
    """Load every image under ``root``, labelled by first-level subfolder."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"Image folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is not a directory; pass a folder of images")
    paths = find_images(root)
    if not paths:
        raise DataError(f"No image files in {root} (looked for {', '.join(IMAGE_EXTENSIONS)}, any case)")
    labels, class_names = label_images(root, paths)
    return load_images(paths, labels, class_names, image_size, center_crop, progress=progress)
