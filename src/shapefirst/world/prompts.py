"""The shapes world's held-out prompts, their target labels and their exact renders."""
from __future__ import annotations

import numpy as np

from .render import render, sample_captions, sample_scenes


def world_prompts(n: int, seed: int = 0, split: str = "test") -> tuple[list[str], list[dict]]:
    """n shapes-world captions and their target labels (sample_scenes + sample_captions)."""
    scenes = sample_scenes(n, seed, split)
    return sample_captions(scenes, seed), [s.labels() for s in scenes]


def world_renders(n: int, seed: int = 0, split: str = "test") -> np.ndarray:
    """The exact renders of the scenes behind world_prompts(n, seed): [n, H, W, 3] in [0, 1]."""
    return np.stack([render(s) for s in sample_scenes(n, seed, split)])
