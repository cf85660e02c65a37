"""The cache folder: entries of every kind (data, reference features, the toy-car judge)
listed with their size, source and times, removed by age, by size (least recently used
first) or all, bounded on every write by $DDPM_CARS_CACHE_MAX_GB, and ``ddpm-cars cache``
on top."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ddpm_cars import caches
from ddpm_cars.caches import CacheEntry, CacheRequest
from ddpm_cars.cli import main
from ddpm_cars.config import DataConfig
from ddpm_cars.data import build_dataset, cache
from ddpm_cars.errors import UserError
from ddpm_cars.evaluation.class_accuracy import ClassifierTraining
from ddpm_cars.evaluation.judge import JudgeRecipe, describe_judge, load_judge
from ddpm_cars.evaluation.reference import cached_features

DAY = 86400
SMALL_JUDGE = JudgeRecipe(images=32, training=ClassifierTraining(steps=2, batch_size=16))


@pytest.fixture(autouse=True)
def _no_limit(monkeypatch):
    monkeypatch.delenv(caches.MAX_GB_ENV, raising=False)


def toy_entry(root: Path, count: int = 20) -> Path:
    """A toy-cars data entry under ``root/data``, built through build_dataset."""
    build_dataset(DataConfig(source="toy-cars", image_size=16, toy_count=count, cache=str(root / "data")), False)
    return only(root / "data", "toy-cars-16px-", lambda p: json.loads((p / cache.META).read_text())["count"] == count)


def features_entry(root: Path, count: int = 6, description: str = "toy-cars-train-16px") -> Path:
    """A features entry under ``root/reference``, computed by a trivial feature function."""
    images = torch.arange(count * 3 * 4 * 4, dtype=torch.int64).remainder(256).to(torch.uint8).view(count, 3, 4, 4)
    cached_features(images, description, "mean", lambda x: x.flatten(1).double().mean(1, keepdim=True), root)
    return only(root / "reference", f"{description}_n{count}_")


def judge_entry(root: Path, size: int = 16) -> Path:
    """A judge entry under ``root/judge``: a small recipe's weights, trained at first use."""
    load_judge(size, SMALL_JUDGE, root)
    return only(root / "judge", f"toy-cars-judge_{size}px_")


def only(folder: Path, prefix: str, keep=lambda p: True) -> Path:
    found = [p for p in folder.iterdir() if p.name.startswith(prefix) and not p.name.endswith(".lock")]
    (path,) = [p for p in found if ".partial-" not in p.name and keep(p)]
    return path


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def image_folder(root: Path, count: int = 4) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def used_at(entry: Path, seconds: float) -> None:
    """Set an entry's last use (what opening it records) to ``seconds``."""
    marker = entry / cache.META if entry.is_dir() else caches.used_marker(entry)
    os.utime(marker, (seconds, seconds))


def by_path(entries: list[CacheEntry]) -> dict[Path, CacheEntry]:
    return {e.path: e for e in entries}


# --- listing ---------------------------------------------------------------------


def test_entries_of_every_kind_list_their_size_source_and_times(tmp_path):
    started = time.time()
    toy, features, judge = toy_entry(tmp_path), features_entry(tmp_path), judge_entry(tmp_path)
    entries = by_path(caches.list_entries(tmp_path))
    assert set(entries) == {toy, features, judge}
    assert entries[toy].kind == "data" and entries[features].kind == "features" and entries[judge].kind == "judge"
    for path, entry in entries.items():
        assert entry.size == disk_bytes(path) > 0
        assert started - 1 <= entry.built <= entry.last_used <= time.time()
    assert entries[toy].source == "toy-cars (seed 0, 20 images)"
    assert entries[features].source == "toy-cars-train-16px (6 images, mean)"
    assert entries[judge].source == describe_judge(16, SMALL_JUDGE)
    assert json.loads((toy / cache.META).read_text())["source"] == "toy-cars (seed 0, 20 images)"


def test_a_folder_entry_records_the_full_path_of_its_folder(tmp_path, monkeypatch):
    folder = image_folder(tmp_path / "photos" / "cars")
    monkeypatch.chdir(tmp_path / "photos")  # a relative source is recorded resolved
    build_dataset(DataConfig(source="cars", image_size=16, cache=str(tmp_path / "c" / "data")), progress=False)
    (entry,) = caches.list_entries(tmp_path / "c")
    assert entry.source == str(folder.resolve()) and entry.size == disk_bytes(entry.path)


