"""The sweep: quality numbers equal direct generate runs, a rerun skips finished configurations, calibrate's rule."""
import numpy as np
import pytest

from shapefirst.sweep import Config, calibrate, passes, run_sweep
from shapefirst.generate import generate
from shapefirst.guidance import GuidanceSchedule
from shapefirst.metrics import l1, psnr
from shapefirst.results import read_jsonl

PROMPTS = ["a red circle", "a blue square", "a green cross", "a small yellow triangle"]


def configs():
    return [Config("full", GuidanceSchedule(7.5), "ddim", 4),
            Config("stop=0.5 uncond", GuidanceSchedule(7.5, stop=0.5), "ddim", 4)]


def test_sweep_rows_equal_direct_runs_and_resume(tiny_pipe, tmp_path, monkeypatch):
    rows = run_sweep(tiny_pipe, PROMPTS, tmp_path, configs=configs(), batch=2)
    assert [r["name"] for r in rows] == ["full", "stop=0.5 uncond"]
    full = np.concatenate([generate(tiny_pipe, PROMPTS[i:i + 2], GuidanceSchedule(7.5), steps=4, seed=i).images
                           for i in (0, 2)])
    cut = np.concatenate([generate(tiny_pipe, PROMPTS[i:i + 2], GuidanceSchedule(7.5, stop=0.5),
                                   steps=4, seed=i).images
                          for i in (0, 2)])
    r = rows[1]
    assert np.isclose(r["l1"][0], l1(cut, full).mean())
    assert np.isclose(r["psnr"][0], np.minimum(psnr(cut, full), 100).mean())
    assert r["evaluations_per_image"] == 2 * 2 + 2 and np.isclose(r["evaluation_ratio"], 6 / 8)
    assert rows[0]["l1"][0] == 0.0  # full guidance against itself
    lines = read_jsonl(tmp_path / "sweep.jsonl")
    summary = (tmp_path / "sweep.csv").read_text()

    import shapefirst.sweep as sw

    def boom(*a, **k):
        raise AssertionError("a finished configuration was recomputed")

    monkeypatch.setattr(sw, "generate", boom)
    again = run_sweep(tiny_pipe, PROMPTS, tmp_path, configs=configs(), batch=2)
    assert again == rows
    assert read_jsonl(tmp_path / "sweep.jsonl") == lines
    assert (tmp_path / "sweep.csv").read_text() == summary


def _row(delta_lo, clip=None, floor=None, name="stop"):
    r = {"name": name, "saved_latency": 0.2, "psnr": [40.0, 39.0, 41.0],
         "accuracy_delta_vs_full": {"color": [0.0, delta_lo, 0.01], "shape": [0.0, -0.005, 0.01]}}
    if clip is not None:
        r["image_clip"], r["image_clip_floor"] = [clip, 0, 0], [floor, 0, 0]
    return r


def test_calibrate_rule():
    assert passes(_row(-0.005))[0]
    ok, why = passes(_row(-0.03))
    assert not ok and "color" in why
    assert not passes(_row(-0.005, clip=80.0, floor=85.0))[0]
    assert passes(_row(-0.005, clip=90.0, floor=85.0))[0]
    fast, slow = _row(-0.005), _row(-0.005)
    fast["saved_latency"] = 0.4
    bad = _row(-0.5)
    bad["saved_latency"] = 0.6
    best, verdicts = calibrate([_row(0, name="full"), slow, fast, bad])
    assert best is fast and len(verdicts) == 3


