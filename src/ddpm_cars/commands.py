"""What each ``ddpm-cars`` subcommand does once its arguments are parsed."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from ddpm_cars import image_edits, parallel
from ddpm_cars import run as ckpt
from ddpm_cars.conditioning import class_labels
from ddpm_cars.config import DEFAULT_GUIDANCE, DataConfig, DiffusionConfig, RunConfig
from ddpm_cars.data import build_dataset
from ddpm_cars.data.dataset import to_model_range
from ddpm_cars.diffusion import q_sample
from ddpm_cars.editing import strength_timesteps
from ddpm_cars.errors import MissingFileError, UserError
from ddpm_cars.evaluation import bits_per_dim
from ddpm_cars.generation import ClassRequest
from ddpm_cars.parallel import resolve_device
from ddpm_cars.presets import DEMO, preset
from ddpm_cars.report import write_report
from ddpm_cars.run import Run
from ddpm_cars.samplers import StepCallback, sampling_description
from ddpm_cars.schedule import build_schedule, visited_timesteps
from ddpm_cars.training import train as train_run
from ddpm_cars.viz import evenly_spaced_steps, save_rows, save_samples, save_strip

# What may change when a run is resumed: how long it goes on, how it reports, and how the
# same computation is carried out (precision, memory layout, compilation, micro-batches).
RESUMABLE = {
    "train": {
        "epochs",
        "max_steps",
        "sample_every_epochs",
        "checkpoint_every_steps",
        "log_every_steps",
        "grad_accum_steps",
        "precision",
        "channels_last",
        "activation_checkpointing",
        "compile",
        "eval_every_steps",
        "eval_samples",
        "log_with",
    },
    "data": {"cache"},
    "sample": None,
}


def _recipe(args: argparse.Namespace) -> RunConfig:
    """The recipe a new run starts from: ``--config FILE`` (its classes forgotten, to be
    read from the data again) or the preset."""
    if args.config is None:
        return preset(args.preset)
    return RunConfig.load(args.config).replace(model={"class_names": ()})


def _resume_config(run_dir: Path, overrides: dict[str, dict]) -> RunConfig:
    """The run's saved config; options that change what is trained must match it."""
    config_file = run_dir / ckpt.CONFIG_FILE
    if not config_file.is_file():
        raise MissingFileError(f"nothing to resume: {config_file} does not exist")
    saved = RunConfig.load(config_file)
    for section, values in overrides.items():
        allowed = RESUMABLE.get(section, set())
        for name, value in values.items():
            current = getattr(getattr(saved, section), name)
            if allowed is not None and name not in allowed and current != value:
                raise UserError(
                    f"cannot change {section}.{name} when resuming (the run has {current!r}); "
                    "start a new run with another --out"
                )
    return saved.replace(**overrides)


def train(args: argparse.Namespace) -> int:
    overrides = args.overrides
    if args.resume and args.config is not None:
        raise UserError("--resume continues the run in --out with its own config.json; --config starts a new run")
    config = _resume_config(args.out, overrides) if args.resume else _recipe(args).replace(**overrides)
    tic = time.perf_counter()
    result = train_run(
        config, args.out, resume=args.resume, device=args.device, inception_weights=args.inception_weights
    )
    if not parallel.current_world().is_main:
        return 0
    print(f"Trained to step {result.step} (last loss {result.last_loss:.4f}) in {time.perf_counter() - tic:.0f} s")
    print(f"Run directory: {result.run_dir}  (sample with: ddpm-cars sample --checkpoint {result.run_dir} --out DIR)")
    return 0


def denoising_frames(
    visited: list[int], count: int = 10
) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]], StepCallback]:
    """Lists of image 0's state x_t and predicted x_0 at ``count`` evenly spaced steps of
    the ``visited`` timesteps, and the sampler callback that fills them."""
    keep = {visited[i] for i in evenly_spaced_steps(len(visited), count)} if len(visited) > 1 else set(visited)
    states: list[tuple[str, torch.Tensor]] = []
    predictions: list[tuple[str, torch.Tensor]] = []

    def callback(step: int, x_t: torch.Tensor, x0_pred: torch.Tensor) -> None:
        if step in keep:
            states.append((f"t={step}", x_t[0].clamp(-1, 1).cpu()))
            predictions.append((f"t={step}", x0_pred[0].clamp(-1, 1).cpu()))

    return states, predictions, callback


