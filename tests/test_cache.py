"""Late-stage caches (shapefirst.cache) and guidance intervals (GuidanceSchedule start):
never used = bit-identical, what runs when, per-run reset, and the errors."""
import numpy as np
import pytest
import torch

from shapefirst.cache import LateCache, apply_late_cache, late_cache
from shapefirst.errors import ShapefirstError
from shapefirst.generate import generate
from shapefirst.guidance import GuidanceSchedule, guidance_schedule
from shapefirst.models import set_scheduler
from shapefirst.tiny import tiny_pixart_pipeline, tiny_sd3_pipeline, tiny_sdxl_pipeline

from conftest import gens

PROMPTS = ["a red circle", "a small blue striped square"]
STEPS = 8
CACHES = [LateCache("mean"), LateCache("kept"), LateCache(deep_interval=3), LateCache("mean", 2)]


@pytest.fixture(autouse=True)
def ddim(tiny_pipe):
    set_scheduler(tiny_pipe, "ddim")
    yield


def plain(pipe, prompts=PROMPTS, steps=STEPS, **kw):
    return pipe(prompts, num_inference_steps=steps, guidance_scale=7.5, generator=gens(0, len(prompts)),
                output_type="np", **kw).images


class Counter:
    """Counts real executions of a module's forward: the counting wrapper sits under any hook that
    generate() adds later, so replayed outputs (which skip the forward) are not counted."""

    def __init__(self, module):
        self.n, self.module = 0, module

    def __enter__(self):
        self.saved = self.module.__dict__.get("forward")
        inner = self.module.forward

        def fwd(*a, **k):
            self.n += 1
            return inner(*a, **k)

        self.module.forward = fwd
        return self

    def __exit__(self, *exc):
        if self.saved is None:
            del self.module.forward
        else:
            self.module.forward = self.saved


@pytest.mark.parametrize("cache", CACHES, ids=lambda c: c.label)
def test_caches_never_used_are_bit_identical(tiny_pipe, cache):
    ref = plain(tiny_pipe)
    for sched in (GuidanceSchedule(7.5), GuidanceSchedule(7.5, stop=1.0)):
        res = generate(tiny_pipe, PROMPTS, sched, steps=STEPS, cache=cache)
        assert np.array_equal(res.images, ref)


@pytest.mark.parametrize("cache", CACHES, ids=lambda c: c.label)
def test_caches_change_only_the_late_calls_and_reset_per_run(tiny_pipe, cache):
    stop = GuidanceSchedule(7.5, stop_step=4)
    base = generate(tiny_pipe, PROMPTS, stop, steps=STEPS).images
    a = generate(tiny_pipe, PROMPTS, stop, steps=STEPS, cache=cache).images
    b = generate(tiny_pipe, PROMPTS, stop, steps=STEPS, cache=cache).images
    assert np.array_equal(a, b)  # nothing leaks from one run into the next
    assert not np.array_equal(a, base)  # the cache did act after the stop
    assert np.abs(a - base).mean() < 0.1  # ... and is a small late change, not a different image
    # the hooks are gone afterwards: plain generation again
    assert np.array_equal(generate(tiny_pipe, PROMPTS, stop, steps=STEPS).images, base)


def test_cross_attention_runs_only_in_guided_calls(tiny_pipe):
    attn2 = [m for n, m in tiny_pipe.unet.named_modules() if n.endswith("attn2")][0]
    for k in (0, 3, STEPS):
        with Counter(attn2) as c:
            generate(tiny_pipe, PROMPTS, GuidanceSchedule(7.5, stop_step=k), steps=STEPS, cache=LateCache("mean"))
        # stop 0 never records anything, so it computes every call; otherwise only the guided calls
        assert c.n == (STEPS if k == 0 else k)


def test_cross_attention_replays_the_mean_of_the_branches(tiny_pipe):
    """At every late call the module returns exactly the mean of its two CFG rows at the last guided call
    (T-GATE's rule), per sample; 'kept' returns the unconditional row (after='uncond')."""
    attn2 = [m for n, m in tiny_pipe.unet.named_modules() if n.endswith("attn2")][0]
    for mode in ("mean", "kept"):
        seen = []
        h = attn2.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
        try:
            generate(tiny_pipe, PROMPTS, GuidanceSchedule(7.5, stop_step=3), steps=STEPS, cache=LateCache(mode))
        finally:
            h.remove()
        last_guided = seen[2]  # [uncond 0, uncond 1, cond 0, cond 1]
        want = (last_guided[:2] + last_guided[2:]) / 2 if mode == "mean" else last_guided[:2]
        for late in seen[3:]:
            assert torch.allclose(late, want, atol=1e-6)


