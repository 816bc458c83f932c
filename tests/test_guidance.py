"""Guidance schedules against diffusers' own pipeline and callback, and against closed-form counts."""
import numpy as np
import pytest
import torch
from diffusers.callbacks import SDCFGCutoffCallback

from shapefirst.errors import ShapefirstError
from shapefirst.generate import count_calls, generate
from shapefirst.guidance import AdaptiveStop, GuidanceSchedule, guidance_schedule
from shapefirst.models import SCHEDULERS, set_scheduler

from conftest import gens

PROMPTS = ["a red circle on the left", "a small blue striped square at the top"]


def plain(pipe, prompts, n_img, steps=8, seed=0, **kw):
    return pipe(prompts, num_inference_steps=steps, guidance_scale=7.5, num_images_per_prompt=n_img,
                generator=gens(seed, len(prompts) * n_img), output_type="np", **kw).images


@pytest.fixture(autouse=True)
def ddim(tiny_pipe):
    set_scheduler(tiny_pipe, "ddim")
    yield


def test_no_stop_is_bit_identical_to_the_plain_pipeline(tiny_pipe):
    ref = plain(tiny_pipe, PROMPTS, 2)
    for sched in (GuidanceSchedule(), GuidanceSchedule(stop=1.0)):
        res = generate(tiny_pipe, PROMPTS, sched, steps=8, images_per_prompt=2)
        assert np.array_equal(res.images, ref)
        assert res.evaluations_per_image == [16] * 4


@pytest.mark.parametrize("k", [1, 3, 7])
def test_cond_mode_equals_diffusers_cfg_cutoff_callback(tiny_pipe, k):
    cb = SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=k - 1)
    ref = plain(tiny_pipe, PROMPTS[:1], 1, callback_on_step_end=cb,
                callback_on_step_end_tensor_inputs=["prompt_embeds"])
    res = generate(tiny_pipe, PROMPTS[:1], GuidanceSchedule(stop_step=k, after="cond"), steps=8)
    assert np.array_equal(res.images, ref)
    assert res.evaluations_per_image == [2 * k + (8 - k)]


def test_uncond_mode_equals_zero_guidance_after_the_stop(tiny_pipe):
    """Closed form: the unconditional late calls equal the pipeline run with guidance_scale 0 from call k on."""
    k = 3
    res = generate(tiny_pipe, PROMPTS[:1], GuidanceSchedule(stop_step=k, after="uncond"), steps=8, trace=True)
    tr = res.trajectory
    assert torch.isnan(tr.arrays["cond"][k:]).all() and not torch.isnan(tr.arrays["uncond"]).any()
    assert torch.equal(tr.arrays["combined"][k:], tr.arrays["uncond"][k:])
    assert tr.guided[:k].all() and not tr.guided[k:].any()
    # the unguided branch computed alone equals the uncond row of a full CFG pass at the same input
    unet = tiny_pipe.unet
    emb, neg = tiny_pipe.encode_prompt(PROMPTS[0], "cpu", 1, True)
    x = tr.arrays["x_t"][k]
    t = torch.tensor(tr.timesteps[k])
    with torch.no_grad():
        both = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([neg, emb])).sample
    assert torch.allclose(both[:1], tr.arrays["uncond"][k], atol=1e-5)


def test_stop_zero_runs_one_branch_from_the_first_call(tiny_pipe):
    res = generate(tiny_pipe, PROMPTS, GuidanceSchedule(stop=0.0, after="cond"), steps=8)
    assert res.evaluations_per_image == [8, 8]


class RowCounter:
    """Independent count: rows entering the UNet's first convolution (after the guidance hook)."""

    def __init__(self, unet):
        self.rows = 0
        self.calls = 0
        self.h = unet.conv_in.register_forward_pre_hook(self)

    def __call__(self, mod, args):
        self.rows += args[0].shape[0]
        self.calls += 1

    def remove(self):
        self.h.remove()


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("stop", [0.0, 0.5, None])
def test_evaluation_counts_match_the_formula(tiny_pipe, name, stop):
    steps = 6
    set_scheduler(tiny_pipe, name)
    n_calls = count_calls(tiny_pipe, steps)
    sched = GuidanceSchedule(stop=stop, after="uncond")
    k = sched.first_unguided_call(n_calls)
    counter = RowCounter(tiny_pipe.unet)
    try:
        res = generate(tiny_pipe, PROMPTS, sched, steps=steps, images_per_prompt=2)
    finally:
        counter.remove()
    assert counter.calls == n_calls
    per_image = 2 * k + (n_calls - k)
    assert res.evaluations_per_image == [per_image] * 4
    assert counter.rows == 4 * per_image
    if name == "pndm":
        assert n_calls == steps + 1  # PNDM (PLMS) makes one call more than steps


