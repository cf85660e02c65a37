"""The cache folder: what ddpm-cars keeps there, how big it is, and how to bound it.

Three kinds of entry live under one folder (:func:`default_cache_dir`)::

    data/<key>/                    decoded images (ddpm_cars.data.cache); meta.json records
                                   the source and when the entry was built, and its
                                   modification time is the entry's last use
    reference/<key>.safetensors    reference images' features (ddpm_cars.evaluation.reference);
                                   the file's metadata records the source and when it was built
    reference-used/<key>           an empty file whose modification time is the features' last use
    judge/<key>.safetensors        the weights of the toy-car judge whose features judge_fd and
                                   judge_kid compare (ddpm_cars.evaluation.judge), same record
    judge-used/<key>               the judge's last use, as for the features

A folder given to ``--data-cache`` holds data entries directly; :func:`list_entries` finds
those too. Entries written before sources were recorded list with the source "unknown" and
their files' modification times.

When ``$DDPM_CARS_CACHE_MAX_GB`` is set, writing an entry evicts the least recently used
others until the folder fits (:func:`enforce_limit`). Removal is safe beside a running
build or reader: a data entry is removed only while its build lock can be taken, renamed
out of sight first, and the folders of builds in progress (``*.partial-*``) and lock files
are never touched. A reader that has memory-mapped an entry keeps its images.

This module knows the layout of the folder, not how entries are built; it imports no torch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from ddpm_cars.errors import UserError

CACHE_ENV = "DDPM_CARS_CACHE"  # overrides the default cache folder
MAX_GB_ENV = "DDPM_CARS_CACHE_MAX_GB"  # bounds the cache folder when an entry is written
DATA_DIR, FEATURES_DIR, JUDGE_DIR = "data", "reference", "judge"
USED_SUFFIX = "-used"  # reference-used/, judge-used/: the markers of the files' last use
DATA_RECORD, DATA_IMAGES = "meta.json", "images.u8"  # a data entry's record (written last) and its images
PARTIAL = ".partial-"  # in the name of a data entry being built (or removed)
GB = 1e9
DAY = 86400.0

Kind = Literal["data", "features", "judge"]
FILE_KINDS: dict[str, Kind] = {FEATURES_DIR: "features", JUDGE_DIR: "judge"}  # folders of safetensors entries


class CacheLimitWarning(UserWarning):
    """The size limit of the cache could not be applied; the run goes on."""


@dataclass(frozen=True)
class CacheEntry:
    """One entry of the cache; times are seconds since the epoch."""

    kind: Kind
    path: Path  # a data entry's folder, or a features or judge file
    size: int  # bytes, of every file of the entry
    source: str  # what it was computed from; "unknown" for entries that predate the record
    built: float
    last_used: float


@dataclass(frozen=True)
class CacheRequest:
    """What ``ddpm-cars cache`` is asked: list the entries of ``cache_dir`` (None: the
    default folder), or remove all of them, those unused for ``older_than_days``, or the
    least recently used until the rest fits in ``max_gb``."""

    cache_dir: Path | None = None
    clear: bool = False
    older_than_days: float | None = None
    max_gb: float | None = None

    def __post_init__(self) -> None:
        for flag, value, unit in (("--older-than", self.older_than_days, "days"), ("--max-size", self.max_gb, "GB")):
            if value is not None and not (value >= 0):  # NaN is rejected too
                raise UserError(f"{flag} must be a number of {unit} >= 0; got {value}")

    @property
    def removes(self) -> bool:
        return self.clear or self.older_than_days is not None or self.max_gb is not None


def default_cache_dir() -> Path:
    """Where ddpm-cars caches what it computes: ``$DDPM_CARS_CACHE``, else
    ``$XDG_CACHE_HOME/ddpm-cars``, else ``~/.cache/ddpm-cars``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ddpm-cars"


def cache_root(data_folder: Path) -> Path:
    """The cache folder a folder of data entries belongs to: the parent of the default
    layout's ``data/``, else the folder itself (one given to ``--data-cache``)."""
    return data_folder.parent if data_folder.name == DATA_DIR else data_folder


def lock_path(entry: Path) -> Path:
    """The lock file a data entry is built under, beside it."""
    return entry.parent / f"{entry.name}.lock"


