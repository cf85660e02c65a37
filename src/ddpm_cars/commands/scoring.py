"""``ddpm-cars eval`` and ``ddpm-cars guidance``: numbers about a run's samples."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ddpm_cars import parallel
from ddpm_cars.config import DataConfig, Split
from ddpm_cars.data import build_dataset
from ddpm_cars.data.dataset import to_model_range, to_uint8
from ddpm_cars.denoiser import Denoiser
from ddpm_cars.errors import MissingFileError, UserError
from ddpm_cars.evaluation import bits_per_dim
from ddpm_cars.report import write_report
from ddpm_cars.run import Run
from ddpm_cars.samplers import sampling_description


@dataclass(frozen=True)
class EvalRequest:
    """``ddpm-cars eval``: score ``num_samples`` samples of the run ``checkpoint`` (or the
    folder ``images``) against ``data`` (default: the run's source) with the sample
    metrics, and with ``nll`` the likelihood bound on ``num_images`` held-out images."""

    checkpoint: Path | None = None
    images: Path | None = None
    num_samples: int = 1000
    sample_metrics: bool = True
    fid: bool = True
    inception_weights: Path | None = None
    memorization: bool = True
    cache_dir: Path | None = None
    nll: bool = False
    data: str | None = None
    split: Split | None = None  # default: train for the sample metrics, test for the likelihood
    image_size: int | None = None
    num_images: int = 256
    timesteps: int | None = None  # the likelihood's KL sum from this many random t (default: all T)
    batch_size: int = 64
    seed: int = 0
    ema: bool = True
    out: Path | None = None
    json: Path | None = None
    device: str = "auto"
    sampling: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.checkpoint is None) == (self.images is None):
            raise UserError("eval scores a run (--checkpoint) or a folder of images (--images): give one")
        if not self.sample_metrics and not self.nll:
            raise UserError("nothing to compute: --no-sample-metrics without --nll")
        if self.images is not None and self.nll:
            raise UserError("--nll needs --checkpoint: a folder of images has no likelihood")


def evaluate(request: EvalRequest) -> dict:
    """Score; write metrics.json and the pictures into ``out`` (RUN/eval by default) and the
    run's report. Returns the summary (empty on the ranks other than 0 under torchrun)."""
    world, device = parallel.init_from_env(parallel.resolve_device(request.device))
    opened = Run.open(request.checkpoint) if request.checkpoint is not None else None
    denoiser = opened.denoiser(ema=request.ema, device=device) if opened is not None else None
    summary: dict = {}
    if request.sample_metrics:
        summary = sample_scores(request, opened, denoiser, world, device)
    if not world.is_main:  # under torchrun, rank 0 reports
        return {}
    if request.nll:
        nll = likelihood(request, opened, denoiser)
        summary = {**summary, "nll": nll} if summary else nll
    if request.json is not None:
        request.json.parent.mkdir(parents=True, exist_ok=True)
        request.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"Wrote {request.json}")
    if opened is not None and request.out is None and request.sample_metrics:
        print(f"Report: {write_report(opened.dir)}")
    return summary


def _image_size(request: EvalRequest, data: DataConfig) -> int:
    """The resolution to score at: asked for, the run's, or that of the folder's first image."""
    from PIL import Image

    from ddpm_cars.data.folder import find_images

    if request.image_size is not None or request.images is None:
        return request.image_size or data.image_size
    if not request.images.is_dir():
        raise MissingFileError(f"--images {request.images} is not a folder")
    paths = find_images(request.images)
    if not paths:
        raise UserError(f"--images {request.images} holds no images")
    with Image.open(paths[0]) as first:
        return first.size[0]


