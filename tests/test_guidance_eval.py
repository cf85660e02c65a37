"""The guidance measurement: samples per class and scale, judged by a classifier."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from ddpm_cars.errors import UserError
from ddpm_cars.evaluation import guidance
from ddpm_cars.evaluation.guidance import GuidanceRequest, format_guidance, guidance_accuracy
from ddpm_cars.run import Run
from ddpm_cars.training import train


def test_each_scale_is_scored_and_pictured(tiny_config, tmp_path, monkeypatch):
    config = tiny_config.replace(model={"class_conditional": True}, train={"max_steps": 1}, sample={"steps": 2})
    train(config, tmp_path / "run", progress=False, final_grid=False)
    monkeypatch.setattr(guidance, "HELDOUT_IMAGES", 30)
    out = tmp_path / "g"
    request = GuidanceRequest((0.0, 1.0, 2.5), 2, classifier_steps=3)
    summary = guidance_accuracy(Run.open(tmp_path / "run"), request, out, progress=False)
    assert [row["guidance"] for row in summary["rows"]] == [0.0, 1.0, 2.5]
    assert summary["classes"] == ["sedan", "hatchback", "suv", "pickup", "sports", "van"]
    for row in summary["rows"]:
        per = list(row["per_class"].values())
        assert len(per) == 6 and all(v in (0.0, 0.5, 1.0) for v in per)  # 2 samples of each class
        assert row["share"] == pytest.approx(sum(per) / 6)
    assert 0.0 <= summary["classifier_heldout_accuracy"] <= 1.0
    assert json.loads((out / "guidance.json").read_text()) == summary
    # 6 rows (one per class) of 6 columns (2 shown x 3 scales), 1.5 x 1.6 inches each at 100 dpi
    assert Image.open(out / "guidance.png").size == (6 * 150, 40 + 6 * 160)
    table = format_guidance(summary).splitlines()
    assert table[0].startswith("| guidance | requested class | sedan |") and table[4].startswith("| 2.5 |")


def test_unconditional_runs_and_bad_scales_are_refused(tiny_config, tmp_path):
    train(tiny_config.replace(train={"max_steps": 1}), tmp_path / "run", progress=False, final_grid=False)
    with pytest.raises(ValueError, match="not class-conditional"):
        guidance_accuracy(Run.open(tmp_path / "run"), GuidanceRequest((1.0,), 2), tmp_path / "g", progress=False)
    with pytest.raises(ValueError, match="finite numbers >= 0"):
        guidance_accuracy(Run.open(tmp_path / "run"), GuidanceRequest((math.inf,), 2), tmp_path / "g", progress=False)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["model"].update(class_conditional=True, class_names=["sedan"])  # a folder of loose images has one class
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="knows one class"):
        guidance_accuracy(Run.open(tmp_path / "run"), GuidanceRequest((1.0,), 2), tmp_path / "g", progress=False)


def test_a_grayscale_run_is_judged_by_a_one_channel_classifier(tiny_config, tmp_path, monkeypatch):
    config = tiny_config.replace(
        model={"class_conditional": True},
        data={"image_channels": "1"},
        train={"max_steps": 1},
        sample={"steps": 2},
    )
    train(config, tmp_path / "run", progress=False, final_grid=False)
    monkeypatch.setattr(guidance, "HELDOUT_IMAGES", 30)
    judges = []
    real = guidance.train_classifier

    def kept(images, *args, **kwargs):
        judges.append((images.shape, real(images, *args, **kwargs)))
        return judges[-1][1]

    monkeypatch.setattr(guidance, "train_classifier", kept)
    request = GuidanceRequest((0.0, 2.0), 2, classifier_steps=3)
    summary = guidance_accuracy(Run.open(tmp_path / "run"), request, tmp_path / "g", progress=False)
    ((shape, judge),) = judges
    assert shape[1:] == (1, 16, 16) and judge.in_channels == 1  # trained on the run's grayscale images
    assert [row["guidance"] for row in summary["rows"]] == [0.0, 2.0]
    assert all(0.0 <= row["share"] <= 1.0 for row in summary["rows"])
    assert 0.0 <= summary["classifier_heldout_accuracy"] <= 1.0  # held-out images: grayscale too
    assert Image.open(tmp_path / "g" / "guidance.png").size == (4 * 150, 40 + 6 * 160)
