"""The studies (``studies/``, outside the package): the pure parts of each script, and the
sampler study end to end on a run trained for two steps."""

import dataclasses
import json
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_cars import training
from ddpm_cars.evaluation.sample_metrics import sample_metrics
from ddpm_cars.runtime import cpu_kind
from studies import editing_quality, offline_metric, sampler_quality


@pytest.fixture(autouse=True)
def _one_thread(_few_threads):
    # two threads fighting another job for two cores can be 50x slower than one
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(2)


def test_sampler_quality_settings_name_the_spacing_and_count_heun_twice():
    assert sampler_quality.parse_settings(
        "ddpm:50,dpm++:20:karras,heun:10:logsnr:churn=40,ddim:20:eta=1:ddim_sigma=learned,dpm++:20:karras:clip_x0=false"
    ) == [
        ("ddpm", 50, "uniform", {}),
        ("dpm++", 20, "karras", {}),
        ("heun", 10, "logsnr", {"churn": 40.0}),
        ("ddim", 20, "uniform", {"eta": 1.0, "ddim_sigma": "learned"}),
        ("dpm++", 20, "karras", {"clip_x0": False}),
    ]
    assert [sampler_quality.network_calls(s, 10) for s in ("ddpm", "ddim", "dpm++", "dpm++3m", "dpm++sde", "heun")] == [
        10,
        10,
        10,
        10,
        10,
        19,
    ]


def test_sampler_quality_grid_fits_each_sampler_into_each_budget_of_calls():
    grid = sampler_quality.grid_settings("ddpm,heun:karras:churn=20", [10, 20, 35])
    assert [(budget, sampler, steps) for budget, (sampler, steps, _, _) in grid] == [
        (10, "ddpm", 10),
        (20, "ddpm", 20),
        (35, "ddpm", 35),
        (10, "heun", 5),
        (20, "heun", 10),
        (35, "heun", 18),
    ]
    assert all(
        sampler_quality.network_calls(s, n) <= budget and sampler_quality.network_calls(s, n + 1) > budget
        for budget, (s, n, _, _) in grid
        if s == "heun"
    )  # the most Heun steps that fit
    assert grid[3][1][2:] == ("karras", {"churn": 20.0})

    def scores(*swd):
        return [{"swd": v} for v in swd]

    table = sampler_quality.calls_table(
        {
            "ddpm": {10: (10, scores(30.0, 40.0)), 1000: (1000, scores(20.0, 22.0))},
            "heun, karras": {10: (9, scores(25.0, 27.0))},
        },
        scores(16.0, 18.0),
    ).splitlines()
    assert table[0] == "| sampler | 10 calls | 1000 calls |"
    assert table[2].startswith("| held-out real images | 17.00 (16.0-18.0) |")
    assert table[3] == "| ddpm | 35.00 (30.0-40.0) | 21.00 (20.0-22.0) |"
    assert table[4] == "| heun, karras | 26.00 (25.0-27.0) [9] |  |"  # 9 calls within the budget of 10
    assert {line.count("|") for line in table} == {4}


