"""The sample-quality metrics of generated images against reference images, in one call.

Always, with no downloaded weights: the sliced Wasserstein distance on Laplacian-pyramid
patches, precision/recall on 16x16 pixels, and FD/KID on the features of the toy-car judge
(:mod:`ddpm_cars.evaluation.judge`). With an Inception network: FID, KID and
precision/recall on its features. Reference features are read from the cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddpm_cars.data.dataset import IMAGE_CHANNELS
from ddpm_cars.evaluation.feature_distances import (
    FeatureStatistics,
    frechet_distance,
    kernel_inception_distance,
    precision_recall,
)
from ddpm_cars.evaluation.inception import InceptionFeatures
from ddpm_cars.evaluation.judge import judge_distances, judge_features, judge_key, load_judge
from ddpm_cars.evaluation.reference import cached_features
from ddpm_cars.evaluation.swd import sliced_wasserstein_distance

PIXEL_FEATURE_SIZE = 16  # precision/recall without a feature network: 16 x 16 x C pixels


def pixel_features(images: torch.Tensor, size: int = PIXEL_FEATURE_SIZE) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` (C = 1 or 3) -> ``[N, C * size * size]`` area-averaged pixels in [0, 1]."""
    if images.ndim != 4 or images.shape[1] not in IMAGE_CHANNELS:
        raise ValueError(f"expected images [N, C, H, W] with C = 1 or 3, got {tuple(images.shape)}")
    return F.adaptive_avg_pool2d(images.float() / 255, size).flatten(1)


def matched_subset(reference: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` reference images drawn without replacement (all of them when fewer)."""
    if reference.shape[0] <= count:
        return reference
    return reference[torch.randperm(reference.shape[0], generator=torch.Generator().manual_seed(seed))[:count]]


def sample_metrics(
    samples: torch.Tensor,
    reference: torch.Tensor,
    *,
    description: str,
    inception: InceptionFeatures | None = None,
    cache_dir=None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Metrics of ``samples`` against ``reference`` (uint8 ``[N, C, S, S]``, C = 1 or 3, the
    same C and S in both), and the Inception features computed on the way (``{"samples": ...,
    "reference": ...}``, empty without a network) for reuse. Lower SWD/FD/KID is better,
    higher precision/recall. Grayscale images are repeated to RGB for Inception and the judge.

    SWD and precision/recall compare equal counts: a random subset of the reference the
    size of the sample set. FD/FID and KID use every reference image (the standard)."""
    if samples.shape[1:] != reference.shape[1:]:
        raise ValueError(
            f"samples {tuple(samples.shape)} and reference {tuple(reference.shape)} differ in channels or size"
        )
    matched = matched_subset(reference, samples.shape[0], seed)
    metrics = sliced_wasserstein_distance(matched, samples, seed=seed).summary()
    metrics["precision_pixels"], metrics["recall_pixels"] = precision_recall(
        pixel_features(samples), pixel_features(matched)
    )
    metrics.update(_judge_metrics(samples, reference, description, cache_dir, seed, progress))
    features: dict[str, torch.Tensor] = {}
    if inception is not None:
        ref_features, _ = cached_features(
            reference, description, inception.name, lambda x: inception(x, progress=progress), cache_dir
        )
        fake_features = inception(samples, progress=progress)
        features = {"samples": fake_features, "reference": ref_features}
        metrics["fid"] = frechet_distance(FeatureStatistics.of(fake_features), FeatureStatistics.of(ref_features))
        metrics["kid"], metrics["kid_std"] = kernel_inception_distance(fake_features, ref_features, seed=seed)
        matched_features = matched_subset(ref_features, samples.shape[0], seed)
        metrics["precision"], metrics["recall"] = precision_recall(fake_features, matched_features)
    return metrics, features


def _judge_metrics(
    samples: torch.Tensor, reference: torch.Tensor, description: str, cache_dir, seed: int, progress: bool
) -> dict[str, float]:
    """``judge_fd``, ``judge_kid`` and ``judge_kid_std``: the toy-car judge at the samples'
    resolution (trained at first use), the reference features read from the cache."""
    size = samples.shape[-1]
    judge = load_judge(size, cache_dir=cache_dir, progress=progress)
    real, _ = cached_features(reference, description, judge_key(size), lambda x: judge_features(judge, x), cache_dir)
    return judge_distances(judge_features(judge, samples), real, seed=seed)
