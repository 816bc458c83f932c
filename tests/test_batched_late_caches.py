"""Late-stage caches on the batched families added by name whose denoisers have separate cross-attention (`attn2`):
Sana, HunyuanDiT, Kolors (#32 item 2's table). With the stop at the end a late cache is bit-identical to the plain
pipeline; under a stop, reusing the cross-attention equals a reference written without shapefirst: the denoiser's
forward runs the conditional half from the stop on (conftest.CondHalfOn) and plain torch forward hooks on every attn2
replay what it returned at the last guided call (the conditional rows for "kept", the mean of both rows for "mean",
T-GATE's rule). CogVideoX (joint attention) is refused in one line."""
import numpy as np
import pytest
import torch

from shapefirst.cache import LateCache, late_cache
from shapefirst.errors import ShapefirstError
from shapefirst.guidance import GuidanceSchedule, guidance_schedule
from shapefirst.tiny import (tiny_cogvideox_pipeline, tiny_hunyuandit_pipeline, tiny_kolors_pipeline,
                             tiny_sana_pipeline)

from conftest import CondHalfOn

PROMPTS = ["a red circle moving left", "a large blue striped square"]
STEPS, W, STOP = 5, 4.5, 2
CALL = {"sana": dict(height=32, width=32, max_sequence_length=16, complex_human_instruction=None,
                     use_resolution_binning=False),
        "hunyuandit": dict(height=16, width=16, use_resolution_binning=False),
        "kolors": dict(height=16, width=16, max_sequence_length=16)}


@pytest.fixture(scope="module", params=["sana", "hunyuandit", "kolors"])
def fam(request, tmp_path_factory):
    make = {"sana": tiny_sana_pipeline,
            "hunyuandit": lambda: tiny_hunyuandit_pipeline(folder=tmp_path_factory.mktemp("hunyuandit")),
            "kolors": lambda: tiny_kolors_pipeline(folder=tmp_path_factory.mktemp("kolors"))}
    return request.param, make[request.param]()


def run(name, pipe):
    gens = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=W, output_type="latent", generator=gens,
                **CALL[name]).images.float().numpy()  # latents: the tiny VAEs would shrink the differences


def denoiser(name, pipe):
    return pipe.unet if name == "kolors" else pipe.transformer


class Replay:
    """Plain torch forward hooks on every attn2: record the output at call STOP - 1 (the last guided one), return
    it from call STOP on."""

    def __init__(self, den, ref: CondHalfOn, mode: str):
        self.ref, self.mode, self.kept = ref, mode, {}
        self.handles = [m.register_forward_hook(self.hook) for n, m in den.named_modules() if n.endswith("attn2")]
        assert self.handles

    def hook(self, module, args, out):
        call = self.ref.calls - 1  # CondHalfOn counted this denoiser call before running it
        if call == STOP - 1:
            n = out.shape[0] // 2
            self.kept[module] = out[n:] if self.mode == "kept" else (out[:n] + out[n:]) / 2
        elif call >= STOP:
            return self.kept[module]
        return out

    def close(self):
        for h in self.handles:
            h.remove()


def test_a_late_cache_with_the_stop_at_the_end_is_bit_identical(fam):
    name, pipe = fam
    plain = run(name, pipe)
    for cache in (LateCache("kept"), LateCache("mean")):
        with guidance_schedule(pipe, GuidanceSchedule(W, stop=1.0, after="cond")), late_cache(pipe, cache):
            assert np.array_equal(run(name, pipe), plain), (name, cache)


@pytest.mark.parametrize("mode", ["kept", "mean"])
def test_reused_cross_attention_equals_a_reference_without_shapefirst(fam, mode):
    name, pipe = fam
    den = denoiser(name, pipe)
    ref = CondHalfOn(den, lambda i: i >= STOP)
    replay = Replay(den, ref, mode)
    try:
        want = run(name, pipe)
    finally:
        replay.close()
        ref.close()
    sched = GuidanceSchedule(W, stop_step=STOP, after="cond")
    with guidance_schedule(pipe, sched):
        stop_only = run(name, pipe)
        with late_cache(pipe, LateCache(mode)):
            got = run(name, pipe)
    effect = np.abs(got - stop_only).max()
    assert np.abs(got - want).max() <= 1e-3 * effect, (name, mode, np.abs(got - want).max(), effect)
    assert effect > 1e-5  # the cache acts (tiny Kolors: its cross-attention moves the latents by ~1e-4)


def test_cogvideox_joint_attention_is_refused_in_one_line():
    pipe = tiny_cogvideox_pipeline()
    with pytest.raises(ShapefirstError, match="no separate cross-attention modules") as e:
        with guidance_schedule(pipe, GuidanceSchedule(W, stop=0.5, after="cond")), late_cache(pipe, LateCache("kept")):
            pass
    assert "\n" not in str(e.value)