GRID_ROW_PER_CLASS_UP_TO = 16  # images per class that still fit on one grid row


def sample_run(
    run: Path,
    out: Path,
    num: int,
    *,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "auto",
    sample_overrides: dict | None = None,
    ema: bool = True,
    trajectory: bool = False,
    grid_count: int | None = None,
    classes: list[str] | None = None,
    guidance: float = 1.0,
    edit: argparse.Namespace | None = None,
    note: str = "",
) -> torch.Tensor | None:
    """Generate from a run's checkpoint; write grid.png (of the first ``grid_count`` images,
    all by default), images/NNNN.png and denoising.png. With ``classes`` (names or indices)
    ``num`` images of each, guided by ``guidance``, one grid row per class; with ``edit`` (the
    sample command's ``--init-image``/``--mask`` options), variations or inpaintings of an
    image; ``note`` goes into the closing line after the sampler. Under torchrun the images
    are shared out over the processes and rank 0 writes them (the others return None)."""
    trained = Run.open(run, sample=sample_overrides)
    config = trained.config
    labels = class_labels(classes, config.model.class_names, num) if classes else None
    num = num if labels is None else len(labels)
    request = {} if edit is None else image_edits.edit_request(edit, config.data.crop, config.data.image_size)
    world, dev = parallel.init_from_env(resolve_device(device))
    schedule = build_schedule(config.diffusion)
    visited = visited_timesteps(schedule, config.sample)
    visited = strength_timesteps(visited, request.get("strength", 1.0), schedule.timesteps).tolist()
    frames, predictions, callback = denoising_frames(visited)
    images = parallel.generate_across_ranks(
        trained.denoiser(ema=ema, device=dev),
        num,
        config.sample,
        world,
        seed=seed,
        batch_size=batch_size,
        classes=None if labels is None else ClassRequest(labels, guidance),
        callback=callback,
        **request,
    )
    if images is None:  # not rank 0
        return None
    per_row = num // len(classes) if classes and num // len(classes) <= GRID_ROW_PER_CLASS_UP_TO else None
    save_samples(images, out, grid_count, per_row)
    if frames:  # none at strength 0, where nothing is denoised
        save_strip(frames, out / "denoising.png", f"Denoising image 0 ({trained.checkpoint.name})")
    if trajectory and frames:
        save_rows(
            [("x_t", frames), ("predicted x_0", predictions)],
            out / "trajectory.png",
            f"Image 0 along the way: {config.sample.sampler}, {len(visited)} steps ({trained.checkpoint.name})",
        )
    how = sampling_description(config.sample) + note
    if labels is not None:
        names = [config.model.class_names[i] for i in dict.fromkeys(labels.tolist())]
        how += f"; {num // len(classes)} each of {', '.join(names)}, guidance {guidance:g}"
    files = (
        "grid.png, images/"
        + (", denoising.png" if frames else "")
        + (", trajectory.png" if trajectory and frames else "")
    )
    if request:
        edit_how, edit_files = image_edits.write_inputs(out, request, edit)
        how, files = how + edit_how, files + edit_files
    print(f"Wrote {num} images ({how}) from {trained.checkpoint} to {out}/ ({files})")
    return images


def sample(args: argparse.Namespace) -> int:
    overrides = args.overrides.get("sample", {})
    if args.guidance is not None and not args.classes:
        raise UserError("--guidance steers towards a class: name one with --class (see: ddpm-cars classes RUN)")
    image_edits.check_edit_options(args, overrides.get("sampler"))
    run_config = Run.open(args.checkpoint).config
    overrides, note = image_edits.inpainting_overrides(
        args, overrides, run_config.sample, run_config.diffusion.timesteps
    )
    if args.interpolate is not None or args.interpolate_images is not None:
        return image_edits.interpolate(args)
    guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    sample_run(
        args.checkpoint,
        args.out,
        args.num,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        sample_overrides=overrides,
        ema=args.ema,
        trajectory=args.trajectory,
        classes=args.classes,
        guidance=guidance,
        edit=args if args.init_image is not None else None,
        note=note,
    )
    return 0


