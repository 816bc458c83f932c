"""The shapes world: one object on a gray background, rendered deterministically from labels.

Low-frequency attributes: shape, color, position, size. High-frequency attribute: texture
(plain, striped, dotted). Every image comes with exact labels and a plain-English caption.
"""
from __future__ import annotations

import colorsys
import itertools
import re
from dataclasses import asdict, dataclass

import numpy as np

RES = 64
SHAPES = ("circle", "square", "triangle", "cross")
COLORS = ("red", "yellow", "green", "cyan", "blue", "purple")
HUES = (0.0, 60.0, 120.0, 180.0, 240.0, 300.0)  # degrees, one per color
POSITIONS = ("left", "right", "top", "bottom", "center")
ANCHORS = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48), "center": (32, 32)}
SIZES = ("small", "large")
EXTENT = {"small": 14.0, "large": 24.0}  # bounding-box side in pixels
TEXTURES = ("plain", "striped", "dotted")
ATTRIBUTES = ("shape", "color", "position", "size", "texture")
BACKGROUND = 0.5
WHERE = {"left": "on the left", "right": "on the right", "top": "at the top",
         "bottom": "at the bottom", "center": "in the center"}
TEMPLATES = (
    "a {size} {color} {texture} {shape} {where}",
    "{where}, a {size} {texture} {color} {shape}",
    "a {texture} {shape}, {size} and {color}, {where}",
)
VALUES = {"shape": SHAPES, "color": COLORS, "position": POSITIONS, "size": SIZES, "texture": TEXTURES}


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    position: str
    size: str
    texture: str
    dx: float = 0.0  # sub-anchor jitter in pixels
    dy: float = 0.0
    ds: float = 0.0

    def labels(self) -> dict[str, str]:
        return {k: getattr(self, k) for k in ATTRIBUTES}

    def caption(self, template: int = 0) -> str:
        return TEMPLATES[template].format(where=WHERE[self.position], **self.labels())

    def to_dict(self) -> dict:
        return asdict(self)


def all_combinations() -> list[tuple[str, ...]]:
    """Every (shape, color, position, size, texture) combination, in a fixed order."""
    return list(itertools.product(SHAPES, COLORS, POSITIONS, SIZES, TEXTURES))


def is_held_out(combo: tuple[str, ...]) -> bool:
    """One combination in eight is never seen in training: the evaluation split.

    The rule is a fixed function of the labels' indices, so it is the same on every machine."""
    idx = [VALUES[a].index(v) for a, v in zip(ATTRIBUTES, combo)]
    return (idx[0] * 7 + idx[1] * 5 + idx[2] * 3 + idx[3] * 2 + idx[4]) % 8 == 3


def sample_scenes(n: int, seed: int, split: str = "train") -> list[Scene]:
    """n scenes with random labels and jitter; split 'train', 'test' (held-out combinations) or 'all'."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"unknown split {split!r}: use 'train', 'test' or 'all'")
    combos = [c for c in all_combinations()
              if split == "all" or is_held_out(c) == (split == "test")]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(combos), n)
    jit = rng.uniform(-1.0, 1.0, (n, 3))
    return [Scene(*combos[p], dx=float(2 * j[0]), dy=float(2 * j[1]), ds=float(j[2]))
            for p, j in zip(picks, jit)]


def sample_captions(scenes: list[Scene], seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [s.caption(int(t)) for s, t in zip(scenes, rng.integers(0, len(TEMPLATES), len(scenes)))]


def color_rgb(color: str, light: bool = False) -> np.ndarray:
    hue = HUES[COLORS.index(color)] / 360.0
    sat, val = (0.35, 1.0) if light else (0.85, 0.9)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32)


def shape_mask(shape: str, cx: float, cy: float, extent: float, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Boolean mask of a shape whose bounding box is extent x extent, centered at (cx, cy)."""
    h = extent / 2.0
    x, y = xx - cx, yy - cy
    if shape == "circle":
        return x * x + y * y <= h * h
    if shape == "square":
        return (np.abs(x) <= h) & (np.abs(y) <= h)
    if shape == "triangle":  # apex up, base at the bottom
        inside_y = (y >= -h) & (y <= h)
        half_width = (y + h) / 2.0
        return inside_y & (np.abs(x) <= half_width)
    if shape == "cross":
        arm = extent / 6.0
        box = (np.abs(x) <= h) & (np.abs(y) <= h)
        return box & ((np.abs(x) <= arm) | (np.abs(y) <= arm))
    raise ValueError(f"unknown shape {shape!r}: use one of {SHAPES}")


def texture_mask(texture: str, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Where the light variant of the color shows: period 4 px at 64 px (2 px on, 2 px off)."""
    if texture == "plain":
        return np.zeros_like(xx, dtype=bool)
    if texture == "striped":
        return (np.floor(yy / 2.0) % 2) == 1
    if texture == "dotted":
        return ((np.floor(xx / 2.0) % 2) == 1) & ((np.floor(yy / 2.0) % 2) == 1)
    raise ValueError(f"unknown texture {texture!r}: use one of {TEXTURES}")


_SS = 2  # supersampling factor for anti-aliased edges


def _grid(res: int):
    c = (np.arange(res * _SS, dtype=np.float32) + 0.5) / _SS
    return np.meshgrid(c, c)  # xx, yy in pixel units


def render(scene: Scene, res: int = RES) -> np.ndarray:
    """HxWx3 float32 image in [0, 1]."""
    xx, yy = _grid(res)
    k = res / RES
    ax, ay = ANCHORS[scene.position]
    cx, cy = (ax + scene.dx) * k, (ay + scene.dy) * k
    extent = (EXTENT[scene.size] + scene.ds) * k
    obj = shape_mask(scene.shape, cx, cy, extent, xx, yy)
    tex = texture_mask(scene.texture, xx / k, yy / k)
    img = np.full(xx.shape + (3,), BACKGROUND, dtype=np.float32)
    img[obj & ~tex] = color_rgb(scene.color)
    img[obj & tex] = color_rgb(scene.color, light=True)
    return img.reshape(res, _SS, res, _SS, 3).mean(axis=(1, 3))


def render_batch(scenes: list[Scene], res: int = RES) -> np.ndarray:
    """Nx3xHxW float32 in [-1, 1], the layout diffusers' VAEs expect."""
    arr = np.stack([render(s, res) for s in scenes])
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2) * 2.0 - 1.0)


_WORDS = {w: (a, w) for a, vals in VALUES.items() for w in vals}


def parse_caption(caption: str) -> dict[str, str]:
    """Labels named in a caption (attributes it does not mention are absent)."""
    out: dict[str, str] = {}
    text = caption.lower()
    for pos, phrase in WHERE.items():
        if phrase in text:
            out["position"] = pos
    for word in re.findall(r"[a-z]+", text):
        if word in _WORDS and _WORDS[word][0] != "position":
            out[_WORDS[word][0]] = word
    return out
