"""The HTML run report: self-contained, every section in order, notes escaped, missing parts named."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from ddpm_cars.presets import preset
from ddpm_cars.report import GALLERY_MAX, final_grid, write_report

SECTIONS = [
    "Summary",
    "Final samples",
    "Denoising",
    "Training curves",
    "Evaluation",
    "Memorisation check",
    "Forward process",
    "Samples during training",
    "Configuration",
]
SKIPPED = "Inception weights not found: <cache>/pt_inception.pth & no network"
PICTURES = [
    "grid.png",
    "denoising.png",
    "trajectory.png",
    "forward_process.png",
    "loss.png",
    "metrics.png",
    "eval/nearest.png",
    "eval/nearest_distances.png",
    "samples/epoch_9.png",
    "samples/epoch_10.png",
    "samples/final.png",
]


class Page(HTMLParser):
    """The parts of the report the tests look at."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[dict[str, str | None]] = []
        self.links: list[str] = []  # every src= and href= value
        self.tags: set[str] = set()
        self.headings: list[str] = []
        self.notes: list[str] = []
        self.missing: list[str] = []
        self.cells: list[str] = []
        self.captions: list[str] = []
        self._open: list[tuple[str, list[str]]] = []  # (tag, text pieces) of elements being read
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        values = dict(attrs)
        self.links += [v or "" for k, v in attrs if k in ("src", "href")]
        if tag == "img":
            self.images.append(values)
            return
        kind = {"h2": "h2", "td": "td", "figcaption": "caption"}.get(tag)
        if tag in ("div", "p") and values.get("class") in ("note", "missing"):
            kind = values["class"]
        if kind:
            self._open.append((kind, []))
        elif self._open:
            self._open.append(("", []))

    def handle_endtag(self, tag: str) -> None:
        if tag == "img" or not self._open:
            return
        kind, pieces = self._open.pop()
        text = "".join(pieces)
        if self._open:
            self._open[-1][1].append(text)
        target = {
            "h2": self.headings,
            "td": self.cells,
            "caption": self.captions,
            "note": self.notes,
            "missing": self.missing,
        }.get(kind)
        if target is not None:
            target.append(text)

    def handle_data(self, data: str) -> None:
        if self._open:
            self._open[-1][1].append(data)


def _png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (34, 18)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


@pytest.fixture
def bare_run(tmp_path: Path) -> Path:
    run = tmp_path / "my_run"
    run.mkdir()
    preset("tiny").save(run / "config.json")
    return run


