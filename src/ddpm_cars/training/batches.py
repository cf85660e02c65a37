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


def random_hflip(
    x: torch.Tensor, generator: torch.Generator, part: slice = slice(None), count: int | None = None
) -> torch.Tensor:
    """Flip each image left-right with probability 1/2 (the seed's RandomHorizontalFlip).
    ``x`` may be the ``part`` of a batch of ``count`` images (the coins of the whole batch
    are drawn, so every process of a distributed run draws the same)."""
    flip = torch.rand(count or x.shape[0], generator=generator, device=generator.device)[part] < 0.5
    return torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)


class Batches:
    """The batches of each epoch's shuffled order (the last partial batch dropped, as the
    seed's DataLoader), with flips, timesteps, noise and label dropout drawn from the run's
    generator. Every process draws for the whole batch and keeps its share, so N processes
    draw exactly what one would.

    The images stay on the host (memory-mapped from the data cache); each batch is gathered
    one step ahead, into pinned memory on CUDA, and copied to the device without waiting."""

    def __init__(self, data: ImageSet, config: RunConfig, world: World, device: torch.device):
        self.config, self.device = config, device
        self.size = config.train.batch_size
        self.per_epoch = len(data) // self.size
        self.mine = world.share(self.size)
        self.images = data.images  # uint8 [N, 3, S, S] on the host
        self.labels = data.labels if config.model.class_conditional else None
        self._orders: dict[int, torch.Tensor] = {}
        self._ahead: tuple[tuple[int, int], torch.Tensor, torch.Tensor | None] | None = None

    def order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}  # this epoch and the last
            self._orders[epoch] = epoch_order(len(self.images), self.config.train.seed, epoch)
        return self._orders[epoch]

    def _fetch(self, epoch: int, index: int) -> tuple[tuple[int, int], torch.Tensor, torch.Tensor | None]:
        """Start copying this process's share of batch ``index`` of ``epoch`` to the device."""
        b = self.size
        idx = self.order(epoch)[index * b : (index + 1) * b][self.mine]
        host = torch.empty((len(idx), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        torch.index_select(self.images, 0, idx, out=host)
        labels = None if self.labels is None else self.labels[idx].to(self.device, non_blocking=True)
        return (epoch, index), host.to(self.device, non_blocking=True), labels

    def draw(self, position: Position, rng: torch.Generator, timesteps: int) -> Batch:
        here = (position.epoch, position.consumed)
        _, images, labels = self._ahead if self._ahead is not None and self._ahead[0] == here else self._fetch(*here)
        following = (here[0], here[1] + 1) if here[1] + 1 < self.per_epoch else (here[0] + 1, 0)
        self._ahead = self._fetch(*following)
        b, mine, dev = self.size, self.mine, self.device
        x0 = to_model_range(images)
        if self.config.data.flip:
            x0 = random_hflip(x0, rng, mine, b)
        t = torch.randint(0, timesteps, (b,), generator=rng, device=dev)[mine]
        noise = torch.randn((b, *x0.shape[1:]), generator=rng, device=dev)[mine]
        y = None
        if labels is not None:  # label dropout: the null class teaches the unconditional model too
            coins = torch.rand(b, generator=rng, device=dev)[mine]
            y = drop_labels(labels, self.config.train.label_dropout, self.config.model.num_classes, coins)
        return Batch(x0, t, noise, y)
