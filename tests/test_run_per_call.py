"""One run, one state (#31): the guidance hook follows the pipeline CALL, not the pipeline that applied it.
Each test is one failure found on v0.2 (each failed there): nested contexts, pipelines sharing components,
a denoiser swapped inside a context, a direct denoiser call, PixArt's CFG flag, threads, deep copies, and
the checks every entry point makes when it is called."""
import copy
import threading

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

from shapefirst.cache import LateCache, late_cache
from shapefirst.errors import ShapefirstError
from shapefirst.generate import generate
from shapefirst.guidance import (AdaptiveStop, GuidanceSchedule, apply_guidance_schedule, guidance_hook_of,
                                 guidance_schedule, remove_guidance_schedule)
from shapefirst.tiny import tiny_image, tiny_pixart_pipeline, tiny_sd_pipeline

from conftest import gens

PROMPTS = ["a red circle", "a small blue striped square"]
STEPS, W = 6, 7.5


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_sd_pipeline(folder=tmp_path_factory.mktemp("percall"))


@pytest.fixture(autouse=True)
def clean(pipe):
    yield
    remove_guidance_schedule(pipe)


def run(p, prompts=PROMPTS, w=W, **kw):
    return p(prompts, num_inference_steps=STEPS, guidance_scale=w, generator=gens(0, len(prompts)),
             output_type="np", **kw).images


def with_schedule(p, schedule, **kw):
    with guidance_schedule(p, schedule) as hook:
        return run(p, **kw), hook.evaluations_per_image()


def img2img(p, **kw):
    return p(PROMPTS, image=tiny_image(n=1), strength=0.5, num_inference_steps=STEPS, guidance_scale=W,
             generator=gens(0, 2), output_type="np", **kw).images


# -- contexts nest and restore ------------------------------------------------------------------------------
def test_leaving_an_inner_context_restores_the_outer_schedule(pipe):
    outer = GuidanceSchedule(W, stop_step=2)
    want, want_evals = with_schedule(pipe, outer)
    with guidance_schedule(pipe, outer) as hook:
        with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=4)) as inner:
            run(pipe)
            assert inner.evaluations_per_image() == [2 * 4 + 2] * 2
        assert np.array_equal(run(pipe), want) and hook.evaluations_per_image() == want_evals
    assert guidance_hook_of(pipe) is None


def test_generate_inside_a_users_context_leaves_it_as_it_was(pipe):
    outer = GuidanceSchedule(W, stop_step=2)
    want, _ = with_schedule(pipe, outer)
    with guidance_schedule(pipe, outer), late_cache(pipe, LateCache("mean")):
        cached = run(pipe)
    with guidance_schedule(pipe, outer):
        generate(pipe, PROMPTS[:1], GuidanceSchedule(W, stop=0.5), steps=3, cache=LateCache("kept"))
        assert np.array_equal(run(pipe), want)
        with late_cache(pipe, LateCache("mean")):
            assert np.array_equal(run(pipe), cached)
        assert np.array_equal(run(pipe), want)


def test_a_second_apply_replaces_and_a_context_restores_it(pipe):
    """The stated rule: applying replaces what the pipeline has (the innermost wins); a context restores."""
    apply_guidance_schedule(pipe, GuidanceSchedule(W, stop_step=1))
    hook = apply_guidance_schedule(pipe, GuidanceSchedule(W, stop_step=3))
    run(pipe)
    assert hook.evaluations_per_image() == [2 * 3 + 3] * 2
    with guidance_schedule(pipe, GuidanceSchedule(W)):
        run(pipe)
        assert hook.evaluations_per_image() == [2 * STEPS] * 2
    run(pipe)
    assert hook.evaluations_per_image() == [2 * 3 + 3] * 2


# -- pipelines that share components -----------------------------------------------------------------------
def test_a_pipeline_sharing_the_denoiser_runs_untouched_without_its_own_schedule(pipe):
    other = StableDiffusionPipeline(**pipe.components)
    plain = run(other)
    with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=2)) as hook:
        assert np.array_equal(run(other), plain)
        assert hook.state is None  # the other pipeline's call is not the scheduled pipeline's run


def test_from_pipe_img2img_counts_its_own_calls_and_cfg(pipe):
    """v0.2: a text-to-image run without CFG, then an img2img from_pipe at strength 0.5 (3 calls) under its own
    stop at call 1, went by the other pipeline's state: wrong counts and another image."""
    i2i = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    stop = GuidanceSchedule(W, stop_step=1)
    with guidance_schedule(i2i, stop) as alone:
        want = img2img(i2i)
    want_evals = alone.evaluations_per_image()
    assert want_evals == [2 * 1 + 2] * 2 and alone.n_calls == 3
    with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=4)), guidance_schedule(i2i, stop) as hook:
        run(pipe, w=1.0)  # no CFG on the text-to-image pipeline
        got = img2img(i2i)
        assert np.array_equal(got, want) and hook.evaluations_per_image() == want_evals


