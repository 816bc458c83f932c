"""The shapes world in motion (#34): one object on a gray background moves the way the caption says.

A clip is FRAMES frames of the image world's scene (shapefirst.world.render: shape, color, position, size,
texture) whose object moves at SPEED pixels per frame (at 64 px) to the left, right, up or down, or stands
still. The caption's position is where the object is at the middle frame: its path runs through the anchor,
SPEED * (FRAMES - 1) / 2 pixels to either side (a large object jittered toward the edge it moves to is cut by
the frame by at most a fifth at the first or last frame). FRAMES = 4k + 1 (Wan's
VAE compresses time 4x and keeps the first frame: 9 frames are 3 latent frames).

The exact judge (`judge_clip`) reads every frame with the image world's judge, then the clip's attributes:
shape, color, size and texture by majority over the frames, position at the middle frame, and motion from
the least-squares slope of the object's center over the frames (still below STILL_SPEED px/frame, else the
axis with the larger slope and its sign).
"""
from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from .judge import judge
from .render import ATTRIBUTES as IMAGE_ATTRIBUTES
from .render import RES, VALUES, WHERE, Scene, render

FRAMES = 9
SPEED = 1.5  # pixels per frame at 64 px: 12 px from the first frame to the last
MOTIONS = ("left", "right", "up", "down", "still")
STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
STILL_SPEED = SPEED / 3  # a judged slope below this is "still"
ATTRIBUTES = IMAGE_ATTRIBUTES + ("motion",)
GOING = {"left": "moving left", "right": "moving right", "up": "moving up", "down": "moving down",
         "still": "standing still"}
TEMPLATES = (
    "a {size} {color} {texture} {shape} {where}, {going}",
    "{where}, a {size} {texture} {color} {shape} {going}",
    "a {texture} {shape}, {size} and {color}, {going} {where}",
)


@dataclass(frozen=True)
class Clip:
    scene: Scene
    motion: str

    def labels(self) -> dict[str, str]:
        return {**self.scene.labels(), "motion": self.motion}

    def caption(self, template: int = 0) -> str:
        return TEMPLATES[template].format(where=WHERE[self.scene.position], going=GOING[self.motion],
                                          **self.scene.labels())

    def to_dict(self) -> dict:
        return {"scene": asdict(self.scene), "motion": self.motion}


def frame_scenes(clip: Clip, frames: int = FRAMES) -> list[Scene]:
    """The scene of each frame: the clip's scene shifted along its path (the middle frame at its anchor)."""
    ux, uy = STEP[clip.motion]
    mid = (frames - 1) / 2
    s = clip.scene
    return [Scene(s.shape, s.color, s.position, s.size, s.texture, dx=s.dx + ux * SPEED * (f - mid),
                  dy=s.dy + uy * SPEED * (f - mid), ds=s.ds) for f in range(frames)]


def render_clip(clip: Clip, frames: int = FRAMES, res: int = RES) -> np.ndarray:
    """[frames, H, W, 3] float32 in [0, 1]."""
    return np.stack([render(s, res) for s in frame_scenes(clip, frames)])


def all_combinations() -> list[tuple[str, ...]]:
    """Every (shape, color, position, size, texture, motion) combination, in a fixed order."""
    return list(itertools.product(*(VALUES[a] for a in IMAGE_ATTRIBUTES), MOTIONS))


def is_held_out_clip(combo: tuple[str, ...]) -> bool:
    """One combination in eight never seen in training, a fixed function of the labels' indices: the image
    world's rule (shapefirst.world.render.is_held_out) with the motion's index in the sum, so a scene is held
    out with some motions and seen with the others."""
    idx = [VALUES[a].index(v) for a, v in zip(IMAGE_ATTRIBUTES, combo)] + [MOTIONS.index(combo[5])]
    return (idx[0] * 7 + idx[1] * 5 + idx[2] * 3 + idx[3] * 2 + idx[4] + idx[5] * 3) % 8 == 3


def sample_clips(n: int, seed: int, split: str = "train") -> list[Clip]:
    """n clips with random labels and jitter; split 'train', 'test' (held-out combinations) or 'all'."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"unknown split {split!r}: use 'train', 'test' or 'all'")
    combos = [c for c in all_combinations() if split == "all" or is_held_out_clip(c) == (split == "test")]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(combos), n)
    jit = rng.uniform(-1.0, 1.0, (n, 3))
    return [Clip(Scene(*combos[p][:5], dx=float(2 * j[0]), dy=float(2 * j[1]), ds=float(j[2])), combos[p][5])
            for p, j in zip(picks, jit)]


def sample_captions(clips: list[Clip], seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [c.caption(int(t)) for c, t in zip(clips, rng.integers(0, len(TEMPLATES), len(clips)))]


def video_prompts(n: int, seed: int = 0, split: str = "test") -> tuple[list[str], list[dict]]:
    """n captions of the moving world and their target labels (the video world's held-out prompts)."""
    clips = sample_clips(n, seed, split)
    return sample_captions(clips, seed), [c.labels() for c in clips]


def parse_motion(caption: str) -> str | None:
    """The motion a caption names, or None."""
    text = caption.lower()
    if "still" in re.findall(r"[a-z]+", text):
        return "still"
    m = re.search(r"moving (left|right|up|down)", text)
    return m.group(1) if m else None


@dataclass
class ClipVerdict:
    counts: list[int]  # objects per frame
    labels: dict[str, str]  # empty when no frame holds an object
    speed: tuple[float, float]  # judged slope of the center, px/frame at 64 px (x, y)

    @property
    def one_object(self) -> bool:
        return all(c == 1 for c in self.counts)

    def matches(self, target: dict[str, str]) -> dict[str, bool]:
        return {k: self.labels.get(k) == v for k, v in target.items()}


def motion_of(centers: np.ndarray) -> tuple[str, tuple[float, float]]:
    """Motion label and slope from the per-frame centers [F, 2] (NaN rows: frames without an object)."""
    ok = ~np.isnan(centers).any(axis=1)
    if ok.sum() < 2:
        return "still", (0.0, 0.0)
    f = np.arange(len(centers))[ok].astype(np.float64)
    vx, vy = (float(np.polyfit(f, centers[ok, i], 1)[0]) for i in range(2))
    if max(abs(vx), abs(vy)) < STILL_SPEED:
        return "still", (vx, vy)
    if abs(vx) >= abs(vy):
        return ("right" if vx > 0 else "left"), (vx, vy)
    return ("down" if vy > 0 else "up"), (vx, vy)


def judge_clip(frames) -> ClipVerdict:
    """[F, H, W, 3] in [0, 1] (or uint8) -> the clip's verdict (see the module docstring)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"judge_clip expects [frames, H, W, 3], got shape {frames.shape}")
    verdicts = [judge(f) for f in frames]
    centers = np.array([v.center if v.count else (np.nan, np.nan) for v in verdicts], dtype=np.float64)
    seen = [v for v in verdicts if v.count]
    if not seen:
        return ClipVerdict([0] * len(frames), {}, (0.0, 0.0))
    labels = {a: Counter(v.labels[a] for v in seen).most_common(1)[0][0] for a in ("shape", "color", "size",
                                                                                 "texture")}
    mid = verdicts[len(frames) // 2]
    labels["position"] = mid.labels["position"] if mid.count else Counter(
        v.labels["position"] for v in seen).most_common(1)[0][0]
    labels["motion"], speed = motion_of(centers)
    return ClipVerdict([v.count for v in verdicts], {a: labels[a] for a in ATTRIBUTES}, speed)
