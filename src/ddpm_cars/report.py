"""One self-contained HTML page about a run directory: what a user opens after training.

``write_report(run_dir)`` gathers what the run directory holds -- config, sample grids,
denoising and forward-process strips, loss and metric curves, the final evaluation and
the memorisation check -- into ``report.html``. Pictures are embedded as base64 data
URIs and the CSS sits in a ``<style>`` block, so the file can be mailed or archived alone.
Every part but ``config.json`` is optional; a missing one says which command makes it.
"""

from __future__ import annotations

import base64
import csv
import json
import re
import shlex
import struct
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

from ddpm_cars.errors import MissingFileError, UserError
from ddpm_cars.files import atomic_write_text
from ddpm_cars.run import CONFIG_FILE, list_checkpoints

REPORT_FILE = "report.html"
GALLERY_MAX = 12  # training-time grids shown, evenly spaced, first and last included
_EPOCH = re.compile(r"^epoch_(\d+)\.png$")
# what metric names that do not say it themselves measure (keys of metrics.json and metrics.csv)
METRIC_MEANINGS = {
    "judge_fd": "Frechet distance on toy-car judge features, lower is better",
    "judge_kid": "KID on toy-car judge features, lower is better",
    "judge_kid_std": "std of judge_kid over subsets",
}
_CSS = """
body { max-width: 1000px; margin: 2em auto; padding: 0 1em; color: #222;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; line-height: 1.45; }
h1 { margin-bottom: 0.1em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
.sub { color: #555; margin-top: 0; } .missing { color: #888; font-size: 0.92em; }
.missing code { color: #666; background: #f4f4f4; padding: 0 0.3em; border-radius: 3px; }
.note { background: #fff6d6; border: 1px solid #e8c95a; border-radius: 4px; padding: 0.6em 0.9em; margin: 0.8em 0; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.7em; text-align: left; vertical-align: top; }
th { background: #f6f6f6; font-weight: 600; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 0.8em 0; } figcaption { color: #555; font-size: 0.9em; }
img { max-width: 100%; height: auto; } img.pixel { image-rendering: pixelated; }
.gallery { display: flex; flex-wrap: wrap; gap: 0.8em; align-items: flex-end; } .gallery figure { margin: 0; }
.gallery img { max-width: 180px; } .config { display: flex; flex-wrap: wrap; gap: 0 1.5em; }
"""


def _fmt(value: Any) -> str:
    """A value for a table cell: floats with 4 significant digits, null as ``--``."""
    if value is None or value == "":
        return "--"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _cell(text: str) -> Any:
    """A CSV cell as an int, float, None (empty) or the string itself."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return None if text.strip() == "" else text


def _label(key: str) -> str:
    """A metric's key, with what it measures when the name does not say it."""
    meaning = METRIC_MEANINGS.get(key.rsplit(".", 1)[-1])
    return f"{key} ({meaning})" if meaning else key


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        flat.update(_flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return flat


def _table(rows: list[tuple[str, Any]], head: tuple[str, str] | None = ("key", "value")) -> str:
    body = "".join(
        f"<tr><td>{escape(k)}</td><td{' class=num' if isinstance(v, (int, float)) and not isinstance(v, bool) else ''}>"
        f"{escape(_fmt(v))}</td></tr>"
        for k, v in rows
    )
    top = f"<tr><th>{escape(head[0])}</th><th>{escape(head[1])}</th></tr>" if head else ""
    return f"<table>{top}{body}</table>"


def _png_width(data: bytes) -> int | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">I", data[16:20])[0]
    return None


