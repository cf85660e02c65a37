"""``ddpm-cars distill``: a round lowers the student's error against its teacher, a resumed
distillation equals an uninterrupted one, and the student is an ordinary run."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddpm_cars import cli
from ddpm_cars import run as ckpt
from ddpm_cars.config import DistillConfig, ModelConfig
from ddpm_cars.denoiser import Denoiser
from ddpm_cars.distillation import ddim_jump, student_steps
from ddpm_cars.models import build_model
from ddpm_cars.run import Run
from ddpm_cars.training import distill as distill_module
from ddpm_cars.training import train
from ddpm_cars.training.distill import distill, student_config, student_weights
from ddpm_cars.training.logs import read_loss_log


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny v-prediction run with a learned variance (its output has 6 channels), trained a few steps."""
    from ddpm_cars.config import DataConfig, DiffusionConfig, RunConfig, SampleConfig, TrainConfig

    config = RunConfig(
        model=ModelConfig(
            name="res_attn_unet", channels=(16, 32), num_res_blocks=1, attention_resolutions=(), head_channels=16
        ),
        diffusion=DiffusionConfig(timesteps=40, schedule="cosine", loss="l2", prediction="v", learn_variance=True),
        data=DataConfig(source="toy-cars", image_size=16, toy_count=64),
        train=TrainConfig(
            batch_size=16, max_steps=12, optimizer="adamw", lr=2e-3, ema_decay=0.9, sample_every_epochs=100
        ),
        sample=SampleConfig(num_images=4),
    )
    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    train(config, run_dir, progress=False, final_grid=False)
    return run_dir


def _settings(teacher: Path, **fields) -> DistillConfig:
    return DistillConfig(teacher=str(teacher), **{"calls": 2, "teacher_calls": 8, "round_steps": 6, **fields})


def _student(run_dir: Path, file: Path | None = None) -> Denoiser:
    opened = Run.open(run_dir)
    net = build_model(opened.config)
    net.load_state_dict(load_file(str(file or ckpt.latest_checkpoint(run_dir) / ckpt.MODEL_FILE)))
    return Denoiser.for_run(net.eval(), opened.config)


def _two_step_error(student: Denoiser, teacher: Denoiser, calls: int) -> float:
    """Mean squared distance between the student's one DDIM step and the teacher's two, from
    the same z_t at every student step, on images and noise the distillation never drew."""
    g = torch.Generator().manual_seed(123)
    steps = student_steps(teacher.schedule.timesteps, calls)
    k = torch.arange(calls).repeat(8)
    x0 = torch.rand(len(k), 3, 16, 16, generator=g) * 2 - 1
    abar = teacher.schedule.alphas_cumprod[steps.t[k]].view(-1, 1, 1, 1)
    z = abar.sqrt() * x0 + (1 - abar).sqrt() * torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        two = ddim_jump(
            teacher, ddim_jump(teacher, z, steps.t[k], steps.mid[k], None), steps.mid[k], steps.next[k], None
        )
        one = ddim_jump(student, z, steps.t[k], steps.next[k], None)
    return (one - two).square().mean().item()


def test_student_config_samples_on_its_calls_with_one_output_per_channel(teacher):
    theirs = Run.open(teacher).config
    ours = student_config(theirs, _settings(teacher, calls=4, teacher_calls=16, round_steps=7))
    assert (ours.sample.sampler, ours.sample.steps, ours.sample.spacing, ours.sample.eta) == ("ddim", 4, "trailing", 0)
    assert ours.diffusion.prediction == "v" and not ours.diffusion.learn_variance
    assert ours.train.max_steps == 2 * 7 and ours.train.ema_decay is None
    assert ours.model == theirs.model and ours.diffusion.schedule == theirs.diffusion.schedule
    teacher_net, student_net = build_model(theirs), build_model(ours)
    weights = student_weights(teacher_net.state_dict(), student_net)
    student_net.load_state_dict(weights)  # strict: every tensor fits
    changed = [k for k, v in teacher_net.state_dict().items() if v.shape != weights[k].shape]
    assert len(changed) == 2  # the output convolution's weight and bias: the mean's 3 of 6 channels
    for k in changed:
        assert torch.equal(weights[k], teacher_net.state_dict()[k][:3])


def test_one_round_lowers_the_students_error_against_the_teachers_two_steps(teacher, tmp_path):
    out = tmp_path / "student"
    distill(out, _settings(teacher, calls=2, teacher_calls=4, round_steps=40, lr=1e-3), progress=False)
    first = distill_module.Rounds(
        distill_module.load_settings(out / "distill.json"),
        Run.open(teacher).config,
        Run.open(out).config,
        out,
        "cpu",
        "fp32",
    ).first
    start = Denoiser.for_run(
        build_model(Run.open(out).config).eval(), Run.open(out).config
    )  # the student before the round: the teacher's weights
    start.network.load_state_dict(student_weights(first.network.state_dict(), start.network))
    before, after = _two_step_error(start, first, 2), _two_step_error(_student(out), first, 2)
    assert after < 0.5 * before, (before, after)
    assert (out / "students" / "calls_0002.safetensors").is_file() and (out / "samples" / "calls_0002.png").is_file()
    assert (out / "loss.png").is_file() and len(read_loss_log(out / "loss.csv", 10**9)) == 40


class _StopAfter:
    """A StopRequest whose Ctrl-C arrives once ``steps`` steps are done."""

    limit = 0
    position = None

    def __init__(self):
        self.signum = None

    @property
    def requested(self) -> bool:
        return _StopAfter.position is not None and _StopAfter.position.step >= _StopAfter.limit

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


