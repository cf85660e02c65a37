"""Sliced Wasserstein distance on Laplacian-pyramid patches (Karras et al. 2018): the
pyramid against a NumPy transcription of the reference code, the distance against
brute-force computations, the patch sampler, the normalisation, determinism, argument
checks, and how the metric reacts to noise and blur on the toy cars."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddpm_cars.data import toy_cars_dataset
from ddpm_cars.evaluation.swd import (
    SWDResult,
    gaussian_filter,
    laplacian_pyramid,
    normalize_descriptors,
    patch_descriptors,
    pyr_down,
    pyr_up,
    pyramid_resolutions,
    random_directions,
    reconstruct,
    sliced_wasserstein,
    sliced_wasserstein_distance,
)

_KERNEL = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256.0


def _np_filter(x: np.ndarray, gain: float = 1.0) -> np.ndarray:
    """scipy.ndimage.convolve(x, kernel, mode='mirror') of the reference, per channel:
    NumPy's 'reflect' padding is scipy's 'mirror' (d c b | a b c d)."""
    h, w = x.shape[-2:]
    padded = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
    out = np.zeros_like(x, dtype=np.float64)
    for dy in range(5):
        for dx in range(5):
            out += gain * _KERNEL[dy, dx] * padded[..., dy : dy + h, dx : dx + w]
    return out


def _np_pyr_up(x: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    up = np.zeros((n, c, 2 * h, 2 * w))
    up[..., ::2, ::2] = x
    return _np_filter(up, gain=4.0)


def _uint8_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _np_sliced_w1(a: np.ndarray, b: np.ndarray, directions: list[np.ndarray]) -> float:
    """Brute force: for each [D, K] direction matrix, project, sort each column, mean |diff|."""
    rounds = [np.abs(np.sort(a @ d, axis=0) - np.sort(b @ d, axis=0)).mean() for d in directions]
    return float(np.mean(rounds))


# ---------------------------------------------------------------------------------------
# Laplacian pyramid
# ---------------------------------------------------------------------------------------


def test_pyr_down_and_pyr_up_shapes():
    x = torch.rand(2, 3, 32, 32)
    assert pyr_down(x).shape == (2, 3, 16, 16)
    assert pyr_up(x).shape == (2, 3, 64, 64)
    assert pyr_up(pyr_down(x)).shape == x.shape


def test_filters_keep_a_constant_image_constant_up_to_the_borders():
    x = torch.full((1, 3, 16, 16), 37.0)
    torch.testing.assert_close(gaussian_filter(x), x)
    torch.testing.assert_close(pyr_down(x), torch.full((1, 3, 8, 8), 37.0))
    torch.testing.assert_close(pyr_up(x), torch.full((1, 3, 32, 32), 37.0))
    pyramid = laplacian_pyramid(x, 2)
    assert pyramid[0].abs().max().item() < 1e-4  # a flat image has no detail band
    torch.testing.assert_close(pyramid[1], torch.full((1, 3, 8, 8), 37.0))


def test_pyr_down_and_pyr_up_match_a_numpy_transcription_of_the_reference():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255
    reference = x.double().numpy()
    np.testing.assert_allclose(gaussian_filter(x).numpy(), _np_filter(reference), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(pyr_down(x).numpy(), _np_filter(reference)[..., ::2, ::2], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(pyr_up(x).numpy(), _np_pyr_up(reference), rtol=1e-5, atol=1e-3)


def test_filter_is_per_channel():
    x = torch.zeros(1, 3, 8, 8)
    x[0, 1, 4, 4] = 256.0
    y = gaussian_filter(x)
    assert y[0, 0].abs().max() == 0 and y[0, 2].abs().max() == 0
    torch.testing.assert_close(y[0, 1, 2:7, 2:7], torch.tensor(_KERNEL * 256.0, dtype=torch.float32))


def test_laplacian_pyramid_matches_reference_and_reconstructs_the_input():
    images = _uint8_images(2, 64)
    pyramid = laplacian_pyramid(images, 3)
    assert [level.shape[-1] for level in pyramid] == [64, 32, 16]
    assert all(level.dtype == torch.float32 for level in pyramid)
    # the reference's generate_laplacian_pyramid, written out in NumPy
    x = images.double().numpy()
    low1 = _np_filter(x)[..., ::2, ::2]
    low2 = _np_filter(low1)[..., ::2, ::2]
    expected = [x - _np_pyr_up(low1), low1 - _np_pyr_up(low2), low2]
    for level, reference in zip(pyramid, expected):
        np.testing.assert_allclose(level.numpy(), reference, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(reconstruct(pyramid), images.float(), rtol=0, atol=1e-3)


def test_one_level_pyramid_is_the_image():
    images = _uint8_images(1, 16)
    pyramid = laplacian_pyramid(images, 1)
    assert len(pyramid) == 1
    torch.testing.assert_close(pyramid[0], images.float())


@pytest.mark.parametrize(
    ("size", "resolutions"),
    [(16, [16]), (32, [32, 16]), (64, [64, 32, 16]), (128, [128, 64, 32, 16])],
)
def test_level_resolutions(size, resolutions):
    assert pyramid_resolutions(size) == resolutions


@pytest.mark.parametrize("size", [8, 15, 17, 24, 40, 48, 96])
def test_unsupported_sizes_raise(size):
    with pytest.raises(ValueError, match=r"16"):
        pyramid_resolutions(size)


def test_pyramid_rejects_sizes_that_do_not_halve():
    with pytest.raises(ValueError, match="divisible"):
        laplacian_pyramid(torch.zeros(1, 3, 20, 20), 4)  # 20 -> 10 -> 5 -> 2.5
    with pytest.raises(ValueError, match="levels"):
        laplacian_pyramid(torch.zeros(1, 3, 16, 16), 0)


# ---------------------------------------------------------------------------------------
# Descriptors
# ---------------------------------------------------------------------------------------


def test_patch_descriptors_are_7x7_windows_of_their_own_image_at_every_position():
    n, size, per_image = 3, 16, 400
    level = torch.arange(n * 3 * size * size, dtype=torch.float32).reshape(n, 3, size, size)  # unique values
    patches = patch_descriptors(level, per_image, torch.Generator().manual_seed(0))
    assert patches.shape == (n * per_image, 3, 7, 7)
    first = patches[:, 0, 0, 0].long()  # the top-left value locates the patch
    image, top, left = first // (3 * size * size), first // size % size, first % size
    torch.testing.assert_close(image, torch.arange(n).repeat_interleave(per_image))
    for i in range(0, n * per_image, 37):
        torch.testing.assert_close(patches[i], level[image[i], :, top[i] : top[i] + 7, left[i] : left[i] + 7])
    # uniform over every place where the patch fits: top-left rows and columns 0..size-7
    assert set(top.tolist()) == set(range(size - 6)) and set(left.tolist()) == set(range(size - 6))


def test_normalized_descriptors_have_zero_mean_and_unit_std_per_channel():
    g = torch.Generator().manual_seed(1)
    raw = torch.randn(500, 3, 7, 7, generator=g) * torch.tensor([3.0, 50.0, 0.5]).view(1, 3, 1, 1)
    raw += torch.tensor([10.0, -200.0, 0.0]).view(1, 3, 1, 1)
    flat = normalize_descriptors(raw)
    assert flat.shape == (500, 147)
    per_channel = flat.double().reshape(500, 3, 49).transpose(0, 1).reshape(3, -1)
    np.testing.assert_allclose(per_channel.mean(1).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(per_channel.std(1, correction=0).numpy(), 1.0, atol=1e-5)
    # the affine map is per channel: a scaled and shifted copy normalises to the same values
    torch.testing.assert_close(normalize_descriptors(raw * 7 + 3), flat, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# Sliced Wasserstein distance
# ---------------------------------------------------------------------------------------


def test_random_directions_are_unit_columns():
    directions = random_directions(147, 64, torch.Generator().manual_seed(0))
    assert directions.shape == (147, 64)
    torch.testing.assert_close(directions.norm(dim=0), torch.ones(64))


def test_one_dimensional_sliced_w1_is_the_sorted_difference():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 1, generator=g), torch.rand(300, 1, generator=g) * 3
    expected = np.abs(np.sort(a.numpy()[:, 0]) - np.sort(b.numpy()[:, 0])).mean()  # a 1-D direction is +-1
    got = sliced_wasserstein(a, b, directions=5, repeats=3, generator=torch.Generator().manual_seed(4))
    assert got == pytest.approx(float(expected), rel=1e-5)
    assert sliced_wasserstein(a, a, directions=5, repeats=2, generator=g) == 0.0
    assert sliced_wasserstein(a, a[torch.randperm(300, generator=g)], directions=5, repeats=2, generator=g) == 0.0


def test_shifted_cloud_distance_is_the_mean_projected_shift():
    """b = a + c: every sorted projection moves by <u, c>, so SW = mean_u |<u, c>|."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(400, 6, generator=g)
    c = torch.tensor([3.0, 0.0, -1.0, 0.0, 0.5, 2.0])
    got = sliced_wasserstein(a, a + c, directions=32, repeats=3, generator=torch.Generator().manual_seed(9))
    replay = torch.Generator().manual_seed(9)  # the same directions, in the same order
    directions = [random_directions(6, 32, replay).double().numpy() for _ in range(3)]
    expected = np.mean([np.abs(c.double().numpy() @ d).mean() for d in directions])
    assert got == pytest.approx(float(expected), rel=1e-4)
    assert got == pytest.approx(_np_sliced_w1(a.double().numpy(), (a + c).double().numpy(), directions), rel=1e-4)
    assert 0 < got < float(c.norm())


