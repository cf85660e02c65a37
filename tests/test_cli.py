import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm_cars import cli, commands
from ddpm_cars import run as ckpt
from ddpm_cars.cli import build_parser, main
from ddpm_cars.training.logs import read_loss_log

# the default (improved) recipe, shrunk
TINY = [
    "--image-size",
    "16",
    "--channels",
    "8,16",
    "--num-res-blocks",
    "1",
    "--timesteps",
    "20",
    "--batch-size",
    "8",
    "--num-sample-images",
    "4",
    "--sample-every",
    "1",
]


def _run(*args: str) -> subprocess.CompletedProcess:
    # the session's data cache (conftest): nothing under the user's home
    env = {
        "PYTHONPATH": str(Path(__file__).parents[1] / "src"),
        "PATH": "/usr/bin:/bin",
        "DDPM_CARS_CACHE": os.environ["DDPM_CARS_CACHE"],
    }
    return subprocess.run(
        [sys.executable, "-m", "ddpm_cars", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_every_option_has_help_and_a_shown_default():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings} has no help"
            assert "default" in action.help or "required" in action.help or action.const is True, (name, action.dest)
            assert action.help.count("(default:") <= 1, f"{name} {action.option_strings} states its default twice"
    # argparse before Python 3.11 appends " (default: ...)" to an on/off option's help
    assert cli.Switch(["--x"], dest="x", default=True, help="x (default: on)").help == "x (default: on)"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--out", "x", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
        (["train", "--out", "x", "--lr", "fast"], "argument --lr: must be a finite number"),
        (["train", "--out", "x", "--channels", "8"], "must be a list of at least 2 values, each >= 1"),
        (["train", "--out", "x", "--split", "val"], "invalid choice"),
        (["train", "--out", "x", "--preset", "huge"], "invalid choice"),
        (["sample", "--out", "x"], "--checkpoint"),
        (["train", "--out", "x", "--dropout", "1.5"], "must be in [0, 1)"),
        (["train", "--out", "x", "--attention-resolutions", "16,x"], "must be comma-separated integers"),
        (["train", "--out", "x", "--precision", "fp8"], "invalid choice"),
        (["eval", "--nll"], "--checkpoint"),
        (["sample", "--checkpoint", "x", "--out", "y", "--spacing", "cubic"], "invalid choice"),
        (["sample", "--checkpoint", "x", "--out", "y", "--sigma-max", "0"], "must be > 0"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--out", "{tmp}/r", "--image-size", "36"], "divisible by 8"),
        (["train", "--out", "{tmp}/r", "--preset", "seed", "--image-size", "40"], "divisible by 16"),
        (
            ["train", "--out", "{tmp}/r", "--batch-size", "10", "--grad-accum", "3"],
            "divisible by train.grad_accum_steps",
        ),
        (["eval", "--checkpoint", "{tmp}/none", "--no-sample-metrics"], "nothing to compute"),
        (["train", "--out", "{tmp}/r", "--image-size", "48", "--eval-every", "100"], "16 * 2**k"),
        (["eval", "--checkpoint", "{tmp}/none", "--nll"], "no run directory"),
        (["eval", "--checkpoint", "{tmp}/none"], "no run directory"),
        (["eval", "--images", "{tmp}", "--nll"], "--nll needs --checkpoint"),
        (["eval", "--images", "{tmp}/none"], "is not a folder"),
        (["eval", "--images", "{tmp}"], "holds no images"),
        (["train", "--out", "{tmp}/r", "--data", "{tmp}/nowhere"], "does not exist"),
        (["train", "--out", "{tmp}/r", "--resume"], "nothing to resume"),
        (["train", "--out", "{tmp}/r", "--zero-terminal-snr"], "needs --prediction v or x0"),
        (["sample", "--checkpoint", "{tmp}/none", "--out", "{tmp}/s"], "no run directory"),
        (["forward", "--index", "-1", "--out", "{tmp}/f.png"], "--index"),
        (
            ["train", "--out", "{tmp}/r", "--device", "cuda:7"]
            if not __import__("torch").cuda.is_available()
            else ["train", "--out", "{tmp}/r", "--device", "tpu"],
            "device",
        ),
    ],
)
def test_bad_values_give_one_clear_line(tmp_path, argv, message, capsys):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddpm-cars: error:") and message in err[0]


