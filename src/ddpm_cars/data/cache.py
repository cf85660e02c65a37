"""The decoded-image cache: a data source decoded once into a file, memory-mapped after.

An entry is a folder ``<cache dir>/<key>/`` holding

    images.u8    the images, [N, C, S, S] uint8 in C order and nothing else
    labels.npy   [N] int64
    meta.json    N, C (1 or 3), S, the class names, what decoding skipped, the source (its full path,
                 or what generated it) and when the entry was built; written last. Its
                 modification time is the entry's last use, set each time it is opened

The key hashes everything the images depend on: the source's files with their sizes and
modification times (or the toy-car generator's arguments), the image size, the crop and
box margin, the channels asked for, and the code and library versions that decode. An
entry of an older format (one without its channel count) is never read: it is rebuilt.
An entry is written in a ``<key>.partial-<pid>`` folder and renamed into place once
complete, under a lock file: a build killed halfway leaves nothing a later run reads as
complete, and processes that want the same entry at once (torchrun's ranks on one
machine, two runs) build it once -- the first takes the lock, the others wait for it and
open what it built. An entry that does not open cleanly (a truncated file, a missing part)
is rebuilt, never read.

Listing, removing and bounding the entries (``ddpm-cars cache``, ``$DDPM_CARS_CACHE_MAX_GB``)
is :mod:`ddpm_cars.caches`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch

from ddpm_cars import caches
from ddpm_cars.caches import CACHE_ENV as CACHE_ENV  # where the cache folder is: re-exported
from ddpm_cars.caches import default_cache_dir
from ddpm_cars.data.dataset import IMAGE_CHANNELS, DataError, ImageSet
from ddpm_cars.data.folder import Decoded, MemoryImages

FORMAT = 2  # bump when the entry layout changes (2: meta.json records the channel count)
IMAGES, LABELS, META = caches.DATA_IMAGES, "labels.npy", caches.DATA_RECORD

Writer = Callable[[torch.Tensor], None]  # takes [k, C, S, S] uint8 images, in order
Fill = Callable[[Writer], Decoded]  # writes every image of a source, says what it kept


class CacheWarning(UserWarning):
    """The data cache could not be used; the data was decoded into memory instead."""


def resolve_dir(setting: str) -> Path | None:
    """The folder ``--data-cache`` names: ``auto`` the ``data`` folder of the default
    cache, ``off`` none."""
    if setting == "off":
        return None
    return default_cache_dir() / "data" if setting == "auto" else Path(setting).expanduser()


def file_stamps(paths: Sequence[Path | str]) -> list[tuple[str, int, int]]:
    """Each file's path (as given: a key with relative paths needs the working directory
    too), size and modification time (ns): what says it has not changed."""
    stamps = []
    for path in paths:
        name = os.fspath(path)
        try:
            info = os.stat(name)
            stamps.append((name, info.st_size, info.st_mtime_ns))
        except OSError:  # unreadable now: decoding will skip it, and so must the key
            stamps.append((name, -1, -1))
    return stamps


def code_stamp(*modules: Any) -> str:
    """A hash of the source of the ``modules`` that produce the images, with the versions
    of the libraries that decode and resize them: a change to any rebuilds the cache."""
    digest = hashlib.sha256(f"{FORMAT} {PIL.__version__} {metadata.version('torchvision')}".encode())
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def digest(value: Any) -> str:
    """A hash of ``value``'s repr: a long list (files, labels, boxes) as one key field."""
    return hashlib.sha256(repr(value).encode()).hexdigest()


