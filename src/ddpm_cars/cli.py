"""The command line: ``ddpm-cars train | sample | classes | eval | guidance | report | forward | demo | bench``.

The options of a run (``train``) and of sampling (``sample``, ``eval``, ``guidance``) are the
fields of the config dataclasses: their flags, types, choices, limits and help come from
:mod:`ddpm_cars.config`. Each subcommand names its function in :mod:`ddpm_cars.commands`,
imported only once the arguments are good (so ``--help`` never loads torch).
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from ddpm_cars.config import (
    DEFAULT_GUIDANCE,
    RESAMPLE_EVERY,
    Crop,
    DataConfig,
    DiffusionConfig,
    DistillConfig,
    RunConfig,
    Schedule,
    Split,
)
from ddpm_cars.errors import (
    EXIT_BAD_INPUT,
    EXIT_DIVERGED,
    EXIT_FAILURE,
    EXIT_OK,
    RunDiverged,
    UserError,
    is_environment_failure,
)
from ddpm_cars.presets import DEFAULT_PRESET, PRESETS, SEED
from ddpm_cars.validation import NON_NEGATIVE, POSITIVE, Limits, describe, field_types, is_optional, problem

PROG = "ddpm-cars"
EXIT_CODES = """\
exit codes (RELIABILITY.md):
  0    done
  1    an environment failure (a full disk, a permission: one line) or a bug (its traceback)
  2    bad input: an option, a path, a config, a data folder (one line)
  3    a training run diverged (one line naming the checkpoint to resume from and what to try)
  130  interrupted by SIGINT (Ctrl-C), 143 by SIGTERM, after saving a checkpoint when training"""


class Switch(argparse.BooleanOptionalAction):
    """``--name`` / ``--no-name``, with its help as written: every help here states its default,
    which argparse before Python 3.11 appended a second time."""

    def __init__(self, *args: Any, help: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, help=help, **kwargs)
        self.help = help


def _default(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _convert(text: str, kind: Any) -> Any:
    """``text`` as a value of the annotation ``kind``: "none" for None (or an empty tuple),
    commas between the items of a tuple. Raises ValueError when it is none of that."""
    if is_optional(kind):
        if text.strip().lower() == "none":
            return None
        kind = next(a for a in get_args(kind) if a is not type(None))
    if get_origin(kind) is tuple:
        if text.strip().lower() in ("", "none"):
            return ()
        return tuple(_convert(part, get_args(kind)[0]) for part in text.split(","))
    return kind(text)


def value_type(kind: Any, limits: Limits | None = None) -> Callable[[str], Any]:
    """An argparse ``type``: the text as a value of the annotation ``kind``, checked against
    ``limits`` by the rules the config dataclasses check their fields with."""

    def parse(text: str) -> Any:
        try:
            value = _convert(text, kind)
        except ValueError:
            expected = describe(kind, none="none").replace("a list of ", "comma-separated ")
            raise argparse.ArgumentTypeError(f"must be {expected}; got {text!r}") from None
        wrong = problem(value, kind, limits)
        if wrong:
            raise argparse.ArgumentTypeError(f"{wrong}; got {text!r}")
        return value

    return parse


def field_type(config: type, name: str) -> Callable[[str], Any]:
    """The argparse ``type`` of the field ``name`` of the config dataclass ``config``."""
    limits = next(f for f in dataclasses.fields(config) if f.name == name).metadata["limits"]
    return value_type(field_types(config)[name], limits)


def config_options(shown: RunConfig, sampling: bool) -> Iterator[tuple[str, str, dataclasses.Field, Any]]:
    """``(flag, section, field, value in shown)`` of each config field that is a flag of
    ``train`` or, with ``sampling``, of ``sample``, ``eval`` and ``guidance``."""
    for section in dataclasses.fields(shown):
        values = getattr(shown, section.name)
        for field in dataclasses.fields(values):
            meta = field.metadata
            if not meta["cli"] or (sampling and (section.name != "sample" or meta["train_only"])):
                continue
            flag = (sampling and meta["sampling_flag"]) or meta["flag"] or "--" + field.name.replace("_", "-")
            yield flag, section.name, field, getattr(values, field.name)


def _add_config_options(parser: argparse.ArgumentParser, shown: RunConfig, note: str, sampling: bool = False) -> None:
    """The config fields as flags, each defaulting to the config's value (as shown in ``shown``)."""
    for flag, section, field, value in config_options(shown, sampling):
        kind = field_types(type(getattr(shown, section)))[field.name]
        if kind is bool or kind == bool | None:  # an unset bool | None keeps its default, None
            kwargs: dict[str, Any] = {"action": Switch}
        elif get_origin(kind) is Literal:
            kwargs = {"choices": get_args(kind)}
        else:
            kwargs = {"metavar": field.metadata["metavar"] or flag.lstrip("-").replace("-", "_").upper()}
            if kind is not str:
                kwargs["type"] = value_type(kind, field.metadata["limits"])
        help = f"{field.metadata['help']} (default: {_default(value)}{note})"
        parser.add_argument(flag, dest=f"{section}.{field.name}", default=argparse.SUPPRESS, help=help, **kwargs)


