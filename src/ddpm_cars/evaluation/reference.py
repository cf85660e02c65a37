"""Reference features, computed once per dataset, split and resolution, then read from a cache.

Extracting Inception features from 8,144 Stanford Cars images takes minutes on a CPU; the
result depends only on the images and the feature network. The cache key names both --
a readable description and a hash of the image bytes -- so a changed folder, another
split or another resolution is a new entry, never a stale hit. The file's metadata records
what the features were computed from and when; each use touches its marker in
``reference-used/``, for ``ddpm-cars cache`` and the size limit (:mod:`ddpm_cars.caches`).
:func:`load_entry` and :func:`save_entry` read and write such an entry; the judge's
weights (:mod:`ddpm_cars.evaluation.judge`) are kept the same way.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from ddpm_cars import caches
from ddpm_cars.files import atomic_write_bytes


def image_hash(images: torch.Tensor) -> str:
    """SHA-256 (first 16 hex digits) of a uint8 image tensor's shape and bytes."""
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    digest.update(images.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_key(description: str, images: torch.Tensor, feature_name: str) -> str:
    """A file-name-safe key, e.g. ``toy-cars_train_32px_n4096_3fa1..._inception-v3-...``."""
    readable = re.sub(r"[^A-Za-z0-9.-]+", "-", description).strip("-")[-80:]
    return f"{readable}_n{images.shape[0]}_{image_hash(images)}_{feature_name}"


def load_entry(path: Path) -> dict[str, torch.Tensor] | None:
    """The tensors of the safetensors cache entry ``path``, its use recorded; None when it is
    not there or damaged (then recomputed and replaced)."""
    if not path.is_file():
        return None
    try:
        tensors = load_file(path)
    except Exception:  # a damaged entry
        return None
    caches.mark_used(caches.used_marker(path))
    return tensors


def save_entry(root: Path, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write the safetensors cache entry ``path`` of the cache folder ``root`` atomically, with
    ``metadata`` and the time it was built; record its use and bound the cache's size."""
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={**metadata, "built": caches.now_iso()})
    atomic_write_bytes(path, data)
    caches.mark_used(caches.used_marker(path))
    caches.enforce_limit(root, path)


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
    path = root / caches.FEATURES_DIR / f"{cache_key(description, images, feature_name)}.safetensors"
    cached = load_entry(path)
    if cached is not None and "features" in cached:
        return cached["features"], True
    features = compute(images)
    metadata = {
        "description": description,
        "features": feature_name,
        "source": f"{description} ({images.shape[0]} images, {feature_name})",
    }
    save_entry(root, path, {"features": features}, metadata)
    return features, False
