"""Kill-anywhere campaign: training survives SIGKILL at any moment.

A small CPU training run (``python -m ddpm_cars train``, checkpoints every few steps)
is SIGKILLed N times, each time at another kind of moment:

* ``random``: a random moment during the steps (after step resume+r, r in 1..2*interval,
  plus a random delay of up to --jitter seconds);
* ``after_checkpoint``: the moment a new ``checkpoints/step_*`` directory appears;
* ``mid_write``: the moment a new ``checkpoints/.step_*.tmp`` directory appears, i.e. while
  a checkpoint is being written (found by polling in a tight loop). A kill counts as having
  landed mid-write when that temporary directory is still there after the process died.

After each kill every complete checkpoint must load (weights and EMA into the model built
from config.json, train_state with the directory's step), ``latest_checkpoint`` must hold
all its files, and the steps lost must be at most the checkpoint interval. Steps lost =
the highest step the killed process reported as completed (its progress bar, forced to
print every step) minus the step of the checkpoint the resume starts from; the partial
work of a step in progress is not counted. The run is then resumed with ``--resume`` (same
arguments); a kill is survived when the resumed process starts from that checkpoint and
completes a further step. Finally the run goes to its target step: ``loss.csv`` must hold
every step 1..target exactly once and the last checkpoint must be at the target.

Prints a Markdown table; exits non-zero when any check fails. ``make kill-campaign`` runs

    python -m studies.kill_campaign --kills 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import ddpm_cars
from ddpm_cars.config import RunConfig
from ddpm_cars.run import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    EMA_FILE,
    MODEL_FILE,
    STATE_FILE,
    Run,
    latest_checkpoint,
    list_checkpoints,
    load_train_state,
)
from ddpm_cars.training.logs import LOSS_CSV, read_loss_log

MODES = ("random", "after_checkpoint", "mid_write")
TRAIN_ARGS = [
    "--preset",
    "tiny",
    "--toy-count",
    "64",
    "--sample-every",
    "1000",
    "--num-sample-images",
    "2",
    "--device",
    "cpu",
]
WAIT_S = 180  # the longest wait for any one event before the campaign gives up


def _pythonpath() -> str:
    """PYTHONPATH for the training processes: the folder this ddpm_cars package is in first,
    so they run the same code as the campaign."""
    package_parent = str(Path(ddpm_cars.__file__).resolve().parents[1])
    return os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)


class Trainer:
    """One training process; a thread reads its progress bar for the highest completed step."""

    def __init__(self, run: Path, every: int, target: int, resume: bool, extra: list[str]) -> None:
        args = [
            sys.executable,
            "-m",
            "ddpm_cars",
            "train",
            "--out",
            str(run),
            *TRAIN_ARGS,
            *extra,
            "--checkpoint-every",
            str(every),
            "--steps",
            str(target),
        ] + (["--resume"] if resume else [])
        env = {
            **os.environ,
            "PYTHONPATH": _pythonpath(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "TQDM_MININTERVAL": "0",
            "TQDM_MINITERS": "1",
        }  # the bar prints every step
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.first: int | None = None  # the step the bar started at (a resume's checkpoint)
        self.highest = -1  # the highest completed step reported
        self.tail = ""
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        """Parse ``N/TOTAL [`` from every progress-bar refresh until the pipe closes."""
        pending = ""
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            pending += chunk.decode(errors="replace")
            *lines, pending = re.split(r"[\r\n]", pending)
            for line in [*lines, pending]:  # tqdm ends a refresh with no newline: read the last piece too
                if m := re.search(r"(\d+)/\d+ \[", line):
                    self.first = int(m.group(1)) if self.first is None else self.first
                    self.highest = max(self.highest, int(m.group(1)))
            self.tail = (self.tail + chunk.decode(errors="replace"))[-3000:]

    def wait_until(self, ready, poll: float = 0.002) -> None:
        """Poll ``ready()`` until true; raise if the process exits first or it takes too long."""
        deadline = time.monotonic() + WAIT_S
        while not ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"training exited ({self.proc.returncode}) before the kill:\n{self.tail}")
            if time.monotonic() > deadline:
                raise RuntimeError("timed out waiting for the moment to kill")
            if poll:
                time.sleep(poll)

    def wait_for_step(self, step: int) -> None:
        """Wait until the process reports ``step`` completed."""
        self.wait_until(lambda: self.highest >= step)

    def kill(self) -> None:
        """SIGKILL the process and wait until it and the reader are gone."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(60)
        self._thread.join(60)

    def finish(self) -> int:
        """Let the process run to its end; its exit status."""
        code = self.proc.wait(WAIT_S * 5)
        self._thread.join(60)
        return code


def entries(root: Path, pattern: str) -> set[str]:
    """Names in ``root`` matching ``pattern`` (a regex), empty when it does not exist."""
    try:
        return {n for n in os.listdir(root) if re.fullmatch(pattern, n)}
    except FileNotFoundError:
        return set()


def kill_at(
    trainer: Trainer, mode: str, start: int, run: Path, every: int, jitter: float, rng: random.Random
) -> set[str]:
    """Kill ``trainer`` at a moment of kind ``mode``; the temporary checkpoint dirs that were new then."""
    root = run / CHECKPOINT_DIR
    tmp_re, done_re = r"\.step_\d+\..*\.tmp", r"step_\d+"
    old_tmp, old_done = entries(root, tmp_re), entries(root, done_re)
    if mode == "random":
        stop_at = start + rng.randint(1, 2 * every)
        trainer.wait_for_step(stop_at)
        time.sleep(rng.uniform(0, jitter))
    elif mode == "after_checkpoint":
        trainer.wait_until(lambda: bool(entries(root, done_re) - old_done), poll=0)
    else:
        trainer.wait_until(lambda: bool(entries(root, tmp_re) - old_tmp), poll=0)
    trainer.kill()
    return entries(root, tmp_re) - old_tmp


def check_checkpoints(run: Path) -> tuple[int, dict[str, str]]:
    """Load every complete checkpoint; ``(checked, {name: problem})`` of the corrupt ones."""
    config = RunConfig.load(run / CONFIG_FILE)
    files = [MODEL_FILE, STATE_FILE] + ([EMA_FILE] if config.train.ema_decay else [])
    checkpoints, problems = list_checkpoints(run), {}
    for path in checkpoints:
        try:
            missing = [f for f in files if not (path / f).is_file()]
            assert not missing, f"missing {missing}"
            trained = Run.open(path)
            trained.network(ema=False)
            trained.network(ema=True)
            step = load_train_state(path).step
            assert step == int(path.name[5:]), f"train_state says step {step}"
        except Exception as exc:  # noqa: BLE001 - any failure to load is corruption
            problems[path.name] = repr(exc)
    return len(checkpoints), problems


@dataclass
class _Campaign:
    """What a campaign is asked to do and what it has found so far."""

    run: Path
    kills: int
    every: int
    target: int
    jitter: float
    extra: list[str]
    rng: random.Random  # draws the random kills' moments
    modes: list[str]  # the kind of moment of each kill, in order
    failures: list[str] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)  # steps lost per kill
    landed: int = 0  # kills that landed during a checkpoint write
    survived: int = 0
    checked: int = 0  # checkpoint loads checked
    corrupt: set[str] = field(default_factory=set)  # names of the checkpoint directories found corrupt
    resume_from: int = 0
    final_step: int | None = None
    loss_complete: bool = False

    def trainer(self, resume: bool) -> Trainer:
        return Trainer(self.run, self.every, self.target, resume=resume, extra=self.extra)

    def check(self, label: str) -> dict[str, str]:
        """Check every checkpoint; the corrupt ones, also recorded as failures under ``label``."""
        n, problems = check_checkpoints(self.run)
        self.checked, self.corrupt = self.checked + n, self.corrupt | problems.keys()
        self.failures += [f"{label}: corrupt {name}: {p}" for name, p in problems.items()]
        return problems

    def kill_and_resume(self, trainer: Trainer, i: int, mode: str) -> tuple[Trainer, bool]:
        """Kill ``trainer`` at a moment of kind ``mode``, check the checkpoints and resume:
        (the trainer now running, whether the campaign can go on)."""
        try:
            new_tmp = kill_at(trainer, mode, max(trainer.highest, 0), self.run, self.every, self.jitter, self.rng)
        except RuntimeError as exc:
            self.failures.append(f"kill {i} ({mode}): {exc}")
            return trainer, False
        self.landed += bool(new_tmp)
        problems = self.check(f"kill {i} ({mode})")
        latest = latest_checkpoint(self.run)
        if latest is None or latest.name in problems:
            self.failures.append(f"kill {i} ({mode}): the latest checkpoint {latest} is not usable")
            return trainer, False
        self.resume_from = resume_from = load_train_state(latest).step
        reached = trainer.highest
        lost = reached - resume_from
        self.lost.append(lost)
        if not 0 <= lost <= self.every:
            self.failures.append(f"kill {i} ({mode}): lost {lost} steps (reached {reached}, resume at {resume_from})")
        print(
            f"kill {i:2d}/{self.kills} {mode:16s} reached step {reached:4d}, resume from {resume_from:4d}"
            f"{', mid-write' if new_tmp else ''}{', CORRUPT ' + ' '.join(problems) if problems else ''}",
            flush=True,
        )
        trainer = self.trainer(resume=True)
        if i < self.kills:  # the last resume is checked by the final run
            try:
                trainer.wait_for_step(self.resume_from + 1)
            except RuntimeError as exc:
                self.failures.append(f"resume after kill {i}: {exc}")
                return trainer, False
            self.survived += trainer.first == self.resume_from
        return trainer, True

    def finish(self, trainer: Trainer, code: int) -> None:
        """The checks after the final run (``trainer``, exit status ``code``) has ended."""
        if len(self.lost) == self.kills and code == 0 and trainer.first == self.resume_from:
            self.survived += 1
        elif code != 0:
            self.failures.append(f"the final run exited with {code}:\n{trainer.tail}")
        problems = self.check("final")
        latest = latest_checkpoint(self.run)
        self.final_step = load_train_state(latest).step if latest and latest.name not in problems else None
        steps = [s for s, _ in read_loss_log(self.run / LOSS_CSV, 10**9)]
        self.loss_complete = steps == list(range(1, self.target + 1))
        leftover = sorted(entries(self.run / CHECKPOINT_DIR, r"\.step_.*\.tmp"))
        if self.survived != self.kills:
            self.failures.append(f"only {self.survived} of {self.kills} kills survived")
        if self.final_step != self.target:
            self.failures.append(f"final checkpoint at step {self.final_step}, not {self.target}")
        if not self.loss_complete:
            self.failures.append(f"loss.csv holds {len(steps)} rows, not steps 1..{self.target} once each")
        if leftover:
            self.failures.append(f"temporary checkpoint directories left: {leftover}")

    def figures(self, wall_time_s: float) -> dict:
        lost = self.lost
        return {
            "kills": self.kills,
            "kills_by_mode": {m: self.modes.count(m) for m in MODES},
            "kills_mid_write": self.landed,
            "kills_survived": self.survived,
            "checkpoints_checked": self.checked,
            "corrupt_checkpoints": len(self.corrupt),
            "corrupt_names": sorted(self.corrupt),
            "max_steps_lost": max(lost, default=0),
            "mean_steps_lost": sum(lost) / len(lost) if lost else 0.0,
            "steps_lost": lost,
            "checkpoint_every": self.every,
            "target_step": self.target,
            "final_step": self.final_step,
            "loss_csv_complete": self.loss_complete,
            "wall_time_s": round(wall_time_s, 1),
            "failures": self.failures,
        }


