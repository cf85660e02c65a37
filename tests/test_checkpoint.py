import pytest
import torch

from ddpm_cars import run as ckpt
from ddpm_cars.files import atomic_write_text


def _state(step: int) -> ckpt.TrainState:
    opt = torch.optim.Adam(torch.nn.Linear(2, 2).parameters())
    return ckpt.TrainState(step, 1, 2, opt.state_dict(), torch.Generator().manual_seed(0).get_state())


def test_round_trip(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model[1].running_mean.fill_(0.5)
    path = ckpt.save_checkpoint(tmp_path, model, _state(7))
    assert path.name == "step_00000007" and ckpt.latest_checkpoint(tmp_path) == path
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ckpt.load_weights(fresh, path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    state = ckpt.load_train_state(path)
    assert (state.step, state.epoch, state.batch_in_epoch) == (7, 1, 2)
    # the training state holds only plain data: it loads with weights_only=True
    assert torch.load(path / ckpt.STATE_FILE, weights_only=True)["step"] == 7


def test_only_newest_two_are_kept(tmp_path):
    model = torch.nn.Linear(2, 2)
    for step in [1, 2, 10, 3]:
        ckpt.save_checkpoint(tmp_path, model, _state(step))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000010"]


def test_crash_while_writing_leaves_previous_checkpoint_latest(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    good = ckpt.save_checkpoint(tmp_path, model, _state(5))

    def die(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", die)  # weights written, state not: crash mid-checkpoint
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, model, _state(6))
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert [p.name for p in (tmp_path / ckpt.CHECKPOINT_DIR).iterdir()] == [good.name]


def test_leftover_temporary_directory_is_ignored(tmp_path):
    """What a SIGKILL during a write leaves behind is never taken for a checkpoint."""
    good = ckpt.save_checkpoint(tmp_path, torch.nn.Linear(2, 2), _state(5))
    half = tmp_path / ckpt.CHECKPOINT_DIR / ".step_00000009.abc.tmp"
    half.mkdir()
    (half / ckpt.MODEL_FILE).write_bytes(b"partial")
    assert ckpt.latest_checkpoint(tmp_path) == good
    newer = ckpt.save_checkpoint(tmp_path, torch.nn.Linear(2, 2), _state(6))  # and the next save clears it
    assert sorted(p.name for p in (tmp_path / ckpt.CHECKPOINT_DIR).iterdir()) == [good.name, newer.name]


def test_atomic_write_text_replaces_whole_file(tmp_path):
    target = tmp_path / "a" / "f.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two" and [p.name for p in target.parent.iterdir()] == ["f.txt"]


def test_resolve_checkpoint(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, torch.nn.Linear(2, 2), _state(4))
    assert ckpt.resolve_checkpoint(tmp_path) == (tmp_path, path)
    assert ckpt.resolve_checkpoint(path) == (tmp_path, path)
    with pytest.raises(FileNotFoundError, match="no run directory"):
        ckpt.resolve_checkpoint(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / ckpt.CHECKPOINT_DIR)  # a folder, but no run


class _Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs."""


@pytest.mark.parametrize(
    "steps, saving", [((2, 4), 6), ((2, 4), 4)], ids=["pruning the oldest", "replacing the same step"]
)
def test_killed_while_deleting_a_checkpoint_never_leaves_a_partial_one(tmp_path, monkeypatch, steps, saving):
    model = torch.nn.Linear(2, 2)
    for step in steps:
        ckpt.save_checkpoint(tmp_path, model, _state(step))
    real = ckpt.shutil.rmtree

    def dies_half_way(path, *args, **kwargs):
        victims = [f for f in sorted(__import__("pathlib").Path(path).rglob("*")) if f.is_file()]
        if victims:  # one file gone, then the process dies
            victims[0].unlink()
            raise _Killed
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", dies_half_way)
    with pytest.raises(_Killed):
        ckpt.save_checkpoint(tmp_path, model, _state(saving))
    monkeypatch.setattr(ckpt.shutil, "rmtree", real)
    found = ckpt.list_checkpoints(tmp_path)
    assert found  # something to resume from
    for checkpoint in found:  # and every checkpoint there is whole
        assert sorted(f.name for f in checkpoint.iterdir()) == [ckpt.MODEL_FILE, ckpt.STATE_FILE]
        assert ckpt.load_train_state(checkpoint).step == int(checkpoint.name.split("_")[1])
    ckpt.save_checkpoint(tmp_path, model, _state(8))  # the next save sweeps the leftovers away
    assert not list((tmp_path / ckpt.CHECKPOINT_DIR).glob(".*"))
