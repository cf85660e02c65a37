"""Load any folder of images into memory as an :class:`ImageSet`.

Labelling rule: every first-level subfolder of ``root`` that holds images (at
any depth) is a class, named after the subfolder. Images lying directly in
``root`` form one more class named after ``root`` itself, so a flat folder is a
single class; if a subfolder already bears that name, ``"_root"`` is appended.
Class names are sorted and a label is the index of its class name.

Hidden files and folders (names starting with ``"."``) below ``root`` are
skipped. Files that cannot be decoded are skipped with an
:class:`ImageDecodeWarning` naming the file.

Every image becomes RGB, or grayscale for a one-channel model (``image_channels``
``"1"``; ``"auto"`` chooses it when every image of the listing is grayscale, see
:func:`detect_channels`), and ``S x S`` by one of the crops of :data:`ddpm_cars.config.Crop`:
``"none"`` squashes the whole image, ``"center"`` keeps the centre square, ``"bbox"``
keeps a square around a given car bounding box (:mod:`ddpm_cars.data.boxes`; only
Stanford Cars has boxes, so a plain folder cannot use it).

One function turns a file into a training image, :func:`_decode`: every data source
decodes through it (:func:`decode_listing`, which :func:`ddpm_cars.data.build_dataset`
runs), and so does :func:`load_image`, which prepares a single user image (``sample
--init-image``) exactly like a training image.
"""

from __future__ import annotations

import contextlib
import os
import stat
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import numpy as np
import torch
from PIL import ExifTags, Image
from tqdm import tqdm

from ddpm_cars.config import Crop, ImageChannels
from ddpm_cars.data.boxes import Box, crop_to_box
from ddpm_cars.data.dataset import IMAGE_CHANNELS, DataError, ImageSet

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
_GREY_MODES = ("1", "L", "LA", "La", "F", *_SIXTEEN_BIT_MODES)  # grayscale by their header alone
_WHITE = (255, 255, 255, 255)
# EXIF orientation -> the transpose that shows the image upright (as in ImageOps.exif_transpose)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageDecodeWarning(UserWarning):
    """An image file was skipped because it could not be decoded."""


def find_images(root: Path) -> list[Path]:
    """Image files under ``root``, recursively, sorted; hidden entries skipped."""
    return [root.joinpath(*parts) for parts in _image_parts(root)]


