"""--log-with: TensorBoard event files and Weights & Biases runs, read back."""

import io
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_cars.denoiser import Denoiser
from ddpm_cars.errors import UserError
from ddpm_cars.training import train
from ddpm_cars.training.logs import read_loss_log
from ddpm_cars.training.trackers import TensorBoard, WandB

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _same_as_csv(scalars, run) -> bool:
    """The logged (step, loss) pairs are loss.csv's rows (which keep 6 decimals)."""
    rows = read_loss_log(run / "loss.csv", 10**9)
    return [e.step for e in scalars] == [s for s, _ in rows] and [e.value for e in scalars] == pytest.approx(
        [v for _, v in rows], abs=1e-6
    )


def _events(run):
    acc = event_accumulator.EventAccumulator(
        str(run / "tensorboard"), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0}
    )
    acc.Reload()
    return acc


@pytest.fixture
def logged(tiny_config):
    """4 steps per epoch, a grid at every epoch's end, SWD every 4 steps, logs read every 3."""
    return tiny_config.replace(
        train={
            "max_steps": 8,
            "epochs": 100,
            "log_with": "tensorboard",
            "log_every_steps": 3,
            "eval_every_steps": 4,
            "eval_samples": 8,
            "checkpoint_every_steps": 100,
        }
    )


def test_tensorboard_gets_the_loss_of_every_step_the_grids_and_the_metrics(tmp_path, logged):
    train(logged, tmp_path, progress=False)
    acc = _events(tmp_path)
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 9)) and _same_as_csv(loss, tmp_path)
    assert [e.step for e in acc.Scalars("train/lr")] == [3, 4, 6, 8]  # every read: each log_every, eval, epoch end
    assert {"train/skipped_steps", "train/images_per_s", "eval/swd"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("eval/swd")] == [4, 8]
    grids = acc.Images("samples")
    assert (
        [e.step for e in grids] == [4, 8]
        and grids[0].width > 16
        and grids[0].encoded_image_string.startswith(b"\x89PNG")
    )


def test_a_resumed_run_continues_the_same_curves(tmp_path, logged, monkeypatch):
    """A crash during step 7 (the checkpoint at step 4, steps 5-6 already logged), then
    --resume: every step appears once, with the loss the run kept."""
    real, calls = Denoiser.loss, []

    def crash_at_7(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("the machine went away")
        return real(self, *args, **kwargs)

    config = logged.replace(train={"log_every_steps": 1, "eval_every_steps": 0})
    monkeypatch.setattr(Denoiser, "loss", crash_at_7)
    with pytest.raises(RuntimeError):
        train(config, tmp_path, progress=False)
    assert [e.step for e in _events(tmp_path).Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    monkeypatch.setattr(Denoiser, "loss", real)
    train(config, tmp_path, resume=True, progress=False)
    loss = _events(tmp_path).Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 9)) and _same_as_csv(loss, tmp_path)
    assert [e.step for e in _events(tmp_path).Images("samples")] == [4, 8]  # the grid before the crash stays


@pytest.mark.parametrize("kind, module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_a_missing_tracker_is_one_line_naming_the_extra(tmp_path, tiny_config, monkeypatch, kind, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(UserError, match=f"pip install {kind} \\(the extra ddpm-cars\\[{kind}\\]\\)") as err:
        train(tiny_config.replace(train={"max_steps": 1, "log_with": kind}), tmp_path, progress=False)
    assert "\n" not in str(err.value)


def test_wandb_offline_keeps_one_run_across_a_resume(tmp_path, tiny_config, monkeypatch):
    """A real W&B run, offline: what is logged passes through (recorded on the way), and a
    resume continues the same run id."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged, real_init = [], wandb.init

    def init(*args, **kwargs):
        run = real_init(*args, **kwargs)
        real_log = run.log
        run.log = lambda values, step=None: (logged.append((step, sorted(values))), real_log(values, step=step))[1]
        return run

    monkeypatch.setattr(wandb, "init", init)
    config = tiny_config.replace(
        train={"max_steps": 2, "epochs": 100, "log_with": "wandb", "checkpoint_every_steps": 100, "log_every_steps": 1}
    )
    train(config, tmp_path, progress=False)
    assert logged == [
        (1, ["train/loss"]),
        (1, ["train/images_per_s", "train/lr", "train/skipped_steps"]),
        (2, ["train/loss"]),
        (2, ["train/images_per_s", "train/lr", "train/skipped_steps"]),
        (2, ["samples"]),
    ]
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    train(config.replace(train={"max_steps": 4}), tmp_path, resume=True, progress=False, final_grid=False)
    assert (tmp_path / "wandb_id.txt").read_text().strip() == run_id
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    # W&B names an offline run offline-run-<second>-<id>, adding -1 when a resume starts within the same second
    assert len(runs) == 2 and all(
        re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{re.escape(run_id)}(-\d+)?", r.name) for r in runs
    )
    assert all(any(r.glob("*.wandb")) for r in runs)


def _pictures() -> dict[str, torch.Tensor]:
    """A grayscale ``[1, H, W]`` and an RGB ``[3, H, W]`` uint8 picture, every pixel its own value."""
    gray = torch.arange(5 * 7, dtype=torch.uint8).view(1, 5, 7) * 7
    return {"gray": gray, "rgb": torch.cat([gray, 255 - gray, gray // 2])}


def test_tensorboard_takes_one_channel_grids_as_well_as_rgb(tmp_path):
    """The grid TensorBoard keeps decodes to the picture logged (one channel: three equal ones)."""
    tracker = TensorBoard(tmp_path, 0)
    pictures = _pictures()
    for step, (name, picture) in enumerate(pictures.items(), start=1):
        tracker.image(f"samples/{name}", step, picture)
    tracker.close()
    acc = _events(tmp_path)
    for name, picture in pictures.items():
        (event,) = acc.Images(f"samples/{name}")
        with Image.open(io.BytesIO(event.encoded_image_string)) as image:
            pixels = np.asarray(image.convert("RGB"))
        expected = picture.expand(3, -1, -1).permute(1, 2, 0).numpy()
        assert (event.width, event.height) == (7, 5) and np.array_equal(pixels, expected)


def test_wandb_gets_a_mode_l_image_of_a_one_channel_grid_and_rgb_of_three(tmp_path, tiny_config, monkeypatch):
    """Through the real wandb.Image, with the run faked (no W&B service started)."""
    wandb = pytest.importorskip("wandb")
    logged = []

    class Run:
        def log(self, values, step=None):
            logged.append((step, values))

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kwargs: Run())
    tracker = WandB(tmp_path, tiny_config)
    pictures = _pictures()
    for step, picture in enumerate(pictures.values(), start=1):
        tracker.image("samples", step, picture)
    tracker.close()
    assert [step for step, _ in logged] == [1, 2]
    for (_, values), (name, picture) in zip(logged, pictures.items()):
        image = values["samples"]
        assert isinstance(image, wandb.Image)
        with Image.open(image._path) as saved:  # the file W&B uploads
            mode, pixels = saved.mode, np.asarray(saved)
        if name == "gray":
            assert mode == "L" and np.array_equal(pixels, picture[0].numpy())
        else:
            assert mode == "RGB" and np.array_equal(pixels, picture.permute(1, 2, 0).numpy())
