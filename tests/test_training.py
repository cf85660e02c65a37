import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ddpm_cars import run as ckpt
from ddpm_cars.config import RunConfig
from ddpm_cars.errors import UserError
from ddpm_cars.training import train
from ddpm_cars.training.batches import epoch_order, random_hflip
from ddpm_cars.training.logs import read_loss_log


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.latest_checkpoint(run_dir) / ckpt.MODEL_FILE))


def test_a_short_run_writes_everything(tmp_path, tiny_config):
    result = train(tiny_config, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert result.step == 8  # 2 epochs x (64 // 16) batches
    assert (run / "config.json").is_file() and (run / "loss.png").is_file()
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "epoch_0001.png",
        "epoch_0002.png",
    ]  # no duplicate final grid
    rows = list(csv.reader((run / "loss.csv").read_text().splitlines()))
    assert rows[0] == ["step", "loss"] and [int(r[0]) for r in rows[1:]] == list(range(1, 9))
    assert ckpt.latest_checkpoint(run).name == "step_00000008"
    assert ckpt.load_train_state(ckpt.latest_checkpoint(run)).epoch == 2


def test_loss_goes_down(tmp_path, tiny_config):
    config = tiny_config.replace(
        model={"channels": (16, 32), "time_emb_dim": 16},
        train={"max_steps": 150, "epochs": 100, "sample_every_epochs": 100, "checkpoint_every_steps": 100},
    )
    train(config, tmp_path, progress=False, final_grid=False)
    losses = [loss for _, loss in read_loss_log(tmp_path / "loss.csv", 10**9)]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:5]) / 5


def test_resumed_run_equals_uninterrupted_run(tmp_path, tiny_config):
    """Stop mid-epoch at step 6, resume to 10: same weights and losses as running 10 straight."""
    config = tiny_config.replace(
        train={"max_steps": 10, "epochs": 100, "checkpoint_every_steps": 100, "sample_every_epochs": 100}
    )
    train(config, tmp_path / "straight", progress=False)
    train(config.replace(train={"max_steps": 6}), tmp_path / "split", progress=False)
    assert ckpt.load_train_state(ckpt.latest_checkpoint(tmp_path / "split")).batch_in_epoch == 2
    train(config, tmp_path / "split", resume=True, progress=False)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert read_loss_log(tmp_path / "straight" / "loss.csv", 99) == read_loss_log(tmp_path / "split" / "loss.csv", 99)


def test_refuses_to_overwrite_or_resume_nothing(tmp_path, tiny_config):
    with pytest.raises(ValueError, match="nothing to resume"):
        train(tiny_config, tmp_path, resume=True, progress=False)
    train(tiny_config.replace(train={"max_steps": 3}), tmp_path, progress=False)
    with pytest.raises(ValueError, match="--resume"):
        train(tiny_config, tmp_path, progress=False)


def test_dataset_smaller_than_a_batch_is_an_error(tmp_path, tiny_config):
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(tiny_config.replace(data={"toy_count": 8}), tmp_path, progress=False)


def test_loss_log_drops_rows_past_the_checkpoint_and_garbage(tmp_path):
    (tmp_path / "loss.csv").write_text("step,loss\n1,0.5\n2,0.4\n3,0.3\n4,0.")
    assert read_loss_log(tmp_path / "loss.csv", 2) == [(1, 0.5), (2, 0.4)]
    (tmp_path / "loss.csv").write_text("step,loss\n1,0.5\n2,0.4\n3,0.3\n4,")
    assert read_loss_log(tmp_path / "loss.csv", 10) == [(1, 0.5), (2, 0.4), (3, 0.3)]


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    a = epoch_order(50, seed=1, epoch=3)
    assert sorted(a.tolist()) == list(range(50))
    assert torch.equal(a, epoch_order(50, 1, 3)) and not torch.equal(a, epoch_order(50, 1, 4))