def test_sliced_w1_matches_brute_force_on_different_clouds():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(256, 147, generator=g), torch.rand(256, 147, generator=g) * 2
    got = sliced_wasserstein(a, b, directions=16, repeats=4, generator=torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)
    directions = [random_directions(147, 16, replay).double().numpy() for _ in range(4)]
    assert got == pytest.approx(_np_sliced_w1(a.double().numpy(), b.double().numpy(), directions), rel=1e-4)


def test_sliced_wasserstein_rejects_bad_shapes():
    g = torch.Generator()
    with pytest.raises(ValueError, match="same shape"):
        sliced_wasserstein(torch.zeros(5, 3), torch.zeros(4, 3), generator=g)
    with pytest.raises(ValueError, match=">= 1"):
        sliced_wasserstein(torch.zeros(5, 3), torch.zeros(5, 3), directions=0, generator=g)


# ---------------------------------------------------------------------------------------
# The public metric
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("real", "fake", "message"),
    [
        (_uint8_images(2, 8), _uint8_images(2, 8), "at least 16"),
        (_uint8_images(2, 48), _uint8_images(2, 48), r"16 \* 2\*\*k"),
        (_uint8_images(2, 16).float(), _uint8_images(2, 16), "uint8"),
        (_uint8_images(2, 16), _uint8_images(2, 16).float(), "uint8"),
        (_uint8_images(2, 16)[:, :1], _uint8_images(2, 16), "same channels"),
        (_uint8_images(2, 16), _uint8_images(2, 16)[:, :1], "same channels"),
        (_uint8_images(2, 16)[:, :2], _uint8_images(2, 16)[:, :2], r"\[N, C, H, W\], C = 1 \(grayscale\) or 3"),
        (torch.zeros(2, 4, 16, 16, dtype=torch.uint8), _uint8_images(2, 16), r"\[N, C, H, W\], C = 1"),
        (_uint8_images(2, 16)[0], _uint8_images(2, 16), r"\[N, C, H, W\], C = 1"),
        (_uint8_images(2, 32), _uint8_images(2, 16), "same image size"),
        (_uint8_images(2, 16)[:0], _uint8_images(2, 16), "at least one image"),
        (_uint8_images(2, 16), _uint8_images(2, 16)[:0], "at least one image"),
        (torch.zeros(2, 3, 16, 32, dtype=torch.uint8), torch.zeros(2, 3, 16, 32, dtype=torch.uint8), "square"),
        (_uint8_images(2, 16).numpy(), _uint8_images(2, 16), "torch.Tensor"),
    ],
)
def test_bad_inputs_raise(real, fake, message):
    with pytest.raises(ValueError, match=message):
        sliced_wasserstein_distance(real, fake)


