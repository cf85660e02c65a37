"""The command line: ``ddpm-cars train | sample | classes | eval | guidance | report | forward | demo | bench``."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

from ddpm_cars.config import DEFAULT_PRESET, PRESETS, SEED, RunConfig

DEFAULT_GUIDANCE = 3.0  # classifier-free guidance scale of `sample --class`

PROG = "ddpm-cars"


def _default(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _channels(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 64,128,256; got {text!r}") from None
    if len(widths) < 2 or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"need at least two positive widths; got {text!r}")
    return widths


def _sizes(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        sizes = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes like 16,8 (or none); got {text!r}") from None
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive; got {text!r}")
    return sizes


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1); got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1); got {text!r}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0; got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0; got {text!r}")
    return value


def _scales(text: str) -> tuple[float, ...]:
    try:
        return tuple(_non_negative(part) for part in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers >= 0 like 0,1,3; got {text!r}") from None


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}; got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0; got {text!r}")
        return value

    return parse


# (flag, section, field, argparse keywords, help). Defaults shown are the default preset's;
# an option not given keeps the preset's (or, with --resume, the run's) value.
RUN_OPTIONS: list[tuple[str, str, str, dict[str, Any], str]] = [
    ("--data", "data", "source", {"metavar": "SOURCE"}, "toy-cars, stanford-cars (Kaggle download), or an image folder"),
    ("--split", "data", "split", {"choices": ["train", "test", "all"]}, "Stanford Cars split (for toy-cars, test draws other images)"),
    ("--image-size", "data", "image_size", {"type": _positive(int)}, "training resolution in pixels"),
    ("--crop", "data", "crop", {"choices": ["none", "center", "bbox"]}, "none: squash each image to a square; center: resize the short side and keep the centre square; bbox: a square around the car's annotated box (Stanford Cars)"),
    ("--bbox-margin", "data", "bbox_margin", {"type": float, "metavar": "FRACTION"}, "--crop bbox: margin on each side of the box, as a share of its longer side"),
    ("--flip", "data", "flip", {"action": argparse.BooleanOptionalAction}, "random horizontal flips"),
    ("--toy-count", "data", "toy_count", {"type": _positive(int)}, "number of images generated for --data toy-cars"),
    ("--model", "model", "name", {"choices": ["res_attn_unet", "simple_unet"]}, "network: the improved residual U-Net with attention and AdaGN, or the seed's SimpleUnet"),
    ("--channels", "model", "channels", {"type": _channels, "metavar": "W1,W2,..."}, "U-Net widths, top to bottom (base width times the channel multipliers)"),
    ("--num-res-blocks", "model", "num_res_blocks", {"type": _positive(int)}, "residual blocks per level (res_attn_unet)"),
    ("--attention-resolutions", "model", "attention_resolutions", {"type": _sizes, "metavar": "S1,S2,..."}, "feature-map sizes that get self-attention, or none (res_attn_unet)"),
    ("--head-channels", "model", "head_channels", {"type": _positive(int)}, "channels per attention head (res_attn_unet)"),
    ("--dropout", "model", "dropout", {"type": _probability}, "dropout in the residual blocks (res_attn_unet)"),
    ("--resblock-updown", "model", "resblock_updown", {"action": argparse.BooleanOptionalAction}, "BigGAN-style resampling inside residual blocks (res_attn_unet)"),
    ("--time-emb-dim", "model", "time_emb_dim", {"type": _positive(int)}, "sinusoidal time embedding size (simple_unet)"),
    ("--class-conditional", "model", "class_conditional", {"action": argparse.BooleanOptionalAction}, "condition on the class (class subfolders; the body type for toy-cars) so `sample --class` can ask for one"),
    ("--label-dropout", "train", "label_dropout", {"type": _probability, "metavar": "P"}, "--class-conditional: share of labels replaced by the null class, for classifier-free guidance"),
    ("--timesteps", "diffusion", "timesteps", {"type": _positive(int)}, "diffusion steps T"),
    ("--schedule", "diffusion", "schedule", {"choices": ["linear", "cosine"]}, "noise schedule: linear betas 1e-4..0.02 (Ho et al.) or cosine (Nichol & Dhariwal)"),
    ("--loss", "diffusion", "loss", {"choices": ["l1", "l2"]}, "loss on the prediction target (l2 on eps is L_simple)"),
    ("--prediction", "diffusion", "prediction", {"choices": ["eps", "x0", "v"]}, "what the network predicts: the noise, the clean image, or v"),
    ("--learn-variance", "diffusion", "learn_variance", {"action": argparse.BooleanOptionalAction}, "learn the reverse variance with the hybrid loss (Nichol & Dhariwal)"),
    ("--vlb-weight", "diffusion", "vlb_weight", {"type": float, "metavar": "LAMBDA"}, "weight of L_vlb in the hybrid loss"),
    ("--epochs", "train", "epochs", {"type": _positive(int)}, "passes over the data"),
    ("--steps", "train", "max_steps", {"type": _positive(int)}, "stop after this many optimizer steps (overrides --epochs)"),
    ("--batch-size", "train", "batch_size", {"type": _positive(int)}, "images per optimizer step"),
    ("--lr", "train", "lr", {"type": _positive(float)}, "learning rate"),
    ("--seed", "train", "seed", {"type": int}, "seed for data order, timesteps and noise"),
    ("--optimizer", "train", "optimizer", {"choices": ["adam", "adamw"]}, "optimizer"),
    ("--weight-decay", "train", "weight_decay", {"type": float}, "weight decay (decoupled with adamw)"),
    ("--warmup-steps", "train", "warmup_steps", {"type": int, "metavar": "STEPS"}, "linear learning-rate warm-up"),
    ("--grad-clip", "train", "grad_clip", {"type": _positive(float), "metavar": "NORM"}, "clip the gradient norm to this; None: off"),
    ("--grad-accum", "train", "grad_accum_steps", {"type": _positive(int), "metavar": "N"}, "split each batch into N micro-batches (same gradient, less memory)"),
    ("--precision", "train", "precision", {"choices": ["fp32", "bf16"]}, "bf16: autocast convolutions and matmuls to bfloat16 (CUDA and CPU)"),
    ("--channels-last", "train", "channels_last", {"action": argparse.BooleanOptionalAction}, "NHWC memory layout"),
    ("--compile", "train", "compile", {"action": argparse.BooleanOptionalAction}, "torch.compile the network"),
    ("--ema-decay", "train", "ema_decay", {"type": float, "metavar": "DECAY"}, "keep a moving average of the weights (e.g. 0.999) and sample from it; None: off"),
    ("--sample-every", "train", "sample_every_epochs", {"type": _positive(int), "metavar": "EPOCHS"}, "draw a sample grid every this many epochs"),
    ("--checkpoint-every", "train", "checkpoint_every_steps", {"type": _positive(int), "metavar": "STEPS"}, "checkpoint every this many steps (and at every epoch end)"),
    ("--num-sample-images", "sample", "num_images", {"type": _positive(int)}, "images in each training-time sample grid"),
    ("--eval-every", "train", "eval_every_steps", {"type": int, "metavar": "STEPS"}, "score samples every this many steps into metrics.csv and metrics.png (SWD; FID when the Inception weights are on disk); 0: never"),
    ("--eval-samples", "train", "eval_samples", {"type": _positive(int), "metavar": "N"}, "samples scored at each --eval-every"),
]

SAMPLER_OPTIONS: list[tuple[str, str, str, dict[str, Any], str]] = [
    ("--variance", "sample", "variance", {"choices": ["beta", "beta_tilde"]}, "fixed reverse variance sigma_t^2"),
    ("--clip", "sample", "clip_x0", {"action": argparse.BooleanOptionalAction}, "clip the predicted x_0 to [-1, 1] at every step"),
    ("--sampler", "sample", "sampler", {"choices": ["ddpm", "ddim", "dpm++"]}, "ancestral DDPM, DDIM or DPM-Solver++(2M)"),
    ("--eta", "sample", "eta", {"type": float, "metavar": "ETA"}, "DDIM noise: 0 deterministic, 1 like DDPM"),
    ("--spacing", "sample", "spacing", {"choices": ["uniform", "quadratic"]}, "where fewer steps go among the T: evenly, or denser near t = 0"),
    ("--batchnorm", "sample", "batchnorm", {"choices": ["eval", "batch"]}, "BatchNorm statistics when sampling: running (eval) or per batch"),
]


def _steps_option(flag: str) -> tuple[str, str, str, dict[str, Any], str]:
    return (flag, "sample", "steps", {"type": _positive(int), "metavar": "N"}, "network evaluations per image when sampling; None: all T")


TRAIN_OPTIONS = RUN_OPTIONS + SAMPLER_OPTIONS + [_steps_option("--sample-steps")]  # train has --steps already
SAMPLE_OPTIONS = SAMPLER_OPTIONS + [_steps_option("--steps")]


def _add_options(parser: argparse.ArgumentParser, options: list, shown: RunConfig, note: str = "") -> None:
    for flag, section, name, kwargs, text in options:
        default = _default(getattr(getattr(shown, section), name))
        if "choices" not in kwargs and "action" not in kwargs:
            kwargs = {"metavar": flag.lstrip("-").replace("-", "_").upper(), **kwargs}
        parser.add_argument(flag, dest=f"{section}.{name}", default=None, help=f"{text} (default: {default}{note})", **kwargs)


def config_overrides(args: argparse.Namespace, options: list) -> dict[str, dict[str, Any]]:
    sections: dict[str, dict[str, Any]] = {}
    for _, section, name, _, _ in options:
        value = getattr(args, f"{section}.{name}")
        if value is not None:
            sections.setdefault(section, {})[name] = value
    return sections


def _device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (default: auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Train DDPMs on cars (or any images) and generate new ones.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train a model", description="Train a DDPM; checkpoints, samples and loss go to --out.")
    train.add_argument("--out", required=True, type=Path, metavar="RUN_DIR", help="run directory (required)")
    train.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS), help=f"recipe the options below modify (default: {DEFAULT_PRESET})")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    train.add_argument("--inception-weights", type=Path, default=None, metavar="PATH", help="Inception weights for FID during training (default: torch's hub cache, when the file is there)")
    _device_option(train)
    _add_options(train, TRAIN_OPTIONS, PRESETS[DEFAULT_PRESET], f" in the {DEFAULT_PRESET} preset")

    sample = sub.add_parser("sample", help="generate images from a trained run", description="Generate images from pure noise.")
    sample.add_argument("--checkpoint", required=True, type=Path, metavar="RUN", help="run directory (latest checkpoint) or a checkpoint directory (required)")
    sample.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory for grid.png, images/ and denoising.png (required)")
    # --num-images first: torchrun's own parser refuses a bare --num as an abbreviation of its --numa-binding
    sample.add_argument("--num-images", "--num", dest="num", type=_positive(int), default=64, help="number of images, per class with --class (default: 64)")
    sample.add_argument("--seed", type=int, default=0, help="image i depends only on (seed, i) (default: 0)")
    sample.add_argument("--batch-size", type=_positive(int), default=64, help="images denoised at once (default: 64)")
    sample.add_argument("--trajectory", action="store_true", help="also draw trajectory.png: image 0's x_t and predicted x_0 along the way (default: off)")
    sample.add_argument("--ema", default=True, action=argparse.BooleanOptionalAction, help="use the moving-average weights when the run kept them (default: on)")
    sample.add_argument("--class", dest="classes", action="append", default=None, metavar="NAME", help="draw --num images of this class: its name (any case) or index; repeat for several, one grid row each (class-conditional runs; list them with `ddpm-cars classes RUN`; default: unconditional)")
    sample.add_argument("--guidance", type=_non_negative, default=None, metavar="SCALE", help=f"classifier-free guidance with --class: 0 unconditional, 1 conditional, more for stronger class likeness (default: {DEFAULT_GUIDANCE:g})")
    _device_option(sample)
    _add_options(sample, SAMPLE_OPTIONS, SEED, " unless the run says otherwise")

    forward = sub.add_parser("forward", help="picture the forward (noising) process", description="One image at about ten evenly spaced t.")
    forward.add_argument("--data", default="toy-cars", metavar="SOURCE", help="toy-cars, stanford-cars or an image folder (default: toy-cars)")
    forward.add_argument("--split", default="train", choices=["train", "test", "all"], help="Stanford Cars split (default: train)")
    forward.add_argument("--out", type=Path, default=Path("forward_process.png"), help="PNG to write (default: forward_process.png)")
    forward.add_argument("--index", type=int, default=0, help="which image of the dataset (default: 0)")
    forward.add_argument("--image-size", type=_positive(int), default=SEED.data.image_size, help=f"pixels (default: {SEED.data.image_size})")
    forward.add_argument("--crop", default="none", choices=["none", "center", "bbox"], help="none: squash to a square; center: the centre square; bbox: around the annotated car, Stanford Cars (default: none)")
    forward.add_argument("--timesteps", type=_positive(int), default=SEED.diffusion.timesteps, help=f"diffusion steps T (default: {SEED.diffusion.timesteps})")
    forward.add_argument("--schedule", default=SEED.diffusion.schedule, choices=["linear", "cosine"], help=f"noise schedule (default: {SEED.diffusion.schedule})")
    forward.add_argument("--frames", type=_positive(int), default=10, help="pictures in the strip (default: 10)")
    forward.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")

    evaluate = sub.add_parser(
        "eval", help="score a run's samples (SWD, precision/recall, FID, KID, memorisation) or a folder of images",
        description="Score generated images against a dataset: the sliced Wasserstein distance on Laplacian-pyramid "
        "patches and precision/recall on pixels (always), FID, KID and Inception precision/recall (when the Inception "
        "weights are available), and the nearest training image of each sample. Results go to RUN/eval/ and the "
        "run's report.html. --nll adds the likelihood bound on held-out images.",
    )
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, metavar="RUN", help="run directory (latest checkpoint) or a checkpoint directory: samples are generated from it (required, or --images)")
    source.add_argument("--images", type=Path, metavar="DIR", help="a folder of generated images to score instead (required, or --checkpoint; the reference is --data, default toy-cars)")
    evaluate.add_argument("--num-samples", type=_positive(int), default=1000, help="samples generated and scored (default: 1000)")
    evaluate.add_argument("--sample-metrics", default=True, action=argparse.BooleanOptionalAction, help="compute the sample metrics (default: on; --no-sample-metrics with --nll gives the likelihood alone)")
    evaluate.add_argument("--fid", default=True, action=argparse.BooleanOptionalAction, help="FID and KID when the Inception weights are available or downloadable (default: on)")
    evaluate.add_argument("--inception-weights", type=Path, default=None, metavar="PATH", help="the Inception weights file (default: torch's hub cache, downloaded there when online)")
    evaluate.add_argument("--memorization", default=True, action=argparse.BooleanOptionalAction, help="nearest training image of each sample, against held-out real images (default: on)")
    evaluate.add_argument("--cache-dir", type=Path, default=None, metavar="DIR", help="where reference features are cached (default: $DDPM_CARS_CACHE or ~/.cache/ddpm-cars)")
    evaluate.add_argument("--nll", action="store_true", help="also the negative log-likelihood bound in bits/dim on held-out images (default: off)")
    evaluate.add_argument("--data", default=None, metavar="SOURCE", help="reference images: toy-cars, stanford-cars or a folder (default: the run's data source)")
    evaluate.add_argument("--split", default=None, choices=["train", "test", "all"], help="split of --data (default: train for the sample metrics, as FID is reported; test for --nll)")
    evaluate.add_argument("--image-size", type=_positive(int), default=None, help="resolution with --images (default: the run's, or the images' own)")
    evaluate.add_argument("--num-images", type=_positive(int), default=256, help="held-out images for --nll (default: 256)")
    evaluate.add_argument("--timesteps", type=_positive(int), default=None, metavar="K", help="--nll: estimate the KL sum from K random t per image instead of all T terms (default: all, exact)")
    evaluate.add_argument("--batch-size", type=_positive(int), default=64, help="images per network call (default: 64)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the samples, subsets and projections (default: 0)")
    evaluate.add_argument("--ema", default=True, action=argparse.BooleanOptionalAction, help="use the moving-average weights when the run kept them (default: on)")
    evaluate.add_argument("--out", type=Path, default=None, metavar="DIR", help="where metrics.json and the pictures go (default: RUN/eval with --checkpoint, none with --images)")
    evaluate.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the numbers to this JSON file (default: none)")
    _device_option(evaluate)
    _add_options(evaluate, SAMPLE_OPTIONS, SEED, " unless the run says otherwise")

    classes = sub.add_parser("classes", help="list the classes a class-conditional run can draw", description="Print the index and name of each class of a class-conditional run, for `sample --class`.")
    classes.add_argument("run", type=Path, metavar="RUN", help="run directory or checkpoint directory (required)")

    guidance = sub.add_parser(
        "guidance", help="measure classifier-free guidance: how often samples show the class asked for",
        description="Draw samples of every class of a class-conditional run at each guidance scale and judge them with "
        "a small classifier trained on the run's real images: the share classified as the class asked for, overall and "
        "per class, into guidance.json, and guidance.png with one row per class.",
    )
    guidance.add_argument("run", type=Path, metavar="RUN", help="class-conditional run directory or checkpoint directory (required)")
    guidance.add_argument("--scales", type=_scales, default=(0.0, 1.0, 3.0), metavar="S1,S2,...", help="guidance scales to compare (default: 0,1,3)")
    guidance.add_argument("--per-class", type=_positive(int), default=100, metavar="N", help="samples of each class at each scale (default: 100)")
    guidance.add_argument("--classifier-steps", type=_positive(int), default=500, metavar="STEPS", help="training steps of the judging classifier (default: 500)")
    guidance.add_argument("--seed", type=int, default=0, help="seed of the samples and the classifier (default: 0)")
    guidance.add_argument("--batch-size", type=_positive(int), default=64, help="images denoised at once (default: 64)")
    guidance.add_argument("--ema", default=True, action=argparse.BooleanOptionalAction, help="use the moving-average weights when the run kept them (default: on)")
    guidance.add_argument("--out", type=Path, default=None, metavar="DIR", help="where guidance.json and guidance.png go (default: RUN/guidance)")
    _device_option(guidance)
    _add_options(guidance, SAMPLE_OPTIONS, SEED, " unless the run says otherwise")

    report = sub.add_parser("report", help="write a run's report.html", description="Write RUN/report.html: one self-contained page with the config, samples, denoising strip, curves, metrics and memorisation check.")
    report.add_argument("run", type=Path, metavar="RUN", help="run directory (required)")
    report.add_argument("--out", type=Path, default=None, metavar="FILE", help="HTML file to write (default: RUN/report.html)")

    demo = sub.add_parser("demo", help="train a small model on toy cars and draw every figure", description="Train, sample and draw all figures into --out, in minutes on a CPU.")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory (default: runs/demo)")
    demo.add_argument("--steps", type=_positive(int), default=None, help=f"optimizer steps (default: the demo preset's {PRESETS['demo'].train.epochs} epochs)")
    _device_option(demo)

    bench = sub.add_parser(
        "bench", help="measure parameters, FLOPs, training and sampling speed and memory of the presets",
        description="Benchmark each preset's network at each precision on this device and print a Markdown table.",
    )
    bench.add_argument("--presets", default="seed,improved", metavar="P1,P2,...", help=f"comma-separated presets, of {', '.join(PRESETS)} (default: seed,improved)")
    bench.add_argument("--precisions", default="fp32,bf16", metavar="P1,P2,...", help="comma-separated precisions, of fp32 and bf16 (default: fp32,bf16)")
    bench.add_argument("--image-size", type=_positive(int), default=64, help="pixels; every preset is measured at this size (default: 64)")
    bench.add_argument("--batch-size", type=_positive(int), default=None, help="images per training step and per sampling batch (default: 128 on CUDA, 8 on CPU)")
    bench.add_argument("--repeats", type=_positive(int), default=5, help="timed training steps; the median step time is reported (default: 5)")
    bench.add_argument("--warmup", type=int, default=2, metavar="STEPS", help="untimed steps before the timed ones (default: 2)")
    bench.add_argument("--sample-steps", type=_positive(int), default=5, help="timed reverse steps of ancestral sampling; the median step time is reported (default: 5)")
    bench.add_argument("--compile", default=False, action=argparse.BooleanOptionalAction, help="torch.compile the networks; compilation falls in the warm-up (default: off)")
    _device_option(bench)
    bench.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the rows and metadata to this JSON file (default: none)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line, for reports
    from ddpm_cars import commands  # torch is imported only once the arguments are good

    try:
        return getattr(commands, args.command.replace("eval", "evaluate"))(args)
    except (ValueError, FileNotFoundError) as err:  # DataError is a ValueError
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a lost mount: the run's checkpoints stay as they were
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # exit codes as a shell reports a signal: 130 for SIGINT, 143 for SIGTERM
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"{PROG}: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
