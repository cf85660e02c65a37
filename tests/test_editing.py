"""Variations (SDEdit), inpainting (RePaint), DDIM inversion and interpolation, checked
against what each must do by construction and against independent computations."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_cars import diffusion
from ddpm_cars.config import DiffusionConfig, SampleConfig
from ddpm_cars.denoiser import Denoiser
from ddpm_cars.editing import (
    Edit,
    Inpainting,
    ddim_invert,
    interpolation_weights,
    repaint_moves,
    slerp,
    strength_timesteps,
)
from ddpm_cars.generation import QUIET, decode, generate
from ddpm_cars.presets import TINY
from ddpm_cars.run import Run
from ddpm_cars.samplers import ddim_sample, image_generators, randn
from ddpm_cars.schedule import NoiseSchedule, cosine_betas, sampling_timesteps
from ddpm_cars.training import train

LEVEL = 2 / 255  # one 8-bit level in [-1, 1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """The tiny improved recipe (16 px, T = 100, cosine, learned variance) after 40 steps."""
    run = tmp_path_factory.mktemp("edit") / "tiny"
    train(
        TINY.replace(data={"toy_count": 64}, train={"max_steps": 40, "sample_every_epochs": 100}), run, progress=False
    )
    return run


@pytest.fixture
def small_trained_denoiser(tiny_run) -> Denoiser:
    return Run.open(tiny_run).denoiser()


class Shrink(torch.nn.Module):
    """A stand-in eps network: 0.3 x_t + 0.001 t, recording the steps it is called at."""

    def __init__(self):
        super().__init__()
        self.calls: list[int] = []

    def forward(self, x, t, y=None):
        self.calls.append(int(t[0]))
        return 0.3 * x + 0.001 * t.view(-1, 1, 1, 1).float()


def _den(network, timesteps=40, size=8, **config) -> Denoiser:
    schedule = NoiseSchedule.from_betas(cosine_betas(timesteps))
    return Denoiser(network, schedule, DiffusionConfig(timesteps=timesteps, schedule="cosine", **config), size)


def _image(n=1, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 127.5 - 1).squeeze(0)


def _lower_half(size=8):
    mask = torch.zeros(1, size, size)
    mask[:, size // 2 :] = 1
    return mask


# -- variations (SDEdit) -------------------------------------------------------------------


def test_strength_0_returns_the_image():
    image = _image()
    out = generate(_den(Shrink()), 3, SampleConfig(steps=10), edit=Edit(image, strength=0.0), watch=QUIET)
    assert (out - image).abs().max() <= LEVEL / 2


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++", "heun"])
def test_strength_1_is_ordinary_sampling_with_the_same_seed(sampler):
    den, config = _den(Shrink()), SampleConfig(sampler=sampler, steps=8, eta=0.5)
    plain = generate(den, 3, config, seed=4, watch=QUIET)
    varied = generate(den, 3, config, seed=4, edit=Edit(_image(), strength=1.0), watch=QUIET)
    assert torch.equal(plain, varied)


def test_a_variation_starts_from_the_image_noised_to_strength_times_t_with_the_images_own_noise():
    """At strength 0.5 of T = 40 on 10 uniform steps (0, 4, 9, ..., 39), the sampler visits
    the steps below 20 and its first network input is q(x_t | x_0) at the highest of them,
    made from the noise image i would have started from."""
    net, image, starts = Shrink(), _image(), []
    den = _den(net)
    steps = sampling_timesteps(40, 10)
    kept = steps[steps < 20]
    net.forward = lambda x, t, y=None, f=net.forward: (starts.append(x.clone()) if not starts else None) or f(x, t)
    generate(den, 2, SampleConfig(sampler="ddim", steps=10), seed=7, edit=Edit(image, strength=0.5), watch=QUIET)
    noise = randn((3, 8, 8), image_generators(7, range(2)), "cpu")
    top = int(kept[-1])
    expected = diffusion.q_sample(den.schedule, image.expand(2, -1, -1, -1), torch.full((2,), top), noise)
    assert torch.allclose(starts[0], expected, atol=1e-6)
    assert net.calls == kept.flip(0).tolist() and top == max(t for t in steps.tolist() if t < 20)


def test_strength_picks_the_steps_below_strength_times_t():
    steps = torch.tensor([0, 10, 20, 30, 39])
    assert strength_timesteps(steps, 0.5, 40).tolist() == [0, 10]
    assert strength_timesteps(steps, 0.76, 40).tolist() == [0, 10, 20, 30]
    assert strength_timesteps(steps, 1.0, 40).tolist() == steps.tolist()
    assert strength_timesteps(steps, 0.0, 40).tolist() == []


def test_variations_of_one_image_differ_and_move_further_from_it_as_strength_rises():
    image, den = _image(), _den(Shrink())
    distances = []
    for strength in (0.1, 0.5, 0.9):
        out = generate(den, 4, SampleConfig(steps=20), seed=1, edit=Edit(image, strength=strength), watch=QUIET)
        assert not torch.equal(out[0], out[1])
        distances.append((out - image).pow(2).mean().sqrt().item())
    assert distances == sorted(distances)


# -- inpainting (RePaint) ------------------------------------------------------------------


def test_repaint_moves_go_back_up_every_r_steps_j_times():
    assert repaint_moves(5, 0, 2) == [4, 3, 2, 1, 0, -1]
    assert repaint_moves(5, 1, 2) == [4, 3, 2, 4, 3, 2, 1, 0, 2, 1, 0, -1]
    path = repaint_moves(50, 3, 10)
    downs = sum(1 for a, b in zip(path, path[1:]) if b == a - 1)
    assert downs == 50 + 3 * 10 * 4 and path[-1] == -1  # jumps back from 0, 10, 20 and 30


@pytest.mark.parametrize(
    "sampler, steps, jumps",
    [
        ("ddpm", None, 0),
        ("ddpm", 1, 0),
        ("ddpm", 3, 0),
        ("ddpm", 10, 0),
        ("ddpm", 10, 2),
        ("ddim", 7, 0),
        ("ddim", 12, 1),
    ],
)
def test_inpainting_keeps_every_unmasked_pixel(sampler, steps, jumps):
    image, mask = _image(2, seed=3), _lower_half()
    config = SampleConfig(sampler=sampler, steps=steps, eta=0.5)
    out = generate(_den(Shrink()), 2, config, seed=0, edit=Edit(image, mask=Inpainting(mask, jumps, 3)), watch=QUIET)
    keep = (mask == 0).expand_as(out)
    assert (out[keep] - image[keep]).abs().max() <= LEVEL / 2
    assert (out[~keep] - image[~keep]).abs().mean() > 0.05  # the masked half was redrawn


def test_inpainting_with_resampling_costs_the_extra_steps_and_fills_from_the_kept_part():
    """An oracle that knows the one clean image fills the hole with it exactly."""
    clean = _image(seed=5)

    class Oracle(torch.nn.Module):
        def __init__(self, schedule):
            super().__init__()
            self.ab, self.calls = schedule.alphas_cumprod.double(), 0

        def forward(self, x_t, t, y=None):
            self.calls += 1
            ab = self.ab[t].view(-1, 1, 1, 1)
            return ((x_t.double() - ab.sqrt() * clean) / (1 - ab).sqrt()).float()

    den = _den(torch.nn.Identity())
    oracle = Oracle(den.schedule)
    den = Denoiser(oracle, den.schedule, den.config, 8)
    out = generate(den, 2, SampleConfig(steps=20), edit=Edit(clean, mask=Inpainting(_lower_half(), 2, 5)), watch=QUIET)
    assert oracle.calls == 20 + 2 * 5 * 3  # jumps back from levels 0, 5 and 10
    assert torch.allclose(out, clean.expand_as(out), atol=1e-4)


@pytest.mark.parametrize("sampler", ["dpm++", "heun"])
def test_inpainting_refuses_multistep_samplers(sampler):
    with pytest.raises(ValueError, match="ddpm or ddim"):
        generate(
            _den(Shrink()),
            1,
            SampleConfig(sampler=sampler, steps=5),
            edit=Edit(_image(), mask=_lower_half()),
            watch=QUIET,
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"init": torch.zeros(3, 6, 6)}, "init must be"),
        ({"init": torch.zeros(3, 3, 8, 8)}, "init must be"),  # 3 images for a request of 2
        ({"init": torch.zeros(3, 8, 8), "mask": torch.zeros(6, 6)}, "mask must be"),
        ({"init": torch.zeros(3, 8, 8), "strength": 1.5}, "strength must lie in"),
        ({"init": torch.zeros(3, 8, 8), "strength": -0.1}, "strength must lie in"),
    ],
)
def test_bad_edits_are_one_line_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as excinfo:
        generate(_den(Shrink()), 2, SampleConfig(steps=5), edit=Edit(**kwargs), watch=QUIET)
    assert len(str(excinfo.value).splitlines()) == 1


@pytest.mark.parametrize("edit", ["sdedit", "inpaint"])
def test_each_edited_image_depends_on_its_seed_alone(edit):
    images = _image(5, seed=9)
    kwargs = (
        {"init": images, "strength": 0.6}
        if edit == "sdedit"
        else {"init": images, "mask": Inpainting(_lower_half(), 1, 3)}
    )
    den, config = _den(Shrink()), SampleConfig(steps=9)
    a = generate(den, 5, config, seed=2, batch_size=5, edit=Edit(**kwargs), watch=QUIET)
    b = generate(den, 5, config, seed=2, batch_size=2, edit=Edit(**kwargs), watch=QUIET)
    c = generate(den, [3, 4], config, seed=2, batch_size=2, edit=Edit(**kwargs), watch=QUIET)  # a share of the request
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a[3:], c, atol=1e-6)


# -- DDIM inversion and interpolation ------------------------------------------------------


def _gaussian_denoiser(timesteps=1000):
    """The exact x_0 denoiser of data N(0.3, 0.5^2) per pixel: the probability-flow ODE is
    then smooth and invertible, so DDIM inversion must converge to the exact x_T."""
    mu, s2 = 0.3, 0.25
    schedule = NoiseSchedule.from_betas(cosine_betas(timesteps))
    ab = schedule.alphas_cumprod_float64

    class Exact(torch.nn.Module):
        def forward(self, x_t, t, y=None):
            a, var = ab[t].sqrt().view(-1, 1, 1, 1), (1 - ab[t]).view(-1, 1, 1, 1)
            return (mu + a * s2 * (x_t.double() - a * mu) / (a**2 * s2 + var)).float()

    return Denoiser(Exact(), schedule, DiffusionConfig(timesteps=timesteps, schedule="cosine", prediction="x0"), 8)


def test_ddim_inversion_of_an_exact_denoiser_recovers_x_t_converging_with_the_steps():
    den = _gaussian_denoiser()
    x_T = randn((3, 8, 8), image_generators(0, range(3)), "cpu")
    errors = []
    for steps in (20, 80, 320, 1000):
        ts = sampling_timesteps(1000, steps, "logsnr", den.schedule.alphas_cumprod_float64)
        drawn = ddim_sample(den, x_T, image_generators(0, range(3)), timesteps=ts, clip_x0=False)
        back = ddim_invert(den, drawn, timesteps=ts)
        errors.append((back - x_T).abs().max().item())
    # first order (each step's prediction is taken where the step starts): 4x the steps, about
    # a quarter of the error (measured 0.75, 0.20, 0.048 at 20, 80, 320 steps)
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.02, errors
    assert 3 < errors[0] / errors[1] < 5 and 3 < errors[1] / errors[2] < 5, errors
    cos = torch.nn.functional.cosine_similarity(back.flatten(1), x_T.flatten(1)).min()
    assert cos > 0.9999


def test_ddim_inversion_on_a_small_trained_network_recovers_x_t(small_trained_denoiser):
    den = small_trained_denoiser
    x_T = randn((3, 16, 16), image_generators(1, range(4)), "cpu")
    ts = sampling_timesteps(den.schedule.timesteps, 25)
    den.network.eval()
    drawn = ddim_sample(den, x_T, image_generators(0, range(4)), timesteps=ts, clip_x0=False)
    back = ddim_invert(den, drawn, timesteps=ts)
    cos = torch.nn.functional.cosine_similarity(back.flatten(1), x_T.flatten(1))
    assert cos.min() > 0.99, cos


def test_slerp_ends_exactly_at_both_noises_and_keeps_their_norm():
    a, b = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    norm = lambda x: x.flatten(1).norm(dim=1)  # noqa: E731
    b = b * (norm(a) / norm(b)).view(-1, 1, 1, 1)  # two noises of one norm: the path stays on their sphere
    for w in (0.25, 0.5, 0.9):
        assert torch.allclose(norm(slerp(a, b, w)), norm(a), rtol=1e-5)
    mid = slerp(a, b, 0.5)
    cos = torch.nn.functional.cosine_similarity
    assert torch.allclose(cos(mid.flatten(1), a.flatten(1)), cos(mid.flatten(1), b.flatten(1)), atol=1e-5)
    assert bool((norm((a + b) / 2) < 0.9 * norm(a)).all())  # where a straight line would shrink it
    assert interpolation_weights(5) == [0, 0.25, 0.5, 0.75, 1]


@pytest.mark.parametrize("sampler", ["ddim", "dpm++", "heun"])
def test_interpolation_ends_are_the_two_seeds_ordinary_samples(sampler):
    den, config = _den(Shrink()), SampleConfig(sampler=sampler, steps=6)
    ends = torch.cat([randn((3, 8, 8), image_generators(seed, [0], "cpu"), "cpu") for seed in (3, 8)])
    frames = torch.stack([slerp(ends[0], ends[1], w) for w in interpolation_weights(5)])
    a = decode(den, frames, config, batch_size=5, progress=False)
    b = decode(den, frames, config, batch_size=2, progress=False)
    assert torch.allclose(a, b, atol=1e-6)
    for seed, frame in ((3, a[0]), (8, a[-1])):
        assert torch.allclose(frame, generate(den, 1, config, seed=seed, watch=QUIET)[0], atol=1e-6)


@pytest.mark.parametrize(
    "config",
    [SampleConfig(sampler="ddpm"), SampleConfig(sampler="ddim", eta=0.5), SampleConfig(sampler="heun", churn=10)],
)
def test_decoding_refuses_a_sampler_that_draws_noise(config):
    with pytest.raises(ValueError, match="deterministic sampler"):
        decode(_den(Shrink()), torch.zeros(2, 3, 8, 8), config, progress=False)


# -- the command line ------------------------------------------------------------------------


def _run_cli(args, capsys):
    from ddpm_cars.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as exit:  # argparse
        code = exit.code
    return code, capsys.readouterr()


def _png(path: Path, size=(40, 30), colour=(200, 40, 40)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


def test_variations_inpainting_and_interpolation_from_the_command_line(tiny_run, tmp_path, capsys):
    car = _png(tmp_path / "car.png")
    mask = Image.new("L", (40, 30), 0)
    mask.paste(255, (0, 15, 40, 30))  # the lower half
    mask.save(tmp_path / "mask.png")
    common = ["--checkpoint", tiny_run, "--steps", 10, "--num-images", 3]

    code, out = _run_cli(["sample", *common, "--out", tmp_path / "var", "--init-image", car, "--strength", 0.3], capsys)
    assert code == 0 and "variations of" in out.out
    assert {p.name for p in (tmp_path / "var").iterdir()} >= {"grid.png", "input.png", "images", "denoising.png"}

    code, out = _run_cli(["sample", *common, "--out", tmp_path / "same", "--init-image", car, "--strength", 0], capsys)
    assert code == 0 and not (tmp_path / "same" / "denoising.png").exists()  # nothing was denoised
    same = np.array(Image.open(tmp_path / "same" / "images" / "0001.png")).astype(int)
    assert np.abs(same - np.array(Image.open(tmp_path / "same" / "input.png")).astype(int)).max() <= 1

    code, out = _run_cli(
        [
            "sample",
            *common,
            "--out",
            tmp_path / "fill",
            "--init-image",
            car,
            "--mask",
            tmp_path / "mask.png",
            "--resample-jumps",
            1,
            "--resample-every",
            3,
        ],
        capsys,
    )
    assert code == 0 and (tmp_path / "fill" / "masked.png").exists()
    given = Image.open(tmp_path / "fill" / "input.png").convert("RGB")
    for name in ("0000.png", "0002.png"):  # the kept upper half, to the pixel
        filled = Image.open(tmp_path / "fill" / "images" / name).convert("RGB")
        upper = [(given.getpixel((x, y)), filled.getpixel((x, y))) for x in range(16) for y in range(8)]
        assert all(max(abs(p - q) for p, q in zip(a, b)) <= 1 for a, b in upper)

    code, out = _run_cli(
        [
            "sample",
            "--checkpoint",
            tiny_run,
            "--steps",
            10,
            "--out",
            tmp_path / "lerp",
            "--interpolate",
            1,
            2,
            "--frames",
            4,
        ],
        capsys,
    )
    assert code == 0 and "ddim, 10 steps (karras)" in out.out  # the tiny recipe samples with ddpm
    gif = Image.open(tmp_path / "lerp" / "interpolation.gif")
    assert gif.n_frames == 4 + 2  # there and back
    plain = tmp_path / "plain"
    assert (
        _run_cli(
            [
                "sample",
                "--checkpoint",
                tiny_run,
                "--steps",
                10,
                "--sampler",
                "ddim",
                "--spacing",
                "karras",
                "--num-images",
                1,
                "--seed",
                2,
                "--out",
                plain,
            ],
            capsys,
        )[0]
        == 0
    )
    last = torch.from_numpy(np.array(Image.open(tmp_path / "lerp" / "images" / "0003.png"))).float()
    seed_2 = torch.from_numpy(np.array(Image.open(plain / "images" / "0000.png"))).float()
    assert (last - seed_2).abs().max() <= 1

    code, out = _run_cli(
        [
            "sample",
            "--checkpoint",
            tiny_run,
            "--steps",
            10,
            "--out",
            tmp_path / "pair",
            "--interpolate-images",
            car,
            _png(tmp_path / "blue.png", colour=(30, 60, 200)),
            "--frames",
            3,
        ],
        capsys,
    )
    assert code == 0 and (tmp_path / "pair" / "interpolation.png").exists()


def _sampling_with(run: Path, copy: Path, **sample) -> Path:
    """A copy of ``run`` whose config.json samples with ``sample``."""
    shutil.copytree(run, copy)
    config = json.loads((copy / "config.json").read_text())
    config["sample"].update(sample)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_inpainting_a_run_that_samples_with_a_solver_falls_back_to_ancestral_sampling(tiny_run, tmp_path, capsys):
    """Heun cannot replace the known pixels after each step: with no sampler named, --mask
    draws what --sampler ddpm on 50 uniform steps draws, and says so; with --eta, DDIM."""
    run = _sampling_with(tiny_run, tmp_path / "heun", sampler="heun", steps=10, spacing="karras")
    car, mask = _png(tmp_path / "car.png"), _png(tmp_path / "mask.png", colour=(255, 255, 255))
    edit = ["--checkpoint", run, "--num-images", 2, "--init-image", car, "--mask", mask]
    code, out = _run_cli(["sample", *edit, "--out", tmp_path / "fill"], capsys)
    assert code == 0 and "(ddpm, 50 steps; the run samples with heun, which cannot inpaint;" in out.out, out
    code, named = _run_cli(
        ["sample", *edit, "--out", tmp_path / "named", "--sampler", "ddpm", "--steps", 50, "--spacing", "uniform"],
        capsys,
    )
    assert code == 0 and "cannot inpaint" not in named.out
    for name in ("0000.png", "0001.png"):
        assert (tmp_path / "fill" / "images" / name).read_bytes() == (tmp_path / "named" / "images" / name).read_bytes()
    code, out = _run_cli(["sample", *edit, "--out", tmp_path / "ten", "--steps", 10, "--eta", 0.5], capsys)
    assert code == 0 and "(ddim, 10 steps; the run samples with heun" in out.out, out
    code, out = _run_cli(["sample", *edit, "--out", tmp_path / "churn", "--churn", 20], capsys)
    assert code == 2 and "--churn is Heun's" in out.err and not (tmp_path / "churn").exists()


def test_inpainting_falls_back_to_every_step_of_a_schedule_shorter_than_50(tmp_path, tiny_config, capsys):
    train(tiny_config.replace(train={"max_steps": 1}, data={"toy_count": 16}), tmp_path / "run", progress=False)
    run = _sampling_with(tmp_path / "run", tmp_path / "dpm", sampler="dpm++", steps=5)  # T = 20
    car, mask = _png(tmp_path / "car.png"), _png(tmp_path / "mask.png", colour=(255, 255, 255))
    code, out = _run_cli(
        [
            "sample",
            "--checkpoint",
            run,
            "--num-images",
            1,
            "--init-image",
            car,
            "--mask",
            mask,
            "--out",
            tmp_path / "fill",
        ],
        capsys,
    )
    assert code == 0 and "(ddpm, 20 steps; the run samples with dpm++" in out.out, out


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--init-image", "{tmp}/car.png", "--mask", "{tmp}/small.png"], "must have the image's size"),
        (["--init-image", "{tmp}/notes.png"], "not an image"),
        (["--init-image", "{tmp}/missing.png"], "no such file"),
        (["--init-image", "{tmp}/car.png", "--strength", "1.5"], "--strength"),
        (["--init-image", "{tmp}/car.png", "--strength", "-0.5"], "--strength"),
        (["--interpolate", "1", "2", "--sampler", "ddpm"], "deterministic"),
        (["--interpolate", "1", "2", "--sampler", "ddim", "--eta", "1"], "deterministic"),
        (["--init-image", "{tmp}/car.png", "--mask", "{tmp}/car.png", "--sampler", "dpm++"], "ddpm or ddim"),
        (["--mask", "{tmp}/car.png"], "needs --init-image"),
        (["--init-image", "{tmp}/car.png", "--interpolate", "1", "2"], "separate uses"),
        (["--init-image", "{tmp}/car.png", "--resample-jumps", "2"], "need --mask"),
        (["--interpolate", "1", "2", "--frames", "1"], "--frames"),
    ],
)
def test_bad_editing_input_is_one_error_line(tiny_run, tmp_path, capsys, extra, needle):
    _png(tmp_path / "car.png")
    _png(tmp_path / "small.png", size=(20, 15))
    (tmp_path / "notes.png").write_text("not a picture")
    args = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    code, out = _run_cli(["sample", "--checkpoint", tiny_run, "--out", tmp_path / "out", "--steps", "5", *args], capsys)
    assert code == 2, out
    lines = [line for line in out.err.splitlines() if "error:" in line]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in out.err, out.err
    assert not (tmp_path / "out").exists()
