"""Typed configuration: one frozen dataclass per component, JSON round trip.

Every field is declared once, here: its type, its default (the seed recipe), its help, the
values it allows and its command-line flag. ``ddpm-cars train`` derives its options from
these fields (and ``sample``, ``eval`` and ``guidance`` theirs from :class:`SampleConfig`),
and every field is validated on construction, so a bad value fails at once with a
:class:`~ddpm_cars.errors.UserError` naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import reprlib
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from ddpm_cars.errors import UserError
from ddpm_cars.validation import NON_NEGATIVE, POSITIVE, PROBABILITY, Limits, check_fields

Loss = Literal["l1", "l2"]
Prediction = Literal["eps", "x0", "v"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Schedule = Literal["linear", "cosine"]
Optimizer = Literal["adam", "adamw"]
LrSchedule = Literal["constant", "cosine"]
Variance = Literal["beta", "beta_tilde"]
BatchNormMode = Literal["eval", "batch"]
Sampler = Literal["ddpm", "ddim", "dpm++", "dpm++3m", "dpm++sde", "heun"]
Spacing = Literal["uniform", "quadratic", "trailing", "karras", "logsnr"]
NOISE_LEVEL_SPACINGS = ("karras", "logsnr")  # placed by sigma, from --sigma-max down
DdimSigma = Literal["song", "learned"]
Tracking = Literal["none", "tensorboard", "wandb"]
Split = Literal["train", "test", "all"]
Crop = Literal["none", "center", "bbox"]
ImageChannels = Literal["auto", "1", "3"]
ModelName = Literal["res_attn_unet", "simple_unet"]

DEFAULT_GUIDANCE = 3.0  # classifier-free guidance scale of `sample --class`
RESAMPLE_EVERY = 10  # steps between RePaint's jumps back, and their length, of `sample --mask`

# Where noise-level spacings start by default: EDM's sigma_max (Karras et al. 2022). x_T ~ N(0, I)
# is exact only where alphabar = 0; at sigma = 80 it is off by alphabar = 1.6e-4 of the data,
# while the cosine schedule's clipped last beta puts t = T-1 at sigma = 2e4, where an eps
# model's x_0 estimate multiplies its error by that much.
SIGMA_MAX = 80.0


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    metavar: str | None = None,
    limits: Limits | None = None,
    commands: Literal["all", "train", "none"] = "all",
    sampling_flag: str | None = None,
    role: Literal["recipe", "resumable", "network"] = "recipe",
) -> Any:
    """A config field with what the command line needs to offer it: its ``help``, its
    ``flag`` (default: ``--`` and the field name with dashes), the ``metavar`` in the usage
    line and the ``limits`` of its values. ``commands`` says where it is a flag: a field of
    :class:`SampleConfig` is one of ``train`` and also of ``sample``, ``eval`` and
    ``guidance`` (there named ``sampling_flag`` when given) unless it is for ``"train"``
    only; ``"none"`` offers it nowhere.

    Its ``role`` is the rule that travels with it: a ``"resumable"`` field may change when
    a run is resumed (how long it goes on, how it reports, how the same computation is
    carried out, how it samples); a ``"network"`` field defines the shapes of the network's
    weights (``--init-from`` needs it equal); neither may change on resume, as both would
    change what is being trained."""
    metadata = {
        "help": help,
        "flag": flag,
        "metavar": metavar,
        "limits": limits,
        "cli": commands != "none",
        "sampling_flag": sampling_flag,
        "train_only": commands == "train",
        "resumable": role == "resumable",
        "network": role == "network",
    }
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ModelConfig:
    """The network. ``channels`` are the widths of the U-Net levels, top to bottom (for
    ``res_attn_unet``: base width times the channel multipliers, e.g. 128,256,384,512)."""

    name: ModelName = option(
        "simple_unet",
        "network: the improved residual U-Net with attention and AdaGN, or the seed's SimpleUnet",
        flag="--model",
        role="network",
    )
    channels: tuple[int, ...] = option(
        (64, 128, 256, 512, 1024),
        "U-Net widths, top to bottom (base width times the channel multipliers)",
        metavar="W1,W2,...",
        limits=Limits(low=1, min_items=2),
        role="network",
    )
    # res_attn_unet embeds t in channels[0] dims instead
    time_emb_dim: int = option(
        32, "sinusoidal time embedding size (simple_unet)", limits=Limits(low=4, even=True), role="network"
    )
    num_res_blocks: int = option(2, "residual blocks per level (res_attn_unet)", limits=POSITIVE, role="network")
    attention_resolutions: tuple[int, ...] = option(
        (16, 8),
        "feature-map sizes that get self-attention, or none (res_attn_unet)",
        metavar="S1,S2,...",
        limits=POSITIVE,
        role="network",
    )
    head_channels: int = option(64, "channels per attention head (res_attn_unet)", limits=POSITIVE, role="network")
    dropout: float = option(0.0, "dropout in the residual blocks (res_attn_unet)", limits=PROBABILITY)
    resblock_updown: bool = option(
        False, "BigGAN-style resampling inside residual blocks (res_attn_unet)", role="network"
    )
    # a class embedding added to the time embedding
    class_conditional: bool = option(
        False,
        "condition on the class (class subfolders; the body type for toy-cars) so `sample --class` can ask for one",
    )
    class_names: tuple[str, ...] = option(
        (), "the classes it knows, filled from the data when training starts", commands="none"
    )

    def __post_init__(self) -> None:
        check_fields(self, "model")
        if self.class_names and not self.class_conditional:
            raise UserError("model.class_names are only for a class-conditional model (model.class_conditional)")
        if len(set(self.class_names)) != len(self.class_names):
            raise UserError("model.class_names must be distinct")
        if self.name == "res_attn_unet" and self.channels[0] % 2:
            raise UserError(f"model.channels[0] must be even for res_attn_unet; got {self.channels[0]}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def num_classes(self) -> int:
        """Classes the network is conditioned on; 0 for an unconditional network."""
        return len(self.class_names)


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = option(1000, "diffusion steps T", limits=POSITIVE)
    schedule: Schedule = option(
        "linear", "noise schedule: linear betas 1e-4..0.02 (Ho et al.) or cosine (Nichol & Dhariwal)"
    )
    beta_start: float = option(1e-4, "first beta of the linear schedule", commands="none")
    beta_end: float = option(0.02, "last beta of the linear schedule", commands="none")
    loss: Loss = option("l1", "loss on the prediction target (l2 on eps is L_simple)")
    prediction: Prediction = option("eps", "what the network predicts: the noise, the clean image, or v")
    # 6 output channels: the mean target and the variance interpolation (Nichol & Dhariwal 2021)
    learn_variance: bool = option(
        False, "learn the reverse variance with the hybrid loss (Nichol & Dhariwal)", role="network"
    )
    # lambda of L_hybrid = L_simple + lambda * L_vlb
    vlb_weight: float = option(0.001, "weight of L_vlb in the hybrid loss", metavar="LAMBDA", limits=NON_NEGATIVE)
    min_snr_gamma: float = option(
        0.0,
        "weight each timestep's loss by min(SNR, GAMMA) in x_0 terms (Min-SNR, Hang et al."
        " 2023; 5 in the paper); 0: off",
        metavar="GAMMA",
        limits=NON_NEGATIVE,
    )
    zero_terminal_snr: bool = option(
        False,
        "rescale the schedule so that alphabar_T = 0: x_T is pure noise, as sampling"
        " assumes (Lin et al. 2024; needs --prediction v or x0)",
    )

    def __post_init__(self) -> None:
        check_fields(self, "diffusion")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise UserError(f"need 0 < beta_start <= beta_end < 1; got {self.beta_start}, {self.beta_end}")
        if self.zero_terminal_snr and self.prediction == "eps":
            raise UserError(
                "--zero-terminal-snr needs --prediction v or x0: at alphabar_T = 0 the noise says nothing about x_0"
            )

    def out_channels(self, image_channels: int) -> int:
        """Channels the network outputs for images of ``image_channels``: the mean target,
        then as many for the variance interpolation when the variance is learned."""
        return 2 * image_channels if self.learn_variance else image_channels


@dataclass(frozen=True)
class DataConfig:
    source: str = option(
        "toy-cars", "toy-cars, stanford-cars (Kaggle download), or an image folder", flag="--data", metavar="SOURCE"
    )
    split: Split = option("train", "Stanford Cars split (for toy-cars, test draws other images)")
    image_size: int = option(64, "training resolution in pixels", limits=Limits(low=16), role="network")
    crop: Crop = option(
        "none",
        "none: squash each image to a square; center: resize the short side and keep the centre square; "
        "bbox: a square around the car's annotated box (Stanford Cars)",
    )
    bbox_margin: float = option(
        0.1,
        "--crop bbox: margin on each side of the box, as a share of its longer side",
        metavar="FRACTION",
        limits=Limits(low=0, high=1),
    )
    # the network's input and output channels; a run records what "auto" found
    image_channels: ImageChannels = option(
        "auto",
        "channels of the images and the network: 1 (grayscale) or 3 (RGB), converting images that differ; "
        "auto: 1 when every image of the source is grayscale, else 3",
        role="network",
    )
    flip: bool = option(True, "random horizontal flips")
    toy_count: int = option(8192, "number of images generated for --data toy-cars", limits=POSITIVE)
    cache: str = option(
        "auto",
        "folder of decoded-image caches (a source is decoded once, then memory-mapped); "
        "auto: data/ in $DDPM_CARS_CACHE, else in ~/.cache/ddpm-cars; off: decode into memory every time",
        flag="--data-cache",
        metavar="DIR",
        role="resumable",
    )

    def __post_init__(self) -> None:
        check_fields(self, "data")
        if not self.source:
            raise UserError("data.source must be 'toy-cars', 'stanford-cars' or a folder path")

    @property
    def channel_count(self) -> int:
        """Channels of the images: ``image_channels``, which training sets from the data when
        it is ``auto``; 3 for a recipe not yet trained."""
        return 3 if self.image_channels == "auto" else int(self.image_channels)


@dataclass(frozen=True)
class SampleConfig:
    """How a trained network draws images. Its fields are flags of ``train`` (for the grids
    drawn during training) and, all but ``num_images``, of ``sample``, ``eval`` and
    ``guidance``, where the run's own values are the defaults."""

    # sigma_t^2 = beta_t (Algorithm 2) or beta_tilde_t
    variance: Variance = option("beta", "fixed reverse variance sigma_t^2", role="resumable")
    clip_x0: bool = option(True, "clip the predicted x_0 to [-1, 1] at every step", flag="--clip", role="resumable")
    batchnorm: BatchNormMode = option(
        "eval", "BatchNorm statistics when sampling: running (eval) or per batch", role="resumable"
    )
    num_images: int = option(
        64,
        "images in each training-time sample grid",
        flag="--num-sample-images",
        limits=POSITIVE,
        commands="train",
        role="resumable",
    )
    # ancestral (Ho et al.), DDIM (Song et al.), DPM-Solver++(2M)/(3M) and its SDE form (Lu et al.),
    # Heun (Karras et al.)
    sampler: Sampler = option(
        "ddpm",
        "ancestral DDPM, DDIM, DPM-Solver++(2M) or (3M), SDE-DPM-Solver++(2M) (dpm++sde, stochastic), "
        "or EDM's Heun (2 calls per step)",
        role="resumable",
    )
    steps: int | None = option(
        None,
        "sampling steps among the T, one network evaluation each (heun: two); None: all T",
        flag="--sample-steps",
        sampling_flag="--steps",
        metavar="N",
        limits=POSITIVE,
        role="resumable",
    )
    eta: float = option(
        0.0, "ddim only: its noise, 0 deterministic, 1 like DDPM", metavar="ETA", limits=NON_NEGATIVE, role="resumable"
    )
    ddim_sigma: DdimSigma = option(
        "song",
        "ddim only: its noise sigma_t, times eta: Song et al.'s Eq. 16, or the run's learned variance (learned: "
        "a run trained with one)",
        role="resumable",
    )
    churn: float = option(
        0.0,
        "heun only: EDM's S_churn, noise added back where 0.05 <= sigma <= 50, at most sqrt(2) - 1 of sigma "
        "per step (0: deterministic)",
        metavar="S",
        limits=NON_NEGATIVE,
        role="resumable",
    )
    spacing: Spacing = option(
        "uniform",
        "where fewer steps go among the T: evenly in t, denser near t = 0 (quadratic), evenly from T - 1 "
        "down to T/N - 1 (trailing: each halving of N keeps every other step; distilled runs use it), or by "
        "noise level from --sigma-max down (karras: rho 7; logsnr: even in log SNR)",
        role="resumable",
    )
    sigma_max: float = option(
        SIGMA_MAX,
        "karras and logsnr spacings only: the noise level sigma = sqrt((1 - abar) / abar) they start "
        "from, at the trained step nearest it (T - 1 where the schedule ends below it)",
        metavar="SIGMA",
        limits=Limits(low=0, low_open=True),
        role="resumable",
    )

    def __post_init__(self) -> None:
        check_fields(self, "sample")

    def check_read(self, given: Iterable[str]) -> None:
        """A one-line error for an option among ``given`` (field names) that this sampler or
        spacing does not read, so that ``--sampler dpm++ --eta 0.5`` does not quietly drop the eta."""
        for name in given:
            if name in _READ_BY:
                chooser, readers = _READ_BY[name]
                chosen = getattr(self, chooser)
                if chosen not in readers:
                    raise UserError(
                        f"--{name.replace('_', '-')} is read only with --{chooser} {' or '.join(readers)}, and "
                        f"the {chooser} here is {chosen}: drop it, or add --{chooser} {readers[0]}"
                    )


