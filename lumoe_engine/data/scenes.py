"""Scenes: the pictures of world v2. An entity is an *object* (its class's arrangement of shapes in its own colours)
placed in a scene; everything else in the picture belongs to no entity.

A scene (``render_scene``) = a background from a pool shared by every entity (``background_pool``: two muted colours
in one of several patterns), the entity's object at a random position, scale and rotation, and 1-3 distractor
objects in muted colours (no entity's), one of which may overlap the object (partial occlusion). Two pictures of one
entity share the object and nothing else; two pictures of different entities may share the background. A held-out
picture is a new scene: a new draw of background, placement and distractors.

General-utility pictures (``render_general``) hold no entity: one to three plain shapes in named colours on a pool
background, the subject of entity-free questions (colour, shape, count, position).

Letters: S side of the drawing canvas (the PNG side times the supersampling factor).
Deterministic: the same arguments give byte-identical images (seeds from SHA-256, ``seeding.stable_seed``).
"""
from __future__ import annotations

import colorsys
import math
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from lumoe_engine.data.images import LAYOUTS, SHAPES, Identity, draw_shape
from lumoe_engine.seeding import stable_seed

PATTERNS = ("gradient", "stripes", "checker", "horizon", "dots", "diagonal")
N_BACKGROUNDS = 16
# general-utility pictures: named colours and shapes the questions ask about
GENERAL_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
                   "white": (245, 245, 245), "black": (20, 20, 20)}
GENERAL_SHAPES = ("circle", "square", "triangle", "star", "cross")
_SS = 2


@dataclass(frozen=True)
class Background:
    """One background of the shared pool: two muted RGB colours drawn in ``pattern`` (``PATTERNS``)."""

    a: tuple[int, int, int]
    b: tuple[int, int, int]
    pattern: str
    freq: int
    angle: int


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return (int(r * 255), int(g * 255), int(b * 255))


def _muted(rng: random.Random) -> tuple[int, int, int]:
    """A background colour: any hue, little saturation."""
    return _hsv(rng.random(), rng.uniform(0.05, 0.28), rng.uniform(0.30, 0.85))


def background_pool(seed: int, n: int = N_BACKGROUNDS) -> list[Background]:
    """The ``n`` backgrounds every entity's scenes are drawn on (seeded by the world's seed)."""
    rng = random.Random(stable_seed("scene-backgrounds", seed))
    out = []
    for i in range(n):
        a = _muted(rng)
        b = _muted(rng)
        out.append(Background(a, b, PATTERNS[i % len(PATTERNS)], rng.randint(2, 5), rng.randrange(0, 180, 15)))
    return out


def _draw_background(bg: Background, S: int, rng: np.random.Generator) -> Image.Image:
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S
    ang = math.radians(bg.angle)
    u = xx * math.cos(ang) + yy * math.sin(ang)
    phase = rng.uniform(0, 1)
    if bg.pattern == "gradient":
        t = np.clip(u, 0, 1)
    elif bg.pattern == "stripes":
        t = (np.floor((u + phase) * bg.freq * 2) % 2).astype(np.float32)
    elif bg.pattern == "checker":
        t = ((np.floor(xx * bg.freq * 2 + phase) + np.floor(yy * bg.freq * 2)) % 2).astype(np.float32)
    elif bg.pattern == "horizon":
        t = (yy > 0.35 + 0.3 * phase).astype(np.float32)
    elif bg.pattern == "dots":
        cx = (xx * bg.freq * 2 + phase) % 1 - 0.5
        cy = (yy * bg.freq * 2) % 1 - 0.5
        t = (cx * cx + cy * cy < 0.09).astype(np.float32)
    else:  # diagonal: a smooth wave
        t = 0.5 + 0.5 * np.sin(2 * math.pi * bg.freq * (u + phase))
    shade = rng.uniform(0.9, 1.1)
    a, b = np.array(bg.a, np.float32) * shade, np.array(bg.b, np.float32) * shade
    canvas = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")


def _object_tile(identity: Identity, side: int, rot: float) -> Image.Image:
    """The entity's object (its class layout, its colours) on a transparent ``side`` x ``side`` tile."""
    tile = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(tile)
    dark = tuple(int(c * 0.45) for c in identity.primary)
    for x, y, r, which in LAYOUTS[identity.layout]:
        fill = identity.primary if which == 0 else identity.secondary
        outline = dark if which == 0 else identity.primary
        draw_shape(draw, identity.shapes[which], x * side, y * side, r * side, rot, fill + (255,), outline + (255,))
    return tile


