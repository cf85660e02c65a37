r"""How good are the students of ``ddpm-cars distill`` at 1, 2, 4 and 8 network calls?

A teacher of the demo recipe (v-prediction with Min-SNR 5, the target the recipe study
picked) is trained for ``--teacher-steps`` steps, then distilled from its DDIM on
``--teacher-calls`` steps down to one call, ``--round-steps`` steps a round; every round's
student is kept (``STUDENT/students/calls_N.safetensors``), so one distillation gives the
students of 32, 16, ..., 1 calls. ``train`` records each command, its commit, the machine
and its wall-clock time beside the run (``study_train.json``).

``score`` judges, on groups of ``--num`` images of seed 0 against the training images, by
SWD (x1e3) and the judge network's FD and KID, as ``studies.sampler_quality`` scores them
and in its record:

- **tuning** (group 0): every undistilled sampler of the teacher at each number of calls
  (``--candidates``, their steps set to the calls; Heun on the most steps that fit); the
  best, by the mean of its SWD and judge FD relative to the best candidate's, is the
  teacher's sampler at that many calls;
- **verdict** (groups 1 to ``--groups``): each student on its own calls, the teacher's
  chosen sampler at the same calls, and the teacher's converged reference (``--reference``,
  the recipe study's 250 ancestral steps) and its own default sampler.

Usage:

    python -m studies.distill train --root runs/distill
    python -m studies.distill score --root runs/distill --record docs/benchmarks/distill/scores.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ddpm_cars import run as ckpt
from ddpm_cars.parallel import resolve_device
from ddpm_cars.run import Run
from ddpm_cars.viz import save_rows
from studies.provenance import commit, machine
from studies.recipe import _opened, choose_sampler
from studies.sampler_quality import (
    draw_groups,
    network_calls,
    parse_settings,
    steps_for_calls,
)

CALLS = (1, 2, 4, 8)
CANDIDATES = "ddim:trailing,ddim:uniform,ddpm:uniform,dpm++:karras,dpm++sde:karras,heun:karras"
TRAIN_RECORD = "study_train.json"


def _timed(command: list[str], out: Path) -> None:
    """Run ``command`` (a ddpm-cars command line writing ``out``) and record it beside ``out``."""
    print("+", shlex.join(command), file=sys.stderr, flush=True)
    tic = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - tic
    record = {"command": shlex.join(command), "seconds": round(seconds, 1), "commit": commit()}
    record["machine"] = machine(resolve_device("cpu"))
    (out / TRAIN_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def train(args: argparse.Namespace) -> None:
    teacher, student = args.root / "teacher", args.root / "student"
    cli = [sys.executable, "-m", "ddpm_cars"]
    if not (teacher / TRAIN_RECORD).is_file():
        _timed([*cli, "train", "--preset", "demo", "--steps", str(args.teacher_steps), "--out", str(teacher)], teacher)
    if not (student / TRAIN_RECORD).is_file():
        _timed(
            [*cli, "distill", "--checkpoint", str(teacher), "--out", str(student), "--calls", "1",
             "--teacher-calls", str(args.teacher_calls), "--round-steps", str(args.round_steps)],
            student,
        )  # fmt: skip


def student_runs(root: Path) -> dict[int, Path]:
    """Each round's student as a run of its own (ROOT/student-cN): the student's config
    sampling on N calls, and that round's weights as its one checkpoint."""
    student = root / "student"
    config = Run.open(student).config
    runs = {}
    for calls in CALLS:
        out = root / f"student-c{calls}"
        weights = student / "students" / f"calls_{calls:04d}.safetensors"
        checkpoint = out / ckpt.CHECKPOINT_DIR / "step_00000000"
        if not (checkpoint / ckpt.MODEL_FILE).is_file():
            checkpoint.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(weights, checkpoint / ckpt.MODEL_FILE)
            config.replace(sample={"steps": calls}).save(out / ckpt.CONFIG_FILE)
        runs[calls] = out
    return runs


def _draw(opened, text: str, groups: range, args, train_images, name: str):
    """Group scores of ``text`` (sampler:steps[:spacing]) and the first group's images when drawn now."""
    run, denoiser, record, _ = opened
    ((sampler, steps, spacing, extra),) = parse_settings(text)
    sample = dataclasses.replace(run.config.sample, sampler=sampler, steps=steps, spacing=spacing, **extra)
    entries, drawn = draw_groups(
        denoiser, sample, record, groups, args.num, args.batch_size, train_images, name=f"{name} {text}"
    )
    return [e["scores"] for e in entries], drawn, statistics.fmean(e["img_s"] for e in entries)


