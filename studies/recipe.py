r"""Which recipe a short run should use: trainings of the demo recipe that differ in one
choice (prediction target, loss weighting, width, length), each arm trained from several
seeds back to back on one machine and precision, and judged by two metrics.

Each trained model is scored by SWD (x1e3) and by the judge network's FD and KID
(``evaluation/judge.py``) in groups of ``--num`` images against the training images, as
``studies.sampler_quality`` scores them (and in its record, so that nothing drawn is drawn
twice):

- **tuning** (groups 0 to ``--tune-groups`` - 1): every candidate sampler of at most 20
  network calls (``--candidates``); an arm's sampler is the candidate with the lowest mean
  of its SWD and judge FD, each relative to the arm's best candidate, over the arm's models;
- **verdict** (the next ``--verdict-groups`` groups: images the tuning never saw): the arm's
  own sampler, and the reference, ancestral sampling on ``--reference-steps`` steps, on the
  first ``--reference-groups`` of them;
- **convergence** (``--converge-steps`` on the runs ``--converge`` names): the reference
  against more ancestral steps on the first verdict group.

The verdict compares each arm with ``--baseline``: the difference of the arms' means over
their trainings (a training's figure is the mean of its verdict groups), with a 95%
interval by Welch's t on the trainings, so that the spread between trainings, not only
between sample groups, bounds the effect.

Usage (runs under ROOT/ARM-sSEED; ``--arm NAME=FLAGS`` adds FLAGS to
``ddpm-cars train --preset demo``):

    python -m studies.recipe train --root runs/recipe --arm eps= --arm v="--prediction v" --seeds 1,2
    python -m studies.recipe score --root runs/recipe --record docs/benchmarks/recipe/scores.jsonl \
        --baseline eps --converge eps-s1,v-s1
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ddpm_cars.data import build_dataset
from ddpm_cars.denoiser import Denoiser
from ddpm_cars.generation import QUIET, generate
from ddpm_cars.parallel import resolve_device
from ddpm_cars.run import Run
from ddpm_cars.runtime import resolve_precision
from ddpm_cars.viz import save_grid
from studies.provenance import commit, machine, provenance
from studies.sampler_quality import ScoreRecord, draw_groups, label, network_calls, parse_settings, weights_digest

CANDIDATES = "ddpm:20,ddim:20,dpm++:20:karras,dpm++sde:20:karras,heun:10:karras"
METRICS = ("swd", "judge_fd", "judge_kid")
TRAIN_RECORD = "study_train.json"  # beside each run: its command, commit, machine and training time


def run_name(arm: str, seed: int) -> str:
    return f"{arm}-s{seed}"


def arm_of(run: str) -> str:
    """``v-minsnr-s2`` -> ``v-minsnr``."""
    return re.sub(r"-s\d+$", "", run)


def parse_arm(text: str) -> tuple[str, list[str]]:
    """``NAME=FLAGS`` as (name, flags): ``v=--prediction v`` -> ("v", ["--prediction", "v"])."""
    name, sep, flags = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--arm: expected NAME=FLAGS (e.g. v=--prediction v); got {text!r}")
    return name, shlex.split(flags)


def train_arms(root: Path, arms: list[tuple[str, list[str]]], seeds: list[int]) -> None:
    """Each arm from each seed, seed by seed (so that arms alternate in time), skipping a
    run that already finished; a run cut short is trained again from the start."""
    for seed in seeds:
        for name, flags in arms:
            out = root / run_name(name, seed)
            if (out / TRAIN_RECORD).is_file():
                continue
            command = ["ddpm-cars", "train", "--preset", "demo", "--seed", str(seed), *flags, "--out", str(out)]
            print("$", shlex.join(command), flush=True)
            tic = time.perf_counter()
            shutil.rmtree(out, ignore_errors=True)  # a run cut short starts again
            subprocess.run([sys.executable, "-m", "ddpm_cars", *command[1:]], check=True)
            record = {
                "command": shlex.join(command),
                "commit": commit(),
                "machine": machine(torch.device("cpu")),
                "train_seconds": round(time.perf_counter() - tic, 1),
            }
            (out / TRAIN_RECORD).write_text(json.dumps(record, indent=1) + "\n")


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile (p > 0.5) of Student's t with ``df`` degrees of freedom, by
    bisection on its distribution function (Simpson's rule on the density)."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:
        # the substitution t = tan(u) keeps the heavy tails of small df integrable on [0, atan x]
        def g(u: float) -> float:
            t = math.tan(u)
            return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df)) * (1 + t * t)

        n, top = 2000, math.atan(x)
        h = top / n
        total = g(0) + g(top) + sum((4 if i % 2 else 2) * g(i * h) for i in range(1, n))
        return 0.5 + total * h / 3

    low, high = 0.0, 1e3
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2


def welch_interval(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """mean(a) - mean(b) and its ``level`` interval by Welch's t (each list at least 2 values)."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    if va + vb == 0:
        return diff, diff, diff
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = t_quantile(0.5 + level / 2, df) * math.sqrt(va + vb)
    return diff, diff - half, diff + half


