"""The diffusers format: our network as UNet2DModel, a run as a DDPMPipeline, and back."""

import json
import re
import shutil

import pytest
import torch

from ddpm_cars import run as ckpt
from ddpm_cars.cli import main
from ddpm_cars.data.dataset import ImageSet
from ddpm_cars.errors import UserError
from ddpm_cars.generation import QUIET, generate
from ddpm_cars.models import build_model
from ddpm_cars.presets import TINY
from ddpm_cars.run import Run
from ddpm_cars.training import train

diffusers = pytest.importorskip("diffusers")
from ddpm_cars.export import (  # noqa: E402
    check_exportable,
    config_from_diffusers,
    export_run,
    from_unet,
    import_pipeline,
    to_unet,
    unet_config,
)

VARIANTS = {
    "plain": {},
    "biggan resampling, v": {"model": {"resblock_updown": True}, "diffusion": {"prediction": "v"}},
    "class-conditional": {"model": {"class_conditional": True, "class_names": ("coupe", "sedan", "suv")}},
    "grayscale": {"data": {"image_channels": "1"}},
    "grayscale, fixed variance": {"data": {"image_channels": "1"}, "diffusion": {"learn_variance": False}},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_unet2dmodel_twin_computes_what_ours_computes(variant):
    """Random weights everywhere (the zero-initialised layers would hide a wrong mapping)."""
    config = TINY.replace(**VARIANTS[variant])
    torch.manual_seed(0)
    ours = build_model(config).eval()
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.05)
    unet = to_unet(ours, config)
    x, t = torch.randn(3, config.image_channels, 16, 16), torch.tensor([0, 41, 99])
    y = torch.tensor([0, 2, 3]) if config.model.class_conditional else None  # 3: the null class
    expected = ours(x, t, y)
    got = unet(x, t, class_labels=y).sample
    assert got.shape == expected.shape and (got - expected).abs().max() < 1e-5
    back = from_unet(unet, config)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values()))


@pytest.fixture(scope="module", params=["plain", "biggan resampling, v"])
def trained(request, tmp_path_factory):
    """A tiny improved-recipe run of 4 steps (learned variance, cosine schedule, EMA)."""
    run = tmp_path_factory.mktemp("run") / "tiny"
    config = TINY.replace(
        **VARIANTS[request.param], data={"toy_count": 64}, train={"max_steps": 4, "sample_every_epochs": 100}
    )
    train(config, run, progress=False)
    return run


def test_ddpm_pipeline_draws_what_sample_draws(trained, tmp_path):
    """An independent implementation agreeing with ours: diffusers' DDPMPipeline on the
    export, from the same x_T and the same noise at every step (one generator, one image),
    ends within 1e-4 of generate() on all 100 steps with the learned variance."""
    out = export_run(trained, tmp_path / "export")
    pipeline = diffusers.DDPMPipeline.from_pretrained(str(out))
    assert pipeline.scheduler.config.variance_type == "learned_range"
    theirs = pipeline(
        batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=100, output_type="np"
    ).images  # [1, H, W, 3] in [0, 1]
    run = Run.open(trained)
    ours = generate(run.denoiser(ema=True), 1, run.config.sample, seed=0, watch=QUIET)  # image 0: seed 0's generator
    assert run.config.sample.steps is None  # all T: the pipeline's 100 steps
    theirs = torch.from_numpy(theirs).permute(0, 3, 1, 2) * 2 - 1
    assert (theirs - ours).abs().max() < 1e-4, (theirs - ours).abs().max()


def test_an_import_of_the_export_samples_the_same_images(trained, tmp_path):
    out = export_run(trained, tmp_path / "export")
    imported = import_pipeline(out, tmp_path / "back")
    a, b = Run.open(trained), Run.open(imported)
    assert a.config == b.config
    cfg = a.config.sample
    assert torch.equal(
        generate(a.denoiser(), 3, cfg, seed=5, watch=QUIET), generate(b.denoiser(), 3, cfg, seed=5, watch=QUIET)
    )
    notes = ckpt.init_weights(build_model(a.config), imported, a.config)  # train --init-from takes it
    assert notes[0].startswith("Starting from")


def test_the_model_card_says_what_was_trained(trained, tmp_path):
    scores = {"sampler": "ddpm", "steps": 50, "num_samples": 144, "reference": "64 images", "metrics": {"swd": 71.8}}
    (trained / "eval").mkdir(exist_ok=True)
    (trained / "eval" / "metrics.json").write_text(json.dumps(scores))
    out = export_run(trained, tmp_path / "export")
    card = (out / "README.md").read_text()
    assert "144 samples, ddpm on 50 steps, against 64 images" in card and "| swd | 71.8 |" in card
    assert (
        "library_name: diffusers" in card
        and "trained with" in card
        and "for 4 steps" in card
        and "cosine schedule" in card
    )
    assert (out / "samples.png").is_file() and "![samples](samples.png)" in card
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index["unet"] == ["diffusers", "UNet2DModel"]


