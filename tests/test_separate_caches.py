"""Transformer caches composed with the guidance stop on pipelines that call the transformer once per branch
(tiny Wan 2.1, Wan 2.2 with two experts, Flux with true CFG), and the cache-dit package as a peer.

diffusers' caches (shapefirst.transformer_cache): First Block Cache, TaylorSeer and MagCache alone really skip
work (counted by plain torch forward pre-hooks on the last block's submodules, which a skipped block or a
predicted attention never calls); under a stop that keeps the conditional branch the stop saves rows (counted
on the patch embedding) while the cache still skips, and the video equals a reference written without
shapefirst: the same cache, every call computed, the unconditional call's output replaced by the step's
conditional one from the stop on (so the conditional context sees the very same calls). FasterCache and PAB,
and the schedules a cache cannot follow, are refused with one line.

cache-dit (shapefirst.cache_dit_peer): at its defaults on the shapes-world transformer (a PixArt pipeline) it
skips steps, composes with the stop (the batch change makes it compute that call in full, then it caches
again) and leaves the pipeline bit-identical; on the separate-call pipelines it runs alone and under a
schedule that does not stop, and a stop is refused (its branch parity); CFG layouts it would misread are
refused. Tiny models have fewer blocks than DBCache's defaults compute (Fn_compute_blocks=8) and random
weights whose residuals move more than its 0.08 threshold, so the tiny tests name Fn, warmup and threshold."""
import numpy as np
import pytest
import torch

from shapefirst.cache_dit_peer import cache_dit_peer
from shapefirst.errors import ShapefirstError
from shapefirst.guidance import AdaptiveStop, GuidanceSchedule, guidance_schedule
from shapefirst.tiny import tiny_flux_pipeline, tiny_wan_pipeline
from shapefirst.transformer_cache import TransformerCache, calibrate_mag_ratios, transformer_cache

from conftest import CondFromStep

PROMPTS = ["a red circle moving left", "a large blue striped square moving up"]
STEPS, W = 8, 5.0
STOP = {"wan": 3, "wan22": 5, "flux": 3}  # Wan 2.2: the low-noise expert runs steps 4.. (boundary_ratio 0.8)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    from diffusers import WanPipeline

    wan22 = WanPipeline(**tiny_wan_pipeline(seed=1, two_experts=True).components, boundary_ratio=0.8)
    wan22.set_progress_bar_config(disable=True)
    return {"wan": tiny_wan_pipeline(seed=0), "wan22": wan22,
            "flux": tiny_flux_pipeline(folder=tmp_path_factory.mktemp("flux"))}


def run(pipe, **kw):
    gens = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    if "transformer_2" in pipe.components:  # Wan
        return pipe(PROMPTS, negative_prompt="", height=16, width=16, num_frames=5, num_inference_steps=STEPS,
                    guidance_scale=W, max_sequence_length=16, output_type="np", generator=gens, **kw).frames
    return pipe(PROMPTS, negative_prompt=["a green triangle"] * 2, true_cfg_scale=W, height=16, width=16,
                num_inference_steps=STEPS, max_sequence_length=16, output_type="np", generator=gens, **kw).images


def dens(pipe) -> list:
    return [d for d in (pipe.transformer, pipe.components.get("transformer_2")) if d is not None]


class Count:
    """Independent counts, plain torch forward pre-hooks: rows and calls the transformers compute (their patch
    embedding), and calls of the last block's work a cache skips (`work`: its feed-forward output for the block
    caches, its self-attention's query projection for TaylorSeer, which predicts attention outputs)."""

    def __init__(self, pipe, kind: str = "fbc"):
        self.rows = self.calls = self.work = 0
        self.handles = []
        for den in dens(pipe):
            wan = hasattr(den, "blocks")
            embed = den.patch_embedding if wan else den.x_embedder
            last = den.blocks[-1] if wan else den.single_transformer_blocks[-1]
            tail = (last.attn1 if wan else last.attn).to_q if kind == "taylorseer" else \
                (last.ffn if wan else last.proj_out)
            self.handles += [embed.register_forward_pre_hook(self.embedded), tail.register_forward_pre_hook(self.tail)]

    def embedded(self, module, args):
        self.rows += args[0].shape[0]
        self.calls += 1

    def tail(self, module, args):
        self.work += 1

    def zero(self) -> None:
        self.rows = self.calls = self.work = 0

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module")
def ratios(pipes):
    return {name: calibrate_mag_ratios(pipe, lambda p=pipe: run(p), STEPS) for name, pipe in pipes.items()}


