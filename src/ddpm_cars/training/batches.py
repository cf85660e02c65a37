"""What each training step draws: x_0 from the epoch's shuffled order (flipped), t, the
noise and the labels, all from the run's generator, and where training stands."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddpm_cars.conditioning import drop_labels
from ddpm_cars.config import RunConfig
from ddpm_cars.data.dataset import ImageSet, to_model_range
from ddpm_cars.parallel import World


@dataclass
class Position:
    """Where training stands; all but ``bad_streak`` goes into every checkpoint."""

    step: int = 0  # optimizer steps taken, skipped ones included
    epoch: int = 0  # the epoch in progress
    consumed: int = 0  # batches of that epoch already trained on
    skipped: int = 0  # steps whose update was skipped for a non-finite loss
    bad_streak: int = 0  # of those, how many in a row up to now


@dataclass
class Batch:
    """This process's share of one batch: images in [-1, 1], steps, noise, labels or None."""

    x0: torch.Tensor  # [b, 3, S, S]
    t: torch.Tensor  # [b]
    noise: torch.Tensor  # [b, 3, S, S]
    y: torch.Tensor | None  # [b], some replaced by the null class (label dropout)


def epoch_order(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled item order of one epoch, a pure function of (seed, epoch)."""
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def random_hflip(x: torch.Tensor, generator: torch.Generator, part: slice = slice(None), count: int | None = None) -> torch.Tensor:
    """Flip each image left-right with probability 1/2 (the seed's RandomHorizontalFlip).
    ``x`` may be the ``part`` of a batch of ``count`` images (the coins of the whole batch
    are drawn, so every process of a distributed run draws the same)."""
    flip = torch.rand(count or x.shape[0], generator=generator, device=generator.device)[part] < 0.5
    return torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)


class Batches:
    """The batches of each epoch's shuffled order (the last partial batch dropped, as the
    seed's DataLoader), with flips, timesteps, noise and label dropout drawn from the run's
    generator. Every process draws for the whole batch and keeps its share, so N processes
    draw exactly what one would."""

    def __init__(self, data: ImageSet, config: RunConfig, world: World, device: torch.device):
        self.config, self.device = config, device
        self.size = config.train.batch_size
        self.per_epoch = len(data) // self.size
        self.mine = world.share(self.size)
        self.images = data.images.to(device)  # uint8, decoded once; batches are cut from it
        self.labels = data.labels.to(device) if config.model.class_conditional else None
        self._order: tuple[int, torch.Tensor] | None = None

    def order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.images), self.config.train.seed, epoch))
        return self._order[1]

    def draw(self, position: Position, rng: torch.Generator, timesteps: int) -> Batch:
        b, mine, dev = self.size, self.mine, self.device
        idx = self.order(position.epoch)[position.consumed * b : (position.consumed + 1) * b][mine].to(dev)
        x0 = to_model_range(self.images[idx])
        if self.config.data.flip:
            x0 = random_hflip(x0, rng, mine, b)
        t = torch.randint(0, timesteps, (b,), generator=rng, device=dev)[mine]
        noise = torch.randn((b, *x0.shape[1:]), generator=rng, device=dev)[mine]
        y = None
        if self.labels is not None:  # label dropout: the null class teaches the unconditional model too
            coins = torch.rand(b, generator=rng, device=dev)[mine]
            y = drop_labels(self.labels[idx], self.config.train.label_dropout, self.config.model.num_classes, coins)
        return Batch(x0, t, noise, y)
