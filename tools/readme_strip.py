"""Draw the README's strip of pictures, docs/demo/strip.png, from the pictures it shows.

    python tools/readme_strip.py

Top row: the demo's samples, inpainting of held-out cars (the editing record), samples asked
for by body type at guidance 3 (the guidance record); below: one sample being denoised.
Each panel is scaled to the row's height, so the file is the size the README shows it at.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "demo" / "strip.png"
HEIGHT = 206  # the demo grid's own height: the top row is shown at the grid's size
GAP = 8
# the guidance figure's last four columns (guidance 3) and first four class rows, in pixels
GUIDANCE_BOX = (1225, 70, 1800, 690)


def _to_height(image: Image.Image, height: int) -> Image.Image:
    width = round(image.width * height / image.height)
    return image.resize((width, height), Image.Resampling.LANCZOS)


def _to_width(image: Image.Image, width: int) -> Image.Image:
    height = round(image.height * width / image.width)
    return image.resize((width, height), Image.Resampling.LANCZOS)


def strip() -> Image.Image:
    """The strip as one RGB image on white."""
    grid = Image.open(ROOT / "docs/demo/grid.png").convert("RGB")
    inpainting = Image.open(ROOT / "docs/benchmarks/editing/inpainting.png").convert("RGB")
    guidance = Image.open(ROOT / "docs/benchmarks/guidance/guidance.png").convert("RGB").crop(GUIDANCE_BOX)
    top = [_to_height(panel, HEIGHT) for panel in (grid, inpainting, guidance)]
    width = sum(panel.width for panel in top) + GAP * (len(top) - 1)
    denoising = _to_width(Image.open(ROOT / "docs/demo/denoising.png").convert("RGB"), width)
    canvas = Image.new("RGB", (width, HEIGHT + GAP + denoising.height), "white")
    x = 0
    for panel in top:
        canvas.paste(panel, (x, 0))
        x += panel.width + GAP
    canvas.paste(denoising, (0, HEIGHT + GAP))
    return canvas


if __name__ == "__main__":
    strip().save(OUT, optimize=True)
    print(f"wrote {OUT.relative_to(ROOT)}")
