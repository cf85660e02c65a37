"""Pictures: the sample grid is torchvision's make_grid tiling, without torchvision; one-channel
images are written as 8-bit grayscale PNGs and drawn in gray, RGB ones as before."""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_cars.data.dataset import to_model_range, to_uint8
from ddpm_cars.viz import grid_image, save_grid, save_image, save_picture, save_rows, save_samples, save_strip


@pytest.mark.parametrize(
    "count, nrow, height, width",
    [
        (1, None, 16, 16),
        (2, None, 16, 16),
        (5, None, 8, 8),
        (36, None, 32, 32),
        (7, 3, 4, 6),
        (3, 8, 5, 5),
        (12, 6, 16, 16),
    ],
)
def test_the_grid_is_make_grid_with_white_two_pixel_gaps_to_the_byte(count, nrow, height, width):
    from torchvision.utils import make_grid

    images = torch.rand(count, 3, height, width, generator=torch.Generator().manual_seed(count)) * 2 - 1
    expected = make_grid(to_uint8(images), nrow=nrow or math.ceil(math.sqrt(count)), padding=2, pad_value=255)
    got = grid_image(images, nrow)
    assert got.dtype == torch.uint8 and got.shape == expected.shape and torch.equal(got, expected)


# --- one channel (grayscale) and three (RGB) ---


def _gray_batch(count: int, height: int, width: int) -> torch.Tensor:
    """uint8 ``[count, 1, H, W]``: image k holds 10 k + its raster index, all distinct and below 255."""
    ramp = torch.arange(height * width).view(1, 1, height, width)
    return (torch.arange(count).view(count, 1, 1, 1) * 10 + ramp).to(torch.uint8)


def test_a_one_channel_grid_is_the_hand_tiled_picture_with_white_gaps():
    images = _gray_batch(3, 2, 3)  # 2 a row: 2 rows of 2 slots, the last one empty
    expected = torch.full((1, 2 + 2 * (2 + 2), 2 + 2 * (3 + 2)), 255, dtype=torch.uint8)  # [1, 10, 12]
    expected[0, 2:4, 2:5] = images[0, 0]
    expected[0, 2:4, 7:10] = images[1, 0]
    expected[0, 6:8, 2:5] = images[2, 0]
    for given in (images, to_model_range(images)):  # uint8 as it is, or [-1, 1] floats
        got = grid_image(given, nrow=2)
        assert got.dtype == torch.uint8 and got.shape == (1, 10, 12) and torch.equal(got, expected)


@pytest.mark.parametrize(
    "count, nrow, height, width", [(1, None, 5, 7), (2, None, 4, 4), (5, None, 8, 8), (7, 3, 4, 6)]
)
def test_a_one_channel_grid_is_channel_0_of_the_grid_of_it_repeated_to_rgb(count, nrow, height, width):
    from torchvision.utils import make_grid

    images = torch.rand(count, 1, height, width, generator=torch.Generator().manual_seed(count)) * 2 - 1
    got = grid_image(images, nrow)
    assert got.shape[0] == 1 and torch.equal(got, grid_image(images.repeat(1, 3, 1, 1), nrow)[:1])
    # make_grid turns one channel into three equal ones
    expected = make_grid(to_uint8(images), nrow=nrow or math.ceil(math.sqrt(count)), padding=2, pad_value=255)
    assert torch.equal(got, expected[:1]) if count > 1 else torch.equal(got, to_uint8(images[0]))


def _reopened(path) -> tuple[str, np.ndarray]:
    with Image.open(path) as image:
        return image.mode, np.asarray(image)


def test_one_channel_pngs_are_mode_l_with_exactly_the_pixels(tmp_path):
    images = _gray_batch(3, 2, 3)
    floats = to_model_range(images)
    grid = torch.full((10, 12), 255, dtype=torch.uint8)
    grid[2:4, 2:5], grid[2:4, 7:10], grid[6:8, 2:5] = images[0, 0], images[1, 0], images[2, 0]

    mode, pixels = _reopened(save_grid(floats, tmp_path / "grid.png", nrow=2))
    assert mode == "L" and pixels.shape == (10, 12) and np.array_equal(pixels, grid.numpy())
    mode, pixels = _reopened(save_grid(floats, tmp_path / "big" / "grid.png", nrow=2, scale=3))
    assert mode == "L" and np.array_equal(pixels, grid.numpy().repeat(3, axis=0).repeat(3, axis=1))
    mode, pixels = _reopened(save_picture(grid[None], tmp_path / "picture.png"))
    assert mode == "L" and np.array_equal(pixels, grid.numpy())
    mode, pixels = _reopened(save_image(floats[1], tmp_path / "one.png"))
    assert mode == "L" and np.array_equal(pixels, images[1, 0].numpy())

    save_samples(floats, tmp_path / "samples", nrow=2)
    mode, pixels = _reopened(tmp_path / "samples" / "grid.png")
    assert mode == "L" and np.array_equal(pixels, grid.numpy())
    for i in range(3):
        mode, pixels = _reopened(tmp_path / "samples" / "images" / f"{i:04d}.png")
        assert mode == "L" and np.array_equal(pixels, images[i, 0].numpy())