@pytest.fixture
def full_run(bare_run: Path) -> Path:
    run = bare_run
    for i, name in enumerate(PICTURES):  # a different colour each, so every file's bytes differ
        _png(run / name, (20 * i, 255 - 20 * i, 7 * i))
    (run / "loss.csv").write_text("step,loss\n" + "".join(f"{s},{1.0 / s:.6f}\n" for s in range(1, 151)))
    (run / "metrics.csv").write_text("step,swd,swd_32,precision,fid\n50,20.5,18,0.5,\n100,12.34567,10.1,0.7123456,\n")
    evaluation = {
        "checkpoint": "checkpoints/step_00000100",
        "num_samples": 1000,
        "sampler": "ddim",
        "metrics": {"swd": 12.3456, "swd_32": 10.1, "precision": 0.71, "recall": 0.55, "fid": None},
        "fid_skipped": SKIPPED,
        "memorization": {"sample_to_train_median": 0.123456, "heldout_to_train_median": 0.13},
    }
    (run / "eval" / "metrics.json").write_text(json.dumps(evaluation))
    for step in (50, 100):
        (run / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
    (run / "checkpoints" / ".step_00000150.tmp").mkdir()  # an interrupted write: not a checkpoint
    return run


def _page(run: Path) -> tuple[str, Page]:
    text = write_report(run).read_text()
    return text, Page(text)


def test_report_is_written_and_self_contained(full_run: Path) -> None:
    path = write_report(full_run)
    assert path == full_run / "report.html" and path.is_file()
    text = path.read_text()
    page = Page(text)
    assert not page.tags & {"link", "script", "iframe", "object"}
    assert "<style>" in text and "@import" not in text and "url(" not in text
    assert page.links and all(link.startswith("data:image/png;base64,") for link in page.links)
    assert len(re.findall(r"\b(?:src|href)\s*=", text)) == len(page.links)


def test_every_picture_embedded_byte_for_byte_with_alt_text(full_run: Path) -> None:
    _, page = _page(full_run)
    embedded = sorted(base64.b64decode(img["src"].removeprefix("data:image/png;base64,")) for img in page.images)
    # grid.png is the final grid, so samples/final.png is not shown; everything else is, once
    expected = sorted((full_run / name).read_bytes() for name in PICTURES if name != "samples/final.png")
    assert embedded == expected
    assert all((img.get("alt") or "").strip() for img in page.images)


def test_sections_in_documented_order(full_run: Path, bare_run: Path) -> None:
    assert _page(full_run)[1].headings == SECTIONS
    assert _page(bare_run)[1].headings == SECTIONS


def test_skipped_fid_is_an_escaped_note(full_run: Path) -> None:
    text, page = _page(full_run)
    assert any(SKIPPED in note and "fid_skipped" in note for note in page.notes)
    assert SKIPPED not in text  # the raw '<' never reaches the page
    assert "&lt;cache&gt;/pt_inception.pth &amp; no network" in text


def test_evaluation_flattened_and_formatted(full_run: Path) -> None:
    _, page = _page(full_run)
    row = dict(zip(page.cells[::2], page.cells[1::2]))
    assert row["metrics.swd"] == "12.35"
    assert row["metrics.precision"] == "0.71"
    assert row["metrics.fid"] == "--"
    assert row["num_samples"] == "1000"
    assert row["memorization.sample_to_train_median"] == "0.1235"
    assert page.cells.count("memorization.sample_to_train_median") == 1  # in its own section only
    assert "fid_skipped" not in row  # shown in the note box instead


def test_the_judge_metrics_say_what_they_measure(full_run: Path) -> None:
    evaluation = json.loads((full_run / "eval" / "metrics.json").read_text())
    evaluation["metrics"].update({"judge_fd": 1.25, "judge_kid": 0.0123, "judge_kid_std": 0.002})
    (full_run / "eval" / "metrics.json").write_text(json.dumps(evaluation))
    (full_run / "metrics.csv").write_text("step,swd,judge_fd\n100,12.3,2.5\n")
    _, page = _page(full_run)
    row = dict(zip(page.cells[::2], page.cells[1::2]))
    assert row["metrics.judge_fd (Frechet distance on toy-car judge features, lower is better)"] == "1.25"
    assert row["metrics.judge_kid (KID on toy-car judge features, lower is better)"] == "0.0123"
    assert row["metrics.judge_kid_std (std of judge_kid over subsets)"] == "0.002"
    assert row["judge_fd (Frechet distance on toy-car judge features, lower is better)"] == "2.5"  # metrics.csv
    assert row["metrics.swd"] == "12.35"  # names that say what they are stay as they are


def test_summary_and_last_metrics_row(full_run: Path) -> None:
    text, page = _page(full_run)
    row = dict(zip(page.cells[::2], page.cells[1::2]))
    assert row["latest checkpoint"] == "step 100 (step_00000100)"
    assert row["training steps"] == "150 (150 rows logged)"
    mean_last_100 = sum(round(1.0 / s, 6) for s in range(51, 151)) / 100
    assert row["last loss (mean of last 100 rows)"] == f"{mean_last_100:.4g}"
    assert row["min loss"] == f"{1 / 150:.4g}"
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", row["report generated (UTC)"])
    # the last row of metrics.csv: a float with 4 significant digits, an empty cell as --
    assert row["swd"] == "12.35" and row["swd_32"] == "10.1" and row["fid"] == "--"
    assert "Metrics at step 100" in text
    assert "res_attn_unet · 16x16 · cosine schedule · eps prediction · learned variance · 100 timesteps" in text
    assert "<h1>my_run</h1>" in text


def test_configuration_tables_per_section(full_run: Path) -> None:
    text, page = _page(full_run)
    for section in ("model", "diffusion", "data", "train", "sample"):
        assert f"<h3>{section}</h3>" in text
    row = dict(zip(page.cells[::2], page.cells[1::2]))
    assert row["channels"] == "32, 64" and row["learn_variance"] == "true" and row["steps"] == "--"


def test_missing_parts_name_the_command(bare_run: Path) -> None:
    _, page = _page(bare_run)
    assert page.images == []
    missing = " | ".join(page.missing)
    run = str(bare_run)
    for command in (
        f"ddpm-cars sample --checkpoint {run} --out {run}",
        f"ddpm-cars eval --checkpoint {run}",
        f"ddpm-cars forward --out {run}/forward_process.png",
        "ddpm-cars train ... --eval-every N",
    ):
        assert command in missing
    assert len(page.missing) == 9  # grid, denoising, trajectory, loss, metrics, eval, nearest, forward, gallery
    assert all("is not there" in line for line in page.missing)
    row = dict(zip(page.cells[::2], page.cells[1::2]))
    assert row["latest checkpoint"] == "--"


def test_final_grid_prefers_grid_then_final_then_highest_epoch(bare_run: Path) -> None:
    assert final_grid(bare_run) is None
    for epoch in (2, 9, 10):
        _png(bare_run / "samples" / f"epoch_{epoch}.png", (epoch, 0, 0))
    assert final_grid(bare_run) == bare_run / "samples" / "epoch_10.png"  # by number, not by name
    _, page = _page(bare_run)
    assert "samples/epoch_10.png" in page.captions
    _png(bare_run / "samples" / "final.png", (0, 255, 0))
    assert final_grid(bare_run) == bare_run / "samples" / "final.png"
    assert "samples/final.png" in _page(bare_run)[1].captions
    _png(bare_run / "grid.png", (0, 0, 255))
    assert final_grid(bare_run) == bare_run / "grid.png"


def test_gallery_captions_by_epoch_and_thins_long_runs(bare_run: Path) -> None:
    for epoch in range(1, 31):
        _png(bare_run / "samples" / f"epoch_{epoch:04d}.png", (epoch, epoch, 0))
    _, page = _page(bare_run)
    epochs = [int(c.split()[1]) for c in page.captions if c.startswith("epoch ")]
    assert len(epochs) == GALLERY_MAX and epochs[0] == 1 and epochs[-1] == 30 and epochs == sorted(epochs)


def test_small_grids_are_scaled_up_crisply(bare_run: Path) -> None:
    _png(bare_run / "grid.png", (9, 9, 9), size=(200, 200))
    _png(bare_run / "loss.png", (8, 8, 8), size=(200, 100))
    _, page = _page(bare_run)
    grid, loss = page.images
    assert grid["class"] == "pixel" and grid["width"] == "800"  # 4x, a whole factor
    assert "class" not in loss and "width" not in loss  # a figure is left alone


def test_not_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a run directory .no config.json"):
        write_report(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        write_report(tmp_path / "absent")
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="cannot read config"):
        write_report(tmp_path)


def test_write_is_atomic_and_out_is_honoured(full_run: Path, tmp_path: Path) -> None:
    before = {p for p in full_run.rglob("*")}
    write_report(full_run)
    write_report(full_run)  # a rewrite replaces the file
    assert {p for p in full_run.rglob("*")} == before | {full_run / "report.html"}
    out = write_report(full_run, tmp_path / "elsewhere" / "r.html")
    assert out == tmp_path / "elsewhere" / "r.html" and out.read_text().startswith("<!DOCTYPE html>")
    assert [p.name for p in out.parent.iterdir()] == ["r.html"]


def test_class_conditional_runs_get_a_guidance_section(bare_run: Path) -> None:
    preset("tiny").replace(model={"class_conditional": True, "class_names": ("a", "b")}).save(bare_run / "config.json")
    _, page = _page(bare_run)
    assert page.headings == SECTIONS[:6] + ["Classes and guidance"] + SECTIONS[6:]
    assert any(f"ddpm-cars guidance {bare_run}" in line for line in page.missing)
    rows = [{"guidance": 0.0, "share": 0.41}, {"guidance": 3.0, "share": 0.987}]
    (bare_run / "guidance").mkdir()
    (bare_run / "guidance" / "guidance.json").write_text(json.dumps({"rows": rows}))
    _png(bare_run / "guidance" / "guidance.png", (1, 2, 3))
    _, page = _page(bare_run)
    assert ["guidance 0", "41.0%", "guidance 3", "98.7%"] == [
        c for c in page.cells if c.startswith("guidance") or c.endswith("%")
    ]
    assert any("one row per class" in caption for caption in page.captions)
