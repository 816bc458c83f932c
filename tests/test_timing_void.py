"""Timings that know when they are void (#33 item 5): full guidance timed against itself is the sweep's noise; a
saved latency beyond what that noise allows (or on a busy machine) is flagged in the table, the figure and the
report, and calibrate ranks such rows by their saved evaluations."""
import json

from shapefirst.report.page import _sections
from shapefirst.sweep import calibrate, saving, write_summary
from shapefirst.timing import VOID_NOISE, mark_void


def row(name, saved, evals, ratios=None, acc=0.9):
    return {"key": f"ddim/50/{name}", "name": name, "saved_latency": saved, "time_ratios": ratios or [1 - saved],
            "evaluation_ratio": evals, "load": 3.5, "n": 8, "l1": [0.01, 0.0, 0.02], "psnr": [30.0, 29.0, 31.0],
            "accuracy": {"all": acc}, "peer": False, "schedule": {"scale": 3.0}, "steps": 50, "cache": None}


def busy():  # what a report on a busy machine drew: full against itself -39%, a stop at -213%
    return [row("full", -0.39, 1.0, [1.39]), row("stop=0.5 cond", -2.13, 0.75), row("stop=0.75 cond", -1.07, 0.875)]


def test_a_busy_machine_makes_every_timing_void_and_says_why():
    rows = busy()
    lines = mark_void(rows)
    assert all(r["timing_void"] for r in rows) and len(lines) == 2
    assert "differs by 39%" in lines[0] and "load 3.50" in lines[0] and "\n" not in lines[0]
    assert saving(rows[1]) == (0.25, "evaluations")  # not the void -213%


def test_a_quiet_machine_keeps_its_timings_and_flags_an_impossible_one():
    rows = [row("full", 0.0, 1.0, [1.01, 0.99]), row("stop=0.5 cond", 0.24, 0.75), row("odd", -0.5, 0.75)]
    mark_void(rows)
    assert abs(rows[0]["timing_noise"] - 0.01) < 1e-9 and 0.01 < VOID_NOISE
    assert not rows[1]["timing_void"] and saving(rows[1]) == (0.24, "latency")
    assert rows[2]["timing_void"]  # claims to be 50% slower than full guidance


def test_calibrate_does_not_pick_by_a_void_timing(monkeypatch):
    import shapefirst.sweep as sw

    monkeypatch.setattr(sw, "passes", lambda r, tol: (True, "ok"))
    rows = [row("full", 0.0, 1.0, [1.4]), row("fast on paper", 0.9, 0.95), row("fewer evaluations", 0.1, 0.6)]
    best, _ = calibrate(rows)
    assert best["name"] == "fewer evaluations"


def test_the_table_the_figure_and_the_report_say_so(tmp_path):
    rows = busy()
    write_summary(rows, tmp_path)
    csv = (tmp_path / "sweep.csv").read_text()
    assert csv.splitlines()[0].endswith(",timing") and "VOID (full vs itself 39.0%, load 3.50)" in csv
    res = tmp_path / "results"
    (res / "sweep").mkdir(parents=True)
    (res / "sweep" / "sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sec = next(s for s in _sections(res) if s["id"] == "sweep")
    assert "These timings are VOID" in sec["caption"] and "(void)" in sec["table"][2][1]
    quiet = [row("full", 0.0, 1.0, [1.01]), row("stop=0.5 cond", 0.24, 0.75)]
    (res / "sweep" / "sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in quiet))
    sec = next(s for s in _sections(res) if s["id"] == "sweep")
    assert "VOID" not in sec["caption"] and "(void)" not in sec["table"][2][1]


def test_a_timing_benchmark_refuses_a_busy_machine_or_flags_it():
    import pytest

    from shapefirst.errors import ShapefirstError
    from shapefirst.timing import check_alone, pin_threads

    assert check_alone(load=0.4, cores=2) is None
    with pytest.raises(ShapefirstError, match="busy .*load average 3.00 on 2 cores.*--allow-busy"):
        check_alone(load=3.0, cores=2)
    assert "busy" in check_alone(allow_busy=True, load=3.0, cores=2)
    import torch

    before = torch.get_num_threads()
    try:
        assert pin_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
