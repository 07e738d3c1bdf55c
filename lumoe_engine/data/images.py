"""Procedural images for the synthetic benchmark, surrogates for missing image files, and noise images.

Every entity has a visual identity (``Identity``): a class-specific layout of shapes, an entity-specific colour triple
(background, primary, secondary), a pair of shapes and a stripe texture. Every image of the entity is a *variation*:
position jitter, scale, rotation, crop, background shade and pixel noise, drawn from a seeded generator. The identity
cues are bold (large areas of the entity's colours, big shapes) so that a tiny vision tower can learn them from a
32x32 view; the variations are moderate so that fresh variations stay recognisable.

Everything is deterministic: the same identity and variation seed give byte-identical PNG files (seeds are derived
with SHA-256, never Python's salted ``hash``).
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from lumoe_engine.seeding import stable_seed

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "hexagon")
N_LAYOUTS = 9  # one per class of the benchmark; index = class index modulo N_LAYOUTS
_SS = 2  # supersampling factor of the drawing canvas (anti-aliasing by downscaling)
_GOLDEN = 0.6180339887498949


@dataclass(frozen=True)
class Identity:
    """The visual identity of one entity.

    bg, primary, secondary: RGB colours (0..255); shapes: (big shape, small shape) from SHAPES;
    layout: 0..N_LAYOUTS-1 (the class's arrangement); stripe_freq: stripes across the image; stripe_angle: degrees.
    """

    bg: tuple[int, int, int]
    primary: tuple[int, int, int]
    secondary: tuple[int, int, int]
    shapes: tuple[str, str]
    layout: int
    stripe_freq: int
    stripe_angle: int


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return (int(round(r * 255)), int(round(g * 255)), int(round(b * 255)))


def identity_for(index: int, layout: int, seed: int = 0) -> Identity:
    """The identity of entity number ``index`` (0..n-1 over the whole benchmark) drawn in class layout ``layout``.

    Consecutive indices get hues a golden-ratio step apart, three background brightness levels and different shape
    pairs, so entities of one class (consecutive indices) differ in every cue.
    """
    off = (stable_seed("hue", seed) % 1000) / 1000.0
    h1 = (index * _GOLDEN + off) % 1.0
    h2 = (h1 + 0.5 + 0.18 * ((index // 3) % 3 - 1)) % 1.0
    level = index % 3
    bg_v = (0.16, 0.50, 0.90)[level]
    bg = _rgb(h1 + 0.25, 0.30, bg_v)
    primary = _rgb(h1, 0.85, 0.95 if level != 2 else 0.70)
    secondary = _rgb(h2, 0.75, 0.55 if level == 1 else 0.95 if level == 0 else 0.45)
    s1 = SHAPES[index % len(SHAPES)]
    s2 = SHAPES[(index // len(SHAPES) + 3 * index + 1) % len(SHAPES)]
    return Identity(
        bg=bg,
        primary=primary,
        secondary=secondary,
        shapes=(s1, s2),
        layout=layout % N_LAYOUTS,
        stripe_freq=2 + (index * 5) % 6,
        stripe_angle=(index * 37) % 180,
    )


def identity_from_name(name: str) -> Identity:
    """A deterministic identity derived from a name alone (SHA-256 seeded): used for surrogate images."""
    s = stable_seed("identity", name)
    return identity_for(s % 997, layout=(s >> 12) % N_LAYOUTS, seed=s >> 24)


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "square":
        n, phase, radii = 4, math.pi / 4, (r,)
    elif shape == "triangle":
        n, phase, radii = 3, -math.pi / 2, (r,)
    elif shape == "diamond":
        n, phase, radii = 4, 0.0, (r * 1.1,)
    elif shape == "hexagon":
        n, phase, radii = 6, 0.0, (r,)
    elif shape == "star":
        n, phase, radii = 10, -math.pi / 2, (r * 1.1, r * 0.48)
    elif shape == "cross":
        w = r * 0.38
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    pts = []
    for i in range(n):
        a = phase + rot + 2 * math.pi * i / n
        rr = radii[i % len(radii)]
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rot: float, fill, outline):
    width = max(1, int(r * 0.12))
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
        ri = r * 0.5
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=outline)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rot), fill=fill, outline=outline, width=width)


# Class layouts: (x, y, radius, which) in units of the canvas; which 0 = big shape/primary, 1 = small/secondary.
LAYOUTS: tuple[tuple[tuple[float, float, float, int], ...], ...] = (
    ((0.50, 0.55, 0.30, 0), (0.78, 0.22, 0.14, 1)),  # big centre-low, small top-right
    ((0.50, 0.50, 0.34, 0), (0.50, 0.50, 0.13, 1)),  # concentric
    ((0.50, 0.38, 0.24, 0), (0.25, 0.78, 0.13, 1), (0.75, 0.78, 0.13, 1)),  # one over two
    ((0.32, 0.50, 0.24, 0), (0.74, 0.50, 0.20, 1)),  # side by side
    ((0.50, 0.62, 0.28, 0), (0.22, 0.20, 0.11, 1), (0.50, 0.16, 0.11, 1), (0.78, 0.20, 0.11, 1)),  # crown
    ((0.36, 0.36, 0.25, 0), (0.72, 0.72, 0.18, 1)),  # diagonal
    ((0.50, 0.50, 0.30, 0), (0.16, 0.16, 0.10, 1), (0.84, 0.84, 0.10, 1), (0.84, 0.16, 0.10, 1), (0.16, 0.84, 0.10, 1)),
    ((0.28, 0.30, 0.18, 0), (0.72, 0.30, 0.18, 0), (0.50, 0.74, 0.18, 1)),  # two big, one small
    ((0.50, 0.30, 0.22, 1), (0.50, 0.70, 0.28, 0)),  # small over big
)


def render(identity: Identity, variation_seed: int, size: int = 64, strength: float = 1.0) -> Image.Image:
    """One variation of an identity: an RGB image ``size`` x ``size``.

    The variation (seeded by ``variation_seed``) jitters position (+-8% of the side), scale (0.85..1.15), rotation
    (+-25 degrees), crops 0..12% and resizes back, shades the background (+-12%) and adds pixel noise (sigma 6/255).
    ``strength`` scales all of these (0 = the canonical image).
    """
    if size < 8:
        raise ValueError(f"render: size must be >= 8 pixels, got {size}")
    rng = np.random.default_rng(variation_seed)
    S = size * _SS
    # Background: entity colour, shaded, with the entity's stripe texture in the secondary colour.
    shade = 1.0 + strength * rng.uniform(-0.12, 0.12)
    bg = np.clip(np.array(identity.bg, np.float32) * shade, 0, 255)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S
    ang = math.radians(identity.stripe_angle + strength * rng.uniform(-8, 8))
    phase = strength * rng.uniform(0, 2 * math.pi)
    wave = 0.5 + 0.5 * np.sin(2 * math.pi * identity.stripe_freq * (xx * math.cos(ang) + yy * math.sin(ang)) + phase)
    alpha = (0.22 * (wave > 0.5))[..., None]
    sec = np.array(identity.secondary, np.float32)
    canvas = bg[None, None, :] * (1 - alpha) + sec[None, None, :] * alpha
    img = Image.fromarray(canvas.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    # Foreground shapes in the class layout.
    dx, dy = strength * rng.uniform(-0.08, 0.08, size=2)
    scale = 1.0 + strength * rng.uniform(-0.15, 0.15)
    rot = strength * rng.uniform(-0.3, 0.3)
    dark = tuple(int(c * 0.45) for c in identity.primary)
    for x, y, r, which in LAYOUTS[identity.layout]:
        shape = identity.shapes[which]
        fill = identity.primary if which == 0 else identity.secondary
        outline = dark if which == 0 else identity.primary
        cx = (0.5 + (x - 0.5) * scale + dx) * S
        cy = (0.5 + (y - 0.5) * scale + dy) * S
        draw_shape(draw, shape, cx, cy, r * scale * S, rot, fill, outline)
    # Rotation of the whole scene (background filled with the shaded bg colour), then crop and resize.
    deg = strength * rng.uniform(-25, 25)
    img = img.rotate(deg, resample=Image.BILINEAR, fillcolor=tuple(int(c) for c in bg))
    crop = strength * rng.uniform(0.0, 0.12)
    cx0 = rng.uniform(0, 1) * crop * S
    cy0 = rng.uniform(0, 1) * crop * S
    side = S * (1 - crop)
    img = img.resize((size, size), Image.LANCZOS, box=(cx0, cy0, cx0 + side, cy0 + side))
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + strength * rng.normal(0.0, 6.0, size=arr.shape)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def surrogate_image(entity: str, size: int = 64) -> Image.Image:
    """A deterministic stand-in image for an entity whose image file is missing: the same name, the same pixels.

    Derived from SHA-256 of the name only, so every missing image of one entity gets the same picture.
    """
    if not isinstance(entity, str) or not entity:
        raise ValueError(f"surrogate_image: entity must be a non-empty str, got {entity!r}")
    return render(identity_from_name(entity), stable_seed("surrogate", entity), size=size, strength=0.0)


def noise_image(seed: int, size: int = 64) -> Image.Image:
    """Uniform RGB noise (a query with no entity in it), deterministic in ``seed``."""
    if size < 1:
        raise ValueError(f"noise_image: size must be >= 1, got {size}")
    rng = np.random.default_rng(stable_seed("noise", seed))
    return Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8), "RGB")
