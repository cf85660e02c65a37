"""Did the model copy its training images? Nearest training neighbours of samples.

For each sample, the closest training image by pixel distance (and by feature distance
when features are given). The distances alone say little; next to the same distances
for held-out real images -- which by construction are not copies -- they do: samples
much closer to the training set than held-out images are suspects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddpm_cars.data.dataset import IMAGE_CHANNELS


def pixel_distance_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """RMS pixel difference in [0, 1] units between every image of ``a`` and of ``b``
    (uint8 ``[N, C, H, W]`` and ``[M, C, H, W]``, C = 1 or 3) -> ``[N, M]``."""
    if a.ndim != 4 or a.shape[1] not in IMAGE_CHANNELS or a.shape[1:] != b.shape[1:]:
        raise ValueError(f"expected images [N, C, H, W] alike, C = 1 or 3, got {tuple(a.shape)} and {tuple(b.shape)}")
    fa = a.flatten(1).double() / 255
    fb = b.flatten(1).double() / 255
    return torch.cdist(fa, fb).div(fa.shape[1] ** 0.5)


def nearest_neighbours(
    queries: torch.Tensor, keys: torch.Tensor, distance=pixel_distance_matrix, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query, the distance to and index of its nearest key, ``[N]`` each."""
    if queries.shape[1:] != keys.shape[1:] or keys.shape[0] == 0:
        raise ValueError(f"cannot compare {tuple(queries.shape)} with {tuple(keys.shape)}")
    dists, index = [], []
    for start in range(0, queries.shape[0], batch_size):
        d = torch.cat(
            [distance(queries[start : start + batch_size], keys[k : k + 4096]) for k in range(0, keys.shape[0], 4096)],
            1,
        )
        best = d.min(dim=1)
        dists.append(best.values)
        index.append(best.indices)
    return torch.cat(dists).float(), torch.cat(index)


def feature_distance_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distance between feature vectors ``[N, D]`` and ``[M, D]``."""
    return torch.cdist(a.double(), b.double())


@dataclass(frozen=True)
class MemorizationCheck:
    """Nearest-training-image distances of samples and of held-out real images."""

    sample_distance: torch.Tensor  # [N] RMS pixel difference to the nearest training image
    sample_index: torch.Tensor  # [N] which training image
    heldout_distance: torch.Tensor | None  # [M], None without held-out images
    sample_feature_distance: torch.Tensor | None = None
    heldout_feature_distance: torch.Tensor | None = None

    def summary(self) -> dict[str, float]:
        out = {
            "sample_to_train_min": self.sample_distance.min().item(),
            "sample_to_train_median": self.sample_distance.median().item(),
        }
        if self.heldout_distance is not None:
            # a sample nearer its neighbour than 99% of held-out images are to theirs is a suspect
            threshold = torch.quantile(self.heldout_distance.double(), 0.01).item()
            out["heldout_to_train_median"] = self.heldout_distance.median().item()
            out["heldout_to_train_p01"] = threshold
            out["suspected_copies"] = (self.sample_distance < threshold).float().mean().item()
        if self.sample_feature_distance is not None:
            out["feature_sample_to_train_median"] = self.sample_feature_distance.median().item()
        if self.heldout_feature_distance is not None:
            out["feature_heldout_to_train_median"] = self.heldout_feature_distance.median().item()
        return out


def memorization_check(
    samples: torch.Tensor,
    train: torch.Tensor,
    heldout: torch.Tensor | None = None,
    features: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
) -> MemorizationCheck:
    """Nearest training images of ``samples`` (and of ``heldout``), all uint8 images;
    ``features`` optionally gives (sample, train, held-out) feature vectors."""
    dist, index = nearest_neighbours(samples, train)
    held = nearest_neighbours(heldout, train)[0] if heldout is not None else None
    feat_sample = feat_held = None
    if features is not None:
        f_samples, f_train, f_held = features
        feat_sample = nearest_neighbours(f_samples, f_train, feature_distance_matrix)[0]
        if f_held is not None:
            feat_held = nearest_neighbours(f_held, f_train, feature_distance_matrix)[0]
    return MemorizationCheck(dist, index, held, feat_sample, feat_held)