def used_marker(entry: Path) -> Path:
    """The empty file whose modification time is the last use of a features or judge file:
    ``reference/KEY.safetensors`` -> ``reference-used/KEY``."""
    return entry.parent.parent / f"{entry.parent.name}{USED_SUFFIX}" / entry.stem


def now_iso() -> str:
    """The time an entry is built, as its record stores it."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def mark_used(path: Path) -> None:
    """Set ``path``'s modification time to now, creating it if needed: one system call,
    and never an error (a read-only cache is still read)."""
    try:
        path.touch()
    except OSError:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()


# --- what is there -----------------------------------------------------------------


def list_entries(cache_dir: Path) -> list[CacheEntry]:
    """Every entry of the cache folder ``cache_dir``, most recently used first."""
    cache_dir = Path(cache_dir)
    found = _data_entries(cache_dir / DATA_DIR) + _data_entries(cache_dir)
    for folder, kind in FILE_KINDS.items():
        found += _file_entries(cache_dir / folder, kind)
    return sorted(found, key=lambda e: (-e.last_used, str(e.path)))


def _is_data_entry(path: Path) -> bool:
    return (
        PARTIAL not in path.name
        and not path.is_symlink()
        and path.is_dir()
        and (path / DATA_RECORD).is_file()
        and (path / DATA_IMAGES).is_file()
    )


def _data_entries(folder: Path) -> list[CacheEntry]:
    found = []
    for path in _children(folder):
        try:
            if not _is_data_entry(path):
                continue
            record = path / DATA_RECORD
            try:
                meta = json.loads(record.read_text())
            except ValueError:
                meta = {}
            built = _parse_time(meta.get("built")) or (path / DATA_IMAGES).stat().st_mtime
            size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
            found.append(
                CacheEntry("data", path, size, str(meta.get("source", "unknown")), built, record.stat().st_mtime)
            )
        except OSError:  # removed while being looked at
            continue
    return found


def _file_entries(folder: Path, kind: Kind) -> list[CacheEntry]:
    found = []
    for path in _children(folder):
        if path.name.startswith(".") or path.suffix != ".safetensors" or path.is_symlink():
            continue  # a temporary file of a write in progress, or not an entry
        try:
            stat = path.stat()
            meta = _safetensors_metadata(path)
            marker = used_marker(path)
            used = marker.stat().st_mtime if marker.is_file() else stat.st_mtime
            built = _parse_time(meta.get("built")) or stat.st_mtime
            found.append(CacheEntry(kind, path, stat.st_size, meta.get("source", "unknown"), built, used))
        except OSError:
            continue
    return found


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:  # not there (yet), or not a folder
        return []


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (8 bytes of length, then JSON)."""
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if length > 100_000_000:
                return {}
            header = json.loads(handle.read(length))
        meta = header.get("__metadata__") or {}
        return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
    except (ValueError, AttributeError):  # damaged: listed, and recomputed when next used
        return {}


def _parse_time(text: object) -> float | None:
    try:
        return datetime.fromisoformat(str(text)).timestamp() if text else None
    except ValueError:
        return None


# --- what to remove ----------------------------------------------------------------


def older_than(entries: Iterable[CacheEntry], days: float, now: float) -> list[CacheEntry]:
    """The entries last used more than ``days`` days before ``now``."""
    return [e for e in entries if now - e.last_used > days * DAY]


def evict_to(entries: Iterable[CacheEntry], max_bytes: float) -> list[CacheEntry]:
    """Remove the least recently used of ``entries`` until the rest fits in ``max_bytes``;
    an entry that cannot be removed now (being built) is passed over. Returns the removed."""
    entries = list(entries)
    total, removed = sum(e.size for e in entries), []
    for entry in sorted(entries, key=lambda e: (e.last_used, str(e.path))):
        if total <= max_bytes:
            break
        if remove([entry]):
            removed.append(entry)
            total -= entry.size
    return removed


def remove(entries: Iterable[CacheEntry]) -> list[CacheEntry]:
    """Remove ``entries`` from the disk; returns those removed. An entry being built, gone
    already or not of the cache's layout is left alone."""
    removed = []
    for entry in entries:
        try:
            done = _remove_data(entry.path) if entry.kind == "data" else _remove_file(entry.path)
        except OSError:
            done = False
        if done:
            removed.append(entry)
    return removed


