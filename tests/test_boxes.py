"""Bounding-box crops: box geometry, annotation CSVs and bbox loading of the Kaggle layout.

Copies are loaded the way a run loads them, through :func:`ddpm_cars.data.build_dataset`
(with the data cache off)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_cars.config import DataConfig
from ddpm_cars.data import ImageSet, build_dataset
from ddpm_cars.data.boxes import (
    Box,
    BoxWarning,
    crop_to_box,
    find_annotations,
    parse_annotations,
    square_crop_region,
)
from ddpm_cars.data.dataset import DataError
from ddpm_cars.data.folder import ImageListing, MemoryImages, decode_listing, load_image

W, H = 40, 30  # every test image is 40 x 30
CAR, BACKGROUND, MARK = (255, 0, 0), (0, 0, 255), (0, 255, 0)


# --- fixtures: Kaggle-shaped copies with a red "car" on blue ------------------


def car_array(box: tuple[int, int, int, int], size=(W, H)) -> np.ndarray:
    """A ``size`` RGB image, background colour, with the car colour filling ``box`` (x1, y1, x2, y2)."""
    x1, y1, x2, y2 = box
    array = np.empty((size[1], size[0], 3), np.uint8)
    array[:] = BACKGROUND
    array[y1:y2, x1:x2] = CAR
    return array


def save_png(path: Path, array: np.ndarray, **kwargs) -> Path:
    """PNG bytes (exact colours) even under a .jpg name: PIL goes by content, not extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", **kwargs)
    return path


def add_image(root: Path, split: str, name: str, array: np.ndarray, cls: str = "Audi") -> Path:
    return save_png(root / "car_data" / "car_data" / split / cls / name, array)


def write_csv(root: Path, split: str, lines: list[str]) -> Path:
    path = root / f"anno_{split}.csv"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def one_car_copy(root: Path, box: tuple[int, int, int, int], split: str = "train") -> Path:
    """A copy holding one image of a car at ``box``, with its CSV row; returns the image path."""
    path = add_image(root, split, "00001.jpg", car_array(box))
    write_csv(root, split, ["00001.jpg,{},{},{},{},1".format(*box)])
    return path