def test_peer_runs_cache_configs_distances_and_bounds(tiny_pipe, tmp_path):
    """A `run` configuration (a peer's own pipeline call) and a cached one enter the sweep like any other;
    KID/FD against real images and the Image-CLIP floor/ceiling are written into every JSON line."""
    from shapefirst.cache import LateCache
    from shapefirst.metrics import kernel_distance

    from shapefirst.metrics import Clip
    from shapefirst.tiny import tiny_clip_folder

    clip = Clip.load(tiny_clip_folder(tmp_path / "clip"))

    def peer(pipe, prompts, seed, steps, scheduler):  # what a peer runner returns: a GenerationResult
        return generate(pipe, prompts, GuidanceSchedule(7.5, stop_step=2, after="cond"), steps=steps, seed=seed,
                        scheduler=scheduler)

    real = np.random.default_rng(0).random((len(PROMPTS), 32, 32, 3)).astype(np.float32)
    cfgs = configs() + [Config("peer", GuidanceSchedule(7.5), "ddim", 4, run=peer),
                        Config("cached", GuidanceSchedule(7.5, stop=0.5), "ddim", 4, cache=LateCache("mean"))]
    rows = run_sweep(tiny_pipe, PROMPTS, tmp_path / "s", configs=cfgs, batch=2, clip=clip, real_images=real,
                     timing_batches=0)
    lines = {r["name"]: r for r in read_jsonl(tmp_path / "s" / "sweep.jsonl")}
    assert set(lines) == {"full", "stop=0.5 uncond", "peer", "cached"}
    direct = np.concatenate([peer(tiny_pipe, PROMPTS[i:i + 2], i, 4, "ddim").images for i in (0, 2)])
    full = np.concatenate([generate(tiny_pipe, PROMPTS[i:i + 2], GuidanceSchedule(7.5), steps=4, seed=i).images
                           for i in (0, 2)])
    assert np.isclose(lines["peer"]["l1"][0], l1(direct, full).mean())
    assert lines["peer"]["peer"] and lines["cached"]["cache"] == LateCache("mean").to_dict()
    assert lines["peer"]["saved_latency"] is None  # timing_batches=0: untimed
    kid = kernel_distance(clip.image_features(direct), clip.image_features(real))
    assert np.isclose(lines["peer"]["kid_x1000"][0], 1000 * kid)
    for r in lines.values():
        assert r["image_clip_floor"] and r["image_clip_ceiling"][0] == pytest.approx(100.0, abs=1e-3)
    assert rows[-1]["key"] == "ddim/4/cached"
    from shapefirst.sweep import per_image

    raw = per_image(tmp_path / "s", lines["peer"])
    assert np.isclose(raw["l1"].mean(), lines["peer"]["l1"][0]) and raw["feat"].shape[0] == len(PROMPTS)


def test_default_configs_and_snippets_run(tiny_pipe):
    from shapefirst.cache import LateCache
    from shapefirst.sweep import default_configs, snippet

    cfgs = default_configs(7.5, stops=(0.5,), steps=(4,), modes=("uncond",), adaptive=(0.9,),
                           caches=(None, LateCache("mean", 2)))
    assert [c.name for c in cfgs] == ["full", "stop=0.5 uncond", "stop=0.5 uncond +mean+deep2",
                                      "adaptive=0.9 uncond", "adaptive=0.9 uncond +mean+deep2"]
    for c in cfgs[1:]:
        row = {"schedule": c.schedule.to_dict(), "cache": c.cache.to_dict() if c.cache else None, "steps": 4}
        code = snippet(row)
        env = {"pipe": tiny_pipe, "prompts": PROMPTS[:1]}
        exec(code.replace("pipe(prompts", "pipe(prompts, generator=__import__('torch').Generator().manual_seed(0), "
                                         "output_type='np'"), env)
        want = generate(tiny_pipe, PROMPTS[:1], c.schedule, steps=4, cache=c.cache).images
        assert np.array_equal(env["images"], want), code


def test_paired_difference_between_rows(tmp_path):
    from shapefirst.sweep import _save_per_image, paired_difference

    a = {"acc/all": np.array([1, 1, 0, 1.0]), "l1": np.zeros(4)}
    b = {"acc/all": np.array([1, 0, 0, 0.0]), "l1": np.zeros(4)}
    for name, per in (("a", a), ("b", b)):
        _save_per_image(tmp_path / f"{name}.safetensors", per)
    ra, rb = {"per_image_file": "a.safetensors"}, {"per_image_file": "b.safetensors"}
    m, lo, hi = paired_difference(tmp_path, ra, rb)
    assert m == pytest.approx(0.5) and lo < 0.5 < hi
    assert paired_difference(tmp_path, ra, ra) == (0.0, 0.0, 0.0)