@pytest.mark.parametrize("after", ["uncond", "cond"])
def test_batched_images_match_their_solo_runs(tiny_pipe, after):
    sched = GuidanceSchedule(stop=0.5, after=after)
    batch = generate(tiny_pipe, PROMPTS, sched, steps=8, seed=10, images_per_prompt=2)
    for i in range(4):
        solo = generate(tiny_pipe, [PROMPTS[i // 2]], sched, steps=8, seed=10 + i)
        assert np.abs(batch.images[i] - solo.images[0]).max() <= 1 / 255


def test_negative_prompt_uncond_warns_once_and_follows_negative_branch(tiny_pipe):
    import shapefirst.generate as g

    g._warned_negative = False
    with pytest.warns(UserWarning, match="NEGATIVE"):
        a = generate(tiny_pipe, PROMPTS[:1], GuidanceSchedule(stop=0.5), steps=8, negative_prompt="blue")
    b = generate(tiny_pipe, PROMPTS[:1], GuidanceSchedule(stop=0.5), steps=8)
    assert not np.array_equal(a.images, b.images)


def test_adaptive_never_stops_before_min_call_and_falls_back_to_full_guidance(tiny_pipe):
    never = generate(tiny_pipe, PROMPTS, GuidanceSchedule(adaptive=AdaptiveStop(threshold=0.999999999, min_call=0)),
                     steps=8)
    full = generate(tiny_pipe, PROMPTS, GuidanceSchedule(), steps=8)
    assert np.array_equal(never.images, full.images) and never.evaluations_per_image == [16, 16]
    early = generate(tiny_pipe, PROMPTS, GuidanceSchedule(adaptive=AdaptiveStop(threshold=1e-9, min_call=3)), steps=8)
    # threshold always met: decided at call 3 (min_call), unguided from call 4
    assert early.settings["first_unguided_call_per_image"] == [4, 4]
    assert early.evaluations_per_image == [2 * 4 + 4] * 2


def test_adaptive_per_sample_stops_match_solo_runs(tiny_pipe):
    sched = GuidanceSchedule(adaptive=AdaptiveStop(threshold=0.5, min_call=1))
    batch = generate(tiny_pipe, PROMPTS, sched, steps=8, seed=3)
    for i, p in enumerate(PROMPTS):
        solo = generate(tiny_pipe, [p], sched, steps=8, seed=3 + i)
        assert solo.settings["first_unguided_call_per_image"][0] == batch.settings["first_unguided_call_per_image"][i]
        assert np.abs(batch.images[i] - solo.images[0]).max() <= 1 / 255


def test_hook_is_removed_after_the_context(tiny_pipe):
    ref = plain(tiny_pipe, PROMPTS[:1], 1)
    with guidance_schedule(tiny_pipe, GuidanceSchedule(stop=0.0)):
        pass
    assert np.array_equal(plain(tiny_pipe, PROMPTS[:1], 1), ref)


@pytest.mark.parametrize("kw", [dict(stop=1.5), dict(stop=-0.1), dict(stop=float("nan")), dict(stop_step=-1),
                                dict(stop=0.5, scale=1.0), dict(stop=0.5, stop_step=3), dict(after="both"),
                                dict(scale=float("nan"))])
def test_bad_schedules_raise_one_line_errors(kw):
    with pytest.raises(ShapefirstError) as e:
        GuidanceSchedule(**kw)
    assert "\n" not in str(e.value)


def test_stop_step_beyond_calls_is_refused_before_running(tiny_pipe):
    with pytest.raises(ShapefirstError, match="beyond the 8 denoiser calls"):
        generate(tiny_pipe, PROMPTS[:1], GuidanceSchedule(stop_step=9), steps=8)
