"""The named recipes ``train --preset`` starts from: each a :class:`~ddpm_cars.config.RunConfig`.

``seed`` is the original description; ``improved`` is Nichol & Dhariwal (2021) with the
network of Dhariwal & Nichol (2021), for Stanford Cars on a GPU; ``demo`` and ``tiny`` are
that recipe shrunk for 2 CPU cores and for smoke tests.
"""

from __future__ import annotations

from ddpm_cars.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig, SampleConfig, TrainConfig
from ddpm_cars.errors import UserError

# The original recipe: SimpleUnet 64->1024, linear betas 1e-4..0.02 over 1000 steps,
# L1 on the noise, Adam 1e-3, batch 128, 64x64, a sample grid every 5 epochs.
SEED = RunConfig()

# Nichol & Dhariwal (2021) with the architecture of Dhariwal & Nichol (2021): a residual
# U-Net (widths 128-512, attention at 16x16 and 8x8, BigGAN resampling, AdaGN, dropout),
# cosine schedule, learned variance with the hybrid loss, AdamW 1e-4 with warm-up and
# clipping, EMA 0.9999, mixed precision (``auto``). The recipe for Stanford Cars on a GPU.
# Samples (grids, ``sample``, ``eval``) are SDE-DPM-Solver++(2M) on 20 karras-spaced steps: on a
# model of this recipe trained 3,000 steps, as good as all 1,000 ancestral steps on SWD at 1/50
# of the calls, where 20 ancestral steps were 16% worse (docs/benchmarks/samplers_eps.md,
# "The eps model against network calls");
# runs with a shorter T use all of it.
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
        channels_last=True,
        sample_every_epochs=10,
        checkpoint_every_steps=1000,
    ),
    sample=SampleConfig(sampler="dpm++sde", steps=20, spacing="karras"),
)

# The improved recipe shrunk to run in seconds: for smoke tests and trying options.
TINY = RunConfig(
    model=ModelConfig(
        name="res_attn_unet", channels=(32, 64), num_res_blocks=1, attention_resolutions=(8,), head_channels=32
    ),
    diffusion=DiffusionConfig(timesteps=100, schedule="cosine", loss="l2", learn_variance=True),
    data=DataConfig(source="toy-cars", image_size=16, toy_count=256),
    train=TrainConfig(
        batch_size=16,
        lr=2e-4,
        epochs=2,
        optimizer="adamw",
        warmup_steps=10,
        grad_clip=1.0,
        ema_decay=0.99,
        sample_every_epochs=1,
        checkpoint_every_steps=50,
    ),
    sample=SampleConfig(num_images=16),
)

# The improved recipe small enough to train on 2 CPU cores in minutes: a 2.86 M-parameter
# residual U-Net at 32x32 (widths 32-64-128, attention at 8x8; plain up- and downsampling,
# 17% fewer FLOPs than resampling residual blocks), v-prediction with Min-SNR-5 weighting,
# learned variance, cosine schedule, precision auto, 300 steps of batch 32 at lr 1e-3 with an
# EMA over about the last 100 steps; samples are SDE-DPM-Solver++(2M) on 20 karras steps. Over
# three trainings per arm, as good as the eps-prediction demo of 64-128-128 widths trained 512
# steps on SWD (-0.4, 95% interval -7.8 to +7.0) with the judge's FD not separable (+1.33,
# -0.48 to +3.14), in a third of the training time (docs/benchmarks/recipe.md, "The demo in
# half the time"). Contiguous layout: channels-last trained slower in fp32.
# The demo samples and scores 144 images when training ends, with no evaluation during it.
DEMO = RunConfig(
    model=ModelConfig(
        name="res_attn_unet",
        channels=(32, 64, 128),
        num_res_blocks=1,
        attention_resolutions=(8,),
        head_channels=64,
    ),
    diffusion=DiffusionConfig(schedule="cosine", loss="l2", prediction="v", learn_variance=True, min_snr_gamma=5.0),
    data=DataConfig(source="toy-cars", image_size=32, toy_count=4096),
    train=TrainConfig(
        batch_size=32,
        lr=1e-3,
        epochs=3,
        max_steps=300,
        optimizer="adamw",
        warmup_steps=50,
        grad_clip=1.0,
        ema_decay=0.99,
        sample_every_epochs=10,
        checkpoint_every_steps=200,
    ),
    sample=SampleConfig(num_images=16, sampler="dpm++sde", steps=20, spacing="karras"),
)

PRESETS: dict[str, RunConfig] = {"improved": IMPROVED, "seed": SEED, "demo": DEMO, "tiny": TINY}
DEFAULT_PRESET = "improved"


def preset(name: str) -> RunConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}") from None
