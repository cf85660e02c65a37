"""Hard-link a wheel's runtime dependencies from an environment that has them into another.

    python tools/link_deps.py WHEEL TARGET_SITE_PACKAGES

Run with the Python of the environment that already holds the dependencies (the project's
.venv). It reads the wheel's own `Requires-Dist` (no extras), follows each requirement
through the installed distributions' metadata, and hard-links every file each of them
installed into site-packages (as its RECORD lists them) into TARGET_SITE_PACKAGES. pip then
finds them installed, so `pip install WHEEL` there adds only the wheel and whatever is still
missing, without a second copy of torch's gigabytes on the disk. Only the runtime closure is
linked: a package the code imports but the wheel does not declare is still absent, and the
check still fails on it. Both environments must run the same Python version (the caller
makes sure); on different file systems it links nothing, says so, and pip installs
everything itself.
"""

from __future__ import annotations

import os
import sys
import zipfile
from importlib import metadata
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # pip always carries a copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name


def wheel_requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(name).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def closure(requirements: list[str]) -> dict[str, metadata.Distribution]:
    """The installed distributions the requirements need, followed transitively."""
    found: dict[str, metadata.Distribution] = {}
    pending = list(requirements)
    while pending:
        requirement = Requirement(pending.pop())
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        key = canonicalize_name(requirement.name)
        if key in found:
            continue
        try:
            distribution = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            continue  # pip installs it
        found[key] = distribution
        pending.extend(distribution.requires or [])
    return found


def link(distribution: metadata.Distribution, target: Path) -> tuple[int, int]:
    """Hard-link the distribution's files under its site-packages into target: (files, bytes)."""
    root = Path(distribution.locate_file("")).resolve()
    files = size = 0
    for entry in distribution.files or []:
        source = Path(distribution.locate_file(entry)).resolve()
        if not source.is_file() or root not in source.parents:
            continue  # scripts in bin/, and files RECORD lists but the install left out
        destination = target / source.relative_to(root)
        destination.parent.mkdir(parents=True, exist_ok=True)
        if not destination.exists():
            os.link(source, destination)
            files += 1
            size += source.stat().st_size
    return files, size


def main() -> int:
    wheel, target = Path(sys.argv[1]), Path(sys.argv[2])
    distributions = closure(wheel_requirements(wheel))
    if not distributions:
        print("link_deps: none of the wheel's dependencies is installed here; nothing linked")
        return 0
    here = Path(next(iter(distributions.values())).locate_file(""))
    if here.stat().st_dev != target.stat().st_dev:
        print("link_deps: the two environments are on different file systems; nothing linked")
        return 0
    files = size = 0
    for distribution in distributions.values():
        count, nbytes = link(distribution, target)
        files += count
        size += nbytes
    count = len(distributions)
    print(
        f"link_deps: hard-linked {count} installed distribution{'s' * (count != 1)} that "
        f"{wheel.name} needs ({files} files, {size / 1e9:.1f} GB not copied)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
