"""Where a measurement comes from: the command that drew it, the commit it ran and the
machine's kind, recorded beside each figure so that a reader can draw it again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from ddpm_cars.runtime import cpu_kind

REPOSITORY = Path(__file__).parents[1]


def commit(repository: Path = REPOSITORY) -> str:
    """The short hash of the checked-out commit, with "-dirty" when tracked files differ
    from it; "unknown" outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repository), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(repository), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if changed else "")


def machine(device: torch.device) -> str:
    """The CPU's kind (AMX, AVX-512 BF16, AVX2) or the GPU's name."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {cpu_kind()}"


def provenance(device: torch.device, argv: list[str] | None = None) -> dict[str, str]:
    """``{"command", "commit", "machine"}`` of the running study (``argv``: its command line)."""
    argv = sys.argv if argv is None else argv
    module = Path(argv[0]).stem if argv else "?"
    return {
        "command": " ".join([f"python -m studies.{module}", *argv[1:]]),
        "commit": commit(),
        "machine": machine(device),
    }
