"""Runs in and out of the diffusers format (``ddpm-cars export`` and ``ddpm-cars import``).

A ``res_attn_unet`` is, layer for layer, diffusers' ``UNet2DModel`` with
``resnet_time_scale_shift="scale_shift"`` (AdaGN), sines-then-cosines time embedding
(``flip_sin_to_cos=False, freq_shift=1``), 32-group norms, attention heads of
``head_channels`` and BigGAN resampling as ResNet up/down blocks, so the weights map one
to one: the only change is that a 1x1 convolution computing q, k and v together becomes
three linear layers. Its ``in_channels`` are the images' channels, 3 (RGB) or 1
(grayscale), and its ``out_channels`` as many, or twice as many with a learned variance.
The schedule, prediction and variance become a ``DDPMScheduler`` (the run's own betas,
``variance_type="learned_range"`` for a learned variance), and the two a ``DDPMPipeline``
folder, whose images have the run's channels (PIL mode ``L`` for grayscale). The run's
whole ``config.json`` travels along as ``ddpm_cars.json``, so an export imports back
exactly. diffusers is an optional dependency, imported here only.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddpm_cars.config import RunConfig
from ddpm_cars.data.dataset import IMAGE_CHANNELS
from ddpm_cars.errors import UserError
from ddpm_cars.files import atomic_write_text
from ddpm_cars.models import build_model
from ddpm_cars.models.res_attn_unet import NORM_GROUPS, AttentionBlock, Downsample, ResAttnUnet, ResBlock, Upsample
from ddpm_cars.run import CONFIG_FILE, Run, TrainState, latest_checkpoint, save_checkpoint
from ddpm_cars.schedule import training_betas

OUR_CONFIG = "ddpm_cars.json"
PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
FIXED_VARIANCE = {"beta": "fixed_large", "beta_tilde": "fixed_small"}


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise UserError(
            "the diffusers format needs diffusers: pip install diffusers (the extra ddpm-cars[diffusers])"
        ) from None
    return diffusers


def check_exportable(config: RunConfig) -> None:
    """A one-line ``UserError`` unless ``config``'s network has an exact diffusers twin."""
    m = config.model
    if m.name != "res_attn_unet":
        raise UserError(
            f"only the res_attn_unet network can be exported to diffusers; this run's is {m.name} "
            "(SimpleUnet's BatchNorm/ReLU blocks have no UNet2DModel equivalent)"
        )
    if any(width % NORM_GROUPS for width in m.channels):
        raise UserError(
            f"diffusers normalises every layer in {NORM_GROUPS} groups: the widths {m.channels} must be "
            f"multiples of {NORM_GROUPS}"
        )
    size = config.data.image_size
    for level, width in enumerate(m.channels):
        if (size // 2**level in m.attention_resolutions or level == len(m.channels) - 1) and width % m.head_channels:
            raise UserError(
                f"diffusers needs every attended width to be a multiple of --head-channels "
                f"{m.head_channels}; {width} is not"
            )


def unet_config(config: RunConfig) -> dict[str, Any]:
    """``UNet2DModel``'s arguments for ``config``'s network."""
    m, size = config.model, config.data.image_size
    attends = [size // 2**level in m.attention_resolutions for level in range(len(m.channels))]
    plain_down, plain_up = (
        ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if m.resblock_updown else ("DownBlock2D", "UpBlock2D")
    )
    return {
        "sample_size": size,
        "in_channels": config.image_channels,
        "out_channels": config.diffusion.out_channels(config.image_channels),
        "block_out_channels": list(m.channels),
        "layers_per_block": m.num_res_blocks,
        "down_block_types": ["AttnDownBlock2D" if a else plain_down for a in attends],
        "up_block_types": ["AttnUpBlock2D" if a else plain_up for a in reversed(attends)],
        "attention_head_dim": m.head_channels,
        "norm_num_groups": NORM_GROUPS,
        "attn_norm_num_groups": NORM_GROUPS,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "time_embedding_type": "positional",
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "resnet_time_scale_shift": "scale_shift",
        "downsample_padding": 1,
        "dropout": m.dropout,
        "downsample_type": "resnet" if m.resblock_updown else "conv",
        "upsample_type": "resnet" if m.resblock_updown else "conv",
        "num_class_embeds": m.num_classes + 1 if m.class_conditional else None,  # + the null class
    }


def scheduler_config(config: RunConfig) -> dict[str, Any]:
    """``DDPMScheduler``'s arguments: the run's own betas, prediction and variance."""
    d = config.diffusion
    betas = training_betas(dataclasses.replace(d, zero_terminal_snr=False))  # diffusers rescales them itself
    return {
        "num_train_timesteps": d.timesteps,
        "beta_schedule": "squaredcos_cap_v2" if d.schedule == "cosine" else "linear",
        "beta_start": float(betas[0]),
        "beta_end": float(betas[-1]),
        "trained_betas": betas.tolist(),
        "rescale_betas_zero_snr": d.zero_terminal_snr,
        "prediction_type": PREDICTION[d.prediction],
        "variance_type": "learned_range" if d.learn_variance else FIXED_VARIANCE[config.sample.variance],
        "clip_sample": config.sample.clip_x0,
        "clip_sample_range": 1.0,
    }


def _pairs(model: ResAttnUnet, unet: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(our module, its diffusers twin) for every module that holds weights, in order."""
    pairs: list[tuple[nn.Module, nn.Module]] = [
        (model.time_embed[1], unet.time_embedding.linear_1),
        (model.time_embed[3], unet.time_embedding.linear_2),
        (model.input_conv, unet.conv_in),
        (model.out[0], unet.conv_norm_out),
        (model.out[2], unet.conv_out),
    ]
    if model.label_embed is not None:
        pairs.append((model.label_embed.table, unet.class_embedding))
    ours_down, ours_up = iter(model.down), iter(model.up)
    for block in unet.down_blocks:
        attentions = list(getattr(block, "attentions", None) or [])
        for i, resnet in enumerate(block.resnets):
            layers = list(next(ours_down))
            pairs += [(layers[0], resnet)] + ([(layers[1], attentions[i])] if attentions else [])
        if block.downsamplers is not None:
            pairs.append((next(ours_down)[0], block.downsamplers[0]))
    pairs += [
        (model.middle[0], unet.mid_block.resnets[0]),
        (model.middle[1], unet.mid_block.attentions[0]),
        (model.middle[2], unet.mid_block.resnets[1]),
    ]
    for block in unet.up_blocks:
        attentions = list(getattr(block, "attentions", None) or [])
        for i, resnet in enumerate(block.resnets):
            layers = list(next(ours_up))
            pairs += [(layers[0], resnet)] + ([(layers[1], attentions[i])] if attentions else [])
            if i == len(block.resnets) - 1 and block.upsamplers is not None:
                pairs.append((layers[-1], block.upsamplers[0]))
    return pairs


def _copy(ours: nn.Module, theirs: nn.Module, to_diffusers: bool) -> None:
    """Copy the weights of one module into its twin, either way."""
    if isinstance(ours, ResBlock):
        names = [
            ("norm1", "norm1"),
            ("conv1", "conv1"),
            ("emb", "time_emb_proj"),
            ("norm2", "norm2"),
            ("conv2", "conv2"),
        ]
        if isinstance(ours.skip, nn.Conv2d):
            names.append(("skip", "conv_shortcut"))
        for a, b in names:
            _copy(getattr(ours, a), getattr(theirs, b), to_diffusers)
    elif isinstance(ours, AttentionBlock):
        _copy(ours.norm, theirs.group_norm, to_diffusers)
        c = ours.proj.weight.shape[0]
        linears = [theirs.to_q, theirs.to_k, theirs.to_v]
        if to_diffusers:  # the 1x1 conv's output channels are q, k, v, each head after head
            for i, linear in enumerate(linears):
                linear.weight.copy_(ours.qkv.weight[i * c : (i + 1) * c, :, 0, 0])
                linear.bias.copy_(ours.qkv.bias[i * c : (i + 1) * c])
            theirs.to_out[0].weight.copy_(ours.proj.weight[:, :, 0, 0])
            theirs.to_out[0].bias.copy_(ours.proj.bias)
        else:
            ours.qkv.weight.copy_(torch.cat([lin.weight for lin in linears])[:, :, None, None])
            ours.qkv.bias.copy_(torch.cat([lin.bias for lin in linears]))
            ours.proj.weight.copy_(theirs.to_out[0].weight[:, :, None, None])
            ours.proj.bias.copy_(theirs.to_out[0].bias)
    elif isinstance(ours, (Downsample, Upsample)):
        _copy(ours.conv, theirs.conv, to_diffusers)
    else:  # a plain layer of the same type and shape
        source, target = (ours, theirs) if to_diffusers else (theirs, ours)
        for name, tensor in source.state_dict().items():
            target.state_dict()[name].copy_(tensor)


@torch.no_grad()
def to_unet(model: ResAttnUnet, config: RunConfig) -> nn.Module:
    """A diffusers ``UNet2DModel`` computing what ``model`` computes."""
    unet = _diffusers().UNet2DModel(**unet_config(config)).eval()
    for ours, theirs in _pairs(model, unet):
        _copy(ours, theirs, to_diffusers=True)
    return unet


@torch.no_grad()
def from_unet(unet: nn.Module, config: RunConfig) -> nn.Module:
    """Our network for ``config`` with the weights of diffusers ``unet`` (its twin)."""
    model = build_model(config)
    for ours, theirs in _pairs(model, unet):
        _copy(ours, theirs, to_diffusers=False)
    return model


def export_run(source: str | Path, out: Path, *, ema: bool = True) -> Path:
    """Write run ``source`` as a ``DDPMPipeline`` folder ``out`` (with a model card)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder; pick another one")
    run = Run.open(source)
    check_exportable(run.config)
    diffusers = _diffusers()
    unet = to_unet(run.network(ema=ema), run.config)
    scheduler = diffusers.DDPMScheduler(**scheduler_config(run.config))
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(out))
    atomic_write_text(
        out / OUR_CONFIG,
        json.dumps({"config": run.config.to_dict(), "step": _step(run.checkpoint), "ema": ema}, indent=2) + "\n",
    )
    _write_card(run, out, ema)
    return out


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("step_"))


def _write_card(run: Run, out: Path, ema: bool) -> None:
    """``README.md``: what the model is, how it was trained, its scores and a grid of samples."""
    c = run.config
    lines = [
        "---",
        "library_name: diffusers",
        "tags: [ddpm, unconditional-image-generation, ddpm-cars]",
        "---",
        "",
        f"# {run.dir.name}: a DDPM trained with ddpm-cars",
        "",
        f"A denoising diffusion model of {c.data.image_size}x{c.data.image_size} "
        f"{'grayscale ' if c.image_channels == 1 else ''}images, trained with "
        f"ddpm-cars on `{c.data.source}` for {_step(run.checkpoint)} steps "
        f"({'moving-average' if ema else 'raw'} weights).",
        "",
        "```python",
        "from diffusers import DDPMPipeline",
        "",
        'pipeline = DDPMPipeline.from_pretrained("PATH")',
        f"images = pipeline(batch_size=16, num_inference_steps={c.diffusion.timesteps}).images",
        "```",
        "",
        "## Recipe",
        "",
        f"- network: residual U-Net, widths {list(c.model.channels)}, {c.model.num_res_blocks} blocks per level, "
        f"attention at {list(c.model.attention_resolutions)} px, {c.model.head_channels} channels per head, "
        f"dropout {c.model.dropout}"
        + (f", {c.model.num_classes} classes (+ a null class)" if c.model.class_conditional else ""),
        f"- diffusion: {c.diffusion.timesteps} steps, {c.diffusion.schedule} schedule, predicts "
        f"{c.diffusion.prediction}, "
        + ("learned variance (hybrid loss)" if c.diffusion.learn_variance else f"fixed variance ({c.sample.variance})"),
        f"- training: {c.train.optimizer} at lr {c.train.lr:g}, batch {c.train.batch_size}, EMA {c.train.ema_decay}",
    ]
    metrics = run.dir / "eval" / "metrics.json"
    if metrics.is_file():
        scores = json.loads(metrics.read_text())
        how = f"{scores.get('num_samples')} samples, {scores.get('sampler')} on {scores.get('steps') or 'all'} steps"
        lines += [
            "",
            f"## Scores (`ddpm-cars eval`: {how}, against {scores.get('reference')})",
            "",
            "| metric | value |",
            "| --- | ---: |",
        ]
        lines += [f"| {k} | {v:.4g} |" for k, v in scores.get("metrics", {}).items()]
    grids = sorted((run.dir / "samples").glob("*.png")) + [p for p in (run.dir / "grid.png",) if p.is_file()]
    if grids:
        shutil.copyfile(grids[-1], out / "samples.png")
        lines += ["", "## Samples", "", "![samples](samples.png)"]
    atomic_write_text(out / "README.md", "\n".join(lines) + "\n")


def import_pipeline(folder: Path, out: Path) -> Path:
    """Bring a diffusers ``UNet2DModel`` + ``DDPMScheduler`` folder in as run ``out``: an
    export of ours exactly (its ``ddpm_cars.json``), any other folder when its network has
    an exact twin here (else a one-line ``UserError`` naming the setting)."""
    if latest_checkpoint(out) is not None:
        raise UserError(f"{out} already holds checkpoints; pick another --out")
    diffusers = _diffusers()
    try:
        unet = diffusers.UNet2DModel.from_pretrained(str(folder), subfolder="unet")
        scheduler = dict(diffusers.DDPMScheduler.load_config(str(folder), subfolder="scheduler"))
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot read a diffusers UNet2DModel and scheduler in {folder}: {str(err).splitlines()[0]}"
        ) from err
    ours = folder / OUR_CONFIG
    if ours.is_file():
        saved = json.loads(ours.read_text())
        config, step = RunConfig.from_dict(saved["config"], saved_run=True), int(saved.get("step", 0))
        wanted = config.image_channels, config.diffusion.out_channels(config.image_channels)
        if _channels(dict(unet.config)) != wanted:
            raise UserError(
                f"cannot import: {ours} describes a network of {wanted[0]} input and {wanted[1]} output channels, "
                f"the unet has {unet.config.in_channels} and {unet.config.out_channels}"
            )
    else:
        config, step = config_from_diffusers(dict(unet.config), scheduler), 0
    model = from_unet(unet, config)
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / CONFIG_FILE)
    state = TrainState(step=step, epoch=0, batch_in_epoch=0, optimizer={}, rng=torch.ByteTensor())
    save_checkpoint(out, model, state, model if config.train.ema_decay else None)
    return out


