"""The shape-settled adaptive stop on the families that guide in separate calls (#32 item 1: "shape-settled stops
work"): each image stops where its own x0-hat's low band settles, computed here by hand from a plain traced run
(packed 2x2 tokens put back in place by test code), and then equals its solo run with a fixed stop at that call;
the rows the denoiser computes are the evaluations."""
import numpy as np
import pytest
import torch

import shapefirst.tiny as tiny
from shapefirst.frequency import split_bands
from shapefirst.generate import generate
from shapefirst.guidance import AdaptiveStop, GuidanceSchedule

PROMPTS = ["a red circle on the left", "a blue square on the right"]  # the same token length
STEPS, W, PATIENCE = 6, 4.0, 1
CALL = {"wan": dict(height=16, width=16, num_frames=5, max_sequence_length=16), "flux": dict(height=16, width=32),
        "qwenimage": dict(height=32, width=16, max_sequence_length=16), "chroma": dict(height=16, width=16),
        "lumina2": dict(height=32, width=32, max_sequence_length=48), "cogview4": dict(height=16, width=16)}


def spatial(x0: torch.Tensor, name: str, scale: int) -> torch.Tensor:
    """[N, ...] x0-hat with its spatial axes last: packed [N, (h/2)(w/2), 4C] tokens put back as [N, C, h, w]."""
    if x0.dim() != 3:
        return x0
    h, w = (CALL[name][k] // scale for k in ("height", "width"))
    n, _, d = x0.shape
    return x0.reshape(n, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, d // 4, h, w)


def low_changes(traj, name, scale) -> torch.Tensor:
    """[calls - 1, images]: the relative change of each image's x0-hat low band from the call before."""
    x0 = traj.arrays["x0"].float()
    lows = torch.stack([split_bands(spatial(x0[c], name, scale))[0].flatten(1) for c in range(x0.shape[0])])
    return (lows[1:] - lows[:-1]).norm(dim=2) / (lows[1:].norm(dim=2) + 1e-8)


def settle_calls(changes: torch.Tensor, tol: float) -> list[int]:
    """Per image the first unguided call (STEPS: none) the shape rule gives: settled at call c >= PATIENCE once the
    change stayed below tol PATIENCE calls in a row; unguided from c + 1."""
    out = []
    for i in range(changes.shape[1]):
        streak, stop = 0, STEPS
        for c in range(1, changes.shape[0] + 1):
            streak = streak + 1 if float(changes[c - 1, i]) < tol else 0
            if streak >= PATIENCE and c + 1 < STEPS:
                stop = c + 1
                break
        out.append(stop)
    return out


@pytest.mark.parametrize("name", sorted(CALL))
def test_the_shape_stop_follows_each_images_own_x0_hat(name):
    pipe = getattr(tiny, f"tiny_{name}_pipeline")()
    scale = getattr(pipe, "vae_scale_factor", None) or pipe.vae_scale_factor_spatial
    plain = generate(pipe, PROMPTS, GuidanceSchedule(W), steps=STEPS, trace=True, **CALL[name])
    changes = low_changes(plain.trajectory, name, scale)
    tol = float(changes[1:-1].median()) * 1.0001  # a median change: the images settle within the run
    want = settle_calls(changes, tol)
    assert min(want) < STEPS, want
    ad = AdaptiveStop(criterion="shape", tolerance=tol, patience=PATIENCE, min_call=1)
    res = generate(pipe, PROMPTS, GuidanceSchedule(W, adaptive=ad, after="cond"), steps=STEPS, **CALL[name])
    assert res.evaluations_per_image == [2 * s + STEPS - s for s in want], (want, res.evaluations_per_image)
    for i, (p, s) in enumerate(zip(PROMPTS, want)):
        solo = generate(pipe, [p], GuidanceSchedule(W, stop_step=s, after="cond"), steps=STEPS, seed=i, **CALL[name])
        assert np.abs(res.images[i] - solo.images[0]).max() <= 1e-5