def choose_sampler(tuning: dict[str, dict[str, list[dict[str, float]]]]) -> str:
    """The candidate with the lowest mean of SWD and judge FD, each relative to the best
    candidate's: ``tuning[candidate][run]`` is that run's group scores."""
    mean = {
        c: {m: statistics.fmean(g[m] for gs in runs.values() for g in gs) for m in METRICS}
        for c, runs in tuning.items()
    }
    best = {m: min(v[m] for v in mean.values()) for m in ("swd", "judge_fd")}
    return min(mean, key=lambda c: (mean[c]["swd"] / best["swd"] + mean[c]["judge_fd"] / best["judge_fd"]) / 2)


@dataclasses.dataclass(frozen=True)
class Plan:
    num: int
    tune_groups: int
    verdict_groups: int
    reference: str
    reference_groups: int
    converge: str
    batch_size: int

    @property
    def verdict(self) -> range:
        return range(self.tune_groups, self.tune_groups + self.verdict_groups)


@functools.cache
def _opened(path: Path, num: int, record_file: Path) -> tuple[Run, Denoiser, ScoreRecord, torch.Tensor]:
    """A run opened for scoring, once for all the passes of one ``score``: its sampling
    network, its record (groups of ``num`` images) and its training images."""
    run = Run.open(path)
    device = resolve_device("cpu")
    denoiser = run.denoiser(ema=True, device=device)
    identity = {
        "weights": weights_digest(run.checkpoint),
        "device": device.type,
        "precision": resolve_precision(denoiser.precision, device),
        "num": num,
        "seed": 0,
    }
    record = ScoreRecord(record_file, identity, provenance(device))
    return run, denoiser, record, build_dataset(run.config.data, progress=False).images


def score_run(
    path: Path, plan: Plan, record_file: Path, settings: dict[str, list[str]], shown: list[torch.Tensor] | None = None
) -> dict:
    """``{kind: {setting: [group scores]}}`` of one run for the settings of each kind
    ("tuning", "verdict", "reference", "converge"): recorded groups are taken from the
    record, the others drawn and recorded. With ``shown``, the first 8 images of the first
    verdict group drawn with the verdict's setting are appended to it."""
    run, denoiser, record, train = _opened(path, plan.num, record_file)
    first = plan.tune_groups
    groups = {
        "tuning": range(plan.tune_groups),
        "verdict": plan.verdict,
        "reference": range(first, first + plan.reference_groups),
        "converge": range(first, first + 1),
    }
    out: dict[str, dict[str, list[dict[str, float]]]] = {}
    for kind, names in settings.items():
        for text in names:
            ((sampler, steps, spacing, extra),) = parse_settings(text)
            sample = dataclasses.replace(run.config.sample, sampler=sampler, steps=steps, spacing=spacing, **extra)
            entries, drawn = draw_groups(
                denoiser, sample, record, groups[kind], plan.num, plan.batch_size, train, name=f"{path.name} {text}"
            )
            out.setdefault(kind, {})[text] = [e["scores"] for e in entries]
            if shown is not None and kind == "verdict":
                shown_count = min(8, plan.num)
                if drawn is None:  # the first verdict group came from the record: draw its first images again
                    indices = range(first * plan.num, first * plan.num + shown_count)
                    drawn = generate(denoiser, indices, sample, seed=0, batch_size=8, watch=QUIET)
                shown.append(drawn[:shown_count])
    return out


def _mean(groups: list[dict[str, float]], metric: str) -> float:
    return statistics.fmean(g[metric] for g in groups)