def test_stanford_cars_without_network_is_one_actionable_message(tmp_path, monkeypatch, capsys):
    fake = types.ModuleType("kagglehub")

    def offline(handle):
        raise ConnectionError("Failed to resolve 'www.kaggle.com'")

    fake.dataset_download = offline
    monkeypatch.setitem(sys.modules, "kagglehub", fake)
    assert main(["train", "--data", "stanford-cars", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "jutrera/stanford-car-dataset-by-classes-folder" in err[0] and "--data /path/to/car_data" in err[0]


def test_train_then_sample_end_to_end(tmp_path):
    run, out = tmp_path / "run", tmp_path / "samples"
    trained = _run("train", "--out", str(run), "--toy-count", "32", "--epochs", "2", *TINY)
    assert trained.returncode == 0, trained.stderr
    assert "Trained to step 8" in trained.stdout
    sampled = _run(
        "sample", "--checkpoint", str(run), "--out", str(out), "--num", "5", "--batch-size", "2", "--seed", "1"
    )
    assert sampled.returncode == 0, sampled.stderr
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:04d}.png" for i in range(5)]
    assert Image.open(out / "images" / "0000.png").size == (16, 16)
    for name in ["grid.png", "denoising.png"]:
        assert Image.open(out / name).size[0] > 16
    for sampler in ["ddim", "dpm++"]:
        fast = _run(
            "sample",
            "--checkpoint",
            str(run),
            "--out",
            str(tmp_path / sampler),
            "--num",
            "3",
            "--sampler",
            sampler,
            "--steps",
            "4",
            "--trajectory",
        )
        # the other sampling settings stay the run's: the improved preset's karras spacing
        assert fast.returncode == 0 and f"({sampler}, 4 steps (karras))" in fast.stdout, fast.stderr
        assert (
            Image.open(tmp_path / sampler / "trajectory.png").size[1]
            > Image.open(tmp_path / sampler / "denoising.png").size[1]
        )
    heun = _run(
        "sample",
        "--checkpoint",
        str(run),
        "--out",
        str(tmp_path / "heun"),
        "--num",
        "3",
        "--sampler",
        "heun",
        "--steps",
        "4",
        "--spacing",
        "karras",
    )
    assert heun.returncode == 0 and "(heun, 4 steps (karras))" in heun.stdout, heun.stderr
    churned = _run(
        "sample",
        "--checkpoint",
        str(run),
        "--out",
        str(tmp_path / "churn"),
        "--num",
        "3",
        "--sampler",
        "heun",
        "--steps",
        "4",
        "--spacing",
        "karras",
        "--churn",
        "40",
    )
    assert churned.returncode == 0 and "(heun, 4 steps (karras), churn 40)" in churned.stdout, churned.stderr
    started = _run(
        "sample",
        "--checkpoint",
        str(run),
        "--out",
        str(tmp_path / "start"),
        "--num",
        "3",
        "--sampler",
        "dpm++",
        "--steps",
        "4",
        "--spacing",
        "logsnr",
        "--sigma-max",
        "2",
    )
    assert started.returncode == 0 and "(dpm++, 4 steps (logsnr from sigma 2))" in started.stdout, started.stderr
    learned = _run(
        "sample",
        "--checkpoint",
        str(run),
        "--out",
        str(tmp_path / "learned"),
        "--num",
        "3",
        "--sampler",
        "ddim",
        "--steps",
        "4",
        "--eta",
        "1",
        "--ddim-sigma",
        "learned",
    )
    assert learned.returncode == 0 and (tmp_path / "learned" / "grid.png").is_file(), learned.stderr
    unread = _run(
        "sample", "--checkpoint", str(run), "--out", str(tmp_path / "x"), "--sampler", "dpm++", "--eta", "0.5"
    )
    assert unread.returncode == 2 and "--eta is read only with --sampler ddim" in unread.stderr, unread.stderr
    assert len(unread.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    too_many = _run("sample", "--checkpoint", str(run), "--out", str(tmp_path / "x"), "--steps", "21")
    assert too_many.returncode == 2 and "cannot exceed the 20 diffusion timesteps" in too_many.stderr
    again = _run("sample", "--checkpoint", str(run), "--out", str(tmp_path / "again"), "--num", "5", "--seed", "1")
    assert again.returncode == 0
    a, b = (np.asarray(Image.open(d / "images" / "0004.png")) for d in (out, tmp_path / "again"))
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # same seed, other batch size: same image


def test_eval_reports_bits_per_dim_on_held_out_images(tmp_path):
    run = tmp_path / "run"
    assert _run("train", "--out", str(run), "--toy-count", "16", "--steps", "2", *TINY).returncode == 0
    report = tmp_path / "nll.json"
    done = _run(
        "eval",
        "--checkpoint",
        str(run),
        "--nll",
        "--no-sample-metrics",
        "--num-images",
        "6",
        "--batch-size",
        "4",
        "--timesteps",
        "3",
        "--json",
        str(report),
    )
    assert done.returncode == 0, done.stderr
    assert "bits/dim on 6 test images (3 random t per image)" in done.stdout
    numbers = __import__("json").loads(report.read_text())
    assert numbers["images"] == 6 and numbers["split"] == "test" and numbers["kl_timesteps"] == 3
    parts = numbers["prior"] + numbers["kl_terms"] + numbers["decoder"]
    assert 0 < numbers["bits_per_dim"] == pytest.approx(parts, rel=1e-5)


def test_resume_may_extend_but_not_change_the_model(tmp_path):
    run = str(tmp_path / "run")
    assert _run("train", "--out", run, "--toy-count", "32", "--steps", "2", *TINY).returncode == 0
    changed = _run("train", "--out", run, "--resume", "--channels", "8,32")
    assert changed.returncode == 2 and "cannot change model.channels" in changed.stderr
    # how the same computation runs may change: here bf16 -> fp32 in 2 micro-batches
    same = _run(
        "train",
        "--out",
        run,
        "--resume",
        "--toy-count",
        "32",
        "--steps",
        "4",
        *TINY,
        "--precision",
        "fp32",
        "--grad-accum",
        "2",
    )
    assert same.returncode == 0, same.stderr
    assert ckpt.load_train_state(ckpt.latest_checkpoint(tmp_path / "run")).step == 4


def _folder_with_trouble(root: Path) -> Path:
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(root / f"car{i}.jpg")
    Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8), mode="L").save(root / "grey.jpg")
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[5:15, 5:15] = (200, 0, 0, 255)
    Image.fromarray(rgba, mode="RGBA").save(root / "alpha.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    return root


def test_training_on_a_messy_folder_warns_about_the_bad_file(tmp_path):
    data = _folder_with_trouble(tmp_path / "photos")
    done = _run("train", "--out", str(tmp_path / "run"), "--data", str(data), "--epochs", "1", *TINY)
    assert done.returncode == 0, done.stderr
    assert "broken.jpg" in done.stderr
    assert "Trained to step 1" in done.stdout  # 8 decodable images, batch 8


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_forward_picture(tmp_path, schedule):
    out = tmp_path / "f.png"
    done = _run(
        "forward",
        "--out",
        str(out),
        "--image-size",
        "32",
        "--frames",
        "5",
        "--timesteps",
        "100",
        "--schedule",
        schedule,
    )
    assert done.returncode == 0, done.stderr
    assert Image.open(out).size[0] > 6 * 32  # the data image and five noised ones


def test_forward_picture_of_toy_cars_leaves_no_cache_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_CARS_CACHE", str(tmp_path / "cache"))
    assert (
        main(["forward", "--out", str(tmp_path / "f.png"), "--image-size", "16", "--frames", "3", "--index", "2"]) == 0
    )
    assert Image.open(tmp_path / "f.png").size[0] > 4 * 16
    assert not (tmp_path / "cache" / "data").exists() or not any((tmp_path / "cache" / "data").iterdir())


def test_demo_draws_every_figure(tmp_path, monkeypatch, tiny_config, capsys):
    monkeypatch.setattr(
        commands.training, "DEMO", tiny_config.replace(train={"epochs": 1, "eval_every_steps": 2, "eval_samples": 8})
    )
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no Inception weights: FID is skipped, said why
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--log-with", "tensorboard"]) == 0
    for name in [
        "grid.png",
        "denoising.png",
        "forward_process.png",
        "loss.png",
        "samples/epoch_0001.png",
        "metrics.csv",
        "metrics.png",
        "eval/metrics.json",
        "eval/nearest.png",
        "eval/nearest_distances.png",
        "report.html",
    ]:
        assert (out / name).is_file(), name
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={SCALARS: 0, IMAGES: 0})
    events.Reload()  # the loss of every step, the grid of the epoch and the final one, each --eval-every SWD
    assert [e.step for e in events.Scalars("train/loss")] == [s for s, _ in read_loss_log(out / "loss.csv", 99)]
    assert [e.step for e in events.Scalars("eval/swd")] == [2, 4] and len(events.Images("samples")) == 1
    closing = capsys.readouterr().out.strip().splitlines()[-1]
    assert "grid.png, denoising.png, forward_process.png, loss.png, metrics.png, eval/, samples/;" in closing
    assert len(list((out / "images").iterdir())) == commands.training.DEMO_EVAL_SAMPLES
    assert Image.open(out / "grid.png").size == (
        6 * 18 + 2,
        6 * 18 + 2,
    )  # the first 36 images: 6 x 6 of 16 px, padding 2
    assert main(["demo", "--out", str(out)]) == 0  # a second run continues the finished one