def sample_scores(
    request: EvalRequest, opened: Run | None, denoiser: Denoiser | None, world: parallel.World, device: torch.device
) -> dict:
    """The sample metrics of the run's samples or of the folder; the summary written."""
    from ddpm_cars.data.folder import load_image_folder
    from ddpm_cars.evaluation import scores
    from ddpm_cars.evaluation.swd import pyramid_resolutions

    data = opened.config.data if opened is not None else DataConfig()
    size = _image_size(request, data)
    pyramid_resolutions(size)  # SWD's image sizes: say so before minutes of sampling
    data = dataclasses.replace(
        data, source=request.data or data.source, split=request.split or "train", image_size=size
    )
    if world.is_main:  # the reference and the Inception weights first: their errors come before minutes of sampling
        reference = scores.load_reference(data, request.num_samples if request.memorization else 0)
        fid = (None, "--no-fid") if not request.fid else scores.load_inception(request.inception_weights, device)
    if opened is not None:  # under torchrun every process samples its share; rank 0 scores
        config = opened.with_sampling(request.sampling).config
        images = parallel.generate_across_ranks(
            denoiser, request.num_samples, config.sample, world, seed=request.seed, batch_size=request.batch_size
        )
        if images is None:
            return {}
        samples = to_uint8(images)
        what = f"{request.num_samples} samples ({sampling_description(config.sample)}) of {opened.checkpoint}"
        summary: dict = {
            "checkpoint": str(opened.checkpoint),
            "sampler": config.sample.sampler,
            "steps": config.sample.steps,
            "seed": request.seed,
        }
    elif not world.is_main:  # a folder is scored by rank 0 alone
        return {}
    else:
        channels = str(reference.images.shape[1])  # the folder is compared with the reference, in its channels
        samples = load_image_folder(request.images, size, image_channels=channels).images
        what, summary = f"{samples.shape[0]} images of {request.images}", {"images": str(request.images)}
    out = request.out or (opened.dir / scores.EVAL_DIR if opened is not None else None)
    options = scores.ScoreOptions(
        inception=fid[0],
        fid_skipped=fid[1],
        seed=request.seed,
        memorization=request.memorization,
        cache_dir=request.cache_dir,
    )
    return scores.score_and_write(samples, reference, what=what, summary=summary, out=out, options=options)


def likelihood(request: EvalRequest, opened: Run, denoiser: Denoiser) -> dict:
    """Bits/dim of the run on (by default held-out) images of its data source."""
    from ddpm_cars.evaluation.scores import has_heldout

    config, split = opened.config, request.split or "test"
    data = dataclasses.replace(config.data, source=request.data or config.data.source, split=split)
    if data.source == "toy-cars":
        data = dataclasses.replace(data, toy_count=request.num_images)
    dataset = build_dataset(data)
    if dataset.image_size != config.data.image_size:
        raise UserError(f"the images are {dataset.image_size}px, the model was trained at {config.data.image_size}px")
    if split != "test" or not has_heldout(data):
        print(f"Note: evaluating on {data.source} ({split}), which may overlap the training images")
    images = to_model_range(dataset.images[: request.num_images]).to(denoiser.device)
    result = bits_per_dim(
        denoiser, images, config.sample, timesteps=request.timesteps, batch_size=request.batch_size, seed=request.seed
    )
    summary = {"checkpoint": str(opened.checkpoint), "data": data.source, "split": split, **result.summary()}
    how = "all T terms" if request.timesteps is None else f"{request.timesteps} random t per image"
    print(
        f"{opened.checkpoint}: {summary['bits_per_dim']:.4f} +- {summary['stderr']:.4f} bits/dim on "
        f"{summary['images']} {split} images ({how})"
    )
    print(
        f"  prior L_T {summary['prior']:.4f} | KL terms {summary['kl_terms']:.4f} | "
        f"decoder L_0 {summary['decoder']:.4f}"
    )
    return summary


@dataclass(frozen=True)
class GuidanceRequest:
    """``ddpm-cars guidance``: how often samples of the class-conditional run ``run`` show
    the class asked for at each guidance scale; results into ``out`` (RUN/guidance)."""

    run: Path
    scales: tuple[float, ...] = (0.0, 1.0, 3.0)
    per_class: int = 100
    classifier_steps: int = 500
    seed: int = 0
    batch_size: int = 64
    ema: bool = True
    out: Path | None = None
    device: str = "auto"
    sampling: dict[str, Any] = field(default_factory=dict)


def guidance(request: GuidanceRequest) -> dict:
    """Measure, print, write guidance.json and guidance.png; returns the summary."""
    from ddpm_cars.evaluation import guidance as measure

    trained = Run.open(request.run).with_sampling(request.sampling)
    out = request.out or trained.dir / "guidance"
    asked = measure.GuidanceRequest(
        request.scales,
        request.per_class,
        seed=request.seed,
        batch_size=request.batch_size,
        ema=request.ema,
        classifier_steps=request.classifier_steps,
    )
    summary = measure.guidance_accuracy(trained, asked, out, device=parallel.resolve_device(request.device))
    print(measure.format_guidance(summary))
    print(f"Wrote {out / measure.RESULT_FILE} and {out / measure.PICTURE_FILE}")
    if request.out is None:
        print(f"Report: {write_report(trained.dir)}")
    return summary