# the sampling options only some samplers or spacings read: option -> (the field that chooses, its readers)
_READ_BY = {
    "eta": ("sampler", ("ddim",)),
    "ddim_sigma": ("sampler", ("ddim",)),
    "churn": ("sampler", ("heun",)),
    "sigma_max": ("spacing", NOISE_LEVEL_SPACINGS),
}


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = option(128, "images per optimizer step", limits=POSITIVE)
    lr: float = option(1e-3, "learning rate", limits=Limits(low=0, low_open=True), role="resumable")
    epochs: int = option(100, "passes over the data", limits=POSITIVE, role="resumable")
    max_steps: int | None = option(
        None,
        "stop after this many optimizer steps (overrides --epochs)",
        flag="--steps",
        limits=POSITIVE,
        role="resumable",
    )
    sample_every_epochs: int = option(
        5,
        "draw a sample grid every this many epochs",
        flag="--sample-every",
        metavar="EPOCHS",
        limits=POSITIVE,
        role="resumable",
    )
    log_every_steps: int = option(
        10,
        "read the loss from the device and log it every this many steps (each step's loss is kept)",
        flag="--log-every",
        metavar="STEPS",
        limits=POSITIVE,
        role="resumable",
    )
    checkpoint_every_steps: int = option(
        500,
        "checkpoint every this many steps (and at every epoch end)",
        flag="--checkpoint-every",
        metavar="STEPS",
        limits=POSITIVE,
        role="resumable",
    )
    seed: int = option(
        0,
        "seed for data order, timesteps and noise",
        limits=Limits(low=-(2**63), high=2**64, high_open=True, words="an integer that fits in 64 bits"),
    )
    ema_decay: float | None = option(
        None,
        "keep a moving average of the weights (e.g. 0.999) and sample from it; None: off",
        metavar="DECAY",
        limits=Limits(low=0, high=1, low_open=True, high_open=True),
    )
    optimizer: Optimizer = option("adam", "optimizer")
    # decoupled (AdamW) or L2 (Adam)
    weight_decay: float = option(0.0, "weight decay (decoupled with adamw)", limits=NON_NEGATIVE)
    warmup_steps: int = option(0, "linear learning-rate warm-up", metavar="STEPS", limits=NON_NEGATIVE)
    lr_schedule: LrSchedule = option(
        "constant", "after the warm-up: a constant learning rate, or a cosine decay towards 0 at the last step"
    )
    # the global gradient norm
    grad_clip: float | None = option(
        None,
        "clip the gradient norm to this; None: off",
        metavar="NORM",
        limits=Limits(low=0, low_open=True),
        role="resumable",
    )
    max_nonfinite_steps: int = option(
        10, "consecutive non-finite losses before the run stops", limits=POSITIVE, commands="none"
    )
    grad_accum_steps: int = option(
        1,
        "split each batch into N micro-batches (same gradient, less memory)",
        flag="--grad-accum",
        metavar="N",
        limits=POSITIVE,
        role="resumable",
    )
    precision: Precision = option(
        "auto",
        "autocast convolutions and matmuls to bfloat16 or float16 (with loss scaling); auto: bf16 on GPUs "
        "that have it, else fp16 on CUDA, bf16 on CPUs with AVX-512 BF16 or AMX, else fp32",
        role="resumable",
    )
    channels_last: bool = option(False, "NHWC memory layout", role="resumable")  # for the network and its inputs
    activation_checkpointing: bool = option(
        False,
        "recompute each residual and attention block's activations in the backward pass instead of storing "
        "them: the same gradients in less memory, for about a third more compute (res_attn_unet)",
        role="resumable",
    )
    compile: bool | None = option(
        None,
        "torch.compile the network (uncompiled, with a warning, where compiling fails); none: on for CUDA, "
        "off on the CPU",
        role="resumable",
    )
    eval_every_steps: int = option(
        0,
        "score samples every this many steps into metrics.csv and metrics.png (SWD; FID when the Inception weights "
        "are on disk); 0: never",
        flag="--eval-every",
        metavar="STEPS",
        limits=NON_NEGATIVE,
        role="resumable",
    )
    eval_samples: int = option(
        256, "samples scored at each --eval-every", metavar="N", limits=Limits(low=4), role="resumable"
    )
    label_dropout: float = option(
        0.1,
        "--class-conditional: share of labels replaced by the null class, for classifier-free guidance",
        metavar="P",
        limits=PROBABILITY,
    )
    log_with: Tracking = option(
        "none",
        "also log the losses, learning rate, metrics and sample grids to TensorBoard (RUN/tensorboard) or "
        "Weights & Biases (an optional extra each)",
        role="resumable",
    )
    init_from: str | None = option(
        None,
        "fine-tune: start from this run's weights (its moving average when it kept one) or a checkpoint "
        "directory's, with a fresh optimizer; same network and image size, other data and classes allowed",
        metavar="RUN_OR_DIR",
    )

    def __post_init__(self) -> None:
        check_fields(self, "train")
        if self.batch_size % self.grad_accum_steps:
            raise UserError(
                f"train.batch_size ({self.batch_size}) must be divisible by train.grad_accum_steps "
                f"({self.grad_accum_steps})"
            )