def config_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``{section: {field: value}}`` of the config options given on the command line.
    ``--epochs`` without ``--steps`` also clears the step count a preset may set, so that
    the epochs asked for are trained."""
    sections: dict[str, dict[str, Any]] = {}
    for dest, value in vars(args).items():
        section, dot, name = dest.partition(".")
        if dot:
            sections.setdefault(section, {})[name] = value
    train = sections.get("train", {})
    if "epochs" in train:
        train.setdefault("max_steps", None)
    return sections


def _command(name: str, request: Callable[[argparse.Namespace], Any]) -> Callable[[argparse.Namespace], int]:
    """``ddpm_cars.commands.<name>`` called with the typed request ``request(args)`` builds,
    imported when it runs: torch loads only once the arguments are good."""

    def run(args: argparse.Namespace) -> int:
        from ddpm_cars import commands, parallel

        getattr(commands, name)(request(args))
        parallel.leave()  # under torchrun, every process finishes before any exits
        return EXIT_OK

    return run


def _fields(kind: type, args: argparse.Namespace, **given: Any) -> Any:
    """``kind(...)``, a request dataclass, from the parsed options of its fields' names and ``given``."""
    names = {f.name for f in dataclasses.fields(kind)} - set(given)
    return kind(**{name: getattr(args, name) for name in names if hasattr(args, name)}, **given)


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return config_overrides(args).get("sample", {})


def _train_request(args: argparse.Namespace) -> Any:
    from ddpm_cars.commands import TrainRequest

    return _fields(TrainRequest, args, overrides=config_overrides(args))


def _sample_request(args: argparse.Namespace) -> Any:
    from ddpm_cars.commands import ImageEdit, Interpolation, SampleRequest

    if args.init_image is None and (args.mask is not None or args.strength is not None):
        flag = "--mask" if args.mask is not None else "--strength"
        raise UserError(f"{flag} needs --init-image, the image it applies to")
    edit = None
    if args.init_image is not None:
        edit = ImageEdit(args.init_image, args.strength, args.mask, args.resample_jumps, args.resample_every)
    elif args.resample_jumps or args.resample_every != RESAMPLE_EVERY:
        raise UserError("--resample-jumps/--resample-every are RePaint's resampling: they need --mask")
    ends = None
    if args.interpolate is not None or args.interpolate_images is not None:
        seeds, images = args.interpolate, args.interpolate_images
        ends = Interpolation(seeds and tuple(seeds), images and tuple(images), args.frames)
    return _fields(
        SampleRequest, args, classes=tuple(args.classes or ()), edit=edit, interpolation=ends, sampling=_sampling(args)
    )


def _forward_request(args: argparse.Namespace) -> Any:
    from ddpm_cars.commands import ForwardRequest

    data = DataConfig(source=args.data, split=args.split, image_size=args.image_size, crop=args.crop)
    diffusion = DiffusionConfig(timesteps=args.timesteps, schedule=args.schedule)
    return _fields(ForwardRequest, args, data=data, diffusion=diffusion)


def _bench_request(args: argparse.Namespace) -> Any:
    from ddpm_cars.benchmarks.bench import BenchSettings
    from ddpm_cars.commands import BenchRequest

    return BenchRequest(_fields(BenchSettings, args), json=args.json, command_line=tuple(args.argv))


def _plain(kind: str, sampling: bool = False) -> Callable[[argparse.Namespace], Any]:
    """The request ``ddpm_cars.commands.<kind>`` from the options of the same names (and the sampling options)."""

    def build(args: argparse.Namespace) -> Any:
        from ddpm_cars import commands

        return _fields(getattr(commands, kind), args, **({"sampling": _sampling(args)} if sampling else {}))

    return build


