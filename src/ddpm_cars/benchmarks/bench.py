"""``ddpm-cars bench``: parameters, FLOPs, training and sampling speed, and peak memory of
the presets' networks at each precision on this device.

:func:`run_benchmark` makes, as its :class:`BenchSettings` say, one measurement
(:func:`ddpm_cars.benchmarks.measure.measure`, whose docstring says what each number means)
per preset x precision -- on the CPU each in a fresh process, so that its peak RSS is its
own -- and :func:`format_table` / :func:`report` show them. When ``diffusers`` is
installed and the improved preset is benchmarked, diffusers' ``UNet2DModel`` at a
comparable size is measured in the same run for comparison.
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

from ddpm_cars.benchmarks.measure import (
    DIFFUSERS,
    DIFFUSERS_REFERENCE,
    PRECISIONS,
    bench_config,
    diffusers_available,
    measure,
    measure_isolated,
)
from ddpm_cars.benchmarks.peaks import device_peak_flops
from ddpm_cars.errors import UserError
from ddpm_cars.parallel import resolve_device
from ddpm_cars.presets import PRESETS

DEFAULT_BATCH = {"cuda": 128, "cpu": 8}

ROW_KEYS = (
    "preset",
    "precision",
    "device",
    "image_size",
    "batch_size",
    "params",
    "forward_flops_per_image",
    "train_img_s",
    "sample_img_s",
    "sample_evals_s",
    "train_flop_s",
    "sample_flop_s",
    "peak_mem_mib",
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
MFU_NOTE = (
    "MFU: training FLOP/s over the device's dense peak for the precision (bf16/fp16 tensor cores; TF32 for fp32, "
    "which cuDNN uses for float32 convolutions); blank where the peak is unknown (CPUs: give it with --peak-tflops)."
)
LOOP_NOTE = (
    "Loop: the whole training loop of the preset (batches from the data cache, flips, noise, guarded update, EMA, "
    "loss reads; no checkpoints or grids) after the warm-up steps; to 1st step: seconds from the start of the "
    "session (data cache opened or built, model built) to its first step."
)
SAMPLE_NOTE = (
    "Sampling img/s is for a whole run of T reverse steps; evals/s counts network evaluations (images x steps)."
)


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


def _check_counts(repeats: int, warmup: int, sample_steps: int) -> None:
    for name, value, minimum in (("repeats", repeats, 1), ("warmup", warmup, 0), ("sample_steps", sample_steps, 1)):
        if value < minimum:
            raise UserError(f"{name} must be >= {minimum}; got {value}")


def _device_and_batch(device: str, batch_size: int | None) -> tuple[torch.device, int]:
    """The device to measure on and the batch size (its default when ``batch_size`` is None)."""
    dev = resolve_device(device)
    if dev.type not in DEFAULT_BATCH:
        raise UserError(f"the benchmark runs on cpu or cuda, not {dev}")
    batch = DEFAULT_BATCH[dev.type] if batch_size is None else batch_size
    if batch < 1:
        raise UserError(f"batch_size must be >= 1; got {batch}")
    return dev, batch


def _models_and_notes(
    presets: list[str], diffusers_reference: str, cpu: bool, isolate: bool, compile: bool, warmup: int
) -> tuple[list[str], list[str]]:
    """The networks to measure (the presets, plus diffusers' when it can be compared) and
    the notes on what was skipped or how the numbers were taken."""
    notes: list[str] = []
    models = list(presets)
    if diffusers_reference in presets:
        if diffusers_available():
            models.append(DIFFUSERS)
        else:
            notes.append(
                f"diffusers UNet2DModel: skipped, diffusers is not installed (pip install diffusers "
                f"to compare it with the {diffusers_reference} preset)"
            )
    if cpu and not isolate:
        notes.append("measured in one process, not a fresh one each: the peak RSS includes earlier measurements")
    if compile and warmup == 0:
        notes.append("--compile with --warmup 0: the first timed steps include compilation")
    return models, notes


def _measure_one(spec: dict, label: str, progress: bool) -> dict | None:
    """One row, with a progress line on stderr; None when the GPU ran out of memory."""
    if progress:
        print(label, end="", file=sys.stderr, flush=True)
    tic = time.perf_counter()
    try:
        row = measure_isolated(spec) if spec["isolated"] else measure(spec)
    except torch.cuda.OutOfMemoryError:
        if progress:
            print(" out of memory", file=sys.stderr, flush=True)
        torch.cuda.empty_cache()
        return None
    except BaseException:
        if progress:
            print(file=sys.stderr, flush=True)  # end the progress line before the error
        raise
    if progress:
        print(f" {time.perf_counter() - tic:.1f} s", file=sys.stderr, flush=True)
    return row


@dataclass(frozen=True)
class BenchSettings:
    """What :func:`run_benchmark` measures, and how.

    ``presets`` and ``precisions`` are names or ``"a,b"`` strings; ``batch_size`` None is
    the device's default (:data:`DEFAULT_BATCH`). ``isolate`` (None: on for the CPU, off for
    CUDA) measures each row in a fresh ``spawn`` child so that the CPU peak RSS is that
    measurement's alone. ``peak_tflops`` overrides the device's peak for the MFU. With
    ``loop``, each preset's row also times the whole training loop on ``data``
    (:mod:`ddpm_cars.benchmarks.loop`).
    """

    presets: Sequence[str] | str
    precisions: Sequence[str] | str = PRECISIONS
    image_size: int = 64
    batch_size: int | None = None
    repeats: int = 5
    warmup: int = 2
    sample_steps: int = 5
    device: str = "auto"
    compile: bool = False
    isolate: bool | None = None
    diffusers_reference: str = DIFFUSERS_REFERENCE
    peak_tflops: float | None = None
    activation_checkpointing: bool = False
    loop: bool = False
    data: str = "toy-cars"


def _spec(settings: BenchSettings, name: str, precision: str, device: torch.device, batch: int, isolate: bool) -> dict:
    """What one measurement (:func:`ddpm_cars.benchmarks.measure.measure`) is given."""
    return {
        "preset": name,
        "precision": precision,
        "image_size": settings.image_size,
        "batch_size": batch,
        "repeats": settings.repeats,
        "warmup": settings.warmup,
        "sample_steps": settings.sample_steps,
        "device": str(device),
        "compile": settings.compile,
        "reference": settings.diffusers_reference,
        "isolated": isolate,
        "activation_checkpointing": settings.activation_checkpointing,
        "loop": settings.loop,
        "data": settings.data,
    }


def run_benchmark(settings: BenchSettings, *, progress: bool = True) -> BenchmarkRows:
    """One row per preset x precision (see :mod:`ddpm_cars.benchmarks.measure` for what each
    number means), plus diffusers' ``UNet2DModel`` at each precision when ``diffusers`` is
    installed and ``settings.diffusers_reference`` is among the presets; ``rows.notes`` says
    what was skipped. Each row's ``mfu`` is its training FLOP rate over the device's peak
    for its precision (:mod:`ddpm_cars.benchmarks.peaks`, or ``settings.peak_tflops``);
    None when that is unknown. With ``progress``, a line per measurement on stderr.
    """
    presets = parse_names(settings.presets, list(PRESETS), "preset")
    precisions = parse_names(settings.precisions, PRECISIONS, "precision")
    _check_counts(settings.repeats, settings.warmup, settings.sample_steps)
    dev, batch = _device_and_batch(settings.device, settings.batch_size)
    for name in presets:  # a bad image size fails here, before anything is measured
        bench_config(name, settings.image_size)
    isolate = dev.type == "cpu" if settings.isolate is None else settings.isolate

    models, notes = _models_and_notes(
        presets, settings.diffusers_reference, dev.type == "cpu", isolate, settings.compile, settings.warmup
    )
    jobs = [(name, precision) for name in models for precision in precisions]
    rows = BenchmarkRows(notes=notes)
    for i, (name, precision) in enumerate(jobs, 1):
        size = settings.image_size
        label = f"[{i}/{len(jobs)}] {name} {precision}: {size}x{size}, batch {batch} on {dev} ..."
        row = _measure_one(_spec(settings, name, precision, dev, batch, isolate), label, progress)
        if row is None:
            rows.notes.append(f"{name} {precision}: skipped, out of GPU memory at batch {batch}")
        else:
            peak = device_peak_flops(dev, precision, settings.peak_tflops)
            rows.append({**row, "peak_flop_s": peak, "mfu": row["train_flop_s"] / peak if peak else None})
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


def _mfu(row: dict) -> str:
    return "" if row.get("mfu") is None else f"{100 * row['mfu']:.1f}%"


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


def _table_row(r: dict, loop: bool) -> str:
    row = (
        f"| {_label(r['preset'])} | {r['precision']} | {r['image_size']} | {r['batch_size']} "
        f"| {r['params'] / 1e6:.2f} M | {r['forward_flops_per_image'] / 1e9:.3g} | {_rate(r['train_img_s'])} "
        f"| {_flop_rate(r['train_flop_s'])} | {_mfu(r)} | {r.get('timesteps', '')} | {_rate(r['sample_img_s'])} "
        f"| {_rate(r['sample_evals_s'])} | {_flop_rate(r['sample_flop_s'])} | {_memory(r)} |"
    )
    if loop:
        row += (
            "  |  |"
            if r.get("loop_img_s") is None
            else f" {_rate(r['loop_img_s'])} | {r['loop_to_first_step_s']:.1f} |"
        )
    return row


def _has_loop(rows: Sequence[dict]) -> bool:
    return any(r.get("loop_img_s") is not None for r in rows)


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
    loop = _has_loop(rows)
    lines += [
        (
            "| preset | precision | image | batch | params | fwd GFLOP/img | train img/s | train FLOP/s | train MFU "
            f"| T | sample img/s | evals/s | sample FLOP/s | {memory} |"
            + (" loop img/s | to 1st step s |" if loop else "")
        ),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        + (" ---: | ---: |" if loop else ""),
    ]
    lines += [_table_row(r, loop) for r in rows]
    lines.append("")
    lines += speedups(rows)
    lines += [
        f"Date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}; torch {torch.__version__}",
        FLOPS_NOTE,
        SAMPLE_NOTE,
        MFU_NOTE,
        MEMORY_NOTE["cuda" if cuda else "cpu"],
    ]
    if loop:
        lines.append(LOOP_NOTE)
    if any(r.get("compile") for r in rows):
        lines.append("Compiled with torch.compile; compilation happens in the warm-up steps.")
    if any(r.get("activation_checkpointing") for r in rows):
        lines.append(
            "Activation checkpointing: the residual U-Net's blocks recomputed in the backward pass "
            "(the FLOP rates count the model's own arithmetic, not the recomputation)."
        )
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
        "notes": [FLOPS_NOTE, SAMPLE_NOTE, MFU_NOTE, MEMORY_NOTE["cuda" if _on_cuda(rows) else "cpu"], *notes],
        "speedups": speedups(rows),
        "rows": [
            {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in rows
        ],
    }