def test_a_row_of_the_same_name_with_another_configuration_is_refused_by_what_differs(tiny_pipe, tmp_path):
    from shapefirst.errors import ShapefirstError

    one = [Config("mine", GuidanceSchedule(7.5, stop=0.5), "ddim", 2)]
    run_sweep(tiny_pipe, PROMPTS[:2], tmp_path, configs=one, batch=2)
    other = [Config("mine", GuidanceSchedule(7.5, stop=0.5, after="cond"), "ddim", 2)]
    with pytest.raises(ShapefirstError, match=r"another configuration \(other schedule\)"):
        run_sweep(tiny_pipe, PROMPTS[:2], tmp_path, configs=other, batch=2)


def test_sweep_rows_in_noise_level_and_a_fraction_restated_in_noise_level(tiny_pipe):
    """#33 item 1: sweep rows 'stop_sigma=S'; a row's fixed window restated in noise level guides the same calls
    at its own scheduler (bit-identical images) and the noise level is sqrt((1 - a) / a) at the first unguided
    call's timestep (DDIM's integer timesteps: alphas_cumprod read directly)."""
    from shapefirst.sweep import default_configs, in_noise_level, noise_level_window

    cfgs = default_configs(7.5, stops=(0.5,), steps=(4,), modes=("cond",), stop_sigmas=(2.0,))
    assert [c.name for c in cfgs] == ["full", "stop=0.5 cond", "stop_sigma=2 cond"]
    assert cfgs[2].schedule.stop_sigma == 2.0 and cfgs[2].schedule.stop is None
    for sched, start in ((GuidanceSchedule(7.5, stop=0.5, after="cond"), None),
                         (GuidanceSchedule(7.5, start=0.25, stop=0.75, after="cond"), 1)):
        row = {"schedule": sched.to_dict(), "scheduler": "ddim", "steps": 4, "peer": False}
        window = noise_level_window(tiny_pipe, row)
        tiny_pipe.scheduler.set_timesteps(4)
        ts = tiny_pipe.scheduler.timesteps.tolist()
        ac = tiny_pipe.scheduler.alphas_cumprod.double()
        first_unguided = sched.first_unguided_call(4)
        a = float(ac[ts[first_unguided]])
        assert window["calls"] == [start or 0, first_unguided] and window["n_calls"] == 4
        assert window["stop_sigma"] == pytest.approx(((1 - a) / a) ** 0.5, rel=1e-9)
        if start is not None:
            a0 = float(ac[ts[start]])
            assert window["start_sigma"] == pytest.approx(((1 - a0) / a0) ** 0.5, rel=1e-9)
        restated = GuidanceSchedule.from_dict(in_noise_level(row, window)["schedule"])
        assert restated.stop is None and restated.start is None and restated.stop_sigma == window["stop_sigma"]
        want = generate(tiny_pipe, PROMPTS[:2], sched, steps=4).images
        got = generate(tiny_pipe, PROMPTS[:2], restated, steps=4).images
        assert np.array_equal(got, want)
        assert got.tolist() != generate(tiny_pipe, PROMPTS[:2], GuidanceSchedule(7.5), steps=4).images.tolist()
    for no_window in ({"schedule": GuidanceSchedule(7.5).to_dict(), "scheduler": "ddim", "steps": 4},
                      {"schedule": GuidanceSchedule(7.5, stop=0.5).to_dict(), "scheduler": "ddim", "steps": 4,
                       "peer": True}):
        assert noise_level_window(tiny_pipe, no_window) is None


def test_stop_sigmas_option_is_checked():
    from shapefirst import checks
    from shapefirst.errors import ShapefirstError

    assert checks.noise_levels("2.2, 1") == [2.2, 1.0] and checks.noise_levels("") == []
    for bad, what in (("two", "not a comma-separated list"), ("0", "not a noise level > 0"),
                      ("inf", "not a noise level > 0"), ("-1", "not a noise level > 0")):
        with pytest.raises(ShapefirstError, match=what):
            checks.noise_levels(bad)
