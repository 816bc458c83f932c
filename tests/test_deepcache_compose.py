"""shapefirst's guidance stop under the `DeepCache` package (DeepCacheSDHelper as it ships), the study's fastest
setting within tolerance: the guidance hook runs inside DeepCache's wrapped UNet, so the stop must fall on a call
DeepCache refreshes (a multiple of its cache_interval: the cached block outputs have the batch of the call that
made them). Compared with diffusers' own stop (SDCFGCutoffCallback at batch 1) under the same DeepCache."""
import numpy as np
import pytest
from DeepCache import DeepCacheSDHelper
from diffusers.callbacks import SDCFGCutoffCallback

from shapefirst.guidance import GuidanceSchedule, guidance_schedule

from conftest import gens

STEPS, W, INTERVAL = 9, 7.5, 3


def run(pipe, prompts, **kw):
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=INTERVAL, cache_branch_id=0)
    helper.enable()
    try:
        return pipe(prompts, num_inference_steps=STEPS, guidance_scale=W, generator=gens(0, len(prompts)),
                    output_type="np", **kw).images
    finally:
        helper.disable()


def test_the_stop_on_a_refresh_call_equals_diffusers_callback_under_deepcache(tiny_pipe):
    stop = 2 * INTERVAL  # the first unguided call, refreshed by DeepCache
    cb = SDCFGCutoffCallback(cutoff_step_index=stop - 1, cutoff_step_ratio=None)
    ref = run(tiny_pipe, ["a red circle"], callback_on_step_end=cb,
              callback_on_step_end_tensor_inputs=["prompt_embeds"])
    with guidance_schedule(tiny_pipe, GuidanceSchedule(W, stop_step=stop, after="cond")) as hook:
        got = run(tiny_pipe, ["a red circle"])
    assert np.array_equal(got, ref)
    assert hook.evaluations_per_image() == [2 * stop + STEPS - stop]


def test_full_guidance_through_the_hook_leaves_deepcache_bit_identical_and_a_misaligned_stop_fails(tiny_pipe):
    prompts = ["a red circle", "a small blue striped square"]
    plain = run(tiny_pipe, prompts)
    with guidance_schedule(tiny_pipe, GuidanceSchedule(W)):
        assert np.array_equal(run(tiny_pipe, prompts), plain)
    with guidance_schedule(tiny_pipe, GuidanceSchedule(W, stop_step=INTERVAL + 1, after="cond")):
        with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
            run(tiny_pipe, prompts)
