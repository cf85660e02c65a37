"""Loading arbitrary image folders: discovery, labels, colour modes, bad files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_cars.data.dataset import DataError
from ddpm_cars.data.folder import (
    IMAGE_EXTENSIONS,
    ImageDecodeWarning,
    find_images,
    is_grayscale,
    load_image,
    load_image_folder,
    luma,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
SIZE = 8


def save(path: Path, color=RED, size=(20, 12), mode="RGB", **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **kwargs)
    return path


def save_array(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def bands(width: int, height: int, colors_and_widths) -> np.ndarray:
    """An RGB image made of vertical colour bands, left to right."""
    columns = [np.tile(np.array(c, np.uint8), (height, w, 1)) for c, w in colors_and_widths]
    array = np.concatenate(columns, axis=1)
    assert array.shape == (height, width, 3)
    return array


def pixel(image: torch.Tensor, y: int, x: int) -> tuple[int, ...]:
    return tuple(image[:, y, x].tolist())


def close(actual, expected, tol=40) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected))


# --- discovery -------------------------------------------------------------


def test_find_images_recursive_sorted_case_insensitive_and_hidden_skipped(tmp_path):
    wanted = [
        save(tmp_path / "a.JPG"),
        save(tmp_path / "b.png"),
        save(tmp_path / "sub" / "deeper" / "c.Jpeg", format="JPEG"),
        save(tmp_path / "sub" / "d.TIFF", format="TIFF"),
    ]
    save(tmp_path / ".hidden.png")
    save(tmp_path / ".cache" / "e.png")
    save(tmp_path / "sub" / "._mac.jpg", format="JPEG")
    (tmp_path / "notes.txt").write_text("not an image")
    assert find_images(tmp_path) == sorted(wanted)


def test_root_inside_hidden_folder_is_fine(tmp_path):
    root = tmp_path / ".cache" / "kagglehub" / "cars"
    image = save(root / "x.png")
    assert find_images(root) == [image]


# --- labels --------------------------------------------------------------


def test_flat_folder_is_one_class_named_after_folder_in_sorted_order(tmp_path):
    root = tmp_path / "my_cars"
    colors = [RED, GREEN, BLUE]
    for name, color in zip(["c.png", "a.png", "b.png"], colors):
        save(root / name, color)
    data = load_image_folder(root, SIZE, progress=False)
    assert data.images.dtype == torch.uint8 and data.images.shape == (3, 3, SIZE, SIZE)
    assert data.class_names == ["my_cars"]
    assert data.labels.tolist() == [0, 0, 0]
    assert [pixel(img, 0, 0) for img in data.images] == [GREEN, BLUE, RED]  # a, b, c


def test_subfolders_are_classes_and_nested_images_belong_to_first_level(tmp_path):
    save(tmp_path / "zebra" / "1.png", BLUE)
    save(tmp_path / "apple" / "1.png", RED)
    save(tmp_path / "apple" / "deep" / "er" / "2.png", RED)
    data = load_image_folder(tmp_path, SIZE, progress=False)
    assert data.class_names == ["apple", "zebra"]
    assert data.labels.tolist() == [0, 0, 1]
    assert pixel(data.images[2], 0, 0) == BLUE


def test_loose_images_beside_subfolders_get_a_class_named_after_root(tmp_path):
    root = tmp_path / "cars"
    save(root / "loose.png", GREEN)
    save(root / "audi" / "1.png", RED)
    data = load_image_folder(root, SIZE, progress=False)
    assert data.class_names == ["audi", "cars"]
    assert data.labels.tolist() == [0, 1]


def test_loose_class_name_does_not_collide_with_a_subfolder(tmp_path):
    root = tmp_path / "cars"
    save(root / "loose.png", GREEN)
    save(root / "cars" / "1.png", RED)
    data = load_image_folder(root, SIZE, progress=False)
    assert data.class_names == ["cars", "cars_root"]
    assert sorted(data.labels.tolist()) == [0, 1]


# --- colour modes ----------------------------------------------------------


def test_grayscale_jpeg_becomes_three_equal_channels(tmp_path):
    image = load_image(save(tmp_path / "g.jpg", 100, mode="L"), SIZE)
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.uint8
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert close(pixel(image, 3, 3), (100, 100, 100), tol=3)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    path = save_array(tmp_path / "g16.png", np.full((12, 20), 40000, np.uint16))
    assert Image.open(path).mode.startswith("I")
    assert close(pixel(load_image(path, SIZE), 0, 0), (156, 156, 156), tol=1)


def test_transparent_rgba_pixels_become_white_and_opaque_red_stays_red(tmp_path):
    array = np.zeros((12, 20, 4), np.uint8)
    array[:, :10] = (255, 0, 0, 0)  # transparent (red underneath must not show)
    array[:, 10:] = (255, 0, 0, 255)  # opaque red
    image = load_image(save_array(tmp_path / "t.png", array), SIZE)
    assert pixel(image, 0, 0) == (255, 255, 255)
    assert close(pixel(image, 0, SIZE - 1), RED, tol=2)


def test_palette_png_with_transparency(tmp_path):
    img = Image.new("P", (20, 12), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black, index 1 red
    img.paste(1, (10, 0, 20, 12))
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    image = load_image(path, SIZE)
    assert pixel(image, 0, 0) == (255, 255, 255)
    assert close(pixel(image, 0, SIZE - 1), RED, tol=2)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = save(tmp_path / "c.jpg", (0, 255, 255, 0), mode="CMYK")
    assert Image.open(path).mode == "CMYK"
    image = load_image(path, SIZE)
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.uint8
    assert close(pixel(image, 4, 4), RED, tol=50)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 3  # rotate 180 degrees
    path = save_array(tmp_path / "o.png", bands(20, 12, [(RED, 10), (BLUE, 10)]), exif=exif)
    image = load_image(path, SIZE)
    assert pixel(image, 0, 0) == BLUE and pixel(image, 0, SIZE - 1) == RED


# --- resizing ------------------------------------------------------------


def test_plain_resize_keeps_edges_and_center_crop_drops_them(tmp_path):
    path = save_array(tmp_path / "wide.png", bands(40, 10, [(RED, 12), (GREEN, 16), (BLUE, 12)]))
    squashed = load_image(path, SIZE, crop="none")
    assert pixel(squashed, 4, 0) == RED and pixel(squashed, 4, SIZE - 1) == BLUE
    cropped = load_image(path, SIZE, crop="center")
    assert cropped.shape == (3, SIZE, SIZE)
    assert all(close(pixel(cropped, 4, x), GREEN, tol=10) for x in range(SIZE))
    assert torch.equal(load_image(path, SIZE), squashed)  # "none" is the default


@pytest.mark.parametrize("crop", ["centre", "", False, True])
def test_unknown_crop_is_an_error_listing_the_choices(tmp_path, crop):
    path = save(tmp_path / "a.png")
    with pytest.raises(DataError, match="none, center, bbox"):
        load_image(path, SIZE, crop)
    with pytest.raises(DataError, match="none, center, bbox"):
        load_image_folder(tmp_path, SIZE, crop, progress=False)


def test_center_crop_of_a_folder(tmp_path):
    save_array(tmp_path / "wide.png", bands(40, 10, [(RED, 12), (GREEN, 16), (BLUE, 12)]))
    data = load_image_folder(tmp_path, SIZE, "center", progress=False)
    assert all(close(pixel(data.images[0], 4, x), GREEN, tol=10) for x in range(SIZE))


@pytest.mark.parametrize("crop", ["none", "center"])
def test_a_single_image_is_prepared_exactly_like_a_training_image(tmp_path, crop):
    """``load_image`` (``sample --init-image``) gives the bytes ``build_dataset`` trains on."""
    from ddpm_cars.config import DataConfig
    from ddpm_cars.data import build_dataset

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    rng = np.random.default_rng(0)
    save_array(tmp_path / "a" / "wide.png", rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    save_array(tmp_path / "a" / "rot.jpg", rng.integers(0, 256, (28, 52, 3), dtype=np.uint8), exif=exif)
    save_array(tmp_path / "b" / "rgba.png", rng.integers(0, 256, (40, 20, 4), dtype=np.uint8))
    save(tmp_path / "b" / "grey.jpg", 90, size=(33, 17), mode="L")
    config = DataConfig(source=str(tmp_path), image_size=16, crop=crop, cache="off")
    data = build_dataset(config, progress=False)
    singles = [load_image(path, 16, crop) for path in find_images(tmp_path)]
    assert len(data) == 4 and all(torch.equal(a, b) for a, b in zip(data.images, singles))


# --- bad files and errors ----------------------------------------------------


def write_bad_files(root: Path) -> list[Path]:
    junk = root / "junk.jpg"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    noise = np.random.default_rng(1).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    whole = save_array(root / "whole.png", noise).read_bytes()
    truncated = root / "truncated.png"
    truncated.write_bytes(whole[: len(whole) // 2])
    (root / "whole.png").unlink()
    return [junk, truncated]


def test_undecodable_files_are_skipped_with_a_warning_naming_them(tmp_path):
    bad = write_bad_files(tmp_path)
    save(tmp_path / "good.png", GREEN)
    with pytest.warns(ImageDecodeWarning) as record:
        data = load_image_folder(tmp_path, SIZE, progress=False)
    messages = [str(w.message) for w in record]
    for path in bad:
        assert any(re.search(re.escape(str(path)), m) for m in messages), (path, messages)
    assert len(data) == 1 and pixel(data.images[0], 0, 0) == GREEN


def test_only_bad_files_is_an_error(tmp_path):
    write_bad_files(tmp_path)
    with pytest.warns(ImageDecodeWarning), pytest.raises(DataError, match="could be decoded"):
        load_image_folder(tmp_path, SIZE, progress=False)


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nope", SIZE)


def test_file_instead_of_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        load_image_folder(save(tmp_path / "x.png"), SIZE)


@pytest.mark.parametrize("contents", [[], ["readme.txt", ".hidden.png"]])
def test_folder_without_images_is_an_error_listing_extensions(tmp_path, contents):
    for name in contents:
        (tmp_path / name).write_text("x")
    with pytest.raises(DataError, match="No image files") as excinfo:
        load_image_folder(tmp_path, SIZE)
    assert all(ext in str(excinfo.value) for ext in IMAGE_EXTENSIONS)


def test_progress_bar_is_labelled_and_ends_at_every_file(tmp_path, capsys):
    for name in ("a.png", "b.png", "c.png"):
        save(tmp_path / name)
    load_image_folder(tmp_path, SIZE, progress=True)
    err = capsys.readouterr().err
    assert "Loading images" in err and "3/3" in err


def test_listing_orders_and_labels_like_sorted_paths(tmp_path):
    """The fast listing (path parts as strings) keeps the order of sorted Path objects,
    which differs from sorting the path strings ("a" before "a-b" before "a b/..."?)."""
    from ddpm_cars.data.folder import list_image_folder

    root = tmp_path / "root"
    for name in ["a/x.png", "a-b/x.png", "a b/y.png", "A/z.png", "a/deep/er/w.png", "a.png", "a0/q.png", "b.png"]:
        save(root / name)
    listing = list_image_folder(root, SIZE)
    expected = sorted(p for p in root.rglob("*.png"))
    assert [Path(p) for p in listing.paths] == expected == find_images(root)
    assert [str(p.relative_to(root)) for p in expected][:3] == ["A/z.png", "a/deep/er/w.png", "a/x.png"]
    assert listing.class_names == ["A", "a", "a b", "a-b", "a0", "root"]  # "root": the loose a.png and b.png
    first_level = [p.relative_to(root).parts[0] if p.parent != root else "root" for p in expected]
    assert [listing.class_names[label] for label in listing.labels] == first_level


# --- channels ----------------------------------------------------------------


def test_pil_luma_is_reproduced_exactly_by_the_tensor_conversion():
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    grey = luma(torch.from_numpy(rgb).permute(2, 0, 1))
    assert grey.shape == (1, 5, 7) and grey.dtype == torch.uint8
    assert np.array_equal(grey[0].numpy(), np.asarray(Image.fromarray(rgb).convert("L")))
    # by hand: round(0.299 R + 0.587 G + 0.114 B) on a few pixels
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    assert np.abs(grey[0].numpy() - (0.299 * r + 0.587 * g + 0.114 * b)).max() <= 0.5 + 1e-6


def test_grayscale_by_header_or_by_equal_channels_and_colour_otherwise(tmp_path):
    grey = np.tile(np.arange(0, 240, 10, dtype=np.uint8), (6, 1))
    assert is_grayscale(save_array(tmp_path / "l.png", grey))
    assert is_grayscale(save_array(tmp_path / "i16.png", grey.astype(np.uint16) * 257))
    assert is_grayscale(save_array(tmp_path / "rgb_grey.png", np.stack([grey] * 3, axis=-1)))  # an X-ray saved as RGB
    tinted = np.stack([grey] * 3, axis=-1)
    tinted[2, 3, 0] += 1  # one pixel off gray
    assert not is_grayscale(save_array(tmp_path / "tinted.png", tinted))
    assert not is_grayscale(save(tmp_path / "red.png", RED))


def test_auto_channels_give_one_for_an_all_grey_folder_and_three_for_a_mixed_one(tmp_path):
    grey_root = tmp_path / "grey"
    save(grey_root / "a" / "1.png", 30, mode="L")
    save(grey_root / "b" / "2.jpg", 200, mode="L", format="JPEG")
    save(grey_root / "b" / "3.png", (90, 90, 90))  # gray pixels in an RGB file
    (grey_root / "b" / "4.png").write_bytes(b"broken")  # decides nothing
    with pytest.warns(ImageDecodeWarning):
        data = load_image_folder(grey_root, SIZE, progress=False)
    assert data.images.shape == (3, 1, SIZE, SIZE) and data.channels == 1
    assert [int(data.images[i, 0, 0, 0]) for i in range(3)] == [30, 200, 90]
    with pytest.warns(ImageDecodeWarning):
        forced = load_image_folder(grey_root, SIZE, progress=False, image_channels="3")
    assert forced.images.shape == (3, 3, SIZE, SIZE) and torch.equal(forced.images, data.images.expand(-1, 3, -1, -1))

    mixed = tmp_path / "mixed"
    save(mixed / "1.png", 30, mode="L")
    save(mixed / "2.png", RED)
    data = load_image_folder(mixed, SIZE, progress=False)
    assert data.images.shape == (2, 3, SIZE, SIZE) and pixel(data.images[0], 0, 0) == (30, 30, 30)
    grey = load_image_folder(mixed, SIZE, progress=False, image_channels="1")  # forced: PIL's luma of red
    assert grey.images.shape == (2, 1, SIZE, SIZE) and int(grey.images[1, 0, 0, 0]) == round(0.299 * 255)


def test_one_image_in_one_channel_is_the_folder_decoding_of_it(tmp_path):
    path = save_array(tmp_path / "x.png", bands(20, 12, [(RED, 10), (GREEN, 10)]))
    alone = load_image(path, SIZE, channels=1)
    assert alone.shape == (1, SIZE, SIZE)
    assert torch.equal(alone, load_image_folder(tmp_path, SIZE, progress=False, image_channels="1").images[0])
    assert torch.equal(alone, luma(load_image(path, SIZE)))  # grey before or after resizing: the same here
    with pytest.raises(DataError, match="1 \\(grayscale\\) or 3 \\(RGB\\) channels, not 2"):
        load_image(path, SIZE, channels=2)
    with pytest.raises(DataError, match="Unknown image channels '2'"):
        load_image_folder(tmp_path, SIZE, progress=False, image_channels="2")