# What a UNet2DModel must say to be our residual U-Net, and why.
_REQUIRED = {
    "time_embedding_type": ("positional", "a sinusoidal time embedding"),
    "flip_sin_to_cos": (False, "sines before cosines"),
    "freq_shift": (1, "frequencies exp(-log(10000) i / (d/2 - 1))"),
    "act_fn": ("silu", "SiLU"),
    "resnet_time_scale_shift": ("scale_shift", "adaptive group norm"),
    "norm_num_groups": (NORM_GROUPS, "32-group norms"),
    "attn_norm_num_groups": (NORM_GROUPS, "32-group norms in every attention block"),
    "center_input_sample": (False, "inputs as they are"),
    "class_embed_type": (None, "no class embedding but a table"),
    "num_class_embeds": (None, "no classes (only exports of ddpm-cars carry class names and the null class)"),
    "add_attention": (True, "attention in the middle block"),
}
_SCHEDULES = {"squaredcos_cap_v2": "cosine", "linear": "linear"}
_PREDICTIONS = {theirs: ours for ours, theirs in PREDICTION.items()}
_VARIANCES = {"learned_range": None, "fixed_small": "beta_tilde", "fixed_large": "beta"}


def config_from_diffusers(unet: dict[str, Any], scheduler: dict[str, Any]) -> RunConfig:
    """Our config for a UNet2DModel and DDPMScheduler configuration with an exact twin here."""
    _check_importable(unet, scheduler)
    channels, out_channels = _channels(unet)
    config = RunConfig.from_dict(
        {
            "model": _model_section(unet),
            "diffusion": _diffusion_section(scheduler, learned=out_channels == 2 * channels),
            "data": {"image_size": int(unet["sample_size"]), "image_channels": str(channels)},
            "sample": {
                "variance": _VARIANCES[scheduler["variance_type"]] or "beta",
                "clip_x0": bool(scheduler.get("clip_sample", True)),
            },
        }
    )
    _check_twin(config, unet, scheduler)
    return config


