"""Pictures: the sample grid is torchvision's make_grid tiling, without torchvision."""

import math

import pytest
import torch

from ddpm_cars.data.dataset import to_uint8
from ddpm_cars.viz import grid_image


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
