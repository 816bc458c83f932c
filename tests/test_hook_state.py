"""Cooperating hooks (issue #14.3/#14.4): one RunState shared by the guidance hook and everything that
reads it, reset through `reset_state` at every new run, rebound or removed with the schedule; no
private attributes of diffusers, transformers or torchmetrics."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.hooks import HookRegistry

from shapefirst.cache import HOOK_NAME as CACHE_HOOK, LateCache, apply_late_cache
from shapefirst.guidance import (GuidanceSchedule, apply_guidance_schedule, guidance_hook_of,
                                 remove_guidance_schedule, run_state_of)
from shapefirst.errors import ShapefirstError
from shapefirst.models import set_scheduler

from conftest import gens

PROMPTS = ["a red circle", "a small blue striped square"]
STEPS = 8


@pytest.fixture(autouse=True)
def clean(tiny_pipe):
    set_scheduler(tiny_pipe, "ddim")
    yield
    remove_guidance_schedule(tiny_pipe)


def run(pipe, prompts=PROMPTS, **kw):
    return pipe(prompts, num_inference_steps=STEPS, guidance_scale=7.5, generator=gens(0, len(prompts)),
                output_type="np", **kw).images


def cache_hooks(pipe) -> list:
    hooks = [HookRegistry.check_if_exists_or_initialize(m).get_hook(CACHE_HOOK) for m in pipe.unet.modules()]
    return [h for h in hooks if h is not None]


def fresh_reference(pipe, schedule, cache=None):
    """The same run on a pipeline with no shapefirst history."""
    remove_guidance_schedule(pipe)
    apply_guidance_schedule(pipe, schedule)
    if cache is not None:
        apply_late_cache(pipe, cache)
    out = run(pipe)
    remove_guidance_schedule(pipe)
    return out


def test_replacing_the_schedule_rebinds_the_late_cache(tiny_pipe):
    """The bug of #14: stop + LateCache('mean'), run, new full-guidance schedule, run again: the cache hooks
    followed the removed guidance hook and replayed the old run's values (a shape error, here with a
    different batch; silently wrong images with the same one)."""
    plain = run(tiny_pipe)
    plain_one = run(tiny_pipe, PROMPTS[:1])
    apply_guidance_schedule(tiny_pipe, GuidanceSchedule(7.5, stop_step=4))
    apply_late_cache(tiny_pipe, LateCache("mean"))
    run(tiny_pipe)
    hook = apply_guidance_schedule(tiny_pipe, GuidanceSchedule(7.5))  # full guidance: the cache never acts
    assert all(h.session is hook.session for h in cache_hooks(tiny_pipe)) and cache_hooks(tiny_pipe)
    assert np.array_equal(run(tiny_pipe, PROMPTS[:1]), plain_one)  # other batch: was a shape error
    assert np.array_equal(run(tiny_pipe), plain)  # same batch: was silently wrong
    # a new stop: the same images as the same schedule and cache on a fresh pipeline
    apply_guidance_schedule(tiny_pipe, GuidanceSchedule(7.5, stop_step=2))
    got = run(tiny_pipe)
    assert np.array_equal(got, fresh_reference(tiny_pipe, GuidanceSchedule(7.5, stop_step=2), LateCache("mean")))
    assert not np.array_equal(got, fresh_reference(tiny_pipe, GuidanceSchedule(7.5, stop_step=2)))


def test_removing_the_schedule_removes_what_depends_on_it(tiny_pipe):
    plain = run(tiny_pipe)
    apply_guidance_schedule(tiny_pipe, GuidanceSchedule(7.5, stop_step=3))
    apply_late_cache(tiny_pipe, LateCache("mean", deep_interval=2))
    assert len(cache_hooks(tiny_pipe)) > 1
    remove_guidance_schedule(tiny_pipe)
    assert cache_hooks(tiny_pipe) == [] and guidance_hook_of(tiny_pipe) is None and run_state_of(tiny_pipe) is None
    assert np.array_equal(run(tiny_pipe), plain)


def test_every_run_has_its_own_state(tiny_pipe):
    """State belongs to the pipeline call: each run gets a fresh RunState (counts, and what the late caches kept,
    in its `kept` slots); diffusers' own reset of stateful hooks between runs changes nothing."""
    hook = apply_guidance_schedule(tiny_pipe, GuidanceSchedule(7.5, stop_step=4))
    apply_late_cache(tiny_pipe, LateCache("mean"))
    n_cache, filled = len(cache_hooks(tiny_pipe)), []

    def look(pipe, i, t, kw):  # during the run: what the late caches keep is the run's own
        filled.append(sum(x is not None for x in run_state_of(pipe).kept))
        return {}

    first = run(tiny_pipe, callback_on_step_end=look)
    one = hook.state
    assert one.run == 1 and max(filled) == n_cache > 0 and filled[0] == 0
    assert all(x is None for x in one.kept) and one.frame is None  # let go when the run ends
    assert run_state_of(tiny_pipe).evaluations.tolist() == [2 * 4 + 4] * 2
    assert np.array_equal(run(tiny_pipe), first)
    assert hook.state is not one and hook.state.run == 2 and one.evaluations.tolist() == [12, 12]
    HookRegistry.check_if_exists_or_initialize(tiny_pipe.unet).reset_stateful_hooks(recurse=True)
    assert hook.evaluations_per_image() == [12, 12]
    assert np.array_equal(run(tiny_pipe), first) and hook.state.run == 3


