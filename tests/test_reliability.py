"""Holding up: polite stops on SIGINT/SIGTERM, a full disk, and nothing executed on load."""

from __future__ import annotations

import errno
import os
import re
import signal
from pathlib import Path

import pytest
import torch

from ddpm_cars import run as ckpt
from ddpm_cars.cli import main
from ddpm_cars.training.logs import read_loss_log
from ddpm_cars.training.signals import StopRequest

TINY = [
    "--image-size",
    "16",
    "--channels",
    "8,16",
    "--num-res-blocks",
    "1",
    "--timesteps",
    "20",
    "--toy-count",
    "32",
    "--batch-size",
    "8",
    "--num-sample-images",
    "2",
    "--sample-every",
    "1000",
    "--checkpoint-every",
    "2",
]


def _one_error_line(capsys) -> str:
    """The one error line (the last of stderr, after any progress bars); no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    messages = [line for line in err if line.startswith("ddpm-cars:")]
    assert len(messages) == 1 and err[-1] == messages[0] and messages[0].startswith("ddpm-cars: error:"), err
    assert "Traceback" not in "\n".join(err)
    return messages[0]


@pytest.fixture
def ctrl_c_interrupts():
    """Ctrl-C raises KeyboardInterrupt, as in a terminal, even when the suite was started in
    the background (where the shell hands the process SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_first_signal_asks_to_stop_and_a_second_acts_at_once(ctrl_c_interrupts):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)  # handled: the loop finishes its step and saves
        assert stop.requested and stop.signum == signal.SIGTERM
        # the handlers are back to what they were: a second SIGTERM terminates, a second Ctrl-C interrupts
        assert {sig: signal.getsignal(sig) for sig in before} == before
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_a_full_disk_keeps_the_last_checkpoint_and_says_so(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real, calls = ckpt.save_weights, []

    def disk_fills_up(model, path):
        calls.append(path)
        if len(calls) > 2:  # the model and EMA files of step 2 fit; step 4 does not
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(model, path)

    monkeypatch.setattr(ckpt, "save_weights", disk_fills_up)
    assert main(["train", "--out", str(run), "--steps", "6", *TINY]) == 1
    line = _one_error_line(capsys)
    assert "cannot write the checkpoint of step 4" in line and "No space left on device" in line
    assert "step_00000002, is intact" in line and "--resume" in line
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"]  # no half-written directory
    assert ckpt.load_train_state(ckpt.latest_checkpoint(run)).step == 2
    monkeypatch.setattr(ckpt, "save_weights", real)  # space made: the run goes on from step 2
    assert main(["train", "--out", str(run), "--steps", "6", "--resume", *TINY]) == 0
    assert ckpt.load_train_state(ckpt.latest_checkpoint(run)).step == 6
    assert [s for s, _ in read_loss_log(run / "loss.csv", 10**9)] == [1, 2, 3, 4, 5, 6]


def test_other_write_failures_are_one_line_with_exit_1(tmp_path, monkeypatch, capsys):
    import ddpm_cars.training.logs as logs

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "loss.csv")

    monkeypatch.setattr(logs, "write_loss_log", read_only)
    assert main(["train", "--out", str(tmp_path / "run"), "--steps", "2", *TINY]) == 1
    assert "Permission denied" in _one_error_line(capsys)


class _Payload:
    """Unpickling this calls ``Path.touch(marker)``: code run by merely loading a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_crafted_pickle_in_a_run_is_refused_not_executed(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--steps", "2", *TINY]) == 0
    state_file = ckpt.latest_checkpoint(run) / ckpt.STATE_FILE
    proof, marker = tmp_path / "proof", tmp_path / "pwned"
    torch.save({"step": _Payload(proof)}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)  # an unsafe loader would run it ...
    assert proof.exists()
    torch.save({"step": _Payload(marker)}, state_file)  # ... so plant it where resume reads
    capsys.readouterr()
    config_before = (run / "config.json").read_text()
    assert main(["train", "--out", str(run), "--steps", "4", "--resume", *TINY]) == 2
    line = _one_error_line(capsys)
    assert str(state_file) in line
    assert not marker.exists()  # refused, not executed
    assert (run / "config.json").read_text() == config_before  # the failed resume changed nothing


def test_a_diverging_learning_rate_stops_with_the_last_good_weights(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--steps", "40", "--lr", "1e12", "--grad-clip", "1e30", *TINY]) == 3
    line = _one_error_line(capsys)
    streak = re.search(r"the loss was not finite for (\d+) steps in a row \(up to step (\d+)\)", line)
    assert streak and str(ckpt.latest_checkpoint(run)) in line  # the checkpoint to resume from
    assert f"ddpm-cars train --out {run} --resume --lr 1e+11 --grad-clip 1.0" in line  # what to try
    state = ckpt.load_train_state(ckpt.latest_checkpoint(run))
    # counted when the losses are read (every 10 steps, at checkpoints and epoch ends): at least the limit of 10
    assert 10 <= int(streak[1]) == state.skipped_steps < 20 and state.step == int(streak[2]) < 40
    from ddpm_cars.config import RunConfig
    from ddpm_cars.models import build_model

    model = ckpt.load_weights(build_model(RunConfig.load(run / "config.json")), ckpt.latest_checkpoint(run))
    assert all(torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point())