def _device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (default: auto)"
    )


def _ema_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ema", default=True, action=Switch, help="use the moving-average weights when the run kept them (default: on)"
    )


def _sampling_options(parser: argparse.ArgumentParser) -> None:
    _device_option(parser)
    _add_config_options(parser, SEED, " unless the run says otherwise", sampling=True)


def _train_parser(sub: Any) -> None:
    train = sub.add_parser(
        "train", help="train a model", description="Train a DDPM; checkpoints, samples and loss go to --out."
    )
    train.set_defaults(func=_command("train", _train_request))
    train.add_argument("--out", required=True, type=Path, metavar="RUN_DIR", help="run directory (required)")
    recipe = train.add_mutually_exclusive_group()
    recipe.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        choices=sorted(PRESETS),
        help=f"recipe the options below modify (default: {DEFAULT_PRESET})",
    )
    recipe.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="CONFIG_JSON",
        help=(
            "start from a saved recipe instead, e.g. another run's config.json; the options below still override "
            "single fields (default: the preset)"
        ),
    )
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    train.add_argument(
        "--inception-weights",
        type=Path,
        default=None,
        metavar="PATH",
        help="Inception weights for FID during training (default: torch's hub cache, when the file is there)",
    )
    _device_option(train)
    # an option not given keeps the preset's (or, with --resume, the run's) value
    _add_config_options(train, PRESETS[DEFAULT_PRESET], f" in the {DEFAULT_PRESET} preset")


SAMPLER_ADVICE = (  # four lines below the heading, as printed
    "Picking a sampler (SWD x1e3 and the judge's FD, lower is better, on toy-car models; "
    "docs/benchmarks/samplers_eps.md, samplers_v.md, recipe.md):\n"
    "  eps models (improved preset, 3,000 steps): dpm++sde --steps 20 --spacing karras, the default, "
    "38.3 against 37.4 for 1,000 steps;\n"
    "  ddpm --spacing uniform --steps 20 43.2, 35 35.3; ddim, dpm++, heun without churn keep noise at any steps "
    "(72-119); heun --churn 20 --spacing karras --steps 25 35.5, 50 20.4.\n"
    "  v models (3,000 steps): dpm++sde as above 22.5 against 23.0 for 1,000 steps "
    "(bf16 model, the groups recorded for both); "
    "fp32 model: dpm++ --steps 10 --spacing karras 21.0, heun --churn 20 --steps 10 --spacing karras (19 calls) 18.8.\n"
    "  demo preset (v, Min-SNR 5, 300 steps; 3 trainings): dpm++sde --steps 20 --spacing karras, the default, "
    "SWD 81.6, FD 4.68; on other images, ddim --steps 20 68.7/6.70, dpm++ 77.9/5.43, heun --steps 10 88.5/4.68, "
    "ddpm 153.4/22.7."
)


def _sample_parser(sub: Any) -> None:
    sample = sub.add_parser(
        "sample",
        help="generate images from a trained run",
        description="Generate images from pure noise.",
        epilog=SAMPLER_ADVICE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sample.set_defaults(func=_command("sample", _sample_request))
    _sample_run_and_output_options(sample)
    _sample_class_options(sample)
    _own_image_options(sample)
    _sampling_options(sample)


def _sample_run_and_output_options(sample: argparse.ArgumentParser) -> None:
    sample.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        metavar="RUN",
        help="run directory (latest checkpoint) or a checkpoint directory (required)",
    )
    sample.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="output directory for grid.png, images/ and denoising.png (required)",
    )
    # --num-images first: torchrun's own parser refuses a bare --num as an abbreviation of its --numa-binding
    sample.add_argument(
        "--num-images",
        "--num",
        dest="num",
        type=value_type(int, POSITIVE),
        default=64,
        help="number of images, per class with --class (default: 64)",
    )
    sample.add_argument("--seed", type=int, default=0, help="image i depends only on (seed, i) (default: 0)")
    sample.add_argument(
        "--batch-size", type=value_type(int, POSITIVE), default=64, help="images denoised at once (default: 64)"
    )
    sample.add_argument(
        "--trajectory",
        action="store_true",
        help="also draw trajectory.png: image 0's x_t and predicted x_0 along the way (default: off)",
    )
    _ema_option(sample)


