"""Pictures: sample grids, the forward-process and denoising strips, the loss curve."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddpm_cars.data.dataset import IMAGE_CHANNELS, to_uint8


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _as_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as uint8 on the CPU; uint8 images as they are."""
    images = images.detach().cpu()
    return images if images.dtype == torch.uint8 else to_uint8(images)


def picture_array(picture: torch.Tensor) -> np.ndarray:
    """A uint8 picture ``[C, H, W]`` as PIL and matplotlib take it: ``[H, W]`` for C = 1
    (grayscale), ``[H, W, 3]`` for C = 3 (RGB)."""
    if picture.dtype != torch.uint8 or picture.ndim != 3 or picture.shape[0] not in IMAGE_CHANNELS:
        raise ValueError(f"a picture must be uint8 [1 or 3, H, W], got {picture.dtype} {tuple(picture.shape)}")
    return picture[0].numpy() if picture.shape[0] == 1 else picture.permute(1, 2, 0).numpy()


def picture_image(picture: torch.Tensor) -> Image.Image:
    """A uint8 picture ``[C, H, W]`` as a PIL image: mode ``L`` for C = 1, ``RGB`` for C = 3."""
    return Image.fromarray(picture_array(picture.detach().cpu()))


def _pixels(image: torch.Tensor) -> np.ndarray:
    """One image in [-1, 1] (or uint8) ``[C, H, W]`` as :func:`picture_array` gives it."""
    return picture_array(_as_uint8(image))


GRID_GAP = 2  # white pixels between and around the images of a grid


