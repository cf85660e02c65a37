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

Prints a Markdown table; exits non-zero when any check fails.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ddpm_cars.config import RunConfig
from ddpm_cars.models import build_model
from ddpm_cars.training import checkpoint as ckpt
from ddpm_cars.training.loop import LOSS_CSV, read_loss_log

MODES = ("random", "after_checkpoint", "mid_write")
TRAIN_ARGS = ["--preset", "tiny", "--toy-count", "64", "--sample-every", "1000", "--num-sample-images", "2", "--device", "cpu"]
WAIT_S = 180  # the longest wait for any one event before the campaign gives up


class Trainer:
    """One training process; a thread reads its progress bar for the highest completed step."""

    def __init__(self, run: Path, every: int, target: int, resume: bool, extra: list[str]) -> None:
        args = [sys.executable, "-m", "ddpm_cars", "train", "--out", str(run), *TRAIN_ARGS, *extra,
                "--checkpoint-every", str(every), "--steps", str(target)] + (["--resume"] if resume else [])
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "TQDM_MININTERVAL": "0", "TQDM_MINITERS": "1"}  # the bar prints every step
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


def kill_at(trainer: Trainer, mode: str, start: int, run: Path, every: int, jitter: float, rng: random.Random) -> set[str]:
    """Kill ``trainer`` at a moment of kind ``mode``; the temporary checkpoint dirs that were new then."""
    root = run / ckpt.CHECKPOINT_DIR
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
    config = RunConfig.load(run / ckpt.CONFIG_FILE)
    files = [ckpt.MODEL_FILE, ckpt.STATE_FILE] + ([ckpt.EMA_FILE] if config.train.ema_decay else [])
    model = build_model(config)
    checkpoints, problems = ckpt.list_checkpoints(run), {}
    for path in checkpoints:
        try:
            missing = [f for f in files if not (path / f).is_file()]
            assert not missing, f"missing {missing}"
            ckpt.load_weights(model, path)
            ckpt.load_weights(model, path, ema=True)
            step = ckpt.load_train_state(path).step
            assert step == int(path.name[5:]), f"train_state says step {step}"
        except Exception as exc:  # noqa: BLE001 - any failure to load is corruption
            problems[path.name] = repr(exc)
    return len(checkpoints), problems


def campaign(out: Path, kills: int, every: int, seed: int, target: int, jitter: float, extra: list[str]) -> dict:
    """Run the whole campaign in ``out``; the figures and the list of failed checks."""
    rng, run, tic = random.Random(seed), out / "run", time.perf_counter()
    modes = [MODES[i % len(MODES)] for i in range(kills)]
    rng.shuffle(modes)
    failures: list[str] = []
    lost: list[int] = []
    landed = survived = checked = 0
    corrupt: set[str] = set()  # names of the checkpoint directories found corrupt
    resume_from = 0
    trainer = Trainer(run, every, target, resume=False, extra=extra)
    try:
        trainer.wait_until(lambda: ckpt.latest_checkpoint(run) is not None, poll=0.01)  # something to resume from
        for i, mode in enumerate(modes, 1):
            try:
                new_tmp = kill_at(trainer, mode, max(trainer.highest, 0), run, every, jitter, rng)
            except RuntimeError as exc:
                failures.append(f"kill {i} ({mode}): {exc}")
                break
            landed += bool(new_tmp)
            n, problems = check_checkpoints(run)
            checked, corrupt = checked + n, corrupt | problems.keys()
            failures += [f"kill {i} ({mode}): corrupt {name}: {p}" for name, p in problems.items()]
            latest = ckpt.latest_checkpoint(run)
            if latest is None or latest.name in problems:
                failures.append(f"kill {i} ({mode}): the latest checkpoint {latest} is not usable")
                break
            resume_from = ckpt.load_train_state(latest).step
            lost.append(trainer.highest - resume_from)
            if not 0 <= lost[-1] <= every:
                failures.append(f"kill {i} ({mode}): lost {lost[-1]} steps (reached {trainer.highest}, resume at {resume_from})")
            print(f"kill {i:2d}/{kills} {mode:16s} reached step {trainer.highest:4d}, resume from {resume_from:4d}"
                  f"{', mid-write' if new_tmp else ''}{', CORRUPT ' + ' '.join(problems) if problems else ''}", flush=True)
            trainer = Trainer(run, every, target, resume=True, extra=extra)
            if i < kills:  # the last resume is checked by the final run
                try:
                    trainer.wait_for_step(resume_from + 1)
                except RuntimeError as exc:
                    failures.append(f"resume after kill {i}: {exc}")
                    break
                survived += trainer.first == resume_from
        code = trainer.finish()
    finally:
        if trainer.proc.poll() is None:
            trainer.kill()
    if len(lost) == kills and code == 0 and trainer.first == resume_from:
        survived += 1
    elif code != 0:
        failures.append(f"the final run exited with {code}:\n{trainer.tail}")
    n, problems = check_checkpoints(run)
    checked, corrupt = checked + n, corrupt | problems.keys()
    failures += [f"final: corrupt {name}: {p}" for name, p in problems.items()]
    latest = ckpt.latest_checkpoint(run)
    final_step = ckpt.load_train_state(latest).step if latest and latest.name not in problems else None
    steps = [s for s, _ in read_loss_log(run / LOSS_CSV, 10**9)]
    loss_complete = steps == list(range(1, target + 1))
    leftover = sorted(entries(run / ckpt.CHECKPOINT_DIR, r"\.step_.*\.tmp"))
    failures += [] if survived == kills else [f"only {survived} of {kills} kills survived"]
    failures += [] if final_step == target else [f"final checkpoint at step {final_step}, not {target}"]
    failures += [] if loss_complete else [f"loss.csv holds {len(steps)} rows, not steps 1..{target} once each"]
    failures += [f"temporary checkpoint directories left: {leftover}"] if leftover else []
    return {
        "kills": kills, "kills_by_mode": {m: modes.count(m) for m in MODES}, "kills_mid_write": landed,
        "kills_survived": survived, "checkpoints_checked": checked, "corrupt_checkpoints": len(corrupt),
        "corrupt_names": sorted(corrupt),
        "max_steps_lost": max(lost, default=0), "mean_steps_lost": sum(lost) / len(lost) if lost else 0.0,
        "steps_lost": lost, "checkpoint_every": every, "target_step": target, "final_step": final_step,
        "loss_csv_complete": loss_complete, "wall_time_s": round(time.perf_counter() - tic, 1), "failures": failures,
    }


def table(r: dict) -> str:
    """The figures as a Markdown table."""
    by_mode = ", ".join(f"{m} {n}" for m, n in r["kills_by_mode"].items())
    rows = [
        ("Kills (SIGKILL)", f"{r['kills']} ({by_mode})"),
        ("Kills that landed during a checkpoint write", r["kills_mid_write"]),
        ("Kills survived (resume worked)", f"{r['kills_survived']}/{r['kills']}"),
        ("Corrupt checkpoints found", f"{r['corrupt_checkpoints']} (distinct directories; {r['checkpoints_checked']} loads checked)"),
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
    p.add_argument("--steps", type=int, default=None, help="target step (default: (kills + 2) * 2 * interval, room for every kill)")
    p.add_argument("--jitter", type=float, default=0.3, help="random kills: extra delay up to this many seconds (default: 0.3)")
    p.add_argument("--channels", default=None, help="U-Net widths, e.g. 32,64,128 for slower checkpoint writes (default: the tiny preset's)")
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
