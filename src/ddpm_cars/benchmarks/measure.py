"""One measurement of ``ddpm-cars bench``: a preset's network (or diffusers' ``UNet2DModel``
sized like one) at one precision on one device.

A measurement gives:

* the parameter count of the network at the chosen image size;
* forward FLOPs per image, counted by ``torch.utils.flop_counter.FlopCounterMode`` on one
  float32 forward pass of a batch of 1 (matrix products, convolutions and attention,
  1 multiply-add = 2 FLOPs; elementwise operations and normalisation are not counted);
* training images/s: whole optimizer steps (the preset's ``Denoiser.loss``, the network under
  autocast, backward, the preset's gradient clipping and an AdamW step) on a fixed random
  batch, the median of ``repeats`` timed steps after ``warmup`` untimed ones;
* sampling speed: the median time of one reverse step of ancestral sampling (network under
  autocast in ``no_grad`` plus the float32 update and the noise draw), reported as network
  evaluations/s (batch / step time) and as images/s for a whole run of the preset's T steps
  (batch / (step time x T));
* achieved FLOP/s, with the usual convention that a training step costs 3x the forward
  FLOPs (forward + backward ~ 2x forward): training = 3 x forward FLOPs x training img/s,
  sampling = forward FLOPs x evaluations/s;
* peak memory: on CUDA ``torch.cuda.max_memory_allocated`` per phase; on the CPU the peak
  resident set size of the measuring process (Python and torch included), which is that
  measurement's alone when it runs in a fresh child (:func:`measure_isolated`).
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch
from torch import nn

from ddpm_cars.benchmarks.loop import measure_loop
from ddpm_cars.config import RunConfig
from ddpm_cars.denoiser import Denoiser
from ddpm_cars.models import build_model, count_parameters
from ddpm_cars.presets import PRESETS
from ddpm_cars.runtime import prepare_model, to_layout
from ddpm_cars.samplers import ancestral_sample, image_generators, randn
from ddpm_cars.schedule import build_schedule
from ddpm_cars.training.optim import build_optimizer, gradients_usable, step_unless

PRECISIONS = ("fp32", "bf16", "fp16")
DIFFUSERS = "diffusers-unet2d"  # the preset column of the diffusers row
DIFFUSERS_REFERENCE = "improved"  # the preset the diffusers UNet2DModel is sized like


def bench_config(preset_name: str, image_size: int) -> RunConfig:
    """The preset at ``image_size`` (a UserError when the size does not suit its U-Net)."""
    return PRESETS[preset_name].replace(data={"image_size": image_size})


# -- diffusers' UNet2DModel, for comparison -------------------------------------------------


def diffusers_available() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


class DiffusersAdapter(nn.Module):
    """A diffusers ``UNet2DModel`` called as ``model(x_t, t) -> tensor`` like this project's networks."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, t).sample


def diffusers_unet(image_size: int, out_channels: int = 6) -> nn.Module:
    """diffusers' ``UNet2DModel`` sized like the improved preset's network (widths 128-512, two
    residual blocks per level, attention at the two lowest resolutions, 64-channel heads,
    scale-shift time conditioning), wrapped by :class:`DiffusersAdapter`. Needs ``diffusers``."""
    from diffusers import UNet2DModel  # optional: imported only when asked for

    unet = UNet2DModel(
        sample_size=image_size,
        in_channels=3,
        out_channels=out_channels,
        layers_per_block=2,
        block_out_channels=(128, 256, 384, 512),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=64,
        resnet_time_scale_shift="scale_shift",
        norm_num_groups=32,
    )
    return DiffusersAdapter(unet)


# -- counting, timing, memory --------------------------------------------------------------


