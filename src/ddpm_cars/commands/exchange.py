"""``ddpm-cars export`` and ``ddpm-cars import``: runs as diffusers folders and back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class ExportRequest:
    """``ddpm-cars export``: ``run``'s network (moving-average weights with ``ema``) and
    schedule as a folder ``out`` that ``diffusers.DDPMPipeline.from_pretrained`` loads."""

    run: Path
    out: Path
    format: Literal["diffusers"] = "diffusers"
    ema: bool = True


def export(request: ExportRequest) -> Path:
    from ddpm_cars.export import export_run
    from ddpm_cars.run import Run

    Run.open(request.run).refuse_if_distilled("export (a DDPMScheduler samples on all T steps)")
    out = export_run(request.run, request.out, ema=request.ema)
    print(
        f"Wrote {out}: load it with diffusers.DDPMPipeline.from_pretrained({str(out)!r}); "
        f"model card {out / 'README.md'}"
    )
    return out


@dataclass(frozen=True)
class ImportRequest:
    """``ddpm-cars import``: a folder written by export back as the run ``out``."""

    folder: Path
    out: Path


def import_run(request: ImportRequest) -> Path:
    from ddpm_cars.export import import_pipeline

    out = import_pipeline(request.folder, request.out)
    print(f"Imported {request.folder} as the run {out} (sample with: ddpm-cars sample --checkpoint {out} --out DIR)")
    return out
