"""FID, KID and precision/recall against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from ddpm_cars.evaluation.feature_distances import (
    FeatureStatistics,
    frechet_distance,
    kernel_inception_distance,
    precision_recall,
)


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_frechet_distance_of_one_dimensional_gaussians():
    # d^2 = (m1 - m2)^2 + s1^2 + s2^2 - 2 s1 s2 for N(m1, s1^2), N(m2, s2^2)
    a = FeatureStatistics(np.array([1.0]), np.array([[4.0]]), 10)
    b = FeatureStatistics(np.array([-2.0]), np.array([[9.0]]), 10)
    assert frechet_distance(a, b) == pytest.approx(9.0 + 4.0 + 9.0 - 2 * 2 * 3)


def test_frechet_distance_matches_the_closed_form_with_full_covariances():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 5)), rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5)) + 0.5
    fa, fb = FeatureStatistics.of(torch.from_numpy(x)), FeatureStatistics.of(torch.from_numpy(y))
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = _sqrtm_psd(s1)
    # Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2), a symmetric form computed independently
    expected = (
        np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(_sqrtm_psd(root @ s2 @ root))
    )
    assert frechet_distance(fa, fb) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(fa, fa) == pytest.approx(0.0, abs=1e-8)


def test_feature_statistics_are_mean_and_unbiased_covariance():
    f = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]], dtype=torch.float64)
    stats = FeatureStatistics.of(f)
    assert np.allclose(stats.mu, [2.0, 4.0])
    d = f.numpy() - stats.mu
    assert np.allclose(stats.sigma, d.T @ d / 2) and stats.count == 3
    with pytest.raises(ValueError, match="N >= 2"):
        FeatureStatistics.of(f[:1])


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    m = x.shape[0]
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()


def test_kid_with_one_full_subset_is_the_unbiased_mmd_by_hand():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)) + 1.0
    mean, std = kernel_inception_distance(torch.from_numpy(x), torch.from_numpy(y), subsets=3, subset_size=6)
    # every subset is the whole set (in another order): the same value three times
    assert mean == pytest.approx(_mmd2_unbiased(x, y), rel=1e-10) and std == pytest.approx(0.0, abs=1e-12)
    same, _ = kernel_inception_distance(torch.from_numpy(x), torch.from_numpy(x), subsets=2, subset_size=6)
    assert abs(same) < mean


def test_kid_caps_the_subset_size_at_the_smaller_set():
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    mean, std = kernel_inception_distance(x, y, subsets=4, subset_size=1000)
    assert math.isfinite(mean) and math.isfinite(std) and std > 0


def test_precision_recall_by_hand_on_a_line():
    # real points 0..9 (k=3 radius: 3 for the end points, else 2 or 3); fakes at 2.5 (inside) and 30 (outside)
    real = torch.arange(10.0).view(-1, 1)
    fake = torch.tensor([[2.5], [30.0], [31.0], [32.0], [33.0]])
    precision, recall = precision_recall(fake, real, k=3)
    assert precision == pytest.approx(1 / 5)
    # the radius of the fake at 2.5 is 29.5 (its 3rd nearest other fake is 32): every real lies within it
    assert recall == pytest.approx(1.0)
    precision, recall = precision_recall(real, real, k=3)
    assert precision == recall == 1.0