def skipping(kind: str, ratios=None) -> TransformerCache:
    options = {"fbc": {"threshold": 0.5}, "taylorseer": {"cache_interval": 3, "disable_cache_before_step": 2},
               "mag": {"mag_ratios": ratios, "threshold": 0.5}}
    return TransformerCache(kind, **options[kind])


@pytest.mark.parametrize("kind", ["fbc", "taylorseer", "mag"])
@pytest.mark.parametrize("name", ["wan", "wan22", "flux"])
def test_a_cache_skips_alone_and_under_a_stop_equals_the_reference(pipes, ratios, name, kind):
    pipe, k = pipes[name], STOP[name]
    plain = run(pipe)
    count = Count(pipe, kind)
    try:
        with transformer_cache(pipe, skipping(kind, ratios[name])):
            alone = run(pipe)
            alone_calls, alone_work = count.calls, count.work
            count.zero()
            ref_hook = CondFromStep(dens(pipe), k)
            try:
                ref = run(pipe)
            finally:
                ref_hook.close()
            ref_rows = count.rows
            count.zero()
            with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=k, after="cond")) as hook:
                got = run(pipe)
    finally:
        count.close()
    assert alone_calls == 2 * STEPS and 0 < alone_work < alone_calls  # alone, the cache skips some of the work
    assert not np.array_equal(alone, plain)
    assert ref_rows == 2 * STEPS * len(PROMPTS)
    evals = 2 * k + (STEPS - k)
    assert hook.evaluations_per_image() == [evals] * 2 and count.rows == evals * len(PROMPTS)  # the stop saves rows
    assert count.calls == STEPS + k and 0 < count.work < count.calls  # ... and the cache still skips
    assert np.array_equal(got, ref)
    assert np.array_equal(run(pipe), plain)  # every hook removed


def never_skipping(kind: str, ratios=None) -> TransformerCache:
    options = {"fbc": {"threshold": 0.0}, "taylorseer": {"disable_cache_before_step": STEPS + 1},
               "mag": {"mag_ratios": ratios, "threshold": -1.0}}
    return TransformerCache(kind, **options[kind])


def test_never_skipping_caches_under_a_stop_give_the_stops_video_on_two_experts(pipes, ratios):
    pipe = pipes["wan22"]
    with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=STOP["wan22"], after="cond")):
        stop = run(pipe)
        for kind in ("fbc", "taylorseer", "mag"):
            with transformer_cache(pipe, never_skipping(kind, ratios["wan22"])) as calls:
                assert np.array_equal(run(pipe), stop), kind
            assert len(calls.parts) == 2 and all(p.added for p in calls.parts), kind  # both experts cached


@pytest.mark.parametrize("kind", ["fbc", "taylorseer"])
def test_caches_start_afresh_when_per_image_adaptive_stops_change_the_rows(pipes, kind):
    """Adaptive stops per image: the unconditional context computes fewer rows as images stop, and the cache
    starts afresh when they change: never skipping it gives the adaptive stop's own video; skipping, the rows
    the transformer computes are still the evaluations shapefirst counts, a stop still saves rows, and work is
    skipped."""
    pipe = pipes["wan"]

    def adaptive(t):
        return GuidanceSchedule(W, after="cond", adaptive=AdaptiveStop(t))

    for t in (0.996, 0.997, 0.998, 0.9985, 0.999):  # a threshold that stops the two images at different calls
        with guidance_schedule(pipe, adaptive(t)) as hook:
            alone = run(pipe)
        if len(set(hook.evaluations_per_image())) == 2:
            break
    evals = hook.evaluations_per_image()
    assert len(set(evals)) == 2
    count = Count(pipe, kind)
    try:
        with guidance_schedule(pipe, adaptive(t)) as hook:
            with transformer_cache(pipe, never_skipping(kind)):
                assert np.array_equal(run(pipe), alone)
            count.zero()
            with transformer_cache(pipe, skipping(kind)):
                cached = run(pipe)
    finally:
        count.close()
    got = hook.evaluations_per_image()  # the cached predictions move the adaptive decisions: counted again
    assert count.rows == sum(got) and min(got) < 2 * STEPS and 0 < count.work < count.calls
    assert np.isfinite(cached).all() and not np.array_equal(cached, alone)


