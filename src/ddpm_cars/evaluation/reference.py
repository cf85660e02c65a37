"""Reference features, computed once per dataset, split and resolution, then read from a cache.

Extracting Inception features from 8,144 Stanford Cars images takes minutes on a CPU; the
result depends only on the images and the feature network. The cache key names both --
a readable description and a hash of the image bytes -- so a changed folder, another
split or another resolution is a new entry, never a stale hit. The file's metadata records
what the features were computed from and when; each use touches its marker in
``reference-used/``, for ``ddpm-cars cache`` and the size limit (:mod:`ddpm_cars.caches`).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ddpm_cars import caches


def image_hash(images: torch.Tensor) -> str:
    """SHA-256 (first 16 hex digits) of a uint8 image tensor's shape and bytes."""
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    digest.update(images.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_key(description: str, images: torch.Tensor, feature_name: str) -> str:
    """A file-name-safe key, e.g. ``toy-cars_train_32px_n4096_3fa1..._inception-v3-...``."""
    readable = re.sub(r"[^A-Za-z0-9.-]+", "-", description).strip("-")[-80:]
    return f"{readable}_n{images.shape[0]}_{image_hash(images)}_{feature_name}"


def cached_features(
    images: torch.Tensor,
    description: str,
    feature_name: str,
    compute: Callable[[torch.Tensor], torch.Tensor],
    cache_dir: Path | None = None,
) -> tuple[torch.Tensor, bool]:
    """``compute(images)``, from ``cache_dir/reference/KEY.safetensors`` when it is there;
    returns the features and whether they came from the cache. Writes are atomic."""
    root = cache_dir or caches.default_cache_dir()
    folder = root / caches.FEATURES_DIR
    path = folder / f"{cache_key(description, images, feature_name)}.safetensors"
    if path.is_file():
        try:
            features = load_file(path)["features"]
            caches.mark_used(caches.features_marker(path))
            return features, True
        except Exception:  # a damaged entry is recomputed and replaced
            pass
    features = compute(images)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    metadata = {
        "description": description,
        "features": feature_name,
        "source": f"{description} ({images.shape[0]} images, {feature_name})",
        "built": caches.now_iso(),
    }
    try:
        save_file({"features": features.contiguous()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    caches.mark_used(caches.features_marker(path))
    caches.enforce_limit(root, path)
    return features, False
