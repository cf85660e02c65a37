"""FD/KID on the toy-car judge's features (``ddpm_cars.evaluation.judge``): they rank a ladder
of image sets as SWD does -- held-out real toy cars < samples of a trained model < samples of
an early checkpoint < uniform noise -- and the judge is trained once, deterministically, then
read from the cache folder; a changed key or a damaged file trains it again."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ddpm_cars.data import toy_cars, toy_cars_dataset
from ddpm_cars.data.dataset import to_model_range, to_uint8
from ddpm_cars.evaluation import class_accuracy, judge
from ddpm_cars.evaluation import sample_metrics as sample_metrics_module
from ddpm_cars.evaluation.class_accuracy import ClassifierTraining, predict
from ddpm_cars.evaluation.judge import JudgeRecipe, judge_features, judge_key, load_judge
from ddpm_cars.evaluation.sample_metrics import sample_metrics
from ddpm_cars.generation import QUIET, generate
from ddpm_cars.presets import preset
from ddpm_cars.run import Run
from ddpm_cars.training import train

TRAINED = Path(__file__).parents[1] / "docs" / "benchmarks" / "samplers_eps" / "long_eps_fp32"  # 3000 steps, 32 px
SAMPLING = {"sampler": "dpm++sde", "steps": 10, "spacing": "karras"}  # 10 calls: the ladder, not the best
SIZE, COUNT = 32, 128  # at 96, KID put one draw of held-out images level with the trained model
RUNGS = ("held-out real", "trained", "early", "noise")  # best first
SMALL = JudgeRecipe(images=32, training=ClassifierTraining(steps=2, batch_size=16))  # a judge made in a blink

# the tiny preset at 32 px, stopped after 30 steps at twice the demo's learning rate: blurry coloured blobs
EARLY = preset("tiny").replace(
    data={"image_size": SIZE, "toy_count": 512},
    train={"lr": 2e-3, "max_steps": 30, "checkpoint_every_steps": 30, "sample_every_epochs": 1000, "precision": "fp32"},
)


def _samples(run_dir: Path) -> torch.Tensor:
    run = Run.open(run_dir)
    sample = run.with_sampling(SAMPLING).config.sample
    return to_uint8(generate(run.denoiser(), COUNT, sample, seed=0, watch=QUIET))


@pytest.fixture(scope="module")
def ladder(tmp_path_factory) -> dict[str, dict[str, float]]:
    """The metrics of each rung against the trained model's training images (toy cars, seed
    0), the judge trained at first use in a cache folder of its own."""
    root = tmp_path_factory.mktemp("judge-ladder")
    train(EARLY, root / "early", device="cpu", progress=False, final_grid=False)
    noise = torch.randint(0, 256, (COUNT, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rungs = {
        "held-out real": toy_cars_dataset(COUNT, SIZE, seed=2).images,  # neither the reference's seed nor the judge's
        "trained": _samples(TRAINED),
        "early": _samples(root / "early"),
        "noise": noise,
    }
    reference = toy_cars_dataset(4096, SIZE).images
    return {
        name: sample_metrics(images, reference, description="toy-cars-train-32px", cache_dir=root / "cache")[0]
        for name, images in rungs.items()
    }


def test_judge_fd_and_kid_rank_real_trained_early_and_noise_as_swd_does(ladder):
    table = "\n".join(
        f"{n:>14}: " + ", ".join(f"{m} {ladder[n][m]:.5g}" for m in ("judge_fd", "judge_kid", "swd")) for n in RUNGS
    )
    print("\n" + table)
    for metric in ("judge_fd", "judge_kid", "swd"):
        values = [ladder[name][metric] for name in RUNGS]
        assert all(a < b for a, b in zip(values, values[1:])), f"{metric} does not rank the ladder:\n{table}"
    assert all(ladder[name]["judge_kid_std"] >= 0 for name in RUNGS)


# --- the judge and its cache -----------------------------------------------------------


@pytest.fixture
def trainings(monkeypatch) -> list[int]:
    """Counts the judge's trainings (one entry per call of train_classifier)."""
    calls: list[int] = []
    real = judge.train_classifier

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(judge, "train_classifier", counted)
    return calls


def _entry(cache_dir: Path, size: int = 16, recipe: JudgeRecipe = SMALL) -> Path:
    return cache_dir / "judge" / f"{judge_key(size, recipe)}.safetensors"


def test_the_second_use_reads_the_weights_and_does_not_train(tmp_path, monkeypatch):
    first = load_judge(16, SMALL, tmp_path)
    assert _entry(tmp_path).is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("the judge was trained again")

    monkeypatch.setattr(judge, "train_classifier", no_training)
    second = load_judge(16, SMALL, tmp_path)
    assert not second.training
    images = toy_cars_dataset(8, 16, seed=3).images
    assert torch.equal(judge_features(first, images), judge_features(second, images))
    assert first.state_dict().keys() == second.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_a_changed_key_trains_a_new_judge(tmp_path, monkeypatch, trainings):
    load_judge(16, SMALL, tmp_path)
    load_judge(16, SMALL, tmp_path)
    assert len(trainings) == 1
    load_judge(32, SMALL, tmp_path)  # another resolution
    longer = dataclasses.replace(SMALL, training=dataclasses.replace(SMALL.training, steps=3))
    load_judge(16, longer, tmp_path)  # another recipe
    monkeypatch.setattr(torch, "__version__", "0.0.0")  # another torch
    load_judge(16, SMALL, tmp_path)
    assert len(trainings) == 4 and len(list((tmp_path / "judge").glob("*.safetensors"))) == 4