def test_cli_module_does_not_import_torch_for_help():
    done = subprocess.run(
        [sys.executable, "-c", "import sys, ddpm_cars.cli; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(Path(cli.__file__).parents[1])},
    )
    assert done.stdout.strip() == "False"


def test_class_conditional_run_lists_its_classes_and_draws_them_by_name_or_index(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--toy-count", "16", "--steps", "2", "--class-conditional", *TINY]) == 0
    capsys.readouterr()
    assert main(["classes", str(run)]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed == ["0  sedan", "1  hatchback", "2  suv", "3  pickup", "4  sports", "5  van"]  # the toy body types
    out = tmp_path / "s"
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(run),
                "--out",
                str(out),
                "--class",
                "SUV",
                "--class",
                "5",
                "--num",
                "3",
                "--guidance",
                "2",
                "--steps",
                "3",
            ]
        )
        == 0
    )
    assert "3 each of suv, van, guidance 2" in capsys.readouterr().out
    assert len(list((out / "images").iterdir())) == 6
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 + 3 * 18, 2 + 2 * 18)  # one row of 3 per class, 16 px images, 2 px padding
    assert (
        main(["sample", "--checkpoint", str(run), "--out", str(out), "--num", "2", "--steps", "3"]) == 0
    )  # unconditional
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(run), "--out", str(out), "--class", "truck"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown class 'truck'; closest:" in err[0] and "ddpm-cars classes RUN" in err[0]

    # an interpolation within one class: its ends are the class's images of those seeds
    lerp, ends = tmp_path / "lerp", tmp_path / "ends"
    common = f"--checkpoint {run} --class van --guidance 2 --steps 3 --sampler ddim --spacing karras".split()
    assert main(["sample", *common, "--out", str(lerp), "--interpolate", "1", "2", "--frames", "3"]) == 0
    assert "between seeds 1 and 2 in class van, guidance 2" in capsys.readouterr().out
    assert main(["sample", *common, "--out", str(ends), "--num", "1", "--seed", "2"]) == 0
    last = np.asarray(Image.open(lerp / "images" / "0002.png"), dtype=np.int16)
    assert np.abs(last - np.asarray(Image.open(ends / "images" / "0000.png"), dtype=np.int16)).max() <= 1
    capsys.readouterr()
    two = ["sample", *common, "--class", "suv", "--out", str(tmp_path / "x"), "--interpolate", "1", "2"]
    assert main(two) == 2 and "stays within one class" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "--checkpoint", "{run}", "--out", "{tmp}/s", "--class", "sedan"], "not class-conditional"),
        (
            ["sample", "--checkpoint", "{run}", "--out", "{tmp}/s", "--guidance", "3"],
            "--guidance steers towards a class",
        ),
        (["classes", "{run}"], "is not class-conditional"),
        (["train", "--out", "{tmp}/r2", "--crop", "bbox"], "--crop bbox needs Stanford Cars"),
        (["train", "--out", "{tmp}/r2", "--data", "{tmp}", "--crop", "bbox"], "plain image folder"),
    ],
)
def test_class_and_crop_mistakes_give_one_clear_line(tmp_path, argv, message, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--toy-count", "8", "--steps", "1", *TINY]) == 0
    (tmp_path / "a.png").write_bytes(b"")
    capsys.readouterr()
    assert main([a.replace("{tmp}", str(tmp_path)).replace("{run}", str(run)) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddpm-cars: error:") and message in err[0], err


def test_guidance_must_be_a_finite_non_negative_number(capsys):
    for bad in ["-1", "inf", "strong"]:
        with pytest.raises(SystemExit):
            main(["sample", "--checkpoint", "x", "--out", "y", "--class", "0", "--guidance", bad])
        assert "--guidance" in capsys.readouterr().err


def test_conditional_training_on_a_kaggle_copy_with_bbox_crops(tmp_path, capsys):
    """The README's Stanford Cars recipe, on a Kaggle-shaped copy with two classes and boxes."""
    root = tmp_path / "kaggle"
    rows = []
    for c, name in enumerate(["Audi R8 Coupe 2012", "BMW M3 Coupe 2012"]):
        for i in range(4):
            file = f"{c * 4 + i + 1:05d}.jpg"
            (root / "car_data" / "car_data" / "train" / name).mkdir(parents=True, exist_ok=True)
            pixels = np.full((30, 40, 3), (0, 0, 255), np.uint8)
            pixels[10:20, 5 + i : 25 + i] = (255, 0, 0)
            Image.fromarray(pixels).save(root / "car_data" / "car_data" / "train" / name / file)
            rows.append(f"{file},{5 + i},10,{25 + i},20,{c + 1}")
    (root / "anno_train.csv").write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(root),
                "--crop",
                "bbox",
                "--class-conditional",
                "--out",
                str(run),
                "--steps",
                "1",
                *TINY,
            ]
        )
        == 0
    )
    saved = __import__("json").loads((run / "config.json").read_text())
    assert saved["data"]["crop"] == "bbox" and saved["model"]["class_names"] == [
        "Audi R8 Coupe 2012",
        "BMW M3 Coupe 2012",
    ]
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(run),
                "--out",
                str(tmp_path / "s"),
                "--class",
                "bmw m3 coupe 2012",
                "--num",
                "2",
                "--steps",
                "2",
            ]
        )
        == 0
    )
    assert "2 each of BMW M3 Coupe 2012, guidance 3" in capsys.readouterr().out
    assert (
        main(["forward", "--data", str(root), "--crop", "bbox", "--image-size", "16", "--out", str(tmp_path / "f.png")])
        == 0
    )


