"""tools/link_deps.py: the wheel check links exactly the wheel's runtime closure."""

from __future__ import annotations

import importlib.util
import sys
import zipfile
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "link_deps.py"
spec = importlib.util.spec_from_file_location("link_deps", TOOL)
link_deps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(link_deps)


def install(site: Path, name: str, requires: list[str], files: dict[str, str]) -> None:
    """A distribution as pip leaves it: its files, and a dist-info whose RECORD lists them."""
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: " + name + "\nVersion: 1.0\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    )
    for path, text in files.items():
        (site / path).parent.mkdir(parents=True, exist_ok=True)
        (site / path).write_text(text)
    script = site.parent.parent / "bin" / name  # an entry point, outside site-packages
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text("#!python")
    listed = [*files, f"{info.name}/METADATA", f"{info.name}/RECORD", f"../../bin/{name}"]
    (info / "RECORD").write_text("".join(f"{p},,\n" for p in listed))


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "env" / "site-packages"
    install(site, "alpha", ["beta>=1", "gamma; extra == 'plots'", "absent_pkg"], {"alpha/__init__.py": "a"})
    install(
        site,
        "beta",
        ["delta; python_version >= '3'", "epsilon; python_version < '3'"],
        {"beta/__init__.py": "b", "beta/data/x.bin": "x"},
    )
    install(site, "gamma", [], {"gamma.py": "g"})
    install(site, "delta", [], {"delta.py": "d"})
    install(site, "epsilon", [], {"epsilon.py": "e"})
    install(site, "devtool", [], {"devtool.py": "t"})
    monkeypatch.syspath_prepend(str(site))
    return site


def test_closure_follows_requirements_and_markers_but_not_extras(site):
    found = link_deps.closure(["alpha", "Beta_Pkg_Missing ; extra == 'dev'"])
    assert sorted(found) == ["alpha", "beta", "delta"]


def test_link_hard_links_each_file_under_site_packages(site, tmp_path):
    target = tmp_path / "fresh"
    target.mkdir()
    files, size = link_deps.link(link_deps.closure(["beta"])["beta"], target)
    linked = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert linked == ["beta-1.0.dist-info/METADATA", "beta-1.0.dist-info/RECORD", "beta/__init__.py", "beta/data/x.bin"]
    assert files == 4 and size == sum((site / p).stat().st_size for p in linked)
    assert (target / "beta/data/x.bin").stat().st_ino == (site / "beta/data/x.bin").stat().st_ino


def test_main_reads_the_wheels_own_requirements(site, tmp_path, monkeypatch, capsys):
    wheel = tmp_path / "alpha-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("alpha/__init__.py", "")
        archive.writestr(
            "alpha-1.0.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: alpha\nVersion: 1.0\nRequires-Dist: gamma\n"
            "Requires-Dist: devtool; extra == 'dev'\n",
        )
    target = tmp_path / "fresh"
    target.mkdir()
    monkeypatch.setattr(sys, "argv", ["link_deps.py", str(wheel), str(target)])
    assert link_deps.main() == 0
    assert sorted(p.name for p in target.iterdir()) == ["gamma-1.0.dist-info", "gamma.py"]
    assert "hard-linked 1 installed distribution that" in capsys.readouterr().out