def entry_name(key: dict[str, Any]) -> str:
    """The entry's folder name: a readable prefix and the hash of the whole key."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return f"{key.get('name', 'data')}-{key['image_size']}px-{digest}"


def load(
    key: dict[str, Any],
    capacity: int,
    fill: Fill,
    cache_dir: Path | None,
    *,
    progress: bool = True,
    source: str | None = None,
) -> tuple[ImageSet, Decoded]:
    """The images ``fill`` writes (at most ``capacity`` of ``key['image_size']`` pixels):
    from the cache entry of ``key`` in ``cache_dir``, built first when missing or damaged;
    decoded into memory when ``cache_dir`` is None or cannot be written. ``source`` is what
    a new entry records it was decoded from (a folder's full path; default: from ``key``)."""
    size = key["image_size"]
    if cache_dir is not None:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            if not os.access(cache_dir, os.W_OK | os.X_OK):
                raise PermissionError(f"cannot write in {cache_dir}")
        except OSError as err:
            warnings.warn(
                f"cannot use the data cache in {cache_dir} ({err.strerror or err}); decoding into memory "
                "(point --data-cache at a writable folder, or pass --data-cache off)",
                CacheWarning,
                stacklevel=3,
            )
            cache_dir = None
    if cache_dir is None:
        out = MemoryImages(capacity, size)
        decoded = fill(out)
        return ImageSet(out.images, torch.tensor(decoded.labels, dtype=torch.int64), decoded.class_names), decoded
    entry = cache_dir / entry_name(key)
    opened, built = open_entry(entry), False
    if opened is None:
        with _locked(caches.lock_path(entry), progress):
            opened = open_entry(entry)  # another process may have built it while this one waited
            if opened is None:
                _build(entry, key, capacity, fill, progress, source or describe_source(key))
                opened, built = open_entry(entry), True
                if opened is None:
                    raise OSError(f"the data cache entry {entry} was written but does not open")
    caches.mark_used(entry / META)
    if built:
        caches.enforce_limit(caches.cache_root(cache_dir), entry)
    return opened


def describe_source(key: dict[str, Any]) -> str:
    """What an entry was decoded from, as far as its key tells: the generator's arguments
    for toy cars, else the source's name (callers with a folder pass its full path)."""
    if key.get("name") == "toy-cars" and "seed" in key:
        return f"toy-cars (seed {key['seed']}, {key.get('count', '?')} images)"
    return str(key.get("name", "unknown"))


def open_entry(entry: Path) -> tuple[ImageSet, Decoded] | None:
    """The entry's images, memory-mapped (copy-on-write: the file is never changed), and
    what decoding kept; None unless every part is there, whole and consistent."""
    try:
        meta = json.loads((entry / META).read_text())
        count, size, channels = int(meta["count"]), int(meta["image_size"]), int(meta["channels"])
        if meta.get("format") != FORMAT or count < 1 or channels not in IMAGE_CHANNELS:
            return None
        if (entry / IMAGES).stat().st_size != count * channels * size * size:
            return None
        labels = np.load(entry / LABELS, allow_pickle=False)
        if labels.shape != (count,) or labels.dtype != np.int64:
            return None
        images = np.memmap(entry / IMAGES, dtype=np.uint8, mode="c", shape=(count, channels, size, size))
        skipped = [tuple(s) for s in meta["skipped"]]
        decoded = Decoded(labels.tolist(), list(meta["class_names"]), skipped, int(meta["outside"]), channels)
        return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), decoded.class_names), decoded
    except (OSError, ValueError, KeyError, TypeError):  # missing, truncated or malformed: not a usable entry
        return None


@contextlib.contextmanager
def _locked(path: Path, progress: bool) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (released by the system if the process dies)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): a single process is assumed
        yield
        return
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"Waiting for another process to finish the data cache ({path.with_suffix('')})", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(entry: Path, key: dict[str, Any], capacity: int, fill: Fill, progress: bool, source: str) -> None:
    """Write the entry, recording ``source``, in a partial folder, then rename it into place
    (the lock is held)."""
    size = key["image_size"]
    needed = capacity * 3 * size * size  # at most 3 channels
    free = shutil.disk_usage(entry.parent).free
    if needed > free:
        raise DataError(
            f"the data cache needs {needed / 1e9:.2f} GB in {entry.parent} and {free / 1e9:.2f} GB are free; "
            "make room, point --data-cache at another folder, or pass --data-cache off"
        )
    for stale in entry.parent.glob(f"{entry.name}{caches.PARTIAL}*"):  # left by a build that was killed
        shutil.rmtree(stale, ignore_errors=True)
    if entry.exists():  # damaged: it did not open
        shutil.rmtree(entry)
    partial = entry.parent / f"{entry.name}{caches.PARTIAL}{os.getpid()}"
    partial.mkdir()
    started = time.perf_counter()
    try:
        with open(partial / IMAGES, "wb") as handle:
            decoded = fill(lambda images: handle.write(images.contiguous().numpy().tobytes()))
            handle.flush()
            os.fsync(handle.fileno())
        np.save(partial / LABELS, np.asarray(decoded.labels, dtype=np.int64))
        meta = {
            "format": FORMAT,
            "count": len(decoded.labels),
            "channels": decoded.channels,
            "image_size": size,
            "class_names": decoded.class_names,
            "skipped": decoded.skipped,
            "outside": decoded.outside,
            "source": source,
            "built": caches.now_iso(),
            "key": key,
        }
        with open(partial / META, "w") as handle:
            json.dump(meta, handle, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(partial, entry)  # the entry appears whole, or not at all
    except OSError as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise DataError(
            f"cannot write the data cache in {entry.parent} ({err.strerror or err}); "
            "make room, point --data-cache at another folder, or pass --data-cache off"
        ) from err
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if progress:
        seconds = time.perf_counter() - started
        count = len(decoded.labels)
        print(
            f"Decoded {count} images in {seconds:.1f} s ({count / max(seconds, 1e-9):.0f} images/s) "
            f"into the data cache {entry}",
            file=sys.stderr,
        )
