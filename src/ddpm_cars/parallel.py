"""Where the work runs: the device, and data-parallel training and sampling on PyTorch's
own engine (torchrun starts one process per device, DistributedDataParallel averages the
gradients).

A single process (no torchrun) is the world of size 1 and nothing here does anything.
Under torchrun, ``init_from_env`` joins the process group (nccl on CUDA, gloo on CPU)
from the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

Conventions: ``--batch-size`` is the global batch. Every rank walks the same shuffled
order of the epoch and draws the same timesteps and noise for the whole batch, then
keeps its share -- every N-th item, as DistributedSampler assigns them -- so N processes
compute the gradient of exactly the batch one process would (up to float summation
order).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ddpm_cars.errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among ``size`` processes."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, logs, pictures and progress bars."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def share(self, count: int) -> slice:
        """This rank's part of a batch: every ``size``-th item from ``rank`` -- the items
        torch's DistributedSampler gives it, as it takes every ``size``-th item of the
        epoch's permutation (``count`` divisible by the size)."""
        return slice(self.rank, count, self.size)


_JOINED: list[bool] = []  # non-empty while this process is in a group init_from_env created


def current_world() -> World:
    """The process group joined by this process, or the world of one."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def init_from_env(device: torch.device) -> tuple[World, torch.device]:
    """Join torchrun's process group when WORLD_SIZE > 1; on CUDA each process takes the
    GPU of its LOCAL_RANK. Returns the world and the device this process uses."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return current_world(), device
    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _JOINED.append(True)
    return current_world(), device


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel when there are several processes."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def no_sync(net: nn.Module, sync: bool) -> AbstractContextManager:
    """Skip DDP's gradient all-reduce on accumulation micro-steps (``sync`` False)."""
    if sync or not hasattr(net, "no_sync"):
        return contextlib.nullcontext()
    return net.no_sync()


def mean_over_ranks(values: torch.Tensor, world: World) -> torch.Tensor:
    """The element-wise mean of ``values`` over all ranks (a copy; unchanged on one)."""
    if not world.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / world.size


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank when it is true on any (e.g. a stop request)."""
    if not world.distributed:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def leave() -> None:
    """Leave the process group :func:`init_from_env` joined, once every process is done
    with it: a process that exits while a peer still holds the connection can make the
    peer abort. A group someone else set up is theirs to end."""
    if _JOINED and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _JOINED.clear()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shard_indices(count: int, world: World) -> list[int]:
    """Image indices this rank generates: ``rank, rank + size, ...`` below ``count``."""
    return list(range(world.rank, count, world.size))


def gather_images(images: torch.Tensor, indices: Sequence[int], count: int, world: World) -> torch.Tensor | None:
    """Images generated across ranks, in index order, on rank 0 (None on the others)."""
    if not world.distributed:
        return images
    parts: list = [None] * world.size if world.is_main else None  # type: ignore[assignment]
    dist.gather_object((list(indices), images.cpu()), parts, dst=0)
    if not world.is_main:
        return None
    out = torch.empty((count, *images.shape[1:]), dtype=images.dtype)
    for part_indices, part in parts:
        if len(part_indices):
            out[torch.tensor(part_indices)] = part
    return out


def generate_across_ranks(denoiser, num_images: int, config, world: World, **kwargs) -> torch.Tensor | None:
    """``generation.generate`` with the images of the request shared out over the ranks
    (rank r draws images r, r + size, ...) and gathered on rank 0, in order; per-image
    seeds make them the images one process would draw. None on the other ranks."""
    from ddpm_cars.generation import QUIET, generate

    indices = shard_indices(num_images, world)
    if not world.is_main:
        kwargs = {**kwargs, "watch": QUIET}
    images = generate(denoiser, indices, config, **kwargs)
    return gather_images(images, indices, num_images, world)


def decode_across_ranks(denoiser, x_T: torch.Tensor, config, world: World, batch_size: int = 64) -> torch.Tensor | None:
    """``generation.decode`` of the starting noises ``x_T`` ``[N, 3, S, S]`` shared out over
    the ranks as :func:`generate_across_ranks` shares images, gathered on rank 0 in order
    (None on the other ranks)."""
    from ddpm_cars.generation import decode

    indices = shard_indices(x_T.shape[0], world)
    frames = decode(denoiser, x_T[indices], config, batch_size=batch_size, progress=world.is_main)
    return gather_images(frames, indices, x_T.shape[0], world)
