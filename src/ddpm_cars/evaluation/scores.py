"""Scoring samples: :func:`score` computes the sample metrics and the memorisation check of
generated images against reference images; around it, the reference images of a data
source, the Inception network, samples from a run, and what is written and printed."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ddpm_cars.config import DataConfig
from ddpm_cars.data import build_dataset
from ddpm_cars.data.dataset import to_model_range
from ddpm_cars.data.stanford_cars import find_split_dirs
from ddpm_cars.evaluation.inception import InceptionFeatures, InceptionUnavailable, resolve_weights
from ddpm_cars.evaluation.judge import describe_judge
from ddpm_cars.evaluation.memorization import MemorizationCheck, memorization_check
from ddpm_cars.evaluation.sample_metrics import sample_metrics
from ddpm_cars.files import atomic_write_text
from ddpm_cars.viz import save_distance_histogram, save_rows

EVAL_DIR = "eval"
METRICS_FILE = "metrics.json"
NEAREST_PICTURE = "nearest.png"
DISTANCES_PICTURE = "nearest_distances.png"
NEAREST_PAIRS = 12  # sample / nearest-training-image pairs drawn, closest first


@dataclass(frozen=True)
class ReferenceData:
    """Reference images (the training set by default) and held-out real images, uint8."""

    images: torch.Tensor
    description: str  # names the cache entry of its features: source, split, size
    heldout: torch.Tensor | None


def describe(data: DataConfig) -> str:
    source = (
        data.source if data.source in ("toy-cars", "stanford-cars") else str(Path(data.source).expanduser().resolve())
    )
    extra = f"-{data.toy_count}" if data.source == "toy-cars" else ""
    return f"{source}{extra}-{data.split}-{data.image_size}px" + ("" if data.crop == "none" else f"-{data.crop}crop")


def has_heldout(data: DataConfig) -> bool:
    return data.source in ("toy-cars", "stanford-cars") or find_split_dirs(Path(data.source).expanduser()) is not None


def load_reference(data: DataConfig, heldout_count: int, progress: bool = True) -> ReferenceData:
    """The images of ``data`` and, when the source has a test split, ``heldout_count`` of
    its test images (for toy cars: other images of the same generator), with the same channels."""
    images = build_dataset(data, progress=progress).images
    heldout = None
    if has_heldout(data) and data.split != "test" and heldout_count > 0:
        channels = str(images.shape[1])  # "auto" has been decided by the training images
        test = dataclasses.replace(data, split="test", toy_count=heldout_count, image_channels=channels)
        heldout = build_dataset(test, progress=progress).images[:heldout_count]
    return ReferenceData(images, describe(data), heldout)


def load_inception(
    weights: str | Path | None, device: torch.device, download: bool = True
) -> tuple[InceptionFeatures | None, str | None]:
    """The Inception network, or None and the reason FID/KID are skipped."""
    try:
        return InceptionFeatures(resolve_weights(weights, download=download), device), None
    except InceptionUnavailable as err:
        return None, str(err)


def score(
    samples: torch.Tensor,
    reference: ReferenceData,
    inception: InceptionFeatures | None = None,
    *,
    seed: int = 0,
    memorization: bool = True,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> tuple[dict[str, float], MemorizationCheck | None]:
    """The metrics of uint8 ``samples`` against ``reference`` (SWD, pixel precision/recall and
    FD/KID on the toy-car judge's features always; FID, KID and Inception precision/recall
    with an ``inception`` network) and, with ``memorization``, each sample's nearest
    training image."""
    metrics, features = sample_metrics(
        samples,
        reference.images,
        description=reference.description,
        inception=inception,
        cache_dir=cache_dir,
        seed=seed,
        progress=progress,
    )
    check = None
    if memorization:
        feats = None
        if features:
            held = inception(reference.heldout) if reference.heldout is not None else None
            feats = (features["samples"], features["reference"], held)
        check = memorization_check(samples, reference.images, reference.heldout, feats)
    return metrics, check


def write_evaluation(
    out: Path, summary: dict, samples: torch.Tensor, reference: ReferenceData, check: MemorizationCheck | None
) -> list[str]:
    """``metrics.json`` and the memorisation pictures into ``out``; the names written."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / METRICS_FILE, json.dumps(summary, indent=2) + "\n")
    written = [METRICS_FILE]
    if check is not None:
        order = check.sample_distance.argsort()[:NEAREST_PAIRS].tolist()
        rows = [
            ("sample", [(f"d={check.sample_distance[i]:.3f}", to_model_range(samples[i])) for i in order]),
            (
                "nearest\ntraining\nimage",
                [(f"#{check.sample_index[i]}", to_model_range(reference.images[check.sample_index[i]])) for i in order],
            ),
        ]
        save_rows(rows, out / NEAREST_PICTURE, "Samples closest to a training image (RMS pixel distance d)")
        save_distance_histogram(check.sample_distance, check.heldout_distance, out / DISTANCES_PICTURE)
        written += [NEAREST_PICTURE, DISTANCES_PICTURE]
    return written


