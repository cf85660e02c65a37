"""``ddpm-cars eval`` and ``--eval-every`` end to end on a tiny run: the offline metrics
(SWD, FD/KID on the toy-car judge's features) always, FID/KID with (random stand-in)
Inception weights, a clear reason when they are skipped, the reference cache, the
memorisation check, metrics.csv and the report."""

import json
import shutil
import urllib.error

import pytest
import torch
from PIL import Image

from ddpm_cars.cli import main
from ddpm_cars.data import toy_cars_dataset
from ddpm_cars.training import train
from ddpm_cars.training.periodic_eval import METRICS_CSV, read_metrics_log


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch, judge_16px):
    """No weights in torch's hub cache, downloads fail, caches under tmp_path (the 16 px
    toy-car judge copied there, as its first use left it)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("DDPM_CARS_CACHE", str(tmp_path / "cache"))
    shutil.copytree(judge_16px, tmp_path / "cache" / "judge")

    def offline(url, dst, progress=True):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)


@pytest.fixture
def run(tmp_path, tiny_config):
    config = tiny_config.replace(train={"max_steps": 2}, data={"toy_count": 48})
    train(config, tmp_path / "run", progress=False)
    return tmp_path / "run"


EVAL = ["--num-samples", "12", "--steps", "4", "--batch-size", "12"]


def test_eval_offline_reports_the_offline_metric_and_says_why_fid_was_skipped(run, capsys):
    assert main(["eval", "--checkpoint", str(run), *EVAL]) == 0
    out = capsys.readouterr().out
    assert "SWD x1e3" in out and "precision / recall on 16x16 pixels" in out and "memorisation" in out
    assert "FD / KID on toy-car judge features (lower is better): FD " in out
    assert "FID and KID skipped: FID and KID need the Inception weights weights-inception-2015-12-05" in out
    assert "download failed" in out and "--inception-weights" in out
    summary = json.loads((run / "eval" / "metrics.json").read_text())
    metrics = summary["metrics"]
    assert set(metrics) == {
        "swd",
        "swd_16",
        "precision_pixels",
        "recall_pixels",
        "judge_fd",
        "judge_kid",
        "judge_kid_std",
    }
    assert metrics["swd"] > 0 and metrics["judge_fd"] > 0 and metrics["judge_kid_std"] >= 0
    assert summary["judge_features"].startswith("toy-car judge: ") and "at 16 px" in summary["judge_features"]
    (judge,) = (run.parent / "cache" / "judge").iterdir()  # read from the cache folder, not trained again
    assert judge.name.startswith("toy-cars-judge_16px_") and judge.suffix == ".safetensors"
    assert summary["num_samples"] == 12 and summary["sampler"] == "ddpm" and summary["steps"] == 4
    assert "weights-inception" in summary["fid_skipped"]
    assert summary["memorization"]["heldout_to_train_median"] > 0
    for picture in ["nearest.png", "nearest_distances.png"]:
        assert Image.open(run / "eval" / picture).size[0] > 100
    report = (run / "report.html").read_text()
    assert "weights-inception-2015-12-05" in report and "metrics.swd" in report
    assert "metrics.judge_fd (Frechet distance on toy-car judge features, lower is better)" in report


def test_eval_with_inception_weights_gives_fid_and_kid_and_caches_the_reference(
    run, tmp_path, random_inception_weights, capsys
):
    args = [
        "eval",
        "--checkpoint",
        str(run),
        *EVAL,
        "--inception-weights",
        str(random_inception_weights),
        "--json",
        str(tmp_path / "a.json"),
    ]
    assert main(args) == 0
    assert "FID " in capsys.readouterr().out
    first = json.loads((tmp_path / "a.json").read_text())
    assert {"fid", "kid", "kid_std", "precision", "recall"} <= set(first["metrics"]) and "fid_skipped" not in first
    assert first["metrics"]["fid"] > 0 and "feature_sample_to_train_median" in first["memorization"]
    entries = sorted((tmp_path / "cache" / "reference").iterdir())  # Inception's features and the judge's
    assert len(entries) == 2 and all("toy-cars-48-train-16px_n48" in e.name for e in entries)
    assert [e.name.endswith(".safetensors") and "toy-cars-judge_16px" in e.name for e in entries].count(True) == 1
    stamps = [e.stat().st_mtime_ns for e in entries]
    assert main(args[:-1] + [str(tmp_path / "b.json")]) == 0  # the same request again
    assert [e.stat().st_mtime_ns for e in entries] == stamps and sorted(entries[0].parent.iterdir()) == entries
    assert json.loads((tmp_path / "b.json").read_text())["metrics"] == first["metrics"]


def test_eval_scores_a_folder_of_images_against_another(tmp_path, capsys):
    fakes, reals = tmp_path / "fakes", tmp_path / "reals"
    for folder, seed in ((fakes, 1), (reals, 0)):
        folder.mkdir()
        for i, image in enumerate(toy_cars_dataset(10, 16, seed).images):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    assert (
        main(
            [
                "eval",
                "--images",
                str(fakes),
                "--data",
                str(reals),
                "--no-fid",
                "--no-memorization",
                "--json",
                str(tmp_path / "m.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "10 images of" in out and "FID and KID skipped: --no-fid" in out
    assert json.loads((tmp_path / "m.json").read_text())["metrics"]["swd_16"] > 0


def test_eval_every_logs_metrics_and_resume_keeps_the_log_consistent(tmp_path, tiny_config):
    config = tiny_config.replace(
        train={"max_steps": 4, "eval_every_steps": 2, "eval_samples": 6, "checkpoint_every_steps": 2},
        sample={"steps": 3},
    )
    train(config, tmp_path / "run", progress=False)
    rows = read_metrics_log(tmp_path / "run" / METRICS_CSV, 10**9)
    assert [r["step"] for r in rows] == [2, 4] and all(r["swd"] > 0 and 0 <= r["recall_pixels"] <= 1 for r in rows)
    assert all(r["judge_fd"] > 0 and r["judge_kid_std"] >= 0 for r in rows)
    assert (tmp_path / "run" / "metrics.png").is_file()
    train(config.replace(train={"max_steps": 6}), tmp_path / "run", resume=True, progress=False)
    rows = read_metrics_log(tmp_path / "run" / METRICS_CSV, 10**9)
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert read_metrics_log(tmp_path / "run" / METRICS_CSV, 5) == rows[:2]  # a resume from step 5 drops step 6


def test_score_and_write_grayscale_images_with_inception(tmp_path, random_inception_weights):
    """Grayscale samples against grayscale reference images: every metric (FID on the
    one channel repeated to RGB), the memorisation check, the pictures; RGB samples
    against them are refused."""
    from ddpm_cars.evaluation.inception import InceptionFeatures
    from ddpm_cars.evaluation.scores import ReferenceData, score, write_evaluation

    def gray(images: torch.Tensor) -> torch.Tensor:
        return images.float().mean(1, keepdim=True).round().to(torch.uint8)

    train = gray(toy_cars_dataset(12, 16).images)
    reference = ReferenceData(train, "toy-cars-gray-train-16px", gray(toy_cars_dataset(4, 16, seed=1).images))
    samples = torch.cat([train[[3, 7]], gray(toy_cars_dataset(4, 16, seed=2).images)])  # 2 copies, 4 new
    metrics, check = score(samples, reference, InceptionFeatures(random_inception_weights), progress=False)
    assert set(metrics) == {
        "swd",
        "swd_16",
        "precision_pixels",
        "recall_pixels",
        "judge_fd",
        "judge_kid",
        "judge_kid_std",
        "fid",
        "kid",
        "kid_std",
        "precision",
        "recall",
    }
    assert metrics["swd"] > 0 and metrics["judge_fd"] > 0 and metrics["fid"] > 0
    assert check.sample_index[:2].tolist() == [3, 7] and check.sample_distance[:2].max() < 1e-6
    assert check.summary()["suspected_copies"] >= 2 / 6 and check.sample_feature_distance is not None
    written = write_evaluation(tmp_path / "eval", {"metrics": metrics}, samples, reference, check)
    assert written == ["metrics.json", "nearest.png", "nearest_distances.png"]
    assert Image.open(tmp_path / "eval" / "nearest.png").size[0] > 100
    with pytest.raises(ValueError, match=r"\(6, 3, 16, 16\) and reference \(12, 1, 16, 16\)"):
        score(samples.repeat(1, 3, 1, 1), reference, memorization=False, progress=False)