def _sample_class_options(sample: argparse.ArgumentParser) -> None:
    sample.add_argument(
        "--class",
        dest="classes",
        action="append",
        default=None,
        metavar="NAME",
        help=(
            "draw --num images of this class: its name (any case) or index; repeat for several, one grid row each "
            "(class-conditional runs; list them with `ddpm-cars classes RUN`; default: unconditional)"
        ),
    )
    sample.add_argument(
        "--guidance",
        type=value_type(float, NON_NEGATIVE),
        default=None,
        metavar="SCALE",
        help=(
            "classifier-free guidance with --class: 0 unconditional, 1 conditional, more for stronger class likeness "
            f"(default: {DEFAULT_GUIDANCE:g})"
        ),
    )


def _own_image_options(sample: argparse.ArgumentParser) -> None:
    own = sample.add_argument_group(
        "variations, inpainting and interpolation", "Use the model on an image of your own, or between two seeds."
    )
    _variation_and_inpainting_options(own)
    _interpolation_options(own)


def _variation_and_inpainting_options(own: argparse._ArgumentGroup) -> None:
    own.add_argument(
        "--init-image",
        type=Path,
        metavar="IMG",
        help=(
            "draw --num variations of this image (SDEdit): it is cropped and resized like the run's training images, "
            "noised to step strength x T and denoised (default: none)"
        ),
    )
    own.add_argument(
        "--strength",
        type=value_type(float, Limits(low=0, high=1)),
        default=None,
        metavar="S",
        help="how far --init-image is noised, in [0, 1]: 0 returns it, 1 ignores it (default: 0.5; 1 with --mask)",
    )
    own.add_argument(
        "--mask",
        type=Path,
        metavar="MASK",
        help=(
            "with --init-image: redraw its pixels where this image (of the same size) is white, keep the rest "
            "(RePaint; needs --sampler ddpm or ddim, ancestral on 50 steps if the run samples with a multistep "
            "solver) (default: none)"
        ),
    )
    own.add_argument(
        "--resample-jumps",
        type=value_type(int, NON_NEGATIVE),
        default=0,
        metavar="J",
        help=(
            "with --mask: after every --resample-every steps, go back up that many steps and down again, J times, so "
            "the fill agrees with the kept pixels (RePaint's resampling; costs about J+1 times the steps) (default: "
            "0, off)"
        ),
    )
    own.add_argument(
        "--resample-every",
        type=value_type(int, POSITIVE),
        default=RESAMPLE_EVERY,
        metavar="R",
        help="steps between RePaint's jumps back, and their length (default: 10)",
    )


def _interpolation_options(own: argparse._ArgumentGroup) -> None:
    ends = own.add_mutually_exclusive_group()
    ends.add_argument(
        "--interpolate",
        type=int,
        nargs=2,
        metavar=("SEED_A", "SEED_B"),
        help=(
            "draw --frames images along the sphere between image 0 of two seeds' starting noise, decoded "
            "deterministically (DDIM with eta 0 unless --sampler names another deterministic one): interpolation.png, "
            "interpolation.gif (default: off)"
        ),
    )
    ends.add_argument(
        "--interpolate-images",
        type=Path,
        nargs=2,
        metavar=("IMG_A", "IMG_B"),
        help="the same between two images, each first inverted to its x_T with DDIM (default: off)",
    )
    own.add_argument(
        "--frames",
        type=value_type(int, Limits(low=2)),
        default=9,
        metavar="N",
        help="frames of an interpolation, both ends included (default: 9)",
    )


def _forward_parser(sub: Any) -> None:
    forward = sub.add_parser(
        "forward", help="picture the forward (noising) process", description="One image at about ten evenly spaced t."
    )
    forward.set_defaults(func=_command("forward", _forward_request))
    forward.add_argument(
        "--data",
        default="toy-cars",
        metavar="SOURCE",
        help="toy-cars, stanford-cars or an image folder (default: toy-cars)",
    )
    forward.add_argument(
        "--split", default="train", choices=get_args(Split), help="Stanford Cars split (default: train)"
    )
    forward.add_argument(
        "--out", type=Path, default=Path("forward_process.png"), help="PNG to write (default: forward_process.png)"
    )
    forward.add_argument("--index", type=int, default=0, help="which image of the dataset (default: 0)")
    forward.add_argument(
        "--image-size",
        type=field_type(DataConfig, "image_size"),
        default=SEED.data.image_size,
        help=f"pixels (default: {SEED.data.image_size})",
    )
    forward.add_argument(
        "--crop",
        default="none",
        choices=get_args(Crop),
        help=(
            "none: squash to a square; center: the centre square; bbox: around the annotated car, Stanford Cars "
            "(default: none)"
        ),
    )
    forward.add_argument(
        "--timesteps",
        type=field_type(DiffusionConfig, "timesteps"),
        default=SEED.diffusion.timesteps,
        help=f"diffusion steps T (default: {SEED.diffusion.timesteps})",
    )
    forward.add_argument(
        "--schedule",
        default=SEED.diffusion.schedule,
        choices=get_args(Schedule),
        help=f"noise schedule (default: {SEED.diffusion.schedule})",
    )
    forward.add_argument(
        "--frames", type=value_type(int, POSITIVE), default=10, help="pictures in the strip (default: 10)"
    )
    forward.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")