def expected_crop(path: Path, region: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """The hand-computed ``region`` of the stored image (inside the image), resized like the loader does."""
    with Image.open(path) as img:
        cropped = img.convert("RGB").crop(region)
    return torch.from_numpy(np.array(cropped.resize((size, size), Image.Resampling.BILINEAR))).permute(2, 0, 1)


def car_weight(image: torch.Tensor) -> torch.Tensor:
    """Per pixel, how much of it is car (1) rather than background (0), from red minus blue."""
    return ((image[0].float() - image[2].float()) / 255 + 1).div(2).clamp(0, 1)


def load(root: Path, split: str, size: int, crop: str = "bbox", margin: float = 0.1) -> ImageSet:
    """The copy at ``root`` as ``build_dataset`` decodes it into memory."""
    config = DataConfig(source=str(root), split=split, image_size=size, crop=crop, bbox_margin=margin, cache="off")
    return build_dataset(config, progress=False)


def load_one(root: Path, size: int, crop: str = "bbox", margin: float = 0.1, split: str = "train") -> torch.Tensor:
    data = load(root, split, size, crop, margin)
    assert len(data) == 1
    return data.images[0]


# --- square_crop_region: hand-computed numbers --------------------------------


@pytest.mark.parametrize(
    "box, margin, region",
    [
        # 12 x 6 box, side 12 * 1.5 = 18 around centre (16, 11): fits inside
        (Box(10, 8, 22, 14), 0.25, (7, 2, 25, 20)),
        # side 20 around centre (5, 15) would start at x = -5: shifted right to 0
        (Box(0, 10, 10, 20), 0.5, (0, 5, 20, 25)),
        # side 20 around centre (35, 26) would end at (45, 36): shifted back to end at (40, 30)
        (Box(30, 22, 40, 30), 0.5, (20, 10, 40, 30)),
        # side 40 > height 30: spans the full height and 5 rows past each edge, centred on y = 15
        (Box(0, 10, 40, 20), 0.0, (0, -5, 40, 35)),
        # side 36 * 1.2 = 43.2 -> 43 exceeds both sides; x centre 20 -> starts at -1.5 -> -1 (half up),
        # y centre 10 -> starts at -11.5 -> -11, within [30 - 43, 0] so the whole height is covered
        (Box(2, 0, 38, 20), 0.1, (-1, -11, 42, 32)),
        # a tall box whose side equals the height: x centre 12 -> starts at -3, shifted to 0
        (Box(10, 0, 14, 30), 0.0, (0, 0, 30, 30)),
        # fractional coordinates: 10 x 4 box, side 12, centre (15.5, 10.25) -> (9.5 -> 10, 4.25 -> 4)
        (Box(10.5, 8.25, 20.5, 12.25), 0.1, (10, 4, 22, 16)),
        # partly outside: clipped to (30, 20, 40, 30) first, a 10 x 10 square
        (Box(30, 20, 50, 40), 0.0, (30, 20, 40, 30)),
        (Box(30, 20, 50, 40), 0.5, (20, 10, 40, 30)),
    ],
)
def test_square_crop_region_hand_computed(box, margin, region):
    assert square_crop_region(box, W, H, margin) == region
    left, top, right, bottom = region
    assert right - left == bottom - top  # always square


@pytest.mark.parametrize("box", [Box(45, 0, 50, 10), Box(40, 0, 45, 10), Box(0, 30, 10, 35)])
def test_box_outside_the_image_has_no_region(box):
    assert square_crop_region(box, W, H, 0.1) is None
    assert crop_to_box(Image.new("RGB", (W, H)), box, 0.1) is None


def test_negative_margin_is_rejected():
    with pytest.raises(ValueError, match="margin"):
        square_crop_region(Box(0, 0, 10, 10), W, H, -0.1)


# --- crop_to_box ---------------------------------------------------------------


def test_crop_inside_the_image_is_a_plain_crop():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8))
    cropped = crop_to_box(img, Box(10, 8, 22, 14), 0.25)
    assert cropped.size == (18, 18)
    assert np.array_equal(np.asarray(cropped), np.asarray(img)[2:20, 7:25])


def test_crop_past_the_edges_repeats_the_edge_pixels():
    array = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    cropped = np.asarray(crop_to_box(Image.fromarray(array), Box(2, 0, 38, 20), 0.1))  # (-1, -11, 42, 32)
    assert cropped.shape == (43, 43, 3)
    rows = np.clip(np.arange(-11, 32), 0, H - 1)  # what edge replication reads from the image
    cols = np.clip(np.arange(-1, 42), 0, W - 1)
    assert np.array_equal(cropped, array[rows][:, cols])


def test_crop_keeps_grey_and_palette_modes():
    grey = Image.new("L", (W, H), 7)
    assert crop_to_box(grey, Box(0, 10, 40, 20), 0.0).mode == "L"
    palette = Image.new("P", (W, H), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    padded = crop_to_box(palette, Box(0, 10, 40, 20), 0.0)
    assert padded.size == (40, 40) and padded.convert("RGB").getpixel((0, 0)) == CAR


# --- annotation CSVs -------------------------------------------------------------


def test_parse_annotations_parses_rows_and_lists_the_malformed(tmp_path):
    path = tmp_path / "anno_train.csv"
    path.write_text(
        "\ufeff00001.jpg,39,116,569,375,14\n"  # a BOM before the first row is ignored
        "file,x1,y1,x2,y2,class\n"  # a header: not numbers
        "00002.jpg, 1.5 ,2,30.25,40,3\n"  # spaces and fractions are fine
        "\n"  # blank lines are skipped, not counted
        "00003.jpg,ten,2,30,40,3\n"  # non-numeric
        "00004.jpg,1,2,30\n"  # too few fields
        "00005.jpg,1,2,30,40,3,extra\n"  # too many fields
        "00006.jpg,30,2,30,40,3\n"  # x2 <= x1
        "00007.jpg,1,40,30,2,3\n"  # y2 <= y1
        "00008.jpg,-1,2,30,40,3\n"  # negative
        "00009.jpg,nan,2,30,40,3\n"  # not finite
        "00010.jpg,1,2,30,40,Audi\n"  # class id not a number
        "00001.jpg,0,0,5,5,1\n"  # repeated file name: the first row wins
    )
    boxes, malformed = parse_annotations(path)
    assert boxes == {"00001.jpg": Box(39, 116, 569, 375), "00002.jpg": Box(1.5, 2, 30.25, 40)}
    assert malformed == ["file"] + [f"{i:05d}.jpg" for i in range(3, 11)] + ["00001.jpg"]


def test_missing_annotation_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="anno_train.csv does not exist"):
        parse_annotations(tmp_path / "anno_train.csv")


