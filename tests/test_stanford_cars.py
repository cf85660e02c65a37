"""Stanford Cars: layout detection, splits, shared labels and download failures.

Images are loaded the way a run loads them, through :func:`ddpm_cars.data.build_dataset`
(with the data cache off); errors it cannot reach from a local folder are checked on the
listing it uses, :func:`~ddpm_cars.data.stanford_cars.list_stanford_cars`."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import get_args

import pytest
from PIL import Image

from ddpm_cars.config import Crop, DataConfig, Split
from ddpm_cars.data import ImageSet, build_dataset
from ddpm_cars.data.dataset import DataError
from ddpm_cars.data.stanford_cars import (
    KAGGLE_DATASET,
    _chosen_splits,
    download_stanford_cars,
    find_split_dirs,
    list_stanford_cars,
)

# split -> class -> number of images; each class has its own colour
LAYOUT = {"train": {"A": 2, "B": 1}, "test": {"A": 1, "B": 1, "C": 2}}
COLORS = {"A": (255, 0, 0), "B": (0, 255, 0), "C": (0, 0, 255)}
SIZE = 16


def load(source: Path | str, split: str, crop: str = "none") -> ImageSet:
    """A split as ``build_dataset`` decodes it into memory."""
    config = DataConfig(source=str(source), split=split, image_size=SIZE, crop=crop, cache="off")
    return build_dataset(config, progress=False)


def make_copy(base: Path, layout=LAYOUT) -> Path:
    """A Kaggle-shaped copy under ``base``; returns the folder holding the splits."""
    splits = base / "car_data" / "car_data"
    for split, classes in layout.items():
        for name, count in classes.items():
            (splits / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (20, 12), COLORS[name]).save(splits / split / name / f"{i:05d}.jpg")
    (base / "names.csv").write_text("A\nB\nC\n")
    return splits


@pytest.fixture
def kaggle_root(tmp_path) -> Path:
    make_copy(tmp_path / "kaggle")
    return tmp_path / "kaggle"


@pytest.mark.parametrize("depth", ["", "car_data", "car_data/car_data"])
def test_layout_found_at_each_depth(kaggle_root, depth):
    splits = (kaggle_root / "car_data" / "car_data").resolve()
    assert find_split_dirs(kaggle_root / depth) == {"train": splits / "train", "test": splits / "test"}


def test_other_folders_are_not_stanford(tmp_path):
    (tmp_path / "audi").mkdir()
    assert find_split_dirs(tmp_path) is None


def test_a_copy_with_only_one_split(tmp_path):
    splits = make_copy(tmp_path, {"test": {"C": 1}})
    assert find_split_dirs(tmp_path) == {"test": (splits / "test").resolve()}
    assert list(_chosen_splits(tmp_path, "all").values()) == [(splits / "test").resolve()]
    with pytest.raises(DataError, match="'train' is missing"):
        _chosen_splits(tmp_path, "train")


def test_unknown_split_lists_the_choices(kaggle_root):
    assert get_args(Split) == ("train", "test", "all")  # the names the message lists come from the config
    with pytest.raises(DataError, match="Unknown split 'val'; choose one of train, test, all"):
        _chosen_splits(kaggle_root, "val")
    with pytest.raises(DataError, match="Unknown split 'val'; choose one of train, test, all"):
        list_stanford_cars(kaggle_root, "val", SIZE)


def test_missing_or_foreign_root_is_an_error(tmp_path):
    with pytest.raises(DataError, match="Stanford Cars folder .*nope does not exist"):
        list_stanford_cars(tmp_path / "nope", "train", SIZE)
    with pytest.raises(DataError, match="No Stanford Cars layout"):
        list_stanford_cars(tmp_path, "train", SIZE)


def test_a_download_without_the_layout_is_an_error(monkeypatch, tmp_path):
    fake_kagglehub(monkeypatch, lambda handle: str(tmp_path))
    with pytest.raises(DataError, match="No Stanford Cars layout"):
        load("stanford-cars", "train")


@pytest.mark.parametrize("split, count", [("train", 3), ("test", 4), ("all", 7)])
def test_split_sizes(kaggle_root, split, count):
    data = load(kaggle_root, split)
    assert data.images.shape == (count, 3, SIZE, SIZE)


def test_loose_files_in_a_split_folder_are_ignored(kaggle_root):
    Image.new("RGB", (20, 12)).save(kaggle_root / "car_data" / "car_data" / "train" / "loose.jpg")
    assert len(load(kaggle_root, "train")) == 3


def test_train_and_test_share_class_indices(kaggle_root):
    train = load(kaggle_root, "train")
    test = load(kaggle_root, "test")
    assert train.class_names == test.class_names == ["A", "B", "C"]
    assert train.labels.tolist() == [0, 0, 1]
    assert test.labels.tolist() == [0, 1, 2, 2]
    for data in (train, test):  # each label matches the colour of its class folder
        for image, label in zip(data.images, data.labels):
            brightest_channel = image[:, SIZE // 2, SIZE // 2].argmax().item()
            assert brightest_channel == label.item()


def fake_kagglehub(monkeypatch, download) -> None:
    module = types.ModuleType("kagglehub")
    module.dataset_download = download
    monkeypatch.setitem(sys.modules, "kagglehub", module)


def test_download_returns_the_kagglehub_path(monkeypatch, kaggle_root):
    calls = []
    fake_kagglehub(monkeypatch, lambda handle: calls.append(handle) or str(kaggle_root))
    root = download_stanford_cars()
    assert calls == [KAGGLE_DATASET] and root == kaggle_root
    data = load("stanford-cars", "all")  # a run with --data stanford-cars downloads, then decodes
    assert calls == [KAGGLE_DATASET] * 2 and len(data) == 7 and data.class_names == ["A", "B", "C"]


def test_download_failure_explains_what_to_do(monkeypatch):
    def offline(handle):
        raise ConnectionError("Failed to resolve 'api.kaggle.com'\nsecond line of noise")

    fake_kagglehub(monkeypatch, offline)
    with pytest.raises(DataError) as excinfo:
        download_stanford_cars()
    message = str(excinfo.value)
    assert "\n" not in message
    for part in (KAGGLE_DATASET, "Failed to resolve", "kaggle.json", "KAGGLE_USERNAME", "KAGGLE_KEY", "--data"):
        assert part in message


def test_missing_kagglehub_is_a_data_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "kagglehub", None)  # makes the import fail
    with pytest.raises(DataError, match="Install kagglehub.*--data"):
        download_stanford_cars()


@pytest.mark.parametrize("crop", ["none", "center"])
def test_crops_other_than_bbox_need_no_annotations(kaggle_root, crop):
    data = load(kaggle_root, "all", crop)
    assert data.images.shape == (7, 3, SIZE, SIZE)


def test_unknown_crop_is_an_error(kaggle_root):
    assert get_args(Crop) == ("none", "center", "bbox")  # the names the message lists come from the config
    with pytest.raises(DataError, match="Unknown crop 'square'; choose one of none, center, bbox"):
        list_stanford_cars(kaggle_root, "train", SIZE, "square")