def _image_parts(root: Path) -> list[tuple[str, ...]]:
    """Each image file under ``root`` as its path's parts below ``root``, in the order of
    sorted paths (by parts, as paths compare)."""
    found = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        below = Path(folder).relative_to(root).parts
        found.extend(
            (*below, name) for name in filenames if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
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


def to_channels(img: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode -> RGB (``channels`` 3) or 8-bit grayscale ("L", ``channels`` 1) through
    :func:`to_rgb`; PIL's ITU-R 601 luma, which keeps a gray pixel's value."""
    rgb = to_rgb(img)
    return rgb if channels == 3 else rgb.convert("L")


def luma(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB ``[..., 3, H, W]`` -> grayscale ``[..., 1, H, W]`` by exactly the integer
    arithmetic of PIL's ``convert("L")`` (ITU-R 601-2: 0.299 R + 0.587 G + 0.114 B)."""
    r, g, b = images.unbind(-3)
    weighted = r.int() * 19595 + g.int() * 38470 + b.int() * 7471 + 0x8000
    return (weighted >> 16).to(torch.uint8).unsqueeze(-3)


def is_grayscale(path: Path | str) -> bool:
    """Whether the image file holds gray pixels only: by its header for grayscale modes,
    else by its decoded pixels (R = G = B everywhere, as in an X-ray saved as RGB)."""
    with _open(path) as img:
        if img.mode in _GREY_MODES:
            return True
        img.load()
        pixels = np.asarray(to_rgb(img))
    return bool((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all())


def detect_channels(paths: list[Path] | list[str], *, progress: bool = True) -> int:
    """1 when every decodable file of ``paths`` is grayscale (:func:`is_grayscale`), else 3;
    stops at the first colour image."""
    with _bomb_warnings_ignored():
        for path in tqdm(paths, desc="Checking for colour", unit="img", disable=not progress, leave=False):
            try:
                if not is_grayscale(path):
                    return 3
            except Exception:  # undecodable: decoding skips it, so it decides nothing
                continue
    return 1


def check_crop(crop: str) -> None:
    """Raise :class:`DataError` unless ``crop`` is one of :data:`ddpm_cars.config.Crop`."""
    choices = get_args(Crop)
    if crop not in choices:
        raise DataError(f"Unknown crop {crop!r}; choose one of {', '.join(choices)}")


def _open(path: Path | str) -> Image.Image:
    """Open ``path`` lazily (its header only), refusing what is not a regular file (a FIFO
    would block) and images over PIL's pixel limit before any pixel is decoded."""
    if not stat.S_ISREG(os.stat(path).st_mode):  # FileNotFoundError for a dangling link
        raise DataError("not a regular file")
    try:
        img = Image.open(path)
    except Image.DecompressionBombError as err:  # over twice the limit
        raise DataError(f"image too large: {err}") from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.width * img.height > limit:  # PIL only warns up to twice the limit
        img.close()
        raise DataError(
            f"image too large: {img.width}x{img.height} pixels, over the limit of {limit} "
            "(PIL.Image.MAX_IMAGE_PIXELS; a decompression bomb?)"
        )
    return img


@contextlib.contextmanager
def _bomb_warnings_ignored() -> Iterator[None]:
    """:func:`_open` refuses images over the pixel limit with a clear error; PIL's own
    warning would only repeat it. (Set from the calling thread: the filters are global.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def _decode(
    path: Path | str, image_size: int, crop: Crop, box: Box | None, margin: float, channels: int
) -> tuple[torch.Tensor, bool]:
    """The ``[channels, S, S]`` uint8 image and whether it was cropped to ``box``: the one way a
    file becomes an image, for a dataset (:func:`decode_listing`) or alone (:func:`load_image`)."""
    with _open(path) as img:
        img.load()
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        rgb = to_channels(img, channels)
    from torchvision.transforms.v2 import functional as F  # here: importing torchvision takes seconds

    cropped = False
    if crop == "bbox" and box is not None:
        boxed = crop_to_box(rgb, box, margin)  # boxes are in stored pixels: crop before rotating
        if boxed is not None:  # None: the box lies outside the image, which stays uncropped
            rgb, cropped = boxed, True
    if orientation in _UPRIGHT:
        rgb = rgb.transpose(_UPRIGHT[orientation])
    if crop == "center":
        rgb = F.center_crop(F.resize(rgb, [image_size]), [image_size, image_size])
    else:  # "none", or "bbox" whose crop is already square (or the image uncropped)
        rgb = F.resize(rgb, [image_size, image_size])
    return F.pil_to_tensor(rgb), cropped


def load_image(
    path: Path | str,
    image_size: int,
    crop: Crop = "none",
    box: Box | None = None,
    margin: float = 0.1,
    channels: int = 3,
) -> torch.Tensor:
    """Decode one image fully into uint8 ``[channels, S, S]`` (3: RGB, 1: grayscale), exactly
    as a dataset decodes it.

    ``crop="none"`` squashes the image to ``S x S``; ``"center"`` resizes its
    shorter side to ``S`` and keeps the centre ``S x S``; ``"bbox"`` keeps the
    square around ``box`` with ``margin`` (see :func:`~ddpm_cars.data.boxes.square_crop_region`)
    and resizes it to ``S x S``. With ``"bbox"``, a missing box or one lying
    entirely outside the image leaves the image uncropped, squashed as with ``"none"``.
    """
    check_crop(crop)
    if channels not in IMAGE_CHANNELS:
        raise DataError(f"an image has 1 (grayscale) or 3 (RGB) channels, not {channels}")
    with _bomb_warnings_ignored():
        return _decode(path, image_size, crop, box, margin, channels)[0]


def _labels(root: Path, parts: list[tuple[str, ...]]) -> tuple[list[int], list[str]]:
    """Labels and sorted class names of the images with these path ``parts`` below ``root``
    (the labelling rule of this module's docstring)."""
    subclasses = {p[0] for p in parts if len(p) > 1}
    loose_name = root.resolve().name or "images"
    while loose_name in subclasses:
        loose_name += "_root"
    names = [p[0] if len(p) > 1 else loose_name for p in parts]
    class_names = sorted(set(names))
    index = {name: i for i, name in enumerate(class_names)}
    return [index[name] for name in names], class_names


def _try_load(
    path: Path | str, image_size: int, crop: Crop, box: Box | None, margin: float, channels: int
) -> tuple[torch.Tensor, bool] | Exception:
    try:
        return _decode(path, image_size, crop, box, margin, channels)
    except Exception as exc:  # any decoder failure means "skip this file"
        return exc


@dataclass(frozen=True)
class ImageListing:
    """What a data source decodes: its image files with their labels, and how each one
    becomes ``S x S`` of ``image_channels`` (see :func:`load_image`). ``crop="bbox"`` needs
    ``boxes``, one per path (None: that image stays uncropped). ``also_read`` names the other files the
    result depends on (box annotations), so a cache of it can tell when they change."""

    paths: list[Path] | list[str]
    labels: list[int]
    class_names: list[str]
    image_size: int
    crop: Crop = "none"
    boxes: list[Box | None] | None = None
    margin: float = 0.1
    also_read: tuple[Path, ...] = ()
    image_channels: ImageChannels = "auto"

    def __post_init__(self) -> None:
        check_crop(self.crop)
        check_image_channels(self.image_channels)
        if self.image_size < 1:
            raise DataError(f"image_size must be positive, got {self.image_size}")
        if not self.paths:
            raise DataError("No image files to load")
        if self.crop == "bbox":
            if self.boxes is None or len(self.boxes) != len(self.paths):
                given = "none" if self.boxes is None else len(self.boxes)
                raise DataError(
                    f"crop 'bbox' needs one box (or None) per image: {len(self.paths)} images, {given} boxes"
                )
            if not self.margin >= 0:
                raise DataError(f"bbox margin must be >= 0 (a share of the box's longer side), got {self.margin}")
        elif self.boxes is not None:
            raise DataError(f"boxes are only used with crop 'bbox', not {self.crop!r}")


@dataclass
class Decoded:
    """What decoding a listing gave besides the images: the kept images' labels, the
    files skipped (path and reason), how many boxes lay entirely outside their image and
    the images' channel count."""

    labels: list[int]
    class_names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    outside: int = 0
    channels: int = 3


def decode_listing(listing: ImageListing, write: Callable[[torch.Tensor], None], *, progress: bool = True) -> Decoded:
    """Decode the listing's files in a thread pool and ``write`` each ``[1, C, S, S]`` image
    in order (C from ``listing.image_channels``, found by :func:`detect_channels` when it is
    ``auto``); undecodable files are skipped (and listed), at least one must decode."""
    import torchvision.transforms.v2  # noqa: F401  (once, before the threads that use it)

    paths, size, crop, margin = listing.paths, listing.image_size, listing.crop, listing.margin
    boxes = listing.boxes if listing.boxes is not None else [None] * len(paths)
    wanted = listing.image_channels
    channels = detect_channels(paths, progress=progress) if wanted == "auto" else int(wanted)
    done = Decoded([], listing.class_names, channels=channels)
    with ThreadPoolExecutor() as pool, _bomb_warnings_ignored():
        results = pool.map(lambda p, b: _try_load(p, size, crop, b, margin, channels), paths, boxes)
        bar = tqdm(results, total=len(paths), desc="Loading images", unit="img", disable=not progress)
        for result, path, label, box in zip(
            bar, paths, listing.labels, boxes
        ):  # the bar first: zip stops at it, so it ends at 100%
            if isinstance(result, Exception):
                done.skipped.append((str(path), str(result)))
                continue
            image, cropped = result
            write(image.unsqueeze(0))
            done.labels.append(label)
            done.outside += box is not None and not cropped
    if not done.labels:
        warn_skipped(done.skipped)
        raise DataError(f"None of the {len(paths)} image files could be decoded (first: {paths[0]})")
    return done


def warn_skipped(skipped: list[tuple[str, str]]) -> None:
    """One :class:`ImageDecodeWarning` per file that could not be decoded."""
    for path, reason in skipped:
        warnings.warn(f"Skipping {path}: cannot decode image ({reason})", ImageDecodeWarning, stacklevel=3)


class MemoryImages:
    """A writer for :func:`decode_listing` that keeps the images in one tensor, allocated for
    ``capacity`` images when the first arrives (its channels are known then)."""

    def __init__(self, capacity: int, image_size: int):
        self.capacity, self.image_size = capacity, image_size
        self.buffer: torch.Tensor | None = None
        self.count = 0

    def __call__(self, images: torch.Tensor) -> None:
        if self.buffer is None:
            size = self.image_size
            self.buffer = torch.empty((self.capacity, images.shape[1], size, size), dtype=torch.uint8)
        self.buffer[self.count : self.count + images.shape[0]] = images
        self.count += images.shape[0]

    @property
    def images(self) -> torch.Tensor:
        if self.buffer is None:
            return torch.empty((0, 3, self.image_size, self.image_size), dtype=torch.uint8)
        return self.buffer[: self.count]


def check_image_channels(image_channels: str) -> None:
    """Raise :class:`DataError` unless ``image_channels`` is one of :data:`ddpm_cars.config.ImageChannels`."""
    choices = get_args(ImageChannels)
    if image_channels not in choices:
        raise DataError(f"Unknown image channels {image_channels!r}; choose one of {', '.join(choices)}")


def list_image_folder(
    root: str | Path, image_size: int, crop: Crop = "none", image_channels: ImageChannels = "auto"
) -> ImageListing:
    """Every image under ``root``, labelled by first-level subfolder; ``crop`` is "none" or
    "center"; ``image_channels`` "auto" (grayscale when every image is), "1" or "3"."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"Image folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is not a directory; pass a folder of images")
    check_crop(crop)
    if crop == "bbox":
        raise DataError(
            f"crop 'bbox' needs the Stanford Cars Kaggle layout (car_data/{{train,test}}/<class>/ with "
            f"anno_train.csv / anno_test.csv beside car_data/); {root} is a plain image folder, use crop none or center"
        )
    parts = _image_parts(root)
    if not parts:
        raise DataError(f"No image files in {root} (looked for {', '.join(IMAGE_EXTENSIONS)}, any case)")
    labels, class_names = _labels(root, parts)
    base = os.fspath(root)  # paths as strings: 50,000 Path objects take half a second to make
    paths = [os.path.join(base, *p) for p in parts]
    return ImageListing(paths, labels, class_names, image_size, crop, image_channels=image_channels)


def load_image_folder(
    root: str | Path,
    image_size: int,
    crop: Crop = "none",
    *,
    image_channels: ImageChannels = "auto",
    progress: bool = True,
) -> ImageSet:
    """Every image under ``root`` decoded into memory, labelled by first-level subfolder;
    ``crop`` is "none" or "center"; grayscale images ``[N, 1, S, S]`` when every image is
    (``image_channels`` "auto"; "1" or "3" converts). Undecodable files are skipped with a warning."""
    listing = list_image_folder(root, image_size, crop, image_channels)
    out = MemoryImages(len(listing.paths), image_size)
    decoded = decode_listing(listing, out, progress=progress)
    warn_skipped(decoded.skipped)
    return ImageSet(out.images, torch.tensor(decoded.labels, dtype=torch.int64), decoded.class_names)
