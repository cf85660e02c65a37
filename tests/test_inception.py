"""The Inception feature path: weights resolution, refusal of unsafe files, features, the
reference-feature cache. A randomly initialised network saved in the weights file's
format stands in for the real weights (the download is not available to tests)."""

import os
import pickle
import urllib.error

import pytest
import torch

from ddpm_cars.data import toy_cars_dataset
from ddpm_cars.evaluation import inception as inc
from ddpm_cars.evaluation.reference import cache_key, cached_features


def test_features_through_the_real_network(random_inception_weights):
    net = inc.InceptionFeatures(random_inception_weights)
    images = toy_cars_dataset(5, 32).images
    feats = net(images, batch_size=2)
    assert feats.shape == (5, inc.FEATURE_DIM) and feats.dtype == torch.float64
    assert torch.equal(feats, net(images, batch_size=5))  # batching does not change a feature
    assert not torch.allclose(feats[0], feats[1])
    with pytest.raises(ValueError, match="uint8"):
        net(images.float())


def test_a_grayscale_batch_gets_the_features_of_its_repeat_to_three_channels(random_inception_weights):
    net = inc.InceptionFeatures(random_inception_weights)
    rgb = toy_cars_dataset(2, 16).images
    gray = rgb.float().mean(1, keepdim=True).round().to(torch.uint8)  # [2, 1, 16, 16]
    feats = net(gray, batch_size=1)
    assert feats.shape == (2, inc.FEATURE_DIM) and feats.dtype == torch.float64
    assert torch.equal(feats, net(gray.expand(-1, 3, -1, -1).contiguous()))
    assert not torch.allclose(feats[0], feats[1])
    with pytest.raises(ValueError, match=r"\[N, 1 or 3, H, W\]"):
        net(rgb[:, :2])


def test_as_rgb_repeats_one_channel_and_passes_three_through():
    rgb = toy_cars_dataset(2, 16).images
    assert inc.as_rgb(rgb) is rgb
    gray = rgb[:, 1:2]
    repeated = inc.as_rgb(gray)
    assert repeated.shape == (2, 3, 16, 16) and repeated.dtype == torch.uint8
    assert all(torch.equal(repeated[:, c], rgb[:, 1]) for c in range(3))
    for bad in (rgb[:, :2], rgb[0], torch.zeros(1, 4, 16, 16, dtype=torch.uint8)):
        with pytest.raises(ValueError, match="C = 1 or 3"):
            inc.as_rgb(bad)


def test_explicit_weights_path_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        inc.resolve_weights(tmp_path / "missing.pth")


def test_offline_without_weights_says_which_file_goes_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = tmp_path / "torch" / "hub" / "checkpoints" / inc.WEIGHTS_FILE
    assert inc.hub_weights_path() == expected
    with pytest.raises(inc.InceptionUnavailable) as err:
        inc.resolve_weights(download=False)
    assert (
        inc.WEIGHTS_FILE in str(err.value)
        and str(expected) in str(err.value)
        and "--inception-weights" in str(err.value)
    )

    def offline(url, dst, progress=True):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(inc.InceptionUnavailable, match="download failed: .*name resolution"):
        inc.resolve_weights()
    expected.parent.mkdir(parents=True, exist_ok=True)
    expected.write_bytes(b"x")
    assert inc.resolve_weights() == expected  # found in the hub cache, no download


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EXPLOIT_MARKER']}",))


def test_a_weights_file_that_would_run_code_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARKER", str(marker))
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"Conv2d_1a_3x3.conv.weight": _Exploit()}, protocol=2))
    with pytest.raises(ValueError, match="refused"):
        inc.InceptionFeatures(path)
    assert not marker.exists()


def test_weights_of_another_network_are_named_as_such(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(ValueError, match="does not hold Inception-v3 weights"):
        inc.InceptionFeatures(path)


def test_reference_features_are_computed_once_and_reused(tmp_path):
    images = toy_cars_dataset(6, 16).images
    calls = []

    def compute(x):
        calls.append(x.shape[0])
        return x.flatten(1).double().mean(1, keepdim=True)

    first, hit1 = cached_features(images, "toy-cars-train-16px", "mean", compute, tmp_path)
    second, hit2 = cached_features(images, "toy-cars-train-16px", "mean", compute, tmp_path)
    assert (hit1, hit2) == (False, True) and calls == [6] and torch.equal(first, second)
    other, hit3 = cached_features(images[:5], "toy-cars-train-16px", "mean", compute, tmp_path)  # other images
    assert not hit3 and calls == [6, 5] and other.shape == (5, 1)
    entries = sorted((tmp_path / "reference").iterdir())
    assert len(entries) == 2 and not any(p.name.startswith(".") for p in entries)
    entries[0].write_bytes(b"damaged")  # a broken entry is recomputed, not trusted
    cached_features(images if "n6" in entries[0].name else images[:5], "toy-cars-train-16px", "mean", compute, tmp_path)
    assert len(calls) == 3


def test_cache_key_names_the_data_and_hashes_the_bytes():
    images = toy_cars_dataset(3, 16).images
    key = cache_key("/data/my cars/train-64px", images, "inception")
    assert key.startswith("data-my-cars-train-64px_n3_") and key.endswith("_inception")
    changed = images.clone()
    changed[0, 0, 0, 0] ^= 1
    assert cache_key("/data/my cars/train-64px", changed, "inception") != key
