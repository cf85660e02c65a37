import dataclasses
import json
import math
import sys
import types

import pytest
import torch
from torch import nn

from ddpm_cars.benchmarks import measure
from ddpm_cars.benchmarks.bench import ROW_KEYS, format_table, run_benchmark
from ddpm_cars.benchmarks.measure import DIFFUSERS, forward_flops
from ddpm_cars.cli import main

TINY_RUN = dict(image_size=16, batch_size=2, repeats=1, warmup=0, sample_steps=2, progress=False)


@pytest.fixture(autouse=True)
def _one_thread(_few_threads):
    # two threads fighting another job for two cores can be 50x slower than one
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tiny_rows():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_benchmark(["tiny"], ["fp32", "bf16"], isolate=False, **TINY_RUN)
    finally:
        torch.set_num_threads(threads)


class ConvThenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.linear = nn.Linear(4 * 16 * 16, 10)

    def forward(self, x, t):
        return self.linear(self.conv(x).flatten(1))


def test_forward_flops_are_twice_the_multiply_adds():
    conv_macs = 16 * 16 * 4 * (3 * 3 * 3)  # output pixels x output channels x kernel volume
    linear_macs = 4 * 16 * 16 * 10
    assert forward_flops(ConvThenLinear(), 16) == 2 * (conv_macs + linear_macs)


def test_tiny_benchmark_gives_positive_finite_numbers(tiny_rows):
    assert [(r["preset"], r["precision"]) for r in tiny_rows] == [("tiny", "fp32"), ("tiny", "bf16")]
    for row in tiny_rows:
        assert set(ROW_KEYS) <= set(row)
        assert row["image_size"] == 16 and row["batch_size"] == 2 and row["device"].startswith("cpu: ")
        numbers = [k for k in ROW_KEYS if k not in ("preset", "precision", "device")]
        assert all(isinstance(row[k], (int, float)) and math.isfinite(row[k]) and row[k] > 0 for k in numbers), row
        assert row["sample_img_s"] == pytest.approx(row["sample_evals_s"] / 100)  # tiny: T = 100
        assert row["train_flop_s"] == pytest.approx(3 * row["forward_flops_per_image"] * row["train_img_s"])
        assert row["sample_flop_s"] == pytest.approx(row["forward_flops_per_image"] * row["sample_evals_s"])
    assert tiny_rows[0]["params"] == tiny_rows[1]["params"]


def test_table_has_one_line_per_row_and_the_ratios(tiny_rows):
    table = format_table(tiny_rows)
    assert "| tiny | fp32 | 16 | 2 |" in table and "| tiny | bf16 | 16 | 2 |" in table
    assert "bf16 / fp32, tiny: training " in table and "x, sampling " in table
    assert "3 x forward FLOPs" in table and "peak resident set size" in table
    assert f"torch {torch.__version__}" in table and "Date: " in table


