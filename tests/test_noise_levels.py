"""Guidance windows in noise level (#33 item 1): sigma per call against closed forms, the window mapped to the
calls of whatever scheduler runs (the same images as the call-index schedule it maps to), AUTOMATIC1111's NGMS
(odd steps below the sigma unguided, or all of them) against a reference built without shapefirst, and the
checks made when a schedule is made."""
import math

import numpy as np
import pytest

from shapefirst.errors import ShapefirstError
from shapefirst.guidance import GuidanceSchedule, guidance_schedule
from shapefirst.models import set_scheduler
from shapefirst.noise_levels import run_noise_levels

from conftest import CondHalfOn, gens

PROMPTS = ["a red circle", "a small blue striped square"]
STEPS, W = 8, 7.5


@pytest.fixture(autouse=True)
def ddim(tiny_pipe):
    own = tiny_pipe.scheduler
    yield
    tiny_pipe.scheduler = own


def run(pipe, **kw):
    return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=W, generator=gens(0, 2), output_type="np",
                **kw).images


def test_noise_levels_are_the_closed_form(tiny_pipe):
    for name in ("ddim", "dpm++", "euler"):
        set_scheduler(tiny_pipe, name)
        sch = tiny_pipe.scheduler
        sch.set_timesteps(STEPS)
        ac = sch.alphas_cumprod.double()
        got = run_noise_levels(sch, len(sch.timesteps))
        if name == "euler":  # Euler keeps sigma per step (interpolated between training timesteps)
            want = sch.sigmas[:-1].double().tolist()
        else:
            want = [math.sqrt((1 - ac[int(t)]) / ac[int(t)]) for t in sch.timesteps]
        assert np.allclose(got, want, rtol=1e-5), (name, got, want)
        assert all(a > b for a, b in zip(got, got[1:]))  # noise levels fall along a run


def test_flow_matching_noise_level_is_the_flow_time():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_timesteps(STEPS)
    assert np.allclose(run_noise_levels(sch, STEPS), sch.sigmas[:-1].tolist(), rtol=1e-6)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++", "euler"])
def test_a_sigma_window_is_the_call_window_it_maps_to(tiny_pipe, scheduler):
    set_scheduler(tiny_pipe, scheduler)
    tiny_pipe.scheduler.set_timesteps(STEPS)
    sig = run_noise_levels(tiny_pipe.scheduler, STEPS)
    lo, hi = sig[5] + 1e-6, sig[1] + 1e-6  # guided: calls 1..4 (sigma in (lo, hi])
    with guidance_schedule(tiny_pipe, GuidanceSchedule(W, stop_sigma=lo, start_sigma=hi, after="cond")) as hook:
        got = run(tiny_pipe)
    with guidance_schedule(tiny_pipe, GuidanceSchedule(W, stop_step=5, start_step=1, after="cond")):
        want = run(tiny_pipe)
    assert np.array_equal(got, want) and hook.evaluations_per_image() == [STEPS + 4] * 2
    assert hook.stop_calls.tolist() == [0, 0]  # call 0 is unguided: before the window


def test_the_same_sigma_lands_on_other_calls_with_other_solvers(tiny_pipe):
    firsts = {}
    for name, steps in (("ddim", 50), ("dpm++", 20), ("euler", 30)):
        set_scheduler(tiny_pipe, name)
        with guidance_schedule(tiny_pipe, GuidanceSchedule(W, stop_sigma=1.0)) as hook:
            tiny_pipe(PROMPTS[:1], num_inference_steps=steps, guidance_scale=W, output_type="latent")
        tiny_pipe.scheduler.set_timesteps(steps)
        want = sum(s > 1.0 for s in run_noise_levels(tiny_pipe.scheduler, steps))
        firsts[name] = hook.stop_calls.tolist()[0]
        assert firsts[name] == want
    assert len(set(firsts.values())) == 3  # one noise level, three call indices


@pytest.mark.parametrize("all_steps", [False, True])
def test_ngms_matches_automatic1111s_rule(tiny_pipe, all_steps):
    tiny_pipe.scheduler.set_timesteps(STEPS)
    s_min = run_noise_levels(tiny_pipe.scheduler, STEPS)[3] + 1e-6  # calls 3.. are below it
    sigmas = run_noise_levels(tiny_pipe.scheduler, STEPS)  # A1111's rule: no uncond below s_min on odd (all) steps
    ref = CondHalfOn(tiny_pipe.unet, lambda i: sigmas[i] <= s_min and (all_steps or i % 2 == 1))
    try:
        want = run(tiny_pipe)
    finally:
        ref.close()
    with guidance_schedule(tiny_pipe, GuidanceSchedule.a1111_ngms(W, s_min, all_steps=all_steps)) as hook:
        got = run(tiny_pipe)
    skipped = [i for i in range(3, STEPS) if all_steps or i % 2]
    assert np.array_equal(got, want)
    assert hook.evaluations_per_image() == [2 * STEPS - len(skipped)] * 2


def test_skip_early_is_a_late_start_with_the_conditional_branch():
    s = GuidanceSchedule.a1111_skip_early(W, 0.25)
    assert (s.start, s.after, s.stop) == (0.25, "cond", None) and s.first_guided_call(8) == 2


@pytest.mark.parametrize("kw, name", [
    (dict(stop_sigma=0.5, stop=0.5), "stop_sigma"),
    (dict(start_sigma=0.2, stop_sigma=0.5), "start_sigma 0.2 is not above"),
    (dict(stop_sigma=-1.0), "stop_sigma -1.0"),
    (dict(stop_sigma="0.5"), "stop_sigma"),
    (dict(stop_sigma=0.5, alternate=1), "alternate"),
])
def test_noise_level_windows_are_checked_when_made(kw, name):
    with pytest.raises(ShapefirstError, match=name):
        GuidanceSchedule(W, **kw)


def test_the_cli_takes_noise_levels_and_ngms(tiny_folder, tmp_path, capsys):
    import json

    from shapefirst.cli import main

    code = main(["generate", "a red circle", "--model", str(tiny_folder), "--steps", "6", "--ngms", "2.0:all",
                 "--out", str(tmp_path / "a")])
    assert code == 0
    sched = json.loads((tmp_path / "a" / "run.json").read_text())["schedule"]
    assert sched["stop_sigma"] == 2.0 and sched["alternate"] is False and sched["after"] == "cond"
    capsys.readouterr()
    assert main(["generate", "x", "--model", str(tiny_folder), "--ngms", "abc", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "--ngms 'abc' is not a noise level" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
