"""Class conditioning: label embeddings, label dropout, classifier-free guidance, class names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ddpm_cars.conditioning import ClassifierFreeGuidance, class_labels, closest_classes, drop_labels, find_class, guide
from ddpm_cars.config import DiffusionConfig, SampleConfig
from ddpm_cars.denoiser import Denoiser
from ddpm_cars.generation import QUIET, ClassRequest, generate
from ddpm_cars.models import ResAttnUnet, SimpleUnet, UnetLayout, num_classes
from ddpm_cars.schedule import build_schedule


def _randomised(model: nn.Module) -> nn.Module:
    """Zero-initialised output layers make every label give the same (zero) output at
    initialisation; give every parameter random values so labels matter."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def _unet(classes: int = 3, out_channels: int = 6) -> nn.Module:
    return _randomised(ResAttnUnet(16, UnetLayout((8, 16), 1, (8,), 8), out_channels=out_channels, num_classes=classes))


# -- the networks ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda k: _unet(k), lambda k: _randomised(SimpleUnet((8, 16), 8, num_classes=k))])
def test_labels_change_the_output_and_none_means_the_null_class(make):
    model = make(3)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 9])
    outs = [model(x, t, torch.tensor([k, k])) for k in range(4)]  # 3 classes and the null class
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.allclose(outs[a], outs[b], atol=1e-4)
    torch.testing.assert_close(model(x, t), outs[3])
    assert num_classes(model) == 3


def test_unconditional_networks_refuse_labels_and_bad_labels_are_named():
    plain = ResAttnUnet(16, UnetLayout((8, 16), 1, (8,), 8))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    assert num_classes(plain) == 0
    with pytest.raises(ValueError, match="not class-conditional"):
        plain(x, t, torch.tensor([0, 1]))
    model = _unet(3)
    with pytest.raises(ValueError, match=r"0\.\.3"):
        model(x, t, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="2 labels for a batch of 3|3 labels"):
        model(torch.randn(3, 3, 16, 16), torch.tensor([1, 2, 3]), torch.tensor([0, 1]))


# -- label dropout --------------------------------------------------------------------------


def test_label_dropout_replaces_the_share_p_with_the_null_class():
    y = torch.arange(20_000) % 7
    coins = torch.rand(20_000, generator=torch.Generator().manual_seed(0))
    dropped = drop_labels(y, 0.1, num_classes=7, coins=coins)
    is_null = dropped == 7
    assert is_null.float().mean().item() == pytest.approx(0.1, abs=0.01)
    torch.testing.assert_close(is_null, coins < 0.1)
    assert torch.equal(dropped[~is_null], y[~is_null])  # the others keep their labels
    assert torch.equal(drop_labels(y, 0.0, 7, coins), y)
    with pytest.raises(ValueError, match="one coin per label"):
        drop_labels(y, 0.1, 7, coins[:5])


def test_training_feeds_dropped_labels_to_the_network(tiny_config, tmp_path, monkeypatch):
    from ddpm_cars.training import batches, loop

    seen = []
    real = batches.drop_labels

    def recording(y, p, k, coins):
        out = real(y, p, k, coins)
        seen.append((y.clone(), out.clone()))
        return out

    monkeypatch.setattr(batches, "drop_labels", recording)
    config = tiny_config.replace(
        model={"class_conditional": True}, train={"label_dropout": 0.5, "max_steps": 6, "epochs": 10}
    )
    loop.train(config, tmp_path / "run", progress=False, final_grid=False)
    assert len(seen) == 6
    before, after = torch.cat([b for b, _ in seen]), torch.cat([a for _, a in seen])
    dropped = after == 6  # six toy-car body types; 6 is the null class
    assert 0.3 < dropped.float().mean().item() < 0.7
    assert torch.equal(after[~dropped], before[~dropped]) and before.max() < 6


# -- guidance arithmetic ------------------------------------------------------------------


