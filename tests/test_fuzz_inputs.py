"""Bad input, fuzzed: every bad image folder, config.json, checkpoint and command-line value
gets one clear message (a skip warning naming the file, or one ``ddpm-cars: error:`` line
and exit code 2), never a traceback, and leaves nothing half written."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import resource
import shutil
import struct
import tempfile
import types
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from ddpm_cars import commands
from ddpm_cars import parallel as distributed
from ddpm_cars import run as ckpt
from ddpm_cars.cli import main
from ddpm_cars.config import DataConfig, ModelConfig, RunConfig
from ddpm_cars.data.dataset import DataError
from ddpm_cars.data.folder import IMAGE_EXTENSIONS, ImageDecodeWarning, find_images, load_image, load_image_folder
from ddpm_cars.models import build_model
from ddpm_cars.presets import SEED

# the default (improved) recipe, shrunk (as in test_cli.py)
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
SIZE = 8
GREEN = (0, 255, 0)
FUZZ = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# --- helpers ---------------------------------------------------------------


def image_bytes(fmt: str, size=(12, 10), color=(200, 30, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A small real PNG whose IHDR (with a correct CRC) claims ``width x height`` pixels."""
    data = bytearray(image_bytes("PNG", (4, 4)))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def snapshot(root: Path) -> dict[str, str] | None:
    """Every file under ``root`` and its hash; None when ``root`` does not exist."""
    if not root.exists():
        return None
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` in-process: its exit code (argparse's SystemExit included) and stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code
    return code, err.getvalue()


def assert_one_error_line(code: int, err: str, *needles: str) -> str:
    """Exit 2 with exactly one error line (argparse's usage lines above it are fine), no traceback."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("ddpm-cars"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def load_warned(root: Path, **kwargs):
    """``load_image_folder`` and the paths it warned about (ImageDecodeWarning)."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        data = load_image_folder(root, SIZE, progress=False, **kwargs)
    others = [w for w in record if not issubclass(w.category, ImageDecodeWarning)]
    assert not others, [str(w.message) for w in others]  # e.g. no DecompressionBombWarning besides the skip
    return data, [str(w.message) for w in record]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A tiny run trained for two steps, to copy and break."""
    run = tmp_path_factory.mktemp("trained") / "run"
    code, err = run_cli(["train", "--out", run, "--toy-count", "16", "--steps", "2", *TINY])
    assert code == 0, err
    assert (ckpt.latest_checkpoint(run) / ckpt.EMA_FILE).is_file()
    return run


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


# --- 1. image folders --------------------------------------------------------

BAD_CONTENT = st.one_of(
    st.binary(max_size=300),
    st.just(b""),
    st.sampled_from(["PNG", "JPEG", "GIF", "BMP"]).flatmap(
        lambda fmt: st.integers(0, len(image_bytes(fmt)) - 1).map(lambda cut: image_bytes(fmt)[:cut])
    ),
    st.text(max_size=50).map(str.encode),
)


@FUZZ
@given(
    bad=st.lists(st.tuples(BAD_CONTENT, st.sampled_from(IMAGE_EXTENSIONS + (".PNG", ".Jpg"))), min_size=1, max_size=4)
)
@example(bad=[(b"", ".png"), (b"not an image at all", ".jpg")])
def test_fuzzed_bad_files_are_skipped_with_a_warning_and_good_images_load(bad):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        Image.new("RGB", (20, 12), GREEN).save(root / "good.png")
        paths = []
        for i, (content, ext) in enumerate(bad):
            paths.append(root / f"bad{i}{ext}")
            paths[-1].write_bytes(content)
        data, messages = load_warned(root)
        warned = [p for p in paths if any(str(p) in m for m in messages)]
        assert len(warned) == len(messages)  # every warning names one of the bad files
        assert len(data) + len(warned) == 1 + len(paths)  # each file loaded or skipped, none lost
        assert data.images.shape[1:] == (3, SIZE, SIZE)
        assert GREEN in {tuple(img[:, 0, 0].tolist()) for img in data.images}  # the good image is there
        for path, (content, _) in zip(paths, bad):
            if len(content) < 8:  # no image format fits in so few bytes: always skipped
                assert path in warned


@pytest.mark.parametrize("contents", [{}, {"a.png": b"", "b.jpg": b"\xff\xd8\xff", "c.gif": b"GIF89a"}])
def test_empty_folder_or_only_bad_files_is_one_data_error_line(tmp_path, contents):
    for name, content in contents.items():
        (tmp_path / name).write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageDecodeWarning)
        with pytest.raises(DataError) as excinfo:
            load_image_folder(tmp_path, SIZE, progress=False)
        assert len(str(excinfo.value).splitlines()) == 1
        out = tmp_path.parent / f"{tmp_path.name}-run"
        code, err = run_cli(["train", "--data", tmp_path, "--out", out, *TINY])
    assert_one_error_line(code, err, "No image files" if not contents else "could be decoded")
    assert not out.exists()  # nothing written for a run that never started


@FUZZ
@given(width=st.integers(1, 40), height=st.integers(1, 40), crop=st.sampled_from(["none", "center"]))
@example(width=1, height=1, crop="none")
@example(width=1, height=40, crop="center")
@example(width=40, height=1, crop="center")
def test_tiny_and_thin_images_load_to_the_training_size(width, height, crop):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "thin.png"
        Image.new("RGB", (width, height), GREEN).save(path)
        image = load_image(path, SIZE, crop)
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.uint8
    assert tuple(image[:, SIZE // 2, SIZE // 2].tolist()) == GREEN


@pytest.mark.parametrize("width, height", [(100_000, 100_000), (12_000, 12_000), (1, 2**31 - 1)])
def test_huge_declared_dimensions_are_skipped_as_too_large_without_allocating(tmp_path, width, height):
    # 12000 x 12000 lies between PIL's limit and twice it, where PIL only warns and would decode 432 MB
    Image.new("RGB", (4, 4), GREEN).save(tmp_path / "good.png")
    (tmp_path / "bomb.png").write_bytes(png_claiming(width, height))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    data, messages = load_warned(tmp_path)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert len(data) == 1 and len(messages) == 1
    assert "bomb.png" in messages[0] and "too large" in messages[0]
    assert grown_mib < 200


def test_pixel_limit_set_lower_is_respected(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (20, 20), GREEN).save(tmp_path / "small.png")  # 400: fine
    Image.new("RGB", (40, 40), GREEN).save(tmp_path / "warned.png")  # 1600: PIL would only warn
    Image.new("RGB", (100, 100), GREEN).save(tmp_path / "refused.png")  # 10000: PIL raises
    data, messages = load_warned(tmp_path)
    assert len(data) == 1
    assert sorted(re.search(r"(\w+)\.png", m).group(1) for m in messages) == ["refused", "warned"]
    assert all("too large" in m for m in messages)


def test_symlink_loop_dangling_link_and_fifo_do_not_hang_or_crash(tmp_path):
    root = tmp_path / "cars"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (4, 4), GREEN).save(root / "sub" / "a.png")
    os.symlink(root, root / "sub" / "loop")  # a directory link to an ancestor: os.walk does not follow it
    os.symlink(tmp_path / "nowhere.png", root / "dangling.png")
    os.mkfifo(root / "fifo.png")  # opening it for reading would block until a writer comes
    assert find_images(root) == sorted([root / "dangling.png", root / "fifo.png", root / "sub" / "a.png"])
    data, messages = load_warned(root)
    assert len(data) == 1
    assert len(messages) == 2 and any("dangling.png" in m for m in messages) and any("fifo.png" in m for m in messages)


# --- 2. config JSON ----------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
FIELDS = [(section, name) for section, values in SEED.to_dict().items() for name in values]


OPTIONAL_NON_NUMBERS = {("train", "compile"): False, ("train", "init_from"): ""}  # fields whose default is None


def clearly_wrong(value, default, field=None) -> bool:
    """A value no reading of the field's type accepts (independent of config.py's own check)."""
    if default is None and field in OPTIONAL_NON_NUMBERS:
        return value is not None and clearly_wrong(value, OPTIONAL_NON_NUMBERS[field])
    if isinstance(default, bool):
        return not isinstance(value, bool)
    if isinstance(default, (int, float)):
        return (
            value is None
            or isinstance(value, (bool, str, list, dict))
            or (isinstance(value, float) and not math.isfinite(value))
        )
    if isinstance(default, str):
        return not isinstance(value, str)
    if isinstance(default, (tuple, list)):
        return not isinstance(value, list)
    return isinstance(value, (bool, str, list, dict))  # None: an optional number


@settings(max_examples=30, deadline=None)
@given(field=st.sampled_from(FIELDS), value=JSON)
@example(field=("model", "channels"), value="64,128")
@example(field=("train", "batch_size"), value=True)
@example(field=("train", "lr"), value="1e-3")
@example(field=("train", "ema_decay"), value=float("nan"))
@example(field=("diffusion", "timesteps"), value=[1000])
@example(field=("data", "image_size"), value={"px": 64})
@example(field=("sample", "steps"), value=2.5)
@example(field=("train", "compile"), value=False)
@example(field=("train", "compile"), value="yes")
@example(field=("train", "init_from"), value="runs/a")
@example(field=("train", "init_from"), value=3)
def test_fuzzed_config_values_give_a_value_error_naming_the_field(field, value):
    section, name = field
    data = SEED.to_dict()
    default = data[section][name]
    data[section][name] = value
    try:
        config = RunConfig.from_dict(json.loads(json.dumps(data)))  # as from config.json
    except ValueError as err:
        message = str(err)
        assert len(message.splitlines()) == 1
        if clearly_wrong(value, default, field):
            assert f"{section}.{name}" in message, message
    else:
        assert not clearly_wrong(value, default, field), config
        assert RunConfig.from_dict(config.to_dict()) == config


@settings(max_examples=30, deadline=None)
@given(
    data=st.one_of(
        JSON,
        st.sampled_from(sorted(SEED.to_dict()))
        .flatmap(lambda s: st.tuples(st.just(s), JSON.filter(lambda v: not isinstance(v, dict))))
        .map(lambda kv: {kv[0]: kv[1]}),
        st.sampled_from(sorted(SEED.to_dict()))
        .flatmap(lambda s: st.tuples(st.just(s), st.text(min_size=1, max_size=8), JSON))
        .map(lambda t: {t[0]: {t[1]: t[2]}}),
    )
)
@example(data=[])
@example(data=[1, 2])
@example(data={"train": [1]})
@example(data={"model": "res_attn_unet"})
@example(data={"train": None})
@example(data={"trian": {}})
@example(data={"train": {"learning_rate": 1}})
def test_fuzzed_config_shapes_and_unknown_keys_give_a_value_error(data):
    try:
        RunConfig.from_dict(data)
    except ValueError as err:
        assert len(str(err).splitlines()) == 1
        if isinstance(data, dict) and len(data) == 1:
            ((section, values),) = data.items()
            if section not in SEED.to_dict():
                assert "unknown config sections" in str(err)
            elif not isinstance(values, dict):
                assert repr(section) in str(err)
            elif set(values) - set(SEED.to_dict()[section]) - {"center_crop"}:
                assert f"unknown {section} options" in str(err)


@settings(max_examples=30, deadline=None)
@given(content=st.one_of(st.binary(max_size=200), JSON.map(lambda v: json.dumps(v).encode())))
@example(content=b"\xff\xfe{}")
@example(content=b"[" * 100_000)
def test_fuzzed_config_files_load_or_give_one_value_error(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_bytes(content)
        try:
            RunConfig.load(path)
        except ValueError as err:
            assert str(path) in str(err) and len(str(err).splitlines()) == 1


@pytest.mark.parametrize(
    "config_text, message",
    [
        ("{not json", "cannot read config"),
        ("[1, 2]", "must be an object"),
        ('{"model": {"channels": "8,16"}}', "model.channels must be a list of integers"),
        ('{"train": {"lr": "fast"}}', "train.lr must be a finite number"),
        ('{"train": {"batch_size": true}}', "train.batch_size must be an integer"),
        ('{"train": 5}', "config section 'train' must be an object"),
    ],
)
@pytest.mark.parametrize("command", ["resume", "sample", "classes"])
def test_resume_or_sample_with_a_broken_config_json_exits_2_and_writes_nothing(
    run_copy, tmp_path, config_text, message, command
):
    (run_copy / ckpt.CONFIG_FILE).write_text(config_text)
    before = snapshot(run_copy)
    out = tmp_path / "samples"
    argv = {
        "resume": ["train", "--out", run_copy, "--resume"],
        "sample": ["sample", "--checkpoint", run_copy, "--out", out, "--num", "2"],
        "classes": ["classes", run_copy],
    }[command]
    assert_one_error_line(*run_cli(argv), message)
    assert snapshot(run_copy) == before and not out.exists()


# --- 3. checkpoints of another model, corrupt files -----------------------------


@pytest.mark.parametrize(
    "edit, what",
    [
        ({"channels": [16, 32]}, "differ in shape"),
        ({"num_res_blocks": 2}, "missing"),
        ({"attention_resolutions": []}, "unexpected"),
    ],
)
def test_sampling_weights_of_another_architecture_exits_2_with_one_line(run_copy, tmp_path, edit, what):
    config = json.loads((run_copy / ckpt.CONFIG_FILE).read_text())
    config["model"].update(edit)
    (run_copy / ckpt.CONFIG_FILE).write_text(json.dumps(config))
    before = snapshot(run_copy)
    out = tmp_path / "samples"
    line = assert_one_error_line(
        *run_cli(["sample", "--checkpoint", run_copy, "--out", out, "--num", "2"]), "do not fit", what
    )
    assert "ema.safetensors" in line
    assert snapshot(run_copy) == before and not out.exists()


def test_sampling_at_another_image_size_exits_2_with_one_line(run_copy, tmp_path):
    # at 32 px the 16x16 level has no attention of its own any more: the attention weights are left over
    config = json.loads((run_copy / ckpt.CONFIG_FILE).read_text())
    config["data"]["image_size"] = 32
    (run_copy / ckpt.CONFIG_FILE).write_text(json.dumps(config))
    out = tmp_path / "samples"
    assert_one_error_line(
        *run_cli(["sample", "--checkpoint", run_copy, "--out", out, "--num", "2", "--no-ema"]),
        "model.safetensors",
        "do not fit",
    )
    assert not out.exists()


def test_load_weights_into_a_different_model_is_a_value_error(trained_run):
    other = build_model(RunConfig(model=ModelConfig(channels=(8, 16), time_emb_dim=8), data=DataConfig(image_size=16)))
    with pytest.raises(ValueError, match="do not fit") as excinfo:
        ckpt.load_weights(other, ckpt.latest_checkpoint(trained_run))
    assert len(str(excinfo.value).splitlines()) == 1


@FUZZ
@given(content=st.one_of(st.binary(max_size=300), st.integers(0, 10_000)), ema=st.booleans())
def test_corrupt_or_truncated_weights_are_a_value_error_naming_the_file(trained_run, tmp_path, content, ema):
    checkpoint = ckpt.latest_checkpoint(trained_run)
    name = ckpt.EMA_FILE if ema else ckpt.MODEL_FILE
    whole = (checkpoint / name).read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        broken = Path(tmp) / checkpoint.name
        broken.mkdir()
        (broken / name).write_bytes(whole[:content] if isinstance(content, int) else content)
        model = build_model(RunConfig.load(trained_run / ckpt.CONFIG_FILE))
        with pytest.raises(ValueError) as excinfo:
            ckpt.load_weights(model, broken, ema=ema)
    assert str(broken / name) in str(excinfo.value) and len(str(excinfo.value).splitlines()) == 1


@FUZZ
@given(content=st.one_of(st.binary(max_size=300), st.integers(0, 2000)))
@example(content=b"")
def test_corrupt_train_state_is_a_value_error(trained_run, content):
    checkpoint = ckpt.latest_checkpoint(trained_run)
    whole = (checkpoint / ckpt.STATE_FILE).read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / ckpt.STATE_FILE).write_bytes(whole[:content] if isinstance(content, int) else content)
        with pytest.raises(ValueError, match="cannot read training state") as excinfo:
            ckpt.load_train_state(Path(tmp))
    assert len(str(excinfo.value).splitlines()) == 1


def test_train_state_of_another_shape_is_a_value_error(tmp_path):
    torch.save({"step": 3}, tmp_path / ckpt.STATE_FILE)
    with pytest.raises(ValueError, match="not a training state"):
        ckpt.load_train_state(tmp_path)


@pytest.mark.parametrize("broken", [ckpt.STATE_FILE, ckpt.MODEL_FILE, ckpt.EMA_FILE])
def test_resume_from_a_corrupt_checkpoint_exits_2_and_changes_nothing(run_copy, broken):
    target = ckpt.latest_checkpoint(run_copy) / broken
    target.write_bytes(os.urandom(64))
    before = snapshot(run_copy)
    assert_one_error_line(*run_cli(["train", "--out", run_copy, "--resume"]), str(target))
    assert snapshot(run_copy) == before


def test_sample_from_a_truncated_safetensors_exits_2(run_copy, tmp_path):
    target = ckpt.latest_checkpoint(run_copy) / ckpt.EMA_FILE
    target.write_bytes(target.read_bytes()[:100])
    before = snapshot(run_copy)
    out = tmp_path / "samples"
    assert_one_error_line(
        *run_cli(["sample", "--checkpoint", run_copy, "--out", out]), "cannot read weights", str(target)
    )
    assert snapshot(run_copy) == before and not out.exists()


# --- 4. command-line values out of range --------------------------------------

VALUES = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        [
            "nan",
            "NaN",
            "-nan",
            "inf",
            "-inf",
            "Infinity",
            "1e400",
            "1e-400",
            "-0",
            "0",
            "0.0",
            "1",
            "0.5",
            "",
            " ",
            "1_000",
            "0x10",
            "True",
            "None",
            "1,2",
            "\u0663",
        ]
    ),
    st.text(alphabet="0123456789.-+eEinfatx_ ", max_size=8),
)
TRAIN_FLAGS = [
    "--batch-size",
    "--lr",
    "--image-size",
    "--steps",
    "--dropout",
    "--ema-decay",
    "--label-dropout",
    "--weight-decay",
    "--vlb-weight",
    "--bbox-margin",
    "--warmup-steps",
    "--seed",
    "--grad-clip",
    "--timesteps",
    "--sample-steps",
    "--eta",
    "--grad-accum",
    "--eval-every",
]


def parses_to_non_finite(text: str) -> bool:
    try:
        return not math.isfinite(float(text))
    except ValueError:
        return False


@FUZZ
@given(
    flags=st.lists(st.tuples(st.sampled_from(TRAIN_FLAGS), VALUES), min_size=1, max_size=3, unique_by=lambda fv: fv[0])
)
@example(flags=[("--ema-decay", "nan")])
@example(flags=[("--ema-decay", "1.0")])
@example(flags=[("--vlb-weight", "nan")])
@example(flags=[("--weight-decay", "inf")])
@example(flags=[("--eta", "inf")])
@example(flags=[("--seed", str(2**64))])
@example(flags=[("--bbox-margin", "nan")])
@example(flags=[("--lr", "1e-400")])
def test_fuzzed_train_flags_run_or_exit_2_with_one_line(flags, monkeypatch, tmp_path):
    started = []

    def fake_train(config, run_dir, **kwargs):  # training itself is not under test: record what it got
        started.append(config)
        return types.SimpleNamespace(step=0, last_loss=0.0, run_dir=run_dir)

    monkeypatch.setattr(commands.training, "train_run", fake_train)
    out = tmp_path / "never"
    code, err = run_cli(["train", "--out", out, *TINY] + [f"{flag}={value}" for flag, value in flags])
    if started:
        assert code == 0, err
        config = started[0]
        assert RunConfig.from_dict(config.to_dict()) == config  # a valid config went to training
        assert not any(parses_to_non_finite(value) for _, value in flags), flags
    else:
        assert_one_error_line(code, err)
    assert not out.exists()


@FUZZ
@given(
    flags=st.lists(
        st.tuples(st.sampled_from(["--num", "--batch-size", "--guidance", "--eta", "--steps", "--seed"]), VALUES),
        min_size=1,
        max_size=3,
        unique_by=lambda fv: fv[0],
    ),
    with_class=st.booleans(),
)
@example(flags=[("--guidance", "nan")], with_class=False)
@example(flags=[("--steps", "21")], with_class=False)
@example(flags=[("--eta", "inf")], with_class=False)
def test_fuzzed_sample_flags_run_or_exit_2_with_one_line(trained_run, tmp_path, monkeypatch, flags, with_class):
    monkeypatch.setattr(distributed, "generate_across_ranks", lambda *a, **k: None)  # as on a rank that writes nothing
    before = snapshot(trained_run)
    out = tmp_path / "samples"
    argv = ["sample", "--checkpoint", trained_run, "--out", out] + [f"{flag}={value}" for flag, value in flags]
    argv += ["--class", "0"] if with_class else []
    code, err = run_cli(argv)
    if code != 0:
        assert_one_error_line(code, err)
    else:
        assert not any(parses_to_non_finite(value) for _, value in flags), flags
    assert snapshot(trained_run) == before and not out.exists()