def test_mag_ratios_on_two_experts_are_one_list_per_expert(pipes, ratios):
    pipe = pipes["wan22"]
    pipe.scheduler.set_timesteps(STEPS)  # Wan 2.2's rule: the high-noise expert runs t >= boundary_ratio * 1000
    high = int((pipe.scheduler.timesteps >= pipe.config.boundary_ratio * 1000).sum())
    assert [len(r) for r in ratios["wan22"]] == [high, STEPS - high] and 0 < high < STEPS
    for flat in (ratios["wan"], torch.tensor(ratios["wan"])):
        with pytest.raises(ShapefirstError, match="MagCache got 1 mag_ratios list.* for a pipeline with 2 trans"):
            with transformer_cache(pipe, TransformerCache("mag", mag_ratios=flat)):
                pass
    with transformer_cache(pipes["wan"], TransformerCache("mag", mag_ratios=torch.tensor(ratios["wan"]))) as calls:
        assert calls.added  # a 1-D tensor (diffusers' FLUX_MAG_RATIOS is one) is one transformer's list


@pytest.mark.parametrize("kind", ["faster", "pab"])
def test_faster_cache_and_pab_are_refused_on_one_call_per_branch(pipes, kind):
    for pipe in (pipes["wan"], pipes["flux"]):
        with pytest.raises(ShapefirstError, match=f"the {kind} cache does not run on .*Pipeline, which calls the "
                                                  "transformer once per branch"):
            with transformer_cache(pipe, TransformerCache(kind)):
                pass


@pytest.mark.parametrize("kind,schedule", [
    ("fbc", GuidanceSchedule(W, stop_step=3, after="uncond")),
    ("mag", GuidanceSchedule(W, start_step=2, after="cond")),
    ("mag", GuidanceSchedule(W, stop_step=3, after="cond", alternate=True)),
    ("mag", GuidanceSchedule(W, after="cond", adaptive=AdaptiveStop(0.99))),
    ("taylorseer", GuidanceSchedule(W, stop_step=3, after="cond", alternate=True)),
])
def test_schedules_a_cache_cannot_follow_are_refused(pipes, ratios, kind, schedule):
    pipe = pipes["wan"]
    plain = run(pipe)
    with guidance_schedule(pipe, schedule):
        with pytest.raises(ShapefirstError, match=f"the {kind} cache does not compose with a guidance schedule"):
            with transformer_cache(pipe, skipping(kind, ratios["wan"])):
                run(pipe)
    assert np.array_equal(run(pipe), plain)


# -- cache-dit as a peer ------------------------------------------------------------------------------------------
TINY_DIT = {"Fn_compute_blocks": 1, "max_warmup_steps": 2, "residual_diff_threshold": 0.5}


def forwards(pipe) -> list:
    """Each module of the transformers in registration order, with the `forward` it has of its own (None: the
    class's)."""
    return [(name, vars(m).get("forward")) for d in dens(pipe) for name, m in d.named_modules()]


def same(a: list, b: list) -> bool:
    """The same modules in the same order, each with the very same forward."""
    return [n for n, _ in a] == [n for n, _ in b] and all(x is y for (_, x), (_, y) in zip(a, b))


def forward_untouched(pipe) -> bool:
    """No module of the transformers has a `forward` of its own (cache-dit's, or one it left behind)."""
    return all(f is None for _, f in forwards(pipe))


@pytest.fixture(scope="module")
def world_dit():
    from shapefirst.models import load_pipeline

    return load_pipeline("embedded-dit")


