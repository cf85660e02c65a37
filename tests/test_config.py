import json

import pytest

from ddpm_cars.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig, TrainConfig
from ddpm_cars.errors import UserError
from ddpm_cars.presets import DEFAULT_PRESET, DEMO, IMPROVED, PRESETS, SEED, preset


def test_seed_preset_is_the_original_recipe():
    assert SEED.model.channels == (64, 128, 256, 512, 1024) and SEED.model.time_emb_dim == 32
    assert (SEED.diffusion.timesteps, SEED.diffusion.beta_start, SEED.diffusion.beta_end) == (1000, 1e-4, 0.02)
    assert SEED.diffusion.loss == "l1"
    assert (SEED.train.lr, SEED.train.batch_size, SEED.train.sample_every_epochs) == (1e-3, 128, 5)
    assert SEED.data.image_size == 64 and SEED.data.flip


def test_improved_preset_is_the_default_and_the_published_recipe():
    assert DEFAULT_PRESET == "improved" and PRESETS["improved"] is IMPROVED
    m, d, t = IMPROVED.model, IMPROVED.diffusion, IMPROVED.train
    assert m.name == "res_attn_unet" and m.attention_resolutions == (16, 8) and m.head_channels == 64
    assert m.resblock_updown and m.dropout > 0
    assert (d.schedule, d.loss, d.prediction, d.learn_variance, d.vlb_weight) == ("cosine", "l2", "eps", True, 0.001)
    assert (t.optimizer, t.grad_clip, t.ema_decay, t.precision) == (
        "adamw",
        1.0,
        0.9999,
        "auto",
    )  # bf16 on GPUs with it
    assert d.out_channels(3) == 6 and SEED.diffusion.out_channels(3) == 3 and d.out_channels(1) == 2


def test_json_round_trip(tmp_path):
    for config in PRESETS.values():
        config.save(tmp_path / "c.json")
        assert RunConfig.load(tmp_path / "c.json") == config
    DEMO.save(tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text())["model"]["channels"] == list(DEMO.model.channels)


def test_replace_overrides_one_field():
    changed = SEED.replace(train={"lr": 2e-4})
    assert changed.train.lr == 2e-4 and changed.train.batch_size == 128 and SEED.train.lr == 1e-3


def test_improved_preset_samples_20_respaced_steps_or_all_of_a_shorter_schedule():
    assert (IMPROVED.sample.sampler, IMPROVED.sample.steps, IMPROVED.sample.spacing) == ("dpm++sde", 20, "karras")
    assert SEED.sample.steps is None  # the seed's Algorithm 2 visits all 1,000 steps
    assert IMPROVED.replace(diffusion={"timesteps": 12}).sample.steps is None  # 20 is a cap: all 12
    assert IMPROVED.replace(diffusion={"timesteps": 20}).sample.steps == 20
    assert IMPROVED.replace(diffusion={"timesteps": 12}, sample={"steps": 8}).sample.steps == 8
    with pytest.raises(UserError, match="sample.steps \\(60\\) cannot exceed the 12"):
        IMPROVED.replace(diffusion={"timesteps": 12}, sample={"steps": 60})  # asked for: still an error


