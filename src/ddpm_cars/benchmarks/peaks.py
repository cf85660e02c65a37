"""Dense peak arithmetic rates of common GPUs, for model FLOP utilisation (MFU).

MFU is the training FLOP rate the model's own arithmetic accounts for (3 x the forward
FLOPs per image x images per second) over the device's peak for the precision measured:
its dense tensor-core rate for bf16 and fp16, and for fp32 the TF32 rate, since cuDNN runs
float32 convolutions on TF32 tensor cores by default (and training also lets matrix
products use them). Peaks are the vendors' datasheet figures without structured sparsity,
in TFLOP/s; a device not listed (every CPU among them) has no MFU unless
``--peak-tflops`` gives its peak.
"""

from __future__ import annotations

import torch

# (name fragment as torch.cuda.get_device_name reports it, {precision: dense peak TFLOP/s}).
# Checked in order: the more specific fragment first (H100 PCIe before H100, L40S before L4, A100 before A10).
GPU_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),
    ("H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "fp32": 378.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),  # SXM
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),
    ("L40S", {"bf16": 362.1, "fp16": 362.1, "fp32": 183.0}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 60.0}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),  # SXM2; no bf16 and no TF32
    ("T4", {"fp16": 65.0, "fp32": 8.1}),  # no bf16 and no TF32
)


def device_peak_flops(device: torch.device, precision: str, peak_tflops: float | None = None) -> float | None:
    """FLOP/s of ``device`` at ``precision``: ``peak_tflops`` when given, else the table's
    figure for the GPU's name; None when neither knows it."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    return gpu_peak_flops(torch.cuda.get_device_name(device), precision)


def gpu_peak_flops(name: str, precision: str) -> float | None:
    """The table's dense peak for a GPU called ``name`` (e.g. "NVIDIA A100-SXM4-80GB")."""
    for fragment, peaks in GPU_PEAKS:
        if fragment in name:
            tflops = peaks.get(precision)
            return None if tflops is None else tflops * 1e12
    return None