@dataclass(frozen=True)
class ScoreOptions:
    """How :func:`score_and_write` scores: with the ``inception`` network (None: FID and KID
    skipped, for the reason ``fid_skipped``), the metrics' ``seed``, the memorisation
    check or not, and the folder of cached reference features (None: the default)."""

    inception: InceptionFeatures | None = None
    fid_skipped: str | None = None
    seed: int = 0
    memorization: bool = True
    cache_dir: Path | None = None


def score_and_write(
    samples: torch.Tensor,
    reference: ReferenceData,
    *,
    what: str,
    summary: dict,
    out: Path | None,
    options: ScoreOptions = ScoreOptions(),
) -> dict:
    """:func:`score` uint8 ``samples`` (described as ``what``), print the numbers, and write
    ``summary`` with them as ``metrics.json``, and the memorisation pictures, into ``out``
    (when given). Returns the summary."""
    fid_skipped = options.fid_skipped
    metrics, check = score(
        samples,
        reference,
        options.inception,
        seed=options.seed,
        memorization=options.memorization,
        cache_dir=options.cache_dir,
    )
    summary = {
        **summary,
        "num_samples": samples.shape[0],
        "metrics": metrics,
        "reference": f"{reference.images.shape[0]} images of {reference.description}",
        "judge_features": describe_judge(samples.shape[-1]),
    }
    if fid_skipped:
        summary["fid_skipped"] = fid_skipped
    print(f"{what} against {reference.images.shape[0]} reference images ({reference.description}):")
    print("\n".join(format_metrics(metrics, fid_skipped)))
    if check is not None:
        summary["memorization"] = check.summary()
        print(format_memorization(summary["memorization"]))
    if out is not None:
        written = write_evaluation(out, summary, samples, reference, check)
        print(f"Wrote {', '.join(written)} to {out}/")
    return summary


def format_metrics(metrics: dict[str, float], fid_skipped: str | None) -> list[str]:
    """Human-readable lines for the terminal."""
    levels = " | ".join(f"{k[4:]}px {v:.2f}" for k, v in metrics.items() if k.startswith("swd_"))
    lines = [
        f"  SWD x1e3 (lower is better): {metrics['swd']:.2f}  [{levels}]",
        f"  precision / recall on 16x16 pixels: {metrics['precision_pixels']:.3f} / {metrics['recall_pixels']:.3f}",
        f"  FD / KID on toy-car judge features (lower is better): FD {metrics['judge_fd']:.3f} | "
        f"KID {metrics['judge_kid']:.5f} +- {metrics['judge_kid_std']:.5f}",
    ]
    if "fid" in metrics:
        lines.append(
            f"  FID {metrics['fid']:.2f} | KID {metrics['kid']:.5f} +- {metrics['kid_std']:.5f} | "
            f"precision / recall (Inception) {metrics['precision']:.3f} / {metrics['recall']:.3f}"
        )
    else:
        lines.append(f"  FID and KID skipped: {fid_skipped}")
    return lines


def format_memorization(summary: dict[str, float]) -> str:
    line = f"  memorisation: median RMS distance to the nearest training image {summary['sample_to_train_median']:.4f}"
    if "heldout_to_train_median" in summary:
        line += (
            f" (held-out real images: {summary['heldout_to_train_median']:.4f}); "
            f"{100 * summary['suspected_copies']:.1f}% of samples closer than 99% of held-out images"
        )
    return line