def classes(args: argparse.Namespace) -> int:
    trained = Run.open(args.run)
    names = trained.config.model.class_names
    if not names:
        raise UserError(f"{trained.dir} is not class-conditional: train with --class-conditional to ask for classes")
    width = len(str(len(names) - 1))
    for i, name in enumerate(names):
        print(f"{i:>{width}}  {name}")
    return 0


def run_likelihood(
    run: Path,
    data_source: str | None,
    split: str,
    num_images: int,
    *,
    timesteps: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "auto",
    ema: bool = True,
) -> dict:
    """Bits/dim of a run's checkpoint on (by default held-out) images of its data source."""
    from ddpm_cars.evaluation.scores import has_heldout

    trained = Run.open(run)
    config = trained.config
    data_cfg = dataclasses.replace(config.data, source=data_source or config.data.source, split=split)
    if data_cfg.source == "toy-cars":
        data_cfg = dataclasses.replace(data_cfg, toy_count=num_images)
    dataset = build_dataset(data_cfg)
    if dataset.image_size != config.data.image_size:
        raise UserError(f"the images are {dataset.image_size}px, the model was trained at {config.data.image_size}px")
    if split != "test" or not has_heldout(data_cfg):
        print(f"Note: evaluating on {data_cfg.source} ({split}), which may overlap the training images")
    denoiser = trained.denoiser(ema=ema, device=resolve_device(device))
    images = to_model_range(dataset.images[:num_images]).to(denoiser.device)
    result = bits_per_dim(denoiser, images, config.sample, timesteps=timesteps, batch_size=batch_size, seed=seed)
    summary = {"checkpoint": str(trained.checkpoint), "data": data_cfg.source, "split": split, **result.summary()}
    how = "all T terms" if timesteps is None else f"{timesteps} random t per image"
    print(
        f"{trained.checkpoint}: {summary['bits_per_dim']:.4f} +- {summary['stderr']:.4f} bits/dim on "
        f"{summary['images']} {split} images ({how})"
    )
    print(
        f"  prior L_T {summary['prior']:.4f} | KL terms {summary['kl_terms']:.4f} | decoder L_0 "
        f"{summary['decoder']:.4f}"
    )
    return summary


def sample_scores(args: argparse.Namespace) -> tuple[dict, Path | None]:
    """The sample metrics of ``--checkpoint`` or ``--images``; the summary and where it went."""
    from PIL import Image

    from ddpm_cars.data.folder import find_images, load_image_folder
    from ddpm_cars.evaluation import scores
    from ddpm_cars.evaluation.swd import pyramid_resolutions

    world, dev = parallel.init_from_env(resolve_device(args.device))
    if args.checkpoint is not None:
        opened = Run.open(args.checkpoint)
        run_dir, data = opened.dir, opened.config.data
    else:
        run_dir, data = None, DataConfig()
    size = args.image_size or data.image_size
    if args.images is not None and args.image_size is None:  # the folder's own size
        if not args.images.is_dir():
            raise MissingFileError(f"--images {args.images} is not a folder")
        paths = find_images(args.images)
        if not paths:
            raise UserError(f"--images {args.images} holds no images")
        with Image.open(paths[0]) as first:
            size = first.size[0]
    pyramid_resolutions(size)  # SWD's image sizes: say so before minutes of sampling
    data = dataclasses.replace(data, source=args.data or data.source, split=args.split or "train", image_size=size)
    if world.is_main:  # the reference and the Inception weights first: their errors come before minutes of sampling
        reference = scores.load_reference(data, args.num_samples if args.memorization else 0)
        inception, fid_skipped = (
            (None, "--no-fid") if not args.fid else scores.load_inception(args.inception_weights, dev)
        )
    if args.checkpoint is not None:  # under torchrun every process samples its share; rank 0 scores
        overrides = args.overrides.get("sample", {})
        samples, config, checkpoint = scores.checkpoint_samples(
            args.checkpoint, args.num_samples, args.seed, overrides, args.batch_size, dev, args.ema, world
        )
        if samples is None:
            return {}, None
        what = f"{args.num_samples} samples ({scores.sampling_description(config.sample)}) of {checkpoint}"
        summary: dict = {
            "checkpoint": str(checkpoint),
            "sampler": config.sample.sampler,
            "steps": config.sample.steps,
            "seed": args.seed,
        }
    else:
        samples = load_image_folder(args.images, size).images
        what = f"{samples.shape[0]} images of {args.images}"
        summary = {"images": str(args.images)}
    out = args.out or (run_dir / scores.EVAL_DIR if run_dir is not None else None)
    summary = scores.score_and_write(
        samples,
        reference,
        what=what,
        summary=summary,
        out=out,
        inception=inception,
        fid_skipped=fid_skipped,
        seed=args.seed,
        memorization=args.memorization,
        cache_dir=args.cache_dir,
    )
    return summary, run_dir


