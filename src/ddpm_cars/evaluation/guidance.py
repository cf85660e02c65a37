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
from pathlib import Path

import torch

from ddpm_cars.data import build_dataset
from ddpm_cars.errors import UserError
from ddpm_cars.evaluation.class_accuracy import predict, requested_class_share, train_classifier
from ddpm_cars.evaluation.scores import has_heldout, sampling_description
from ddpm_cars.files import atomic_write_text
from ddpm_cars.generation import ClassRequest, generate
from ddpm_cars.run import Run
from ddpm_cars.viz import save_rows

RESULT_FILE = "guidance.json"
PICTURE_FILE = "guidance.png"
SHOWN_PER_SCALE = 4  # images of each class per scale in the picture
HELDOUT_IMAGES = 1000  # real held-out images that measure the classifier itself


def _check_scales(scales: Sequence[float]) -> list[float]:
    if not scales or any(not (s >= 0 and math.isfinite(s)) for s in scales):
        raise UserError(f"guidance scales must be finite numbers >= 0; got {list(scales)}")
    return list(scales)


def guidance_accuracy(
    run: Path,
    scales: Sequence[float],
    per_class: int,
    out: Path,
    *,
    seed: int = 0,
    sample_overrides: dict | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    ema: bool = True,
    classifier_steps: int = 500,
    progress: bool = True,
) -> dict:
    """Draw ``per_class`` samples of every class of a class-conditional run at each guidance
    scale, classify them, and write ``guidance.json`` and ``guidance.png`` (one row per class,
    a block of columns per scale) into ``out``. Returns the summary written."""
    scales = _check_scales(scales)
    trained = Run.open(run, sample=sample_overrides)
    config, checkpoint = trained.config, trained.checkpoint
    names = list(config.model.class_names)
    if not names:
        raise UserError(f"{trained.dir} is not class-conditional: train with --class-conditional to measure guidance")
    if len(names) < 2:
        raise UserError(
            f"{trained.dir} knows one class ({names[0]!r}): guidance is measured between two or more classes"
        )
    # the judge: a classifier on the run's own (real) training images, measured on held-out ones
    data = build_dataset(config.data, progress=progress)
    tic = time.perf_counter()
    classifier = train_classifier(
        data.images, data.labels, len(names), steps=classifier_steps, seed=seed, device=device, progress=progress
    )
    ceiling = None
    if has_heldout(config.data) and config.data.split != "test":
        test = build_dataset(
            dataclasses.replace(config.data, split="test", toy_count=HELDOUT_IMAGES), progress=progress
        )
        ceiling, _ = requested_class_share(predict(classifier, test.images, device=device), test.labels, len(names))
    classifier_seconds = time.perf_counter() - tic

    denoiser = trained.denoiser(ema=ema, device=device)
    labels = torch.arange(len(names)).repeat_interleave(per_class)
    rows, shown = [], {}
    for scale in scales:
        tic = time.perf_counter()
        samples = generate(
            denoiser,
            len(labels),
            config.sample,
            seed=seed,
            batch_size=batch_size,
            classes=ClassRequest(labels, scale),
            progress=progress,
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
        shown[scale] = samples.view(len(names), per_class, *samples.shape[1:])[:, :SHOWN_PER_SCALE]
    summary = {
        "checkpoint": str(checkpoint),
        "sampler": sampling_description(config.sample),
        "seed": seed,
        "samples_per_class": per_class,
        "classes": names,
        "classifier_heldout_accuracy": ceiling,
        "classifier_seconds": round(classifier_seconds, 1),
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / RESULT_FILE, json.dumps(summary, indent=2) + "\n")
    picture_rows = [
        (
            name,
            [(f"guidance {s:g}" if i == 0 else "", shown[s][c, i]) for s in scales for i in range(shown[s].shape[1])],
        )
        for c, name in enumerate(names)
    ]
    save_rows(
        picture_rows,
        out / PICTURE_FILE,
        f"Samples asked for each class ({sampling_description(config.sample)}), "
        f"at guidance {', '.join(f'{s:g}' for s in scales)}",
    )
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