@pytest.mark.parametrize("argument", ["patches_per_image", "directions", "repeats"])
def test_bad_counts_raise(argument):
    with pytest.raises(ValueError, match=argument):
        sliced_wasserstein_distance(_uint8_images(2, 16), _uint8_images(2, 16), **{argument: 0})


def test_summary_keys_and_mean():
    result = sliced_wasserstein_distance(_uint8_images(4, 64, 0), _uint8_images(3, 64, 1), patches_per_image=16)
    assert isinstance(result, SWDResult)
    assert list(result.levels) == [64, 32, 16]
    assert result.mean == pytest.approx(sum(result.levels.values()) / 3)
    summary = result.summary()
    assert list(summary) == ["swd", "swd_64", "swd_32", "swd_16"]
    assert summary["swd"] == result.mean and summary["swd_32"] == result.levels[32]
    assert all(np.isfinite(v) and v >= 0 for v in summary.values())


@pytest.fixture(scope="module")
def toy_cars() -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint sets of 64 toy cars at 32 px (seeds 0 and 1)."""
    return toy_cars_dataset(64, 32, 0).images, toy_cars_dataset(64, 32, 1).images


def test_same_seed_same_result_other_seed_close(toy_cars):
    real, fake = toy_cars
    first = sliced_wasserstein_distance(real, fake, seed=3)
    assert sliced_wasserstein_distance(real, fake, seed=3) == first
    other = sliced_wasserstein_distance(real, fake, seed=4)
    for resolution in first.levels:
        assert other.levels[resolution] != first.levels[resolution]
        assert other.levels[resolution] == pytest.approx(first.levels[resolution], rel=0.2)


def test_unequal_set_sizes_are_subsampled_to_the_smaller(toy_cars):
    """The larger descriptor set is cut to the size of the smaller, so the finite-sample
    level of SWD(64 vs 32 images) is that of 32 vs 32, whichever side is larger; and a
    set against two copies of itself scores at the same-distribution floor."""
    real, fake = toy_cars
    both_small = sliced_wasserstein_distance(real[:32], fake[:32]).levels
    fake_small = sliced_wasserstein_distance(real, fake[:32]).levels
    real_small = sliced_wasserstein_distance(real[:32], fake).levels
    for resolution in both_small:
        assert fake_small[resolution] == pytest.approx(both_small[resolution], rel=0.2)
        assert real_small[resolution] == pytest.approx(both_small[resolution], rel=0.2)
    itself = sliced_wasserstein_distance(real, torch.cat([real, real])).levels
    other = sliced_wasserstein_distance(real, fake).levels
    assert itself[16] < 0.5 * other[16]
    single = sliced_wasserstein_distance(real, fake[:1], patches_per_image=16).levels  # 16 rows each
    assert all(np.isfinite(v) for v in single.values())


def test_noise_and_blur_are_farther_from_real_than_other_real_images(toy_cars):
    """Held-out real cars score well below the same cars with Gaussian noise (std 40) or
    a 4x blur. Noise is a fine-scale change: it raises the 32 px level about tenfold
    and leaves the 16 px level almost untouched. Blur removes the finest detail, so it
    also raises the 32 px level most."""
    real, fake = toy_cars
    g = torch.Generator().manual_seed(0)
    noisy = (fake.float() + 40 * torch.randn(fake.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)
    small = F.interpolate(fake.float(), scale_factor=0.25, mode="area")  # 32 -> 8 px
    blurred = F.interpolate(small, scale_factor=4, mode="bilinear").round().clamp(0, 255).to(torch.uint8)

    clean = sliced_wasserstein_distance(real, fake).levels
    with_noise = sliced_wasserstein_distance(real, noisy).levels
    with_blur = sliced_wasserstein_distance(real, blurred).levels

    assert with_noise[32] > 4 * clean[32]
    assert with_noise[32] - clean[32] > 10 * abs(with_noise[16] - clean[16])  # the finest level reacts
    assert with_blur[32] > 3 * clean[32] and with_blur[16] > 1.2 * clean[16]
    assert with_blur[32] - clean[32] > with_blur[16] - clean[16]
    assert sum(with_noise.values()) > 2 * sum(clean.values())
    assert sum(with_blur.values()) > 2 * sum(clean.values())


# ---------------------------------------------------------------------------------------
# Grayscale: one channel, 7 x 7 x 1 descriptors
# ---------------------------------------------------------------------------------------


def _gray(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, S, S] -> [N, 1, S, S], the mean of the three channels."""
    return images.float().mean(1, keepdim=True).round().to(torch.uint8)