def test_threads_with_pipelines_sharing_a_denoiser(pipe):
    """diffusers' pattern for serving: one pipeline per request from_pipe(base) with its own scheduler; each
    thread's run has its own state (two runs on one denoiser at once)."""
    a = StableDiffusionPipeline.from_pipe(pipe, scheduler=copy.deepcopy(pipe.scheduler))
    b = StableDiffusionPipeline.from_pipe(pipe, scheduler=copy.deepcopy(pipe.scheduler))
    sa, sb = GuidanceSchedule(W, stop_step=2), GuidanceSchedule(W, stop_step=5, after="cond")
    want = {"a": with_schedule(a, sa), "b": with_schedule(b, sb)}
    got, errors, threads = {}, [], torch.get_num_threads()
    torch.set_num_threads(1)

    def work(name, p, s):
        try:
            with guidance_schedule(p, s) as hook:
                for _ in range(3):
                    images = run(p)
                got[name] = (images, hook.evaluations_per_image())
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    workers = [threading.Thread(target=work, args=x) for x in (("a", a, sa), ("b", b, sb))]
    try:
        for t in workers:
            t.start()
        for t in workers:
            t.join()
    finally:
        torch.set_num_threads(threads)
    assert not errors, errors
    for name in "ab":
        assert np.array_equal(got[name][0], want[name][0]) and got[name][1] == want[name][1]


# -- the denoiser swapped, called directly, copied -------------------------------------------------------------
def test_removal_finds_the_hook_after_the_denoiser_was_replaced(pipe):
    plain, unet = run(pipe), pipe.unet
    try:
        with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=2)):
            pipe.unet = torch.nn.Module()  # any replacement: a compiled wrapper, another model
        assert guidance_hook_of(unet) is None
    finally:
        pipe.unet = unet
    assert np.array_equal(run(pipe), plain)


def test_a_direct_denoiser_call_inside_a_context_passes_through(pipe):
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn((2, 4, 8, 8), generator=g), torch.randn((2, 77, 32), generator=g)
    want = pipe.unet(x, 10, emb).sample
    with guidance_schedule(pipe, GuidanceSchedule(W, stop=0.0)):
        got = pipe.unet(x, 10, emb).sample
    assert torch.equal(got, want)


def test_a_deep_copy_inside_a_context_names_the_real_cause(pipe):
    with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=2)):
        twin = copy.deepcopy(pipe)
        with pytest.raises(ShapefirstError, match="deep copy"):
            run(twin)
    assert np.array_equal(run(pipe), run(pipe))


# -- PixArt: the CFG flag of the call ---------------------------------------------------------------------
def test_pixart_without_cfg_from_equal_latents_is_not_a_cfg_pair(tmp_path):
    p = tiny_pixart_pipeline(folder=tmp_path)
    lat = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(1)).repeat(2, 1, 1, 1)
    kw = dict(num_inference_steps=4, guidance_scale=1.0, latents=lat, output_type="np", clean_caption=False,
              use_resolution_binning=False)
    plain = p(PROMPTS, **kw).images
    with guidance_schedule(p, GuidanceSchedule(W, stop=0.5)) as hook:
        got = p(PROMPTS, **kw).images
    assert np.array_equal(got, plain) and hook.evaluations_per_image() == [4, 4]


# -- every entry point checks its arguments when called ----------------------------------------------------
@pytest.mark.parametrize("make, name", [
    (lambda: GuidanceSchedule(W, stop="0.5"), "stop"),
    (lambda: GuidanceSchedule(W, stop_step=2.5), "stop_step"),
    (lambda: GuidanceSchedule("7.5"), "scale"),
    (lambda: AdaptiveStop(threshold="0.99"), "threshold"),
    (lambda: AdaptiveStop(criterion="shape", patience="2"), "patience"),
    (lambda: GuidanceSchedule(W, adaptive=0.99), "adaptive"),
    (lambda: GuidanceSchedule(W, start_step=3, stop_step=1), "start_step=3"),
    (lambda: GuidanceSchedule(W, start=0.9, stop_step=1), "start=0.9"),
    (lambda: GuidanceSchedule(W, start=0.5, stop=0.5), "start=0.5"),
    (lambda: GuidanceSchedule(W, start_step=2, stop=0.0), "start_step=2"),
])
def test_constructors_refuse_wrong_types_and_empty_intervals(make, name):
    with pytest.raises(ShapefirstError, match=name):
        make()


@pytest.mark.parametrize("apply", [apply_guidance_schedule, lambda p, s: guidance_schedule(p, s).__enter__()])
def test_a_number_for_a_schedule_is_refused(pipe, apply):
    with pytest.raises(ShapefirstError, match="not a GuidanceSchedule.*GuidanceSchedule\\(stop=0.5\\)"):
        apply(pipe, 0.5)
    assert guidance_hook_of(pipe) is None
