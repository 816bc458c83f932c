"""The shape-settled adaptive stop (issue #16 item 1): AdaptiveStop(criterion="shape") stops guidance per
sample once the low band of its guided x0-hat has stopped changing. Checked against the rule computed from
the trajectory recorder's x0-hat of a full-guidance run (identical up to the stop), on the tiny in-code
pipelines: schedulers, late caches, SDXL / PixArt / SD3, batches against solo runs, host syncs, the CLI."""
import json
import math

import numpy as np
import pytest
import torch

from shapefirst.cache import LateCache, late_cache
from shapefirst.cli import main
from shapefirst.errors import ShapefirstError
from shapefirst.frequency import split_bands
from shapefirst.generate import generate
from shapefirst.guidance import DEFAULT_SHAPE_TOLERANCE, AdaptiveStop, GuidanceSchedule, guidance_schedule
from shapefirst.models import set_scheduler

PROMPTS = ["a red circle on the left", "a small blue striped square at the top"]
STEPS = 8
W = 7.5


def shape(tol, patience=1, min_call=0):
    return GuidanceSchedule(W, adaptive=AdaptiveStop(criterion="shape", tolerance=tol, patience=patience,
                                                     min_call=min_call))


def expected_stops(traj, tol, patience=1, min_call=0):
    """The rule, from a full-guidance trajectory: the first unguided call per image (-1: never)."""
    low = split_bands(traj.arrays["x0"].double())[0].flatten(2)  # [calls, images, D]
    rel = (low[1:] - low[:-1]).norm(dim=2) / (low[1:].norm(dim=2) + 1e-12)
    calls, out = low.shape[0], []
    for i in range(low.shape[1]):
        streak, first = 0, -1
        for c in range(1, calls):
            streak = streak + 1 if rel[c - 1, i] < tol else 0
            if c >= min_call and streak >= patience and c + 1 < calls:
                first = c + 1
                break
        out.append(first)
    return out


def evals(first, calls=STEPS):
    return [2 * calls if f < 0 else 2 * f + (calls - f) for f in first]


# -- the API ----------------------------------------------------------------------------------
def test_api_round_trips_keeps_the_cosine_criterion_and_refuses_bad_values():
    cos = AdaptiveStop(0.99, min_call=2)
    assert cos.criterion == "cosine" and cos.to_dict() == {"threshold": 0.99, "min_call": 2}  # as before
    sh = AdaptiveStop(criterion="shape", tolerance=0.01, patience=3, min_call=4)
    assert sh.to_dict() == {"criterion": "shape", "tolerance": 0.01, "patience": 3, "radius": 0.25, "min_call": 4}
    assert sh.decides_from == 4 and AdaptiveStop(criterion="shape", patience=3).decides_from == 3
    dflt = AdaptiveStop(criterion="shape")
    assert (dflt.tolerance, dflt.patience) == (DEFAULT_SHAPE_TOLERANCE, 2)
    for a in (cos, sh, dflt):
        assert AdaptiveStop.from_dict(a.to_dict()) == a
        s = GuidanceSchedule(W, adaptive=a)
        assert GuidanceSchedule.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    for kw in (dict(criterion="shape", tolerance=-0.1), dict(criterion="shape", tolerance=float("nan")),
               dict(criterion="shape", tolerance="abc"), dict(criterion="shape", tolerance=math.inf),
               dict(criterion="shape", patience=0), dict(criterion="shape", radius=1.5), dict(criterion="loss"),
               dict(tolerance=0.01), dict(criterion="shape", min_call=-1)):
        with pytest.raises(ShapefirstError) as e:
            AdaptiveStop(**kw)
        assert "\n" not in str(e.value) and "; " in str(e.value), kw


# -- the rule on the tiny SD pipeline ---------------------------------------------------------
def test_never_stops_before_its_minimum_call(tiny_pipe):
    for patience, min_call, first in ((1, 0, 2), (2, 0, 3), (1, 3, 4), (2, 5, 6)):
        res = generate(tiny_pipe, PROMPTS, shape(1e9, patience, min_call), steps=STEPS, scheduler="ddim")
        # always settled: decided at call max(min_call, patience) (call 0 has no previous x0-hat), unguided after
        assert res.settings["first_unguided_call_per_image"] == [first] * 2, (patience, min_call)
        assert res.evaluations_per_image == evals([first] * 2)