def test_one_channel_swd_matches_a_numpy_transcription_of_the_metric():
    """At 32 px: the reference's two-level pyramid in NumPy, 7 x 7 x 1 patches at the
    positions the seeded generator draws (real rows, real columns, fake rows, fake columns),
    each set normalised by its own mean and std, then 49-dimensional sliced W1 with the
    directions that follow in the same generator; coarsest level last."""
    real, fake = _uint8_images(3, 32, 0)[:, :1], _uint8_images(3, 32, 1)[:, 1:2] // 2
    per_image, directions, repeats = 20, 8, 2
    result = sliced_wasserstein_distance(
        real, fake, seed=5, patches_per_image=per_image, directions=directions, repeats=repeats
    )
    assert list(result.levels) == [32, 16]

    def bands(images: torch.Tensor) -> list[np.ndarray]:
        x = images.double().numpy()
        low = _np_filter(x)[..., ::2, ::2]
        return [x - _np_pyr_up(low), low]

    def descriptors(band: np.ndarray, top: torch.Tensor, left: torch.Tensor) -> np.ndarray:
        image = np.repeat(np.arange(band.shape[0]), per_image)
        patches = np.stack([band[i, 0, y : y + 7, x : x + 7] for i, y, x in zip(image, top.tolist(), left.tolist())])
        return ((patches - patches.mean()) / patches.std()).reshape(len(patches), 49)

    g = torch.Generator().manual_seed(5)
    for resolution, real_band, fake_band in zip((32, 16), bands(real), bands(fake)):
        sets = []
        for band in (real_band, fake_band):
            top = torch.randint(0, resolution - 6, (3 * per_image,), generator=g)
            left = torch.randint(0, resolution - 6, (3 * per_image,), generator=g)
            sets.append(descriptors(band, top, left))
        units = [random_directions(49, directions, g).double().numpy() for _ in range(repeats)]
        expected = 1e3 * _np_sliced_w1(*sets, units)
        assert result.levels[resolution] == pytest.approx(expected, rel=1e-3), resolution


