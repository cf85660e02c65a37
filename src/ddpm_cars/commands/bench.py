"""``ddpm-cars bench``: parameters, FLOPs, speed and memory of the presets on this device."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ddpm_cars.benchmarks.bench import BenchSettings


@dataclass(frozen=True)
class BenchRequest:
    """``ddpm-cars bench``: measure ``settings``, print a Markdown table and, with ``json``,
    write the rows and metadata there (``command_line`` recorded with them)."""

    settings: BenchSettings = field(default_factory=lambda: BenchSettings(presets="seed,improved"))
    json: Path | None = None
    command_line: tuple[str, ...] = ()


def bench(request: BenchRequest) -> list:
    """Measure and print; returns the rows."""
    from ddpm_cars.benchmarks.bench import format_table, report, run_benchmark

    rows = run_benchmark(request.settings)
    print(format_table(rows))
    if request.json is not None:
        request.json.parent.mkdir(parents=True, exist_ok=True)
        request.json.write_text(json.dumps(report(rows, ["ddpm-cars", *request.command_line]), indent=2) + "\n")
        print(f"Wrote {request.json}")
    return rows