def test_sampler_quality_draws_a_later_group_as_the_whole_run_draws_it(tmp_path, tiny_config, monkeypatch, capsys):
    """--first-group 1 scores images NUM..2 NUM - 1, the second group of --groups 2, and the
    grid of samplers ends with the table against calls."""
    training.train(
        tiny_config.replace(train={"max_steps": 2}, data={"toy_count": 48}), tmp_path / "run", progress=False
    )

    def table(*extra):
        monkeypatch.setattr(
            sys,
            "argv",
            [
                "sampler_quality",
                "--run",
                str(tmp_path / "run"),
                "--num",
                "6",
                "--batch-size",
                "4",
                "--nfe",
                "4",
                "--samplers",
                "ddpm,heun:karras",
                "--redraw",
                *extra,
            ],
        )
        sampler_quality.main()
        return capsys.readouterr().out

    both, first, second = table("--groups", "2"), table(), table("--first-group", "1")
    assert "images 0-11 of seed 0" in both and "images 6-11 of seed 0" in second

    def swd(out):  # the floor's, ddpm's and heun's SWD cells of the first table
        rows = [line for line in out.splitlines() if line.startswith("| ")][2:5]
        return [row.split(" | ")[3] for row in rows]

    assert [row.split(" | ")[:2] for row in second.splitlines() if row.startswith("| ")][3:5] == [
        ["| ddpm", "4"],
        ["| heun, karras", "2 (3)"],
    ]
    for whole, one, two in zip(swd(both), swd(first), swd(second)):  # "mean (low-high)" of two groups; each group's
        low, high = map(float, whole.split("(")[1].rstrip(")").split("-"))
        one, two = sorted([float(one), float(two)])
        assert abs(one - low) <= 0.051 and abs(two - high) <= 0.051 and two - one > 0.1, (
            whole,
            one,
            two,
        )  # printed to 0.1
    assert second.splitlines()[-1].startswith("| heun, karras | ") and second.splitlines()[-1].endswith(" [3] |")
    table_lines = [line for line in both.splitlines() if line.startswith("| ")]
    fd = table_lines[0].split(" | ").index("judge FD")  # new record lines carry the judge: both metrics shown
    assert all(float(row.split(" | ")[fd]) >= 0 and row.split(" | ")[fd + 1] for row in table_lines[2:5])
    assert "; FD " in both.splitlines()[-1]


def test_sampler_quality_takes_recorded_groups_and_draws_only_the_missing_ones(
    tmp_path, tiny_config, monkeypatch, capsys
):
    """Scores go to the run's record group by group; a later call draws only the groups the
    record lacks and tables the same numbers as drawing everything at once; the picture's
    row of a recorded group is drawn again, the same images."""
    training.train(
        tiny_config.replace(train={"max_steps": 2}, data={"toy_count": 48}), tmp_path / "run", progress=False
    )
    drawn = []
    real_generate = sampler_quality.generate

    def counting_generate(denoiser, images, *args, **kwargs):
        drawn.append(list(images))
        return real_generate(denoiser, images, *args, **kwargs)

    monkeypatch.setattr(sampler_quality, "generate", counting_generate)

    printed = []

    def table(*extra):
        drawn.clear()
        monkeypatch.setattr(
            sys,
            "argv",
            [
                "sampler_quality",
                "--run",
                str(tmp_path / "run"),
                "--num",
                "6",
                "--batch-size",
                "4",
                "--settings",
                "ddpm:4",
                *extra,
            ],
        )
        sampler_quality.main()
        out, err = capsys.readouterr()
        printed.append(out)
        row = [line for line in out.splitlines() if line.startswith("| ddpm |")][0].split(" | ")
        return row[:2] + row[3:], err, list(drawn)  # all but the img/s cell

    record = tmp_path / "run" / sampler_quality.RECORD_FILE
    _, _, first = table("--first-group", "1")
    assert first == [list(range(6, 12))] and len(record.read_text().splitlines()) == 1
    merged, _, second = table("--groups", "2")
    assert second == [list(range(6))] and len(record.read_text().splitlines()) == 2
    whole, _, everything = table(
        "--groups", "2", "--redraw", "--record", str(tmp_path / "other.jsonl"), "--out", str(tmp_path / "whole.png")
    )
    assert everything == [list(range(12))] and merged == whole and "(" in whole[2]  # "mean (low-high)"

    with record.open("a") as f:
        f.write('{"identity": {"weights": "cut short by a cra')  # a crash mid-line
    again, err, third = table("--groups", "2", "--out", str(tmp_path / "again.png"))
    assert again == whole and "groups 0-1 taken from" in err
    assert third == [list(range(6))]  # only the picture's six images
    assert (np.asarray(Image.open(tmp_path / "again.png")) == np.asarray(Image.open(tmp_path / "whole.png"))).all()

    ours = json.loads(record.read_text().splitlines()[0])["identity"]
    assert ours["device"] == "cpu" and ours["precision"] == "fp32" and ours["num"] == 6 and len(ours["weights"]) == 16
    made = json.loads(record.read_text().splitlines()[0])["provenance"]  # what draws the line again
    assert (
        made["command"].startswith("python -m studies.sampler_quality --run ")
        and "--settings ddpm:4" in made["command"]
    )
    assert made["machine"] == f"CPU, {cpu_kind()}" and re.fullmatch(r"[0-9a-f]{7,}(-dirty)?|unknown", made["commit"])
    assert "written before lines named" not in printed[-1]

    # a line written before lines named their command, commit and machine still counts, said once
    unnamed = []
    for line in record.read_text().splitlines():
        try:
            unnamed.append({k: v for k, v in json.loads(line).items() if k != "provenance"})
        except json.JSONDecodeError:  # the line the crash cut short
            pass
    record.write_text("".join(json.dumps(entry) + "\n" for entry in unnamed))
    table("--groups", "2")
    assert "2 of the 2 groups above come from record lines written before" in printed[-1]
    sample = dataclasses.replace(tiny_config.sample, sampler="ddpm", steps=4)
    assert sampler_quality.ScoreRecord(record, ours).get(sample, 0) is not None
    assert sampler_quality.ScoreRecord(record, {**ours, "weights": "0" * 16}).get(sample, 0) is None  # another model

    # a line written before sampling had a starting sigma reads as drawn from sigma 80, as it was
    older = json.loads(record.read_text().splitlines()[0])
    del older["sample"]["sigma_max"]
    record.write_text(json.dumps(older) + "\n")
    assert sampler_quality.ScoreRecord(record, ours).get(dataclasses.replace(sample, sigma_max=80.0), 1) is not None
    assert sampler_quality.ScoreRecord(record, ours).get(dataclasses.replace(sample, sigma_max=10.0), 1) is None