def _setting(candidate: str, calls: int) -> str | None:
    sampler, spacing = candidate.split(":")
    steps = steps_for_calls(sampler, calls)
    if network_calls(sampler, steps) > calls or (sampler == "heun" and calls < 2):
        return None
    return f"{sampler}:{steps}:{spacing}"


def _mean(groups: list[dict[str, float]], metric: str) -> float:
    return statistics.fmean(g[metric] for g in groups)


def score(args: argparse.Namespace) -> None:
    teacher = _opened(args.root / "teacher", args.num, args.record)
    train_images = teacher[3]
    verdict = range(1, args.groups + 1)
    rows, shown = [], []
    reference, _, ref_rate = _draw(teacher, args.reference, verdict, args, train_images, "teacher")
    default = teacher[0].config.sample
    default_text = f"{default.sampler}:{default.steps}:{default.spacing}"
    own, _, own_rate = _draw(teacher, default_text, verdict, args, train_images, "teacher")
    rows.append(("teacher, reference", args.reference, parse_settings(args.reference)[0][1], reference, ref_rate))
    rows.append(("teacher, its default sampler", default_text, default.steps, own, own_rate))
    for calls, path in student_runs(args.root).items():
        tuning = {}
        for candidate in args.candidates.split(","):
            text = _setting(candidate, calls)
            if text is not None:
                tuning[text] = {"teacher": _draw(teacher, text, range(0, 1), args, train_images, "teacher")[0]}
        best = choose_sampler(tuning)
        groups, drawn_t, rate_t = _draw(teacher, best, verdict, args, train_images, "teacher")
        rows.append((f"teacher, best undistilled at {calls}", best, calls, groups, rate_t))
        opened = _opened(path, args.num, args.record)
        text = f"ddim:{calls}:trailing"
        groups, drawn_s, rate_s = _draw(opened, text, verdict, args, train_images, f"student-c{calls}")
        rows.append((f"student of {calls}", text, calls, groups, rate_s))
        if drawn_t is not None and drawn_s is not None:
            shown.append((f"teacher\n{best}", drawn_t[:8]))
            shown.append((f"student\n{calls} calls", drawn_s[:8]))
    print(_table(rows, reference))
    if args.grid is not None and shown:
        save_rows(
            [(name, [("", im) for im in images]) for name, images in shown], args.grid, "Same seeds, verdict group 1"
        )


def _table(rows, reference) -> str:
    ref = {m: _mean(reference, m) for m in ("swd", "judge_fd")}
    lines = [
        "| model | sampler | calls | img/s | SWD | vs reference | judge FD | vs reference | judge KID x1e3 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, text, calls, groups, rate in rows:
        swd, fd, kid = (_mean(groups, m) for m in ("swd", "judge_fd", "judge_kid"))
        spread = f" ({min(g['swd'] for g in groups):.1f}-{max(g['swd'] for g in groups):.1f})"
        lines.append(
            f"| {name} | {text} | {calls} | {rate:.0f} | {swd:.2f}{spread} | {swd / ref['swd'] - 1:+.0%} | "
            f"{fd:.2f} | {fd / ref['judge_fd'] - 1:+.0%} | {kid * 1e3:.2f} |"
        )
    return "\n".join(lines)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the teacher, then distil it down to one call")
    t.add_argument("--root", type=Path, required=True, help="folder of the runs")
    t.add_argument("--teacher-steps", type=int, default=2000, help="the teacher's training steps (default: 2000)")
    t.add_argument("--teacher-calls", type=int, default=64, help="the first round's teacher calls (default: 64)")
    t.add_argument("--round-steps", type=int, default=400, help="steps per round (default: 400)")
    s = sub.add_parser("score", help="score the students and the teacher")
    s.add_argument("--root", type=Path, required=True, help="folder of the runs")
    s.add_argument("--record", type=Path, required=True, help="JSON-lines record of the group scores")
    s.add_argument("--num", type=int, default=500, help="images a group (default: 500)")
    s.add_argument("--groups", type=int, default=3, help="verdict groups, after the tuning group 0 (default: 3)")
    s.add_argument("--candidates", default=CANDIDATES, help=f"undistilled samplers (default: {CANDIDATES})")
    s.add_argument("--reference", default="ddpm:250:uniform", help="the converged reference (default: ddpm:250)")
    s.add_argument("--batch-size", type=int, default=100, help="images per sampling batch (default: 100)")
    s.add_argument("--grid", type=Path, default=None, help="PNG: teacher against student, same seeds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    (train if args.command == "train" else score)(args)


if __name__ == "__main__":
    main()
