import dataclasses
import json
import math
import sys
import types

import pytest
import torch
from torch import nn

from ddpm_cars.benchmarks import measure
from ddpm_cars.benchmarks.bench import ROW_KEYS, BenchSettings, format_table, run_benchmark
from ddpm_cars.benchmarks.measure import DIFFUSERS, forward_flops
from ddpm_cars.cli import main

TINY_RUN = dict(image_size=16, batch_size=2, repeats=1, warmup=0, sample_steps=2)


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
        return run_benchmark(BenchSettings(["tiny"], ["fp32", "bf16"], isolate=False, **TINY_RUN), progress=False)
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
    rows = run_benchmark(
        BenchSettings(["tiny"], ["fp32"], isolate=False, diffusers_reference="tiny", **TINY_RUN), progress=False
    )
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
    rows = run_benchmark(
        BenchSettings(["tiny"], ["fp32"], isolate=False, diffusers_reference="tiny", **TINY_RUN), progress=False
    )
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
    argv = [
        "bench",
        "--presets",
        "tiny",
        "--image-size",
        "16",
        "--batch-size",
        "2",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--sample-steps",
        "2",
        "--json",
        str(out),
    ]
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
    assert (
        gpu_peak_flops("NVIDIA H100 PCIe", "bf16") == 756.5e12
        and gpu_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989.4e12
    )
    assert gpu_peak_flops("NVIDIA L40S", "fp32") == 183e12 and gpu_peak_flops("NVIDIA L4", "fp32") == 60e12
    assert gpu_peak_flops("Tesla T4", "bf16") is None  # no bf16 there
    assert gpu_peak_flops("Some Future GPU", "bf16") is None
    assert device_peak_flops(torch.device("cpu"), "fp32") is None
    assert device_peak_flops(torch.device("cpu"), "fp32", peak_tflops=0.5) == 0.5e12


# one timed step of the tiny preset at 16 px, in this process
ONE_TINY_STEP = BenchSettings(
    "tiny", "fp32", image_size=16, batch_size=2, repeats=1, warmup=0, sample_steps=1, device="cpu", isolate=False
)


def test_bench_reports_mfu_against_the_given_peak(capsys):
    rows = run_benchmark(
        dataclasses.replace(ONE_TINY_STEP, peak_tflops=0.001),
        progress=False,
    )
    (row,) = rows
    assert row["peak_flop_s"] == 1e9 and row["mfu"] == pytest.approx(row["train_flop_s"] / 1e9)
    assert f"| {100 * row['mfu']:.1f}% |" in format_table(rows)
    unknown = run_benchmark(
        ONE_TINY_STEP,
        progress=False,
    )
    assert unknown[0]["mfu"] is None and "MFU: training FLOP/s over the device's dense peak" in format_table(unknown)


def test_bench_loop_runs_the_real_training_loop_on_cached_data(monkeypatch, tmp_path):
    from ddpm_cars.training.batches import Batches

    monkeypatch.setenv("DDPM_CARS_CACHE", str(tmp_path))
    draws = []
    real_draw = Batches.draw
    monkeypatch.setattr(Batches, "draw", lambda self, *a: draws.append(1) or real_draw(self, *a))
    rows = run_benchmark(
        BenchSettings(
            "tiny",
            "fp32",
            image_size=16,
            batch_size=2,
            repeats=2,
            warmup=1,
            sample_steps=1,
            device="cpu",
            isolate=False,
            loop=True,
        ),
        progress=False,
    )
    (row,) = rows
    assert len(draws) == 3  # the warm-up step and the two timed ones, through the loop's own batches
    assert math.isfinite(row["loop_img_s"]) and row["loop_img_s"] > 0 and row["loop_to_first_step_s"] > 0
    assert row["loop_data"] == "toy-cars" and row["loop_images"] == 256  # the tiny preset's toy cars
    assert [p.name.split("-16px-")[0] for p in (tmp_path / "data").iterdir() if p.is_dir()] == ["toy-cars"]
    table = format_table(rows)
    assert "| loop img/s | to 1st step s |" in table and "Loop: the whole training loop" in table
    assert table.splitlines()[2].count("|") == table.splitlines()[4].count("|")  # header and row line up
    assert "loop img/s" not in format_table(
        run_benchmark(BenchSettings("tiny", "fp32", device="cpu", isolate=False, **TINY_RUN), progress=False)
    )