def test_opening_an_entry_records_its_last_use(tmp_path):
    toy, features, judge = toy_entry(tmp_path), features_entry(tmp_path), judge_entry(tmp_path)
    long_ago = time.time() - 30 * DAY
    for path in (toy, features, judge):
        used_at(path, long_ago)
    before = caches.list_entries(tmp_path)
    assert all(e.last_used == pytest.approx(long_ago) for e in before)
    toy_entry(tmp_path)  # opened from the cache
    features_entry(tmp_path)
    judge_entry(tmp_path)
    after = caches.list_entries(tmp_path)
    assert all(e.last_used > long_ago + 29 * DAY for e in after)
    assert {e.path: e.built for e in after} == {e.path: e.built for e in before}  # opened, not rebuilt


def test_a_read_only_marker_never_fails_a_run(tmp_path, monkeypatch):
    toy = toy_entry(tmp_path)
    monkeypatch.setattr(Path, "touch", lambda self, *a, **k: (_ for _ in ()).throw(PermissionError(13, "read-only")))
    assert build_dataset(DataConfig(source="toy-cars", image_size=16, toy_count=20, cache=str(toy.parent)), False)
    assert features_entry(tmp_path).is_file() and judge_entry(tmp_path).is_file()


def test_entries_written_before_the_record_list_as_unknown_used_when_last_written(tmp_path):
    toy = toy_entry(tmp_path)
    meta = json.loads((toy / cache.META).read_text())
    del meta["source"], meta["built"]
    (toy / cache.META).write_text(json.dumps(meta))
    old = tmp_path / "reference" / "old_n2_abc_mean.safetensors"
    old.parent.mkdir()
    save_file({"features": torch.zeros(2, 1)}, old, metadata={"description": "old", "features": "mean"})
    then = time.time() - 3 * DAY
    for path in (toy / cache.META, toy / cache.IMAGES, old):
        os.utime(path, (then, then))
    entries = by_path(caches.list_entries(tmp_path))
    for path in (toy, old):
        assert entries[path].source == "unknown"
        assert entries[path].last_used == entries[path].built == pytest.approx(then)
    assert entries[old].size == old.stat().st_size


def test_builds_in_progress_locks_and_temporary_files_are_not_entries(tmp_path):
    toy = toy_entry(tmp_path)
    partial = toy.parent / f"{toy.name}.partial-99999"
    partial.mkdir()
    (partial / cache.IMAGES).write_bytes(b"half")
    (partial / cache.META).write_text("{}")
    (tmp_path / "reference").mkdir()
    (tmp_path / "reference" / ".x.safetensors.123.tmp").write_bytes(b"half")
    (tmp_path / "judge").mkdir()
    (tmp_path / "judge" / ".y.safetensors.456.tmp").write_bytes(b"half")
    (tmp_path / "data" / "notes").mkdir()  # not of the cache's layout
    assert [e.path for e in caches.list_entries(tmp_path)] == [toy]
    assert main(["cache", "--cache-dir", str(tmp_path), "--clear"]) == 0
    assert partial.is_dir() and caches.lock_path(toy).is_file() and (tmp_path / "data" / "notes").is_dir()
    assert (tmp_path / "reference" / ".x.safetensors.123.tmp").is_file() and not toy.exists()
    assert (tmp_path / "judge" / ".y.safetensors.456.tmp").is_file()


def test_a_data_cache_folder_of_its_own_lists_too(tmp_path):
    build_dataset(DataConfig(source="toy-cars", image_size=16, toy_count=20, cache=str(tmp_path / "mine")), False)
    (entry,) = caches.list_entries(tmp_path / "mine")
    assert entry.kind == "data" and entry.path.parent == tmp_path / "mine"


# --- removing --------------------------------------------------------------------


def test_older_than_picks_the_entries_unused_for_that_many_days(tmp_path):
    toy, features = toy_entry(tmp_path), features_entry(tmp_path)
    now = time.time()
    used_at(toy, now - 10 * DAY)
    used_at(features, now - 2 * DAY)
    entries = caches.list_entries(tmp_path)
    assert [e.path for e in caches.older_than(entries, 5, now)] == [toy]
    assert {e.path for e in caches.older_than(entries, 1, now)} == {toy, features}
    assert caches.older_than(entries, 11, now) == []


