"""Data-parallel training and sampling with 2 CPU processes (gloo), against one process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from safetensors.torch import load_file

from ddpm_cars import parallel as distributed
from ddpm_cars import run as ckpt
from ddpm_cars.presets import TINY
from ddpm_cars.training import train

# the improved recipe, tiny; GroupNorm (no batch statistics), no dropout: the gradient of
# a batch does not depend on how it is split. Micro-batches exercise no_sync. fp32 named,
# not "auto": the spawned processes do not see conftest's in-process fp32, and on a CPU
# with bf16 instructions they would train and sample in bf16.
CONFIG = TINY.replace(
    data={"toy_count": 48, "flip": True},
    train={
        "batch_size": 8,
        "grad_accum_steps": 2,
        "max_steps": 4,
        "checkpoint_every_steps": 2,
        "ema_decay": 0.9,
        "sample_every_epochs": 100,
        "warmup_steps": 2,
        "precision": "fp32",
    },
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)


def _train_worker(rank: int, world: int, port: int, run_dir: str, max_steps: int, resume: bool, counts: str) -> None:
    _join(rank, world, port)
    saves = []
    original = ckpt.save_checkpoint
    ckpt.save_checkpoint = lambda *a, **k: (saves.append(1), original(*a, **k))[1]
    try:
        train(CONFIG.replace(train={"max_steps": max_steps}), run_dir, resume=resume, device="cpu", progress=False)
    finally:
        ckpt.save_checkpoint = original
        Path(counts, f"saves_{rank}.json").write_text(json.dumps(len(saves)))
        dist.destroy_process_group()


def _weights(run_dir: Path, name: str = ckpt.MODEL_FILE) -> dict[str, torch.Tensor]:
    return load_file(ckpt.latest_checkpoint(run_dir) / name)


def _assert_same_weights(a: Path, b: Path) -> None:
    for name in (ckpt.MODEL_FILE, ckpt.EMA_FILE):
        wa, wb = _weights(a, name), _weights(b, name)
        assert wa.keys() == wb.keys()
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5, msg=f"{name} {key}")


def test_two_processes_train_the_weights_of_one_and_resume(tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    train(CONFIG, single, device="cpu", progress=False)
    mp.spawn(_train_worker, args=(2, _free_port(), str(double), 4, False, str(tmp_path)), nprocs=2)
    _assert_same_weights(single, double)
    counts = [json.loads((tmp_path / f"saves_{r}.json").read_text()) for r in (0, 1)]
    assert counts[0] > 0 and counts[1] == 0  # rank 0 alone writes checkpoints
    assert sorted(p.name for p in (double / ckpt.CHECKPOINT_DIR).iterdir()) == sorted(
        p.name for p in (single / ckpt.CHECKPOINT_DIR).iterdir()
    )
    assert (double / "loss.csv").read_text().splitlines()[0] == "step,loss"
    # resume: both processes continue from step 4 to 6 and still match one process
    train(CONFIG.replace(train={"max_steps": 6}), single, resume=True, device="cpu", progress=False)
    mp.spawn(_train_worker, args=(2, _free_port(), str(double), 6, True, str(tmp_path)), nprocs=2)
    assert ckpt.load_train_state(ckpt.latest_checkpoint(double)).step == 6
    _assert_same_weights(single, double)


def test_the_global_batch_must_split_over_the_processes():
    world = distributed.World(rank=1, size=3)
    assert torch.arange(12)[world.share(12)].tolist() == [1, 4, 7, 10] and not world.is_main
    assert distributed.shard_indices(7, world) == [1, 4]


def _sample_request(run_dir, out, **given):
    from ddpm_cars.commands import SampleRequest

    return SampleRequest(
        Path(run_dir), Path(out), 5, seed=1, batch_size=2, device="cpu", sampling={"steps": 4}, **given
    )


def _sample_worker(rank: int, world: int, port: int, run_dir: str, out: str) -> None:
    from ddpm_cars.commands import sample

    _join(rank, world, port)
    try:
        result = sample(_sample_request(run_dir, out))
        assert (result is None) == (rank != 0)
    finally:
        dist.destroy_process_group()


def test_two_processes_sample_the_images_of_one(tmp_path):
    from ddpm_cars.commands import sample

    run = tmp_path / "run"
    train(CONFIG.replace(train={"max_steps": 2}), run, device="cpu", progress=False)
    sample(_sample_request(run, tmp_path / "one"))
    mp.spawn(_sample_worker, args=(2, _free_port(), str(run), str(tmp_path / "two")), nprocs=2)
    _assert_same_images(tmp_path / "one", tmp_path / "two", 5)


def _assert_same_images(one: Path, two: Path, count: int) -> None:
    names = sorted(p.name for p in (one / "images").iterdir())
    assert names == sorted(p.name for p in (two / "images").iterdir()) and len(names) == count
    for name in names:
        a, b = (np.asarray(Image.open(d / "images" / name), dtype=int) for d in (one, two))
        assert np.abs(a - b).max() <= 1, name  # same seeds; other batches, so at most a rounding step apart


def _interpolate_worker(rank: int, world: int, port: int, run_dir: str, out: str) -> None:
    from ddpm_cars import generation
    from ddpm_cars.commands import Interpolation, sample

    _join(rank, world, port)
    decode, decoded = generation.decode, []
    generation.decode = lambda den, x_T, *a, **k: (decoded.append(x_T.shape[0]), decode(den, x_T, *a, **k))[1]
    try:
        sample(_sample_request(run_dir, out, interpolation=Interpolation(seeds=(3, 4), frames=5)))
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, f"decoded_{rank}.json").write_text(json.dumps(sum(decoded)))
    finally:
        dist.destroy_process_group()


def test_two_processes_share_the_frames_of_an_interpolation(tmp_path):
    from ddpm_cars.commands import Interpolation, sample

    run = tmp_path / "run"
    train(CONFIG.replace(train={"max_steps": 2}), run, device="cpu", progress=False)
    sample(_sample_request(run, tmp_path / "one", interpolation=Interpolation(seeds=(3, 4), frames=5)))
    mp.spawn(_interpolate_worker, args=(2, _free_port(), str(run), str(tmp_path / "two")), nprocs=2)
    shares = [json.loads((tmp_path / "two" / f"decoded_{rank}.json").read_text()) for rank in (0, 1)]
    assert shares == [3, 2]  # frames 0, 2, 4 and 1, 3: each rank decodes its share, not all five
    _assert_same_images(tmp_path / "one", tmp_path / "two", 5)


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun end to end on Linux")
def test_torchrun_runs_the_command_line(tmp_path):
    env = {
        "PYTHONPATH": str(Path(__file__).parents[1] / "src"),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "OMP_NUM_THREADS": "1",
        "HOME": str(tmp_path),
    }
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "ddpm_cars",
        "train",
        "--preset",
        "tiny",
        "--toy-count",
        "32",
        "--batch-size",
        "8",
        "--steps",
        "2",
        "--out",
        str(run),
        "--device",
        "cpu",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("Trained to step 2") == 1  # rank 0 alone reports
    assert ckpt.load_train_state(ckpt.latest_checkpoint(run)).step == 2


def _eval_worker(rank: int, world: int, port: int, argv: list) -> None:
    from ddpm_cars.cli import main

    _join(rank, world, port)
    try:
        assert main(argv) == 0
        assert not dist.is_initialized()  # the command left the group it joined, after every process was done
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_processes_evaluate_like_one(tmp_path, monkeypatch):
    from ddpm_cars.cli import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no Inception weights, no download
    run = tmp_path / "run"
    train(CONFIG.replace(train={"max_steps": 2}), run, device="cpu", progress=False)
    argv = [
        "eval",
        "--checkpoint",
        str(run),
        "--num-samples",
        "6",
        "--steps",
        "3",
        "--batch-size",
        "1",
        "--no-fid",
        "--no-memorization",
        "--device",
        "cpu",
    ]
    assert main(argv + ["--out", str(tmp_path / "one")]) == 0
    mp.spawn(_eval_worker, args=(2, _free_port(), argv + ["--out", str(tmp_path / "two")]), nprocs=2)
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert one["num_samples"] == two["num_samples"] == 6 and one["metrics"].keys() == two["metrics"].keys()
    for name, value in one["metrics"].items():  # the same images; one thread or two in the arithmetic
        assert two["metrics"][name] == pytest.approx(value, rel=1e-6), name


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun end to end on Linux")
def test_torchrun_samples_guided_images_like_one_process(tmp_path):
    """The README's torchrun sampling line (--num-images: torchrun's parser would take a bare
    --num for its --numa-binding), class-guided, draws the images one process draws."""
    from ddpm_cars.cli import main

    env = {
        "PYTHONPATH": str(Path(__file__).parents[1] / "src"),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "OMP_NUM_THREADS": "1",
        "HOME": str(tmp_path),
    }
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--preset",
                "tiny",
                "--class-conditional",
                "--toy-count",
                "32",
                "--batch-size",
                "8",
                "--steps",
                "1",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    sample = [
        "sample",
        "--checkpoint",
        str(run),
        "--class",
        "van",
        "--class",
        "1",
        "--num-images",
        "3",
        "--steps",
        "3",
        "--device",
        "cpu",
    ]
    assert main([*sample, "--out", str(tmp_path / "one")]) == 0
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "ddpm_cars",
        *sample,
        "--out",
        str(tmp_path / "two"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for i in range(6):
        one, two = (
            torch.from_numpy(np.array(Image.open(tmp_path / d / "images" / f"{i:04d}.png"))).int()
            for d in ("one", "two")
        )
        assert (one - two).abs().max() <= 1


def _eval_folder_worker(rank: int, world: int, port: int, folder: str, out: str) -> None:
    from ddpm_cars.commands import EvalRequest, evaluate

    _join(rank, world, port)
    try:
        request = EvalRequest(images=Path(folder), data="toy-cars", image_size=16, fid=False, out=Path(out))
        result = evaluate(request)
        assert (result == {}) == (rank != 0), result
    finally:
        dist.destroy_process_group()


def test_two_processes_score_a_folder_on_rank_0(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(_toy_car_pixels(8)):
        Image.fromarray(image).save(folder / f"{i}.png")
    mp.spawn(_eval_folder_worker, args=(2, _free_port(), str(folder), str(tmp_path / "eval")), nprocs=2)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]["swd"] > 0


def _toy_car_pixels(count: int) -> list[np.ndarray]:
    """``count`` toy cars of 16 px as HWC arrays, as PIL saves them."""
    from ddpm_cars.data.toy_cars import generate_toy_cars

    images, _ = generate_toy_cars(count, 16, seed=4)
    return [np.ascontiguousarray(image.transpose(1, 2, 0)) for image in images]