def _eval_parser(sub: Any) -> None:
    evaluate = sub.add_parser(
        "eval",
        help="score a run's samples (SWD, precision/recall, FID, KID, memorisation) or a folder of images",
        description="Score generated images against a dataset: the sliced Wasserstein distance on Laplacian-pyramid "
        "patches and precision/recall on pixels (always), FID, KID and Inception precision/recall (when the Inception "
        "weights are available), and the nearest training image of each sample. Results go to RUN/eval/ and the "
        "run's report.html. --nll adds the likelihood bound on held-out images.",
    )
    evaluate.set_defaults(func=_command("evaluate", _plain("EvalRequest", sampling=True)))
    _eval_source_options(evaluate)
    _eval_sample_metric_options(evaluate)
    _eval_likelihood_options(evaluate)
    _eval_run_and_output_options(evaluate)
    _sampling_options(evaluate)


def _eval_source_options(evaluate: argparse.ArgumentParser) -> None:
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint",
        type=Path,
        metavar="RUN",
        help=(
            "run directory (latest checkpoint) or a checkpoint directory: samples are generated from it (required, or "
            "--images)"
        ),
    )
    source.add_argument(
        "--images",
        type=Path,
        metavar="DIR",
        help=(
            "a folder of generated images to score instead (required, or --checkpoint; the reference is --data, "
            "default toy-cars)"
        ),
    )


def _eval_sample_metric_options(evaluate: argparse.ArgumentParser) -> None:
    evaluate.add_argument(
        "--num-samples",
        type=value_type(int, POSITIVE),
        default=1000,
        help="samples generated and scored (default: 1000)",
    )
    evaluate.add_argument(
        "--sample-metrics",
        default=True,
        action=Switch,
        help="compute the sample metrics (default: on; --no-sample-metrics with --nll gives the likelihood alone)",
    )
    evaluate.add_argument(
        "--fid",
        default=True,
        action=Switch,
        help="FID and KID when the Inception weights are available or downloadable (default: on)",
    )
    evaluate.add_argument(
        "--inception-weights",
        type=Path,
        default=None,
        metavar="PATH",
        help="the Inception weights file (default: torch's hub cache, downloaded there when online)",
    )
    evaluate.add_argument(
        "--memorization",
        default=True,
        action=Switch,
        help="nearest training image of each sample, against held-out real images (default: on)",
    )
    evaluate.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="where reference features are cached (default: $DDPM_CARS_CACHE or ~/.cache/ddpm-cars)",
    )


def _eval_likelihood_options(evaluate: argparse.ArgumentParser) -> None:
    # --data, --split and --image-size pick the reference images of the sample metrics too
    evaluate.add_argument(
        "--nll",
        action="store_true",
        help="also the negative log-likelihood bound in bits/dim on held-out images (default: off)",
    )
    evaluate.add_argument(
        "--data",
        default=None,
        metavar="SOURCE",
        help="reference images: toy-cars, stanford-cars or a folder (default: the run's data source)",
    )
    evaluate.add_argument(
        "--split",
        default=None,
        choices=get_args(Split),
        help="split of --data (default: train for the sample metrics, as FID is reported; test for --nll)",
    )
    evaluate.add_argument(
        "--image-size",
        type=value_type(int, POSITIVE),
        default=None,
        help="resolution with --images (default: the run's, or the images' own)",
    )
    evaluate.add_argument(
        "--num-images", type=value_type(int, POSITIVE), default=256, help="held-out images for --nll (default: 256)"
    )
    evaluate.add_argument(
        "--timesteps",
        type=value_type(int, POSITIVE),
        default=None,
        metavar="K",
        help="--nll: estimate the KL sum from K random t per image instead of all T terms (default: all, exact)",
    )