def test_one_channel_swd_ranks_noise_far_and_ignores_the_contrast_of_a_set(toy_cars):
    real, fake = (_gray(images) for images in toy_cars)
    g = torch.Generator().manual_seed(0)
    noisy = (fake.float() + 40 * torch.randn(fake.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)
    clean = sliced_wasserstein_distance(real, fake).levels
    with_noise = sliced_wasserstein_distance(real, noisy).levels
    itself = sliced_wasserstein_distance(real, torch.cat([real, real])).levels
    assert list(clean) == [32, 16] and all(v > 0 for v in clean.values())
    assert with_noise[32] > 4 * clean[32]  # noise is a fine-scale change
    assert itself[16] < 0.5 * clean[16] and itself[32] < clean[32]
    # every band of 2x is exactly 2x the band, and each set is normalised by its own mean
    # and std: doubling a set's contrast leaves the descriptors, hence the distance, alone
    dim = fake // 2
    assert sliced_wasserstein_distance(real, dim * 2).levels == pytest.approx(
        sliced_wasserstein_distance(real, dim).levels, rel=1e-6
    )


def test_one_channel_against_three_channels_names_both_shapes():
    with pytest.raises(ValueError, match=r"same channels, got \(2, 1, 16, 16\) and \(3, 3, 16, 16\)"):
        sliced_wasserstein_distance(_uint8_images(2, 16)[:, :1], _uint8_images(3, 16))