@pytest.mark.parametrize("stop_at", [6, 8])  # at the end of the first round; in the middle of the second
def test_a_resumed_distillation_equals_an_uninterrupted_one(teacher, tmp_path, monkeypatch, stop_at):
    settings = _settings(teacher, checkpoint_every=100)
    distill(tmp_path / "straight", settings, progress=False)

    original_run = distill_module._Loop.run

    def run(self, bar, stop):
        _StopAfter.position = self.position
        return original_run(self, bar, stop)

    _StopAfter.limit = stop_at
    with monkeypatch.context() as patch:  # only these two: the fixtures' own patches stay
        patch.setattr(distill_module, "StopRequest", _StopAfter)
        patch.setattr(distill_module._Loop, "run", run)
        with pytest.raises(KeyboardInterrupt):
            distill(tmp_path / "split", settings, progress=False)
    assert ckpt.load_train_state(ckpt.latest_checkpoint(tmp_path / "split")).step == stop_at
    distill(tmp_path / "split", progress=False)  # --resume
    for name in ("checkpoints/step_00000012/model.safetensors", "students/calls_0004.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "split" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    loss = read_loss_log(tmp_path / "straight" / "loss.csv", 99)
    assert loss == read_loss_log(tmp_path / "split" / "loss.csv", 99) and len(loss) == 12


def test_the_student_is_a_run_that_samples_on_its_calls(teacher, tmp_path, capsys):
    out = tmp_path / "student"
    code = cli.main(
        ["distill", "--checkpoint", str(teacher), "--out", str(out), "--calls", "1", "--teacher-calls", "4",
         "--round-steps", "2", "--batch-size", "8"]
    )  # fmt: skip
    assert code == 0
    assert json.loads((out / "distill.json").read_text())["calls"] == 1
    assert "Distilled to 1 network call " in capsys.readouterr().out
    assert cli.main(["sample", "--checkpoint", str(out), "--out", str(tmp_path / "s"), "--num", "3"]) == 0
    assert "ddim, 1 steps (trailing)" in capsys.readouterr().out
    assert len(list((tmp_path / "s" / "images").glob("*.png"))) == 3
    assert cli.main(["distill", "--out", str(out), "--resume"]) == 0  # nothing left to do


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--calls", "3"], "--teacher-calls must be --calls times a power of two"),
        (["--calls", "4", "--teacher-calls", "24"], "--teacher-calls must be --calls times a power of two"),
        (["--teacher-calls", "32", "--calls", "2"], "more than half the run's 40 training steps"),
        (["--resume"], "drop --checkpoint"),
    ],
)
def test_bad_requests_are_one_line_errors(teacher, tmp_path, capsys, argv, message):
    code = cli.main(["distill", "--checkpoint", str(teacher), "--out", str(tmp_path / "s"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_resume_and_train_refuse_what_they_cannot_continue(teacher, tmp_path, capsys):
    assert cli.main(["distill", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert cli.main(["distill", "--out", str(tmp_path / "s")]) == 2
    assert "--checkpoint RUN is required" in capsys.readouterr().err
    out = tmp_path / "student"
    distill(out, _settings(teacher, calls=2, teacher_calls=4, round_steps=1), progress=False)
    assert cli.main(["train", "--out", str(out), "--resume"]) == 2
    assert "distill --resume" in capsys.readouterr().err
    with pytest.raises(ValueError, match="already holds checkpoints"):
        distill(out, _settings(teacher, calls=2, teacher_calls=4, round_steps=1), progress=False)


def test_editing_and_export_refuse_a_student_in_one_line(teacher, tmp_path, capsys):
    out = tmp_path / "student"
    distill(out, _settings(teacher, calls=2, teacher_calls=4, round_steps=1), progress=False)
    image = tmp_path / "car.png"
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 30, 30)).save(image)
    for argv in (
        ["sample", "--checkpoint", str(out), "--out", str(tmp_path / "v"), "--init-image", str(image)],
        [
            "sample",
            "--checkpoint",
            str(out),
            "--out",
            str(tmp_path / "i"),
            "--interpolate-images",
            str(image),
            str(image),
        ],
        ["export", str(out), str(tmp_path / "exported")],
    ):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "is a distilled student" in err and len(err.strip().splitlines()) == 1, err
    assert cli.main(["sample", "--checkpoint", str(out), "--out", str(tmp_path / "seeds"), "--interpolate", "0", "1",
                     "--frames", "3"]) == 0  # fmt: skip


def test_a_class_conditional_run_distils_both_of_its_models(teacher, tmp_path, capsys, monkeypatch):
    conditional = Run.open(teacher).config.replace(
        model={"class_conditional": True}, train={"label_dropout": 0.5, "max_steps": 4, "ema_decay": None}
    )
    run_dir = tmp_path / "conditional"
    train(conditional, run_dir, progress=False, final_grid=False)
    seen = []
    original = distill_module.teacher_target

    def spy(teacher, z_t, steps, k, y=None):
        seen.append(y.clone())
        return original(teacher, z_t, steps, k, y)

    monkeypatch.setattr(distill_module, "teacher_target", spy)
    out = tmp_path / "student"
    distill(out, _settings(run_dir, calls=2, teacher_calls=4, round_steps=4), progress=False)
    labels = torch.cat(seen)
    null = len(Run.open(run_dir).config.model.class_names)
    assert (labels == null).any() and (labels < null).any()  # the unconditional model is taught too
    assert Run.open(out).config.model.class_names == Run.open(run_dir).config.model.class_names
    code = cli.main(
        ["sample", "--checkpoint", str(out), "--out", str(tmp_path / "s"), "--class", "sedan", "--num", "2"]
    )
    assert code == 0 and "guidance" in capsys.readouterr().out
