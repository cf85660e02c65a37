"""The documents a newcomer reads: short front pages, and no link that leads nowhere.

Every relative link in README.md, BENCHMARKS.md, RELIABILITY.md and docs/ must name a file
that exists and, with ``#anchor``, a heading of that file (GitHub's slugs).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRONT_PAGES = {"README.md": 300, "BENCHMARKS.md": 200}
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"(#{1,6}) (.*)")


def documents() -> list[Path]:
    return [ROOT / name for name in ("README.md", "BENCHMARKS.md", "RELIABILITY.md")] + sorted(
        (ROOT / "docs").rglob("*.md")
    )


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but hyphens and underscores
    dropped, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip()).lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.cache
def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    for line in prose_lines(path.read_text()):
        match = HEADING.fullmatch(line.rstrip())
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
    return {base if n == 0 else f"{base}-{n}" for base, total in seen.items() for n in range(total)}


def links(path: Path) -> list[str]:
    text = "\n".join(re.sub(r"`[^`]*`", "``", line) for line in prose_lines(path.read_text()))
    return [m.group(1) for m in LINK.finditer(text) if not re.match(r"[a-z]+:", m.group(1))]


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in links(path):
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no such heading)")
    return broken


@pytest.mark.parametrize("name, limit", sorted(FRONT_PAGES.items()))
def test_front_pages_stay_short(name, limit):
    lines = len((ROOT / name).read_text().splitlines())
    assert lines <= limit, f"{name} has {lines} lines; at most {limit}: move detail to docs/"


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    broken = broken_links(path)
    assert not broken, f"{path.relative_to(ROOT)}: {broken}"


def test_the_link_check_can_fail(tmp_path):
    (tmp_path / "b.md").write_text("# A heading, with `code`\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "a.md"
    page.write_text(
        "[ok](b.md#a-heading-with-code) [ok](b.md#twice-1) [ok](#local) ![ok](b.md)\n"
        "```\n[in code](nowhere.md)\n```\n"
        "[gone](missing.md) [bad](b.md#nothing) [web](https://example.com/x.md)\n# Local\n"
    )
    assert broken_links(page) == ["missing.md (no such file)", "b.md#nothing (no such heading)"]


def test_every_record_is_indexed_and_opens_with_its_answer():
    records = sorted(p for p in (ROOT / "docs" / "benchmarks").glob("*.md") if p.name != "README.md")
    index = (ROOT / "docs" / "benchmarks" / "README.md").read_text()
    summary = (ROOT / "BENCHMARKS.md").read_text()
    for record in records:
        head = record.read_text()[:3000]
        assert f"]({record.name})" in index, f"{record.name} is not in docs/benchmarks/README.md"
        assert f"](docs/benchmarks/{record.name}" in summary, f"{record.name} has no row in BENCHMARKS.md"
        for part in ("**Question:**", "**Answer:**", "**Redraw:**"):
            assert part in head, f"{record.name} does not open with {part}"