def test_never_settled_keeps_full_guidance_bit_identical(tiny_pipe):
    full = generate(tiny_pipe, PROMPTS, GuidanceSchedule(W), steps=STEPS, scheduler="ddim", images_per_prompt=2)
    never = generate(tiny_pipe, PROMPTS, shape(1e-12), steps=STEPS, scheduler="ddim", images_per_prompt=2)
    assert never.settings["first_unguided_call_per_image"] == [-1] * 4
    assert never.evaluations_per_image == [2 * STEPS] * 4 and np.array_equal(never.images, full.images)


@pytest.mark.parametrize("n_img", [2, 4])
def test_a_sample_in_a_batch_equals_its_solo_run(tiny_pipe, n_img):
    """2 prompts x n_img images (a batch of 4 and of 8) against each image alone (seed + i)."""
    sched, seed = shape(0.1), 3
    batch = generate(tiny_pipe, PROMPTS, sched, steps=STEPS, scheduler="ddim", seed=seed, images_per_prompt=n_img)
    stops = batch.settings["first_unguided_call_per_image"]
    assert len(set(stops)) > 1 and -1 not in stops, stops  # samples stop at different calls
    for i in range(2 * n_img):
        solo = generate(tiny_pipe, [PROMPTS[i // n_img]], sched, steps=STEPS, scheduler="ddim", seed=seed + i)
        assert solo.settings["first_unguided_call_per_image"] == [stops[i]], i
        assert solo.evaluations_per_image == [batch.evaluations_per_image[i]]
        assert np.abs(batch.images[i] - solo.images[0]).max() <= 1 / 255, i


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++", "pndm"])
@pytest.mark.parametrize("cache", [None, "mean"])
def test_schedulers_and_late_caches_follow_the_recorders_x0_hat(tiny_pipe, scheduler, cache):
    full = generate(tiny_pipe, PROMPTS, GuidanceSchedule(W), steps=STEPS, scheduler=scheduler, trace=True)
    calls = full.trajectory.n_calls
    for tol, patience in ((0.1, 1), (0.05, 2)):
        want = expected_stops(full.trajectory, tol, patience)
        assert want != [-1, -1]
        res = generate(tiny_pipe, PROMPTS, shape(tol, patience), steps=STEPS, scheduler=scheduler,
                       cache=LateCache.parse(cache) if cache else None)
        assert res.settings["first_unguided_call_per_image"] == want, (tol, patience)
        assert res.evaluations_per_image == evals(want, calls)
        assert np.isfinite(res.images).all()


def test_the_late_cache_acts_once_every_sample_stopped(tiny_pipe):
    sched = shape(1e9, 1, 2)  # every sample unguided from call 3
    plain = generate(tiny_pipe, PROMPTS, sched, steps=STEPS, scheduler="ddim")
    cached = generate(tiny_pipe, PROMPTS, sched, steps=STEPS, scheduler="ddim", cache=LateCache("mean"))
    assert (cached.settings["first_unguided_call_per_image"] == plain.settings["first_unguided_call_per_image"]
            == [3, 3])
    assert not np.array_equal(cached.images, plain.images)


# -- other families ---------------------------------------------------------------------------
FAMILY_EXTRA = {"sdxl": {}, "pixart": dict(use_resolution_binning=False, clean_caption=False), "sd3": {}}


@pytest.fixture(scope="module", params=list(FAMILY_EXTRA))
def fam(request, tmp_path_factory):
    from shapefirst import tiny

    builder = {"sdxl": tiny.tiny_sdxl_pipeline, "pixart": tiny.tiny_pixart_pipeline, "sd3": tiny.tiny_sd3_pipeline}
    return request.param, builder[request.param](folder=tmp_path_factory.mktemp(request.param))


def test_every_family_follows_the_recorders_x0_hat(fam):
    """SDXL (UNet), PixArt (learned variance: x0-hat from the noise half) and SD3 (flow matching)."""
    name, pipe = fam
    kw = dict(steps=STEPS, **FAMILY_EXTRA[name])
    full = generate(pipe, PROMPTS, GuidanceSchedule(W), trace=True, **kw)
    never = generate(pipe, PROMPTS, shape(1e-12), **kw)
    assert np.array_equal(never.images, full.images) and never.evaluations_per_image == [2 * STEPS] * 2
    rel_ok = [t for t in (0.2, 0.1, 0.05, 0.02) if expected_stops(full.trajectory, t) != [-1, -1]]
    assert rel_ok, "the tiny model's x0-hat never settles"
    for tol in rel_ok[:2]:
        want = expected_stops(full.trajectory, tol)
        res = generate(pipe, PROMPTS, shape(tol), **kw)
        assert res.settings["first_unguided_call_per_image"] == want, (name, tol)
        assert res.evaluations_per_image == evals(want)
        solo = generate(pipe, PROMPTS[1:], shape(tol), seed=1, **kw)
        assert solo.settings["first_unguided_call_per_image"] == want[1:]
        assert np.abs(res.images[1] - solo.images[0]).max() <= 1 / 255


@pytest.mark.parametrize("kind", ["img2img", "inpaint", "controlnet"])
def test_image_pipelines_follow_the_recorders_x0_hat(kind, tmp_path):
    """img2img (a shortened schedule), inpainting (a 9-channel UNet input: x0-hat from its latent channels),
    ControlNet."""
    from test_pipelines import inputs

    from shapefirst.tiny import tiny_sd_variant

    pipe = tiny_sd_variant(kind, folder=tmp_path / kind)
    kw = dict(steps=STEPS, scheduler="ddim", **inputs(kind, 2))
    full = generate(pipe, PROMPTS, GuidanceSchedule(W), trace=True, **kw)
    want = expected_stops(full.trajectory, 0.1)
    assert want != [-1, -1]
    res = generate(pipe, PROMPTS, shape(0.1), **kw)
    assert res.settings["first_unguided_call_per_image"] == want
    assert res.evaluations_per_image == evals(want, full.trajectory.n_calls)


# -- no host sync beyond the documented read per call -------------------------------------------
@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
@pytest.mark.parametrize("cache", [None, LateCache("mean", 2)])
def test_no_host_sync_beyond_one_read_per_call(tiny_pipe, monkeypatch, scheduler, cache):
    from test_pipelines import SyncChecker, _all_hooks

    from shapefirst import cache as cache_mod, guidance as guidance_mod

    chk = SyncChecker()
    for cls, meth in ((guidance_mod.GuidanceHook, "new_forward"), (cache_mod.CrossAttentionReuse, "new_forward"),
                      (cache_mod.DeepSkip, "new_forward"), (cache_mod._DeepState, "on_call")):
        monkeypatch.setattr(cls, meth, chk.arm(getattr(cls, meth)))
    monkeypatch.setattr(tiny_pipe, "scheduler", tiny_pipe.scheduler)  # the shared pipe gets its own scheduler back
    set_scheduler(tiny_pipe, scheduler)
    sch, set_timesteps = tiny_pipe.scheduler, tiny_pipe.scheduler.set_timesteps

    def device_timesteps(*a, **k):  # the timesteps the denoiser gets count as device tensors too
        set_timesteps(*a, **k)
        sch.timesteps = sch.timesteps.as_subclass(chk.cls)

    monkeypatch.setattr(sch, "set_timesteps", device_timesteps)
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0)).as_subclass(chk.cls)
    with guidance_schedule(tiny_pipe, shape(1e9, 2)) as hook, late_cache(tiny_pipe, cache):
        for h in _all_hooks(tiny_pipe):
            if h.fn_ref.original_forward is not None:
                h.fn_ref.original_forward = chk.disarm(h.fn_ref.original_forward)
        tiny_pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=W, latents=latents, output_type="np")
    assert hook.call == STEPS and hook.evaluations_per_image() == evals([3, 3])
    # documented: at most one read per call, of the adaptive stop flags (from call decides_from + 1 on)
    assert 0 < len(chk.syncs) <= STEPS and set(chk.syncs) == {"cpu"}, chk.syncs