def _remove_data(path: Path) -> bool:
    if not _is_data_entry(path):
        return False
    with _lock_if_free(lock_path(path)) as free:
        if not free:  # a process is building this entry
            return False
        doomed = path.parent / f"{path.name}{PARTIAL}{os.getpid()}"
        os.rename(path, doomed)  # gone for readers at once; a later build cleans up what rmtree misses
        shutil.rmtree(doomed, ignore_errors=True)
    return True


def _remove_file(path: Path) -> bool:
    if path.suffix != ".safetensors" or path.parent.name not in FILE_KINDS or path.is_symlink() or not path.is_file():
        return False
    path.unlink()
    used_marker(path).unlink(missing_ok=True)
    return True


@contextlib.contextmanager
def _lock_if_free(path: Path) -> Iterator[bool]:
    """Hold the lock file ``path`` if no other process holds it; yields whether it does."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): a single process is assumed
        yield True
        return
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- the size limit ----------------------------------------------------------------


def size_limit() -> float | None:
    """``$DDPM_CARS_CACHE_MAX_GB`` in bytes, or None when unset (a bad value warns)."""
    text = os.environ.get(MAX_GB_ENV, "").strip()
    if not text:
        return None
    try:
        gigabytes = float(text)
    except ValueError:
        gigabytes = math.nan
    if not (gigabytes > 0 and math.isfinite(gigabytes)):
        warnings.warn(
            f"{MAX_GB_ENV} must be a positive number of gigabytes; got {text!r}, so the cache is not bounded",
            CacheLimitWarning,
            stacklevel=3,
        )
        return None
    return gigabytes * GB


def enforce_limit(cache_dir: Path, written: Path) -> list[CacheEntry]:
    """After ``written`` was added to the cache folder ``cache_dir``: when
    ``$DDPM_CARS_CACHE_MAX_GB`` is set, evict the least recently used other entries until
    the folder fits. Never fails a run; returns the removed entries."""
    limit = size_limit()
    if limit is None:
        return []
    try:
        keep = written.resolve()
        entries = list_entries(cache_dir)
        others = [e for e in entries if e.path.resolve() != keep]
        budget = limit - (sum(e.size for e in entries) - sum(e.size for e in others))
        return evict_to(others, max(budget, 0.0))
    except OSError as err:
        warnings.warn(f"cannot bound the cache in {cache_dir} ({err})", CacheLimitWarning, stacklevel=2)
        return []


# --- the command -------------------------------------------------------------------


def cache_command(request: CacheRequest) -> int:
    """``ddpm-cars cache``: list the entries, or remove those the request names and say
    what is left. Returns the exit code."""
    root = (request.cache_dir or default_cache_dir()).expanduser()
    if root.exists() and not root.is_dir():
        raise UserError(
            f"--cache-dir {root} is a file; it must be a cache folder (holding data/, reference/ and judge/)"
        )
    entries = list_entries(root)
    if not request.removes:
        print(format_entries(entries, root))
        return 0
    if request.clear:
        removed = remove(entries)
    elif request.older_than_days is not None:
        removed = remove(older_than(entries, request.older_than_days, time.time()))
    else:
        removed = []
    if request.max_gb is not None:
        removed += evict_to([e for e in entries if e not in removed], request.max_gb * GB)
    left = [e for e in entries if e not in removed]
    print(format_entries(removed, root, removed=True))
    print(f"Left: {_count(left)} in {root}")
    return 0


def format_entries(entries: list[CacheEntry], root: Path, removed: bool = False) -> str:
    """A table of ``entries`` (kind, size, last used, built, source) and a total line."""
    total = f"Removed {_count(entries)} from {root}" if removed else f"Total: {_count(entries)} in {root}"
    if not entries:
        return total
    rows = [("kind", "size", "last used", "built", "source")]
    rows += [(e.kind, human_size(e.size), _when(e.last_used), _when(e.built), e.source) for e in entries]
    width = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        f"{kind:<{width[0]}}  {size:>{width[1]}}  {used:<{width[2]}}  {built:<{width[3]}}  {source}"
        for kind, size, used, built, source in rows
    ]
    return "\n".join([*lines, total])


def _count(entries: list[CacheEntry]) -> str:
    return f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}, {human_size(sum(e.size for e in entries))}"


def human_size(size: float) -> str:
    """Bytes in B, kB, MB, GB or TB (powers of 1000, as the size limit counts)."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))