def test_sampler_quality_scores_each_group_and_reports_the_mean_and_range():

    gen = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=gen)
    dark = torch.randint(0, 64, (20, 3, 16, 16), dtype=torch.uint8, generator=gen)
    images = torch.cat([train[:20], dark])  # real, then unlike the training images
    groups = sampler_quality.score_groups(images, train, 2)
    assert groups == [
        sample_metrics(images[:20], train, description="")[0],
        sample_metrics(images[20:], train, description="")[0],
    ]
    low, high = sorted(g["swd"] for g in groups)
    assert low < high
    levels = [k for k in groups[0] if k.startswith("swd_")]
    cells = sampler_quality._row("x", "1", "", groups, levels).split(" | ")
    assert cells[3] == f"{(low + high) / 2:.2f} ({low:.1f}-{high:.1f})"
    assert cells[4] == f"{(groups[0][levels[0]] + groups[1][levels[0]]) / 2:.2f}"
    assert sampler_quality._row("x", "1", "", groups[:1], levels).split(" | ")[3] == f"{groups[0]['swd']:.2f}"


def test_sampler_quality_row_shows_the_judge_means_and_leaves_older_groups_blank():
    """The judge's FD and KID (x1e3) follow SWD's levels, each the mean over the groups; a
    row with any group from a record line older than the judge leaves both cells empty."""
    levels = ["swd_16", "swd_8"]
    new = [
        {
            "swd": 30.0,
            "swd_16": 20.0,
            "swd_8": 40.0,
            "judge_fd": 1.3,
            "judge_kid": 0.0021,
            "judge_kid_std": 0.0004,
            "precision_pixels": 0.5,
            "recall_pixels": 0.7,
        },
        {
            "swd": 34.0,
            "swd_16": 22.0,
            "swd_8": 46.0,
            "judge_fd": 2.6,
            "judge_kid": 0.0043,
            "judge_kid_std": 0.0006,
            "precision_pixels": 0.6,
            "recall_pixels": 0.8,
        },
    ]
    old = [{k: v for k, v in g.items() if not k.startswith("judge_")} for g in new]
    header = sampler_quality._header(levels).splitlines()
    names = header[0].split(" | ")
    fd, kid = names.index("judge FD"), names.index("judge KID x1e3")
    assert names[3:fd] == ["SWD", "SWD 16px", "SWD 8px"] and kid == fd + 1  # after SWD's levels
    assert header[0].count("|") == header[1].count("|")

    cells = sampler_quality._row("x", "1", "", new, levels).split(" | ")
    assert len(cells) == len(names)
    assert cells[fd] == f"{sum(g['judge_fd'] for g in new) / len(new):.2f}" == "1.95"
    assert cells[kid] == f"{1e3 * sum(g['judge_kid'] for g in new) / len(new):.2f}" == "3.20"
    assert cells[3] == "32.00 (30.0-34.0)" and cells[4:fd] == ["21.00", "43.00"]  # SWD's cells stay as they were
    assert cells[-1] == "0.55 / 0.75 |"
    one = sampler_quality._row("x", "1", "", new[:1], levels).split(" | ")
    assert one[fd] == "1.30" and one[kid] == "2.10"

    for groups in (old, [new[0], old[1]], [old[0], new[1]]):  # older lines, alone or beside newer ones
        cells = sampler_quality._row("x", "1", "", groups, levels).split(" | ")
        assert len(cells) == len(names) and cells[fd] == cells[kid] == ""
        assert cells[3] == "32.00 (30.0-34.0)" and cells[-1] == "0.55 / 0.75 |"