def test_the_key_hashes_the_code_of_the_judge_the_classifier_and_the_toy_cars(monkeypatch):
    stamped = []
    monkeypatch.setattr(judge.cache, "code_stamp", lambda *modules: stamped.extend(modules) or "other code")
    changed = judge_key(32)
    assert set(stamped) == {judge, class_accuracy, toy_cars}
    monkeypatch.undo()
    assert changed != judge_key(32) and judge_key(32).startswith("toy-cars-judge_32px_")


@pytest.mark.parametrize("damage", ["garbage", "other tensors", "truncated"])
def test_a_damaged_file_is_trained_again_and_replaced_by_the_same_weights(tmp_path, trainings, damage):
    original = load_judge(16, SMALL, tmp_path)
    path = _entry(tmp_path)
    if damage == "garbage":
        path.write_bytes(b"not a safetensors file")
    elif damage == "other tensors":
        save_file({"head.weight": torch.zeros(2, 2)}, path)
    else:
        path.write_bytes(path.read_bytes()[:-100])
    rebuilt = load_judge(16, SMALL, tmp_path)
    assert len(trainings) == 2
    stored = load_file(path)  # readable again
    for name, value in original.state_dict().items():  # the training is deterministic
        assert torch.equal(value, rebuilt.state_dict()[name]) and torch.equal(value, stored[name]), name


def test_the_judge_trains_alike_whatever_the_callers_grad_autocast_and_thread_settings(tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    seen = []
    real = judge.train_classifier
    monkeypatch.setattr(
        judge, "train_classifier", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k)
    )
    with torch.inference_mode():
        in_inference = load_judge(16, SMALL, tmp_path / "a")
    assert torch.get_num_threads() == threads  # restored
    torch.set_num_threads(threads + 1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        in_no_grad = load_judge(16, SMALL, tmp_path / "b")
        features = judge_features(in_no_grad, toy_cars_dataset(4, 16, seed=3).images)
    assert torch.get_num_threads() == threads + 1 and seen == [1, 1]  # trained on one thread each time
    assert features.dtype == torch.float32
    for name, value in in_inference.state_dict().items():
        assert torch.equal(value, in_no_grad.state_dict()[name]), name


def test_the_features_are_the_pooled_penultimate_activations(tmp_path):
    model = load_judge(16, SMALL, tmp_path)
    images = toy_cars_dataset(10, 16, seed=3).images
    features = judge_features(model, images, batch_size=4)
    assert features.shape == (10, 64) and features.dtype == torch.float32 and (features >= 0).all()
    with torch.no_grad():
        assert torch.allclose(features, model.embed(to_model_range(images)), atol=1e-6)
        assert torch.equal(model.head(features).argmax(1), predict(model, images))
    assert judge_features(model, images[:0]).shape == (0, 64)
    with pytest.raises(ValueError, match="uint8"):
        judge_features(model, to_model_range(images))


# --- grayscale images: repeated to the RGB the judge was trained on ----------------------


def _gray(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, S, S] -> [N, 1, S, S], the mean of the three channels."""
    return images.float().mean(1, keepdim=True).round().to(torch.uint8)


def test_a_grayscale_image_gets_the_judge_features_of_its_repeat_to_three_channels(tmp_path):
    model = load_judge(16, SMALL, tmp_path)
    gray = _gray(toy_cars_dataset(10, 16, seed=3).images)
    features = judge_features(model, gray, batch_size=4)
    assert features.shape == (10, 64) and features.dtype == torch.float32
    assert torch.equal(features, judge_features(model, gray.repeat(1, 3, 1, 1)))
    with torch.no_grad():  # the judge itself is the RGB one: three input channels
        assert torch.allclose(features, model.embed(to_model_range(gray).expand(-1, 3, -1, -1)), atol=1e-6)
    with pytest.raises(ValueError, match=r"\[N, 1 or 3, S, S\]"):
        judge_features(model, torch.zeros(2, 2, 16, 16, dtype=torch.uint8))


def test_sample_metrics_of_grayscale_images(tmp_path, monkeypatch):
    """The judge's distances of grayscale sets are those of the same sets repeated to RGB, and
    so are pixel precision/recall (the repeat scales every pixel distance by sqrt(3)); SWD
    works on the one channel. Grayscale against RGB is refused."""
    monkeypatch.setattr(sample_metrics_module, "load_judge", lambda size, **_: load_judge(size, SMALL, tmp_path))
    samples, reference = _gray(toy_cars_dataset(20, 16, seed=5).images), _gray(toy_cars_dataset(30, 16).images)
    gray, _ = sample_metrics(samples, reference, description="gray", cache_dir=tmp_path)
    rgb, _ = sample_metrics(
        samples.repeat(1, 3, 1, 1), reference.repeat(1, 3, 1, 1), description="gray", cache_dir=tmp_path
    )
    assert (
        set(gray)
        == set(rgb)
        == {
            "swd",
            "swd_16",
            "precision_pixels",
            "recall_pixels",
            "judge_fd",
            "judge_kid",
            "judge_kid_std",
        }
    )
    for name in ("judge_fd", "judge_kid", "judge_kid_std", "precision_pixels", "recall_pixels"):
        assert gray[name] == rgb[name], name
    assert gray["judge_fd"] > 0 and 0 < gray["recall_pixels"] <= 1 and gray["swd"] > 0
    assert gray["swd"] != rgb["swd"]  # 49-dimensional descriptors, not 147
    with pytest.raises(ValueError, match=r"\(20, 1, 16, 16\) and reference \(30, 3, 16, 16\)"):
        sample_metrics(samples, reference.repeat(1, 3, 1, 1), description="gray", cache_dir=tmp_path)