def test_cache_dit_at_its_defaults_on_the_shapes_world_transformer_composes_with_a_stop(world_dit):
    """The shipped transformer world (PixArt-alpha, 12 blocks), cache-dit untouched: it computes the first 8
    blocks of every call and skips the last 4 where the residual moved less than 0.08 (after 8 warmup steps);
    with a stop at call 12 the batch halves, that call is computed in full and caching resumes after it."""
    from shapefirst.pipeline import call_defaults

    pipe, steps, k = world_dit, 20, 12

    def go():
        g = [torch.Generator().manual_seed(0)]
        return pipe(["a large red striped circle on the left"], num_inference_steps=steps, guidance_scale=3.0,
                    generator=g, output_type="latent", height=64, width=64, **call_defaults(pipe)).images

    den = pipe.transformer
    call_before = type(pipe).__call__
    rows, tail = [], []
    handles = [den.pos_embed.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0])),
               den.transformer_blocks[-1].ff.register_forward_pre_hook(lambda m, a: tail.append(len(rows) - 1))]
    try:
        plain = go()
        rows.clear()
        tail.clear()
        with cache_dit_peer(pipe) as peer:
            alone = go()
            skipped = sorted(set(range(steps)) - set(tail))
            assert skipped == peer.stats()[0].cached_steps and len(skipped) >= 3 and min(skipped) >= 8
            rows.clear()
            tail.clear()
            with guidance_schedule(pipe, GuidanceSchedule(3.0, stop_step=k, after="cond")) as hook:
                go()
            after = sorted(set(range(k, steps)) - set(tail))
    finally:
        for h in handles:
            h.remove()
    assert rows == [2] * k + [1] * (steps - k) and hook.evaluations_per_image() == [sum(rows)]
    assert k in tail and after  # the call where the batch halves is computed in full, later ones are skipped
    assert not torch.equal(alone, plain)
    assert torch.equal(go(), plain) and forward_untouched(pipe) and type(pipe).__call__ is call_before


@pytest.mark.parametrize("name", ["pixart", "sd3"])
def test_cache_dit_on_batched_cfg_never_caching_equals_the_stop_and_caching_skips(name):
    from shapefirst.tiny import tiny_pixart_pipeline, tiny_sd3_pipeline

    pipe = tiny_pixart_pipeline() if name == "pixart" else tiny_sd3_pipeline()
    extra = {"use_resolution_binning": False, "clean_caption": False, "height": 64, "width": 64} \
        if name == "pixart" else {"height": 32, "width": 32}

    def go():
        g = [torch.Generator().manual_seed(i) for i in range(2)]
        return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=4.5, generator=g, output_type="latent",
                    **extra).images

    den = pipe.transformer
    seen = {"rows": 0, "tail": 0}
    handles = [den.pos_embed.register_forward_pre_hook(
                   lambda m, a: seen.__setitem__("rows", seen["rows"] + a[0].shape[0])),
               den.transformer_blocks[-1].norm1.register_forward_pre_hook(
                   lambda m, a: seen.__setitem__("tail", seen["tail"] + 1))]
    plain = go()
    schedule = GuidanceSchedule(4.5, stop_step=3, after="cond")
    try:
        with guidance_schedule(pipe, schedule) as hook:
            stop = go()
            hooked = forwards(pipe)
            with cache_dit_peer(pipe, Fn_compute_blocks=1, residual_diff_threshold=0.0):
                assert torch.equal(go(), stop)  # cache-dit computing every block: the stop's own latents
            seen.update(rows=0, tail=0)
            with cache_dit_peer(pipe, **TINY_DIT):
                cached = go()
            assert same(forwards(pipe), hooked)  # shapefirst's hooked forward is back
    finally:
        for h in handles:
            h.remove()
    assert hook.evaluations_per_image() == [2 * 3 + STEPS - 3] * 2 and seen["rows"] == 2 * (2 * 3 + STEPS - 3)
    assert 0 < seen["tail"] < STEPS and not torch.equal(cached, stop)
    assert torch.equal(go(), plain)