def test_sampler_quality_calls_table_adds_the_judge_fd_when_every_group_has_it():
    def scores(*pairs):
        return [{"swd": swd} if fd is None else {"swd": swd, "judge_fd": fd} for swd, fd in pairs]

    table = sampler_quality.calls_table(
        {
            "ddpm": {10: (10, scores((30.0, 4.0), (40.0, 5.5))), 20: (20, scores((20.0, 2.0), (22.0, None)))},
            "heun, karras": {10: (9, scores((25.0, 3.0), (27.0, 3.5)))},
        },
        scores((16.0, 0.25), (18.0, 0.75)),
    ).splitlines()
    assert table[2] == "| held-out real images | 17.00 (16.0-18.0); FD 0.50 | |"
    assert table[3] == "| ddpm | 35.00 (30.0-40.0); FD 4.75 | 21.00 (20.0-22.0) |"  # a group without: SWD alone
    assert table[4] == "| heun, karras | 26.00 (25.0-27.0); FD 3.25 [9] |  |"


def test_offline_metric_table_has_the_levels_of_the_image_size(capsys):

    gen = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=gen)
    offline_metric.print_scores([("real", train[:20])], train, 10, 2)
    header, _, row = capsys.readouterr().out.splitlines()
    assert header.split(" | ")[1:-1] == ["swd", "swd_16", "precision_pixels"]  # one pyramid level at 16 px
    first = sample_metrics(train[:10], train, description="", seed=0)[0]["swd"]
    second = sample_metrics(train[10:20], train, description="", seed=1)[0]["swd"]
    assert row.split(" | ")[1].startswith(f"{(first + second) / 2:.3g} +- ")


def test_editing_quality_scores_the_redrawn_half_alone():
    images = torch.arange(2 * 3 * 4 * 4).view(2, 3, 4, 4)
    halves = editing_quality.lower_halves(images)
    assert halves.shape == images.shape
    assert torch.equal(halves[..., :2, :], images[..., 2:, :]) and torch.equal(halves[..., 2:, :], images[..., 2:, :])
    assert editing_quality.lower_half_mask(4)[0].tolist() == [[0] * 4, [0] * 4, [1] * 4, [1] * 4]
