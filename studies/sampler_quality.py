r"""Quality and speed of each sampler against its step count, on a trained run.

Quality is the offline sample metric of ``ddpm-cars eval``, both of its measures against
the run's training images (lower is better): the sliced Wasserstein distance (SWD) on
Laplacian-pyramid patches (x1e3), per level and averaged, and the judge's FD and KID (the
Frechet and kernel distances on the features of the small toy-car judge network; KID shown
x1e3), with pixel precision/recall. Residual noise, the typical failure of a sampler with
too few steps, shows at SWD's finest level. The first row scores held-out real images the
same way: the floor a perfect sampler would reach. Groups from record lines written before
the judge existed have no judge scores: a row with any such group leaves its judge cells
empty.

Usage:
    python -m studies.sampler_quality --run runs/demo --num 500 --groups 3 --out runs/demo/samplers.png

With ``--groups G`` each setting draws G x NUM samples (seeds 0 to G x NUM - 1) and scores
them as G groups: the table gives the mean and, for SWD, the range of the groups.
``--first-group K`` starts at group K instead (images K x NUM on), so that a long setting
(1,000 steps) can be drawn one group at a time; held-out images are taken the same way.
Groups put together must come from one kind of device: CPU and CUDA generators draw
different noise from the same seed.

Each group's scores are appended to a record (``RUN/sampler_scores.jsonl`` unless
``--record`` says otherwise) as soon as they are known, and a group the record already holds
-- same weights, device, precision, sampling settings, group size and seed -- is taken from
it instead of drawn again (its img/s is then the mean of the groups' rates when drawn). So a
campaign stopped halfway loses at most the setting it was drawing, and the 1,000-step row
can be drawn one group per call and then tabled whole:

    for k in 0 1 2; do python -m studies.sampler_quality --run runs/long-v --first-group $k --settings ddpm:1000; done
    python -m studies.sampler_quality --run runs/long-v --groups 3 --settings ddpm:1000   # draws nothing

``--redraw`` draws every group anew (its scores then replace the recorded ones).

``--samplers`` with ``--nfe`` measures each sampler at each number of network calls (Heun
on the most steps whose 2n - 1 calls fit) and ends with a table of SWD (and the judge's FD)
against calls:

    python -m studies.sampler_quality --run runs/long-v --groups 3 --nfe 10,20,35,50,100 \
        --samplers ddpm,dpm++:karras,heun:karras:churn=20 --settings ddpm:1000
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from ddpm_cars.config import SampleConfig
from ddpm_cars.data import build_dataset
from ddpm_cars.data.dataset import to_uint8
from ddpm_cars.denoiser import Denoiser
from ddpm_cars.evaluation.sample_metrics import sample_metrics
from ddpm_cars.generation import QUIET, generate
from ddpm_cars.parallel import resolve_device
from ddpm_cars.run import EMA_FILE, MODEL_FILE, Run
from ddpm_cars.runtime import resolve_precision
from ddpm_cars.viz import save_grid
from studies.provenance import provenance

SETTINGS = "ddpm:1000,ddpm:250,ddpm:100,ddpm:50,ddim:100,ddim:50,ddim:20,dpm++:50,dpm++:20,dpm++:10"
Setting = tuple[str, int, str, dict[str, bool | float | str]]  # sampler, steps, spacing, other sampling fields


def network_calls(sampler: str, steps: int) -> int:
    """Network evaluations per image: one per step, except Heun's two (one on the last)."""
    return 2 * steps - 1 if sampler == "heun" else steps


