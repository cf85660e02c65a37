"""The whole training loop, data included: what ``ddpm-cars bench --loop`` adds to a row.

The network bench times optimizer steps on one fixed batch. This runs the real
:class:`~ddpm_cars.training.loop.Session` of the preset on a temporary run directory --
batches gathered from the data cache, flips, noise, the guarded update, the moving
average, the batched loss reads -- with checkpoints and sample grids off, and reports:

* ``loop_to_first_step_s``: seconds from the start of the session to its first step
  (opening the data cache, or building it the first time, and building the model);
* ``loop_img_s``: training images/s over the ``repeats`` steps after ``warmup`` untimed
  ones, the device synchronised at both ends.
"""

from __future__ import annotations

import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch

from ddpm_cars.presets import PRESETS
from ddpm_cars.training.loop import start_session


class _StepClock:
    """Stands in for the progress bar: notes the time once the warm-up steps are done."""

    def __init__(self, warmup: int, sync: Callable[[], None]):
        self.warmup, self.sync, self.steps = warmup, sync, 0
        self.start: float | None = None

    def begin(self) -> None:
        if self.warmup == 0:
            self.start = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.steps += n
        if self.steps == self.warmup:
            self.sync()
            self.start = time.perf_counter()

    def set_postfix(self, **_: object) -> None:
        pass

    def write(self, _: str) -> None:
        pass


def measure_loop(spec: dict) -> dict:
    """``spec`` as for :func:`~ddpm_cars.benchmarks.measure.measure`, plus ``data`` (a
    ``--data`` source, default toy cars) and ``data_cache`` (default ``auto``)."""
    size, batch, warmup, repeats = spec["image_size"], spec["batch_size"], spec["warmup"], spec["repeats"]
    config = PRESETS[spec["preset"]]
    config = config.replace(
        data={"source": spec.get("data", "toy-cars"), "cache": spec.get("data_cache", "auto"), "image_size": size},
        train={
            "batch_size": batch,
            "precision": spec["precision"],
            "max_steps": warmup + repeats,
            "compile": bool(spec.get("compile")),
            "eval_every_steps": 0,
            "activation_checkpointing": bool(spec.get("activation_checkpointing"))
            and config.model.name == "res_attn_unet",
        },
    )
    with tempfile.TemporaryDirectory() as run_dir:
        tic = time.perf_counter()
        session = start_session(config, Path(run_dir) / "run", False, spec["device"], None, False, None)
        to_first_step = time.perf_counter() - tic
        session.checkpoints.enabled = session.grids.enabled = False
        device = session.batches.device
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        clock = _StepClock(warmup, sync)
        clock.begin()
        session.run(clock, types.SimpleNamespace(requested=False))
        sync()
        seconds = time.perf_counter() - clock.start
    return {
        "loop_img_s": batch * repeats / seconds,
        "loop_to_first_step_s": to_first_step,
        "loop_data": config.data.source,
        "loop_images": len(session.batches.images),
    }
