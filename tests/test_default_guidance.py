"""The embedded model's recommended guidance scale (recipe.json in its folder) is the default of every
command that runs it; an explicit --guidance wins; a user's model keeps diffusers' 7.5."""
import json

import pytest

from shapefirst.cli import main
from shapefirst.models import DIFFUSERS_GUIDANCE, default_guidance, embedded_model_path, recommended


def run(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_the_recommended_scale_is_read_from_the_model_folder():
    rec = json.loads((embedded_model_path() / "recipe.json").read_text()).get("recommended")
    assert rec and rec["guidance_scale"] == recommended("embedded")["guidance_scale"], rec
    assert rec["rule"] and rec["guidance_scale"] != DIFFUSERS_GUIDANCE
    assert default_guidance("embedded") == rec["guidance_scale"]
    assert default_guidance("/some/other/model") == DIFFUSERS_GUIDANCE == 7.5


@pytest.fixture
def scale():
    return default_guidance("embedded")


def test_generate_defaults_to_it_and_records_it(scale, tmp_path, capsys):
    assert run(["generate", "a red circle", "--steps", 2, "--out", tmp_path / "g"], capsys)[0] == 0
    assert json.loads((tmp_path / "g" / "run.json").read_text())["guidance"] == scale
    assert run(["generate", "a red circle", "--steps", 2, "--guidance", 5.5, "--out", tmp_path / "h"], capsys)[0] == 0
    assert json.loads((tmp_path / "h" / "run.json").read_text())["guidance"] == 5.5


def test_a_users_model_keeps_7_5(tiny_folder, tmp_path, capsys):
    assert run(["generate", "x", "--model", tiny_folder, "--steps", 2, "--out", tmp_path / "g"], capsys)[0] == 0
    assert json.loads((tmp_path / "g" / "run.json").read_text())["guidance"] == 7.5


def test_analyze_defaults_to_it(scale, tmp_path, capsys):
    assert run(["analyze", "frequency", "--n", 1, "--steps", 2, "--out", tmp_path / "a"], capsys)[0] == 0
    schedule = json.loads((tmp_path / "a" / "frequency" / "results.json").read_text())["settings"]["schedule"]
    assert schedule["scale"] == scale
    assert run(["analyze", "frequency", "--n", 1, "--steps", 2, "--guidance", 2.5,
                "--out", tmp_path / "b"], capsys)[0] == 0
    assert (json.loads((tmp_path / "b" / "frequency" / "results.json").read_text())["settings"]["schedule"]["scale"]
            == 2.5)


def _rows(folder):
    return [json.loads(x) for x in (folder / "sweep.jsonl").read_text().splitlines()]


def test_sweep_and_calibrate_default_to_it(scale, tmp_path, capsys):
    common = ["--n", 2, "--batch", 2, "--steps", 2, "--stops", "0.5", "--timing-batches", 0]
    assert run(["sweep", *common, "--schedulers", "ddim", "--out", tmp_path / "s"], capsys)[0] == 0
    assert {r["schedule"]["scale"] for r in _rows(tmp_path / "s")} == {scale}
    assert run(["calibrate", *common, "--modes", "uncond", "--out", tmp_path / "c"], capsys)[0] == 0
    assert {r["schedule"]["scale"] for r in _rows(tmp_path / "c")} == {scale}
    assert run(["sweep", *common, "--schedulers", "ddim", "--guidance", 4, "--out", tmp_path / "t"], capsys)[0] == 0
    assert {r["schedule"]["scale"] for r in _rows(tmp_path / "t")} == {4.0}


def test_report_defaults_to_it(scale, tmp_path, monkeypatch):
    from shapefirst.models import load_pipeline
    from shapefirst.report import BUDGETS, run_report

    monkeypatch.setitem(BUDGETS, "quick", {**BUDGETS["quick"], "n": 1, "steps": 2, "film": 1, "sweep_n": 2,
                                           "batch": 2, "stops": (0.5,)})
    index = run_report(load_pipeline("embedded"), tmp_path / "r", "quick", world=True, clip=None)
    assert index.exists()
    assert json.loads((tmp_path / "r" / "results" / "generate" / "run.json").read_text())["guidance"] == scale
    assert {r["schedule"]["scale"] for r in _rows(tmp_path / "r" / "results" / "sweep")} == {scale}


def test_the_library_run_analysis_defaults_to_it_too(scale, tiny_pipe, tmp_path):
    from shapefirst.experiments import run_analysis
    from shapefirst.models import load_pipeline

    res = run_analysis("frequency", load_pipeline("embedded"), tmp_path / "a", n=1, steps=2)
    assert res.data["settings"]["schedule"]["scale"] == scale
    mine = run_analysis("frequency", tiny_pipe, tmp_path / "b", n=1, steps=2, prompts=["a red circle"], world=False)
    assert mine.data["settings"]["schedule"]["scale"] == 7.5
