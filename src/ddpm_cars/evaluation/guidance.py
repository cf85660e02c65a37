"""Does asking for a class work? Samples of every class at several classifier-free guidance
scales, judged by a classifier trained on the run's real labelled images.

For each scale the same noise is used (image ``i`` of class ``c`` starts from the same
x_T at every scale), so the pictures show one car changing with the guidance.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ddpm_cars.config import DataConfig, SampleConfig
from ddpm_cars.data import build_dataset
from ddpm_cars.denoiser import Denoiser
from ddpm_cars.errors import UserError
from ddpm_cars.evaluation.class_accuracy import ClassifierTraining, predict, requested_class_share, train_classifier
from ddpm_cars.evaluation.scores import has_heldout
from ddpm_cars.files import atomic_write_text
from ddpm_cars.generation import ClassRequest, Watch, generate
from ddpm_cars.run import Run
from ddpm_cars.samplers import sampling_description
from ddpm_cars.viz import save_rows

RESULT_FILE = "guidance.json"
PICTURE_FILE = "guidance.png"
SHOWN_PER_SCALE = 4  # images of each class per scale in the picture
HELDOUT_IMAGES = 1000  # real held-out images that measure the classifier itself


@dataclass(frozen=True)
class GuidanceRequest:
    """What :func:`guidance_accuracy` measures: ``per_class`` samples of every class at each
    of the guidance ``scales``, drawn from ``seed`` (image ``i`` of class ``c`` from the same
    x_T at every scale) ``batch_size`` at a time, from the moving-average weights with
    ``ema``; the judge trained for ``classifier_steps`` steps from the same ``seed``."""

    scales: tuple[float, ...]
    per_class: int
    seed: int = 0
    batch_size: int = 64
    ema: bool = True
    classifier_steps: int = 500


def _check_scales(scales: Sequence[float]) -> list[float]:
    if not scales or any(not (s >= 0 and math.isfinite(s)) for s in scales):
        raise UserError(f"guidance scales must be finite numbers >= 0; got {list(scales)}")
    return list(scales)


def _class_names(trained: Run) -> list[str]:
    """The run's class names; an error unless it is conditional on two or more classes."""
    names = list(trained.config.model.class_names)
    if not names:
        raise UserError(f"{trained.dir} is not class-conditional: train with --class-conditional to measure guidance")
    if len(names) < 2:
        raise UserError(
            f"{trained.dir} knows one class ({names[0]!r}): guidance is measured between two or more classes"
        )
    return names


def _train_judge(
    data: DataConfig, num_classes: int, request: GuidanceRequest, device: torch.device | str, progress: bool
) -> tuple[nn.Module, float | None, float]:
    """The judge: a classifier trained on the run's own (real) training images; its accuracy on
    held-out ones (None when the source has none), and the seconds both took."""
    train = build_dataset(data, progress=progress)
    tic = time.perf_counter()
    training = ClassifierTraining(steps=request.classifier_steps, seed=request.seed)
    classifier = train_classifier(train.images, train.labels, num_classes, training, device=device, progress=progress)
    ceiling = None
    if has_heldout(data) and data.split != "test":
        test = build_dataset(dataclasses.replace(data, split="test", toy_count=HELDOUT_IMAGES), progress=progress)
        ceiling, _ = requested_class_share(predict(classifier, test.images, device=device), test.labels, num_classes)
    return classifier, ceiling, time.perf_counter() - tic


def _judge_samples(
    denoiser: Denoiser,
    sample: SampleConfig,
    classifier: nn.Module,
    names: list[str],
    request: GuidanceRequest,
    device: torch.device | str,
    progress: bool,
) -> tuple[list[dict], dict[float, torch.Tensor]]:
    """One row per scale -- the share of samples judged to be the class asked for, overall and
    per class -- and the first :data:`SHOWN_PER_SCALE` samples of each class
    (``[classes, shown, C, S, S]``, C = 1 or 3) per scale."""
    labels = torch.arange(len(names)).repeat_interleave(request.per_class)
    rows, shown = [], {}
    for scale in request.scales:
        tic = time.perf_counter()
        samples = generate(
            denoiser,
            len(labels),
            sample,
            seed=request.seed,
            batch_size=request.batch_size,
            classes=ClassRequest(labels, scale),
            watch=Watch(progress=progress),
        )
        share, per = requested_class_share(predict(classifier, samples, device=device), labels, len(names))
        rows.append(
            {
                "guidance": scale,
                "share": share,
                "per_class": dict(zip(names, per)),
                "seconds": round(time.perf_counter() - tic, 1),
            }
        )
        shown[scale] = samples.view(len(names), request.per_class, *samples.shape[1:])[:, :SHOWN_PER_SCALE]
    return rows, shown


def _save_picture(
    shown: dict[float, torch.Tensor], scales: list[float], names: list[str], sampler: str, path: Path
) -> None:
    """One row per class, a block of columns per scale."""
    picture_rows = [
        (
            name,
            [(f"guidance {s:g}" if i == 0 else "", shown[s][c, i]) for s in scales for i in range(shown[s].shape[1])],
        )
        for c, name in enumerate(names)
    ]
    save_rows(
        picture_rows,
        path,
        f"Samples asked for each class ({sampler}), at guidance {', '.join(f'{s:g}' for s in scales)}",
    )


def guidance_accuracy(
    trained: Run,
    request: GuidanceRequest,
    out: Path,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict:
    """Draw ``request.per_class`` samples of every class of a class-conditional run (opened
    with the sample settings to use) at each guidance scale, classify them, and write
    ``guidance.json`` and ``guidance.png`` (one row per class, a block of columns per scale)
    into ``out``. Returns the summary written."""
    scales = _check_scales(request.scales)
    names = _class_names(trained)
    config = trained.config
    classifier, ceiling, classifier_seconds = _train_judge(config.data, len(names), request, device, progress)
    denoiser = trained.denoiser(ema=request.ema, device=device)
    rows, shown = _judge_samples(denoiser, config.sample, classifier, names, request, device, progress)
    summary = {
        "checkpoint": str(trained.checkpoint),
        "sampler": sampling_description(config.sample),
        "seed": request.seed,
        "samples_per_class": request.per_class,
        "classes": names,
        "classifier_heldout_accuracy": ceiling,
        "classifier_seconds": round(classifier_seconds, 1),
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / RESULT_FILE, json.dumps(summary, indent=2) + "\n")
    _save_picture(shown, scales, names, sampling_description(config.sample), out / PICTURE_FILE)
    return summary


def format_guidance(summary: dict) -> str:
    """A Markdown table: the share of samples judged to be the class asked for, per scale."""
    names = summary["classes"]
    head = "| guidance | requested class | " + " | ".join(names) + " |"
    lines = [head, "|" + " --- |" * (len(names) + 2)]
    for row in summary["rows"]:
        per = " | ".join("-" if math.isnan(v) else f"{v:.0%}" for v in row["per_class"].values())
        lines.append(f"| {row['guidance']:g} | {row['share']:.1%} | {per} |")
    ceiling = summary["classifier_heldout_accuracy"]
    if ceiling is not None:
        lines.append(f"\nThe judge classifies {ceiling:.1%} of {HELDOUT_IMAGES} held-out real images correctly.")
    return "\n".join(lines)
