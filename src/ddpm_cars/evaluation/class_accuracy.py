"""Do class-conditional samples show the requested class? A small classifier as judge.

A CNN trained on real labelled images (for toy cars: the body type) classifies the
generated samples; the share classified as the class they were asked for measures
how well the conditioning -- e.g. at each classifier-free guidance scale -- works.
Its accuracy on held-out real images is the ceiling to read that share against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ddpm_cars.data.dataset import IMAGE_CHANNELS, to_model_range

MIN_SIZE = 16
UPSAMPLE_BELOW = 32  # smaller inputs are enlarged to this first


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    """Halve the resolution, then one more conv: each conv + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ImageClassifier(nn.Module):
    """Three downsampling conv stages, global average pool, linear: images ``[B, C, S, S]``
    in [-1, 1] (C = ``in_channels``, 1 for grayscale or 3 for RGB; any S >= 16) -> logits
    ``[B, num_classes]``.

    Images under 32 px are first enlarged (nearest neighbour) to 32 px, so the first
    stride-2 stage does not throw away what little detail they have. In eval mode
    BatchNorm uses its running statistics: a prediction does not depend on the rest of its batch.
    """

    def __init__(self, num_classes: int, channels: tuple[int, int, int] = (16, 32, 64), in_channels: int = 3) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if in_channels not in IMAGE_CHANNELS:
            raise ValueError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {in_channels}")
        self.num_classes, self.in_channels = num_classes, in_channels
        c1, c2, c3 = channels
        self.features = nn.Sequential(_stage(in_channels, c1), _stage(c1, c2), _stage(c2, c3))
        self.head = nn.Linear(c3, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate activations: the last stage's output, average-pooled, ``[B, channels[2]]``."""
        if x.shape[-1] < UPSAMPLE_BELOW:
            x = F.interpolate(x, size=UPSAMPLE_BELOW, mode="nearest")
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def _check_images(images: torch.Tensor) -> None:
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[1] not in IMAGE_CHANNELS or shape[2] != shape[3] or shape[2] < MIN_SIZE:
        raise ValueError(f"expected square images [N, C, S, S] with C = 1 or 3 and S >= {MIN_SIZE}, got {shape}")


def _check_labels(labels: torch.Tensor, count: int, num_classes: int, name: str) -> None:
    if labels.shape != (count,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be integer labels of shape ({count},), got {labels.dtype} {tuple(labels.shape)}")
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")


@dataclass(frozen=True)
class ClassifierTraining:
    """How the judge is trained: AdamW at ``lr`` for ``steps`` batches of ``batch_size``
    images, its initial weights, batches and flips drawn from ``seed``."""

    steps: int = 500
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    training: ClassifierTraining = ClassifierTraining(),
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> ImageClassifier:
    """Train an :class:`ImageClassifier` on uint8 ``images [N, C, S, S]`` (C = 1 or 3: the
    classifier takes the images' channels) and ``labels [N]`` with AdamW, a cosine learning
    rate and random horizontal flips; returned in eval mode.

    Deterministic given ``training.seed`` on the CPU (GPU convolutions may not be); the
    global RNG is left untouched.
    """
    steps, batch_size, lr, seed = training.steps, training.batch_size, training.lr, training.seed
    _check_images(images)
    if images.dtype != torch.uint8:
        raise ValueError(f"training images must be uint8, got {images.dtype}")
    _check_labels(labels, images.shape[0], num_classes, "labels")
    if images.shape[0] == 0 or steps < 1 or batch_size < 1:
        raise ValueError(f"need images, steps >= 1 and batch_size >= 1; got {images.shape[0]}, {steps}, {batch_size}")
    with torch.random.fork_rng(devices=[]):  # initial weights from the seed, global RNG untouched
        torch.manual_seed(seed)
        model = ImageClassifier(num_classes, in_channels=images.shape[1]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    rng = torch.Generator().manual_seed(seed)
    n, batch_size = images.shape[0], min(batch_size, images.shape[0])
    order, position = torch.randperm(n, generator=rng), 0
    model.train()
    for _ in tqdm(range(steps), desc="Classifier", unit="step", disable=not progress, leave=False):
        if position + batch_size > n:  # a new epoch: reshuffle
            order, position = torch.randperm(n, generator=rng), 0
        index = order[position : position + batch_size]
        position += batch_size
        x = to_model_range(images[index])
        flip = torch.rand(len(index), generator=rng) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x).to(device)
        loss = F.cross_entropy(model(x), labels[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def predict(
    classifier: nn.Module, images: torch.Tensor, batch_size: int = 256, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Predicted labels (int64 ``[N]``, on the CPU) of ``images [N, C, S, S]``, C the
    channels the classifier was trained on (1 or 3).

    The dtype decides the range: uint8 is read as [0, 255], a float dtype as already in
    [-1, 1] (the model's range, e.g. straight from a sampler).
    """
    _check_images(images)
    if images.dtype != torch.uint8 and not images.dtype.is_floating_point:
        raise ValueError(f"images must be uint8 in [0, 255] or float in [-1, 1], got {images.dtype}")
    if isinstance(classifier, ImageClassifier) and images.shape[1] != classifier.in_channels:
        raise ValueError(f"the classifier takes {classifier.in_channels}-channel images, got {tuple(images.shape)}")
    was_training = classifier.training
    classifier.eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size]
        x = to_model_range(x) if x.dtype == torch.uint8 else x.float()
        out.append(classifier(x.to(device)).argmax(dim=1).cpu())
    classifier.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def requested_class_share(
    predicted: torch.Tensor, requested: torch.Tensor, num_classes: int
) -> tuple[float, list[float]]:
    """The share of samples classified as the class they were requested for, overall and
    per requested class (NaN for a class nothing was requested for)."""
    if predicted.ndim != 1 or predicted.shape != requested.shape or predicted.shape[0] == 0:
        raise ValueError(
            f"predicted and requested must be non-empty label vectors of one length, "
            f"got {tuple(predicted.shape)} and {tuple(requested.shape)}"
        )
    _check_labels(predicted, predicted.shape[0], num_classes, "predicted")
    _check_labels(requested, requested.shape[0], num_classes, "requested")
    hit = (predicted.cpu() == requested.cpu()).double()
    requested = requested.cpu().long()
    counts = torch.bincount(requested, minlength=num_classes).double()
    hits = torch.bincount(requested, weights=hit, minlength=num_classes)
    per_class = [h / c if c else math.nan for h, c in zip(hits.tolist(), counts.tolist())]
    return hit.mean().item(), per_class