def test_a_run_cut_short_does_not_leak_into_the_next(tiny_pipe):
    hook = apply_guidance_schedule(tiny_pipe, GuidanceSchedule(7.5, stop_step=4))
    apply_late_cache(tiny_pipe, LateCache("mean"))
    ref = run(tiny_pipe)

    def boom(pipe, i, t, kw):
        if i == 5:
            raise RuntimeError("interrupted")
        return {}

    with pytest.raises(RuntimeError):
        run(tiny_pipe, callback_on_step_end=boom)
    assert hook.state.call == 6  # stopped in the late phase, caches full
    assert np.array_equal(run(tiny_pipe), ref)


def test_the_run_length_is_the_pipelines_own(tiny_pipe):
    """n_calls comes from the pipeline's public num_timesteps (img2img shortens its schedule)."""
    hook = apply_guidance_schedule(tiny_pipe, GuidanceSchedule(7.5, stop=0.5))
    run(tiny_pipe)
    assert hook.n_calls == tiny_pipe.num_timesteps == STEPS and hook.evaluations_per_image() == [12, 12]


SRC = Path(__file__).resolve().parents[1] / "src" / "shapefirst"
# every module but diffusers_shim.py, the one place that reads diffusers' hook internals (pinned diffusers range)
OWNED = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if p.name != "diffusers_shim.py")
PRIVATE = [r"\._diffusers_hook\b", r"_execution_device", r"_TORCH_FIDELITY_AVAILABLE", r"\._timesteps_ref",
           r"\._guidance_scale\b", r"\._num_timesteps\b", r"\._interrupt\b", r"\._step_index\b",
           r"\._hook_order\b", r"\._fn_refs\b", r"_reset_stateful_cache",
           r"(from|import) (diffusers|transformers|torch)[\w.]*\._"]  # a private module of a library


@pytest.mark.parametrize("name", OWNED)
def test_no_private_attributes_of_the_libraries_are_used(name):
    text = (SRC / name).read_text(encoding="utf-8")
    hits = [p for p in PRIVATE if re.search(p, text)]
    assert not hits, f"{name} uses {hits}"


def test_encode_prompts_uses_the_public_keyword_interface(tiny_pipe):
    from shapefirst.experiments.eos_swap import encode_prompts

    cond, uncond = encode_prompts(tiny_pipe, PROMPTS)
    want_c, want_u = tiny_pipe.encode_prompt(prompt=PROMPTS, device=tiny_pipe.device, num_images_per_prompt=1,
                                             do_classifier_free_guidance=True)
    assert torch.equal(cond, want_c) and torch.equal(uncond, want_u)


def test_generate_with_another_scheduler_gives_the_pipeline_its_own_back(tiny_pipe):
    """generate(scheduler=...) is one run's choice: later runs (and the fingerprint of the pipeline, which
    keys saved results) see the pipeline's own scheduler, also after a failed run."""
    from shapefirst.generate import generate
    from shapefirst.outputs import model_fingerprint

    own, print_before = tiny_pipe.scheduler, model_fingerprint(tiny_pipe)
    res = generate(tiny_pipe, ["a red circle"], GuidanceSchedule(7.5), steps=3, scheduler="dpm++")
    assert res.settings["scheduler"] == "dpm++"
    assert tiny_pipe.scheduler is own and model_fingerprint(tiny_pipe) == print_before
    with pytest.raises(ShapefirstError):
        generate(tiny_pipe, ["a red circle"], GuidanceSchedule(7.5, stop_step=99), steps=3, scheduler="euler")
    assert tiny_pipe.scheduler is own