def evaluate(args: argparse.Namespace) -> int:
    if not args.sample_metrics and not args.nll:
        raise UserError("nothing to compute: --no-sample-metrics without --nll")
    if args.images is not None and args.nll:
        raise UserError("--nll needs --checkpoint: a folder of images has no likelihood")
    summary: dict = {}
    run_dir = None
    if args.sample_metrics:
        summary, run_dir = sample_scores(args)
    if not parallel.current_world().is_main:  # under torchrun, rank 0 reports
        return 0
    if args.nll:
        nll = run_likelihood(
            args.checkpoint,
            args.data,
            args.split or "test",
            args.num_images,
            timesteps=args.timesteps,
            batch_size=args.batch_size,
            seed=args.seed,
            device=args.device,
            ema=args.ema,
        )
        summary = {**summary, "nll": nll} if summary else nll
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"Wrote {args.json}")
    if run_dir is not None and args.out is None:
        print(f"Report: {write_report(run_dir)}")
    return 0


def guidance(args: argparse.Namespace) -> int:
    from ddpm_cars.evaluation.guidance import PICTURE_FILE, RESULT_FILE, format_guidance, guidance_accuracy

    run_dir = Run.open(args.run).dir
    out = args.out or run_dir / "guidance"
    summary = guidance_accuracy(
        args.run,
        args.scales,
        args.per_class,
        out,
        seed=args.seed,
        sample_overrides=args.overrides.get("sample", {}),
        batch_size=args.batch_size,
        device=resolve_device(args.device),
        ema=args.ema,
        classifier_steps=args.classifier_steps,
    )
    print(format_guidance(summary))
    print(f"Wrote {out / RESULT_FILE} and {out / PICTURE_FILE}")
    if args.out is None:
        print(f"Report: {write_report(run_dir)}")
    return 0


def report(args: argparse.Namespace) -> int:
    print(f"Wrote {write_report(args.run, args.out)}")
    return 0


def forward_picture(
    data: DataConfig, index: int, diffusion: DiffusionConfig, frames: int, seed: int, out: Path
) -> Path:
    """The forward process on one dataset image at ``frames`` evenly spaced t."""
    if index < 0:
        raise UserError(f"--index must be >= 0; got {index}")
    if data.source == "toy-cars":  # drawn in a moment: no cache entry for the first index + 1 cars
        data = DataConfig(source="toy-cars", image_size=data.image_size, toy_count=index + 1, cache="off")
    dataset = build_dataset(data)
    if index >= len(dataset):
        raise UserError(f"--index {index} is out of range: the dataset has {len(dataset)} images")
    x0 = dataset[index][0][None]  # [1, 3, S, S]
    schedule = build_schedule(diffusion)
    generator = torch.Generator().manual_seed(seed)
    strip = [("x_0 (data)", x0[0])]
    for step in evenly_spaced_steps(schedule.timesteps, frames):
        noise = torch.randn(x0.shape, generator=generator)
        x_t = q_sample(schedule, x0, torch.tensor([step]), noise)
        strip.append((f"t={step + 1}", x_t[0].clamp(-1, 1)))  # x_t in the paper's 1-indexed t
    out.parent.mkdir(parents=True, exist_ok=True)
    save_strip(strip, out, "Forward process q(x_t | x_0)")
    print(f"Wrote {out}")
    return out