def test_the_command_line_exports_and_imports_and_refuses_in_one_line(trained, tmp_path, capsys, tiny_config):
    assert main(["export", str(trained), str(tmp_path / "out")]) == 0
    assert "DDPMPipeline.from_pretrained" in capsys.readouterr().out
    assert main(["export", str(trained), str(tmp_path / "out")]) == 2  # not empty
    (tmp_path / "file").write_text("x")
    assert main(["export", str(trained), str(tmp_path / "file")]) == 2  # not a folder
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "out"), "--out", str(tmp_path / "run")]) == 0
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(tmp_path / "run"),
                "--out",
                str(tmp_path / "s"),
                "--num",
                "2",
                "--steps",
                "5",
            ]
        )
        == 0
    )
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--steps", "9"]) == 2
    assert "no optimizer state (an imported run)" in capsys.readouterr().err
    seed_run = tmp_path / "seed"
    train(tiny_config.replace(train={"max_steps": 1}), seed_run, progress=False, final_grid=False)
    capsys.readouterr()
    assert main(["export", str(seed_run), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only the res_attn_unet network can be exported" in err[0]
    assert main(["import", str(tmp_path), "--out", str(tmp_path / "y")]) == 2
    assert "cannot read a diffusers UNet2DModel and scheduler in" in capsys.readouterr().err  # not such a folder


def test_networks_without_an_exact_twin_are_refused():
    with pytest.raises(UserError, match="multiples of 32"):
        check_exportable(TINY.replace(model={"channels": (16, 32)}))
    with pytest.raises(UserError, match="multiple of --head-channels 64"):
        check_exportable(TINY.replace(model={"channels": (32, 96), "head_channels": 64}))


def _pipeline_and_ours(folder, run):
    """Image 0 of seed 0 from diffusers' DDPMPipeline and from generate(), both in [-1, 1]."""
    pipeline = diffusers.DDPMPipeline.from_pretrained(str(folder))
    steps = pipeline.scheduler.config.num_train_timesteps
    theirs = pipeline(
        batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=steps, output_type="np"
    ).images
    opened = Run.open(run)
    ours = generate(opened.denoiser(ema=True), 1, opened.config.sample, seed=0, watch=QUIET)
    return torch.from_numpy(theirs).permute(0, 3, 1, 2) * 2 - 1, ours


def test_a_diffusers_model_made_elsewhere_imports_when_it_has_a_twin(tmp_path):
    """A UNet2DModel and a DDPMScheduler built by diffusers alone (their own initialisation,
    the squaredcos_cap_v2 betas diffusers computes, no ddpm_cars.json): the imported run
    samples what the pipeline samples."""
    torch.manual_seed(3)
    unet = diffusers.UNet2DModel(**unet_config(TINY))
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=50,
        beta_schedule="squaredcos_cap_v2",
        variance_type="learned_range",
        prediction_type="v_prediction",
    )
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(tmp_path / "theirs"))
    run = import_pipeline(tmp_path / "theirs", tmp_path / "run")
    config = Run.open(run).config
    assert (config.diffusion.timesteps, config.diffusion.schedule, config.diffusion.prediction) == (50, "cosine", "v")
    theirs, ours = _pipeline_and_ours(tmp_path / "theirs", run)
    assert (theirs - ours).abs().max() < 1e-4


@pytest.mark.parametrize(
    "change, message",
    [
        ({"resnet_time_scale_shift": "default"}, "resnet_time_scale_shift='default'; ddpm-cars needs 'scale_shift'"),
        ({"flip_sin_to_cos": True}, "flip_sin_to_cos=True"),
        ({"down_block_types": ["DownBlock2D", "AttnSkipDownBlock2D"]}, "down_block_types"),
        ({"num_class_embeds": 10}, "only exports of ddpm-cars carry class names"),
        ({"up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D"]}, "up_block_types"),
        ({"norm_eps": 1e-6}, "norm_eps=1e-06; ddpm-cars needs 1e-05"),
    ],
)
def test_a_diffusers_model_without_a_twin_is_refused_naming_the_setting(change, message):
    scheduler = {
        "num_train_timesteps": 1000,
        "beta_schedule": "linear",
        "prediction_type": "epsilon",
        "variance_type": "learned_range",
    }
    with pytest.raises(UserError, match=message.replace("(", "\\(").replace("[", "\\[")):
        config_from_diffusers({**unet_config(TINY), **change}, scheduler)


# A tiny grayscale run: random weights (from a large learning rate, no EMA) so that a wrong
# mapping of the one-channel convolutions would show in the outputs.
GRAY = {"data": {"image_channels": "1"}, "train": {"max_steps": 2, "lr": 0.05, "warmup_steps": 0, "ema_decay": None}}


