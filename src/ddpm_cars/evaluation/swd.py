"""Sliced Wasserstein distance (SWD) between Laplacian-pyramid patches of two image sets
(Karras et al. 2018, "Progressive Growing of GANs for Improved Quality, Stability, and
Variation", Sec. 5; reference code ``metrics/sliced_wasserstein.py`` of
tkarras/progressive_growing_of_gans).

What it measures: each image is split into a Laplacian pyramid (Burt & Adelson 1983),
one frequency band per resolution from the image size down to 16 x 16. At every level,
random 7 x 7 x C neighbourhoods ("descriptors"; C = 3 colour channels, or 1 for grayscale
images) are cut out of the band, normalised per channel over the whole set, and the
distribution of the real descriptors is compared with the distribution of the generated
ones by the sliced Wasserstein distance (Rabin et al. 2011): the 1-D Wasserstein-1
distance of their projections on random unit directions, averaged over the directions.
Coarse levels (16 x 16) judge colour (or brightness) and layout, fine levels (the full
resolution) judge edges and texture. Lower is better; the numbers are reported x 1e3 per
level, as in the paper, plus their mean. Both sets must have the same channels.

No network weights are needed, so the metric works offline. It is defined for square
images of side 16 * 2**k pixels (16, 32, 64, 128, ...): the pyramid halves the side
exactly at every level and its coarsest level is always 16 x 16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ddpm_cars.data.dataset import IMAGE_CHANNELS
from ddpm_cars.errors import UserError

MIN_RESOLUTION = 16  # the coarsest pyramid level (Karras et al. 2018, Sec. 5)
NHOOD_SIZE = 7  # descriptors are 7 x 7 x C neighbourhoods: C = 3 colour channels (Sec. 5), 1 for grayscale
_BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)  # 5-tap binomial filter; outer product / 256 (Burt & Adelson 1983)


@dataclass(frozen=True)
class SWDResult:
    """SWD x 1e3 per pyramid level (``levels``: resolution -> value, finest first) and
    their average (``mean``); lower is better."""

    levels: dict[int, float]
    mean: float

    def summary(self) -> dict[str, float]:
        """``{"swd": mean, "swd_64": ..., "swd_32": ..., "swd_16": ...}`` (finest first)."""
        return {"swd": self.mean, **{f"swd_{resolution}": value for resolution, value in self.levels.items()}}


# ---------------------------------------------------------------------------------------
# Laplacian pyramid
# ---------------------------------------------------------------------------------------


def gaussian_filter(x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """The 5 x 5 Gaussian outer([1,4,6,4,1], [1,4,6,4,1]) / 256 (times ``gain``) applied to
    each channel of ``x`` (``[N, C, H, W]`` float) with reflect padding, as
    ``scipy.ndimage.convolve(mode='mirror')`` in the reference code. Same shape out."""
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"expected a float [N, C, H, W] tensor, got {x.dtype} {tuple(x.shape)}")
    if min(x.shape[-2:]) < 3:
        raise ValueError(f"reflect padding needs images of at least 3 x 3 pixels, got {tuple(x.shape[-2:])}")
    taps = torch.tensor(_BINOMIAL, dtype=x.dtype, device=x.device)
    kernel = (torch.outer(taps, taps) * (gain / 256.0)).expand(x.shape[1], 1, 5, 5)  # [C, 1, 5, 5]
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel, groups=x.shape[1])


def pyr_down(x: torch.Tensor) -> torch.Tensor:
    """Blur, then keep every second pixel: ``[N, C, H, W] -> [N, C, ceil(H/2), ceil(W/2)]``
    (the reference's ``pyr_down``, which matches ``cv2.pyrDown``)."""
    return gaussian_filter(x)[..., ::2, ::2]


def pyr_up(x: torch.Tensor) -> torch.Tensor:
    """Insert zeros between pixels (values at even positions), then blur with 4x the
    kernel to restore the brightness: ``[N, C, H, W] -> [N, C, 2H, 2W]`` (the reference's
    ``pyr_up``, which matches ``cv2.pyrUp``)."""
    if x.ndim != 4:
        raise ValueError(f"expected [N, C, H, W], got {tuple(x.shape)}")
    n, c, h, w = x.shape
    up = x.new_zeros(n, c, 2 * h, 2 * w)
    up[..., ::2, ::2] = x
    return gaussian_filter(up, gain=4.0)


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """``levels`` bands of ``x`` (``[N, C, H, W]``, any dtype; computed in float32):
    the finest band-pass image first, the low-pass image at the smallest resolution last.
    Band ``i`` has side ``H / 2**i``; every halving must be exact (the reference's
    ``generate_laplacian_pyramid``)."""
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    if x.ndim != 4:
        raise ValueError(f"expected [N, C, H, W], got {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % 2 ** (levels - 1) or w % 2 ** (levels - 1):
        raise ValueError(f"{levels} levels need H and W divisible by {2 ** (levels - 1)}, got {h} x {w}")
    pyramid = [x.to(torch.float32)]
    for _ in range(1, levels):
        pyramid.append(pyr_down(pyramid[-1]))
        pyramid[-2] = pyramid[-2] - pyr_up(pyramid[-1])  # band = image - expand(reduce(image))
    return pyramid


def reconstruct(pyramid: list[torch.Tensor]) -> torch.Tensor:
    """The inverse of :func:`laplacian_pyramid`: from the coarsest, ``x = pyr_up(x) + band``."""
    if not pyramid:
        raise ValueError("the pyramid is empty")
    x = pyramid[-1]
    for band in reversed(pyramid[:-1]):
        x = pyr_up(x) + band
    return x


def pyramid_resolutions(size: int) -> list[int]:
    """Resolutions of the pyramid levels for square ``size`` x ``size`` images, finest
    first: ``size, size/2, ..., 16`` (64 -> [64, 32, 16]). ``size`` must be 16 * 2**k."""
    if size < MIN_RESOLUTION:
        raise UserError(f"SWD needs images of at least {MIN_RESOLUTION} x {MIN_RESOLUTION} pixels, got {size}")
    resolutions = [size]
    while resolutions[-1] > MIN_RESOLUTION:
        if resolutions[-1] % 2:
            break
        resolutions.append(resolutions[-1] // 2)
    if resolutions[-1] != MIN_RESOLUTION:
        raise UserError(
            f"SWD supports square images of side 16 * 2**k (16, 32, 64, 128, ...) so that the Laplacian "
            f"pyramid halves exactly down to {MIN_RESOLUTION} x {MIN_RESOLUTION}; got {size}"
        )
    return resolutions


# ---------------------------------------------------------------------------------------
# Descriptors and the sliced Wasserstein distance
# ---------------------------------------------------------------------------------------


def patch_descriptors(level: torch.Tensor, patches_per_image: int, generator: torch.Generator) -> torch.Tensor:
    """``patches_per_image`` 7 x 7 neighbourhoods of every image of ``level``
    (``[N, C, H, W]`` float) at positions drawn uniformly over all places where the patch
    fits inside the image: ``[N * patches_per_image, C, 7, 7]``, the patches of image 0
    first (the reference's ``get_descriptors_for_minibatch``). ``generator`` is a CPU
    generator; the top-left row is drawn before the column."""
    if level.ndim != 4:
        raise ValueError(f"expected [N, C, H, W], got {tuple(level.shape)}")
    if patches_per_image < 1:
        raise ValueError(f"patches_per_image must be >= 1, got {patches_per_image}")
    n, _, h, w = level.shape
    if h < NHOOD_SIZE or w < NHOOD_SIZE:
        raise ValueError(f"images must be at least {NHOOD_SIZE} x {NHOOD_SIZE} to cut 7 x 7 patches, got {h} x {w}")
    count = n * patches_per_image
    top = torch.randint(0, h - NHOOD_SIZE + 1, (count,), generator=generator).to(level.device)  # [N*P]
    left = torch.randint(0, w - NHOOD_SIZE + 1, (count,), generator=generator).to(level.device)  # [N*P]
    image = torch.arange(n, device=level.device).repeat_interleave(patches_per_image)  # [N*P]
    # every 7 x 7 window as a view (no copy): [N, H-6, W-6, C, 7, 7]
    windows = level.unfold(2, NHOOD_SIZE, 1).unfold(3, NHOOD_SIZE, 1).permute(0, 2, 3, 1, 4, 5)
    return windows[image, top, left]  # [N*P, C, 7, 7]


def normalize_descriptors(descriptors: torch.Tensor) -> torch.Tensor:
    """Subtract the per-channel mean and divide by the per-channel standard deviation,
    both taken over all descriptors and all 7 x 7 positions of this set; flatten to
    ``[M, C * 7 * 7]`` (the reference's ``finalize_descriptors``; Sec. 5)."""
    if descriptors.ndim != 4:
        raise ValueError(f"expected [M, C, 7, 7] descriptors, got {tuple(descriptors.shape)}")
    std, mean = torch.std_mean(descriptors, dim=(0, 2, 3), keepdim=True, correction=0)  # [1, C, 1, 1]; np.std
    return (descriptors - mean).div_(std).reshape(descriptors.shape[0], -1)


def random_directions(dim: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random unit vectors in R^dim as the columns of a ``[dim, count]`` float32
    tensor: standard Gaussian draws (CPU ``generator``), each normalised to length 1."""
    directions = torch.randn(dim, count, generator=generator)
    return directions / directions.norm(dim=0, keepdim=True)


@torch.no_grad()
def sliced_wasserstein(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    directions: int = 128,
    repeats: int = 4,
    generator: torch.Generator,
) -> float:
    """Sliced Wasserstein-1 distance between the rows of ``a`` and ``b`` (``[M, D]`` each,
    same M): for each of ``repeats`` rounds, draw ``directions`` unit vectors with
    :func:`random_directions`, project both sets, sort every projection, and take the
    mean absolute difference of the sorted values (the 1-D W1 distance of two empirical
    distributions with M points each); average over the rounds (Rabin et al. 2011;
    Karras et al. 2018, Sec. 5 use 4 x 128 directions)."""
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must be [M, D] with the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < 1:
        raise ValueError("a and b must hold at least one row")
    if directions < 1 or repeats < 1:
        raise ValueError(f"directions and repeats must be >= 1, got {directions} and {repeats}")
    a, b = a.to(torch.float32), b.to(torch.float32)
    projected_a = a.new_empty(directions, a.shape[0])  # [directions, M], reused every round
    projected_b = b.new_empty(directions, b.shape[0])
    total = 0.0
    for _ in range(repeats):
        unit = random_directions(a.shape[1], directions, generator).to(a.device).T  # [directions, D]
        _sort_rows_(torch.mm(unit, a.T, out=projected_a))  # every row: one direction, sorted
        _sort_rows_(torch.mm(unit, b.T, out=projected_b))
        total += projected_a.sub_(projected_b).abs_().mean().item()  # W1 of the sorted 1-D samples
    return total / repeats


def _sort_rows_(x: torch.Tensor) -> None:
    """Sort every row of ``x`` (``[R, M]``, contiguous) ascending, in place. On the CPU this
    uses NumPy's SIMD sort, which sorts float32 rows about 5x faster than ``torch.sort``
    (measured on 128 x 128k projections, 2 cores); the values are identical."""
    if x.device.type == "cpu":
        x.numpy().sort(axis=1)
    else:
        x.copy_(x.sort(dim=1).values)


def _check_images(images: torch.Tensor, name: str) -> None:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of uint8 images [N, C, H, W], got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"{name} must be uint8 images in [0, 255], got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[1] not in IMAGE_CHANNELS:
        raise ValueError(f"{name} must be [N, C, H, W], C = 1 (grayscale) or 3 (RGB), got shape {tuple(images.shape)}")
    if images.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one image, got an empty batch")
    if images.shape[2] != images.shape[3]:
        raise ValueError(f"{name} must hold square images, got {images.shape[2]} x {images.shape[3]}")


@torch.no_grad()
def sliced_wasserstein_distance(
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    seed: int = 0,
    patches_per_image: int = 128,
    directions: int = 128,
    repeats: int = 4,
) -> SWDResult:
    """SWD x 1e3 between ``real`` and ``fake`` (uint8 ``[N, C, S, S]``, C = 1 or 3 in both,
    S = 16 * 2**k; the two N may differ) at every Laplacian-pyramid level from S down to 16
    (Karras et al. 2018, Sec. 5).

    The pixels are used as float32 in [0, 255], as in the reference (the per-set
    normalisation of the descriptors makes the scale irrelevant). When the two sets give
    different numbers of descriptors, the larger set is randomly subsampled to the size
    of the smaller. Every random draw (patch positions, subsampling, directions) comes
    from one CPU generator seeded with ``seed``, so equal inputs and seed give equal
    results.
    """
    _check_images(real, "real")
    _check_images(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake must have the same channels, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if real.shape[2:] != fake.shape[2:]:
        raise ValueError(
            f"real and fake must have the same image size, got {tuple(real.shape[2:])} and {tuple(fake.shape[2:])}"
        )
    for name, value in (("patches_per_image", patches_per_image), ("directions", directions), ("repeats", repeats)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    resolutions = pyramid_resolutions(real.shape[-1])
    generator = torch.Generator().manual_seed(seed)
    fake = fake.to(real.device)
    real_pyramid = laplacian_pyramid(real, len(resolutions))
    fake_pyramid = laplacian_pyramid(fake, len(resolutions))
    levels: dict[int, float] = {}
    for resolution, real_band, fake_band in zip(resolutions, real_pyramid, fake_pyramid):
        a = normalize_descriptors(patch_descriptors(real_band, patches_per_image, generator))  # [Nr*P, C*49]
        b = normalize_descriptors(patch_descriptors(fake_band, patches_per_image, generator))  # [Nf*P, C*49]
        count = min(a.shape[0], b.shape[0])
        if a.shape[0] > count:
            a = a[torch.randperm(a.shape[0], generator=generator)[:count].to(a.device)]
        elif b.shape[0] > count:
            b = b[torch.randperm(b.shape[0], generator=generator)[:count].to(b.device)]
        levels[resolution] = 1e3 * sliced_wasserstein(a, b, directions=directions, repeats=repeats, generator=generator)
    return SWDResult(levels=levels, mean=sum(levels.values()) / len(levels))
