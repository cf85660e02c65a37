"""``ddpm-cars bench``: parameters, FLOPs, training and sampling speed, and peak memory of
the presets' networks at each precision on this device.

For each (preset, precision) the benchmark measures:

* the parameter count of the preset's network at the chosen image size;
* forward FLOPs per image, counted by ``torch.utils.flop_counter.FlopCounterMode`` on one
  float32 forward pass of a batch of 1 (matrix products, convolutions and attention,
  1 multiply-add = 2 FLOPs; elementwise operations and normalisation are not counted);
* training images/s: whole optimizer steps (the preset's ``training_loss`` under autocast,
  backward, the preset's gradient clipping and an AdamW step) on a fixed random batch,
  the median of ``repeats`` timed steps after ``warmup`` untimed ones;
* sampling speed: the median time of one reverse step of ancestral sampling (network under
  autocast in ``no_grad`` plus the float32 ``p_mean_variance`` update and the noise draw),
  reported as network evaluations/s (batch / step time) and as images/s for a whole run
  of the preset's T steps (batch / (step time x T));
* achieved FLOP/s, with the usual convention that a training step costs 3x the forward
  FLOPs (forward + backward ~ 2x forward): training = 3 x forward FLOPs x training img/s,
  sampling = forward FLOPs x evaluations/s;
* peak memory: on CUDA ``torch.cuda.max_memory_allocated`` per phase; on the CPU the peak
  resident set size of a fresh process that makes that one measurement (Python and torch
  included), so each measurement runs in a child started with the ``spawn`` method.

When ``diffusers`` is installed and the improved preset is benchmarked, diffusers'
``UNet2DModel`` at a comparable size is measured in the same run for comparison.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import multiprocessing
import platform
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ddpm_cars.config import PRESETS, RunConfig
from ddpm_cars.diffusion import training_loss
from ddpm_cars.errors import UserError
from ddpm_cars.models import build_model, count_parameters
from ddpm_cars.runtime import autocast, prepare_model, to_layout
from ddpm_cars.samplers import ancestral_sample, image_generators, randn
from ddpm_cars.schedule import build_schedule
from ddpm_cars.training.loop import resolve_device
from ddpm_cars.training.optim import build_optimizer, gradients_usable

PRECISIONS = ("fp32", "bf16")
DIFFUSERS = "diffusers-unet2d"  # the preset column of the diffusers row
DIFFUSERS_REFERENCE = "improved"  # the preset the diffusers UNet2DModel is sized like
DEFAULT_BATCH = {"cuda": 128, "cpu": 8}

ROW_KEYS = (
    "preset", "precision", "device", "image_size", "batch_size", "params", "forward_flops_per_image",
    "train_img_s", "sample_img_s", "sample_evals_s", "train_flop_s", "sample_flop_s", "peak_mem_mib",
)
FLOPS_NOTE = (
    "FLOPs: counted by torch.utils.flop_counter on one fp32 forward pass (convolutions, matrix products, "
    "attention; 1 multiply-add = 2 FLOPs). Training FLOP/s = 3 x forward FLOPs x training img/s "
    "(the backward pass taken as 2x the forward); sampling FLOP/s = forward FLOPs x evaluations/s."
)
MEMORY_NOTE = {
    "cuda": "Memory: torch.cuda.max_memory_allocated per phase (train / sample), in MiB.",
    "cpu": "Memory: peak resident set size (ru_maxrss) of the fresh process that made the measurement, "
    "Python and torch included, in MiB; in brackets its peak before the model was built.",
}
SAMPLE_NOTE = "Sampling img/s is for a whole run of T reverse steps; evals/s counts network evaluations (images x steps)."


class BenchmarkRows(list):
    """The result rows (dicts), with ``notes``: what was skipped and why."""

    def __init__(self, rows: Sequence[dict] = (), notes: Sequence[str] = ()):
        super().__init__(rows)
        self.notes = list(notes)


# -- what is measured ----------------------------------------------------------------------


def parse_names(text: str | Sequence[str], allowed: Sequence[str], what: str) -> list[str]:
    """``"a,b"`` (or a list) checked against ``allowed``; duplicates dropped, order kept."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in dict.fromkeys(names) if n]
    if not names:
        raise UserError(f"name at least one {what}; available: {', '.join(allowed)}")
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise UserError(f"unknown {what} {', '.join(map(repr, unknown))}; available: {', '.join(allowed)}")
    return names


