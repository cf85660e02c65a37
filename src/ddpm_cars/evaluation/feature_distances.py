"""Distances between two sets of feature vectors: FID, KID, precision and recall.

The arithmetic is torch-fidelity's (the reference implementations, imported where used);
this module fixes the conventions: features are ``[N, D]`` tensors, ``fake`` are the
generated images' and ``real`` the reference images'.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

KID_SUBSETS = 100  # Binkowski et al. 2018 / torch-fidelity's defaults
KID_SUBSET_SIZE = 1000
PR_NEIGHBOURHOOD = 3  # k of the k-NN radii (Kynkaanniemi et al. 2019)


@dataclass(frozen=True)
class FeatureStatistics:
    """Mean and covariance of a feature set, float64 (what FID compares)."""

    mu: np.ndarray  # [D]
    sigma: np.ndarray  # [D, D]
    count: int

    @staticmethod
    def of(features: torch.Tensor) -> FeatureStatistics:
        _check(features, "features", min_rows=2)
        f = features.double().cpu().numpy()
        return FeatureStatistics(f.mean(axis=0), np.cov(f, rowvar=False), f.shape[0])


def _check(features: torch.Tensor, name: str, min_rows: int) -> None:
    if features.ndim != 2 or features.shape[0] < min_rows:
        raise ValueError(f"{name} must be [N >= {min_rows}, D], got {tuple(features.shape)}")


def frechet_distance(fake: FeatureStatistics, real: FeatureStatistics) -> float:
    """||mu_f - mu_r||^2 + Tr(S_f + S_r - 2 (S_f S_r)^(1/2))  (Heusel et al. 2017, Eq. 6)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    if fake.mu.shape != real.mu.shape:
        raise ValueError(f"feature sizes differ: {fake.mu.shape[0]} and {real.mu.shape[0]}")
    stats = [{"mu": s.mu, "sigma": np.atleast_2d(s.sigma)} for s in (fake, real)]
    return fid_statistics_to_metric(*stats, verbose=False)[KEY_METRIC_FID]


def kernel_inception_distance(
    fake: torch.Tensor,
    real: torch.Tensor,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
) -> tuple[float, float]:
    """Mean and std over ``subsets`` random subsets of the unbiased MMD^2 with the cubic
    polynomial kernel k(x, y) = (x.y / D + 1)^3 (Binkowski et al. 2018). The subset size is
    capped at the smaller set's size."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    _check(fake, "fake features", 2)
    _check(real, "real features", 2)
    size = min(subset_size, fake.shape[0], real.shape[0])
    out = kid_features_to_metric(
        fake.double(),
        real.double(),
        kid_subsets=subsets,
        kid_subset_size=size,
        kid_kernel="poly",
        kid_kernel_poly_degree=3,
        kid_kernel_poly_gamma=None,
        kid_kernel_poly_coef0=1,
        rng_seed=seed,
        verbose=False,
    )
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


def precision_recall(fake: torch.Tensor, real: torch.Tensor, k: int = PR_NEIGHBOURHOOD) -> tuple[float, float]:
    """Improved precision (share of fakes inside some real's k-NN ball) and recall (share
    of reals inside some fake's k-NN ball), Kynkaanniemi et al. 2019."""
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    _check(fake, "fake features", k + 1)
    _check(real, "real features", k + 1)
    out = prc_features_to_metric(
        fake.float(), real.float(), prc_neighborhood=k, prc_batch_size=10_000, save_cpu_ram=True, verbose=False
    )
    return out[KEY_METRIC_PRECISION], out[KEY_METRIC_RECALL]
