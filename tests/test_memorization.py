"""Nearest-training-image distances against a direct computation."""

import pytest
import torch

from ddpm_cars.data import toy_cars_dataset
from ddpm_cars.evaluation.memorization import memorization_check, nearest_neighbours, pixel_distance_matrix


def test_pixel_distance_is_the_rms_difference_in_unit_range():
    a = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    b = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    b[1, 0] = 0  # one channel of three equal: RMS sqrt(2/3)
    assert pixel_distance_matrix(a, b)[0].tolist() == pytest.approx([1.0, (2 / 3) ** 0.5])


def test_nearest_neighbours_match_a_brute_force_search():
    train = toy_cars_dataset(40, 16).images
    queries = toy_cars_dataset(7, 16, seed=1).images
    dist, index = nearest_neighbours(queries, train, batch_size=3)
    for q in range(7):
        d = [((queries[q].double() - t.double()) / 255).pow(2).mean().sqrt().item() for t in train]
        assert index[q].item() == min(range(40), key=d.__getitem__)
        assert dist[q].item() == pytest.approx(min(d), rel=1e-5)
    with pytest.raises(ValueError, match="cannot compare"):
        nearest_neighbours(queries, toy_cars_dataset(2, 32).images)


def test_copies_of_training_images_are_flagged_and_held_out_images_are_not():
    train = toy_cars_dataset(64, 16).images
    heldout = toy_cars_dataset(32, 16, seed=1).images
    samples = torch.cat([train[:4], heldout[16:32]])  # 4 verbatim copies, 16 new images
    check = memorization_check(samples, train, heldout[:16])
    assert check.sample_distance[:4].tolist() == pytest.approx([0] * 4, abs=1e-6) and check.sample_index[
        :4
    ].tolist() == [0, 1, 2, 3]
    summary = check.summary()
    assert summary["sample_to_train_min"] < 1e-6 and summary["heldout_to_train_median"] > 0
    assert 4 / 20 <= summary["suspected_copies"] <= 6 / 20  # the copies, perhaps one or two near-misses by chance
    features = (samples.flatten(1).double(), train.flatten(1).double(), heldout[:16].flatten(1).double())
    with_features = memorization_check(samples, train, heldout[:16], features).summary()
    assert with_features["feature_sample_to_train_median"] > 0 and "feature_heldout_to_train_median" in with_features
    assert "suspected_copies" not in memorization_check(samples, train).summary()  # no held-out images, no threshold


def _gray(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, S, S] -> [N, 1, S, S], the mean of the three channels."""
    return images.float().mean(1, keepdim=True).round().to(torch.uint8)


def test_one_channel_pixel_distance_is_the_rms_over_the_one_channel():
    a = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    b = torch.full((2, 1, 4, 4), 255, dtype=torch.uint8)
    b[1, 0, :1] = 0  # 4 of 16 pixels equal: RMS sqrt(12/16)
    assert pixel_distance_matrix(a, b)[0].tolist() == pytest.approx([1.0, 0.75**0.5])


def test_grayscale_copies_are_found_and_channel_mismatches_are_refused():
    train = _gray(toy_cars_dataset(40, 16).images)
    heldout = _gray(toy_cars_dataset(12, 16, seed=1).images)
    samples = torch.cat([train[[5, 9]], heldout[8:]])  # 2 verbatim copies, 4 new images
    check = memorization_check(samples, train, heldout[:8])
    assert check.sample_index[:2].tolist() == [5, 9] and check.sample_distance[:2].tolist() == pytest.approx(
        [0, 0], abs=1e-6
    )
    for q in range(2, 6):  # the rest against a brute-force search
        d = [((samples[q].double() - t.double()) / 255).pow(2).mean().sqrt().item() for t in train]
        assert check.sample_index[q].item() == min(range(40), key=d.__getitem__)
        assert check.sample_distance[q].item() == pytest.approx(min(d), rel=1e-5)
    assert check.summary()["heldout_to_train_median"] > 0
    rgb = toy_cars_dataset(4, 16).images
    with pytest.raises(ValueError, match=r"\(2, 1, 16, 16\) and \(4, 3, 16, 16\)"):
        pixel_distance_matrix(samples[:2], rgb)
    with pytest.raises(ValueError, match="cannot compare"):
        memorization_check(samples, rgb)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        pixel_distance_matrix(rgb[:, :2], rgb[:, :2])