def bench_config(preset_name: str, image_size: int) -> RunConfig:
    """The preset at ``image_size`` (a UserError when the size does not suit its U-Net)."""
    return PRESETS[preset_name].replace(data={"image_size": image_size})


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


def forward_flops(model: nn.Module, image_size: int, device: torch.device | str = "cpu") -> int:
    """FLOPs of one float32 forward pass on one ``image_size`` image (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    x = torch.randn(1, 3, image_size, image_size, device=device)
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


def measure(spec: dict) -> dict:
    """One result row: ``spec`` names the preset (or ``DIFFUSERS``), precision, image and batch
    size, repeats, warm-up, sampling steps, device and whether to compile."""
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    name, precision, size, batch = spec["preset"], spec["precision"], spec["image_size"], spec["batch_size"]
    reference = spec.get("reference", DIFFUSERS_REFERENCE)
    config = bench_config(reference if name == DIFFUSERS else name, size)  # diffusers: the reference's recipe
    tcfg, dcfg = config.train, config.diffusion
    base_rss = None if cuda else _peak_rss_mib()  # Python and torch alone, before the model
    torch.manual_seed(0)
    model = (diffusers_unet(size, dcfg.out_channels) if name == DIFFUSERS else build_model(config)).to(device)
    params = count_parameters(model)
    flops = forward_flops(model, size, device)
    net = prepare_model(model, channels_last=tcfg.channels_last, compile=spec.get("compile", False))

    # training: whole optimizer steps on one fixed batch
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    schedule = build_schedule(dcfg)
    optimizer = build_optimizer(model.parameters(), dataclasses.replace(tcfg, optimizer="adamw"))
    g = torch.Generator(device).manual_seed(0)
    x0 = torch.rand(batch, 3, size, size, generator=g, device=device) * 2 - 1
    model.train()

    def train_step() -> None:
        t = torch.randint(0, schedule.timesteps, (batch,), generator=g, device=device)
        noise = torch.randn(x0.shape, generator=g, device=device)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = training_loss(net, schedule, to_layout(x0, tcfg.channels_last), t, to_layout(noise, tcfg.channels_last), dcfg)
        loss.backward()
        if gradients_usable(model, loss.detach(), tcfg.grad_clip):
            optimizer.step()

    train_s = _median_seconds(train_step, spec["repeats"], spec["warmup"], sync)
    train_mem = _mib(torch.cuda.max_memory_allocated(device)) if cuda else None

    # sampling: single reverse steps, timed from ancestral_sample's per-step callback
    optimizer.state.clear()  # the moments and gradients are not needed to sample
    model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model.eval()
    steps = spec["warmup"] + spec["sample_steps"]
    short = build_schedule(dataclasses.replace(dcfg, timesteps=steps))  # the preset's schedule, truncated
    gens = image_generators(0, range(batch), device)
    x_T = randn((3, size, size), gens, device)
    stamps: list[float] = []

    def tick(*_: Any) -> None:
        sync()
        stamps.append(time.perf_counter())

    tick()
    ancestral_sample(
        net, short, x_T, gens, diffusion_config=dcfg, variance=config.sample.variance,
        clip_x0=config.sample.clip_x0, precision=precision, callback=tick,
    )
    step_times = [b - a for a, b in itertools.pairwise(stamps)][spec["warmup"]:]
    step_s = statistics.median(step_times)
    sample_mem = _mib(torch.cuda.max_memory_allocated(device)) if cuda else None

    train_img_s = batch / train_s
    evals_s = batch / step_s
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
        "peak_mem_mib": max(train_mem, sample_mem) if cuda else _peak_rss_mib(),
        "train_peak_mem_mib": train_mem,
        "sample_peak_mem_mib": sample_mem,
        "base_rss_mib": base_rss,
        "memory": "cuda max_memory_allocated" if cuda else (
            "peak RSS of the measuring process" if spec.get("isolated") else "peak RSS of this process (not isolated)"
        ),
        "timesteps": dcfg.timesteps,
        "compile": bool(spec.get("compile", False)),
        "reference": reference if name == DIFFUSERS else None,
    }


def _measure_in_child(spec: dict, num_threads: int) -> dict:
    """Runs in a spawned process: the same thread count as the parent, then :func:`measure`."""
    torch.set_num_threads(num_threads)
    return measure(spec)


def _measure_isolated(spec: dict) -> dict:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_measure_in_child, spec, torch.get_num_threads()).result()


def run_benchmark(
    presets: Sequence[str] | str,
    precisions: Sequence[str] | str = PRECISIONS,
    image_size: int = 64,
    batch_size: int | None = None,
    repeats: int = 5,
    warmup: int = 2,
    sample_steps: int = 5,
    device: str = "auto",
    compile: bool = False,
    progress: bool = True,
    *,
    isolate: bool | None = None,
    diffusers_reference: str = DIFFUSERS_REFERENCE,
) -> BenchmarkRows:
    """One row per preset x precision (see the module docstring for what each number means),
    plus diffusers' ``UNet2DModel`` at each precision when ``diffusers`` is installed and
    ``diffusers_reference`` is among the presets; ``rows.notes`` says what was skipped.

    ``isolate`` (default: on for the CPU, off for CUDA) measures each row in a fresh
    ``spawn`` child so that the CPU peak RSS is that measurement's alone.
    """
    presets = parse_names(presets, list(PRESETS), "preset")
    precisions = parse_names(precisions, PRECISIONS, "precision")
    for name, value, minimum in (("repeats", repeats, 1), ("warmup", warmup, 0), ("sample_steps", sample_steps, 1)):
        if value < minimum:
            raise UserError(f"{name} must be >= {minimum}; got {value}")
    dev = resolve_device(device)
    if dev.type not in DEFAULT_BATCH:
        raise UserError(f"the benchmark runs on cpu or cuda, not {dev}")
    batch = DEFAULT_BATCH[dev.type] if batch_size is None else batch_size
    if batch < 1:
        raise UserError(f"batch_size must be >= 1; got {batch}")
    for name in presets:  # a bad image size fails here, before anything is measured
        bench_config(name, image_size)
    isolate = dev.type == "cpu" if isolate is None else isolate

    notes: list[str] = []
    models = list(presets)
    if diffusers_reference in presets:
        if diffusers_available():
            models.append(DIFFUSERS)
        else:
            notes.append(f"diffusers UNet2DModel: skipped, diffusers is not installed (pip install diffusers "
                         f"to compare it with the {diffusers_reference} preset)")
    if dev.type == "cpu" and not isolate:
        notes.append("measured in one process, not a fresh one each: the peak RSS includes earlier measurements")
    if compile and warmup == 0:
        notes.append("--compile with --warmup 0: the first timed steps include compilation")
    jobs = [(name, precision) for name in models for precision in precisions]
    rows = BenchmarkRows(notes=notes)
    for i, (name, precision) in enumerate(jobs, 1):
        spec = {
            "preset": name, "precision": precision, "image_size": image_size, "batch_size": batch,
            "repeats": repeats, "warmup": warmup, "sample_steps": sample_steps, "device": str(dev),
            "compile": compile, "reference": diffusers_reference, "isolated": isolate,
        }
        if progress:
            print(f"[{i}/{len(jobs)}] {name} {precision}: {image_size}x{image_size}, batch {batch} on {dev} ...",
                  end="", file=sys.stderr, flush=True)
        tic = time.perf_counter()
        try:
            row = _measure_isolated(spec) if isolate else measure(spec)
        except torch.cuda.OutOfMemoryError:
            if progress:
                print(" out of memory", file=sys.stderr, flush=True)
            torch.cuda.empty_cache()
            rows.notes.append(f"{name} {precision}: skipped, out of GPU memory at batch {batch}")
            continue
        except BaseException:
            if progress:
                print(file=sys.stderr, flush=True)  # end the progress line before the error
            raise
        if progress:
            print(f" {time.perf_counter() - tic:.1f} s", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


# -- how it is shown -----------------------------------------------------------------------


def _flop_rate(value: float) -> str:
    return f"{value / 1e12:.2f} TFLOP/s" if value >= 1e12 else f"{value / 1e9:.1f} GFLOP/s"


def _rate(value: float) -> str:
    return f"{value:,.1f}" if value >= 10 else f"{value:.3g}"


def _memory(row: dict) -> str:
    if row.get("train_peak_mem_mib") is not None and row.get("sample_peak_mem_mib") is not None:
        return f"{row['train_peak_mem_mib']:,.0f} / {row['sample_peak_mem_mib']:,.0f}"
    if row.get("base_rss_mib") is not None:
        return f"{row['peak_mem_mib']:,.0f} ({row['base_rss_mib']:,.0f})"
    return f"{row['peak_mem_mib']:,.0f}"


def _on_cuda(rows: Sequence[dict]) -> bool:
    return any(r.get("train_peak_mem_mib") is not None for r in rows)


def _label(name: str) -> str:
    return "diffusers UNet2DModel" if name == DIFFUSERS else name


def speedups(rows: Sequence[dict]) -> list[str]:
    """bf16 / fp32 speed-ups per preset and, when diffusers was measured, improved / diffusers
    per precision, from rows of one run."""
    by = {(r["preset"], r["precision"]): r for r in rows}
    lines = []
    for name in dict.fromkeys(r["preset"] for r in rows):
        fp32, bf16 = by.get((name, "fp32")), by.get((name, "bf16"))
        if fp32 and bf16:
            lines.append(
                f"bf16 / fp32, {_label(name)}: training {bf16['train_img_s'] / fp32['train_img_s']:.2f}x, "
                f"sampling {bf16['sample_evals_s'] / fp32['sample_evals_s']:.2f}x"
            )
    for theirs in (r for r in rows if r["preset"] == DIFFUSERS):
        reference, precision = theirs.get("reference") or DIFFUSERS_REFERENCE, theirs["precision"]
        ours = by.get((reference, precision))
        if ours:
            lines.append(
                f"{reference} / diffusers UNet2DModel, {precision}: training "
                f"{ours['train_img_s'] / theirs['train_img_s']:.2f}x, "
                f"sampling {ours['sample_evals_s'] / theirs['sample_evals_s']:.2f}x"
            )
    return lines


def format_table(rows: Sequence[dict], notes: Sequence[str] | None = None) -> str:
    """A Markdown table, one row per preset x precision, then the speed-up ratios, the date,
    torch version and the notes on FLOPs and memory."""
    notes = list(getattr(rows, "notes", []) if notes is None else notes)
    cuda = _on_cuda(rows)
    memory = "peak mem MiB (train / sample)" if cuda else "peak RSS MiB (before the model)"
    lines = []
    devices = list(dict.fromkeys(r["device"] for r in rows))
    if devices:
        lines += [f"Device: {'; '.join(devices)}", ""]
    lines += [
        (
            "| preset | precision | image | batch | params | fwd GFLOP/img | train img/s | train FLOP/s "
            f"| T | sample img/s | evals/s | sample FLOP/s | {memory} |"
        ),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {_label(r['preset'])} | {r['precision']} | {r['image_size']} | {r['batch_size']} "
            f"| {r['params'] / 1e6:.2f} M | {r['forward_flops_per_image'] / 1e9:.3g} | {_rate(r['train_img_s'])} "
            f"| {_flop_rate(r['train_flop_s'])} | {r.get('timesteps', '')} | {_rate(r['sample_img_s'])} "
            f"| {_rate(r['sample_evals_s'])} | {_flop_rate(r['sample_flop_s'])} | {_memory(r)} |"
        )
    lines.append("")
    lines += speedups(rows)
    lines += [
        f"Date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}; torch {torch.__version__}",
        FLOPS_NOTE,
        SAMPLE_NOTE,
        MEMORY_NOTE["cuda" if cuda else "cpu"],
    ]
    if any(r.get("compile") for r in rows):
        lines.append("Compiled with torch.compile; compilation happens in the warm-up steps.")
    lines += [f"Note: {n}" for n in notes]
    return "\n".join(lines)


def report(rows: Sequence[dict], command: Sequence[str] = (), notes: Sequence[str] | None = None) -> dict:
    """The rows plus metadata, for ``--json``."""
    notes = list(getattr(rows, "notes", []) if notes is None else notes)
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "device": list(dict.fromkeys(r["device"] for r in rows)),
        "command": shlex.join(command),
        # fp32 on CUDA: cuDNN convolutions may use TF32 (PyTorch's default), matmuls only if allowed
        "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
        "notes": [FLOPS_NOTE, SAMPLE_NOTE, MEMORY_NOTE["cuda" if _on_cuda(rows) else "cpu"], *notes],
        "speedups": speedups(rows),
        "rows": [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in rows],
    }