def test_a_bug_keeps_its_traceback_and_says_it_is_one(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(commands, "report", broken)
    assert main(["report", "somewhere"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: boom" in err
    assert err.strip().splitlines()[-1].startswith("ddpm-cars: internal error:") and "bug" in err.splitlines()[-1]


def test_a_bare_value_error_is_a_bug_too(monkeypatch, capsys):
    def broken(args):
        raise ValueError("an invariant did not hold")

    monkeypatch.setattr(commands, "report", broken)
    assert main(["report", "somewhere"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ddpm-cars: internal error:" in err and "ddpm-cars: error:" not in err


def test_a_missing_data_folder_is_one_error_line_without_traceback(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "--data", "/no/such/folder"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpm-cars: error:") and "/no/such/folder" in lines[0]
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_commands_do_not_import_the_command_line():
    for module in Path(commands.__file__).parent.glob("*.py"):
        source = module.read_text()
        assert "ddpm_cars.cli" not in source and "from ddpm_cars import cli" not in source, module.name


@pytest.mark.parametrize(
    "argv, section, values",
    [
        (
            [
                "train",
                "--out",
                "r",
                "--steps",
                "3",
                "--sample-steps",
                "2",
                "--data",
                "d",
                "--no-flip",
                "--grad-clip",
                "none",
            ],
            None,
            {
                "train": {"max_steps": 3, "grad_clip": None},
                "sample": {"steps": 2},
                "data": {"source": "d", "flip": False},
            },
        ),
        (
            ["train", "--out", "r", "--attention-resolutions", "none", "--channels", "8,16"],
            None,
            {"model": {"attention_resolutions": (), "channels": (8, 16)}},
        ),
        (
            ["sample", "--checkpoint", "c", "--out", "o", "--steps", "5", "--no-clip", "--sampler", "ddim"],
            "sample",
            {"steps": 5, "clip_x0": False, "sampler": "ddim"},
        ),
        (["eval", "--checkpoint", "c", "--steps", "none"], "sample", {"steps": None}),
        (["guidance", "run", "--eta", "0.5"], "sample", {"eta": 0.5}),
        (["train", "--out", "r"], None, {}),
        (["train", "--out", "r", "--epochs", "2"], "train", {"epochs": 2, "max_steps": None}),  # a preset's steps
        (["train", "--out", "r", "--epochs", "2", "--steps", "9"], "train", {"epochs": 2, "max_steps": 9}),
    ],
)
def test_flags_become_config_overrides_and_only_given_ones(argv, section, values):
    overrides = cli.config_overrides(build_parser().parse_args(argv))
    assert (overrides.get(section, {}) if section else overrides) == values


def test_every_config_field_with_a_flag_is_on_train_and_sampling_ones_on_sample():
    from dataclasses import fields

    from ddpm_cars.presets import SEED

    def flags(name):
        sub = next(a for a in build_parser()._actions if a.dest == "command").choices[name]
        return {a.dest for a in sub._actions if "." in a.dest}

    with_flag = {f"{s.name}.{f.name}" for s in fields(SEED) for f in fields(getattr(SEED, s.name)) if f.metadata["cli"]}
    assert flags("train") == with_flag
    assert "model.class_names" not in with_flag and "diffusion.beta_start" not in with_flag
    sampling = {d for d in with_flag if d.startswith("sample.")} - {"sample.num_images"}
    for name in ["sample", "eval", "guidance"]:
        assert flags(name) == sampling


def test_sample_help_says_how_to_pick_a_sampler_in_four_lines(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    advice = capsys.readouterr().out.split("Picking a sampler")[1].strip().splitlines()[1:]  # below the heading
    assert len(advice) == 4 and all(any(c.isdigit() for c in line) for line in advice)
