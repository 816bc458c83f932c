"""The moving shapes world (#34): clips, captions and the exact judge of every frame and of the motion."""
import numpy as np
import pytest

from shapefirst.world.judge import degrade
from shapefirst.world.motion import (FRAMES, MOTIONS, SPEED, Clip, all_combinations, frame_scenes, is_held_out_clip,
                                     judge_clip, parse_motion, render_clip, sample_clips, video_prompts)
from shapefirst.world.render import EXTENT, RES, Scene, parse_caption, render


def test_the_judge_reads_every_rendered_clip_exactly():
    clips = sample_clips(150, 0, "all")
    assert {c.motion for c in clips} == set(MOTIONS)
    for c in clips:
        v = judge_clip(render_clip(c))
        assert v.labels == c.labels() and v.one_object, (c, v)


def test_the_judge_is_robust_to_blur_and_noise_and_reads_the_speed():
    rng = np.random.default_rng(0)
    clips = sample_clips(60, 1, "all")
    right = 0
    for c in clips:
        frames = np.stack([degrade(f, rng) for f in render_clip(c)])
        v = judge_clip(frames)
        right += v.labels == c.labels()
        ux, uy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}[c.motion]
        assert v.speed == pytest.approx((ux * SPEED, uy * SPEED), abs=0.35)
    assert right == len(clips)  # measured: 60 of 60


def test_reversed_clips_move_the_other_way_and_shuffled_frames_are_not_a_motion():
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up", "still": "still"}
    for c in sample_clips(20, 2, "all"):
        frames = render_clip(c)
        assert judge_clip(frames[::-1]).labels["motion"] == opposite[c.motion]
        assert judge_clip(np.stack([frames[FRAMES // 2]] * FRAMES)).labels["motion"] == "still"


def test_two_objects_or_an_empty_clip_are_seen():
    c = Clip(Scene("circle", "red", "left", "small", "striped"), "up")
    frames = render_clip(c)
    assert judge_clip(frames).one_object
    other = render(Scene("square", "blue", "right", "small", "plain"))
    two = np.where(np.abs(other - 0.5).sum(-1, keepdims=True) > 0.05, other, frames)
    assert not judge_clip(two).one_object
    empty = judge_clip(np.full((FRAMES, RES, RES, 3), 0.5, np.float32))
    assert empty.labels == {} and empty.counts == [0] * FRAMES


def test_the_object_stays_mostly_in_the_frame_and_the_middle_frame_is_at_its_anchor():
    """Worst case: a large square jittered toward the edge it moves to; at least 80% of it stays in the frame."""
    for motion in MOTIONS:
        for pos, jitter in (("left", (-2, 0)), ("right", (2, 0)), ("top", (0, -2)), ("bottom", (0, 2))):
            clip = Clip(Scene("square", "red", pos, "large", "plain", dx=jitter[0], dy=jitter[1], ds=1.0), motion)
            scenes = frame_scenes(clip)
            assert scenes[FRAMES // 2] == clip.scene
            full = (EXTENT["large"] + 1.0) ** 2
            for s in scenes:
                inside = (np.abs(render(s) - 0.5).sum(-1) > 0.05).sum()
                assert inside >= 0.8 * full, (motion, pos, s, inside / full)


def test_held_out_split_and_captions():
    combos = all_combinations()
    held = [c for c in combos if is_held_out_clip(c)]
    assert len(combos) == 3600 and len(held) == 450  # one in eight
    assert {c[5] for c in held} == set(MOTIONS)
    for c in sample_clips(200, 4, "train"):
        assert not is_held_out_clip(tuple(c.labels().values()))
    prompts, targets = video_prompts(100, 5)
    for p, t in zip(prompts, targets):
        assert is_held_out_clip(tuple(t.values()))
        assert parse_caption(p) == {k: v for k, v in t.items() if k != "motion"}
        assert parse_motion(p) == t["motion"]
