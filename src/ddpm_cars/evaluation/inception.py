"""Inception-v3 pool features: the TF-Inception "2015-12-05" network behind FID and KID.

The network and its converted weights come from torch-fidelity, whose port matches the
TensorFlow graph the published FIDs were computed with (bilinear resizing to 299 px as
TF 1.x did it included). The weights file (``weights-inception-2015-12-05-6726825d.pth``,
a plain state dict) is found in this order: an explicit path, torch's hub cache (where
the library's own download puts it), then a download. Offline and without the file,
:class:`InceptionUnavailable` says which file to put where.

The network takes RGB images; a grayscale image is repeated to three channels first
(:func:`as_rgb`, as torch-fidelity's users do for FID on grayscale data), and so is one
given to the toy-car judge (:mod:`ddpm_cars.evaluation.judge`).
"""

from __future__ import annotations

import pickle
import socket
import urllib.error
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ddpm_cars.data.dataset import IMAGE_CHANNELS
from ddpm_cars.errors import MissingFileError, UserError

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
FEATURE_DIM = 2048
DOWNLOAD_TIMEOUT_S = 30


class InceptionUnavailable(RuntimeError):
    """FID/KID cannot be computed here; the message says why and what to do."""


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """Images ``[N, C, H, W]`` (C = 1 or 3) for a feature network trained on RGB:
    ``[N, 3, H, W]``, a grayscale image repeated to the three channels; RGB ones as they are."""
    if images.ndim != 4 or images.shape[1] not in IMAGE_CHANNELS:
        raise ValueError(f"expected images [N, C, H, W] with C = 1 or 3, got {tuple(images.shape)}")
    return images if images.shape[1] == 3 else images.repeat(1, 3, 1, 1)


def hub_weights_path() -> Path:
    """Where torch-fidelity's own download keeps the weights (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def resolve_weights(path: str | Path | None = None, download: bool = True) -> Path:
    """The weights file to use: ``path`` if given, else the hub cache, else downloaded there."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise MissingFileError(f"--inception-weights {path} does not exist")
        return path
    cached = hub_weights_path()
    if cached.is_file():
        return cached
    how = (
        f"FID and KID need the Inception weights {WEIGHTS_FILE}: download {WEIGHTS_URL} and put it at "
        f"{cached}, or pass --inception-weights PATH"
    )
    if not download:
        raise InceptionUnavailable(f"{how} (not found)")
    cached.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(WEIGHTS_URL, str(cached), progress=True)
    except (urllib.error.URLError, OSError) as err:  # offline, DNS, timeout, HTTP error
        raise InceptionUnavailable(f"{how} (the download failed: {err})") from None
    finally:
        socket.setdefaulttimeout(previous)
    return cached


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The weights as a plain state dict, read with ``weights_only=True``: a file that
    would run code on loading is refused before any other loader sees it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise UserError(
            f"{path} is not a readable Inception state dict (refused: {str(err).splitlines()[0]})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not an Inception state dict (expected parameter names mapped to tensors)")
    return state


class InceptionFeatures:
    """``features(images)``: uint8 ``[N, C, H, W]`` (C = 1 or 3; grayscale repeated to RGB)
    -> float64 ``[N, 2048]`` pool features."""

    name = "inception-v3-2015-12-05-pool3"

    def __init__(self, weights: str | Path, device: torch.device | str = "cpu"):
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise InceptionUnavailable("FID and KID need torch-fidelity: pip install torch-fidelity") from None
        self.weights = Path(weights)
        load_state_dict(self.weights)  # refuse unsafe files before the library's own loader runs
        self.device = torch.device(device)
        try:
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", [str(FEATURE_DIM)], feature_extractor_weights_path=str(self.weights)
            ).to(self.device)
        except RuntimeError as err:  # state dict of another network
            raise UserError(f"{self.weights} does not hold Inception-v3 weights ({str(err).splitlines()[0]})") from None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 50, progress: bool = False) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in IMAGE_CHANNELS:
            raise ValueError(f"expected uint8 images [N, 1 or 3, H, W], got {images.dtype} {tuple(images.shape)}")
        chunks = []
        for start in tqdm(
            range(0, images.shape[0], batch_size),
            desc="Inception features",
            unit="batch",
            disable=not progress,
            leave=False,
        ):
            (pool,) = self.net(as_rgb(images[start : start + batch_size]).to(self.device))
            chunks.append(pool.double().cpu())
        return torch.cat(chunks) if chunks else torch.empty(0, FEATURE_DIM, dtype=torch.float64)