def _swd_size(size: int) -> bool:
    """Whether the Laplacian pyramid of SWD halves ``size`` exactly down to 16."""
    return size >= 16 and size % 16 == 0 and ((size // 16) & (size // 16 - 1)) == 0


@dataclass(frozen=True)
class DistillConfig:
    """What ``ddpm-cars distill`` does (:mod:`ddpm_cars.training.distill`); written to the
    student's distill.json, read back by ``--resume``. Every field but ``teacher`` is a flag
    of ``distill``."""

    teacher: str  # the teacher's checkpoint directory (--checkpoint)
    calls: int = option(4, "network calls of the final student: 1, 2, 4, 8, ...", metavar="N", limits=POSITIVE)
    teacher_calls: int = option(
        64,
        "DDIM steps of the run that the first round distils: --calls times a power of two",
        metavar="N",
        limits=POSITIVE,
    )
    round_steps: int = option(400, "optimizer steps per round (one halving)", metavar="N", limits=POSITIVE)
    lr: float = option(
        2e-4, "each round's learning rate, falling linearly to 0 within it", limits=Limits(low=0, low_open=True)
    )
    batch_size: int | None = option(None, "images per step (default: the run's)", metavar="N", limits=POSITIVE)
    seed: int = option(0, "seed of the images, steps and noise drawn", metavar="S")
    checkpoint_every: int = option(100, "steps between checkpoints", metavar="N", limits=POSITIVE)
    ema: bool = option(True, "distil the run's moving-average weights when it kept them")
    log_with: Tracking = option("none", "also log to TensorBoard (STUDENT_DIR/tensorboard) or Weights & Biases (wandb)")

    def __post_init__(self) -> None:
        check_fields(self, "distill")
        ratio, rest = divmod(self.teacher_calls, self.calls)
        if rest or ratio < 2 or ratio & (ratio - 1):
            raise UserError(
                f"--teacher-calls must be --calls times a power of two (2, 4, 8, ...): each round halves the "
                f"steps; got {self.teacher_calls} and {self.calls}"
            )

    @property
    def rounds(self) -> int:
        """Halvings from the teacher's calls to the student's."""
        return (self.teacher_calls // self.calls).bit_length() - 1

    def calls_in_round(self, r: int) -> int:
        """The student's calls in round ``r`` (from 0): half of its teacher's."""
        return self.teacher_calls // 2 ** (r + 1)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        if self.sample.steps is not None and self.sample.steps > self.diffusion.timesteps:
            raise UserError(
                f"sample.steps ({self.sample.steps}) cannot exceed the {self.diffusion.timesteps} diffusion timesteps"
            )
        if self.train.eval_every_steps and not _swd_size(self.data.image_size):
            raise UserError(
                f"--eval-every scores samples with SWD, which needs an image size of 16 * 2**k (16, 32, 64, 128, ...); "
                f"got {self.data.image_size}"
            )
        if self.train.activation_checkpointing and self.model.name != "res_attn_unet":
            raise UserError(
                "--activation-checkpointing is for the res_attn_unet model: recomputing SimpleUnet's blocks "
                "would count each batch twice in its BatchNorm statistics"
            )
        factor = self.model.downsample_factor
        if self.data.image_size % factor:
            raise UserError(
                f"data.image_size must be divisible by {factor} for a U-Net with "
                f"{len(self.model.channels)} widths; got {self.data.image_size}"
            )

    @property
    def image_channels(self) -> int:
        """Channels of the images and of the network's input (:attr:`DataConfig.channel_count`)."""
        return self.data.channel_count

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, saved_run: bool = False) -> RunConfig:
        """The config of ``data`` (sections of fields; a missing field takes its default).
        With ``saved_run``, ``data`` is a trained run's: one from before ``data.image_channels``
        existed trained on 3 channels, whatever its data."""
        sections = {f.name: f.type for f in fields(cls)}
        if not isinstance(data, dict):
            raise UserError(f"a config must be an object of sections {sorted(sections)}; got {reprlib.repr(data)}")
        unknown = set(data) - set(sections)
        if unknown:
            raise UserError(f"unknown config sections {sorted(map(str, unknown))}; allowed: {sorted(sections)}")
        values = {name: data.get(name, {}) for name in sections}
        if saved_run and isinstance(values["data"], dict) and "image_channels" not in values["data"]:
            values["data"] = {**values["data"], "image_channels": "3"}
        return cls(**{name: _section(name, section) for name, section in values.items()})

    def save(self, path: str | Path) -> None:
        from ddpm_cars.files import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, *, saved_run: bool = False) -> RunConfig:
        """The config in the JSON file ``path``; ``saved_run``: a trained run's (see :meth:`from_dict`)."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
            raise UserError(f"cannot read config {path}: {err}") from err
        try:
            return cls.from_dict(data, saved_run=saved_run)
        except UserError as err:
            raise UserError(f"bad config {path}: {err}") from err

    def replace(self, **sections: dict[str, Any]) -> RunConfig:
        """A copy with fields overridden per section: ``replace(train={"lr": 1e-4})``.

        A recipe's sampling steps above a new, shorter T (``diffusion={"timesteps": 20}``
        without ``sample={"steps": ...}``) become all T: the recipe's count is a cap. A sampling
        option the resulting sampler or spacing does not read is refused (``check_read``)."""
        changed = {name: dataclasses.replace(getattr(self, name), **values) for name, values in sections.items()}
        steps, timesteps = self.sample.steps, changed.get("diffusion", self.diffusion).timesteps
        if steps is not None and steps > timesteps and "steps" not in sections.get("sample", {}):
            changed["sample"] = dataclasses.replace(changed.get("sample", self.sample), steps=None)
        if "sample" in sections:
            changed["sample"].check_read(sections["sample"])
        return dataclasses.replace(self, **changed)

    def resumed_with(self, overrides: dict[str, dict[str, Any]]) -> RunConfig:
        """This saved config with the options given to a resume, of which only the fields
        declared ``resumable`` may differ from it: a one-line ``UserError`` names any other."""
        for section, values in overrides.items():
            declared = {f.name: f for f in fields(getattr(self, section))}
            for name, value in values.items():
                current = getattr(getattr(self, section), name)
                if not declared[name].metadata["resumable"] and current != value:
                    raise UserError(
                        f"cannot change {section}.{name} when resuming (the run has {current!r}); "
                        "start a new run with another --out"
                    )
        return self.replace(**overrides)

    def network_differences(self, other: RunConfig) -> list[tuple[str, Any, Any]]:
        """``(section.field, ours, theirs)`` for each field declared ``network`` on which the
        two configs differ: weights of one fit the other's network only when this is empty.
        An ``auto`` channel count, not yet read from the data, differs from none."""
        return [
            (f"{section.name}.{f.name}", ours, theirs)
            for section in fields(self)
            for mine in [getattr(self, section.name)]
            for f in fields(mine)
            for ours, theirs in [(getattr(mine, f.name), getattr(getattr(other, section.name), f.name))]
            if f.metadata["network"] and ours != theirs and "auto" not in (ours, theirs)
        ]


_SECTION_TYPES = {
    "model": ModelConfig,
    "diffusion": DiffusionConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
}


def _section(name: str, values: dict[str, Any]) -> Any:
    kind = _SECTION_TYPES[name]
    if not isinstance(values, dict):
        raise UserError(f"config section {name!r} must be an object of options; got {reprlib.repr(values)}")
    if name == "data" and "center_crop" in values:  # config.json of runs from before data.crop
        values = {**values, "crop": "center" if values["center_crop"] else "none"}
        del values["center_crop"]
    if name == "train" and "lr_decay" in values:  # config.json of runs from before train.lr_schedule
        values = {**values, "lr_schedule": {"none": "constant"}.get(values["lr_decay"], values["lr_decay"])}
        del values["lr_decay"]
    if name == "data" and type(values.get("image_channels")) is int:  # 1 or 3 written by hand
        values = {**values, "image_channels": str(values["image_channels"])}
    allowed = {f.name for f in fields(kind)}
    unknown = set(values) - allowed
    if unknown:
        raise UserError(f"unknown {name} options {sorted(map(str, unknown))}; allowed: {sorted(allowed)}")
    return kind(**values)