def grid_image(images: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """Images in [-1, 1] (or uint8) ``[N, C, H, W]``, C = 1 (grayscale) or 3 (RGB), tiled
    ``nrow`` per row (default: square) with white 2-pixel gaps: uint8 ``[C, H', W']`` on the
    CPU, the same C; one image alone comes back as it is. (The tiling of torchvision's
    ``make_grid``, without importing torchvision, which takes seconds; unlike it, one
    channel stays one.)"""
    tiles = _as_uint8(images)
    if tiles.shape[0] == 1:
        return tiles[0]
    count, channels, height, width = tiles.shape
    cols = min(nrow or math.ceil(math.sqrt(count)), count)
    rows, gap = math.ceil(count / cols), GRID_GAP
    grid = torch.full((channels, rows * (height + gap) + gap, cols * (width + gap) + gap), 255, dtype=torch.uint8)
    for k, tile in enumerate(tiles):
        top, left = gap + (k // cols) * (height + gap), gap + (k % cols) * (width + gap)
        grid[:, top : top + height, left : left + width] = tile
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    """Images in [-1, 1] ``[N, C, H, W]`` as one PNG grid, ``nrow`` per row (default: square):
    8-bit grayscale (mode L) for C = 1, RGB for C = 3."""
    return save_picture(grid_image(images, nrow), path, scale)


def save_picture(picture: torch.Tensor, path: str | Path, scale: int = 1) -> Path:
    """A uint8 picture ``[C, H, W]`` (a :func:`grid_image`) as a PNG, mode L for C = 1 and RGB
    for C = 3, each pixel ``scale`` x ``scale``; the folder is made if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = picture_image(picture)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path)
    return path


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    """One image in [-1, 1] ``[C, H, W]`` as a PNG: mode L for C = 1, RGB for C = 3."""
    picture_image(_as_uint8(image)).save(path)
    return Path(path)


def save_samples(images: torch.Tensor, out: str | Path, grid_count: int | None = None, nrow: int | None = None) -> None:
    """``out``/grid.png of the first ``grid_count`` images (all by default; ``nrow`` a row) and
    ``out``/images/NNNN.png, one per image; images in [-1, 1] ``[N, C, H, W]``, mode-L PNGs
    for C = 1, RGB for C = 3."""
    (Path(out) / "images").mkdir(parents=True, exist_ok=True)
    save_grid(images[:grid_count], Path(out) / "grid.png", nrow=nrow)
    for i, image in enumerate(images):
        save_image(image, Path(out) / "images" / f"{i:04d}.png")


def save_strip(frames: Sequence[tuple[str, torch.Tensor]], path: str | Path, title: str) -> Path:
    """A row of labelled images in [-1, 1] (each ``[C, H, W]``, C = 1 or 3), e.g. one image
    across t."""
    return save_rows([("", frames)], path, title)


def save_rows(rows: Sequence[tuple[str, Sequence[tuple[str, torch.Tensor]]]], path: str | Path, title: str) -> Path:
    """Rows of labelled images in [-1, 1]: ``[(row name, [(label, [C, H, W]), ...]), ...]``,
    C = 1 (drawn in gray, 0 black to 255 white) or 3 (RGB); the labels of the first row title
    the columns."""
    plt = _figure()
    cols = max(len(frames) for _, frames in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.5 * cols, 0.4 + 1.6 * len(rows)), squeeze=False)
    for r, (name, frames) in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c >= len(frames):
                continue
            label, image = frames[c]
            pixels = _pixels(image)
            gray = {"cmap": "gray", "vmin": 0, "vmax": 255} if pixels.ndim == 2 else {}  # not a colour map
            ax.imshow(pixels, interpolation="nearest", **gray)
            if r == 0:
                ax.set_title(label, fontsize=9)
        if name:
            axes[r][0].text(-0.08, 0.5, name, transform=axes[r][0].transAxes, ha="right", va="center", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def moving_average(values: Sequence[float]) -> list[float]:
    """Bias-corrected exponential moving average over a window of about 2% of the values,
    so the start does not lag (a constant sequence is returned unchanged)."""
    decay = 1.0 - 1.0 / max(len(values) / 50, 1.0)
    out, avg = [], 0.0
    for n, value in enumerate(values, start=1):
        avg = decay * avg + (1 - decay) * value
        out.append(avg / (1 - decay**n))
    return out


def save_loss_curve(steps: Sequence[int], losses: Sequence[float], path: str | Path, loss_name: str) -> Path:
    """Per-step training loss with an exponential moving average over it (skipped,
    non-finite steps are left out)."""
    finite = [(s, v) for s, v in zip(steps, losses) if math.isfinite(v)]
    steps, losses = [s for s, _ in finite], [v for _, v in finite]
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=0.6, alpha=0.35, label="per step")
    if len(losses) > 1:
        ax.plot(steps, moving_average(losses), lw=1.5, label="moving average")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(loss_name)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def evenly_spaced_steps(timesteps: int, count: int = 10) -> list[int]:
    """``count`` 0-indexed timesteps from 0 to T-1, evenly spaced."""
    count = max(2, min(count, timesteps))
    return sorted({round(i * (timesteps - 1) / (count - 1)) for i in range(count)})


def save_distance_histogram(samples: torch.Tensor, heldout: torch.Tensor | None, path: str | Path) -> Path:
    """Histograms of nearest-training-image distances: samples against held-out real images."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    values = [samples] + ([heldout] if heldout is not None else [])
    bins = np.linspace(0.0, max(v.max().item() for v in values) * 1.05, 40)
    ax.hist(samples.numpy(), bins=bins, alpha=0.6, density=True, label=f"samples ({samples.numel()})")
    if heldout is not None:
        ax.hist(heldout.numpy(), bins=bins, alpha=0.6, density=True, label=f"held-out real images ({heldout.numel()})")
    ax.set_xlabel("RMS pixel distance to the nearest training image")
    ax.set_ylabel("density")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def save_metric_curves(rows: Sequence[dict[str, float]], path: str | Path) -> Path:
    """One panel per metric family (SWD and its levels, precision/recall, FID, KID, and FD
    and KID on the toy-car judge's features) against the optimizer step; ``rows`` are dicts
    with a ``step`` key, missing values skipped."""
    names = [
        k
        for k in dict.fromkeys(k for r in rows for k in r)
        if k != "step" and any(r.get(k) is not None and math.isfinite(r[k]) for r in rows)
    ]  # columns with a value
    families: dict[str, list[str]] = {}
    for name in names:
        family = (
            "swd"
            if name.startswith("swd")
            else "precision / recall"
            if name.split("_")[0] in ("precision", "recall")
            else name
        )
        if not name.endswith("kid_std"):
            families.setdefault(family, []).append(name)
    plt = _figure()
    fig, axes = plt.subplots(1, max(len(families), 1), figsize=(4 * max(len(families), 1), 3.2), squeeze=False)
    for ax, (family, members) in zip(axes[0], families.items()):
        for name in members:
            points = [(r["step"], r[name]) for r in rows if r.get(name) is not None and math.isfinite(r[name])]
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, label=name)
        ax.set_title(family + (" (x1e3, lower is better)" if family == "swd" else ""), fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