def _channels(unet: dict[str, Any]) -> tuple[Any, Any]:
    """A UNet2DModel config's ``in_channels`` and ``out_channels`` (diffusers' default: 3)."""
    return unet.get("in_channels", 3), unet.get("out_channels", 3)


def _refusal(name: str, value: Any, wanted: str) -> UserError:
    return UserError(f"cannot import: the diffusers config has {name}={value!r}; ddpm-cars needs {wanted}")


def _check_importable(unet: dict[str, Any], scheduler: dict[str, Any]) -> None:
    """A UserError naming the first setting of the diffusers configs that ddpm-cars has no twin of."""
    for name, (wanted, why) in _REQUIRED.items():
        if unet.get(name, wanted) != wanted:
            raise _refusal(name, unet.get(name), f"{wanted!r} ({why})")
    updown = unet.get("downsample_type", "conv") == "resnet"
    plain = {"ResnetDownsampleBlock2D", "AttnDownBlock2D"} if updown else {"DownBlock2D", "AttnDownBlock2D"}
    if not set(unet["down_block_types"]) <= plain:
        raise _refusal("down_block_types", unet["down_block_types"], f"blocks of {sorted(plain)}")
    channels, out_channels = _channels(unet)
    if type(channels) is not int or channels not in IMAGE_CHANNELS:
        raise _refusal("in_channels", channels, "3 (RGB) or 1 (grayscale)")
    learned = out_channels == 2 * channels
    if (
        type(out_channels) is not int
        or out_channels not in (channels, 2 * channels)
        or learned != (scheduler.get("variance_type") == "learned_range")
    ):
        raise _refusal(
            "out_channels",
            out_channels,
            f"{channels} (its in_channels), or {2 * channels} with variance_type 'learned_range'",
        )
    for name, table in [
        ("beta_schedule", _SCHEDULES),
        ("prediction_type", _PREDICTIONS),
        ("variance_type", _VARIANCES),
    ]:
        if scheduler.get(name) not in table:
            raise _refusal(name, scheduler.get(name), f"one of {sorted(table)}")


