"""How a network runs on a device: mixed precision, memory layout, compilation.

``precision`` ``auto`` picks, per device, the fastest autocast that keeps training
stable: bfloat16 on CUDA GPUs that have it (Ampere and later), float16 (with a gradient
scaler in training) on older ones, bfloat16 on CPUs with native bfloat16 instructions
(AVX-512 BF16 or AMX) and float32 on other CPUs, where bfloat16 is emulated: one training
step of the demo preset ran 11x slower in bf16 than in fp32 on an AVX2-only CPU
(docs/benchmarks/cpu_precision.md).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch import nn

from ddpm_cars.config import Precision
from ddpm_cars.errors import UserError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bfloat16 arithmetic


@functools.cache
def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX-512 BF16 or AMX); False where
    the CPU's flags cannot be read (other than Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def cpu_kind(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The kind of CPU as the benchmarks name it: "AMX", "AVX-512 BF16", "AVX2" (no bfloat16
    instructions) or "other"; "unknown" where the flags cannot be read (other than Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return "unknown"
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    for flag, kind in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"), ("avx2", "AVX2")):
        if flag in flags:
            return kind
    return "other"


def resolve_precision(precision: Precision, device: torch.device | str) -> Precision:
    """The precision ``precision`` means on ``device``: itself, or for ``auto`` bf16 on
    CUDA GPUs with bfloat16, else fp16 on CUDA, bf16 on CPUs with native bfloat16 and
    fp32 elsewhere."""
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def autocast(device: torch.device | str, precision: Precision) -> AbstractContextManager:
    """bf16 or fp16 autocast on CUDA or CPU (``auto`` resolved for ``device``); a no-op
    for fp32.

    Under autocast, convolutions and matrix products run in the lower precision while
    weights, optimizer state and the loss stay in float32. bf16 keeps float32's range,
    so it needs no loss scaling; fp16 does (the training loop's gradient scaler).
    """
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    if device_type not in ("cpu", "cuda"):
        raise UserError(f"{precision} autocast is supported on cpu and cuda, not {device_type}")
    return torch.autocast(device_type, dtype=AUTOCAST_DTYPES[precision])


def use_tf32(device: torch.device) -> None:
    """Let float32 matrix products and convolutions on a CUDA device use TF32 tensor cores
    (Ampere and later; 10 mantissa bits in the products, float32 accumulation), as
    PyTorch's own default for convolutions already does. Nothing changes on the CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def prepare_model(model: nn.Module, *, channels_last: bool = False, compile: bool = False) -> nn.Module:
    """The module to call: ``model`` in NHWC layout and/or compiled (:func:`compiled_or_eager`).

    Parameters are shared with ``model``, so optimizers, EMA and checkpoints keep using
    the plain module.
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return compiled_or_eager(model) if compile else model


def wants_compile(setting: bool | None, device: torch.device) -> bool:
    """``--compile``: on or off as given; unset, on for CUDA and off on the CPU, where
    compiling the network takes minutes and gains little."""
    return setting if setting is not None else device.type == "cuda"


class CompileWarning(UserWarning):
    """torch.compile failed on this machine; the network runs uncompiled."""


def compiled_or_eager(model: nn.Module) -> nn.Module:
    """``torch.compile(model)``, which falls back to ``model`` itself, with one warning, when
    compiling fails (no Triton, no C compiler, an unsupported operation): compilation
    happens at the first call, so a call that fails compiled is tried uncompiled, and a
    failure there is the model's own and raised."""
    compiled = torch.compile(model)
    compiled_forward = compiled.forward
    failed: list[str] = []

    def forward(*args, **kwargs):
        if failed:
            return model(*args, **kwargs)
        try:
            return compiled_forward(*args, **kwargs)
        except Exception as err:
            out = model(*args, **kwargs)  # raises the model's own error, if it is one
            failed.append(_root_cause(err))
            warnings.warn(
                f"torch.compile failed ({failed[0]}); running the network uncompiled", CompileWarning, stacklevel=2
            )
            return out

    compiled.forward = forward
    return compiled


def _root_cause(err: BaseException) -> str:
    """``Type: first line`` of the innermost error that ``err`` wraps (dynamo wraps a backend's)."""
    while (inner := getattr(err, "inner_exception", None) or err.__cause__) is not None:
        err = inner
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def to_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
