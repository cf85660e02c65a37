"""Typed configuration: one frozen dataclass per component, presets, JSON round trip.

Defaults are the seed recipe; every field is validated on construction so a bad
value fails at once with a ``ValueError`` naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import reprlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from ddpm_cars.validation import check_choice, check_positive, check_types

Loss = Literal["l1", "l2"]
Prediction = Literal["eps", "x0", "v"]
Precision = Literal["fp32", "bf16"]
Schedule = Literal["linear", "cosine"]
Optimizer = Literal["adam", "adamw"]
Variance = Literal["beta", "beta_tilde"]
BatchNormMode = Literal["eval", "batch"]
Sampler = Literal["ddpm", "ddim", "dpm++"]
Spacing = Literal["uniform", "quadratic"]
Split = Literal["train", "test", "all"]
Crop = Literal["none", "center", "bbox"]
ModelName = Literal["simple_unet", "res_attn_unet"]


@dataclass(frozen=True)
class ModelConfig:
    """The network. ``channels`` are the widths of the U-Net levels, top to bottom (for
    ``res_attn_unet``: base width times the channel multipliers, e.g. 128,256,384,512)."""

    name: ModelName = "simple_unet"
    channels: tuple[int, ...] = (64, 128, 256, 512, 1024)
    time_emb_dim: int = 32  # simple_unet only; res_attn_unet embeds t in channels[0] dims
    num_res_blocks: int = 2  # res_attn_unet: residual blocks per level
    attention_resolutions: tuple[int, ...] = (16, 8)  # res_attn_unet: feature-map sizes with attention
    head_channels: int = 64  # res_attn_unet: channels per attention head
    dropout: float = 0.0  # res_attn_unet
    resblock_updown: bool = False  # res_attn_unet: BigGAN-style resampling inside residual blocks
    class_conditional: bool = False  # a class embedding added to the time embedding
    class_names: tuple[str, ...] = ()  # the classes it knows, filled from the data when training starts

    def __post_init__(self) -> None:
        check_types(self, "model")
        check_choice("model.name", self.name, ModelName)
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if self.class_names and not self.class_conditional:
            raise ValueError("model.class_names are only for a class-conditional model (model.class_conditional)")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("model.class_names must be distinct")
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
        if len(self.channels) < 2 or any(c < 1 for c in self.channels):
            raise ValueError(f"model.channels needs >= 2 positive widths; got {self.channels}")
        if self.time_emb_dim < 4 or self.time_emb_dim % 2:
            raise ValueError(f"model.time_emb_dim must be even and >= 4; got {self.time_emb_dim}")
        check_positive("model.num_res_blocks", self.num_res_blocks)
        check_positive("model.head_channels", self.head_channels)
        if any(r < 1 for r in self.attention_resolutions):
            raise ValueError(f"model.attention_resolutions must be positive sizes; got {self.attention_resolutions}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1); got {self.dropout}")
        if self.name == "res_attn_unet":
            if self.channels[0] % 2:
                raise ValueError(f"model.channels[0] must be even for res_attn_unet; got {self.channels[0]}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def num_classes(self) -> int:
        """Classes the network is conditioned on; 0 for an unconditional network."""
        return len(self.class_names)


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = 1000
    schedule: Schedule = "linear"
    beta_start: float = 1e-4  # linear schedule only
    beta_end: float = 0.02  # linear schedule only
    loss: Loss = "l1"  # on the prediction target
    prediction: Prediction = "eps"  # what the network predicts: the noise, x_0, or v
    learn_variance: bool = False  # 6 output channels and the hybrid loss (Nichol & Dhariwal 2021)
    vlb_weight: float = 0.001  # lambda of L_hybrid = L_simple + lambda * L_vlb

    def __post_init__(self) -> None:
        check_types(self, "diffusion")
        check_positive("diffusion.timesteps", self.timesteps)
        check_choice("diffusion.schedule", self.schedule, Schedule)
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1; got {self.beta_start}, {self.beta_end}")
        check_choice("diffusion.loss", self.loss, Loss)
        check_choice("diffusion.prediction", self.prediction, Prediction)
        check_positive("diffusion.vlb_weight", self.vlb_weight, 0)

    @property
    def out_channels(self) -> int:
        """Channels the network must output for RGB images: the mean target, plus the
        variance interpolation when the variance is learned."""
        return 6 if self.learn_variance else 3


@dataclass(frozen=True)
class DataConfig:
    source: str = "toy-cars"  # "toy-cars", "stanford-cars", or a folder path
    split: Split = "train"
    image_size: int = 64
    # "none": squash to a square; "center": resize the short side, keep the centre square;
    # "bbox": a square around the annotated car (Stanford Cars), with bbox_margin around the box
    crop: Crop = "none"
    bbox_margin: float = 0.1  # crop: bbox only; added on each side, as a share of the box's longer side
    flip: bool = True
    toy_count: int = 8192  # images generated for --data toy-cars

    def __post_init__(self) -> None:
        check_types(self, "data")
        if not self.source:
            raise ValueError("data.source must be 'toy-cars', 'stanford-cars' or a folder path")
        check_choice("data.split", self.split, Split)
        check_choice("data.crop", self.crop, Crop)
        if not 0.0 <= self.bbox_margin <= 1.0:
            raise ValueError(f"data.bbox_margin must be in [0, 1]; got {self.bbox_margin}")
        check_positive("data.image_size", self.image_size, 16)
        check_positive("data.toy_count", self.toy_count)


@dataclass(frozen=True)
class SampleConfig:
    variance: Variance = "beta"  # sigma_t^2 = beta_t (Algorithm 2) or beta_tilde_t
    clip_x0: bool = True  # clip the predicted x_0 to [-1, 1] at every step
    batchnorm: BatchNormMode = "eval"  # BatchNorm statistics at sampling time
    num_images: int = 64  # size of the grids drawn during training
    sampler: Sampler = "ddpm"  # ancestral (Ho et al.), DDIM (Song et al.) or DPM-Solver++(2M) (Lu et al.)
    steps: int | None = None  # network evaluations per image; None: all T training steps
    eta: float = 0.0  # DDIM only: 0 deterministic, 1 the DDPM posterior variance
    spacing: Spacing = "uniform"  # how fewer steps are placed among the T

    def __post_init__(self) -> None:
        check_types(self, "sample")
        check_choice("sample.variance", self.variance, Variance)
        check_choice("sample.sampler", self.sampler, Sampler)
        check_choice("sample.spacing", self.spacing, Spacing)
        if self.steps is not None:
            check_positive("sample.steps", self.steps)
        if not self.eta >= 0:
            raise ValueError(f"sample.eta must be >= 0; got {self.eta}")
        check_choice("sample.batchnorm", self.batchnorm, BatchNormMode)
        check_positive("sample.num_images", self.num_images)


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 128
    lr: float = 1e-3
    epochs: int = 100
    max_steps: int | None = None  # stop after this many optimizer steps, whatever the epoch
    sample_every_epochs: int = 5
    checkpoint_every_steps: int = 500  # also written at the end of every epoch
    seed: int = 0
    ema_decay: float | None = None  # keep an EMA of the weights and sample from it
    optimizer: Optimizer = "adam"
    weight_decay: float = 0.0  # decoupled (AdamW) or L2 (Adam) weight decay
    warmup_steps: int = 0  # linear learning-rate warm-up over this many steps
    grad_clip: float | None = None  # clip the global gradient norm to this
    max_nonfinite_steps: int = 10  # consecutive non-finite losses before the run stops
    grad_accum_steps: int = 1  # micro-batches per optimizer step (batch_size is split among them)
    precision: Precision = "fp32"  # bf16: autocast matmuls and convolutions to bfloat16
    channels_last: bool = False  # NHWC memory layout for the network and its inputs
    compile: bool = False  # torch.compile the network
    eval_every_steps: int = 0  # score samples (SWD; FID when weights are present) every N steps; 0: never
    eval_samples: int = 256  # samples scored each time
    label_dropout: float = 0.1  # class-conditional models: share of labels replaced by the null class

    def __post_init__(self) -> None:
        check_types(self, "train")
        check_positive("train.batch_size", self.batch_size)
        if not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"train.seed must fit in 64 bits; got {self.seed}")
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0; got {self.lr}")
        check_positive("train.epochs", self.epochs)
        if self.max_steps is not None:
            check_positive("train.max_steps", self.max_steps)
        check_positive("train.sample_every_epochs", self.sample_every_epochs)
        check_positive("train.checkpoint_every_steps", self.checkpoint_every_steps)
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1) or None; got {self.ema_decay}")
        check_choice("train.optimizer", self.optimizer, Optimizer)
        check_positive("train.weight_decay", self.weight_decay, 0)
        check_positive("train.warmup_steps", self.warmup_steps, 0)
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"train.grad_clip must be > 0 or None; got {self.grad_clip}")
        check_positive("train.max_nonfinite_steps", self.max_nonfinite_steps)
        check_positive("train.grad_accum_steps", self.grad_accum_steps)
        check_positive("train.eval_every_steps", self.eval_every_steps, 0)
        check_positive("train.eval_samples", self.eval_samples, 4)
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"train.label_dropout must be in [0, 1); got {self.label_dropout}")
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) must be divisible by train.grad_accum_steps ({self.grad_accum_steps})"
            )
        check_choice("train.precision", self.precision, Precision)


def _swd_size(size: int) -> bool:
    """Whether the Laplacian pyramid of SWD halves ``size`` exactly down to 16."""
    return size >= 16 and size % 16 == 0 and ((size // 16) & (size // 16 - 1)) == 0


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        if self.sample.steps is not None and self.sample.steps > self.diffusion.timesteps:
            raise ValueError(
                f"sample.steps ({self.sample.steps}) cannot exceed the {self.diffusion.timesteps} diffusion timesteps"
            )
        if self.train.eval_every_steps and not _swd_size(self.data.image_size):
            raise ValueError(
                f"--eval-every scores samples with SWD, which needs an image size of 16 * 2**k (16, 32, 64, 128, ...); "
                f"got {self.data.image_size}"
            )
        factor = self.model.downsample_factor
        if self.data.image_size % factor:
            raise ValueError(
                f"data.image_size must be divisible by {factor} for a U-Net with "
                f"{len(self.model.channels)} widths; got {self.data.image_size}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        sections = {f.name: f.type for f in fields(cls)}
        if not isinstance(data, dict):
            raise ValueError(f"a config must be an object of sections {sorted(sections)}; got {reprlib.repr(data)}")
        unknown = set(data) - set(sections)
        if unknown:
            raise ValueError(f"unknown config sections {sorted(map(str, unknown))}; allowed: {sorted(sections)}")
        return cls(**{name: _section(name, data.get(name, {})) for name in sections})

    def save(self, path: str | Path) -> None:
        from ddpm_cars.files import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
            raise ValueError(f"cannot read config {path}: {err}") from err
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"bad config {path}: {err}") from err

    def replace(self, **sections: dict[str, Any]) -> RunConfig:
        """A copy with fields overridden per section: ``replace(train={"lr": 1e-4})``."""
        changed = {name: dataclasses.replace(getattr(self, name), **values) for name, values in sections.items()}
        return dataclasses.replace(self, **changed)


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
        raise ValueError(f"config section {name!r} must be an object of options; got {reprlib.repr(values)}")
    if name == "data" and "center_crop" in values:  # config.json of runs from before data.crop
        values = {**values, "crop": "center" if values["center_crop"] else "none"}
        del values["center_crop"]
    allowed = {f.name for f in fields(kind)}
    unknown = set(values) - allowed
    if unknown:
        raise ValueError(f"unknown {name} options {sorted(map(str, unknown))}; allowed: {sorted(allowed)}")
    return kind(**values)


# The original recipe: SimpleUnet 64->1024, linear betas 1e-4..0.02 over 1000 steps,
# L1 on the noise, Adam 1e-3, batch 128, 64x64, a sample grid every 5 epochs.
SEED = RunConfig()

# Nichol & Dhariwal (2021) with the architecture of Dhariwal & Nichol (2021): a residual
# U-Net (widths 128-512, attention at 16x16 and 8x8, BigGAN resampling, AdaGN, dropout),
# cosine schedule, learned variance with the hybrid loss, AdamW 1e-4 with warm-up and
# clipping, EMA 0.9999, bf16 autocast. The recipe for Stanford Cars on a GPU.
IMPROVED = RunConfig(
    model=ModelConfig(
        name="res_attn_unet",
        channels=(128, 256, 384, 512),
        num_res_blocks=2,
        attention_resolutions=(16, 8),
        head_channels=64,
        dropout=0.1,
        resblock_updown=True,
    ),
    diffusion=DiffusionConfig(schedule="cosine", loss="l2", prediction="eps", learn_variance=True),
    data=DataConfig(image_size=64),
    train=TrainConfig(
        batch_size=128,
        lr=1e-4,
        epochs=500,
        optimizer="adamw",
        warmup_steps=500,
        grad_clip=1.0,
        ema_decay=0.9999,
        precision="bf16",
        channels_last=True,
        sample_every_epochs=10,
        checkpoint_every_steps=1000,
    ),
)

# The improved recipe shrunk to run in seconds: for smoke tests and trying options.
TINY = RunConfig(
    model=ModelConfig(
        name="res_attn_unet", channels=(32, 64), num_res_blocks=1, attention_resolutions=(8,), head_channels=32
    ),
    diffusion=DiffusionConfig(timesteps=100, schedule="cosine", loss="l2", learn_variance=True),
    data=DataConfig(source="toy-cars", image_size=16, toy_count=256),
    train=TrainConfig(
        batch_size=16, lr=2e-4, epochs=2, optimizer="adamw", warmup_steps=10, grad_clip=1.0, ema_decay=0.99,
        sample_every_epochs=1, checkpoint_every_steps=50,
    ),
    sample=SampleConfig(num_images=16),
)

# The improved recipe small enough to train on 2 CPU cores in about 7 minutes: a 5.5 M-
# parameter residual U-Net at 32x32 (attention at 8x8), learned variance, cosine schedule,
# bf16, 640 steps of batch 32. In about the time the seed recipe needs for blurry cars it
# draws clean ones (BENCHMARKS.md). No grid during training, but the offline metric (SWD)
# on 64 samples every 160 steps; the demo draws its own grid at the end, with ancestral
# sampling on 50 of the 1000 steps.
DEMO = RunConfig(
    model=ModelConfig(
        name="res_attn_unet", channels=(64, 128, 128), num_res_blocks=1, attention_resolutions=(8,),
        head_channels=64, resblock_updown=True,
    ),
    diffusion=DiffusionConfig(schedule="cosine", loss="l2", learn_variance=True),
    data=DataConfig(source="toy-cars", image_size=32, toy_count=4096),
    train=TrainConfig(
        batch_size=32, lr=5e-4, epochs=5, optimizer="adamw", warmup_steps=100, grad_clip=1.0, ema_decay=0.995,
        precision="bf16", channels_last=True, sample_every_epochs=10, checkpoint_every_steps=200,
        eval_every_steps=160, eval_samples=64,
    ),
    sample=SampleConfig(num_images=16, steps=50),  # respaced ancestral sampling: as clean as 1000 steps here
)

PRESETS: dict[str, RunConfig] = {"improved": IMPROVED, "seed": SEED, "demo": DEMO, "tiny": TINY}
DEFAULT_PRESET = "improved"


def preset(name: str) -> RunConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}") from None