def _model_section(unet: dict[str, Any]) -> dict[str, Any]:
    """Our model section for a UNet2DModel config: attention at the levels of its Attn blocks."""
    size = int(unet["sample_size"])
    attention = tuple(
        size // 2**level for level, kind in enumerate(unet["down_block_types"]) if kind.startswith("Attn")
    )
    return {
        "name": "res_attn_unet",
        "channels": list(unet["block_out_channels"]),
        "num_res_blocks": unet["layers_per_block"],
        "attention_resolutions": list(attention),
        "head_channels": unet["attention_head_dim"],
        "dropout": unet.get("dropout", 0.0),
        "resblock_updown": unet.get("downsample_type", "conv") == "resnet",
    }


def _diffusion_section(scheduler: dict[str, Any], learned: bool) -> dict[str, Any]:
    """Our diffusion section for a DDPMScheduler config (``learned``: the network outputs its variance)."""
    timesteps = int(scheduler["num_train_timesteps"])
    return {
        "timesteps": timesteps,
        "schedule": _SCHEDULES[scheduler["beta_schedule"]],
        "learn_variance": learned,
        "prediction": _PREDICTIONS[scheduler["prediction_type"]],
        "loss": "l2",
        # our linear betas are given for T = 1000 and scaled by 1000 / T
        "beta_start": scheduler.get("beta_start", 1e-4) * timesteps / 1000,
        "beta_end": scheduler.get("beta_end", 0.02) * timesteps / 1000,
        "zero_terminal_snr": bool(scheduler.get("rescale_betas_zero_snr", False)),
    }


def _check_twin(config: RunConfig, unet: dict[str, Any], scheduler: dict[str, Any]) -> None:
    """A UserError unless ``config`` exports back to ``unet``'s every setting and to the scheduler's betas."""
    for name, wanted in unet_config(config).items():  # whatever the checks above did not name
        if name in unet and unet[name] != wanted and not (isinstance(wanted, list) and list(unet[name]) == wanted):
            raise _refusal(name, unet[name], repr(wanted))
    theirs = scheduler.get("trained_betas")
    ours = training_betas(dataclasses.replace(config.diffusion, zero_terminal_snr=False))
    if theirs is not None and (
        len(theirs) != config.diffusion.timesteps
        or (torch.tensor(theirs, dtype=torch.float64) - ours).abs().max() > 1e-6
    ):
        raise UserError("cannot import: the scheduler's trained_betas are neither a linear nor a cosine schedule")