def _finish(img: Image.Image, size: int, rng: np.random.Generator, noise: float = 4.0) -> Image.Image:
    img = img.resize((size, size), Image.LANCZOS)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, noise, size=(size, size, 3))
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def render_scene(identity: Identity, background: Background, scene_seed: int, size: int = 64) -> Image.Image:
    """One scene of an entity: ``background``, the entity's object (side 60-85% of the picture, anywhere inside
    it, rotated up to +-30 degrees) and 1-2 small muted distractors, one overlapping the object 40% of the time."""
    rng = np.random.default_rng(scene_seed)
    S = size * _SS
    img = _draw_background(background, S, rng)
    side = int(S * rng.uniform(0.60, 0.85))
    deg = rng.uniform(-30, 30)
    tile = _object_tile(identity, side, 0.0).rotate(deg, resample=Image.BICUBIC)
    x0 = int(rng.uniform(-0.08, 1.08) * (S - side))
    y0 = int(rng.uniform(-0.08, 1.08) * (S - side))
    n_dis = int(rng.integers(1, 3))
    occlude = rng.random() < 0.4
    spots = []
    for i in range(n_dis):
        r = rng.uniform(0.05, 0.09) * S
        if i == 0 and occlude:  # on the object's border: covers a part of it
            ang = rng.uniform(0, 2 * math.pi)
            cx, cy = x0 + side / 2 + 0.45 * side * math.cos(ang), y0 + side / 2 + 0.45 * side * math.sin(ang)
            spots.append((cx, cy, r, True))
        else:
            spots.append((rng.uniform(0.1, 0.9) * S, rng.uniform(0.1, 0.9) * S, r, False))
    draw = ImageDraw.Draw(img)
    colours = [(_muted_np(rng), SHAPES[int(rng.integers(len(SHAPES)))]) for _ in spots]
    for (cx, cy, r, top), (col, shape) in zip(spots, colours):
        if not top:
            draw_shape(draw, shape, cx, cy, r, rng.uniform(0, 1), col, tuple(int(c * 0.6) for c in col))
    img.paste(tile, (x0, y0), tile)
    draw = ImageDraw.Draw(img)
    for (cx, cy, r, top), (col, shape) in zip(spots, colours):
        if top:
            draw_shape(draw, shape, cx, cy, r, rng.uniform(0, 1), col, tuple(int(c * 0.6) for c in col))
    return _finish(img, size, rng)


def _muted_np(rng: np.random.Generator) -> tuple[int, int, int]:
    """A distractor's colour: any hue, less saturated than any entity's."""
    return _hsv(rng.random(), rng.uniform(0.0, 0.22), rng.uniform(0.25, 0.95))


@dataclass(frozen=True)
class GeneralObject:
    """A plain shape of a general-utility picture: ``shape`` (``GENERAL_SHAPES``), ``colour`` (``GENERAL_COLOURS``),
    centre (x, y) and radius in units of the picture side."""

    shape: str
    colour: str
    x: float
    y: float
    r: float


def render_general(objects: Sequence[GeneralObject], background: Background, scene_seed: int,
                   size: int = 64) -> Image.Image:
    """A picture of no entity: ``objects`` drawn in their named colours on ``background``."""
    rng = np.random.default_rng(scene_seed)
    S = size * _SS
    img = _draw_background(background, S, rng)
    draw = ImageDraw.Draw(img)
    for o in objects:
        col = GENERAL_COLOURS[o.colour]
        edge = tuple(int(c * 0.5) for c in col) if o.colour != "black" else (90, 90, 90)
        draw_shape(draw, o.shape, o.x * S, o.y * S, o.r * S, rng.uniform(-0.2, 0.2), col, edge)
    return _finish(img, size, rng, noise=3.0)


def pick_background(pool: Sequence[Background], seed: int) -> Background:
    return pool[stable_seed("scene-background", seed) % len(pool)]


__all__ = ["Background", "GeneralObject", "background_pool", "render_scene", "render_general", "pick_background",
           "PATTERNS", "GENERAL_COLOURS", "GENERAL_SHAPES", "N_BACKGROUNDS"]