def _img(path: Path, alt: str, caption: str = "", fit: int | None = None) -> str:
    """An embedded PNG. A sample grid (``fit``: the width to fill) narrower than ``fit`` is
    scaled up by a whole factor with crisp pixels; a figure (no ``fit``) is left as it is."""
    data = path.read_bytes()
    width = _png_width(data)
    scale = max(1, min(4, fit // width)) if fit and width else 1
    size = f' width="{width * scale}"' if width and scale > 1 else ""
    cls = ' class="pixel"' if fit and width and width < fit else ""
    src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    cap = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{src}" alt="{escape(alt, quote=True)}"{size}{cls}>{cap}</figure>'


def _missing(what: str, command: str) -> str:
    return f'<p class="missing">{escape(what)} is not there; make it with <code>{escape(command)}</code>.</p>'


def _section(title: str, body: str) -> str:
    anchor = title.lower().replace(" ", "-")
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>\n{body}\n</section>\n'


def _read_csv(path: Path) -> tuple[list[str], list[list[Any]]]:
    if not path.is_file():
        return [], []
    rows = list(csv.reader(path.read_text().splitlines()))
    return (rows[0], [[_cell(c) for c in r] for r in rows[1:] if r]) if rows else ([], [])


def _epoch_grids(run_dir: Path) -> list[tuple[int, Path]]:
    samples = run_dir / "samples"
    found = [(int(m.group(1)), p) for p in samples.glob("epoch_*.png") if (m := _EPOCH.match(p.name))]
    return sorted(found)


def final_grid(run_dir: Path) -> Path | None:
    """``grid.png``, else ``samples/final.png``, else the highest-epoch ``samples/epoch_N.png``."""
    for candidate in (run_dir / "grid.png", run_dir / "samples" / "final.png"):
        if candidate.is_file():
            return candidate
    grids = _epoch_grids(run_dir)
    return grids[-1][1] if grids else None


def _summary(run_dir: Path, now: str) -> str:
    rows: list[tuple[str, Any]] = []
    checkpoints = list_checkpoints(run_dir)
    latest = checkpoints[-1] if checkpoints else None
    rows.append(
        ("latest checkpoint", f"step {int(latest.name.removeprefix('step_'))} ({latest.name})" if latest else None)
    )
    _, loss = _read_csv(run_dir / "loss.csv")
    loss = [r for r in loss if len(r) >= 2 and isinstance(r[1], (int, float))]
    if loss:
        tail = [r[1] for r in loss[-100:]]
        rows.append(("training steps", f"{loss[-1][0]} ({len(loss)} rows logged)"))
        rows.append(("last loss (mean of last 100 rows)", sum(tail) / len(tail)))
        rows.append(("min loss", min(r[1] for r in loss)))
    rows.append(("report generated (UTC)", now))
    return _table(rows, None)


def _samples(run_dir: Path, run: str) -> str:
    grid = final_grid(run_dir)
    if grid is None:
        return _missing("The sample grid (grid.png)", f"ddpm-cars sample --checkpoint {run} --out {run}")
    return _img(grid, "grid of generated samples", str(grid.relative_to(run_dir)), fit=960)


def _denoising(run_dir: Path, run: str) -> str:
    command = f"ddpm-cars sample --checkpoint {run} --out {run}"
    parts = []
    for name, alt, cmd in (
        ("denoising.png", "denoising strip: one image from noise to sample", command),
        ("trajectory.png", "x_t and predicted x_0 along the sampling trajectory", command + " --trajectory"),
    ):
        path = run_dir / name
        parts.append(_img(path, alt, name) if path.is_file() else _missing(f"The {name[:-4]} strip ({name})", cmd))
    return "\n".join(parts)


def _curves(run_dir: Path) -> str:
    loss = run_dir / "loss.png"
    parts = [
        _img(loss, "training loss curve", "loss.png")
        if loss.is_file()
        else _missing("The loss curve (loss.png)", "ddpm-cars train ...")
    ]
    metrics = run_dir / "metrics.png"
    header, rows = _read_csv(run_dir / "metrics.csv")
    if metrics.is_file():
        parts.append(_img(metrics, "sample-quality metrics during training", "metrics.png"))
    if rows:
        last = rows[-1]
        parts.append(f"<p>Metrics at step {escape(_fmt(last[0]))} (last row of metrics.csv):</p>")
        parts.append(_table([(_label(k), v) for k, v in zip(header[1:], last[1:])], ("metric", "value")))
    if not metrics.is_file() and not rows:
        parts.append(_missing("The metric curves (metrics.png, metrics.csv)", "ddpm-cars train ... --eval-every N"))
    return "\n".join(parts)


def _eval_metrics(run_dir: Path) -> dict[str, Any] | str | None:
    """``eval/metrics.json`` flattened to dotted keys; None if absent, a message if unreadable."""
    path = run_dir / "eval" / "metrics.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return f"cannot read {path}: {err}"
    return _flatten(data) if isinstance(data, dict) else f"{path} holds no JSON object"


def _is_note(key: str, value: Any) -> bool:
    return isinstance(value, str) and (key.rsplit(".", 1)[-1] == "note" or key.endswith("_skipped"))


_MEMORISATION = ("memoriz", "memoris")


def _evaluation(flat: dict[str, Any] | str | None, run: str) -> str:
    if flat is None:
        return _missing("The final evaluation (eval/metrics.json)", f"ddpm-cars eval --checkpoint {run}")
    if isinstance(flat, str):
        return f'<div class="note">{escape(flat)}</div>'
    notes = "".join(
        f'<div class="note"><strong>{escape(k)}</strong>: {escape(v)}</div>' for k, v in flat.items() if _is_note(k, v)
    )
    rows = [(_label(k), v) for k, v in flat.items() if not _is_note(k, v) and not k.startswith(_MEMORISATION)]
    return notes + _table(rows, ("metric", "value"))  # the memorisation numbers have their own section


def _memorisation(run_dir: Path, flat: dict[str, Any] | str | None, run: str) -> str:
    nearest, hist = run_dir / "eval" / "nearest.png", run_dir / "eval" / "nearest_distances.png"
    if not nearest.is_file() and not hist.is_file():
        return _missing("The memorisation check (eval/nearest.png)", f"ddpm-cars eval --checkpoint {run}")
    parts = []
    if isinstance(flat, dict) and (rows := [(k, v) for k, v in flat.items() if k.startswith(_MEMORISATION)]):
        parts.append(_table(rows, ("distance", "value")))
    if nearest.is_file():
        caption = "eval/nearest.png: each sample beside its nearest training image"
        parts.append(_img(nearest, "generated samples beside their nearest training images", caption, fit=960))
    if hist.is_file():
        alt = "histogram of sample-to-training nearest-neighbour distances"
        parts.append(_img(hist, alt, "eval/nearest_distances.png"))
    return "\n".join(parts)


def _conditional(config: dict[str, Any]) -> bool:
    model = config.get("model")
    return isinstance(model, dict) and bool(model.get("class_conditional"))


def _guidance(run_dir: Path, run: str) -> str:
    """A class-conditional run's guidance measurement: the share per scale and the picture."""
    result, picture = run_dir / "guidance" / "guidance.json", run_dir / "guidance" / "guidance.png"
    if not result.is_file():
        return _missing("The guidance measurement (guidance/guidance.json)", f"ddpm-cars guidance {run}")
    try:
        summary = json.loads(result.read_text())
        rows = [(f"guidance {row['guidance']:g}", f"{row['share']:.1%}") for row in summary["rows"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"<p>guidance/guidance.json cannot be read: {escape(str(err))}</p>"
    parts = [_table(rows, ("scale", "samples judged to be the class asked for"))]
    if picture.is_file():
        parts.append(
            _img(picture, "samples of each class at each guidance scale", "guidance/guidance.png: one row per class")
        )
    return "\n".join(parts)


def _forward(run_dir: Path, run: str) -> str:
    path = run_dir / "forward_process.png"
    if not path.is_file():
        command = f"ddpm-cars forward --out {shlex.quote(str(run_dir / 'forward_process.png'))}"
        return _missing("The forward-process strip (forward_process.png)", command)
    return _img(path, "forward process: a training image noised over t", "forward_process.png")


def _gallery(run_dir: Path) -> str:
    grids = _epoch_grids(run_dir)
    if not grids:
        return _missing("Training-time sample grids (samples/epoch_*.png)", "ddpm-cars train ...")
    picks = sorted({round(i * (len(grids) - 1) / (GALLERY_MAX - 1)) for i in range(GALLERY_MAX)})
    shown = grids if len(grids) <= GALLERY_MAX else [grids[i] for i in picks]
    note = f"<p>{len(shown)} of {len(grids)} grids, evenly spaced.</p>" if len(shown) < len(grids) else ""
    items = "".join(_img(p, f"samples after epoch {e}", f"epoch {e}", fit=180) for e, p in shown)
    return f'{note}<div class="gallery">{items}</div>'


def _configuration(config: dict[str, Any]) -> str:
    tables = [
        f"<div><h3>{escape(k)}</h3>{_table(list(_flatten(v).items()))}</div>"
        for k, v in config.items()
        if isinstance(v, dict)
    ]
    other = [(k, v) for k, v in config.items() if not isinstance(v, dict)]
    if other:
        tables.append(f"<div><h3>other</h3>{_table(other)}</div>")
    raw = escape(json.dumps(config, indent=2))
    return (
        f'<div class="config">{"".join(tables)}</div><details><summary>config.json</summary><pre>{raw}</pre></details>'
    )


def _headline(config: dict[str, Any]) -> str:
    model, data, diff = (v if isinstance(v := config.get(k), dict) else {} for k in ("model", "data", "diffusion"))
    size = data.get("image_size")
    parts = [
        model.get("name"),
        f"{size}x{size}" if size else None,
        f"{diff['schedule']} schedule" if diff.get("schedule") else None,
        f"{diff['prediction']} prediction" if diff.get("prediction") else None,
        None if "learn_variance" not in diff else ("learned variance" if diff["learn_variance"] else "fixed variance"),
        f"{diff['timesteps']} timesteps" if diff.get("timesteps") else None,
    ]
    return " · ".join(str(p) for p in parts if p)


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write ``run_dir/report.html`` (or ``out``) atomically and return its path."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise MissingFileError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read config {config_path}: {err}") from err
    if not isinstance(config, dict):
        raise UserError(f"{config_path} must hold a JSON object; got {type(config).__name__}")
    run = shlex.quote(str(run_dir))
    name = run_dir.resolve().name
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    evaluation = _eval_metrics(run_dir)
    body = "".join(
        [
            _section("Summary", _summary(run_dir, now)),
            _section("Final samples", _samples(run_dir, run)),
            _section("Denoising", _denoising(run_dir, run)),
            _section("Training curves", _curves(run_dir)),
            _section("Evaluation", _evaluation(evaluation, run)),
            _section("Memorisation check", _memorisation(run_dir, evaluation, run)),
            *([_section("Classes and guidance", _guidance(run_dir, run))] if _conditional(config) else []),
            _section("Forward process", _forward(run_dir, run)),
            _section("Samples during training", _gallery(run_dir)),
            _section("Configuration", _configuration(config)),
        ]
    )
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(name)} -- ddpm-cars report</title><style>{_CSS}</style></head>\n<body>\n"
        f'<h1>{escape(name)}</h1><p class="sub">{escape(_headline(config))}</p>\n{body}</body></html>\n'
    )
    out = Path(out) if out is not None else run_dir / REPORT_FILE
    atomic_write_text(out, page)
    return out
