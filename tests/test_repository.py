"""The repository stays small: no tracked file over 1 MB but the few weights kept on purpose."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 1_000_000  # bytes
# the one model kept in the repository: the weights behind the sampler study's figures
ALLOWED = {"docs/benchmarks/samplers_eps/long_eps_fp32/checkpoints/step_00003000/model.safetensors"}


def _tracked() -> list[str]:
    try:
        done = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [os.fsdecode(p) for p in done.stdout.split(b"\0") if p]


def _size_on_disk(path: str) -> int | None:
    """The size of a tracked regular file in the working tree; None for one deleted there
    (or a link, which git stores as its target's name)."""
    try:
        info = os.lstat(ROOT / path)
    except FileNotFoundError:
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def test_no_tracked_file_is_over_1_mb():
    sizes = {p: n for p in _tracked() if (n := _size_on_disk(p)) is not None}
    large = {p: n for p, n in sizes.items() if n > LIMIT and p not in ALLOWED}
    assert not large, f"tracked files over {LIMIT:,} bytes (keep them out of git, or allow them here):\n" + "\n".join(
        f"{p}: {n:,} bytes" for p, n in sorted(large.items(), key=lambda item: -item[1])
    )


def test_every_allowed_large_file_is_there_and_tracked():
    tracked = set(_tracked())
    stale = sorted(p for p in ALLOWED if p not in tracked or _size_on_disk(p) is None)
    assert not stale, "allowed to be large but not a tracked file: " + ", ".join(stale)