def test_random_hflip_flips_about_half():
    x = torch.arange(4.0).view(1, 1, 1, 4).repeat(1000, 1, 1, 1)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = (out[:, 0, 0, 0] == 3).float().mean().item()
    assert 0.4 < flipped < 0.6
    assert all(torch.equal(o, x[0]) or torch.equal(o, x[0].flip(-1)) for o in out[:20])


def test_killed_right_after_a_checkpoint_loses_no_logged_step(tmp_path, tiny_config, monkeypatch):
    config = tiny_config.replace(
        train={"max_steps": 8, "epochs": 100, "checkpoint_every_steps": 3, "sample_every_epochs": 100}
    )
    real_save = ckpt.save_checkpoint

    def save_then_die(run_dir, model, state, *args, **kwargs):
        path = real_save(run_dir, model, state, *args, **kwargs)
        if state.step == 6:
            raise SystemExit("killed")
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die)
    with pytest.raises(SystemExit):
        train(config, tmp_path, progress=False)
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    train(config, tmp_path, resume=True, progress=False)
    assert [s for s, _ in read_loss_log(tmp_path / "loss.csv", 99)] == list(range(1, 9))


def test_resuming_with_an_unusable_rng_state_is_a_clear_error(tmp_path, tiny_config):
    train(tiny_config.replace(train={"max_steps": 2}), tmp_path, progress=False)
    state_file = ckpt.latest_checkpoint(tmp_path) / ckpt.STATE_FILE
    state = torch.load(state_file, weights_only=True)
    state["rng"] = torch.zeros(3, dtype=torch.uint8)  # what a generator of another device cannot take
    torch.save(state, state_file)
    with pytest.raises(ValueError, match="--device"):
        train(tiny_config, tmp_path, resume=True, progress=False)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_killed_or_interrupted_mid_run_then_resume(tmp_path, sig):
    """Kill -9, Ctrl-C or SIGTERM a training process mid-run; --resume finishes it from the last
    checkpoint, which for Ctrl-C and SIGTERM is written at the step the signal came in."""
    run = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "ddpm_cars",
        "train",
        "--out",
        str(run),
        "--data",
        "toy-cars",
        "--toy-count",
        "64",
        "--image-size",
        "16",
        "--channels",
        "8,16",
        "--time-emb-dim",
        "8",
        "--timesteps",
        "20",
        "--batch-size",
        "16",
        "--checkpoint-every",
        "2",
        "--sample-every",
        "1000",
        "--num-sample-images",
        "2",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen(args + ["--steps", "100000"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(ckpt.list_checkpoints(run)) < 2:
            time.sleep(0.05)
        proc.send_signal(sig)
        returncode = proc.wait(60)
    finally:
        proc.kill()
    assert returncode == {signal.SIGKILL: -9, signal.SIGINT: 130, signal.SIGTERM: 143}[sig]
    killed_at = ckpt.latest_checkpoint(run)
    assert killed_at is not None
    step = ckpt.load_train_state(killed_at).step
    if sig != signal.SIGKILL:  # a polite stop saves the step it stopped at, whatever --checkpoint-every says
        assert f"Interrupted: checkpoint saved at step {step};" in proc.stdout.read().decode()
    target = step + 4
    done = subprocess.run(
        args + ["--steps", str(target), "--resume"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert ckpt.load_train_state(ckpt.latest_checkpoint(run)).step == target
    steps = [s for s, _ in read_loss_log(run / "loss.csv", 10**9)]
    assert steps == list(range(1, target + 1))  # no step lost or logged twice


def test_cosine_schedule_trains_and_is_saved(tmp_path, tiny_config):
    config = tiny_config.replace(diffusion={"schedule": "cosine"}, train={"max_steps": 2})
    train(config, tmp_path, progress=False)
    assert RunConfig.load(tmp_path / "config.json").diffusion.schedule == "cosine"
    assert (tmp_path / "samples" / "final.png").is_file()


def _improved_tiny(tiny_config: RunConfig, **train_fields) -> RunConfig:
    """The improved recipe (GroupNorm, so per-image) shrunk to a few seconds."""
    return tiny_config.replace(
        model={
            "name": "res_attn_unet",
            "channels": (16, 32),
            "num_res_blocks": 1,
            "attention_resolutions": (8,),
            "head_channels": 16,
        },
        diffusion={"schedule": "cosine", "loss": "l2", "learn_variance": True},
        train={
            "max_steps": 3,
            "epochs": 100,
            "sample_every_epochs": 100,
            "checkpoint_every_steps": 100,
            "optimizer": "adamw",
            "lr": 1e-3,
            **train_fields,
        },
    )


def _first_gradients(monkeypatch, config: RunConfig, run_dir: Path) -> torch.Tensor:
    """The gradient of the first optimizer step of a run, before clipping, as one vector."""
    from ddpm_cars.training import loop

    seen = []
    original = loop.gradients_usable

    def record(model, loss, max_norm, **kwargs):
        if not seen:
            seen.append(torch.cat([p.grad.flatten().clone() for p in model.parameters()]))
        return original(model, loss, max_norm, **kwargs)

    monkeypatch.setattr(loop, "gradients_usable", record)
    train(config.replace(train={"max_steps": 1}), run_dir, progress=False, final_grid=False)
    return seen[0]


def test_gradient_accumulation_gives_the_same_gradient_and_loss(tmp_path, tiny_config, monkeypatch):
    """Two micro-batches of 8 give the gradient and logged loss of one batch of 16 (no BatchNorm here)."""
    config = _improved_tiny(tiny_config)
    whole = _first_gradients(monkeypatch, config, tmp_path / "whole")
    split = _first_gradients(monkeypatch, config.replace(train={"grad_accum_steps": 4}), tmp_path / "split")
    assert torch.allclose(whole, split, rtol=1e-4, atol=1e-6)
    (_, a), (_, b) = (read_loss_log(tmp_path / d / "loss.csv", 99)[0] for d in ("whole", "split"))
    assert a == pytest.approx(b, rel=1e-5)


def test_bf16_and_channels_last_train_close_to_fp32(tmp_path, tiny_config):
    config = _improved_tiny(tiny_config)
    train(config, tmp_path / "fp32", progress=False, final_grid=False)
    train(config.replace(train={"precision": "bf16", "channels_last": True}), tmp_path / "bf16", progress=False)
    (_, l32), (_, l16) = (read_loss_log(tmp_path / d / "loss.csv", 99)[0] for d in ("fp32", "bf16"))
    assert l16 == pytest.approx(l32, rel=0.05)  # the same first batch, at bfloat16 precision
    weights = _weights(tmp_path / "bf16")
    assert all(
        w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values()
    )  # master weights stay fp32
    assert (tmp_path / "bf16" / "samples" / "final.png").is_file()


def test_activation_checkpointing_gives_the_same_gradient(tmp_path, tiny_config, monkeypatch):
    config = _improved_tiny(tiny_config).replace(model={"dropout": 0.3})  # its draws are replayed in the recomputation
    plain = _first_gradients(monkeypatch, config, tmp_path / "plain")
    recomputed = _first_gradients(
        monkeypatch, config.replace(train={"activation_checkpointing": True}), tmp_path / "ckpt"
    )
    assert torch.equal(plain, recomputed)


def test_channels_last_gives_the_same_gradient(tmp_path, tiny_config, monkeypatch):
    config = _improved_tiny(tiny_config)
    nchw = _first_gradients(monkeypatch, config, tmp_path / "nchw")
    nhwc = _first_gradients(monkeypatch, config.replace(train={"channels_last": True}), tmp_path / "nhwc")
    assert torch.allclose(nchw, nhwc, rtol=1e-4, atol=1e-6)


def test_a_conditional_run_stores_its_class_names_and_resumes_only_on_them(tmp_path, tiny_config):
    from ddpm_cars.data import ImageSet, toy_cars_dataset

    config = tiny_config.replace(model={"class_conditional": True}, train={"max_steps": 2})
    train(config, tmp_path / "run", progress=False, final_grid=False)
    saved = RunConfig.load(tmp_path / "run" / "config.json")
    assert saved.model.class_names == ("sedan", "hatchback", "suv", "pickup", "sports", "van")
    assert "label_embed.table.weight" in _weights(tmp_path / "run")  # 6 classes + the null class
    assert _weights(tmp_path / "run")["label_embed.table.weight"].shape[0] == 7
    toys = toy_cars_dataset(64, 16)
    other = ImageSet(toys.images, toys.labels % 3, ["a", "b", "c"])
    with pytest.raises(ValueError, match="trained on 6 classes .* but the data has 3"):
        train(saved.replace(train={"max_steps": 4}), tmp_path / "run", resume=True, dataset=other, progress=False)
    result = train(
        saved.replace(train={"max_steps": 4}), tmp_path / "run", resume=True, progress=False, final_grid=False
    )
    assert result.step == 4


def test_each_sample_grid_is_tiled_once_for_its_file_and_the_tracker(tmp_path, tiny_config, monkeypatch):
    """The grid picture written to samples/NAME.png is the one the tracker gets: the samples
    are tiled once per grid, and the file holds exactly that picture."""
    from PIL import Image

    from ddpm_cars import viz
    from ddpm_cars.denoiser import Denoiser
    from ddpm_cars.models import build_model
    from ddpm_cars.training import loop
    from ddpm_cars.training.trackers import Tracker

    tiled = []

    def counting_grid_image(images, nrow=None):
        tiled.append(images.shape[0])
        return real_grid_image(images, nrow)

    real_grid_image = viz.grid_image
    for module in (viz, loop):
        monkeypatch.setattr(module, "grid_image", counting_grid_image, raising=False)

    class Recorder(Tracker):
        def __init__(self):
            self.images = []

        def image(self, name, step, grid):
            self.images.append((name, step, grid))

    tracker = Recorder()
    grids = loop.SampleGrids(tmp_path, tiny_config, tracker, enabled=True)
    denoiser = Denoiser.for_run(build_model(tiny_config), tiny_config)
    grids.draw("epoch_0001", denoiser, 4)
    grids.draw("final", denoiser, 8)
    assert tiled == [4, 4]  # one tiling per grid
    assert [(name, step) for name, step, _ in tracker.images] == [("samples", 4), ("samples", 8)]
    for (_, _, grid), file in zip(tracker.images, ["epoch_0001.png", "final.png"]):
        written = torch.from_numpy(np.array(Image.open(tmp_path / "samples" / file))).permute(2, 0, 1)
        assert torch.equal(written, grid)


def test_auto_channels_become_the_datas_and_a_named_count_must_match_it(tmp_path, tiny_config):
    from ddpm_cars.data import ImageSet, toy_cars_dataset
    from ddpm_cars.data.folder import luma

    toys = toy_cars_dataset(32, 16)
    grey = ImageSet(luma(toys.images), toys.labels, toys.class_names)
    config = tiny_config.replace(train={"max_steps": 1})
    train(config, tmp_path / "grey", dataset=grey, progress=False, final_grid=False)
    saved = RunConfig.load(tmp_path / "grey" / "config.json", saved_run=True)
    assert saved.data.image_channels == "1"
    weights = _weights(tmp_path / "grey")
    assert weights["conv0.weight"].shape[1] == 1 and weights["output.weight"].shape[0] == 1
    train(config, tmp_path / "rgb", progress=False, final_grid=False)
    assert RunConfig.load(tmp_path / "rgb" / "config.json").data.image_channels == "3"
    with pytest.raises(UserError, match="says 3 image channels .* but the data has 1"):
        train(config.replace(data={"image_channels": "3"}), tmp_path / "x", dataset=grey, progress=False)