@pytest.fixture(scope="module", params=[True, False], ids=["learned variance", "fixed variance"])
def gray_run(request, tmp_path_factory):
    """A tiny res_attn_unet run of 2 steps on 16 one-channel 16x16 images."""
    run = tmp_path_factory.mktemp("gray") / "tiny"
    config = TINY.replace(
        data=GRAY["data"],
        diffusion={"learn_variance": request.param},
        train={**GRAY["train"], "batch_size": 8, "sample_every_epochs": 100},
    )
    images = torch.randint(0, 256, (16, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    dataset = ImageSet(images, torch.zeros(16, dtype=torch.long), ["car"])
    train(config, run, dataset=dataset, progress=False, final_grid=False)
    return run


def _same_outputs(a, b, config):
    """Whether networks ``a`` and ``b`` (ours or a UNet2DModel) agree on a fixed input."""
    x = torch.randn(2, config.image_channels, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 77])
    with torch.no_grad():
        outputs = [net.eval()(x, t) for net in (a, b)]
    outputs = [o if isinstance(o, torch.Tensor) else o.sample for o in outputs]
    assert outputs[0].abs().max() > 1e-2  # not the zero-initialised output layer
    return outputs[0].shape == outputs[1].shape and (outputs[0] - outputs[1]).abs().max() < 1e-5


def test_a_grayscale_run_exports_to_a_one_channel_pipeline(gray_run, tmp_path):
    run = Run.open(gray_run)
    learned = run.config.diffusion.learn_variance
    out = export_run(gray_run, tmp_path / "export")
    written = json.loads((out / "unet" / "config.json").read_text())
    assert (written["in_channels"], written["out_channels"]) == (1, 2 if learned else 1)
    assert "16x16 grayscale images" in (out / "README.md").read_text()
    pipeline = diffusers.DDPMPipeline.from_pretrained(str(out))
    assert _same_outputs(pipeline.unet, run.network(), run.config)
    arrays = pipeline(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=3, output_type="np")
    assert arrays.images.shape == (2, 16, 16, 1)
    images = pipeline(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=3).images
    assert [(im.mode, im.size) for im in images] == [("L", (16, 16))] * 2


def test_an_import_of_a_grayscale_export_has_its_channels_and_weights(gray_run, tmp_path):
    """Through ddpm_cars.json, and without it (the config read from diffusers' alone)."""
    run = Run.open(gray_run)
    out = export_run(gray_run, tmp_path / "export")
    shutil.copytree(out, tmp_path / "bare")
    (tmp_path / "bare" / "ddpm_cars.json").unlink()
    for folder, name in [(out, "back"), (tmp_path / "bare", "bare-back")]:
        back = Run.open(import_pipeline(folder, tmp_path / name))
        assert back.config.data.image_channels == "1" and back.config.image_channels == 1
        assert back.config.diffusion.learn_variance == run.config.diffusion.learn_variance
        assert all(
            torch.equal(a, b) for a, b in zip(run.network().state_dict().values(), back.network().state_dict().values())
        )
        assert _same_outputs(run.network(), back.network(), back.config)
    assert Run.open(tmp_path / "back").config == run.config


def test_an_export_whose_config_disagrees_with_its_unet_is_refused(gray_run, tmp_path):
    out = export_run(gray_run, tmp_path / "export")
    saved = json.loads((out / "ddpm_cars.json").read_text())
    saved["config"]["data"]["image_channels"] = "3"
    (out / "ddpm_cars.json").write_text(json.dumps(saved))
    with pytest.raises(UserError, match="input and .* output channels, the unet has 1 and") as refused:
        import_pipeline(out, tmp_path / "back")
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("learned", [True, False])
def test_a_one_channel_diffusers_config_imports_as_grayscale(learned):
    config = TINY.replace(data={"image_channels": "1"}, diffusion={"learn_variance": learned})
    scheduler = {
        "num_train_timesteps": 100,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "epsilon",
        "variance_type": "learned_range" if learned else "fixed_large",
    }
    back = config_from_diffusers(unet_config(config), scheduler)
    assert back.data.image_channels == "1" and back.diffusion.learn_variance == learned
    assert unet_config(back) == unet_config(config)


@pytest.mark.parametrize(
    "change, variance, message",
    [
        ({"in_channels": 2, "out_channels": 4}, "learned_range", "in_channels=2; ddpm-cars needs 3 (RGB) or 1"),
        ({"in_channels": 4, "out_channels": 4}, "fixed_small", "in_channels=4"),
        ({"in_channels": 1, "out_channels": 3}, "fixed_small", "out_channels=3; ddpm-cars needs 1 (its in_channels)"),
        ({"in_channels": 1, "out_channels": 6}, "learned_range", "or 2 with variance_type 'learned_range'"),
        ({"in_channels": 1, "out_channels": 2}, "fixed_small", "out_channels=2"),
        ({"in_channels": 1, "out_channels": 1}, "learned_range", "out_channels=1"),
        ({"in_channels": 3, "out_channels": 2}, "learned_range", "out_channels=2; ddpm-cars needs 3 (its in_channels)"),
        ({"in_channels": 3, "out_channels": 3}, "learned_range", "or 6 with variance_type 'learned_range'"),
    ],
)
def test_a_diffusers_config_of_other_channels_is_refused_in_one_line(change, variance, message):
    scheduler = {
        "num_train_timesteps": 1000,
        "beta_schedule": "linear",
        "prediction_type": "epsilon",
        "variance_type": variance,
    }
    with pytest.raises(UserError, match=re.escape(message)) as refused:
        config_from_diffusers({**unet_config(TINY), **change}, scheduler)
    assert "\n" not in str(refused.value)
