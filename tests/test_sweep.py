"""The sweep: quality numbers equal direct generate runs, a rerun skips finished configurations, calibrate's rule."""
import numpy as np

from shapefirst.experiments.sweep import Config, calibrate, passes, run_sweep
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
    cut = np.concatenate([generate(tiny_pipe, PROMPTS[i:i + 2], GuidanceSchedule(7.5, stop=0.5), steps=4, seed=i).images
                          for i in (0, 2)])
    r = rows[1]
    assert np.isclose(r["l1"][0], l1(cut, full).mean())
    assert np.isclose(r["psnr"][0], np.minimum(psnr(cut, full), 100).mean())
    assert r["evaluations_per_image"] == 2 * 2 + 2 and np.isclose(r["evaluation_ratio"], 6 / 8)
    assert rows[0]["l1"][0] == 0.0  # full guidance against itself
    lines = read_jsonl(tmp_path / "sweep.jsonl")
    summary = (tmp_path / "sweep.csv").read_text()

    import shapefirst.experiments.sweep as sw

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
