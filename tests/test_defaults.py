"""Every analysis and the report with their defaults, as a user first runs them. `analyze NAME` with
its defaults on a tiny in-code pipeline, and `shapefirst report` with its defaults on the embedded
model (the shipped shapes world), which runs every analysis on it (an `analyze` per analysis on the
embedded model as well would repeat that at 2.5x the steps: 13 CI minutes on 2 cores). Each writes
results.json (strict JSON) and every figure its plot function draws, with no warning and exit code 0."""
import json
from pathlib import Path

import pytest

from shapefirst.cli import main
from shapefirst.experiments import ANALYSES, get
from shapefirst.results import Result


def strict(path: Path):
    def bad(c):
        raise ValueError(c)

    return json.loads(path.read_text(), parse_constant=bad)


def check_folder(folder: Path, name: str, tmp_path: Path):
    data = strict(folder / "results.json")
    assert data["kind"]
    redraw = tmp_path / "redraw"
    redraw.mkdir(parents=True)
    get(name).plot(Result.load(folder), redraw)  # the figures the plot function draws from the saved result
    want = sorted(p.name for p in redraw.glob("*.png"))
    assert want, f"{name} draws no figure"
    assert sorted(p.name for p in folder.glob("*.png")) == want


def run(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    from shapefirst.tiny import tiny_clip_folder

    root = tmp_path_factory.mktemp("defaults")
    (root / "prompts.txt").write_text("a red circle\na blue square\na green cross\n")
    (root / "pairs.txt").write_text("a red circle || a blue square\na green cross || a red circle\n")
    return root, tiny_clip_folder(root / "clip")


@pytest.mark.parametrize("name", ANALYSES)
def test_analysis_with_defaults_on_a_tiny_pipeline(name, tiny_folder, tiny_inputs, tmp_path, capsys):
    root, clip = tiny_inputs
    extra = {"stages": ["--prompts", root / "prompts.txt", "--clip", clip],
             "eos-swap": ["--pairs", root / "pairs.txt"]}.get(name, ["--prompts", root / "prompts.txt"])
    code, err = run(["analyze", name, "--model", tiny_folder, "--out", tmp_path / "a", *extra], capsys)
    assert code == 0, err
    assert "warning" not in err and "Traceback" not in err, err
    check_folder(tmp_path / "a" / name, name, tmp_path)


@pytest.mark.heavy
def test_report_with_defaults_on_the_embedded_model(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run(["report"], capsys)
    assert code == 0, err
    assert "warning" not in err and "Traceback" not in err, err
    out = tmp_path / "shapefirst-report"
    html = (out / "index.html").read_text()
    for name in ANALYSES:
        check_folder(out / "results" / name, name, tmp_path / name)
        assert f'id="{name}"' in html
    assert "attention sink here" in html


def test_a_figure_that_fails_keeps_the_result_and_warns_once(tiny_folder, tiny_inputs, tmp_path, capsys, monkeypatch):
    import shapefirst.experiments.frequency as freq

    def broken(result, folder):
        raise ValueError("'yerr' must not contain negative values")

    import dataclasses

    monkeypatch.setattr(freq, "ANALYSIS", dataclasses.replace(freq.ANALYSIS, plot=broken))
    root, _ = tiny_inputs
    code, err = run(["analyze", "frequency", "--model", tiny_folder, "--steps", 3, "--n", 2,
                     "--prompts", root / "prompts.txt", "--out", tmp_path / "a"], capsys)
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(lines) == 1 and "could not be drawn" in lines[0] and "results.json is saved" in lines[0], err
    assert (tmp_path / "a" / "frequency" / "results.json").exists()
    monkeypatch.undo()  # the rerun redraws from the saved result, computing nothing
    code, err = run(["analyze", "frequency", "--model", tiny_folder, "--steps", 3, "--n", 2,
                     "--prompts", root / "prompts.txt", "--out", tmp_path / "a"], capsys)
    assert code == 0 and "warning" not in err, err
    assert list((tmp_path / "a" / "frequency").glob("*.png"))


def test_yerr_is_clipped_at_the_estimate():
    from shapefirst.results import yerr

    e = yerr([1.0, 0.5], [0.98, 0.6], [1.0 - 1e-12, 0.7])  # a share of 100%; an interval above its estimate
    assert (e >= 0).all() and e.shape == (2, 2)


@pytest.mark.heavy
def test_report_with_defaults_on_a_tiny_pipeline(tiny_folder, tiny_inputs, tmp_path, capsys):
    root, clip = tiny_inputs
    out = tmp_path / "rep"
    code, err = run(["report", "--model", tiny_folder, "--prompts", root / "prompts.txt",
                     "--pairs", root / "pairs.txt",
                     "--clip", clip, "--out", out], capsys)
    assert code == 0, err
    assert "warning" not in err and "Traceback" not in err, err
    html = (out / "index.html").read_text()
    for name in ANALYSES:
        check_folder(out / "results" / name, name, tmp_path / name)
        assert f'id="{name}"' in html