def steps_for_calls(sampler: str, calls: int) -> int:
    """The most steps of ``sampler`` that cost at most ``calls`` network evaluations."""
    return max(1, (calls + 1) // 2) if sampler == "heun" else calls


JUDGE = ("judge_fd", "judge_kid")  # the judge's scores, absent from record lines older than the judge


def _header(levels: list[str]) -> str:
    """The main table's header and alignment lines, the columns of :func:`_row`."""
    return (
        "| sampler | steps (calls) | img/s | SWD | "
        + " | ".join(f"SWD {k[4:]}px" for k in levels)
        + (" | " if levels else "")
        + "judge FD | judge KID x1e3 | precision / recall |\n"
        + "| --- | ---: | ---: | ---: |"
        + " ---: |" * (len(levels) + 3)
    )


def _row(label: str, steps: str, rate: str, groups: list[dict[str, float]], levels: list[str]) -> str:
    """One table row: each score's mean over the groups, SWD with its spread (the range
    of the group scores) when there is more than one group. The judge's FD and KID (x1e3)
    come after SWD's levels, empty when any group lacks them (an older record line)."""
    mean = {k: statistics.fmean(g[k] for g in groups) for k in groups[0] if all(k in g for g in groups)}
    swd = f"{mean['swd']:.2f}"
    if len(groups) > 1:
        swd += f" ({min(g['swd'] for g in groups):.1f}-{max(g['swd'] for g in groups):.1f})"
    judge = [f"{mean['judge_fd']:.2f}", f"{mean['judge_kid'] * 1e3:.2f}"] if all(k in mean for k in JUDGE) else ["", ""]
    cells = [
        swd,
        *(f"{mean[k]:.2f}" for k in levels),
        *judge,
        f"{mean['precision_pixels']:.2f} / {mean['recall_pixels']:.2f}",
    ]
    return f"| {label} | {steps} | {rate} | " + " | ".join(cells) + " |"


def score_groups(images: torch.Tensor, train: torch.Tensor, groups: int) -> list[dict[str, float]]:
    """The offline metric of each of ``groups`` equal, consecutive parts of ``images``."""
    size = images.shape[0] // groups
    return [sample_metrics(images[i * size : (i + 1) * size], train, description="")[0] for i in range(groups)]


def parse_settings(text: str) -> list[Setting]:
    """``sampler:steps[:spacing][:field=value...],...`` as (sampler, steps, spacing, other
    sampling fields) (uniform spacing by default): ``heun:10:karras:churn=40``,
    ``dpm++:20:karras:clip_x0=false``."""
    out = []
    for item in text.split(","):
        name, steps, *rest = item.split(":")
        spacing = rest.pop(0) if rest and "=" not in rest[0] else "uniform"
        fields = dict(part.split("=", 1) for part in rest)
        out.append((name, int(steps), spacing, {k: _number_or_text(v) for k, v in fields.items()}))
    return out


def grid_settings(samplers: str, calls: list[int]) -> list[tuple[int, Setting]]:
    """``sampler[:spacing][:field=value...],...`` at each budget of network calls, as (budget,
    setting as :func:`parse_settings` gives it): ``("dpm++:karras", [10, 20])`` is dpm++:10:karras
    and dpm++:20:karras, ``("heun", [10])`` heun:5 (9 calls)."""
    out = []
    for item in samplers.split(","):
        name, *rest = item.split(":")
        for n in calls:
            out += [(n, setting) for setting in parse_settings(":".join([name, str(steps_for_calls(name, n)), *rest]))]
    return out


def label(sampler: str, spacing: str, extra: dict[str, bool | float | str]) -> str:
    """A setting's name without its steps: "heun, karras, churn 20"."""
    fields = [f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in extra.items()]
    return ", ".join([sampler] + ([spacing] if spacing != "uniform" else []) + fields)


def calls_table(
    results: dict[str, dict[int, tuple[int, list[dict[str, float]]]]], floor: list[dict[str, float]]
) -> str:
    """SWD (mean, and the range of the groups when there are several) with one row per
    sampler and one column per budget of network calls, after the held-out floor; each cell
    then gives the mean of the judge's FD when every group has it (not so for record lines
    older than the judge): ``38.32 (36.5-39.8); FD 1.85``. ``results[sampler][budget]`` is
    (the calls made, the group scores); a setting that made fewer calls than its column's
    budget (Heun's 2n - 1) says how many in brackets."""
    columns = sorted({n for row in results.values() for n in row})

    def cell(groups: list[dict[str, float]] | None, calls: int | None = None, budget: int | None = None) -> str:
        if not groups:
            return ""
        swd = [g["swd"] for g in groups]
        text = f"{statistics.fmean(swd):.2f}" + (f" ({min(swd):.1f}-{max(swd):.1f})" if len(swd) > 1 else "")
        if all("judge_fd" in g for g in groups):
            text += f"; FD {statistics.fmean(g['judge_fd'] for g in groups):.2f}"
        return text + (f" [{calls}]" if calls != budget else "")

    lines = [
        "| sampler | " + " | ".join(f"{n} calls" for n in columns) + " |",
        "| --- |" + " ---: |" * len(columns),
        f"| held-out real images | {cell(floor)} |" + " |" * (len(columns) - 1),
    ]
    lines += [
        f"| {name} | " + " | ".join(cell(row[n][1], row[n][0], n) if n in row else "" for n in columns) + " |"
        for name, row in results.items()
    ]
    return "\n".join(lines)


RECORD_FILE = "sampler_scores.jsonl"
# Sampling fields added after the first records were written, with the value every older
# line was drawn with (not today's default, which may change): an older line counts as
# having named it.
ADDED_FIELDS: dict[str, object] = {"sigma_max": 80.0}


def weights_digest(checkpoint: Path) -> str:
    """The first 16 hex digits of the SHA-256 of the weights a checkpoint samples with
    (its moving average when it kept one): what tells one trained model from another."""
    path = checkpoint / EMA_FILE if (checkpoint / EMA_FILE).is_file() else checkpoint / MODEL_FILE
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


class ScoreRecord:
    """Group scores kept in a JSON-lines file, one line per (setting, group), so that
    nothing measured is lost when a long campaign stops. ``identity`` (weights, device,
    precision, group size, seed) must match for a line to count; of two lines for one
    group the later wins; a line cut short by a crash is ignored; a line older than a
    sampling field reads as drawn with :data:`ADDED_FIELDS`' value of it. Each new line also
    records its ``provenance`` (the command, the commit and the machine's kind); lines
    written before that have none and count as older (:func:`older`)."""

    def __init__(self, path: Path, identity: dict[str, object], provenance: dict[str, str] | None = None):
        self.path, self.identity, self.provenance = path, identity, provenance or {}
        self.groups: dict[tuple[str, int], dict] = {}
        lines = path.read_text().splitlines() if path.is_file() else []
        for line in lines:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and entry.get("identity") == identity:
                entry["sample"] = {**ADDED_FIELDS, **entry["sample"]}
                self.groups[self._key(entry["sample"], entry["group"])] = entry

    @staticmethod
    def _key(fields: dict[str, object], group: int) -> tuple[str, int]:
        return json.dumps(fields, sort_keys=True), group

    @staticmethod
    def _sample(sample: SampleConfig) -> dict[str, object]:
        fields = dataclasses.asdict(sample)
        fields.pop("num_images")  # the size of training-time grids: nothing to do with drawing
        return fields

    def get(self, sample: SampleConfig, group: int) -> dict | None:
        """The recorded entry of ``group`` drawn with ``sample``, or None."""
        return self.groups.get(self._key(self._sample(sample), group))

    def add(self, sample: SampleConfig, group: int, rate: float, scores: dict[str, float]) -> dict:
        """Record ``group``'s ``scores`` (drawn at ``rate`` images per second) and return the entry."""
        entry = {
            "identity": self.identity,
            "sample": self._sample(sample),
            "group": group,
            "img_s": rate,
            "scores": scores,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "provenance": self.provenance,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.groups[self._key(entry["sample"], group)] = entry
        return entry


def older(entries: list[dict]) -> int:
    """How many of ``entries`` were recorded before lines named their command, commit and machine."""
    return sum(1 for entry in entries if not entry.get("provenance"))


def _number_or_text(text: str) -> bool | float | str:
    """A field's value as written: true/false, a number, or text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return float(text)
    except ValueError:
        return text


def draw_groups(
    denoiser: Denoiser,
    sample: SampleConfig,
    record: ScoreRecord,
    groups: range,
    num: int,
    batch_size: int,
    train: torch.Tensor,
    redraw: bool = False,
    name: str = "",
) -> tuple[list[dict], torch.Tensor | None]:
    """The record's entry of each group of ``num`` images (group k: images k x num to
    (k + 1) x num - 1 of seed 0) drawn with ``sample``: the groups the record lacks (all of
    them with ``redraw``) are drawn in one pass, scored and recorded. Also the first group's
    images when this call drew them (else None)."""
    entries = {} if redraw else {k: e for k in groups if (e := record.get(sample, k)) is not None}
    missing = [k for k in groups if k not in entries]
    if not missing:
        print(
            f"{name or sample.sampler} on {sample.steps} steps: groups {groups[0]}-{groups[-1]} taken from "
            f"{record.path}",
            file=sys.stderr,
        )
        return [entries[k] for k in groups], None
    indices = [i for k in missing for i in range(k * num, (k + 1) * num)]
    tic = time.perf_counter()
    images = generate(denoiser, indices, sample, seed=0, batch_size=min(len(indices), batch_size), watch=QUIET)
    rate = len(indices) / (time.perf_counter() - tic)
    for k, scores in zip(missing, score_groups(to_uint8(images), train, len(missing))):
        entries[k] = record.add(sample, k, rate, scores)
    return [entries[k] for k in groups], images if missing[0] == groups[0] else None


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="trained run directory")
    parser.add_argument("--num", type=int, default=500, help="samples per setting (default: 500)")
    parser.add_argument("--out", type=Path, default=None, help="PNG with the first 6 samples of each setting")
    parser.add_argument(
        "--settings",
        default=None,
        metavar="S:N[:SPACING][:FIELD=V],...",
        help="sampler:steps[:spacing][:field=value] to run, e.g. ddim:50,dpm++:20:karras,heun:10:karras:churn=40 "
        "(default: the full list)",
    )
    parser.add_argument(
        "--samplers",
        default=None,
        metavar="S[:SPACING][:FIELD=V],...",
        help="samplers to run at each --nfe, e.g. ddpm,dpm++:karras,heun:karras:churn=20 (default: none)",
    )
    parser.add_argument(
        "--nfe",
        default="10,20,35,50,100",
        metavar="N,...",
        help="network calls per image for --samplers (default: 10,20,35,50,100)",
    )
    parser.add_argument(
        "--groups",
        type=int,
        default=1,
        help="score GROUPS x NUM samples as GROUPS groups of NUM and report the mean and the range (default: 1)",
    )
    parser.add_argument(
        "--first-group",
        type=int,
        default=0,
        metavar="K",
        help="start at group K: images K x NUM on, to draw a long setting a group at a time (default: 0)",
    )
    parser.add_argument("--batch-size", type=int, default=50, help="images per sampling batch (default: 50)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    parser.add_argument(
        "--record",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"JSON-lines record of the group scores, read and appended to (default: RUN/{RECORD_FILE})",
    )
    parser.add_argument(
        "--redraw", action="store_true", help="draw every group again instead of taking the ones the record holds"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_arguments()
    budgets = [int(n) for n in args.nfe.split(",")]
    if min(budgets) < 1:
        raise SystemExit(f"--nfe: every budget must be at least 1 network call; got {args.nfe}")
    grid = grid_settings(args.samplers, budgets) if args.samplers else []
    listed = args.settings or ("" if grid else SETTINGS)  # the full list only when nothing is asked for
    settings = [(network_calls(s[0], s[1]), s) for s in (parse_settings(listed) if listed else [])] + grid

    run = Run.open(args.run)
    config = run.config
    device = resolve_device(args.device)
    denoiser = run.denoiser(ema=True, device=device)
    record = ScoreRecord(
        args.record or run.dir / RECORD_FILE,
        {
            "weights": weights_digest(run.checkpoint),
            "device": device.type,
            "precision": resolve_precision(denoiser.precision, device),
            "num": args.num,
            "seed": 0,
        },
        provenance(device),
    )
    train = build_dataset(config.data, progress=False).images
    groups = range(args.first_group, args.first_group + args.groups)
    first, end = args.first_group * args.num, (args.first_group + args.groups) * args.num
    heldout = build_dataset(dataclasses.replace(config.data, split="test", toy_count=end), progress=False).images
    if heldout.shape[0] < end:
        raise SystemExit(
            f"the held-out split has {heldout.shape[0]} images, fewer than the {end} that groups "
            f"{args.first_group}-{args.first_group + args.groups - 1} of {args.num} need"
        )
    floor = score_groups(heldout[first:end], train, args.groups)
    levels = [k for k in floor[0] if k.startswith("swd_")]
    what = f"{args.groups} groups of {args.num}" if args.groups > 1 else f"{args.num}"
    print(
        f"{run.checkpoint}, {what} samples per setting, images {first}-{end - 1} of seed 0; "
        f"against {train.shape[0]} training images\n"
    )
    print(_header(levels))
    print(_row("held-out real images", "", "", floor, levels), flush=True)
    rows, results, shown_entries = [], {}, []
    for budget, (sampler, steps, spacing, extra) in settings:
        name, trained = label(sampler, spacing, extra), denoiser.schedule.timesteps
        if steps > trained or budget in results.get(name, {}):  # said aside, so that the table stays whole
            why = f"more than the {trained} trained" if steps > trained else "run already"
            print(f"skipped {name} on {steps} steps: {why}", file=sys.stderr)
            continue
        sample = dataclasses.replace(config.sample, sampler=sampler, steps=steps, spacing=spacing, **extra)
        entries, shown = draw_groups(
            denoiser, sample, record, groups, args.num, args.batch_size, train, args.redraw, name
        )
        metrics, shown_entries = [entry["scores"] for entry in entries], shown_entries + entries
        rate = statistics.fmean(entry["img_s"] for entry in entries)
        calls = network_calls(sampler, steps)
        print(
            _row(name, f"{steps}" if calls == steps else f"{steps} ({calls})", f"{rate:.2f}", metrics, levels),
            flush=True,
        )
        results.setdefault(name, {})[budget] = (calls, metrics)
        if args.out is not None:  # the first images of the first group, drawn again if the record held it
            shown = (
                shown
                if shown is not None
                else generate(
                    denoiser, range(first, first + min(6, args.num)), sample, seed=0, batch_size=6, watch=QUIET
                )
            )
            rows.append(shown[:6])
    if grid and results:
        print("\nSWD (and the judge's FD) against network calls per image:\n\n" + calls_table(results, floor))
    if older(shown_entries):
        print(
            f"\n{older(shown_entries)} of the {len(shown_entries)} groups above come from record lines written "
            "before lines named their command, commit and machine"
        )
    if args.out is not None and rows:
        save_grid(torch.cat(rows), args.out, nrow=6)
        print(f"\nWrote {args.out}: one row per setting, in the table's order")


if __name__ == "__main__":
    main()
