"""The decoded-image cache: built once, opened as a memory map, rebuilt when its source
changes or it is damaged, never read half-built, built once by concurrent processes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_cars.config import DataConfig, RunConfig, TrainConfig
from ddpm_cars.data import build_dataset, cache, toy_cars_dataset
from ddpm_cars.data import toy_cars as toy_cars_module
from ddpm_cars.data.dataset import DataError
from ddpm_cars.data.folder import Decoded, ImageDecodeWarning, load_image_folder
from ddpm_cars.parallel import World
from ddpm_cars.training.batches import Batches, Position, epoch_order

SRC = str(Path(__file__).resolve().parents[1] / "src")


def image_folder(root: Path, count: int = 12, broken: int = 1) -> Path:
    """``count`` small PNGs of different colours in two class folders, and ``broken`` files that are not images."""
    rng = np.random.default_rng(0)
    for i in range(count):
        path = root / ("red" if i % 2 else "blue") / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (10 + i, 14, 3), dtype=np.uint8)).save(path)
    for i in range(broken):
        (root / "red" / f"broken{i}.png").write_bytes(b"not a png")
    return root


def mapped_file(images: torch.Tensor) -> Path | None:
    """The file whose memory map holds ``images`` (from /proc/self/maps), or None."""
    address = images.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(a, 16) for a in fields[0].split("-"))
        if low <= address < high and len(fields) == 6:
            return Path(fields[5].strip())
    return None


def entries(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir() if p.is_dir())


def test_folder_decoded_once_then_memory_mapped_with_the_same_images_and_warnings(tmp_path):
    folder, cache_dir = image_folder(tmp_path / "imgs"), tmp_path / "cache"
    config = DataConfig(source=str(folder), image_size=16, cache=str(cache_dir))
    with pytest.warns(ImageDecodeWarning, match="broken0.png"):
        expected = load_image_folder(folder, 16, progress=False)
    for _ in range(2):  # the first run builds, the second opens
        with pytest.warns(ImageDecodeWarning, match="broken0.png") as record:
            data = build_dataset(config, progress=False)
        assert len([w for w in record if w.category is ImageDecodeWarning]) == 1
        assert torch.equal(data.images, expected.images) and torch.equal(data.labels, expected.labels)
        assert data.class_names == expected.class_names == ["blue", "red"]
    (entry,) = entries(cache_dir)
    assert entry.startswith("imgs-16px-")
    assert (cache_dir / entry / cache.IMAGES).stat().st_size == 12 * 3 * 16 * 16
    meta = json.loads((cache_dir / entry / cache.META).read_text())
    assert meta["count"] == 12 and meta["skipped"][0][0].endswith("broken0.png")
    assert mapped_file(data.images) == cache_dir / entry / cache.IMAGES
    # the images are a copy-on-write map of the file: changing them leaves the file as it was
    data.images[0].fill_(7)
    with pytest.warns(ImageDecodeWarning):
        assert torch.equal(build_dataset(config, progress=False).images[0], expected.images[0])


def test_second_open_does_not_decode(tmp_path, monkeypatch):
    folder, cache_dir = image_folder(tmp_path / "imgs", broken=0), tmp_path / "cache"
    config = DataConfig(source=str(folder), image_size=16, cache=str(cache_dir))
    build_dataset(config, progress=False)
    monkeypatch.setattr("ddpm_cars.data.folder._decode", lambda *a: pytest.fail("decoded again"))
    assert len(build_dataset(config, progress=False)) == 12


def test_changed_file_size_crop_or_margin_is_another_entry(tmp_path):
    folder, cache_dir = image_folder(tmp_path / "imgs", broken=0), tmp_path / "cache"
    config = DataConfig(source=str(folder), image_size=16, cache=str(cache_dir))
    first = build_dataset(config, progress=False)
    build_dataset(config.__class__(**{**config.__dict__, "image_size": 32}), progress=False)
    build_dataset(config.__class__(**{**config.__dict__, "crop": "center"}), progress=False)
    assert len(entries(cache_dir)) == 3
    Image.new("RGB", (5, 5), (0, 255, 0)).save(folder / "blue" / "000.png")  # same name, new content
    changed = build_dataset(config, progress=False)
    assert len(entries(cache_dir)) == 4
    assert not torch.equal(changed.images[0], first.images[0]) and torch.equal(changed.images[1:], first.images[1:])
    assert torch.equal(changed.images[0, 1], torch.full((16, 16), 255, dtype=torch.uint8))  # the new green image
    (folder / "red" / "extra.png").write_bytes((folder / "red" / "001.png").read_bytes())
    assert len(build_dataset(config, progress=False)) == 13


@pytest.mark.parametrize("damage", ["truncate", "no-meta", "bad-meta", "no-labels", "other-format"])
def test_damaged_entry_is_rebuilt_not_read(tmp_path, damage):
    folder, cache_dir = image_folder(tmp_path / "imgs", broken=0), tmp_path / "cache"
    config = DataConfig(source=str(folder), image_size=16, cache=str(cache_dir))
    expected = build_dataset(config, progress=False).images.clone()
    entry = cache_dir / entries(cache_dir)[0]
    if damage == "truncate":
        os.truncate(entry / cache.IMAGES, 100)
    elif damage == "no-meta":
        (entry / cache.META).unlink()
    elif damage == "bad-meta":
        (entry / cache.META).write_text('{"count": 12, "image_size"')
    elif damage == "no-labels":
        (entry / cache.LABELS).unlink()
    else:
        meta = json.loads((entry / cache.META).read_text())
        (entry / cache.META).write_text(json.dumps({**meta, "format": cache.FORMAT + 1}))
    assert cache.open_entry(entry) is None
    assert torch.equal(build_dataset(config, progress=False).images, expected)
    assert cache.open_entry(entry) is not None and entries(cache_dir) == [entry.name]


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": SRC, **env},
    )


def test_a_build_killed_halfway_leaves_nothing_read_as_complete(tmp_path):
    """SIGKILL while the images are being written: no entry; the next run builds it whole."""
    folder, cache_dir = image_folder(tmp_path / "imgs", count=40, broken=0), tmp_path / "cache"
    killed = run_python(f"""
        import os, signal, time
        from pathlib import Path
        from ddpm_cars.config import DataConfig
        from ddpm_cars.data import build_dataset, folder
        real = folder._decode
        def decode_then_die(*args):
            time.sleep(0.02)
            if any(p.stat().st_size for p in Path({str(cache_dir)!r}).glob("*.partial-*/images.u8")):
                os.kill(os.getpid(), signal.SIGKILL)  # some images are on disk, not all
            return real(*args)
        folder._decode = decode_then_die
        build_dataset(DataConfig(source={str(folder)!r}, image_size=16, cache={str(cache_dir)!r}), progress=False)
    """)
    assert killed.returncode == -9, killed.stderr
    partial = [p for p in cache_dir.iterdir() if ".partial-" in p.name]
    assert partial and 0 < (partial[0] / cache.IMAGES).stat().st_size < 40 * 3 * 16 * 16  # killed mid-write
    assert entries(cache_dir) == [partial[0].name]  # the only folder is the partial one
    complete = cache_dir / partial[0].name.split(".partial-")[0]
    assert cache.open_entry(complete) is None and cache.open_entry(partial[0]) is None
    data = build_dataset(DataConfig(source=str(folder), image_size=16, cache=str(cache_dir)), progress=False)
    assert torch.equal(data.images, load_image_folder(folder, 16, progress=False).images)
    assert entries(cache_dir) == [complete.name]  # the partial one is cleaned up


def test_concurrent_processes_build_once_and_read_the_same(tmp_path):
    folder, cache_dir, log = image_folder(tmp_path / "imgs", count=30, broken=0), tmp_path / "cache", tmp_path / "log"
    code = f"""
        import time, torch
        from ddpm_cars.config import DataConfig
        from ddpm_cars.data import build_dataset, folder
        real = folder.decode_listing
        def slow_decode(*args, **kwargs):
            with open({str(log)!r}, "a") as f:
                f.write("build\\n")
            time.sleep(1.5)  # the other process arrives while this one builds
            return real(*args, **kwargs)
        folder.decode_listing = slow_decode
        import ddpm_cars.data as data
        data.decode_listing = slow_decode
        images = build_dataset(DataConfig(source={str(folder)!r}, image_size=16, cache={str(cache_dir)!r})).images
        print(int(images.long().sum()), len(images))
    """
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": SRC},
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert log.read_text() == "build\n"
    expected = load_image_folder(folder, 16, progress=False).images
    assert {out for out, _ in outputs} == {f"{int(expected.long().sum())} 30\n"}
    assert "Waiting for another process" in "".join(err for _, err in outputs)


def test_toy_cars_are_cached_with_the_generator_bytes(tmp_path, monkeypatch):
    config = DataConfig(source="toy-cars", image_size=16, toy_count=40, cache=str(tmp_path))
    expected = toy_cars_dataset(40, 16)
    first = build_dataset(config, progress=False)
    monkeypatch.setattr("ddpm_cars.data.generate_toy_cars", lambda *a: pytest.fail("generated again"))
    again = build_dataset(config, progress=False)
    test_split = DataConfig(source="toy-cars", image_size=16, toy_count=40, cache=str(tmp_path), split="test")
    with pytest.raises(pytest.fail.Exception, match="generated again"):  # other images: another entry
        build_dataset(test_split, progress=False)
    for data in (first, again):
        assert torch.equal(data.images, expected.images) and torch.equal(data.labels, expected.labels)
        assert data.class_names == expected.class_names


def test_toy_car_entry_depends_on_the_generator_code(tmp_path, monkeypatch):
    key = {"name": "toy-cars", "image_size": 16, "code": cache.code_stamp(toy_cars_module)}
    source = tmp_path / "toy_cars_edited.py"
    source.write_text(Path(toy_cars_module.__file__).read_text() + "\n# edited\n")
    monkeypatch.setattr(toy_cars_module, "__file__", str(source))
    assert cache.entry_name(key) != cache.entry_name({**key, "code": cache.code_stamp(toy_cars_module)})


def test_cache_off_and_unwritable_cache_decode_into_memory(tmp_path):
    folder = image_folder(tmp_path / "imgs", broken=0)
    expected = load_image_folder(folder, 16, progress=False).images
    off = build_dataset(DataConfig(source=str(folder), image_size=16, cache="off"), progress=False)
    assert torch.equal(off.images, expected)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.warns(cache.CacheWarning, match="cannot use the data cache in .*file.*decoding into memory"):
        data = build_dataset(DataConfig(source=str(folder), image_size=16, cache=str(not_a_folder)), progress=False)
    assert torch.equal(data.images, expected)


def test_no_room_for_the_cache_is_one_clear_error(tmp_path, monkeypatch):
    folder = image_folder(tmp_path / "imgs", broken=0)
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    with pytest.raises(DataError, match=r"needs 0\.00 GB .* 0\.00 GB are free; make room.*--data-cache off"):
        build_dataset(DataConfig(source=str(folder), image_size=16, cache=str(tmp_path / "c")), progress=False)
    assert not [p for p in (tmp_path / "c").iterdir() if p.is_dir()]


def test_write_error_removes_the_partial_entry(tmp_path):
    def fill(write):
        write(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
        raise OSError(28, "No space left on device")

    with pytest.raises(DataError, match="cannot write the data cache .*No space left on device"):
        cache.load({"name": "x", "image_size": 4}, 2, fill, tmp_path)
    assert entries(tmp_path) == []


def test_default_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "mine"))
    assert cache.resolve_dir("auto") == tmp_path / "mine" / "data"
    monkeypatch.delenv(cache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.resolve_dir("auto") == tmp_path / "xdg" / "ddpm-cars" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache.resolve_dir("auto") == Path.home() / ".cache" / "ddpm-cars" / "data"
    assert cache.resolve_dir("off") is None
    assert cache.resolve_dir("~/x") == Path.home() / "x"


def test_load_returns_what_fill_decoded(tmp_path):
    def fill(write):
        write(torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4))
        write(torch.full((1, 3, 4, 4), 9, dtype=torch.uint8))
        return Decoded([1, 0, 1], ["a", "b"], [("gone.png", "broken")], outside=2)

    for cache_dir in (tmp_path, None):
        data, decoded = cache.load({"name": "x", "image_size": 4}, 4, fill, cache_dir)
        assert data.images.shape == (3, 3, 4, 4) and data.images[2].eq(9).all()
        assert data.labels.tolist() == [1, 0, 1] and data.class_names == ["a", "b"]
        assert decoded.skipped == [("gone.png", "broken")] and decoded.outside == 2


# --- batches drawn from the cache -------------------------------------------------


def test_batches_from_the_cache_equal_batches_from_memory_across_epochs_and_a_resume(tmp_path):
    """Prefetching one batch ahead, from a memory map, draws what gathering each batch did."""
    data_cfg = DataConfig(source="toy-cars", image_size=16, toy_count=50, cache=str(tmp_path))
    config = RunConfig(data=data_cfg, train=TrainConfig(batch_size=16, seed=3))
    mapped = build_dataset(data_cfg, progress=False)
    in_memory = toy_cars_dataset(50, 16)
    world, cpu = World(), torch.device("cpu")
    batches = Batches(mapped, config, world, cpu)
    rng = torch.Generator().manual_seed(0)
    ref_rng = torch.Generator().manual_seed(0)
    position = Position()
    for step in range(7):  # 3 batches per epoch: crosses two epoch ends
        position.epoch, position.consumed = divmod(step, 3)
        if step == 4:  # a resume: a new Batches object, nothing fetched ahead
            batches = Batches(mapped, config, world, cpu)
        batch = batches.draw(position, rng, 10)
        idx = epoch_order(50, 3, position.epoch)[position.consumed * 16 : (position.consumed + 1) * 16]
        x0 = in_memory.images[idx].float().div(127.5).sub(1)
        flip = torch.rand(16, generator=ref_rng) < 0.5
        x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
        t = torch.randint(0, 10, (16,), generator=ref_rng)
        noise = torch.randn((16, 3, 16, 16), generator=ref_rng)
        assert torch.equal(batch.x0, x0) and torch.equal(batch.t, t) and torch.equal(batch.noise, noise)


def test_another_cache_folder_is_allowed_on_resume(tiny_config):
    from ddpm_cars.errors import UserError

    assert tiny_config.resumed_with({"data": {"cache": "off"}}).data.cache == "off"
    with pytest.raises(UserError, match="cannot change data.toy_count when resuming"):
        tiny_config.resumed_with({"data": {"toy_count": 5}})


def test_only_a_relative_folder_path_ties_the_entry_to_the_working_directory(tmp_path, monkeypatch):
    folder, cache_dir = image_folder(tmp_path / "imgs", broken=0), tmp_path / "cache"
    monkeypatch.chdir(tmp_path)
    build_dataset(DataConfig(source="imgs", image_size=16, cache=str(cache_dir)), progress=False)
    build_dataset(DataConfig(source=str(folder), image_size=16, cache=str(cache_dir)), progress=False)
    assert len(entries(cache_dir)) == 2  # "imgs" means another folder in another directory
    monkeypatch.chdir(folder)
    build_dataset(DataConfig(source=str(folder), image_size=16, cache=str(cache_dir)), progress=False)
    assert len(entries(cache_dir)) == 2  # an absolute path's entry is found from anywhere


def grey_folder(root: Path, count: int = 6) -> Path:
    """``count`` small grayscale PNGs (mode L) in one class folder."""
    rng = np.random.default_rng(1)
    for i in range(count):
        path = root / "scans" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 9 + i), dtype=np.uint8)).save(path)
    return root


def test_an_entry_records_its_channel_count_and_serves_the_count_auto_found(tmp_path):
    folder, cache_dir = grey_folder(tmp_path / "imgs"), tmp_path / "cache"
    config = DataConfig(source=str(folder), image_size=16, cache=str(cache_dir))
    grey = build_dataset(config, progress=False)
    assert grey.images.shape == (6, 1, 16, 16) and mapped_file(grey.images) is not None
    entry = cache_dir / entries(cache_dir)[0]
    meta = json.loads((entry / cache.META).read_text())
    assert meta["channels"] == 1 and meta["format"] == cache.FORMAT == 2
    assert (entry / cache.IMAGES).stat().st_size == 6 * 1 * 16 * 16
    expected = load_image_folder(folder, 16, progress=False).images
    assert torch.equal(build_dataset(config, progress=False).images, expected)  # opened, not decoded again
    rgb = build_dataset(dataclasses.replace(config, image_channels="3"), progress=False)
    assert rgb.images.shape == (6, 3, 16, 16) and torch.equal(rgb.images, expected.expand(-1, 3, -1, -1))
    assert len(entries(cache_dir)) == 2  # auto found 1; 3 is another entry
    grey = build_dataset(dataclasses.replace(config, image_channels="1"), progress=False)
    assert torch.equal(grey.images, expected) and mapped_file(grey.images) == entry / cache.IMAGES
    assert len(entries(cache_dir)) == 2  # a run trained with auto records 1 and opens the same entry


def test_an_entry_from_before_the_channel_count_is_rebuilt_never_misread(tmp_path):
    folder, cache_dir = grey_folder(tmp_path / "imgs"), tmp_path / "cache"
    config = DataConfig(source=str(folder), image_size=16, cache=str(cache_dir))
    expected = build_dataset(config, progress=False).images.clone()
    entry = cache_dir / entries(cache_dir)[0]
    # the layout of format 1: three channels, no "channels" in meta.json, same byte count as 3 x this entry's
    meta = json.loads((entry / cache.META).read_text())
    del meta["channels"]
    (entry / cache.META).write_text(json.dumps({**meta, "format": 1, "count": 2}))
    assert cache.open_entry(entry) is None
    assert torch.equal(build_dataset(config, progress=False).images, expected)
    assert json.loads((entry / cache.META).read_text())["channels"] == 1


def test_grey_toy_cars_are_the_luma_of_the_colour_ones(tmp_path):
    config = DataConfig(image_size=16, toy_count=8, cache=str(tmp_path / "cache"))
    rgb = build_dataset(config, progress=False).images
    grey = build_dataset(dataclasses.replace(config, image_channels="1"), progress=False).images
    assert rgb.shape == (8, 3, 16, 16) and grey.shape == (8, 1, 16, 16)
    first = np.asarray(Image.fromarray(rgb[0].permute(1, 2, 0).numpy()).convert("L"))
    assert np.array_equal(grey[0, 0].numpy(), first)  # PIL's own conversion of the colour image
    assert torch.equal(build_dataset(dataclasses.replace(config, image_channels="3"), progress=False).images, rgb)