def _eval_run_and_output_options(evaluate: argparse.ArgumentParser) -> None:
    evaluate.add_argument(
        "--batch-size", type=value_type(int, POSITIVE), default=64, help="images per network call (default: 64)"
    )
    evaluate.add_argument(
        "--seed", type=int, default=0, help="seed of the samples, subsets and projections (default: 0)"
    )
    _ema_option(evaluate)
    evaluate.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="where metrics.json and the pictures go (default: RUN/eval with --checkpoint, none with --images)",
    )
    evaluate.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write the numbers to this JSON file (default: none)",
    )


def _guidance_parser(sub: Any) -> None:
    guidance = sub.add_parser(
        "guidance",
        help="measure classifier-free guidance: how often samples show the class asked for",
        description="Draw samples of every class of a class-conditional run at each guidance scale and judge them with "
        "a small classifier trained on the run's real images: the share classified as the class asked for, overall and "
        "per class, into guidance.json, and guidance.png with one row per class.",
    )
    guidance.set_defaults(func=_command("guidance", _plain("GuidanceRequest", sampling=True)))
    guidance.add_argument(
        "run", type=Path, metavar="RUN", help="class-conditional run directory or checkpoint directory (required)"
    )
    guidance.add_argument(
        "--scales",
        type=value_type(tuple[float, ...], Limits(low=0, min_items=1)),
        default=(0.0, 1.0, 3.0),
        metavar="S1,S2,...",
        help="guidance scales to compare (default: 0,1,3)",
    )
    guidance.add_argument(
        "--per-class",
        type=value_type(int, POSITIVE),
        default=100,
        metavar="N",
        help="samples of each class at each scale (default: 100)",
    )
    guidance.add_argument(
        "--classifier-steps",
        type=value_type(int, POSITIVE),
        default=500,
        metavar="STEPS",
        help="training steps of the judging classifier (default: 500)",
    )
    guidance.add_argument("--seed", type=int, default=0, help="seed of the samples and the classifier (default: 0)")
    guidance.add_argument(
        "--batch-size", type=value_type(int, POSITIVE), default=64, help="images denoised at once (default: 64)"
    )
    _ema_option(guidance)
    guidance.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="where guidance.json and guidance.png go (default: RUN/guidance)",
    )
    _sampling_options(guidance)


def _classes_parser(sub: Any) -> None:
    classes = sub.add_parser(
        "classes",
        help="list the classes a class-conditional run can draw",
        description="Print the index and name of each class of a class-conditional run, for `sample --class`.",
    )
    classes.set_defaults(func=_command("classes", _plain("ClassesRequest")))
    classes.add_argument("run", type=Path, metavar="RUN", help="run directory or checkpoint directory (required)")


def _report_and_demo_parsers(sub: Any) -> None:
    report = sub.add_parser(
        "report",
        help="write a run's report.html",
        description=(
            "Write RUN/report.html: one self-contained page with the config, samples, denoising strip, curves, "
            "metrics and memorisation check."
        ),
    )
    report.set_defaults(func=_command("report", _plain("ReportRequest")))
    report.add_argument("run", type=Path, metavar="RUN", help="run directory (required)")
    report.add_argument(
        "--out", type=Path, default=None, metavar="FILE", help="HTML file to write (default: RUN/report.html)"
    )

    demo = sub.add_parser(
        "demo",
        help="train a small model on toy cars and draw every figure",
        description="Train, sample and draw all figures into --out, in minutes on a CPU.",
    )
    demo.set_defaults(func=_command("demo", _plain("DemoRequest")))
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory (default: runs/demo)")
    demo.add_argument(
        "--steps",
        type=value_type(int, POSITIVE),
        default=None,
        help=f"optimizer steps (default: the demo preset's {PRESETS['demo'].train.max_steps})",
    )
    demo.add_argument(
        "--log-with",
        choices=["none", "tensorboard", "wandb"],
        default=None,
        help="also log the training to TensorBoard (RUN/tensorboard) or Weights & Biases (default: none)",
    )
    _device_option(demo)