def test_evict_to_removes_the_least_recently_used_first(tmp_path):
    entries = {n: toy_entry(tmp_path, n) for n in (20, 30, 40)}
    features = features_entry(tmp_path)
    now = time.time()
    for age, path in enumerate([entries[30], features, entries[20], entries[40]]):  # most recently used first
        used_at(path, now - age * DAY)
    listed = caches.list_entries(tmp_path)
    sizes = {e.path: e.size for e in listed}
    total = sum(sizes.values())
    removed = caches.evict_to(listed, total - sizes[entries[40]])  # the oldest alone makes room
    assert [e.path for e in removed] == [entries[40]] and not entries[40].exists()
    removed = caches.evict_to(caches.list_entries(tmp_path), sizes[entries[30]] + sizes[features])
    assert [e.path for e in removed] == [entries[20]]
    assert [e.path for e in caches.list_entries(tmp_path)] == [entries[30], features]
    assert caches.evict_to(caches.list_entries(tmp_path), total) == []


def test_an_entry_being_built_is_not_removed(tmp_path):
    import fcntl

    toy = toy_entry(tmp_path)
    with open(caches.lock_path(toy), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # as a build holds it
        assert caches.remove(caches.list_entries(tmp_path)) == []
    assert toy.is_dir()
    assert [e.path for e in caches.remove(caches.list_entries(tmp_path))] == [toy] and not toy.exists()


def test_remove_touches_nothing_outside_the_cache_layout(tmp_path):
    stranger = tmp_path / "elsewhere"
    stranger.mkdir()
    (stranger / "meta.json").write_text("{}")  # no images: not a data entry
    lone = tmp_path / "notes.safetensors"  # not in a reference/ folder
    lone.write_bytes(b"x")
    fake = [
        CacheEntry("data", stranger, 2, "?", 0, 0),
        CacheEntry("features", lone, 1, "?", 0, 0),
        CacheEntry("judge", lone, 1, "?", 0, 0),
    ]
    assert caches.remove(fake) == [] and stranger.is_dir() and lone.is_file()


# --- the size limit on write ------------------------------------------------------


def test_the_size_limit_evicts_least_recently_used_entries_when_one_is_written(tmp_path, monkeypatch):
    first = toy_entry(tmp_path, 20)
    features = features_entry(tmp_path)
    used_at(first, time.time() - DAY)
    limit = disk_bytes(first) + disk_bytes(features) + 2000  # room for one data entry and the features
    monkeypatch.setenv(caches.MAX_GB_ENV, str(limit / 1e9))
    second = toy_entry(tmp_path, 21)
    assert not first.exists() and second.is_dir() and features.is_file()
    monkeypatch.setenv(caches.MAX_GB_ENV, "1e-9")  # 1 byte: everything but what was just written goes
    newest = features_entry(tmp_path, 5)
    assert [e.path for e in caches.list_entries(tmp_path)] == [newest]
    monkeypatch.setenv(caches.MAX_GB_ENV, "1e-9")
    toy_entry(tmp_path, 22)  # a data write bounds the features too
    assert [e.kind for e in caches.list_entries(tmp_path)] == ["data"]


def test_judge_entries_are_removed_by_age_and_bound_the_cache_when_written(tmp_path, monkeypatch):
    toy, judge = toy_entry(tmp_path), judge_entry(tmp_path)
    now = time.time()
    used_at(judge, now - 10 * DAY)
    stale = caches.older_than(caches.list_entries(tmp_path), 5, now)
    assert [e.path for e in caches.remove(stale)] == [judge]
    assert not judge.exists() and not caches.used_marker(judge).exists() and toy.is_dir()
    monkeypatch.setenv(caches.MAX_GB_ENV, "1e-9")  # 1 byte: writing the judge evicts the rest
    judge = judge_entry(tmp_path)  # trained again: it was removed
    assert [(e.kind, e.path) for e in caches.list_entries(tmp_path)] == [("judge", judge)] and not toy.exists()


def test_a_bad_size_limit_warns_and_bounds_nothing(tmp_path, monkeypatch):
    toy_entry(tmp_path, 20)
    for bad in ("lots", "-1", "0", "nan"):
        monkeypatch.setenv(caches.MAX_GB_ENV, bad)
        with pytest.warns(caches.CacheLimitWarning, match=f"DDPM_CARS_CACHE_MAX_GB must be a positive number.*{bad}"):
            assert caches.size_limit() is None
    monkeypatch.setenv(caches.MAX_GB_ENV, "lots")
    with pytest.warns(caches.CacheLimitWarning):
        toy_entry(tmp_path, 21)
    assert len(caches.list_entries(tmp_path)) == 2


# --- the command -------------------------------------------------------------------


def test_cache_command_lists_a_table_with_a_total(tmp_path, capsys):
    toy, features, judge = toy_entry(tmp_path), features_entry(tmp_path), judge_entry(tmp_path)
    assert main(["cache", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["kind", "size", "last", "used", "built", "source"]
    assert any(line.startswith("data ") and "toy-cars (seed 0, 20 images)" in line for line in out)
    assert any(line.startswith("features ") and "toy-cars-train-16px (6 images, mean)" in line for line in out)
    assert any(line.startswith("judge ") and "toy-car judge: " in line and "at 16 px" in line for line in out)
    total = caches.human_size(disk_bytes(toy) + disk_bytes(features) + disk_bytes(judge))
    assert out[-1] == f"Total: 3 entries, {total} in {tmp_path}" and len(out) == 5


def test_cache_command_uses_the_default_folder_and_an_empty_one_is_fine(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(caches.CACHE_ENV, str(tmp_path / "default"))
    assert main(["cache"]) == 0
    assert capsys.readouterr().out.strip() == f"Total: 0 entries, 0 B in {tmp_path / 'default'}"
    toy_entry(tmp_path / "default")
    assert main(["cache"]) == 0 and "Total: 1 entry" in capsys.readouterr().out


def test_cache_command_removes_by_age_by_size_or_all_and_says_what_is_left(tmp_path, capsys):
    toy, features = toy_entry(tmp_path), features_entry(tmp_path)
    toy_size = disk_bytes(toy)
    used_at(toy, time.time() - 10 * DAY)
    assert main(["cache", "--cache-dir", str(tmp_path), "--older-than", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[0] == "kind" and out[1].startswith("data ") and "toy-cars (seed 0, 20 images)" in out[1]
    assert out[2] == f"Removed 1 entry, {caches.human_size(toy_size)} from {tmp_path}"
    assert out[-1] == f"Left: 1 entry, {caches.human_size(disk_bytes(features))} in {tmp_path}"
    assert not toy.exists() and features.is_file()
    toy = toy_entry(tmp_path)
    assert main(["cache", "--cache-dir", str(tmp_path), "--max-size", str(disk_bytes(toy) / 1e9)]) == 0
    assert [e.path for e in caches.list_entries(tmp_path)] == [toy]  # the features were used less recently
    assert capsys.readouterr().out.splitlines()[-1].startswith("Left: 1 entry")
    assert main(["cache", "--cache-dir", str(tmp_path), "--clear"]) == 0
    assert caches.list_entries(tmp_path) == [] and "Left: 0 entries, 0 B" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--older-than", "-1"], "--older-than must be a number of days >= 0; got -1.0"),
        (["--max-size", "-2"], "--max-size must be a number of GB >= 0; got -2.0"),
        (["--older-than", "nan"], "--older-than must be a number of days >= 0; got nan"),
        (["--cache-dir", "FILE"], "is a file; it must be a cache folder"),
        (["--cache-dir", "FILE", "--clear"], "is a file; it must be a cache folder"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, capsys, argv, message):
    (tmp_path / "FILE").write_text("")
    argv = [str(tmp_path / a) if a == "FILE" else a for a in argv]
    assert main(["cache", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ddpm-cars: error: ") and message in err


def test_the_request_is_validated_where_it_is_made():
    with pytest.raises(UserError, match="--older-than"):
        CacheRequest(older_than_days=-0.5)
    assert CacheRequest(max_gb=0).removes and not CacheRequest().removes


def test_the_cache_module_and_command_do_not_load_torch(tmp_path):
    code = (
        "import sys\nfrom ddpm_cars.cli import main\n"
        f"assert main(['cache', '--cache-dir', {str(tmp_path)!r}]) == 0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"
