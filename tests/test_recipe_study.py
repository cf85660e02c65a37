"""studies.recipe: its statistics against independent values, and a whole scoring on tiny runs."""

import json
import math
import subprocess

import pytest
import torch
from PIL import Image

from ddpm_cars import training
from studies import recipe


@pytest.fixture(autouse=True)
def _one_thread(_few_threads):
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(2)


@pytest.mark.parametrize("df, table", [(1, 12.706), (2, 4.303), (5, 2.571), (20, 2.086), (1000, 1.962)])
def test_t_quantile_matches_the_printed_table(df, table):
    assert recipe.t_quantile(0.975, df) == pytest.approx(table, abs=6e-4)


def test_welch_interval_by_hand():
    # means 2 and 5, each variance 2 over 2 values: standard error sqrt(1 + 1), df 4 / 2 = 2
    diff, low, high = recipe.welch_interval([1.0, 3.0], [4.0, 6.0])
    half = 4.3027 * math.sqrt(2)
    assert diff == pytest.approx(-3.0)
    assert (low, high) == (pytest.approx(-3.0 - half, abs=1e-3), pytest.approx(-3.0 + half, abs=1e-3))
    # unequal variances and counts: df by Welch-Satterthwaite, 2.667 here, between the df 2 and df 3 quantiles
    diff, low, high = recipe.welch_interval([1.0, 3.0], [2.0, 2.0, 5.0])
    assert diff == pytest.approx(-1.0)
    assert 3.182 * math.sqrt(2) < high - diff < 4.303 * math.sqrt(2)


def test_choose_sampler_weighs_swd_and_judge_fd_alike():
    def groups(swd, fd):
        return {"run-s1": [{"swd": swd, "judge_fd": fd, "judge_kid": 0.0}]}

    # relative to the best of each: a (1.0, 1.36), b (1.1, 1.0), c (1.2, 1.45): b
    tuning = {"a": groups(10.0, 3.0), "b": groups(11.0, 2.2), "c": groups(12.0, 3.2)}
    assert recipe.choose_sampler(tuning) == "b"
    tuning["b"] = groups(11.0, 2.8)  # b now the best FD: a (1.0, 1.07) beats b (1.1, 1.0)
    assert recipe.choose_sampler(tuning) == "a"


def test_arm_names():
    assert recipe.arm_of("v-minsnr-s12") == "v-minsnr" and recipe.arm_of("eps-small-s1") == "eps-small"
    assert recipe.parse_arm("v=--prediction v --min-snr-gamma 5") == (
        "v",
        ["--prediction", "v", "--min-snr-gamma", "5"],
    )
    assert recipe.parse_arm("eps=") == ("eps", [])
    with pytest.raises(SystemExit, match="NAME=FLAGS"):
        recipe.parse_arm("--prediction v")


def test_train_alternates_arms_seed_by_seed_and_skips_finished_runs(tmp_path, monkeypatch):
    calls = []

    def fake_run(argv, check):
        calls.append(argv[4:])
        out = tmp_path / argv[argv.index("--out") + 1]
        out.mkdir(parents=True)

    (tmp_path / "v-s1").mkdir()
    (tmp_path / "v-s1" / recipe.TRAIN_RECORD).write_text("{}")
    (tmp_path / "eps-s2").mkdir()  # cut short: trained again from the start
    (tmp_path / "eps-s2" / "stale").write_text("")
    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(recipe, "commit", lambda: "abc1234")
    recipe.train_arms(tmp_path, [("eps", []), ("v", ["--prediction", "v"])], [1, 2])
    outs = [c[c.index("--out") + 1] for c in calls]
    assert outs == [str(tmp_path / n) for n in ("eps-s1", "eps-s2", "v-s2")]
    assert calls[2][:6] == ["--preset", "demo", "--seed", "2", "--prediction", "v"]
    assert not (tmp_path / "eps-s2" / "stale").exists()
    record = json.loads((tmp_path / "v-s2" / recipe.TRAIN_RECORD).read_text())
    assert record["command"].startswith("ddpm-cars train --preset demo --seed 2 --prediction v --out ")
    assert record["commit"] == "abc1234" and record["machine"].startswith("CPU, ") and record["train_seconds"] >= 0