def _exchange_parsers(sub: Any) -> None:
    export = sub.add_parser(
        "export",
        help="write a run as a diffusers DDPMPipeline folder",
        description="Write a run's network and "
        "schedule as a folder that diffusers.DDPMPipeline.from_pretrained loads, with a model card (README.md).",
    )
    export.set_defaults(func=_command("export", _plain("ExportRequest")))
    export.add_argument(
        "run", type=Path, metavar="RUN", help="run directory (latest checkpoint) or a checkpoint directory (required)"
    )
    export.add_argument("out", type=Path, metavar="OUT", help="folder to write; must not exist or be empty (required)")
    export.add_argument(
        "--format", choices=["diffusers"], default="diffusers", help="what to write (default: diffusers)"
    )
    _ema_option(export)
    imported = sub.add_parser(
        "import",
        help="bring a folder written by export back as a run",
        description="Turn a diffusers folder written "
        "by `ddpm-cars export` into a run directory that sample, eval and train --init-from take.",
    )
    imported.set_defaults(func=_command("import_run", _plain("ImportRequest")))
    imported.add_argument("folder", type=Path, metavar="DIR", help="the exported folder (required)")
    imported.add_argument(
        "--out", required=True, type=Path, metavar="RUN_DIR", help="run directory to create (required)"
    )


def _distill_parser(sub: Any) -> None:
    distill = sub.add_parser(
        "distill",
        help="make a trained run into a student that samples in 1-8 network calls",
        description=(
            "Progressive distillation (Salimans & Ho 2022): the student starts as the run's network and learns, "
            "round by round, to make in one deterministic DDIM step the two its teacher makes, halving the calls "
            "from --teacher-calls down to --calls. The student directory is a run: sample, eval and report take it, "
            "and it samples on its own calls by default. Checkpoints every --checkpoint-every steps and at every "
            "round's end; --resume continues."
        ),
    )
    distill.set_defaults(func=_command("distill_run", _plain("DistillRequest")))
    distill.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        metavar="RUN",
        help="the trained run to distil (required unless --resume)",
    )
    distill.add_argument(
        "--out", required=True, type=Path, metavar="STUDENT_DIR", help="student run directory (required)"
    )
    distill.add_argument(
        "--resume", action="store_true", help="continue the distillation in --out with its saved settings"
    )
    _distill_settings(distill)
    _device_option(distill)


def _distill_settings(distill: argparse.ArgumentParser) -> None:
    """The fields of DistillConfig as flags, unset by default (--resume takes the saved ones)."""
    for field in dataclasses.fields(DistillConfig):
        if not field.metadata:  # the teacher: --checkpoint
            continue
        kind, meta = field_types(DistillConfig)[field.name], field.metadata
        if kind is bool:
            kwargs: dict[str, Any] = {"action": Switch}
        elif get_origin(kind) is Literal:
            kwargs = {"choices": get_args(kind)}
        else:
            kwargs = {"metavar": meta["metavar"] or field.name.upper(), "type": value_type(kind, meta["limits"])}
        shown = ("on" if field.default else "off") if kind is bool else _default(field.default)
        help = meta["help"] + ("" if field.default is None else f" (default: {shown})")
        distill.add_argument("--" + field.name.replace("_", "-"), default=None, help=help, **kwargs)


def _bench_parser(sub: Any) -> None:
    bench = sub.add_parser(
        "bench",
        help="measure parameters, FLOPs, training and sampling speed and memory of the presets",
        description="Benchmark each preset's network at each precision on this device and print a Markdown table.",
    )
    bench.set_defaults(func=_command("bench", _bench_request))
    _bench_subject_options(bench)
    _bench_method_options(bench)
    bench.add_argument(
        "--peak-tflops",
        type=value_type(float, Limits(low=0, low_open=True)),
        default=None,
        metavar="TFLOPS",
        help=(
            "the device's peak for the precisions measured, for the MFU column (default: the table of common GPUs; "
            "none on CPUs)"
        ),
    )
    _device_option(bench)
    bench.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write the rows and metadata to this JSON file (default: none)",
    )


def _bench_subject_options(bench: argparse.ArgumentParser) -> None:
    bench.add_argument(
        "--presets",
        default="seed,improved",
        metavar="P1,P2,...",
        help=f"comma-separated presets, of {', '.join(PRESETS)} (default: seed,improved)",
    )
    bench.add_argument(
        "--precisions",
        default="fp32,bf16",
        metavar="P1,P2,...",
        help="comma-separated precisions, of fp32, bf16 and fp16 (default: fp32,bf16)",
    )
    bench.add_argument(
        "--image-size",
        type=value_type(int, POSITIVE),
        default=64,
        help="pixels; every preset is measured at this size (default: 64)",
    )
    bench.add_argument(
        "--batch-size",
        type=value_type(int, POSITIVE),
        default=None,
        help="images per training step and per sampling batch (default: 128 on CUDA, 8 on CPU)",
    )