@pytest.mark.parametrize("interval", [2, 3])
@pytest.mark.parametrize("k", [0, 3])
def test_deep_blocks_run_every_nth_late_call(tiny_pipe, k, interval):
    mid = tiny_pipe.unet.mid_block
    outer = tiny_pipe.unet.up_blocks[-1]
    with Counter(mid) as cm, Counter(outer) as co:
        generate(tiny_pipe, PROMPTS, GuidanceSchedule(7.5, stop_step=k), steps=STEPS,
                 cache=LateCache(deep_interval=interval))
    late = STEPS - k
    assert cm.n == k + -(-late // interval)  # guided calls + every interval-th late call (the first included)
    assert co.n == STEPS  # the outer level always runs


def test_adaptive_stops_with_a_cache_act_once_every_sample_stopped(tiny_pipe):
    from shapefirst.guidance import AdaptiveStop

    s = GuidanceSchedule(7.5, adaptive=AdaptiveStop(0.5, min_call=2))  # every sample settles at call 2
    base = generate(tiny_pipe, PROMPTS, s, steps=STEPS)
    res = generate(tiny_pipe, PROMPTS, s, steps=STEPS, cache=LateCache("mean"))
    assert res.evaluations_per_image == base.evaluations_per_image == [2 * 3 + 5] * 2
    assert not np.array_equal(res.images, base.images)


def test_guidance_interval_counts_and_edges(tiny_pipe):
    res = generate(tiny_pipe, PROMPTS, GuidanceSchedule(7.5, start_step=2, stop_step=6, after="cond"), steps=STEPS)
    assert res.evaluations_per_image == [2 * 4 + 4] * 2
    # start 0 is the plain stop schedule, bit for bit
    a = generate(tiny_pipe, PROMPTS, GuidanceSchedule(7.5, start_step=0, stop_step=5), steps=STEPS).images
    b = generate(tiny_pipe, PROMPTS, GuidanceSchedule(7.5, stop_step=5), steps=STEPS).images
    assert np.array_equal(a, b)
    # a late start changes the image; calls before it follow the kept branch only
    c = generate(tiny_pipe, PROMPTS, GuidanceSchedule(7.5, start_step=2, after="cond"), steps=STEPS)
    assert c.evaluations_per_image == [2 + 2 * 6] * 2
    assert not np.array_equal(c.images, plain(tiny_pipe))
    with pytest.raises(ShapefirstError, match="after the stop"):  # refused when made (#31)
        generate(tiny_pipe, PROMPTS, GuidanceSchedule(7.5, start_step=6, stop_step=2), steps=STEPS)
    with pytest.raises(ShapefirstError, match="start"):
        GuidanceSchedule(7.5, start=0.6, stop=0.5)


@pytest.mark.parametrize("spec,want", [("none", None), ("mean", LateCache("mean")),
                                       ("kept+deep3", LateCache("kept", 3)),
                                       ("deep4d2", LateCache(deep_interval=4, deep_depth=2))])
def test_parse_round_trips(spec, want):
    got = LateCache.parse(spec)
    assert got == want
    if want is not None:
        assert LateCache.parse(want.label) == want


@pytest.mark.parametrize("bad", ["fast", "deep", "mean+mean", "deep1"])
def test_bad_specs_are_one_line_errors(bad):
    with pytest.raises(ShapefirstError) as e:
        LateCache.parse(bad)
    assert "\n" not in str(e.value)


def test_cache_needs_a_guidance_schedule_and_a_deep_enough_unet(tiny_pipe):
    with pytest.raises(ShapefirstError, match="guidance schedule"):
        apply_late_cache(tiny_pipe, LateCache("mean"))
    n = len(tiny_pipe.unet.down_blocks)
    with guidance_schedule(tiny_pipe, GuidanceSchedule(7.5, stop=0.5)):
        with pytest.raises(ShapefirstError, match="deep_depth"):
            with late_cache(tiny_pipe, LateCache(deep_interval=2, deep_depth=n)):
                pass


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    return {"sdxl": tiny_sdxl_pipeline(folder=tmp_path_factory.mktemp("sdxl")),
            "pixart": tiny_pixart_pipeline(folder=tmp_path_factory.mktemp("pixart")),
            "sd3": tiny_sd3_pipeline(folder=tmp_path_factory.mktemp("sd3"))}


@pytest.mark.parametrize("name,cache", [("sdxl", LateCache("mean", 2)), ("pixart", LateCache("mean"))])
def test_families_caches_never_used_are_bit_identical_and_act_after_a_stop(families, name, cache):
    pipe = families[name]
    kw = dict(use_resolution_binning=False, clean_caption=False) if name == "pixart" else {}
    ref = pipe(PROMPTS, num_inference_steps=4, guidance_scale=5.0, generator=gens(0, 2), output_type="np", **kw).images
    res = generate(pipe, PROMPTS, GuidanceSchedule(5.0), steps=4, cache=cache, **kw)
    assert np.array_equal(res.images, ref)
    cut = generate(pipe, PROMPTS, GuidanceSchedule(5.0, stop_step=2), steps=4, **kw).images
    cached = generate(pipe, PROMPTS, GuidanceSchedule(5.0, stop_step=2), steps=4, cache=cache, **kw).images
    assert not np.array_equal(cut, cached)


@pytest.mark.parametrize("name,cache,what", [("sd3", LateCache("mean"), "joint attention"),
                                             ("pixart", LateCache(deep_interval=2), "needs a UNet")])
def test_families_without_the_structure_get_a_clear_error(families, name, cache, what):
    with pytest.raises(ShapefirstError, match=what):
        generate(families[name], PROMPTS, GuidanceSchedule(5.0, stop_step=2), steps=4, cache=cache)