def forward_flops(model: nn.Module, image_size: int, device: torch.device | str = "cpu", channels: int = 3) -> int:
    """FLOPs of one float32 forward pass on one ``image_size`` image of ``channels`` (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    x = torch.randn(1, channels, image_size, image_size, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x, t)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine() or "unknown"
    return f"cpu: {cpu}, {torch.get_num_threads()} threads"


def _median_seconds(fn: Callable[[], Any], repeats: int, warmup: int, sync: Callable[[], None]) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        tic = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def _mib(num_bytes: float) -> float:
    return num_bytes / 2**20


def _peak_rss_mib() -> float:
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024 if sys.platform != "darwin" else _mib(kib)  # bytes on macOS


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_cuda_mib(device: torch.device) -> float | None:
    return _mib(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


# -- one measurement -----------------------------------------------------------------------


def measure(spec: dict) -> dict:
    """One result row: ``spec`` names the preset (or ``DIFFUSERS``), precision, image and batch
    size, repeats, warm-up, sampling steps, device and whether to compile and to
    checkpoint activations (the residual U-Net's); with ``loop``, the row also holds the
    whole training loop's figures (:mod:`ddpm_cars.benchmarks.loop`) on ``data``."""
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    name, precision, size, batch = spec["preset"], spec["precision"], spec["image_size"], spec["batch_size"]
    reference = spec.get("reference", DIFFUSERS_REFERENCE)
    config = bench_config(reference if name == DIFFUSERS else name, size)  # diffusers: the reference's recipe
    dcfg = config.diffusion
    base_rss = None if cuda else _peak_rss_mib()  # Python and torch alone, before the model
    torch.manual_seed(0)
    model = (diffusers_unet(size, dcfg.out_channels(3)) if name == DIFFUSERS else build_model(config)).to(device)
    params = count_parameters(model)
    flops = forward_flops(model, size, device, config.image_channels)
    checkpointing = bool(spec.get("activation_checkpointing")) and hasattr(model, "set_activation_checkpointing")
    if checkpointing:
        model.set_activation_checkpointing(True)  # recomputation is not counted in the FLOPs: the model's own
    net = prepare_model(model, channels_last=config.train.channels_last, compile=spec.get("compile", False))

    denoiser = Denoiser(net, build_schedule(dcfg), dcfg, size, precision, image_channels=config.image_channels)
    train_s, train_mem = _time_training(model, denoiser, config, spec, sync)
    step_s, sample_mem = _time_sampling(model, denoiser, config, spec, sync)
    train_img_s = batch / train_s
    evals_s = batch / step_s
    peak_mem = max(train_mem, sample_mem) if cuda else _peak_rss_mib()
    del model, net, denoiser  # the loop below builds its own
    loop = {}
    if spec.get("loop") and name != DIFFUSERS:
        loop = measure_loop(spec)
    return {
        "preset": name,
        "precision": precision,
        "device": device_name(device),
        "image_size": size,
        "batch_size": batch,
        "params": params,
        "forward_flops_per_image": flops,
        "train_img_s": train_img_s,
        "sample_img_s": evals_s / dcfg.timesteps,
        "sample_evals_s": evals_s,
        "train_flop_s": 3 * flops * train_img_s,
        "sample_flop_s": flops * evals_s,
        "peak_mem_mib": peak_mem,
        "train_peak_mem_mib": train_mem,
        "sample_peak_mem_mib": sample_mem,
        "base_rss_mib": base_rss,
        "memory": "cuda max_memory_allocated"
        if cuda
        else (
            "peak RSS of the measuring process" if spec.get("isolated") else "peak RSS of this process (not isolated)"
        ),
        "timesteps": dcfg.timesteps,
        "compile": bool(spec.get("compile", False)),
        "activation_checkpointing": checkpointing,
        "reference": reference if name == DIFFUSERS else None,
        **loop,
    }


def _time_training(model: nn.Module, denoiser: Denoiser, config: RunConfig, spec: dict, sync: Callable[[], None]):
    """(median seconds of a whole optimizer step on one fixed batch, peak CUDA MiB or None)."""
    device, batch, size, tcfg = torch.device(spec["device"]), spec["batch_size"], spec["image_size"], config.train
    _reset_peak_memory(device)
    optimizer = build_optimizer(model.parameters(), dataclasses.replace(tcfg, optimizer="adamw"), device)
    g = torch.Generator(device).manual_seed(0)
    x0 = torch.rand(batch, config.image_channels, size, size, generator=g, device=device) * 2 - 1
    model.train()

    def train_step() -> None:
        t = torch.randint(0, denoiser.schedule.timesteps, (batch,), generator=g, device=device)
        noise = torch.randn(x0.shape, generator=g, device=device)
        optimizer.zero_grad(set_to_none=True)
        loss = denoiser.loss(to_layout(x0, tcfg.channels_last), t, to_layout(noise, tcfg.channels_last))
        loss.backward()
        step_unless(optimizer, gradients_usable(model, loss.detach(), tcfg.grad_clip))

    seconds = _median_seconds(train_step, spec["repeats"], spec["warmup"], sync)
    memory = _peak_cuda_mib(device)
    optimizer.state.clear()  # the moments and gradients are not needed to sample
    model.zero_grad(set_to_none=True)
    return seconds, memory


def _time_sampling(model: nn.Module, denoiser: Denoiser, config: RunConfig, spec: dict, sync: Callable[[], None]):
    """(median seconds of one reverse step of ancestral sampling, timed from its per-step
    callback on the preset's schedule truncated to the steps run, peak CUDA MiB or None)."""
    device, batch, size = torch.device(spec["device"]), spec["batch_size"], spec["image_size"]
    _reset_peak_memory(device)
    model.eval()
    steps = spec["warmup"] + spec["sample_steps"]
    short = build_schedule(dataclasses.replace(config.diffusion, timesteps=steps))  # the preset's, truncated
    gens = image_generators(0, range(batch), device)
    x_T = randn((config.image_channels, size, size), gens, device)
    stamps: list[float] = []

    def tick(*_: Any) -> None:
        sync()
        stamps.append(time.perf_counter())

    tick()
    ancestral_sample(
        dataclasses.replace(denoiser, schedule=short),
        x_T,
        gens,
        variance=config.sample.variance,
        clip_x0=config.sample.clip_x0,
        callback=tick,
    )
    step_s = statistics.median([b - a for a, b in itertools.pairwise(stamps)][spec["warmup"] :])
    return step_s, _peak_cuda_mib(device)


# -- in a fresh process --------------------------------------------------------------------


def _measure_in_child(spec: dict, num_threads: int) -> dict:
    """Runs in a spawned process: the same thread count as the parent, then :func:`measure`."""
    torch.set_num_threads(num_threads)
    return measure(spec)


def measure_isolated(spec: dict) -> dict:
    """:func:`measure` in a fresh child started with the ``spawn`` method, so that the CPU
    peak RSS is that measurement's alone."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_measure_in_child, spec, torch.get_num_threads()).result()
