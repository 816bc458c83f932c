"""Guidance windows in noise level on #32's families (#33 item 1): the level of each call is the scheduler's own flow
sigma of that step (its `sigmas`, after the pipeline set them, dynamic shifting included; CogVideoX's DDIM:
sqrt((1 - a) / a)), and a stop given as the level of call k guides exactly the calls a stop at call k guides (the same
images and evaluations), through shapefirst.generate, as the command line runs it."""
import numpy as np
import pytest
import torch

import shapefirst.tiny as tiny
from shapefirst.generate import generate
from shapefirst.guidance import GuidanceSchedule
from shapefirst.noise_levels import run_noise_levels

STEPS, K, W = 5, 2, 4.0
CALL = {"sana": dict(height=32, width=32, max_sequence_length=16, use_resolution_binning=False),
        "cogvideox": dict(height=16, width=16, num_frames=9, max_sequence_length=16),
        "wan": dict(height=16, width=16, num_frames=5, max_sequence_length=16),
        "flux": dict(height=16, width=16), "qwenimage": dict(height=16, width=16),
        "lumina2": dict(height=16, width=16), "cogview4": dict(height=16, width=16),
        "chroma": dict(height=16, width=16), "sd3": dict(height=16, width=16)}


def build(name, tmp_path):
    make = getattr(tiny, f"tiny_{name}_pipeline")
    return make(folder=tmp_path) if "folder" in make.__code__.co_varnames else make()


@pytest.mark.parametrize("name", sorted(CALL))
def test_a_stop_in_noise_level_guides_the_calls_of_the_same_stop_in_calls(name, tmp_path):
    pipe = build(name, tmp_path)
    if name == "sana":
        CALL[name]["complex_human_instruction"] = None
    by_call = generate(pipe, ["a red circle moving left"], GuidanceSchedule(W, stop_step=K, after="cond"),
                       steps=STEPS, **CALL[name])
    sched = pipe.scheduler
    levels = run_noise_levels(sched, STEPS)
    if hasattr(sched, "sigmas"):  # flow matching: the scheduler's own flow sigmas
        want = torch.as_tensor(sched.sigmas[:STEPS], dtype=torch.float64).tolist()
    else:  # CogVideoX's DDIM: sqrt((1 - a) / a) at its integer timesteps
        a = sched.alphas_cumprod.double()[sched.timesteps[:STEPS].long()]
        want = ((1 - a) / a).sqrt().tolist()
    assert levels == pytest.approx(want, abs=2e-3), (levels, want)
    assert all(a > b for a, b in zip(levels, levels[1:]))
    by_level = generate(pipe, ["a red circle moving left"], GuidanceSchedule(W, stop_sigma=levels[K], after="cond"),
                        steps=STEPS, **CALL[name])
    assert by_level.evaluations_per_image == by_call.evaluations_per_image == [2 * K + STEPS - K]
    assert np.array_equal(by_level.images, by_call.images)
