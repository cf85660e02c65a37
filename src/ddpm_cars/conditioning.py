"""Class conditioning: label dropout in training, classifier-free guidance in sampling, and
class names as a user types them.

Classifier-free guidance (Ho & Salimans 2022) trains one network both with labels and,
for a share of the batch, with the null label; when sampling, the two predictions are
extrapolated:

    out = out(x_t, null) + s * (out(x_t, y) - out(x_t, null)),

so ``s = 0`` is the unconditional model, ``s = 1`` the conditional one, and ``s > 1``
pushes samples towards what makes them look like class ``y`` (Ho & Salimans write
``s = 1 + w``). Both halves come from one batched forward pass.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
from torch import nn

from ddpm_cars.errors import UserError


def null_label(num_classes: int) -> int:
    """The label meaning "no class": one past the last class."""
    return num_classes


def drop_labels(y: torch.Tensor, p: float, num_classes: int, coins: torch.Tensor) -> torch.Tensor:
    """``y`` with each label replaced by the null class where ``coins`` (uniform [0, 1)
    draws, one per label) fall below ``p``."""
    if coins.shape != y.shape:
        raise ValueError(f"one coin per label: {tuple(coins.shape)} for labels {tuple(y.shape)}")
    return torch.where(coins.to(y.device) < p, torch.full_like(y, null_label(num_classes)), y)


def guide(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float, channels: int = 3) -> torch.Tensor:
    """Classifier-free guidance on the first ``channels`` channels (the mean's parametrisation:
    eps, x_0 or v, all affine in one another at fixed x_t); any further channels (a learned
    variance) are the conditional prediction's, as in GLIDE (Nichol et al. 2022)."""
    mean = unconditional[:, :channels] + scale * (conditional[:, :channels] - unconditional[:, :channels])
    return torch.cat([mean, conditional[:, channels:]], dim=1)


class ClassifierFreeGuidance(nn.Module):
    """``model`` seen by a sampler as an unconditional network ``net(x_t, t)`` that draws
    image ``i`` of the batch towards class ``labels[i]`` (every image towards ``labels[0]``
    when there is one label) with guidance ``scale``. Outputs
    beyond the image's channels (a learned variance) are not guided.

    Scale 1 needs only the conditional pass and scale 0 only the unconditional one; any
    other scale runs both halves as one batch of ``2B``.
    """

    def __init__(self, model: nn.Module, labels: torch.Tensor, scale: float, num_classes: int):
        super().__init__()
        if not scale >= 0:
            raise ValueError(f"guidance must be >= 0; got {scale}")
        self.model, self.labels, self.scale, self.null = model, labels, float(scale), null_label(num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is not None:
            raise ValueError("the guided model has its labels already")
        labels = self.labels.to(x.device)
        if labels.shape[0] == 1:
            labels = labels.expand(x.shape[0])
        if labels.shape[0] != x.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for a batch of {x.shape[0]}")
        if self.scale == 1.0:
            return self.model(x, t, labels)
        nulls = torch.full_like(labels, self.null)
        if self.scale == 0.0:
            return self.model(x, t, nulls)
        both = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, nulls]))
        conditional, unconditional = both.chunk(2)
        return guide(conditional, unconditional, self.scale, channels=x.shape[1])


def find_class(request: str, class_names: Sequence[str]) -> int:
    """The index of the class a user asked for: its name, case-insensitively (surrounding
    spaces ignored), or its index when no class bears that name. An unknown name raises a
    ``UserError`` listing the closest names."""
    if not class_names:
        raise UserError("this model is not class-conditional: train one with --class-conditional")
    wanted = " ".join(request.split()).casefold()
    folded = [" ".join(name.split()).casefold() for name in class_names]
    if wanted in folded:
        return folded.index(wanted)
    if wanted.lstrip("-").isdigit():
        index = int(wanted)
        if 0 <= index < len(class_names):
            return index
        raise UserError(f"class index {index} is out of range: the model knows classes 0..{len(class_names) - 1}")
    closest = ", ".join(map(repr, closest_classes(wanted, class_names)))
    raise UserError(
        f"unknown class {request!r}; closest: {closest} (`ddpm-cars classes RUN` lists all {len(class_names)})"
    )


def closest_classes(request: str, class_names: Sequence[str], count: int = 5) -> list[str]:
    """Up to ``count`` class names nearest to ``request``: those containing every word of it
    first, then by string similarity."""
    words = request.casefold().split()
    containing = [name for name in class_names if words and all(w in name.casefold() for w in words)]
    by_name = {name.casefold(): name for name in class_names}
    similar = [by_name[n] for n in difflib.get_close_matches(request.casefold(), list(by_name), n=count, cutoff=0.0)]
    ranked = list(dict.fromkeys(containing + similar))
    return ranked[:count]


def class_labels(requests: Sequence[str], class_names: Sequence[str], per_class: int) -> torch.Tensor:
    """Labels for ``per_class`` images of each requested class, class after class: ``[len(requests) * per_class]``."""
    indices = [find_class(request, class_names) for request in requests]
    return torch.tensor(indices, dtype=torch.long).repeat_interleave(per_class)