@pytest.mark.parametrize(
    "given, reads, refusal",
    [
        (
            {"eta": 0.5},
            {"sampler": "ddim"},
            "--eta is read only with --sampler ddim, and the sampler here is dpm\\+\\+sde",
        ),
        ({"ddim_sigma": "learned"}, {"sampler": "ddim"}, "--ddim-sigma is read only with --sampler ddim"),
        ({"churn": 20.0}, {"sampler": "heun"}, "--churn is read only with --sampler heun"),
        (
            {"sigma_max": 20.0, "spacing": "uniform"},
            {"spacing": "logsnr"},
            "--sigma-max is read only with --spacing karras or logsnr, and the spacing here is uniform",
        ),
    ],
)
def test_an_option_the_sampler_does_not_read_is_refused_when_given(given, reads, refusal):
    with pytest.raises(UserError, match=refusal):
        IMPROVED.replace(sample=given)  # the improved preset samples with dpm++sde on karras steps
    read = IMPROVED.replace(sample={**given, **reads}).sample
    assert all(getattr(read, name) == value for name, value in {**given, **reads}.items())
    # kept from the run, not given: a run trained with heun's churn samples with ddpm without complaint
    churned = IMPROVED.replace(sample={"sampler": "heun", "churn": 20.0})
    assert churned.replace(sample={"sampler": "ddpm"}).sample.churn == 20.0


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: TrainConfig(batch_size=0), "train.batch_size"),
        (lambda: TrainConfig(lr=-1.0), "train.lr"),
        (lambda: DataConfig(image_size=8), "data.image_size"),
        (lambda: DataConfig(split="val"), "data.split"),
        (lambda: ModelConfig(channels=(64,)), "model.channels"),
        (lambda: RunConfig(data=DataConfig(image_size=40)), "divisible by 16"),
        (lambda: preset("huge"), "available: improved, seed, demo, tiny"),
        (lambda: ModelConfig(dropout=1.0), "model.dropout"),
        (lambda: ModelConfig(num_res_blocks=0), "model.num_res_blocks"),
        (lambda: ModelConfig(attention_resolutions=(16, 0)), "model.attention_resolutions"),
        (lambda: DiffusionConfig(prediction="score"), "diffusion.prediction"),
        (lambda: TrainConfig(precision="fp8"), "train.precision"),
        (lambda: TrainConfig(batch_size=12, grad_accum_steps=5), "divisible by train.grad_accum_steps"),
        (lambda: RunConfig.from_dict({"trian": {}}), "unknown config sections"),
        (lambda: RunConfig.from_dict({"train": {"learning_rate": 1}}), "unknown train options"),
        (lambda: DataConfig(crop="square"), "data.crop"),
        (lambda: DataConfig(bbox_margin=-0.1), "data.bbox_margin"),
        (lambda: TrainConfig(label_dropout=1.0), "train.label_dropout"),
        (lambda: ModelConfig(class_names=("a", "b")), "only for a class-conditional model"),
        (lambda: ModelConfig(class_conditional=True, class_names=("a", "a")), "distinct"),
    ],
)
def test_bad_values_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_configs_from_before_the_crop_choice_still_load():
    old = SEED.to_dict()
    del old["data"]["crop"]
    for flag, crop in [(True, "center"), (False, "none")]:
        old["data"]["center_crop"] = flag
        assert RunConfig.from_dict(old).data.crop == crop


def test_configs_from_before_the_lr_schedule_name_still_load():
    old = SEED.to_dict()
    del old["train"]["lr_schedule"]
    for decay, schedule in [("none", "constant"), ("cosine", "cosine")]:
        old["train"]["lr_decay"] = decay
        assert RunConfig.from_dict(old).train.lr_schedule == schedule


def test_class_names_round_trip_through_json(tmp_path):
    config = SEED.replace(model={"class_conditional": True, "class_names": ("BMW M3 Coupe 2012", "Audi R8 Coupe 2012")})
    config.save(tmp_path / "c.json")
    loaded = RunConfig.load(tmp_path / "c.json")
    assert loaded == config and loaded.model.num_classes == 2


def test_unreadable_config_file(tmp_path):
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read config"):
        RunConfig.load(tmp_path / "c.json")


def test_image_channels_default_to_auto_and_a_run_saved_before_them_loads_as_three(tmp_path):
    assert DataConfig().image_channels == "auto" and RunConfig().image_channels == 3  # not yet read from data
    assert RunConfig(data=DataConfig(image_channels="1")).image_channels == 1
    old = RunConfig().to_dict()
    del old["data"]["image_channels"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert RunConfig.load(tmp_path / "config.json", saved_run=True).data.image_channels == "3"
    assert RunConfig.load(tmp_path / "config.json").data.image_channels == "auto"  # a recipe: read from the data
    assert RunConfig.from_dict({}, saved_run=True).image_channels == 3
    hand = RunConfig.from_dict({"data": {"image_channels": 1}})  # a number written by hand
    assert hand.data.image_channels == "1"
    with pytest.raises(UserError, match="data.image_channels"):
        RunConfig.from_dict({"data": {"image_channels": "2"}})


def test_an_auto_channel_count_differs_from_no_other_but_one_and_three_differ():
    auto, grey, rgb = (RunConfig(data=DataConfig(image_channels=c)) for c in ("auto", "1", "3"))
    assert auto.network_differences(grey) == [] and rgb.network_differences(auto) == []
    assert grey.network_differences(rgb) == [("data.image_channels", "1", "3")]