def _old_png(hwc: np.ndarray) -> bytes:
    """What the RGB-only code wrote: PIL's PNG of an ``[H, W, 3]`` uint8 array."""
    out = io.BytesIO()
    Image.fromarray(hwc).save(out, format="PNG")
    return out.getvalue()


def test_rgb_pngs_stay_mode_rgb_and_byte_identical(tmp_path):
    from torchvision.utils import make_grid

    images = torch.rand(5, 3, 6, 4, generator=torch.Generator().manual_seed(5)) * 2 - 1
    tiles = to_uint8(images)
    grid = make_grid(tiles, nrow=3, padding=2, pad_value=255).permute(1, 2, 0).numpy()

    path = save_grid(images, tmp_path / "grid.png", nrow=3)
    assert _reopened(path)[0] == "RGB" and path.read_bytes() == _old_png(grid)
    path = save_grid(images, tmp_path / "grid2.png", nrow=3, scale=2)
    assert path.read_bytes() == _old_png(grid.repeat(2, axis=0).repeat(2, axis=1))
    path = save_image(images[2], tmp_path / "one.png")
    assert _reopened(path)[0] == "RGB" and path.read_bytes() == _old_png(tiles[2].permute(1, 2, 0).numpy())
    save_samples(images, tmp_path / "samples", grid_count=4, nrow=2)
    four = make_grid(tiles[:4], nrow=2, padding=2, pad_value=255).permute(1, 2, 0).numpy()
    assert (tmp_path / "samples" / "grid.png").read_bytes() == _old_png(four)
    for i in range(5):
        expected = _old_png(tiles[i].permute(1, 2, 0).numpy())
        assert (tmp_path / "samples" / "images" / f"{i:04d}.png").read_bytes() == expected


@pytest.mark.parametrize("shape", [(2, 4, 4), (4, 4, 4), (4, 4)])
def test_a_picture_of_other_than_one_or_three_channels_is_refused(tmp_path, shape):
    with pytest.raises(ValueError, match=r"uint8 \[1 or 3, H, W\]"):
        save_picture(torch.zeros(shape, dtype=torch.uint8), tmp_path / "p.png")


def _figure_pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).reshape(-1, 3)


def _count(pixels: np.ndarray, rgb: tuple[int, int, int]) -> int:
    return int((pixels == np.array(rgb, dtype=np.uint8)).all(axis=1).sum())


def test_labelled_grayscale_images_are_drawn_in_gray_from_black_to_white(tmp_path):
    """Two flat images, 40 and 200, each fill their panel with exactly that gray (a colour
    map would colour them, and one scaled to the image's own range would make a flat image
    one colour whatever its value); everything in the figure is gray."""
    dark, light = (torch.full((1, 1, 8, 8), v, dtype=torch.uint8) for v in (40, 200))
    path = save_rows(
        [("a", [("dark", to_model_range(dark[0]))]), ("b", [("light", to_model_range(light[0]))])],
        tmp_path / "rows.png",
        "gray",
    )
    pixels = _figure_pixels(path)
    assert (pixels[:, 0] == pixels[:, 1]).all() and (pixels[:, 1] == pixels[:, 2]).all()
    assert _count(pixels, (40, 40, 40)) > 1000 and _count(pixels, (200, 200, 200)) > 1000

    strip = _figure_pixels(save_strip([("t=0", to_model_range(dark[0]))], tmp_path / "strip.png", "gray"))
    assert (strip[:, 0] == strip[:, 2]).all() and _count(strip, (40, 40, 40)) > 1000


def test_labelled_rgb_images_keep_their_colours(tmp_path):
    red = torch.zeros(3, 8, 8, dtype=torch.uint8)
    red[0] = 200
    pixels = _figure_pixels(save_strip([("red", to_model_range(red))], tmp_path / "strip.png", "rgb"))
    assert _count(pixels, (200, 0, 0)) > 1000
