"""Stanford Cars from the Kaggle copy laid out as class folders.

After ``kagglehub`` downloads :data:`KAGGLE_DATASET`, the images sit in
``<root>/car_data/car_data/{train,test}/<class name>/*.jpg`` (8,144 train and
8,041 test images, 196 classes). A local copy is recognised at ``root``,
``root/car_data`` or ``root/car_data/car_data``: the folder that holds
``train/`` and/or ``test/``.
"""

from __future__ import annotations

from pathlib import Path

from ddpm_cars.data.dataset import DataError, ImageSet
from ddpm_cars.data.folder import find_images, load_images

KAGGLE_DATASET = "jutrera/stanford-car-dataset-by-classes-folder"
SPLITS = ("train", "test", "all")
_SPLIT_FOLDERS = ("train", "test")
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


def split_dirs(root: Path, split: str) -> list[Path]:
    """Folders making up ``split``; ``"all"`` is every split present in this copy."""
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    dirs = _require_split_dirs(root)
    if split == "all":
        return [dirs[name] for name in _SPLIT_FOLDERS if name in dirs]
    if split not in dirs:
        raise DataError(f"Split {split!r} is missing from {root} (found: {', '.join(dirs)})")
    return [dirs[split]]


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_stanford_cars(
    root: Path,
    split: str,
    image_size: int,
    center_crop: bool = False,
    progress: bool = True,
) -> ImageSet:
    """Load a split; class indices come from all splits present, so they agree.

    Only images inside class folders count; files loose in a split folder are ignored.
    """
    chosen = split_dirs(root, split)
    every_split = _require_split_dirs(root).values()
    class_names = sorted({d.name for split_dir in every_split for d in _class_dirs(split_dir)})
    index = {name: i for i, name in enumerate(class_names)}
    paths, labels = [], []
    for split_dir in chosen:
        for class_dir in _class_dirs(split_dir):
            images = find_images(class_dir)
            paths += images
            labels += [index[class_dir.name]] * len(images)
    if not paths:
        raise DataError(f"No images in class folders of split {split!r} under {root}")
    return load_images(paths, labels, class_names, image_size, center_crop, progress=progress)