def test_without_diffusers_the_comparison_is_skipped_with_a_note(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    assert not measure.diffusers_available()
    rows = run_benchmark(["tiny"], ["fp32"], isolate=False, diffusers_reference="tiny", **TINY_RUN)
    assert [r["preset"] for r in rows] == ["tiny"]
    assert any("diffusers is not installed" in n for n in rows.notes)
    assert "Note: diffusers UNet2DModel: skipped" in format_table(rows)


def test_diffusers_unet_is_measured_through_the_adapter(monkeypatch):
    made = {}

    class FakeUNet2DModel(nn.Module):
        def __init__(self, **kwargs):
            super().__init__()
            made.update(kwargs)
            self.conv = nn.Conv2d(kwargs["in_channels"], kwargs["out_channels"], 3, padding=1)

        def forward(self, sample, timestep):
            assert timestep.shape == (sample.shape[0],)
            return types.SimpleNamespace(sample=self.conv(sample))

    monkeypatch.setitem(sys.modules, "diffusers", types.SimpleNamespace(UNet2DModel=FakeUNet2DModel))
    rows = run_benchmark(["tiny"], ["fp32"], isolate=False, diffusers_reference="tiny", **TINY_RUN)
    assert [r["preset"] for r in rows] == ["tiny", DIFFUSERS]
    assert not any("diffusers" in n for n in rows.notes)
    assert made["block_out_channels"] == (128, 256, 384, 512) and made["out_channels"] == 6
    assert made["resnet_time_scale_shift"] == "scale_shift" and made["sample_size"] == 16
    assert rows[1]["forward_flops_per_image"] == 2 * 16 * 16 * 6 * 3 * 3 * 3
    table = format_table(rows)
    assert "| diffusers UNet2DModel | fp32 |" in table and "tiny / diffusers UNet2DModel, fp32: training" in table


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--presets", "tiny,huge"], "unknown preset 'huge'; available: improved, seed, demo, tiny"),
        (["--precisions", "fp32,fp8"], "unknown precision 'fp8'; available: fp32, bf16, fp16"),
        (["--presets", "seed", "--image-size", "40"], "divisible by 16"),
    ],
)
def test_bench_rejects_bad_values_with_one_line(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddpm-cars: error:") and message in err[0]
    assert captured.out == ""


def test_bench_cli_measures_in_fresh_processes_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--presets", "tiny", "--image-size", "16", "--batch-size", "2", "--repeats", "1",
            "--warmup", "0", "--sample-steps", "2", "--json", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "| tiny | bf16 | 16 | 2 |" in captured.out and "bf16 / fp32, tiny" in captured.out
    assert "[2/2] tiny bf16" in captured.err  # one progress line per measurement
    report = json.loads(out.read_text())
    assert report["command"].startswith("ddpm-cars bench --presets tiny") and report["torch"] == torch.__version__
    assert [(r["preset"], r["precision"]) for r in report["rows"]] == [("tiny", "fp32"), ("tiny", "bf16")]
    for row in report["rows"]:
        assert row["peak_mem_mib"] >= row["base_rss_mib"] > 0 and row["memory"] == "peak RSS of the measuring process"
    assert not any("not a fresh one" in n for n in report["notes"])
    assert report["date"] and report["device"][0].endswith("1 threads")  # the parent's thread count


def test_peak_flops_of_common_gpus_and_an_override():
    from ddpm_cars.benchmarks.peaks import device_peak_flops, gpu_peak_flops

    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert gpu_peak_flops("NVIDIA A10", "bf16") == 125e12  # not taken for an A100
    assert gpu_peak_flops("NVIDIA H100 PCIe", "bf16") == 756.5e12 and gpu_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989.4e12
    assert gpu_peak_flops("NVIDIA L40S", "fp32") == 183e12 and gpu_peak_flops("NVIDIA L4", "fp32") == 60e12
    assert gpu_peak_flops("Tesla T4", "bf16") is None  # no bf16 there
    assert gpu_peak_flops("Some Future GPU", "bf16") is None
    assert device_peak_flops(torch.device("cpu"), "fp32") is None
    assert device_peak_flops(torch.device("cpu"), "fp32", peak_tflops=0.5) == 0.5e12


def test_bench_reports_mfu_against_the_given_peak(capsys):
    rows = run_benchmark("tiny", "fp32", image_size=16, batch_size=2, repeats=1, warmup=0, sample_steps=1,
                         device="cpu", progress=False, isolate=False, peak_tflops=0.001)
    (row,) = rows
    assert row["peak_flop_s"] == 1e9 and row["mfu"] == pytest.approx(row["train_flop_s"] / 1e9)
    assert f"| {100 * row['mfu']:.1f}% |" in format_table(rows)
    unknown = run_benchmark("tiny", "fp32", image_size=16, batch_size=2, repeats=1, warmup=0, sample_steps=1,
                            device="cpu", progress=False, isolate=False)
    assert unknown[0]["mfu"] is None and "MFU: training FLOP/s over the device's dense peak" in format_table(unknown)


def test_bench_loop_runs_the_real_training_loop_on_cached_data(monkeypatch, tmp_path):
    from ddpm_cars.training.batches import Batches

    monkeypatch.setenv("DDPM_CARS_CACHE", str(tmp_path))
    draws = []
    real_draw = Batches.draw
    monkeypatch.setattr(Batches, "draw", lambda self, *a: draws.append(1) or real_draw(self, *a))
    rows = run_benchmark("tiny", "fp32", image_size=16, batch_size=2, repeats=2, warmup=1, sample_steps=1,
                         device="cpu", progress=False, isolate=False, loop=True)
    (row,) = rows
    assert len(draws) == 3  # the warm-up step and the two timed ones, through the loop's own batches
    assert math.isfinite(row["loop_img_s"]) and row["loop_img_s"] > 0 and row["loop_to_first_step_s"] > 0
    assert row["loop_data"] == "toy-cars" and row["loop_images"] == 256  # the tiny preset's toy cars
    assert [p.name.split("-16px-")[0] for p in (tmp_path / "data").iterdir() if p.is_dir()] == ["toy-cars"]
    table = format_table(rows)
    assert "| loop img/s | to 1st step s |" in table and "Loop: the whole training loop" in table
    assert table.splitlines()[2].count("|") == table.splitlines()[4].count("|")  # header and row line up
    assert "loop img/s" not in format_table(run_benchmark("tiny", "fp32", device="cpu", isolate=False, **TINY_RUN))


def test_sampler_quality_settings_name_the_spacing_and_count_heun_twice():
    from ddpm_cars.benchmarks.sampler_quality import network_calls, parse_settings

    assert parse_settings("ddpm:50,dpm++:20:karras,heun:10:logsnr:churn=40,ddim:20:eta=1:ddim_sigma=learned,"
                          "dpm++:20:karras:clip_x0=false") == [
        ("ddpm", 50, "uniform", {}), ("dpm++", 20, "karras", {}), ("heun", 10, "logsnr", {"churn": 40.0}),
        ("ddim", 20, "uniform", {"eta": 1.0, "ddim_sigma": "learned"}), ("dpm++", 20, "karras", {"clip_x0": False})]
    assert [network_calls(s, 10) for s in ("ddpm", "ddim", "dpm++", "dpm++3m", "dpm++sde", "heun")] == [10, 10, 10, 10, 10, 19]


def test_sampler_quality_grid_fits_each_sampler_into_each_budget_of_calls():
    from ddpm_cars.benchmarks.sampler_quality import calls_table, grid_settings, network_calls

    grid = grid_settings("ddpm,heun:karras:churn=20", [10, 20, 35])
    assert [(budget, sampler, steps) for budget, (sampler, steps, _, _) in grid] == [
        (10, "ddpm", 10), (20, "ddpm", 20), (35, "ddpm", 35), (10, "heun", 5), (20, "heun", 10), (35, "heun", 18)]
    assert all(network_calls(s, n) <= budget and network_calls(s, n + 1) > budget
               for budget, (s, n, _, _) in grid if s == "heun")  # the most Heun steps that fit
    assert grid[3][1][2:] == ("karras", {"churn": 20.0})

    def scores(*swd):
        return [{"swd": v} for v in swd]

    table = calls_table({"ddpm": {10: (10, scores(30.0, 40.0)), 1000: (1000, scores(20.0, 22.0))},
                         "heun, karras": {10: (9, scores(25.0, 27.0))}}, scores(16.0, 18.0)).splitlines()
    assert table[0] == "| sampler | 10 calls | 1000 calls |"
    assert table[2].startswith("| held-out real images | 17.00 (16.0-18.0) |")
    assert table[3] == "| ddpm | 35.00 (30.0-40.0) | 21.00 (20.0-22.0) |"
    assert table[4] == "| heun, karras | 26.00 (25.0-27.0) [9] |  |"  # 9 calls within the budget of 10
    assert {line.count("|") for line in table} == {4}


def test_sampler_quality_draws_a_later_group_as_the_whole_run_draws_it(tmp_path, tiny_config, monkeypatch, capsys):
    """--first-group 1 scores images NUM..2 NUM - 1, the second group of --groups 2, and the
    grid of samplers ends with the table against calls."""
    from ddpm_cars.benchmarks import sampler_quality
    from ddpm_cars.training import train

    train(tiny_config.replace(train={"max_steps": 2}, data={"toy_count": 48}), tmp_path / "run", progress=False)

    def table(*extra):
        monkeypatch.setattr(sys, "argv", ["sampler_quality", "--run", str(tmp_path / "run"), "--num", "6",
                                          "--batch-size", "4", "--nfe", "4", "--samplers", "ddpm,heun:karras", "--redraw",
                                          *extra])
        sampler_quality.main()
        return capsys.readouterr().out

    both, first, second = table("--groups", "2"), table(), table("--first-group", "1")
    assert "images 0-11 of seed 0" in both and "images 6-11 of seed 0" in second

    def swd(out):  # the floor's, ddpm's and heun's SWD cells of the first table
        rows = [line for line in out.splitlines() if line.startswith("| ")][2:5]
        return [row.split(" | ")[3] for row in rows]

    assert [row.split(" | ")[:2] for row in second.splitlines() if row.startswith("| ")][3:5] == [
        ["| ddpm", "4"], ["| heun, karras", "2 (3)"]]
    for whole, one, two in zip(swd(both), swd(first), swd(second)):  # "mean (low-high)" of two groups; each group's
        low, high = map(float, whole.split("(")[1].rstrip(")").split("-"))
        one, two = sorted([float(one), float(two)])
        assert abs(one - low) <= 0.051 and abs(two - high) <= 0.051 and two - one > 0.1, (whole, one, two)  # printed to 0.1
    assert second.splitlines()[-1].startswith("| heun, karras | ") and second.splitlines()[-1].endswith(" [3] |")


def test_sampler_quality_takes_recorded_groups_and_draws_only_the_missing_ones(tmp_path, tiny_config, monkeypatch, capsys):
    """Scores go to the run's record group by group; a later call draws only the groups the
    record lacks and tables the same numbers as drawing everything at once; the picture's
    row of a recorded group is drawn again, the same images."""
    import numpy as np
    from PIL import Image

    from ddpm_cars.benchmarks import sampler_quality
    from ddpm_cars.training import train

    train(tiny_config.replace(train={"max_steps": 2}, data={"toy_count": 48}), tmp_path / "run", progress=False)
    drawn = []
    real_generate = sampler_quality.generate

    def counting_generate(denoiser, images, *args, **kwargs):
        drawn.append(list(images))
        return real_generate(denoiser, images, *args, **kwargs)

    monkeypatch.setattr(sampler_quality, "generate", counting_generate)

    def table(*extra):
        drawn.clear()
        monkeypatch.setattr(sys, "argv", ["sampler_quality", "--run", str(tmp_path / "run"), "--num", "6",
                                          "--batch-size", "4", "--settings", "ddpm:4", *extra])
        sampler_quality.main()
        out, err = capsys.readouterr()
        row = [line for line in out.splitlines() if line.startswith("| ddpm |")][0].split(" | ")
        return row[:2] + row[3:], err, list(drawn)  # all but the img/s cell

    record = tmp_path / "run" / sampler_quality.RECORD_FILE
    _, _, first = table("--first-group", "1")
    assert first == [list(range(6, 12))] and len(record.read_text().splitlines()) == 1
    merged, _, second = table("--groups", "2")
    assert second == [list(range(6))] and len(record.read_text().splitlines()) == 2
    whole, _, everything = table("--groups", "2", "--redraw", "--record", str(tmp_path / "other.jsonl"),
                                 "--out", str(tmp_path / "whole.png"))
    assert everything == [list(range(12))] and merged == whole and "(" in whole[2]  # "mean (low-high)"

    with record.open("a") as f:
        f.write('{"identity": {"weights": "cut short by a cra')  # a crash mid-line
    again, err, third = table("--groups", "2", "--out", str(tmp_path / "again.png"))
    assert again == whole and "groups 0-1 taken from" in err
    assert third == [list(range(6))]  # only the picture's six images
    assert (np.asarray(Image.open(tmp_path / "again.png")) == np.asarray(Image.open(tmp_path / "whole.png"))).all()

    ours = json.loads(record.read_text().splitlines()[0])["identity"]
    assert ours["device"] == "cpu" and ours["precision"] == "fp32" and ours["num"] == 6 and len(ours["weights"]) == 16
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
    from ddpm_cars.benchmarks.sampler_quality import _row, score_groups
    from ddpm_cars.evaluation.sample_metrics import sample_metrics

    gen = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=gen)
    dark = torch.randint(0, 64, (20, 3, 16, 16), dtype=torch.uint8, generator=gen)
    images = torch.cat([train[:20], dark])  # real, then unlike the training images
    groups = score_groups(images, train, 2)
    assert groups == [sample_metrics(images[:20], train, description="")[0],
                      sample_metrics(images[20:], train, description="")[0]]
    low, high = sorted(g["swd"] for g in groups)
    assert low < high
    levels = [k for k in groups[0] if k.startswith("swd_")]
    cells = _row("x", "1", "", groups, levels).split(" | ")
    assert cells[3] == f"{(low + high) / 2:.2f} ({low:.1f}-{high:.1f})"
    assert cells[4] == f"{(groups[0][levels[0]] + groups[1][levels[0]]) / 2:.2f}"
    assert _row("x", "1", "", groups[:1], levels).split(" | ")[3] == f"{groups[0]['swd']:.2f}"


def test_offline_metric_table_has_the_levels_of_the_image_size(capsys):
    from ddpm_cars.benchmarks.offline_metric import print_scores
    from ddpm_cars.evaluation.sample_metrics import sample_metrics

    gen = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=gen)
    print_scores([("real", train[:20])], train, 10, 2)
    header, _, row = capsys.readouterr().out.splitlines()
    assert header.split(" | ")[1:-1] == ["swd", "swd_16", "precision_pixels"]  # one pyramid level at 16 px
    first = sample_metrics(train[:10], train, description="", seed=0)[0]["swd"]
    second = sample_metrics(train[10:20], train, description="", seed=1)[0]["swd"]
    assert row.split(" | ")[1].startswith(f"{(first + second) / 2:.3g} +- ")
