"""A feature network that needs no download: a small classifier of toy cars as judge.

FID and KID compare Inception features, and the Inception weights must be downloaded.
The judge here is an :class:`~ddpm_cars.evaluation.class_accuracy.ImageClassifier` trained
to tell the body type of toy cars drawn from the held-out seed (``TOY_CARS_TEST_SEED``, never
the images a model trains on), at the resolution of the images it scores. Its penultimate
activations -- the last stage's output, average-pooled, ``[N, 64]`` -- are the features that
``judge_fd`` (the Frechet distance) and ``judge_kid`` (the kernel distance) compare, as FID
and KID compare Inception's. Lower is better; the numbers are for comparing models scored
at one resolution, not for comparing with FID/KID of other projects. The toy cars are RGB:
a grayscale image is repeated to three channels before the judge sees it
(:func:`~ddpm_cars.evaluation.inception.as_rgb`, as for Inception).

The judge is trained at first use -- fixed seed, fp32, on one CPU thread, so that its weights,
hence the numbers, do not depend on the device that scores or on its number of cores (another
CPU instruction set may still round differently) -- and kept in the cache folder as
``judge/KEY.safetensors`` (listed and bounded by ``ddpm-cars cache`` as kind "judge"). The key
hashes what the weights depend on: the image size, the recipe, the code of this module, of
the classifier and of the toy-car generator, and the torch version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ddpm_cars import caches
from ddpm_cars.data import TOY_CARS_TEST_SEED, cache, toy_cars, toy_cars_dataset
from ddpm_cars.data.dataset import IMAGE_CHANNELS, to_model_range
from ddpm_cars.data.toy_cars import BODY_TYPES
from ddpm_cars.evaluation import class_accuracy
from ddpm_cars.evaluation.class_accuracy import ClassifierTraining, ImageClassifier, train_classifier
from ddpm_cars.evaluation.feature_distances import FeatureStatistics, frechet_distance, kernel_inception_distance
from ddpm_cars.evaluation.inception import as_rgb
from ddpm_cars.evaluation.reference import load_entry, save_entry

JUDGE_METRICS = ("judge_fd", "judge_kid", "judge_kid_std")


@dataclass(frozen=True)
class JudgeRecipe:
    """How the judge is made: trained on ``images`` toy cars of the seed ``data_seed`` (the
    held-out one), as ``training`` says. The default takes about 10 s at 32 px (30 s at
    64 px) on a CPU core and classifies about 99% of other toy cars correctly at 32 px."""

    images: int = 4096
    training: ClassifierTraining = ClassifierTraining(steps=300, batch_size=64, lr=3e-3, seed=0)
    data_seed: int = TOY_CARS_TEST_SEED


JUDGE = JudgeRecipe()


def judge_key(image_size: int, recipe: JudgeRecipe = JUDGE) -> str:
    """The judge's cache key, e.g. ``toy-cars-judge_32px_3fa1...``: a hash of everything its
    weights depend on."""
    stamp = {
        "image_size": image_size,
        "recipe": dataclasses.asdict(recipe),
        "code": cache.code_stamp(sys.modules[__name__], class_accuracy, toy_cars),
        "torch": torch.__version__,
    }
    digest = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]
    return f"toy-cars-judge_{image_size}px_{digest}"


def describe_judge(image_size: int, recipe: JudgeRecipe = JUDGE) -> str:
    """What the judge's features are, in words (for metrics.json and the cache listing)."""
    return (
        f"toy-car judge: pooled last-stage features of a body-type classifier trained on {recipe.images} "
        f"held-out toy cars (seed {recipe.data_seed}) at {image_size} px, {recipe.training.steps} steps"
    )


@contextlib.contextmanager
def _reproducibly() -> Iterator[None]:
    """One CPU thread, gradients on and no autocast, whatever the caller's settings: the
    weights then do not depend on the number of cores or threads either (several threads
    sum in another order, and 300 steps make a rounding difference a visible one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
            yield
    finally:
        torch.set_num_threads(threads)


def train_judge(image_size: int, recipe: JudgeRecipe = JUDGE, progress: bool = False) -> ImageClassifier:
    """Train the judge on the CPU in fp32, on one thread, deterministically; returned in eval mode."""
    data = toy_cars_dataset(recipe.images, image_size, recipe.data_seed)
    with _reproducibly():
        return train_classifier(
            data.images, data.labels, len(BODY_TYPES), recipe.training, device="cpu", progress=progress
        )


def _from_weights(weights: dict[str, torch.Tensor] | None) -> ImageClassifier | None:
    """A judge with ``weights``, or None when they are missing or do not fit."""
    if weights is None:
        return None
    judge = ImageClassifier(len(BODY_TYPES))
    try:
        judge.load_state_dict(weights)
    except (RuntimeError, ValueError):  # other names or shapes: a damaged entry
        return None
    return judge.eval()


def load_judge(
    image_size: int, recipe: JudgeRecipe = JUDGE, cache_dir: Path | None = None, progress: bool = False
) -> ImageClassifier:
    """The judge for ``image_size`` px images, from ``cache_dir/judge/KEY.safetensors`` (the
    default cache folder when None); trained and written there (atomically) at first use, or
    when the file is damaged."""
    root = cache_dir or caches.default_cache_dir()
    key = judge_key(image_size, recipe)
    path = root / caches.JUDGE_DIR / f"{key}.safetensors"
    judge = _from_weights(load_entry(path))
    if judge is not None:
        return judge
    judge = train_judge(image_size, recipe, progress)
    metadata = {"key": key, "source": describe_judge(image_size, recipe), "torch": torch.__version__}
    save_entry(root, path, judge.state_dict(), metadata)
    return judge


@torch.no_grad()
def judge_features(judge: ImageClassifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The judge's features of uint8 ``images [N, C, S, S]`` (C = 1 or 3; the judge sees RGB
    toy cars, so a grayscale image is repeated to three channels): float32 ``[N, D]`` on the CPU."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in IMAGE_CHANNELS:
        raise ValueError(f"images must be uint8 [N, 1 or 3, S, S], got {images.dtype} {tuple(images.shape)}")
    judge.eval()
    with torch.autocast("cpu", enabled=False):
        parts = [
            judge.embed(to_model_range(as_rgb(images[start : start + batch_size].cpu())))
            for start in range(0, images.shape[0], batch_size)
        ]
    return torch.cat(parts) if parts else torch.empty(0, judge.head.in_features)


def judge_distances(fake: torch.Tensor, real: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """``judge_fd``, ``judge_kid`` and ``judge_kid_std`` of the judge's features of generated
    (``fake``) and reference (``real``) images. KID's subsets hold at most as many features as
    the smaller set (:func:`~ddpm_cars.evaluation.feature_distances.kernel_inception_distance`)."""
    fd = frechet_distance(FeatureStatistics.of(fake), FeatureStatistics.of(real))
    kid, kid_std = kernel_inception_distance(fake, real, seed=seed)
    return dict(zip(JUDGE_METRICS, (fd, kid, kid_std)))