def _fmt(metric: str, value: float) -> str:
    return f"{value * 1e3:.2f}" if metric == "judge_kid" else f"{value:.2f}"


def tables(runs: dict[str, dict], train: dict[str, dict], chosen: dict[str, str], plan: Plan, baseline: str) -> str:
    """The study's tables in Markdown: every training, the arms' verdict, convergence."""
    arms = sorted({arm_of(r) for r in runs}, key=lambda a: (a != baseline, a))
    lines = [
        f"Every training ({plan.num} images a group; KID x1e3; tuning on groups 0-{plan.tune_groups - 1}, "
        f"verdict on groups {plan.verdict[0]}-{plan.verdict[-1]}):",
        "",
        "| run | training | sampler (calls) | SWD | judge FD | judge KID | reference: "
        + plan.reference
        + " SWD | FD |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in sorted(runs, key=lambda r: (arms.index(arm_of(r)), r)):
        scores, sampler = runs[name], chosen[arm_of(name)]
        verdict, ref = scores["verdict"][sampler], scores.get("reference", {}).get(plan.reference)
        ((s, steps, spacing, extra),) = parse_settings(sampler)
        cells = [_fmt(m, _mean(verdict, m)) for m in METRICS]
        cells += [_fmt(m, _mean(ref, m)) for m in ("swd", "judge_fd")] if ref else ["", ""]
        seconds = train.get(name, {}).get("train_seconds")
        lines.append(
            f"| {name} | {f'{seconds:.0f} s' if seconds else ''} | {label(s, spacing, extra)} "
            f"({network_calls(s, steps)}) | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        f"Each arm against {baseline} (difference of the means over trainings, 95% interval by Welch's t; "
        "negative is better):",
        "",
        "| arm | sampler | trainings | " + " | ".join(f"{m} difference [95% CI]" for m in METRICS) + " |",
        "| --- | --- | ---: |" + " --- |" * len(METRICS),
    ]
    per_arm = {
        a: {m: [_mean(runs[r]["verdict"][chosen[a]], m) for r in runs if arm_of(r) == a] for m in METRICS} for a in arms
    }
    ref_arm = {
        a: {
            m: [
                _mean(runs[r]["reference"][plan.reference], m)
                for r in runs
                if arm_of(r) == a and runs[r].get("reference")
            ]
            for m in METRICS
        }
        for a in arms
    }
    for kind, values in (("tuned", per_arm), ("reference", ref_arm)):
        for a in arms:
            if a == baseline or len(values[a]["swd"]) < 2 or len(values[baseline]["swd"]) < 2:
                continue
            cells = []
            for m in METRICS:
                diff, low, high = welch_interval(values[a][m], values[baseline][m])
                base = statistics.fmean(values[baseline][m])
                cells.append(f"{_fmt(m, diff)} ({100 * diff / base:+.0f}%) [{_fmt(m, low)}, {_fmt(m, high)}]")
            sampler = chosen[a] if kind == "tuned" else plan.reference
            lines.append(f"| {a} | {sampler} | {len(values[a]['swd'])} | " + " | ".join(cells) + " |")
    converged = [r for r in runs if runs[r].get("converge")]
    if converged:
        lines += [
            "",
            f"Convergence of the reference ({plan.reference} against {plan.converge}, group {plan.verdict[0]}):",
            "",
            f"| run | {plan.reference} SWD | {plan.converge} SWD | "
            f"{plan.reference} judge FD | {plan.converge} judge FD |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for r in converged:
            ref, long = runs[r]["reference"][plan.reference][:1], runs[r]["converge"][plan.converge]
            lines.append(
                f"| {r} | {_mean(ref, 'swd'):.2f} | {_mean(long, 'swd'):.2f} | "
                f"{_mean(ref, 'judge_fd'):.2f} | {_mean(long, 'judge_fd'):.2f} |"
            )
    return "\n".join(lines)


def score(args: argparse.Namespace) -> None:
    _opened.cache_clear()  # runs and records may have changed since an earlier call in this process
    plan = Plan(
        args.num,
        args.tune_groups,
        args.verdict_groups,
        args.reference,
        args.reference_groups,
        args.converge_steps,
        args.batch_size,
    )
    paths = sorted(p.parent for p in args.root.glob(f"*/{TRAIN_RECORD}"))
    if args.arms:
        paths = [p for p in paths if arm_of(p.name) in args.arms.split(",")]
    if not paths:
        raise SystemExit(f"no finished trainings under {args.root} (each has a {TRAIN_RECORD})")
    candidates = args.candidates.split(",")
    converge = set(args.converge.split(",")) if args.converge else set()
    train = {p.name: json.loads((p / TRAIN_RECORD).read_text()) for p in paths}
    tuning = {p.name: score_run(p, plan, args.record, {"tuning": candidates})["tuning"] for p in paths}
    chosen = {}
    for arm in sorted({arm_of(p.name) for p in paths}):
        chosen[arm] = choose_sampler({c: {r: tuning[r][c] for r in tuning if arm_of(r) == arm} for c in candidates})
    runs, shown = {}, ([] if args.grid else None)
    for p in paths if plan.verdict_groups else ():
        settings = {"verdict": [chosen[arm_of(p.name)]]}
        if plan.reference_groups:
            settings["reference"] = [plan.reference]
        if p.name in converge:
            settings["converge"] = [plan.converge]
        runs[p.name] = score_run(p, plan, args.record, settings, shown)
    print(f"\nTuning (mean over each arm's trainings, groups 0-{plan.tune_groups - 1}):\n")
    print("| arm | sampler | SWD | judge FD | judge KID |\n| --- | --- | ---: | ---: | ---: |")
    for arm in chosen:
        for c in candidates:
            groups = [g for r in tuning if arm_of(r) == arm for g in tuning[r][c]]
            mark = " (chosen)" if c == chosen[arm] else ""
            print(f"| {arm} | {c}{mark} | " + " | ".join(_fmt(m, _mean(groups, m)) for m in METRICS) + " |")
    print()
    if runs:
        print(tables(runs, train, chosen, plan, args.baseline))
    for name, t in train.items():
        print(f"\n{name}: {t['command']} (commit {t['commit']}, {t['machine']})", end="")
    print()
    if shown:
        save_grid(torch.cat(shown), args.grid, nrow=shown[0].shape[0])
        print(f"Wrote {args.grid}: a row per training ({', '.join(p.name for p in paths)}), its arm's sampler")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    t = sub.add_parser("train", help="train each arm from each seed (ROOT/ARM-sSEED), skipping finished runs")
    t.add_argument("--root", type=Path, required=True, help="folder of the runs")
    t.add_argument(
        "--arm", action="append", required=True, metavar="NAME=FLAGS", help="an arm: its ddpm-cars train flags"
    )
    t.add_argument("--seeds", default="1,2", help="training seeds, comma-separated (default: 1,2)")
    s = sub.add_parser("score", help="tune, judge and tabulate the finished runs")
    s.add_argument("--root", type=Path, required=True, help="folder of the runs")
    s.add_argument("--record", type=Path, required=True, help="JSON-lines record of the group scores")
    s.add_argument("--baseline", default="eps", help="the arm the others are compared with (default: eps)")
    s.add_argument("--arms", default=None, help="only these arms, comma-separated (default: all)")
    s.add_argument("--num", type=int, default=128, help="images a group (default: 128)")
    s.add_argument("--tune-groups", type=int, default=1, help="groups the samplers are tuned on (default: 1)")
    s.add_argument(
        "--verdict-groups",
        type=int,
        default=3,
        help="groups the verdict is drawn on; 0: tune only, as a screening (default: 3)",
    )
    s.add_argument("--candidates", default=CANDIDATES, help=f"samplers to tune over (default: {CANDIDATES})")
    s.add_argument("--reference", default="ddpm:250", help="the reference sampler (default: ddpm:250)")
    s.add_argument("--reference-groups", type=int, default=1, help="verdict groups drawn with it (default: 1)")
    s.add_argument("--converge", default="", metavar="RUN,...", help="runs drawn with --converge-steps too")
    s.add_argument("--converge-steps", default="ddpm:1000", help="the reference's check (default: ddpm:1000)")
    s.add_argument("--batch-size", type=int, default=64, help="images per sampling batch (default: 64)")
    s.add_argument("--grid", type=Path, default=None, help="PNG: the first 8 verdict images of each training")
    args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    if args.step == "train":
        train_arms(args.root, [parse_arm(a) for a in args.arm], [int(s) for s in args.seeds.split(",")])
    else:
        score(args)


if __name__ == "__main__":
    main()
