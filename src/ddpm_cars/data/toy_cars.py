"""Procedural side-view toy cars: the built-in dataset when no real images are at hand.

Each image shows one bold, chunky car (body, cabin with windows, two dark wheels
with light hubs, lights and a ground shadow) on a simple background: a sky
gradient or flat backdrop above a ground band. The body type is the class label.

Variety is deliberately moderate so that a small U-Net can learn the set in
minutes: six body types, nine saturated colours, four backgrounds, and a
random position, scale and facing direction. Shapes are drawn with PIL at 2x
(4x for sizes up to 32) and box-downsampled, which anti-aliases the edges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

MIN_SIZE = 16

Color = tuple[int, int, int]


@dataclass(frozen=True)
class _BodyShape:
    """A car profile facing right; x are fractions of the car length from its rear,
    heights are fractions of the car length."""

    name: str
    body_height: float  # lower body, from sill to shoulder
    cabin_height: float  # shoulder to roof
    cabin_x: tuple[float, float, float, float]  # rear base, rear roof, front roof, front base
    wheel_radius: float
    wheel_x: tuple[float, float]  # rear and front wheel centres


_SHAPES: tuple[_BodyShape, ...] = (
    _BodyShape("sedan", 0.19, 0.16, (0.20, 0.32, 0.62, 0.76), 0.105, (0.20, 0.80)),
    _BodyShape("hatchback", 0.21, 0.19, (0.05, 0.10, 0.55, 0.73), 0.11, (0.20, 0.80)),
    _BodyShape("suv", 0.25, 0.19, (0.03, 0.06, 0.66, 0.78), 0.13, (0.19, 0.81)),
    _BodyShape("pickup", 0.22, 0.19, (0.40, 0.44, 0.66, 0.76), 0.125, (0.18, 0.80)),
    _BodyShape("sports", 0.14, 0.12, (0.24, 0.40, 0.58, 0.82), 0.10, (0.19, 0.81)),
    _BodyShape("van", 0.24, 0.25, (0.02, 0.03, 0.70, 0.87), 0.11, (0.17, 0.83)),
)

BODY_TYPES: tuple[str, ...] = tuple(shape.name for shape in _SHAPES)

_BODY_COLORS: tuple[Color, ...] = (
    (215, 35, 35),  # red
    (245, 125, 20),  # orange
    (240, 200, 25),  # yellow
    (40, 165, 60),  # green
    (20, 160, 170),  # teal
    (35, 85, 215),  # blue
    (125, 55, 190),  # purple
    (230, 75, 155),  # pink
    (160, 205, 35),  # lime
)

# (sky top, sky bottom, ground): a flat backdrop has equal sky colours.
_BACKGROUNDS: tuple[tuple[Color, Color, Color], ...] = (
    ((80, 145, 225), (190, 220, 250), (105, 105, 112)),  # day, asphalt road
    ((110, 175, 240), (205, 232, 250), (80, 150, 65)),  # day, grass
    ((55, 45, 115), (245, 150, 90), (65, 55, 65)),  # dusk
    ((235, 225, 200), (235, 225, 200), (160, 150, 135)),  # studio backdrop
)

_TYRE: Color = (28, 28, 32)
_HUB: Color = (195, 195, 200)
_GLASS: Color = (160, 205, 235)
_HEADLIGHT: Color = (255, 240, 170)
_TAIL_LIGHT: Color = (150, 15, 20)


def _scale(color: Color, factor: float) -> Color:
    """Brighten (factor > 1) or darken (factor < 1) a colour, clipped to [0, 255]."""
    return tuple(min(255, max(0, round(c * factor))) for c in color)  # type: ignore[return-value]


def _background(sky_top: Color, sky_bottom: Color, ground: Color, horizon: int, size: int) -> Image.Image:
    """A vertical sky gradient down to row ``horizon`` and a flat ground band below it."""
    canvas = np.empty((size, size, 3), dtype=np.uint8)
    t = np.linspace(0.0, 1.0, horizon)[:, None]
    sky = (1.0 - t) * np.array(sky_top) + t * np.array(sky_bottom)
    canvas[:horizon] = sky.round().astype(np.uint8)[:, None, :]
    canvas[horizon:] = ground
    return Image.fromarray(canvas)


def _inset_window(cabin: list[tuple[float, float]], margin: float) -> list[tuple[float, float]]:
    """The window inside a cabin trapezoid (rear base, rear roof, front roof, front base)."""
    (x0, base), (x1, roof), (x2, _), (x3, _) = cabin

    def along(xa: float, xb: float, y: float) -> float:  # x on a slanted side at height y
        return xa + (xb - xa) * (base - y) / (base - roof)

    low, high = base - margin, roof + margin
    return [
        (along(x0, x1, low) + margin, low),
        (along(x0, x1, high) + margin, high),
        (along(x3, x2, high) - margin, high),
        (along(x3, x2, low) - margin, low),
    ]


def _draw_car(
    draw: ImageDraw.ImageDraw,
    shape: _BodyShape,
    color: Color,
    shadow: Color,
    left: float,
    length: float,
    ground: float,
) -> None:
    """Draw a right-facing car whose wheels touch ``ground``; all values in pixels."""
    radius = shape.wheel_radius * length
    sill = ground - 0.55 * radius
    shoulder = sill - shape.body_height * length
    roof = shoulder - shape.cabin_height * length
    right = left + length

    inset, spread = 0.02 * length, 0.03 * length
    draw.ellipse((left + inset, ground - spread, right - inset, ground + spread), fill=shadow)

    base = shoulder + 1  # overlap the body so no seam shows
    cabin = [(left + f * length, y) for f, y in zip(shape.cabin_x, (base, roof, roof, base))]
    draw.polygon(cabin, fill=color)
    margin = 0.025 * length
    draw.polygon(_inset_window(cabin, margin), fill=_GLASS)
    pillar = cabin[1][0] + 0.55 * (cabin[2][0] - cabin[1][0])
    draw.rectangle((pillar - margin / 2, roof, pillar + margin / 2, shoulder), fill=color)

    body_height = sill - shoulder
    draw.rounded_rectangle((left, shoulder, right, sill), radius=0.35 * body_height, fill=color)
    draw.rounded_rectangle(
        (left, sill - 0.3 * body_height, right, sill), radius=0.15 * body_height, fill=_scale(color, 0.75)
    )
    light_top, light_bottom = shoulder + 0.18 * body_height, shoulder + 0.36 * body_height
    draw.rectangle((right - 0.05 * length, light_top, right - 0.005 * length, light_bottom), fill=_HEADLIGHT)
    draw.rectangle((left + 0.005 * length, light_top, left + 0.04 * length, light_bottom), fill=_TAIL_LIGHT)

    for fraction in shape.wheel_x:
        x, y = left + fraction * length, ground - radius
        arch = 1.15 * radius
        draw.pieslice((x - arch, y - arch, x + arch, y + arch), 180, 360, fill=_TYRE)
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=_TYRE)
        hub = 0.5 * radius
        draw.ellipse((x - hub, y - hub, x + hub, y + hub), fill=_HUB)


def _check_size(size: int) -> None:
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} pixels so a car stays recognisable, got {size}")


def render_toy_car(rng: np.random.Generator, size: int) -> tuple[np.ndarray, int]:
    """One image: uint8 array [size, size, 3] (HWC RGB) and its body-type label."""
    _check_size(size)
    factor = 4 if size <= 32 else 2  # supersampling for anti-aliased edges
    canvas = size * factor

    label = int(rng.integers(len(BODY_TYPES)))
    sky_top, sky_bottom, ground_color = _BACKGROUNDS[rng.integers(len(_BACKGROUNDS))]
    body_color = _scale(_BODY_COLORS[rng.integers(len(_BODY_COLORS))], rng.uniform(0.85, 1.1))
    length, offset, ground, horizon_gap = rng.uniform((0.58, 0.2, 0.66, 0.05), (0.85, 0.8, 0.88, 0.15))

    horizon = round((ground - horizon_gap) * canvas)
    image = _background(sky_top, sky_bottom, ground_color, horizon, canvas)
    _draw_car(
        ImageDraw.Draw(image),
        _SHAPES[label],
        body_color,
        _scale(ground_color, 0.6),
        left=(1.0 - length) * offset * canvas,
        length=length * canvas,
        ground=ground * canvas,
    )
    image = image.reduce(factor)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.array(image), label


def generate_toy_cars(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n images: uint8 [n, 3, size, size] (CHW) and int64 labels [n].

    Image i depends only on (seed, i), so a smaller n yields a prefix of a larger one.
    """
    if n < 1:
        raise ValueError(f"n must be a positive number of images, got {n}")
    _check_size(size)
    images = np.empty((n, 3, size, size), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    for i in range(n):
        pixels, labels[i] = render_toy_car(np.random.default_rng([seed, i]), size)
        images[i] = pixels.transpose(2, 0, 1)
    return images, labels