# -- the command line -------------------------------------------------------------------------
def _cli(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_cli_generate_and_auto(tiny_folder, tmp_path, capsys):
    out = tmp_path / "gen"
    code, err = _cli(["generate", *PROMPTS, "--model", tiny_folder, "--steps", STEPS, "--adaptive-shape", "0.1",
                      "--images-per-prompt", 2, "--seed", 3, "--out", out], capsys)
    assert code == 0, err
    run = json.loads((out / "run.json").read_text())
    assert run["schedule"]["adaptive"] == {"criterion": "shape", "tolerance": 0.1, "patience": 2, "radius": 0.25,
                                           "min_call": 0}
    first = run["first_unguided_call_per_image"]
    assert len(first) == 4 and run["denoiser_evaluations_per_image"] == evals(first)
    auto = tmp_path / "auto"
    code, err = _cli(["generate", PROMPTS[0], "--model", tiny_folder, "--steps", 4, "--adaptive-shape", "auto",
                      "--adaptive-min-call", 1, "--out", auto], capsys)
    assert code == 0, err
    ad = json.loads((auto / "run.json").read_text())["schedule"]["adaptive"]
    assert ad["tolerance"] == DEFAULT_SHAPE_TOLERANCE and ad["min_call"] == 1  # not the embedded model


def test_default_shape_tolerance_reads_the_recommended_one(monkeypatch):
    from shapefirst import models

    assert models.default_shape_tolerance(str("/some/model")) == DEFAULT_SHAPE_TOLERANCE
    monkeypatch.setattr(models, "recommended", lambda model="embedded": {"adaptive_shape_tolerance": 0.035}
                        if model == "embedded" else {})
    assert models.default_shape_tolerance("embedded") == 0.035
    assert models.default_shape_tolerance("/some/model") == DEFAULT_SHAPE_TOLERANCE


def test_cli_sweep_has_adaptive_shape_rows(tiny_folder, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "sweep"
    code, err = _cli(["sweep", "--model", tiny_folder, "--prompts", prompts, "--n", 2, "--stops", "", "--steps", 4,
                      "--schedulers", "ddim", "--adaptive-shape", "0.1,auto", "--timing-batches", 0, "--out", out],
                     capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines() if line.strip()]
    names = {r["name"] for r in rows}
    assert {f"adaptive-shape={t} {m}" for t in (0.1, DEFAULT_SHAPE_TOLERANCE) for m in ("uncond", "cond")} <= names
    row = next(r for r in rows if r["name"] == "adaptive-shape=0.1 uncond")
    assert row["schedule"]["adaptive"]["criterion"] == "shape"


@pytest.mark.parametrize("command", ["generate", "sweep", "calibrate"])
@pytest.mark.parametrize("value", ["-0.1", "nan", "abc", "0", "inf"])
def test_cli_bad_values_are_one_line_exit_2(tiny_folder, tmp_path, capsys, command, value):
    out = tmp_path / "out"
    argv = {"generate": ["generate", "x", "--model", tiny_folder, "--steps", 2],
            "sweep": ["sweep", "--model", tiny_folder, "--steps", 2],
            "calibrate": ["calibrate", "--model", tiny_folder, "--steps", 2]}[command]
    code, err = _cli([*argv, f"--adaptive-shape={value}", "--out", out], capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and "--adaptive-shape" in err
    assert not out.exists()


def test_cli_refuses_both_adaptive_criteria(tiny_folder, tmp_path, capsys):
    code, err = _cli(["generate", "x", "--model", tiny_folder, "--steps", 2, "--adaptive", 0.9,
                      "--adaptive-shape", 0.1, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "--adaptive and --adaptive-shape" in err and err.strip().count("\n") == 0