@pytest.mark.parametrize("name", ["wan", "wan22", "flux"])
def test_cache_dit_on_one_call_per_branch_runs_alone_and_refuses_a_stop(pipes, name):
    pipe = pipes[name]
    options = {**TINY_DIT, **({"enable_separate_cfg": True} if name == "flux" else {})}
    plain, before = run(pipe), forwards(pipe)
    count = Count(pipe)
    try:
        with cache_dit_peer(pipe, **options) as peer:
            alone = run(pipe)
            assert peer.separate_cfg and count.calls == 2 * STEPS and 0 < count.work < count.calls
            count.zero()
            with guidance_schedule(pipe, GuidanceSchedule(W)) as hook:  # a schedule that never stops
                assert np.array_equal(run(pipe), alone)
            assert hook.evaluations_per_image() == [2 * STEPS] * 2 and count.rows == 2 * STEPS * len(PROMPTS)
            with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=STOP[name], after="cond")):
                with pytest.raises(ShapefirstError, match="cache-dit tells the branches apart by the parity"):
                    run(pipe)
    finally:
        count.close()
    assert np.array_equal(run(pipe), plain) and same(forwards(pipe), before)


def test_cache_dit_under_a_schedule_entered_first(pipes):
    """Wan: cache-dit's forward wraps shapefirst's hooked forward, which still sees every call; Flux: cache-dit
    rewrites Flux's forward and would drop the hook, which is refused; either way the pipeline is restored;
    Wan 2.2 with guidance_scale_2=1 (its low-noise unconditional pass skipped under any schedule) is refused."""
    wan, flux = pipes["wan"], pipes["flux"]
    with guidance_schedule(wan, GuidanceSchedule(W)) as hook:
        with cache_dit_peer(wan, **TINY_DIT):
            inner = run(wan)
        assert hook.evaluations_per_image() == [2 * STEPS] * 2
    with cache_dit_peer(wan, **TINY_DIT):
        assert np.array_equal(run(wan), inner)
    plain = run(flux)
    with guidance_schedule(flux, GuidanceSchedule(W)):
        hooked = forwards(flux)
        with pytest.raises(ShapefirstError, match="enter cache_dit_peer outside"):
            with cache_dit_peer(flux, **TINY_DIT, enable_separate_cfg=True):
                run(flux)
        assert same(forwards(flux), hooked)
    assert np.array_equal(run(flux), plain)
    wan22 = pipes["wan22"]
    with cache_dit_peer(wan22, **TINY_DIT), guidance_schedule(wan22, GuidanceSchedule(W)):
        with pytest.raises(ShapefirstError, match="parity"):
            run(wan22, guidance_scale_2=1.0)


def test_cache_dit_refuses_a_cfg_layout_it_would_misread(pipes):
    flux = pipes["flux"]
    with cache_dit_peer(flux, **TINY_DIT):  # cache-dit's Flux default: one call per step
        with pytest.raises(ShapefirstError, match=r"as a whole step, but this call runs CFG as one call per branch; "
                                                  r"enter cache_dit_peer\(pipe, enable_separate_cfg=True\)"):
            run(flux)
    with cache_dit_peer(flux, **TINY_DIT, enable_separate_cfg=True):
        with pytest.raises(ShapefirstError, match="enable_separate_cfg=False"):
            flux(PROMPTS[:1], height=16, width=16, num_inference_steps=2, max_sequence_length=16, output_type="np")


def test_cache_dit_bad_input_and_an_exception_inside(pipes, tiny_pipe):
    wan = pipes["wan"]
    plain, before = run(wan), forwards(wan)
    with pytest.raises(ShapefirstError, match="computes the first Fn_compute_blocks=8 .* `blocks` has 2"):
        with cache_dit_peer(wan):  # DBCache's defaults need more than 8 blocks
            pass
    with pytest.raises(ShapefirstError, match="cache-dit has no block adapter for StableDiffusionPipeline"):
        with cache_dit_peer(tiny_pipe):
            pass
    with pytest.raises(ShapefirstError, match="bad cache-dit option"):
        with cache_dit_peer(wan, Fn_blocks=1):
            pass
    with pytest.raises(ShapefirstError, match="cache-dit is already enabled on a WanPipeline"):
        with cache_dit_peer(wan, **TINY_DIT), cache_dit_peer(wan, **TINY_DIT):
            pass
    with pytest.raises(KeyboardInterrupt):
        with cache_dit_peer(wan, **TINY_DIT):
            raise KeyboardInterrupt
    assert np.array_equal(run(wan), plain) and same(forwards(wan), before)