def test_find_annotations_walks_up_from_the_split_folder_nearest_first(tmp_path):
    split_dir = tmp_path / "car_data" / "car_data" / "train"
    split_dir.mkdir(parents=True)
    assert find_annotations(split_dir, "train") is None
    for folder in (tmp_path, tmp_path / "car_data", tmp_path / "car_data" / "car_data"):
        (folder / "anno_train.csv").write_text("")
        assert find_annotations(split_dir, "train") == folder / "anno_train.csv"
    (split_dir / "anno_test.csv").write_text("")  # inside the split folder: not looked at
    assert find_annotations(split_dir, "test") is None


# --- loading with crop="bbox" --------------------------------------------------


def test_bbox_crop_is_the_centred_square_around_the_car(tmp_path):
    path = one_car_copy(tmp_path, (10, 8, 22, 14))
    image = load_one(tmp_path, 18, margin=0.25)  # region (7, 2, 25, 20): 18 x 18, no resampling
    assert torch.equal(image, expected_crop(path, (7, 2, 25, 20), 18))
    car = torch.zeros(18, 18, dtype=torch.bool)
    car[8 - 2 : 14 - 2, 10 - 7 : 22 - 7] = True  # the box moved into the crop's coordinates
    assert (car_weight(image) == car).all()


def test_bbox_crop_is_dominated_by_the_car_and_centred(tmp_path):
    path = one_car_copy(tmp_path, (12, 6, 28, 22))  # 16 x 16; side 16 * 1.25 = 20 around (20, 14): (10, 4, 30, 24)
    image = load_one(tmp_path, 16, margin=0.125)
    assert image.shape == (3, 16, 16)
    assert torch.allclose(image.float(), expected_crop(path, (10, 4, 30, 24), 16).float(), atol=2)
    weight = car_weight(image)
    assert weight.mean().item() == pytest.approx(16 * 16 / 20**2, abs=0.03)  # 64 % car
    coords = torch.arange(16).float()
    centre_y = (weight.sum(1) * coords).sum() / weight.sum()
    centre_x = (weight.sum(0) * coords).sum() / weight.sum()
    assert centre_x.item() == pytest.approx(7.5, abs=0.5) and centre_y.item() == pytest.approx(7.5, abs=0.5)
    squashed = load_one(tmp_path, 16, crop="none")
    assert car_weight(squashed).mean().item() == pytest.approx(16 * 16 / (W * H), abs=0.03)  # about 21 %


def car_aspect(image: torch.Tensor) -> float:
    """Car width over car height, from the car weight summed along the middle row and column."""
    weight = car_weight(image)
    rows, cols = weight.sum(1), weight.sum(0)
    middle_y, middle_x = rows.argmax().item(), cols.argmax().item()
    return (weight[middle_y].sum() / weight[:, middle_x].sum()).item()


def test_a_wide_box_keeps_its_aspect(tmp_path):
    one_car_copy(tmp_path, (5, 12, 35, 22))  # 30 x 10: three times wider than tall
    image = load_one(tmp_path, 16, margin=0.2)  # side 36: region (2, -1, 38, 35), padded with background
    assert image.shape == (3, 16, 16)
    assert car_aspect(image) == pytest.approx(3.0, rel=0.1)
    assert car_aspect(load_one(tmp_path, 16, crop="none")) == pytest.approx(30 / 40 / (10 / 30), rel=0.1)  # 2.25