def _bench_method_options(bench: argparse.ArgumentParser) -> None:
    bench.add_argument(
        "--repeats",
        type=value_type(int, POSITIVE),
        default=5,
        help="timed training steps; the median step time is reported (default: 5)",
    )
    bench.add_argument(
        "--warmup", type=int, default=2, metavar="STEPS", help="untimed steps before the timed ones (default: 2)"
    )
    bench.add_argument(
        "--sample-steps",
        type=value_type(int, POSITIVE),
        default=5,
        help="timed reverse steps of ancestral sampling; the median step time is reported (default: 5)",
    )
    bench.add_argument(
        "--compile",
        default=False,
        action=Switch,
        help="torch.compile the networks; compilation falls in the warm-up (default: off)",
    )
    bench.add_argument(
        "--activation-checkpointing",
        default=False,
        action=Switch,
        help=(
            "recompute the residual U-Net's blocks in the backward pass, to measure the memory it saves (default: off)"
        ),
    )
    bench.add_argument(
        "--loop",
        default=False,
        action=Switch,
        help=(
            "also time the whole training loop of each preset, data from the cache included, and the seconds to its "
            "first step (default: off)"
        ),
    )
    bench.add_argument(
        "--data",
        default="toy-cars",
        metavar="SOURCE",
        help="the data of --loop: toy-cars, stanford-cars or an image folder (default: toy-cars)",
    )


def _cache_parser(sub: Any) -> None:
    cache = sub.add_parser(
        "cache",
        help="list the cached datasets, reference features and judge weights, or remove some",
        description="List what the cache folder holds -- decoded datasets (data/), reference images' features "
        "(reference/) and the toy-car judge's weights (judge/) -- with each entry's size, last use, build time and "
        "source, or remove entries: all of them, those not used for DAYS days, or the least recently used until the "
        "rest fits in GB gigabytes. Set DDPM_CARS_CACHE_MAX_GB (a positive number of gigabytes) to bound the cache "
        "automatically: writing an entry then evicts the least recently used others until the cache fits. Entries "
        "being built are left alone.",
    )

    def run(args: argparse.Namespace) -> int:
        from ddpm_cars.caches import CacheRequest, cache_command  # no torch: the cache is files

        return cache_command(CacheRequest(args.cache_dir, args.clear, args.older_than, args.max_size))

    cache.set_defaults(func=run)
    cache.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="the cache folder, holding data/, reference/ and judge/; a --data-cache folder works too "
        "(default: $DDPM_CARS_CACHE or ~/.cache/ddpm-cars)",
    )
    cache.add_argument("--clear", action="store_true", help="remove every entry (default: off)")
    cache.add_argument(
        "--older-than",
        type=float,
        default=None,
        metavar="DAYS",
        help="remove the entries not used in the last DAYS days (default: none)",
    )
    cache.add_argument(
        "--max-size",
        type=float,
        default=None,
        metavar="GB",
        help="remove the least recently used entries until the rest fits in GB gigabytes of 10^9 bytes "
        "(default: none; DDPM_CARS_CACHE_MAX_GB applies a limit on every write)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train DDPMs on cars (or any images) and generate new ones.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _train_parser(sub)
    _sample_parser(sub)
    _forward_parser(sub)
    _eval_parser(sub)
    _classes_parser(sub)
    _guidance_parser(sub)
    _report_and_demo_parsers(sub)
    _exchange_parsers(sub)
    _distill_parser(sub)
    _bench_parser(sub)
    _cache_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` asks for and return its exit code (see :data:`EXIT_CODES`)."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line, for reports
    try:
        return args.func(args)
    except UserError as err:  # bad input the user can fix (MissingFileError included)
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunDiverged as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except OSError as err:  # a full disk, a lost mount: the run's checkpoints stay as they were
        if not is_environment_failure(err):
            return _bug()
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt as err:  # exit codes as a shell reports a signal: 130 for SIGINT, 143 for SIGTERM
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"{PROG}: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    except Exception:  # anything else is a bug in ddpm-cars, not in what the user asked
        return _bug()


def _bug() -> int:
    """The exception being handled, a bug in ddpm-cars: its traceback and a line saying so."""
    traceback.print_exc()
    print(
        f"{PROG}: internal error: this is a bug in {PROG}; please report it with the traceback above", file=sys.stderr
    )
    return EXIT_FAILURE
