"""Stanford Cars: layout detection, splits, shared labels and download failures."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from ddpm_cars.data.dataset import DataError
from ddpm_cars.data.stanford_cars import (
    KAGGLE_DATASET,
    _chosen_splits,
    download_stanford_cars,
    find_split_dirs,
    load_stanford_cars,
)

# split -> class -> number of images; each class has its own colour
LAYOUT = {"train": {"A": 2, "B": 1}, "test": {"A": 1, "B": 1, "C": 2}}
COLORS = {"A": (255, 0, 0), "B": (0, 255, 0), "C": (0, 0, 255)}


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
    with pytest.raises(DataError, match="train, test, all"):
        _chosen_splits(kaggle_root, "val")


def test_missing_or_foreign_root_is_an_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_stanford_cars(tmp_path / "nope", "train", 8, progress=False)
    with pytest.raises(DataError, match="No Stanford Cars layout"):
        load_stanford_cars(tmp_path, "train", 8, progress=False)


@pytest.mark.parametrize("split, count", [("train", 3), ("test", 4), ("all", 7)])
def test_split_sizes(kaggle_root, split, count):
    data = load_stanford_cars(kaggle_root, split, 8, progress=False)
    assert data.images.shape == (count, 3, 8, 8)


def test_train_and_test_share_class_indices(kaggle_root):
    train = load_stanford_cars(kaggle_root, "train", 8, progress=False)
    test = load_stanford_cars(kaggle_root, "test", 8, progress=False)
    assert train.class_names == test.class_names == ["A", "B", "C"]
    assert train.labels.tolist() == [0, 0, 1]
    assert test.labels.tolist() == [0, 1, 2, 2]
    for data in (train, test):  # each label matches the colour of its class folder
        for image, label in zip(data.images, data.labels):
            brightest_channel = image[:, 4, 4].argmax().item()
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
    assert len(load_stanford_cars(root, "all", 8, progress=False)) == 7


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
    data = load_stanford_cars(kaggle_root, "all", 8, crop, progress=False)
    assert data.images.shape == (7, 3, 8, 8)


def test_unknown_crop_is_an_error(kaggle_root):
    with pytest.raises(DataError, match="Unknown crop 'square'; choose one of none, center, bbox"):
        load_stanford_cars(kaggle_root, "train", 8, "square", progress=False)