def forward(args: argparse.Namespace) -> int:
    data = DataConfig(source=args.data, split=args.split, image_size=args.image_size, crop=args.crop)
    diffusion = DiffusionConfig(timesteps=args.timesteps, schedule=args.schedule)
    forward_picture(data, args.index, diffusion, args.frames, args.seed, args.out)
    return 0


DEMO_SAMPLES = 36  # the demo's final grid, 6 x 6
DEMO_EVAL_SAMPLES = 144  # scored by the offline metric and the memorisation check
DEMO_SAMPLE_BATCH = 36  # images per network call: on a CPU, 144 at once run at 2/3 of the speed (caches)


def demo(args: argparse.Namespace) -> int:
    from ddpm_cars.data.dataset import to_uint8
    from ddpm_cars.evaluation import scores

    config = DEMO if args.steps is None else DEMO.replace(train={"max_steps": args.steps})
    if args.log_with is not None:
        config = config.replace(train={"log_with": args.log_with})
    out = args.out
    tic = time.perf_counter()
    resume = ckpt.latest_checkpoint(out) is not None
    if resume:
        print(f"Continuing the demo run in {out}")
        config = _resume_config(
            out, {"train": {"max_steps": config.train.max_steps, "log_with": config.train.log_with}}
        )
    # with a tracker, the final grid goes to it too (the demo draws no grids while it trains)
    result = train_run(config, out, resume=resume, device=args.device, final_grid=config.train.log_with != "none")
    print(f"Trained {result.step} steps in {time.perf_counter() - tic:.0f} s; sampling...")
    images = sample_run(
        out, out, DEMO_EVAL_SAMPLES, batch_size=DEMO_SAMPLE_BATCH, device=args.device, grid_count=DEMO_SAMPLES
    )
    forward_picture(config.data, 0, config.diffusion, 10, 0, out / "forward_process.png")
    reference = scores.load_reference(config.data, DEMO_EVAL_SAMPLES, progress=False)
    inception, fid_skipped = scores.load_inception(None, resolve_device(args.device), download=False)
    what = f"{DEMO_EVAL_SAMPLES} samples ({scores.sampling_description(config.sample)})"
    summary = {
        "checkpoint": str(ckpt.latest_checkpoint(out)),
        "sampler": config.sample.sampler,
        "steps": config.sample.steps,
        "seed": 0,
    }
    scores.score_and_write(
        to_uint8(images),
        reference,
        what=what,
        summary=summary,
        out=out / scores.EVAL_DIR,
        inception=inception,
        fid_skipped=fid_skipped,
    )
    report = write_report(out)
    drawn = ["grid.png", "denoising.png", "forward_process.png", "loss.png", "metrics.png", "eval/", "samples/"]
    pictures = ", ".join(name for name in drawn if (out / name).exists())
    print(f"Demo finished in {time.perf_counter() - tic:.0f} s. Pictures in {out}/: {pictures}; open {report}")
    return 0


def bench(args: argparse.Namespace) -> int:
    from ddpm_cars.benchmarks.bench import format_table, report, run_benchmark

    rows = run_benchmark(
        args.presets,
        args.precisions,
        image_size=args.image_size,
        batch_size=args.batch_size,
        repeats=args.repeats,
        warmup=args.warmup,
        sample_steps=args.sample_steps,
        device=args.device,
        compile=args.compile,
        peak_tflops=args.peak_tflops,
        activation_checkpointing=args.activation_checkpointing,
        loop=args.loop,
        data=args.data,
    )
    print(format_table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report(rows, ["ddpm-cars", *args.argv]), indent=2) + "\n")
        print(f"Wrote {args.json}")
    return 0


def export(args: argparse.Namespace) -> int:
    from ddpm_cars.export import export_run

    out = export_run(args.run, args.out, ema=args.ema)
    print(
        f"Wrote {out}: load it with diffusers.DDPMPipeline.from_pretrained({str(out)!r}); model card "
        f"{out / 'README.md'}"
    )
    return 0


def import_run(args: argparse.Namespace) -> int:
    from ddpm_cars.export import import_pipeline

    out = import_pipeline(args.folder, args.out)
    print(f"Imported {args.folder} as the run {out} (sample with: ddpm-cars sample --checkpoint {out} --out DIR)")
    return 0
