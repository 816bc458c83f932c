"""Guidance schedules and late caches with torch.compile and diffusers' CPU offload (issue #15.4).

torch.compile: the tiny UNet, compiled with backend="aot_eager" (dynamo + AOTAutograd, no code generation:
the CPU inductor takes minutes per graph on a small machine; measured once by hand, see the README) and
fullgraph=True, both as `pipe.unet = torch.compile(pipe.unet)` (the hooks stay outside the compiled module)
and in place (`pipe.unet.compile()`: the guidance hook runs inside the compiled forward; its bookkeeping is
excluded from the graph with torch.compiler.disable). Graphs are counted with dynamo's counters: a stop adds
one (the batch dimension becomes dynamic once the row count changes), a late cache a bounded few (one per
phase), a second run none.

Offload: enable_model_cpu_offload needs an accelerator; on CPU, diffusers refuses it unless the CPU is named
as the execution device (then its hooks run and move nothing). Apply the schedule first, then enable the
offload; the other order works for one call, then fails with a clear error. enable_sequential_cpu_offload is refused on
a CPU-only machine (and with the CPU forced, the plain pipeline itself fails inside accelerate)."""
import numpy as np
import pytest
import torch

from shapefirst.cache import LateCache, late_cache
from shapefirst.errors import ShapefirstError
from shapefirst.guidance import GuidanceSchedule, guidance_schedule
from shapefirst.tiny import tiny_sd_pipeline

from conftest import gens

PROMPTS = ["a red circle", "a small blue striped square"]
STEPS = 8
W = 7.5
ACCELERATOR = torch.cuda.is_available() or (getattr(torch.backends, "mps", None) is not None
                                            and torch.backends.mps.is_available())


def run(pipe, prompts=PROMPTS, **kw):
    return pipe(prompts, num_inference_steps=STEPS, guidance_scale=W, generator=gens(0, len(prompts)),
                output_type="np", **kw).images


def reference(tiny_pipe, schedule, cache=None):
    with guidance_schedule(tiny_pipe, schedule), late_cache(tiny_pipe, cache):
        return run(tiny_pipe)


# -- torch.compile -----------------------------------------------------------------------------
def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.fixture
def dynamo():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # reset() keeps the counters
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("how", ["wrapped", "in-place"])
def test_compiled_unet_gives_the_same_images_with_a_bounded_number_of_graphs(tiny_pipe, tmp_path, dynamo, how):
    pipe = tiny_sd_pipeline(folder=tmp_path)  # the same weights as tiny_pipe
    if how == "wrapped":
        pipe.unet = torch.compile(pipe.unet, backend="aot_eager", fullgraph=True)
    else:  # the hook's bookkeeping is a graph break: no fullgraph
        pipe.unet.compile(backend="aot_eager")
    close = lambda a, b: np.abs(a - b).max() <= 1e-5  # noqa: E731  (float rounding of the compiled graph)
    stop = GuidanceSchedule(W, stop_step=3)
    with guidance_schedule(pipe, GuidanceSchedule(W)):
        assert close(run(pipe), reference(tiny_pipe, GuidanceSchedule(W)))
    full = graphs()
    with guidance_schedule(pipe, stop) as hook:
        ref = reference(tiny_pipe, stop)
        assert close(run(pipe), ref)
        stopped = graphs()
        assert close(run(pipe), ref)  # a second run: no new graph
    assert hook.evaluations_per_image() == [2 * 3 + STEPS - 3] * 2
    # the row count changes once: each graph that sees the batch is compiled once more, with a dynamic batch
    assert (full, stopped) == (1, 2) and graphs() == stopped


@pytest.mark.parametrize("cache", [LateCache("mean"), LateCache("kept", 2)], ids=["mean", "kept+deep2"])
def test_a_late_cache_under_compile_adds_one_graph_per_phase(tiny_pipe, tmp_path, dynamo, cache):
    """The cache hooks run inside the compiled UNet and read only booleans of the RunState (the DeepCache
    phase is decided outside, RunState.listeners): one graph per phase, no recompile per call. dynamo alone
    (backend="eager"): the graph count does not depend on the backend."""
    pipe = tiny_sd_pipeline(folder=tmp_path)
    pipe.unet = torch.compile(pipe.unet, backend="eager", fullgraph=True)
    stop = GuidanceSchedule(W, stop_step=3)
    ref = reference(tiny_pipe, stop, cache)
    with guidance_schedule(pipe, stop), late_cache(pipe, cache):
        assert np.array_equal(run(pipe), ref)
        first = graphs()
        assert np.array_equal(run(pipe), ref)
    # guided, recording (the call before the stop), replaying (+ shallow DeepCache calls)
    assert first <= (3 if cache.deep_interval == 0 else 4) and graphs() == first


# -- CPU offload -------------------------------------------------------------------------------
@pytest.mark.skipif(ACCELERATOR, reason="tests diffusers' refusal on a CPU-only machine")
def test_offload_on_a_cpu_only_machine_is_refused_by_diffusers(tmp_path):
    pipe = tiny_sd_pipeline(folder=tmp_path)
    for enable in (pipe.enable_model_cpu_offload, pipe.enable_sequential_cpu_offload):
        with pytest.raises(RuntimeError, match="requires accelerator"):
            enable()


def test_model_cpu_offload_with_a_schedule_and_a_late_cache(tiny_pipe, tmp_path):
    """The schedule first, then enable_model_cpu_offload (accelerate's hook wraps the guidance hook and keeps it
    when it re-installs itself after every call): no stop is bit-identical to the plain offloaded pipeline, a
    stop + late cache to the same schedule without offload, in every run."""
    pipe = tiny_sd_pipeline(folder=tmp_path)
    stop, cache = GuidanceSchedule(W, stop_step=3), LateCache("mean", 2)
    ref = reference(tiny_pipe, stop, cache)
    with guidance_schedule(pipe, stop) as hook, late_cache(pipe, cache):
        pipe.enable_model_cpu_offload(device="cpu")
        got = [run(pipe), run(pipe)]  # maybe_free_model_hooks re-installs accelerate's hooks after each call
    assert np.array_equal(got[0], ref) and np.array_equal(got[1], ref)
    assert hook.evaluations_per_image() == [2 * 3 + STEPS - 3] * 2
    plain = run(pipe)  # removed: accelerate's wrapper still calls the removed hook, which passes through
    assert np.array_equal(plain, run(tiny_pipe))
    with guidance_schedule(pipe, GuidanceSchedule(W)):
        assert np.array_equal(run(pipe), plain)


def test_a_schedule_applied_after_offload_fails_clearly_once_accelerate_drops_it(tiny_pipe, tmp_path):
    """enable_model_cpu_offload first, then the schedule: the first run is right; after it, diffusers re-installs
    accelerate's hooks over the denoiser's original forward and the guidance hook is bypassed: the next run
    stops with a ShapefirstError (not unguided images), also with a late cache on the pipeline."""
    pipe = tiny_sd_pipeline(folder=tmp_path)
    pipe.enable_model_cpu_offload(device="cpu")
    stop, cache = GuidanceSchedule(W, stop_step=3), LateCache("mean", 2)
    with guidance_schedule(pipe, stop), late_cache(pipe, cache):
        assert np.array_equal(run(pipe), reference(tiny_pipe, stop, cache))
        with pytest.raises(ShapefirstError, match="no longer on UNet2DConditionModel.forward") as e:
            run(pipe)
    assert "\n" not in str(e.value) and "before apply_guidance_schedule" in str(e.value)