def campaign(out: Path, kills: int, every: int, seed: int, target: int, jitter: float, extra: list[str]) -> dict:
    """Run the whole campaign in ``out``; the figures and the list of failed checks."""
    tic, rng = time.perf_counter(), random.Random(seed)
    modes = [MODES[i % len(MODES)] for i in range(kills)]
    rng.shuffle(modes)
    state = _Campaign(out / "run", kills, every, target, jitter, extra, rng, modes)
    trainer = state.trainer(resume=False)
    try:
        trainer.wait_until(lambda: latest_checkpoint(state.run) is not None, poll=0.01)  # something to resume from
        for i, mode in enumerate(state.modes, 1):
            trainer, go_on = state.kill_and_resume(trainer, i, mode)
            if not go_on:
                break
        code = trainer.finish()
    finally:
        if trainer.proc.poll() is None:
            trainer.kill()
    state.finish(trainer, code)
    return state.figures(time.perf_counter() - tic)


def table(r: dict) -> str:
    """The figures as a Markdown table."""
    by_mode = ", ".join(f"{m} {n}" for m, n in r["kills_by_mode"].items())
    rows = [
        ("Kills (SIGKILL)", f"{r['kills']} ({by_mode})"),
        ("Kills that landed during a checkpoint write", r["kills_mid_write"]),
        ("Kills survived (resume worked)", f"{r['kills_survived']}/{r['kills']}"),
        (
            "Corrupt checkpoints found",
            f"{r['corrupt_checkpoints']} (distinct directories; {r['checkpoints_checked']} loads checked)",
        ),
        ("Steps lost per kill, max / mean", f"{r['max_steps_lost']} / {r['mean_steps_lost']:.2f}"),
        ("Checkpoint interval (steps)", r["checkpoint_every"]),
        ("Final step / target", f"{r['final_step']} / {r['target_step']}"),
        ("loss.csv holds steps 1..target once each", "yes" if r["loss_csv_complete"] else "NO"),
        ("Total wall time", f"{r['wall_time_s']:.0f} s"),
    ]
    return "\n".join(["| Figure | Value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; 0 when every check passed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20, help="number of SIGKILLs (default: 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill kinds and random kill timing (default: 0)")
    p.add_argument("--checkpoint-every", type=int, default=2, help="checkpoint interval in steps (default: 2)")
    p.add_argument(
        "--steps", type=int, default=None, help="target step (default: (kills + 2) * 2 * interval, room for every kill)"
    )
    p.add_argument(
        "--jitter", type=float, default=0.3, help="random kills: extra delay up to this many seconds (default: 0.3)"
    )
    p.add_argument(
        "--channels",
        default=None,
        help="U-Net widths, e.g. 32,64,128 for slower checkpoint writes (default: the tiny preset's)",
    )
    p.add_argument("--out", type=Path, default=None, help="campaign directory (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep --out (a temporary one is otherwise removed)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    a = p.parse_args(argv)
    if a.kills < 1 or a.checkpoint_every < 1:
        p.error("--kills and --checkpoint-every must be at least 1")
    target = a.steps or (a.kills + 2) * 2 * a.checkpoint_every
    out = a.out or Path(tempfile.mkdtemp(prefix="kill_campaign_"))
    extra = ["--channels", a.channels] if a.channels else []
    try:
        result = campaign(out, a.kills, a.checkpoint_every, a.seed, target, a.jitter, extra)
    finally:
        if a.out is None and not a.keep:
            shutil.rmtree(out, ignore_errors=True)
        else:
            print(f"Campaign directory kept: {out}")
    print(table(result))
    for failure in result["failures"]:
        print(f"FAILED: {failure}", file=sys.stderr)
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