class _Counting(nn.Module):
    """Wraps a network and records the batch of each call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t, y=None):
        self.calls.append((x.shape[0], None if y is None else y.tolist()))
        return self.model(x, t, y)


@pytest.mark.parametrize("out_channels", [3, 6])
def test_guidance_0_is_unconditional_1_conditional_and_s_extrapolates(out_channels):
    model = _unet(3, out_channels)
    x, t, y = torch.randn(4, 3, 16, 16), torch.tensor([3, 3, 7, 7]), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t)
        for scale, expected in [(0.0, uncond), (1.0, cond)]:
            torch.testing.assert_close(ClassifierFreeGuidance(model, y, scale, 3)(x, t), expected, atol=1e-5, rtol=1e-5)
        counted = _Counting(model)
        guided = ClassifierFreeGuidance(counted, y, 3.0, 3)(x, t)
    assert counted.calls == [(8, [0, 1, 2, 0, 3, 3, 3, 3])]  # one pass: conditional half, then null half
    mean = uncond[:, :3] + 3.0 * (cond[:, :3] - uncond[:, :3])  # Ho & Salimans (2022), Eq. 6 with w = s - 1
    torch.testing.assert_close(guided[:, :3], mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(guided[:, 3:], cond[:, 3:], atol=1e-5, rtol=1e-5)  # the variance is not guided


def test_guide_by_hand():
    cond, uncond = torch.full((1, 4, 1, 1), 2.0), torch.full((1, 4, 1, 1), 1.0)
    assert guide(cond, uncond, 2.5, channels=3).flatten().tolist() == [3.5, 3.5, 3.5, 2.0]


def test_scale_1_and_0_take_one_pass_of_the_batch_alone():
    model = _Counting(_unet(3))
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 1]), torch.tensor([2, 0])
    ClassifierFreeGuidance(model, y, 1.0, 3)(x, t)
    ClassifierFreeGuidance(model, y, 0.0, 3)(x, t)
    assert model.calls == [(2, [2, 0]), (2, [3, 3])]
    with pytest.raises(ValueError, match="guidance must be >= 0"):
        ClassifierFreeGuidance(model, y, -1.0, 3)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_every_sampler_draws_the_same_guided_image_whatever_the_batch(sampler):
    model = _unet(3)
    diffusion = DiffusionConfig(timesteps=20, schedule="cosine", loss="l2", learn_variance=True)
    schedule = build_schedule(diffusion)
    denoiser = Denoiser(model, schedule, diffusion, image_size=16)
    config = SampleConfig(sampler=sampler, steps=4)
    labels = torch.tensor([0, 1, 2, 1, 0])
    classes = ClassRequest(labels, 2.0)
    whole = generate(denoiser, 5, config, seed=7, batch_size=5, classes=classes, watch=QUIET)
    pieces = generate(denoiser, 5, config, seed=7, batch_size=2, classes=classes, watch=QUIET)
    torch.testing.assert_close(whole, pieces, atol=1e-4, rtol=1e-4)
    other = generate(
        denoiser,
        5,
        config,
        seed=7,
        batch_size=5,
        classes=ClassRequest(torch.tensor([2, 1, 2, 0, 0]), 2.0),
        watch=QUIET,
    )
    torch.testing.assert_close(whole[1:3], other[1:3], atol=1e-4, rtol=1e-4)  # the same classes asked for
    assert not torch.allclose(whole[0], other[0], atol=1e-3)  # class 0, then class 2
    with pytest.raises(ValueError, match="one label per image"):  # 5 labels for 4 images
        generate(denoiser, 4, config, seed=7, classes=classes, watch=QUIET)
    with pytest.raises(ValueError, match="one label per image"):  # 3 labels for 4 images
        generate(denoiser, 4, config, seed=7, classes=ClassRequest(labels[:3], 2.0), watch=QUIET)
    with pytest.raises(ValueError, match=r"classes 0\.\.2 of the model"):  # 3 is the null class, not one to ask for
        generate(denoiser, 5, config, seed=7, classes=ClassRequest(torch.tensor([0, 1, 3, 1, 0]), 2.0), watch=QUIET)
    unconditional = Denoiser(
        _randomised(ResAttnUnet(16, UnetLayout((8, 16), 1, (8,), 8))), schedule, diffusion, image_size=16
    )
    with pytest.raises(ValueError, match="not class-conditional"):
        generate(unconditional, 5, config, seed=7, classes=classes, watch=QUIET)


# -- class names --------------------------------------------------------------------------

CARS = ["Audi R8 Coupe 2012", "BMW M3 Coupe 2012", "BMW M6 Convertible 2010", "Bugatti Veyron 16.4 Coupe 2009"]


@pytest.mark.parametrize(
    "request_, index",
    [
        ("BMW M3 Coupe 2012", 1),
        ("bmw m3 coupe 2012", 1),
        ("  BMW  M3 coupe 2012 ", 1),
        ("3", 3),
        ("0", 0),
    ],
)
def test_classes_match_by_name_in_any_case_or_by_index(request_, index):
    assert find_class(request_, CARS) == index


def test_a_class_named_like_a_number_wins_over_the_index():
    names = ["0", "1", "10", "2"]  # sorted folder names of a digits dataset
    assert find_class("2", names) == 3 and find_class("10", names) == 2


def test_unknown_names_list_the_closest_ones():
    with pytest.raises(ValueError) as err:
        find_class("BMW M3", CARS)
    message = str(err.value)
    assert message.startswith("unknown class 'BMW M3'; closest: 'BMW M3 Coupe 2012'")
    assert "'BMW M6 Convertible 2010'" in message and "ddpm-cars classes" in message
    assert closest_classes("bugati veyron", CARS)[0] == "Bugatti Veyron 16.4 Coupe 2009"
    with pytest.raises(ValueError, match=r"index 4 is out of range: the model knows classes 0\.\.3"):
        find_class("4", CARS)
    with pytest.raises(ValueError, match="not class-conditional"):
        find_class("BMW M3 Coupe 2012", [])


def test_class_labels_are_grouped_class_after_class():
    assert class_labels(["bmw m6 convertible 2010", "0"], CARS, per_class=3).tolist() == [2, 2, 2, 0, 0, 0]
