"""The procedural toy-car dataset: shapes, determinism, content and argument checks."""

import numpy as np
import pytest

from ddpm_cars.data.toy_cars import BODY_TYPES, generate_toy_cars, render_toy_car


@pytest.mark.parametrize("size", [16, 32, 64])
def test_shapes_and_dtypes(size):
    images, labels = generate_toy_cars(12, size, seed=1)
    assert images.shape == (12, 3, size, size) and images.dtype == np.uint8
    assert labels.shape == (12,) and labels.dtype == np.int64
    assert set(labels.tolist()) <= set(range(len(BODY_TYPES)))


def test_render_toy_car_returns_hwc_image_and_label():
    image, label = render_toy_car(np.random.default_rng(0), 40)
    assert image.shape == (40, 40, 3) and image.dtype == np.uint8
    assert isinstance(label, int) and 0 <= label < len(BODY_TYPES)


def test_every_body_type_appears():
    _, labels = generate_toy_cars(300, 16, seed=2)
    assert np.bincount(labels, minlength=len(BODY_TYPES)).min() > 0


def test_same_seed_gives_identical_images():
    first, first_labels = generate_toy_cars(20, 32, seed=5)
    again, again_labels = generate_toy_cars(20, 32, seed=5)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first_labels, again_labels)


def test_different_seeds_give_different_images():
    one, _ = generate_toy_cars(20, 32, seed=5)
    other, _ = generate_toy_cars(20, 32, seed=6)
    assert (one != other).any(axis=(1, 2, 3)).all()


def test_fewer_images_are_a_prefix_of_more():
    more, more_labels = generate_toy_cars(10, 32, seed=3)
    fewer, fewer_labels = generate_toy_cars(5, 32, seed=3)
    np.testing.assert_array_equal(more[:5], fewer)
    np.testing.assert_array_equal(more_labels[:5], fewer_labels)


@pytest.mark.parametrize("size", [16, 32, 64])
def test_images_are_not_blank(size):
    images, _ = generate_toy_cars(200, size, seed=4)
    stds = images.reshape(len(images), -1).astype(np.float64).std(axis=1)
    assert stds.min() > 20


@pytest.mark.parametrize("size", [16, 32, 64])
def test_a_car_covers_the_centre(size):
    """The background depends only on the row, so pixels in the central columns that
    differ strongly from the edge pixel of their row belong to the car."""
    images, _ = generate_toy_cars(200, size, seed=4)
    pixels = images.astype(np.int16)
    centre = pixels[..., 3 * size // 8 : 5 * size // 8]
    edge = pixels[..., :1]
    car_fraction = (np.abs(centre - edge).max(axis=1) > 40).mean(axis=(1, 2))
    assert car_fraction.min() > 0.05
    # The top corners are plain sky: the car never reaches them.
    corners = pixels[..., : size // 8, [0, -1]]
    assert np.abs(corners[..., 0] - corners[..., 1]).max() <= 2


@pytest.mark.parametrize("n", [0, -3])
def test_non_positive_count_is_rejected(n):
    with pytest.raises(ValueError, match="n must be"):
        generate_toy_cars(n, 32)


@pytest.mark.parametrize("size", [0, 8, 15])
def test_too_small_size_is_rejected(size):
    with pytest.raises(ValueError, match="at least 16"):
        generate_toy_cars(4, size)
    with pytest.raises(ValueError, match="at least 16"):
        render_toy_car(np.random.default_rng(0), size)
