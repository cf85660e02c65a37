"""A grayscale folder end to end: a one-channel network trained on it, and every command
that reads or draws its images (sample, the editing paths, eval, guidance, report, forward)
writing mode-L pictures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from ddpm_cars import run as ckpt
from ddpm_cars.cli import main
from ddpm_cars.data.toy_cars import generate_toy_cars

SIZE = 16
# the tiny preset (the improved recipe shrunk), at the test folder's size, drawing small grids
TINY = [
    "--preset",
    "tiny",
    "--image-size",
    str(SIZE),
    "--batch-size",
    "8",
    "--num-sample-images",
    "4",
    "--sample-every",
    "1",
]


def grey_folder(root: Path, count: int = 32) -> Path:
    """Toy cars as mode-L PNGs in a class folder per body type (the first three)."""
    images, labels = generate_toy_cars(count, SIZE, seed=5)
    for i, (image, label) in enumerate(zip(images, labels % 3)):
        path = root / f"type{label}" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.mean(axis=0).round().astype(np.uint8), mode="L").save(path)
    return root


def modes(folder: Path) -> set[str]:
    return {Image.open(p).mode for p in folder.glob("*.png")}


@pytest.fixture(scope="module")
def grey_run(tmp_path_factory):
    """A class-conditional run of the improved network on a grayscale folder, and that folder."""
    tmp = tmp_path_factory.mktemp("grey")
    folder, run = grey_folder(tmp / "scans"), tmp / "run"
    argv = ["train", "--out", str(run), "--data", str(folder), "--epochs", "2", "--class-conditional", *TINY]
    assert main([*argv, "--data-cache", str(tmp / "cache")]) == 0
    return run, folder


def test_a_grayscale_folder_trains_a_one_channel_network(grey_run):
    run, _ = grey_run
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["image_channels"] == "1"
    weights = load_file(str(ckpt.latest_checkpoint(run) / ckpt.MODEL_FILE))
    assert weights["input_conv.weight"].shape[1] == 1  # the improved preset learns the variance: 2 outputs
    assert weights["out.2.weight"].shape[0] == 2
    assert modes(run / "samples") == {"L"}


def test_sample_and_its_pictures_are_one_channel(grey_run, tmp_path, capsys):
    run, _ = grey_run
    out = tmp_path / "s"
    assert main(["sample", "--checkpoint", str(run), "--out", str(out), "--num", "3", "--steps", "4"]) == 0
    assert modes(out / "images") == {"L"} and len(list((out / "images").iterdir())) == 3
    assert Image.open(out / "grid.png").mode == "L"
    assert Image.open(out / "images" / "0000.png").size == (SIZE, SIZE)
    guided = tmp_path / "g"
    argv = ["sample", "--checkpoint", str(run), "--out", str(guided), "--class", "type1", "--num", "2", "--steps", "3"]
    assert main(argv) == 0
    assert modes(guided / "images") == {"L"} and Image.open(guided / "grid.png").mode == "L"


def test_variations_inpainting_and_interpolations_of_a_grey_image(grey_run, tmp_path):
    run, folder = grey_run
    car = next(folder.rglob("*.png"))
    mask = tmp_path / "mask.png"
    half = np.zeros((SIZE, SIZE), np.uint8)
    half[:, SIZE // 2 :] = 255
    Image.fromarray(half).save(mask)
    common = ["sample", "--checkpoint", str(run), "--num", "2", "--steps", "4"]
    assert main([*common, "--out", str(tmp_path / "var"), "--init-image", str(car), "--strength", "0.5"]) == 0
    assert modes(tmp_path / "var" / "images") == {"L"}
    kept = main([*common, "--out", str(tmp_path / "same"), "--init-image", str(car), "--strength", "0"])
    assert kept == 0  # strength 0 keeps the image itself, in its one channel
    same = np.asarray(Image.open(tmp_path / "same" / "images" / "0000.png"), dtype=np.int16)
    assert np.abs(same - np.asarray(Image.open(car), dtype=np.int16)).max() <= 1
    paint = [*common, "--out", str(tmp_path / "paint"), "--init-image", str(car), "--mask", str(mask)]
    assert main([*paint, "--sampler", "ddpm"]) == 0
    painted = np.asarray(Image.open(tmp_path / "paint" / "images" / "0000.png"), dtype=np.int16)
    original = np.asarray(Image.open(car), dtype=np.int16)
    assert painted.ndim == 2 and np.abs(painted[:, : SIZE // 2] - original[:, : SIZE // 2]).max() <= 1
    lerp = ["sample", "--checkpoint", str(run), "--steps", "4", "--sampler", "ddim", "--frames", "3"]
    assert main([*lerp, "--out", str(tmp_path / "seeds"), "--interpolate", "1", "2"]) == 0
    assert modes(tmp_path / "seeds" / "images") == {"L"}
    other = sorted(folder.rglob("*.png"))[-1]
    assert main([*lerp, "--out", str(tmp_path / "imgs"), "--interpolate-images", str(car), str(other)]) == 0
    assert modes(tmp_path / "imgs" / "images") == {"L"}
    gif = Image.open(tmp_path / "imgs" / "interpolation.gif")
    assert gif.n_frames == 4 and gif.size == (4 * SIZE, 4 * SIZE)  # there and back: 3 frames, then the middle


def test_eval_scores_one_channel_samples_and_a_grey_folder(grey_run, tmp_path, random_inception_weights):
    run, folder = grey_run
    out = tmp_path / "eval"
    argv = ["eval", "--checkpoint", str(run), "--num-samples", "16", "--steps", "3", "--out", str(out)]
    assert main([*argv, "--inception-weights", str(random_inception_weights)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert np.isfinite(metrics["swd"]) and np.isfinite(metrics["fid"]) and np.isfinite(metrics["kid"])
    assert (out / "nearest.png").is_file()
    same = tmp_path / "same"
    folder_argv = ["eval", "--images", str(folder / "type0"), "--data", str(folder), "--no-fid", "--out", str(same)]
    assert main(folder_argv) == 0
    assert json.loads((same / "metrics.json").read_text())["metrics"]["swd"] >= 0


def test_guidance_report_and_forward_pictures_of_a_grey_run(grey_run, tmp_path):
    run, folder = grey_run
    out = tmp_path / "guidance"
    argv = ["guidance", str(run), "--scales", "0,2", "--per-class", "2", "--classifier-steps", "5"]
    assert main([*argv, "--steps", "3", "--out", str(out)]) == 0
    summary = json.loads((out / "guidance.json").read_text())
    assert summary["classes"] == ["type0", "type1", "type2"] and len(summary["rows"]) == 2
    assert Image.open(out / "guidance.png").size[0] > SIZE
    assert main(["report", str(run)]) == 0 and (run / "report.html").is_file()
    forward = tmp_path / "forward.png"
    assert main(["forward", "--data", str(folder), "--image-size", str(SIZE), "--out", str(forward)]) == 0
    assert forward.is_file()


def test_the_forward_picture_of_grey_toy_cars_starts_from_their_one_channel(tmp_path, monkeypatch):
    from ddpm_cars.commands import figures
    from ddpm_cars.config import DataConfig

    drawn = {}
    monkeypatch.setattr(figures, "save_strip", lambda strip, out, title: drawn.update(strip=strip))
    data = DataConfig(image_size=SIZE, image_channels="1")
    figures.forward(figures.ForwardRequest(out=tmp_path / "f.png", data=data))
    assert {tuple(frame.shape) for _, frame in drawn["strip"]} == {(1, SIZE, SIZE)}
