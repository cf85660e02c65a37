"""``ddpm-cars train`` and ``ddpm-cars demo``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddpm_cars import parallel
from ddpm_cars import run as ckpt
from ddpm_cars.commands.figures import ForwardRequest, forward
from ddpm_cars.commands.sampling import SampleRequest, sample
from ddpm_cars.config import RunConfig, Tracking
from ddpm_cars.errors import MissingFileError, UserError
from ddpm_cars.presets import DEFAULT_PRESET, DEMO, PRESETS, preset
from ddpm_cars.report import write_report
from ddpm_cars.samplers import sampling_description
from ddpm_cars.training import TrainResult
from ddpm_cars.training import train as train_run


@dataclass(frozen=True)
class TrainRequest:
    """``ddpm-cars train``: a new run in ``out`` from the recipe ``preset`` (or the saved
    recipe ``config``, e.g. another run's config.json), or with ``resume`` the run there
    continued; ``overrides`` change single fields (``{"train": {"lr": 1e-4}}``)."""

    out: Path
    preset: str = DEFAULT_PRESET
    config: Path | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    resume: bool = False
    inception_weights: Path | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.resume and self.config is not None:
            raise UserError("--resume continues the run in --out with its own config.json; --config starts a new run")
        if self.preset not in PRESETS:
            raise UserError(f"unknown preset {self.preset!r}; choose from {', '.join(sorted(PRESETS))}")

    def recipe(self) -> RunConfig:
        """The config to train: the run's own when resuming (only its resumable fields may be
        overridden), else the saved recipe (its classes and channel count forgotten, to be
        read from the data again) or the preset, with the overrides."""
        if self.resume:
            if (self.out / ckpt.DISTILL_FILE).is_file():
                raise UserError(
                    f"{self.out} is a distilled student; continue it with ddpm-cars distill --resume --out {self.out}"
                )
            return saved_config(self.out).resumed_with(self.overrides)
        start = preset(self.preset) if self.config is None else RunConfig.load(self.config)
        if self.config is not None:
            start = start.replace(model={"class_names": ()}, data={"image_channels": "auto"})
        return start.replace(**self.overrides)


def saved_config(run_dir: Path) -> RunConfig:
    """The config a run in ``run_dir`` was trained with; a one-line error when there is none."""
    config_file = run_dir / ckpt.CONFIG_FILE
    if not config_file.is_file():
        raise MissingFileError(f"nothing to resume: {config_file} does not exist")
    return RunConfig.load(config_file, saved_run=True)


def train(request: TrainRequest) -> TrainResult | None:
    """Train (or resume) the run; on rank 0 say where it went and return the result."""
    config = request.recipe()
    tic = time.perf_counter()
    result = train_run(
        config, request.out, resume=request.resume, device=request.device, inception_weights=request.inception_weights
    )
    if not parallel.current_world().is_main:
        return None
    print(f"Trained to step {result.step} (last loss {result.last_loss:.4f}) in {time.perf_counter() - tic:.0f} s")
    print(f"Run directory: {result.run_dir}  (sample with: ddpm-cars sample --checkpoint {result.run_dir} --out DIR)")
    return result


DEMO_SAMPLES = 36  # the demo's final grid, 6 x 6
DEMO_EVAL_SAMPLES = 144  # scored by the offline metric and the memorisation check
DEMO_SAMPLE_BATCH = 36  # images per network call: on a CPU, 144 at once run at 2/3 of the speed (caches)


@dataclass(frozen=True)
class DemoRequest:
    """``ddpm-cars demo``: train the demo preset into ``out`` (``steps`` optimizer steps, or
    its own 300), sample, score and draw every figure."""

    out: Path = Path("runs/demo")
    steps: int | None = None
    log_with: Tracking | None = None
    device: str = "auto"


def demo(request: DemoRequest) -> Path:
    """Train, sample, score and draw; returns the report's path."""
    from ddpm_cars.data.dataset import to_uint8
    from ddpm_cars.evaluation import scores

    out, tic = request.out, time.perf_counter()
    resume = ckpt.latest_checkpoint(out) is not None
    config = _demo_config(request, resume)
    # with a tracker, the final grid goes to it too (the demo draws no grids while it trains)
    result = train_run(config, out, resume=resume, device=request.device, final_grid=config.train.log_with != "none")
    print(f"Trained {result.step} steps in {time.perf_counter() - tic:.0f} s; sampling...")
    images = sample(
        SampleRequest(
            out, out, DEMO_EVAL_SAMPLES, batch_size=DEMO_SAMPLE_BATCH, grid=DEMO_SAMPLES, device=request.device
        )
    )
    forward(ForwardRequest(out=out / "forward_process.png", data=config.data, diffusion=config.diffusion))
    reference = scores.load_reference(config.data, DEMO_EVAL_SAMPLES, progress=False)
    inception, fid_skipped = scores.load_inception(None, parallel.resolve_device(request.device), download=False)
    what = f"{DEMO_EVAL_SAMPLES} samples ({sampling_description(config.sample)})"
    summary = {
        "checkpoint": str(ckpt.latest_checkpoint(out)),
        "sampler": config.sample.sampler,
        "steps": config.sample.steps,
        "seed": 0,
    }
    options = scores.ScoreOptions(inception=inception, fid_skipped=fid_skipped)
    scores.score_and_write(
        to_uint8(images), reference, what=what, summary=summary, out=out / scores.EVAL_DIR, options=options
    )
    report = write_report(out)
    drawn = ["grid.png", "denoising.png", "forward_process.png", "loss.png", "metrics.png", "eval/", "samples/"]
    pictures = ", ".join(name for name in drawn if (out / name).exists())
    print(f"Demo finished in {time.perf_counter() - tic:.0f} s. Pictures in {out}/: {pictures}; open {report}")
    return report


def _demo_config(request: DemoRequest, resume: bool) -> RunConfig:
    """The demo preset with the request's steps and tracker; with ``resume``, the run in
    ``out``'s own config with them."""
    config = DEMO if request.steps is None else DEMO.replace(train={"max_steps": request.steps})
    if request.log_with is not None:
        config = config.replace(train={"log_with": request.log_with})
    if not resume:
        return config
    print(f"Continuing the demo run in {request.out}")
    kept = {"train": {"max_steps": config.train.max_steps, "log_with": config.train.log_with}}
    return saved_config(request.out).resumed_with(kept)