def test_score_tunes_on_other_groups_than_the_verdict_and_draws_nothing_twice(tmp_path, tiny_config, capsys):
    config = tiny_config.replace(train={"max_steps": 2}, data={"toy_count": 48})
    for arm, prediction in (("eps", "eps"), ("v", "v")):
        for seed in (1, 2):
            out = tmp_path / "runs" / f"{arm}-s{seed}"
            training.train(
                config.replace(diffusion={"prediction": prediction}, train={"seed": seed}), out, progress=False
            )
            (out / recipe.TRAIN_RECORD).write_text(
                json.dumps(
                    {"command": f"train {arm} {seed}", "commit": "c", "machine": "CPU, test", "train_seconds": 1}
                )
            )
    record = tmp_path / "scores.jsonl"
    argv = ["score", "--root", str(tmp_path / "runs"), "--record", str(record), "--num", "6", "--batch-size", "6"]
    argv += ["--verdict-groups", "2", "--candidates", "ddpm:4,ddim:4", "--reference", "ddpm:8"]
    argv += ["--converge", "v-s1", "--converge-steps", "ddpm:20"]
    recipe.main([*argv, "--grid", str(tmp_path / "grid.png")])
    out = capsys.readouterr().out
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    by = {}
    for line in lines:
        by.setdefault((line["sample"]["sampler"], line["sample"]["steps"]), set()).add(line["group"])
    assert by[("ddim", 4)] <= {0, 1, 2} and by[("ddpm", 8)] == {1} and by[("ddpm", 20)] == {1}
    tuned_groups = {line["group"] for line in lines if line["sample"]["steps"] == 4}
    assert 0 in tuned_groups and tuned_groups - {0} <= {1, 2}  # the chosen sampler's verdict: groups 1-2 only
    assert len(lines) == 4 * 2 + 4 * 2 + 4 + 1  # tuning 2 candidates, verdict 2 groups, reference, convergence
    assert all(line["provenance"]["command"].startswith("python -m studies.") for line in lines)
    # every training has a row; each arm other than the baseline a verdict row with an interval on each metric
    for name in ("eps-s1", "eps-s2", "v-s1", "v-s2"):
        assert f"| {name} | 1 s | " in out
    rows = [line for line in out.splitlines() if line.startswith("| v | ") and "[" in line]
    assert len(rows) == 2 and rows[1].startswith("| v | ddpm:8 | 2 | ")  # the tuned sampler's, the reference's
    assert all(row.count("[") == 3 and row.count("%") == 3 for row in rows)
    assert "| v-s1 | " in out.split("Convergence")[1]
    assert Image.open(tmp_path / "grid.png").size == (6 * 16 + 7 * 2, 4 * 16 + 5 * 2)  # a row of 6 per training
    recipe.main([*argv, "--grid", str(tmp_path / "again.png")])  # everything recorded: nothing drawn again
    assert len(record.read_text().splitlines()) == len(lines)
    assert Image.open(tmp_path / "again.png").size == Image.open(tmp_path / "grid.png").size  # its images redrawn

    # a screening (no verdict groups) draws the tuning groups alone and prints the tuning table alone
    capsys.readouterr()
    screen = tmp_path / "screen.jsonl"
    recipe.main(
        ["score", "--root", str(tmp_path / "runs"), "--record", str(screen), "--num", "6", "--batch-size", "6"]
        + ["--verdict-groups", "0", "--candidates", "ddpm:4,ddim:4"]
    )
    out = capsys.readouterr().out
    screened = [json.loads(line) for line in screen.read_text().splitlines()]
    assert len(screened) == 4 * 2 and {line["group"] for line in screened} == {0}
    assert "| v | ddim:4" in out and "Every training" not in out and "Each arm against" not in out