def test_box_near_the_edge_is_padded_with_edge_pixels(tmp_path):
    array = car_array((0, 10, 40, 20))
    array[0] = MARK  # the top row, to see it repeated in the padding
    add_image(tmp_path, "train", "00001.jpg", array)
    write_csv(tmp_path, "train", ["00001.jpg,0,10,40,20,1"])
    image = load_one(tmp_path, 40, margin=0.0)  # region (0, -5, 40, 35): 5 rows padded above and below
    expected = np.concatenate([np.repeat(array[:1], 5, 0), array, np.repeat(array[-1:], 5, 0)])
    assert torch.equal(image, torch.from_numpy(expected).permute(2, 0, 1))
    assert load_one(tmp_path, 16, margin=0.0).shape == (3, 16, 16)


def test_box_is_in_stored_pixels_and_exif_rotation_comes_after(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 3  # rotate 180 degrees
    path = tmp_path / "car_data" / "car_data" / "train" / "Audi" / "00001.jpg"
    save_png(path, car_array((10, 8, 22, 14)), exif=exif)
    write_csv(tmp_path, "train", ["00001.jpg,10,8,22,14,1"])
    image = load_one(tmp_path, 18, margin=0.25)
    assert torch.equal(image, expected_crop(path, (7, 2, 25, 20), 18).flip(1, 2))


def test_rows_that_do_not_help_leave_images_uncropped_with_one_warning(tmp_path):
    box = (10, 8, 22, 14)
    for name in ["good", "nonnumeric", "toofew", "flipped", "outside", "norow"]:
        add_image(tmp_path, "train", f"{name}.jpg", car_array(box))
    write_csv(
        tmp_path,
        "train",
        [
            "good.jpg,10,8,22,14,1",
            "nonnumeric.jpg,10,eight,22,14,1",
            "toofew.jpg,10,8,22",
            "flipped.jpg,22,8,10,14,1",  # x2 <= x1
            "outside.jpg,45,8,60,14,1",  # parses, but lies right of the 40-pixel-wide image
            "stranger.jpg,1,2",  # malformed, but for no image of this copy: not counted
        ],
    )
    message = r"^bbox crop: 5 of 6 images used uncropped \(4 malformed rows, 1 without a row in anno_train\.csv\)$"
    with pytest.warns(BoxWarning, match=message) as record:
        data = load(tmp_path, "train", 18, "bbox", 0.25)
    assert len([w for w in record if issubclass(w.category, BoxWarning)]) == 1
    squashed = load(tmp_path, "train", 18, "none")
    order = ["flipped", "good", "nonnumeric", "norow", "outside", "toofew"]  # sorted paths
    for name, image, plain in zip(order, data.images, squashed.images):
        if name == "good":
            assert car_weight(image).mean().item() == pytest.approx(72 / 18**2, abs=0.01)
        else:
            assert torch.equal(image, plain), name


def test_counts_name_each_splits_csv(tmp_path):
    for split in ("train", "test"):
        add_image(tmp_path, split, "00001.jpg", car_array((10, 8, 22, 14)))
        add_image(tmp_path, split, "00002.jpg", car_array((10, 8, 22, 14)))
    write_csv(tmp_path, "train", ["00001.jpg,10,8,22,14,1"])
    write_csv(tmp_path, "test", ["00001.jpg,x,8,22,14,1"])
    message = r"2 of 2 images.*\(1 malformed row, 1 without a row in anno_test\.csv\)"
    with pytest.warns(BoxWarning, match=message):
        load(tmp_path, "test", 16)
    message = (
        r"3 of 4 images.*\(1 malformed row, 1 without a row in anno_train\.csv, "
        r"1 without a row in anno_test\.csv\)"
    )
    with pytest.warns(BoxWarning, match=message):
        load(tmp_path, "all", 16)


def test_no_warning_when_every_image_has_a_box(tmp_path):
    one_car_copy(tmp_path, (10, 8, 22, 14))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_one(tmp_path, 16)


def test_missing_csv_is_an_error_naming_the_file_and_where_it_looked(tmp_path):
    for split in ("train", "test"):
        add_image(tmp_path, split, "00001.jpg", car_array((10, 8, 22, 14)))
    write_csv(tmp_path, "train", ["00001.jpg,10,8,22,14,1"])
    load_one(tmp_path, 16)  # the train split needs only anno_train.csv
    with pytest.raises(DataError) as excinfo:
        load(tmp_path, "all", 16)
    message = str(excinfo.value)
    assert "anno_test.csv" in message and "\n" not in message
    for folder in (tmp_path, tmp_path / "car_data", tmp_path / "car_data" / "car_data"):
        assert str(folder.resolve()) in message
    load(tmp_path, "all", 16, "none")  # other crops need no CSV


def test_bbox_on_a_plain_folder_is_an_error(tmp_path):
    save_png(tmp_path / "cars" / "a.png", car_array((10, 8, 22, 14)))
    with pytest.raises(DataError, match="Stanford Cars Kaggle layout.*anno_train.csv / anno_test.csv"):
        load(tmp_path, "train", 16)


@pytest.mark.parametrize("depth", ["", "car_data", "car_data/car_data"])
def test_csv_found_whichever_folder_data_names(tmp_path, depth):
    path = one_car_copy(tmp_path, (10, 8, 22, 14))
    image = load_one(tmp_path / depth, 18, margin=0.25)
    assert torch.equal(image, expected_crop(path, (7, 2, 25, 20), 18))


def test_train_and_test_each_use_their_own_csv(tmp_path):
    train_box, test_box = (2, 3, 14, 9), (24, 18, 36, 24)  # both 12 x 6; side 18 with margin 0.25
    train = add_image(tmp_path, "train", "00001.jpg", car_array(train_box))
    test = add_image(tmp_path, "test", "00001.jpg", car_array(test_box))
    write_csv(tmp_path, "train", ["00001.jpg,{},{},{},{},1".format(*train_box)])
    write_csv(tmp_path, "test", ["00001.jpg,{},{},{},{},1".format(*test_box)])
    data = load(tmp_path, "all", 18, "bbox", 0.25)
    # train: centre (8, 6) -> (-1, -3) shifted to (0, 0); test: centre (30, 21) -> (21, 12), fits
    assert torch.equal(data.images[0], expected_crop(train, (0, 0, 18, 18), 18))
    assert torch.equal(data.images[1], expected_crop(test, (21, 12, 39, 30), 18))
    for image in data.images:
        assert car_weight(image).mean().item() == pytest.approx(72 / 18**2, abs=0.01)


# --- load_image and a listing with boxes ---------------------------------------


def test_load_image_bbox_without_a_usable_box_is_squashed(tmp_path):
    path = save_png(tmp_path / "a.png", car_array((10, 8, 22, 14)))
    squashed = load_image(path, 16)
    assert torch.equal(load_image(path, 16, "bbox"), squashed)
    assert torch.equal(load_image(path, 16, "bbox", Box(50, 0, 60, 10)), squashed)
    assert not torch.equal(load_image(path, 16, "bbox", Box(10, 8, 22, 14)), squashed)


def test_a_listing_checks_its_boxes(tmp_path):
    paths = [save_png(tmp_path / "a.png", car_array((10, 8, 22, 14)))]
    with pytest.raises(DataError, match="one box"):
        ImageListing(paths, [0], ["a"], 16, "bbox")
    with pytest.raises(DataError, match="one box"):
        ImageListing(paths, [0], ["a"], 16, "bbox", boxes=[None, None])
    with pytest.raises(DataError, match="only used with crop 'bbox'"):
        ImageListing(paths, [0], ["a"], 16, "none", boxes=[None])
    with pytest.raises(DataError, match="margin must be >= 0"):
        ImageListing(paths, [0], ["a"], 16, "bbox", boxes=[Box(10, 8, 22, 14)], margin=-0.5)


def test_a_listing_decodes_like_load_image_and_counts_boxes_outside(tmp_path):
    path = save_png(tmp_path / "a.png", car_array((10, 8, 22, 14)))
    boxes = [None, Box(10, 8, 22, 14), Box(50, 0, 60, 10)]  # none, inside, entirely outside the image
    out = MemoryImages(3, 16)
    decoded = decode_listing(ImageListing([path] * 3, [0] * 3, ["a"], 16, "bbox", boxes, 0.25), out, progress=False)
    assert decoded.labels == [0, 0, 0] and decoded.skipped == [] and decoded.outside == 1
    for image, box in zip(out.images, boxes):
        assert torch.equal(image, load_image(path, 16, "bbox", box, 0.25))
    assert torch.equal(out.images[0], out.images[2]) and torch.equal(out.images[0], load_image(path, 16))
