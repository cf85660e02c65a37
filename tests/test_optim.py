import math

import pytest
import torch

from ddpm_cars import run as ckpt
from ddpm_cars.config import TrainConfig
from ddpm_cars.denoiser import Denoiser
from ddpm_cars.models import build_model
from ddpm_cars.training import train
from ddpm_cars.training.optim import NonFiniteLossError, build_optimizer, gradients_usable, lr_factor, warmup_factor


def test_optimizer_choice():
    params = [torch.nn.Parameter(torch.zeros(2))]
    cpu = torch.device("cpu")
    assert type(build_optimizer(params, TrainConfig(), cpu)) is torch.optim.Adam
    adamw = build_optimizer(params, TrainConfig(optimizer="adamw", weight_decay=0.01, lr=3e-4), cpu)
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["fused"]  # one kernel, and a skip decided on the device
    assert adamw.param_groups[0]["weight_decay"] == 0.01 and adamw.param_groups[0]["lr"] == 3e-4


def test_warmup_is_a_linear_ramp():
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


def test_cosine_decay_follows_the_warm_up_down_to_zero_at_the_end():
    factors = [lr_factor(s, 2, "cosine", 10) for s in range(10)]
    assert factors[:2] == [0.5, 1.0]  # the warm-up, then the decay starts at 1
    expected = [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]
    assert factors[2:] == pytest.approx(expected) and factors[-1] == pytest.approx(0.0381, abs=1e-4)
    assert lr_factor(12, 2, "cosine", 10) == 0.0  # past the end (a run continued with more steps) it stays at 0
    assert [lr_factor(s, 2, "constant", 10) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_gradient_clipping_and_finiteness():
    model = torch.nn.Linear(3, 1)
    loss = (model(torch.full((1, 3), 100.0)) ** 2).sum()
    loss.backward()
    assert gradients_usable(model, loss, max_norm=1.0)
    norm = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))
    assert norm.item() == pytest.approx(1.0, rel=1e-4)
    assert not gradients_usable(model, torch.tensor(float("nan")), max_norm=None)
    model.weight.grad.fill_(float("inf"))
    assert not gradients_usable(model, torch.tensor(1.0), max_norm=1.0)


def test_warmup_sets_the_learning_rate_per_step(tmp_path, tiny_config):
    config = tiny_config.replace(train={"max_steps": 3, "warmup_steps": 10, "lr": 1e-3, "optimizer": "adamw"})
    train(config, tmp_path, progress=False)
    state = ckpt.load_train_state(ckpt.latest_checkpoint(tmp_path))
    assert state.optimizer["param_groups"][0]["lr"] == pytest.approx(1e-3 * 3 / 10)


def test_a_cosine_decay_run_ends_at_the_decayed_learning_rate(tmp_path, tiny_config):
    config = tiny_config.replace(train={"max_steps": 6, "warmup_steps": 2, "lr": 1e-3, "lr_schedule": "cosine"})
    train(config, tmp_path, progress=False)
    state = ckpt.load_train_state(ckpt.latest_checkpoint(tmp_path))  # the last step, 5, is 3/4 of the way down
    assert state.optimizer["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))


def test_a_cosine_schedule_continues_across_an_interruption_and_resume(tmp_path, tiny_config, monkeypatch):
    """SIGTERM during step 3 of 8, then --resume: the learning rate and the weights at the
    end are those of the run that was never stopped (bit for bit: every step's rate agreed)."""
    import os
    import signal

    from safetensors.torch import load_file

    from ddpm_cars.training.signals import TrainingInterrupted

    config = tiny_config.replace(
        train={
            "max_steps": 8,
            "epochs": 100,
            "warmup_steps": 2,
            "lr": 1e-3,
            "lr_schedule": "cosine",
            "sample_every_epochs": 100,
            "checkpoint_every_steps": 100,
        }
    )
    train(config, tmp_path / "straight", progress=False)
    real, calls = Denoiser.loss, []

    def loss(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop finishes this step, saves, stops
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Denoiser, "loss", loss)
    with pytest.raises(TrainingInterrupted):
        train(config, tmp_path / "split", progress=False)
    assert ckpt.load_train_state(ckpt.latest_checkpoint(tmp_path / "split")).step == 4
    monkeypatch.setattr(Denoiser, "loss", real)
    train(config, tmp_path / "split", resume=True, progress=False)
    ends = [ckpt.latest_checkpoint(tmp_path / d) for d in ("straight", "split")]
    expected = 1e-3 * 0.5 * (1 + math.cos(math.pi * 5 / 6))  # step 7: 5 of the 6 steps after the warm-up
    assert [ckpt.load_train_state(e).optimizer["param_groups"][0]["lr"] for e in ends] == [pytest.approx(expected)] * 2
    a, b = (load_file(e / "model.safetensors") for e in ends)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _nan_on(steps: set[int], monkeypatch):
    real = Denoiser.loss
    calls = {"n": 0}

    def maybe_nan(self, *args, **kwargs):
        calls["n"] += 1
        loss = real(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] in steps else loss

    monkeypatch.setattr(Denoiser, "loss", maybe_nan)


def test_a_non_finite_loss_skips_the_update_and_is_counted(tmp_path, tiny_config, monkeypatch):
    config = tiny_config.replace(train={"max_steps": 4, "epochs": 100, "sample_every_epochs": 100})
    _nan_on({2, 3}, monkeypatch)
    train(config, tmp_path, progress=False, final_grid=False)
    state = ckpt.load_train_state(ckpt.latest_checkpoint(tmp_path))
    assert state.step == 4 and state.skipped_steps == 2
    assert int(state.optimizer["state"][0]["step"]) == 2  # only two updates were applied
    weights = ckpt.load_weights(build_model(config), ckpt.latest_checkpoint(tmp_path)).state_dict()
    assert all(torch.isfinite(v.float()).all() for v in weights.values())


@pytest.mark.parametrize("log_every, stop_step", [(1, 4), (5, 5)])
def test_a_persistently_non_finite_loss_stops_with_a_clear_error(
    tmp_path, tiny_config, monkeypatch, log_every, stop_step
):
    """The streak is counted when the losses are read: at once with --log-every 1, at the next read otherwise."""
    config = tiny_config.replace(
        data={"toy_count": 256},
        train={
            "max_steps": 50,
            "epochs": 100,
            "max_nonfinite_steps": 3,
            "log_every_steps": log_every,
            "checkpoint_every_steps": 100,
        },
    )
    _nan_on(set(range(2, 100)), monkeypatch)
    with pytest.raises(NonFiniteLossError, match=f"{stop_step - 1} steps in a row"):
        train(config, tmp_path, progress=False)
    state = ckpt.load_train_state(ckpt.latest_checkpoint(tmp_path))
    assert state.step == stop_step and state.skipped_steps == stop_step - 1
    assert int(state.optimizer["state"][0]["step"]) == 1  # saved, with the weights of step 1


def test_loss_curve_ignores_skipped_steps(tmp_path):
    from ddpm_cars.viz import moving_average, save_loss_curve

    assert moving_average([0.3] * 500) == pytest.approx([0.3] * 500)  # bias-corrected: no lag at the start
    smooth = moving_average([1.0] * 100 + [0.0] * 100)
    assert smooth[99] == pytest.approx(1.0) and 0 < smooth[120] < 1 and smooth[-1] < 0.01
    path = save_loss_curve([1, 2, 3, 4], [0.5, float("nan"), 0.4, 0.3], tmp_path / "loss.png", "l1")
    assert path.stat().st_size > 1000
