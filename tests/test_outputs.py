"""A command writes only into folders it made, removes only its own outputs, and never reuses a result
made with other settings (model weights, seed, guidance, batch, prompts)."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from shapefirst.cli import main
from shapefirst.outputs import MARKER, OutputFolder, model_fingerprint, read_marker


def run(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def strict(text):
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c}")

    return json.loads(text, parse_constant=bad)


# -- generate ------------------------------------------------------------------------------------
def test_generate_refuses_a_users_folder_and_leaves_it_untouched(tiny_folder, tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "image_000.png").write_bytes(b"my holiday")
    code, err = run(["generate", "x", "--model", tiny_folder, "--steps", 2, "--out", out], capsys)
    assert code == 2 and "did not write" in err and "--overwrite" in err, err
    code, err = run(["generate", "x", "--model", tiny_folder, "--steps", 2, "--out", out, "--overwrite"], capsys)
    assert code == 2, err
    assert (out / "image_000.png").read_bytes() == b"my holiday"
    assert sorted(p.name for p in out.iterdir()) == ["image_000.png"]


def test_generate_overwrite_replaces_only_its_own_files(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["generate", "a", "b", "c", "--model", tiny_folder, "--steps", 2, "--out", out], capsys)[0] == 0
    assert (out / "image_002.png").exists()
    code, err = run(["generate", "a", "--model", tiny_folder, "--steps", 2, "--out", out], capsys)
    assert code == 2 and "--overwrite" in err, err
    (out / "notes.txt").write_text("mine")  # a user's file added later is not shapefirst's to delete
    code, err = run(["generate", "a", "--model", tiny_folder, "--steps", 2, "--out", out, "--overwrite"], capsys)
    assert code == 0, err
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["images"] == ["image_000.png"]
    assert not (out / "image_001.png").exists() and not (out / "image_002.png").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert read_marker(out)["command"] == "generate"


def test_many_images_run_in_batches_with_the_same_seeds(tiny_pipe):
    from shapefirst.generate import generate
    from shapefirst.guidance import GuidanceSchedule

    whole = generate(tiny_pipe, ["a red circle"], GuidanceSchedule(3.0), steps=3, images_per_prompt=5, seed=4)
    parts = generate(tiny_pipe, ["a red circle"], GuidanceSchedule(3.0), steps=3, images_per_prompt=5, seed=4, batch=2)
    assert parts.seeds == whole.seeds == [4, 5, 6, 7, 8]
    assert np.abs(parts.images - whole.images).max() <= 1 / 255
    assert parts.evaluations_per_image == whole.evaluations_per_image


# -- train ---------------------------------------------------------------------------------------
def test_train_never_deletes_a_users_dest_or_leaves_tmp(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "thesis.tex").write_text("precious")
    code, err = run(["train", "--tiny", "--out", tmp_path / "work", "--dest", dest], capsys)
    assert code == 2 and "did not write" in err, err
    assert (dest / "thesis.tex").read_text() == "precious"
    code, err = run(["train", "--tiny", "--out", tmp_path / "work", "--dest", "."], capsys)
    assert code == 2, err
    (tmp_path / "a_file").write_text("x")
    code, err = run(["train", "--tiny", "--out", tmp_path / "work2", "--dest", tmp_path / "a_file"], capsys)
    assert code == 2 and "is a file" in err, err
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    assert not (tmp_path / "work").exists() and not (tmp_path / "work2").exists()


# -- report --------------------------------------------------------------------------------------
def test_report_page_rebuild_keeps_a_users_page_folder(tmp_path, capsys):
    rep = tmp_path / "rep"
    (rep / "results").mkdir(parents=True)
    OutputFolder(rep, "report").claim(["results"])
    assert run(["report", "--page-only", "--out", rep], capsys)[0] == 0
    first = [p for p in rep.glob("page-*")]
    (rep / "page-holiday-photos").mkdir()
    (rep / "page-holiday-photos" / "beach.jpg").write_bytes(b"sun")
    assert run(["report", "--page-only", "--out", rep], capsys)[0] == 0
    assert (rep / "page-holiday-photos" / "beach.jpg").read_bytes() == b"sun"
    assert not any(p.exists() for p in first)  # the command's own old page is replaced
    assert len([p for p in rep.glob("page-2*")]) == 1


# -- analyses ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_pipe(tmp_path_factory):
    from shapefirst.tiny import tiny_sd_pipeline

    return tiny_sd_pipeline(seed=1, folder=tmp_path_factory.mktemp("other_tok"))


def test_fingerprint_tells_models_apart_and_is_stable(tiny_pipe, other_pipe):
    assert model_fingerprint(tiny_pipe) == model_fingerprint(tiny_pipe)
    assert model_fingerprint(tiny_pipe) != model_fingerprint(other_pipe)


def test_analysis_of_another_model_is_never_reused(tiny_pipe, other_pipe, tmp_path):
    from shapefirst.errors import ShapefirstError
    from shapefirst.experiments import run_analysis

    kw = dict(n=2, steps=3, prompts=["a red circle", "a blue square"], world=False, batch=2)
    first = run_analysis("frequency", tiny_pipe, tmp_path, **kw)
    again = run_analysis("frequency", tiny_pipe, tmp_path, **kw)  # same key: reused
    assert again.data == first.data
    with pytest.raises(ShapefirstError, match="other settings"):
        run_analysis("frequency", other_pipe, tmp_path, **kw)
    with pytest.raises(ShapefirstError, match="other settings"):
        run_analysis("frequency", tiny_pipe, tmp_path, **{**kw, "seed": 5})
    redo = run_analysis("frequency", other_pipe, tmp_path, overwrite=True, **kw)
    import torch

    assert any(not torch.equal(redo.arrays[k], first.arrays[k]) for k in first.arrays)  # recomputed


def test_analyze_checks_the_output_before_loading_or_computing(tiny_folder, capsys, monkeypatch):
    import shapefirst.models as models

    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    code, err = run(["analyze", "frequency", "--model", tiny_folder, "--out", "/proc/self/shapefirst-x",
                     "--prompts", __file__], capsys)
    assert code == 2 and "cannot create or write" in err, err


# -- sweep ---------------------------------------------------------------------------------------
def _sweep(pipe, out, **kw):
    from shapefirst.sweep import default_configs, run_sweep

    args = dict(configs=default_configs(kw.pop("scale", 3.0), stops=(0.5,), steps=(2,), modes=("uncond",)),
                batch=kw.pop("batch", 2), timing_batches=0)
    return run_sweep(pipe, ["a red circle", "a blue square"], out, **{**args, **kw})


def test_sweep_rerun_with_other_settings_is_refused_or_recomputed(tiny_pipe, tmp_path):
    from shapefirst.errors import ShapefirstError

    rows = _sweep(tiny_pipe, tmp_path)
    assert [r["schedule"]["scale"] for r in rows] == [3.0, 3.0]
    assert _sweep(tiny_pipe, tmp_path) == rows  # same settings: resumed, nothing recomputed
    for change in ({"seed": 1}, {"batch": 1}, {"scale": 7.5}):
        with pytest.raises(ShapefirstError, match="other|another"):
            _sweep(tiny_pipe, tmp_path, **change)
    redo = _sweep(tiny_pipe, tmp_path, scale=7.5, overwrite=True)
    assert [r["schedule"]["scale"] for r in redo] == [7.5, 7.5]
    lines = [strict(x) for x in (tmp_path / "sweep.jsonl").read_text().splitlines()]
    assert [r["schedule"]["scale"] for r in lines] == [7.5, 7.5]  # no row of the old scale is left
    assert not list(tmp_path.glob("ref_*w3_*"))


def test_sweep_stops_are_deduplicated_and_empty_lists_refused(tiny_folder, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "s"
    code, err = run(["sweep", "--model", tiny_folder, "--prompts", prompts, "--n", 2, "--batch", 2, "--steps", 2,
                     "--stops", "0.5,0.5", "--schedulers", "ddim", "--timing-batches", 0, "--out", out], capsys)
    assert code == 0, err
    keys = [strict(x)["key"] for x in (out / "sweep.jsonl").read_text().splitlines()]
    assert keys == ["ddim/2/full", "ddim/2/stop=0.5 uncond", "ddim/2/stop=0.5 cond"]
    code, err = run(["sweep", "--model", tiny_folder, "--prompts", prompts, "--schedulers", "",
                     "--out", tmp_path / "e"],
                    capsys)
    assert code == 2 and "--schedulers is empty" in err, err


# -- strict JSON ---------------------------------------------------------------------------------
def test_every_json_file_the_commands_write_is_strict(tiny_folder, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    assert run(["generate", "x", "--model", tiny_folder, "--steps", 2, "--trace",
                "--out", tmp_path / "g"], capsys)[0] == 0
    for name in ("frequency", "attention", "token-ablation"):
        code, err = run(["analyze", name, "--model", tiny_folder, "--steps", 2, "--n", 2, "--prompts", prompts,
                         "--out", tmp_path / "a"], capsys)
        assert code == 0, err
    assert run(["sweep", "--model", tiny_folder, "--prompts", prompts, "--n", 2, "--batch", 2, "--steps", 2,
                "--stops", "0.5", "--schedulers", "ddim", "--timing-batches", 0,
                "--out", tmp_path / "s"], capsys)[0] == 0
    files = [p for p in tmp_path.rglob("*") if p.suffix in (".json", ".jsonl")]
    assert len(files) >= 6
    for p in files:
        for line in ([p.read_text()] if p.suffix == ".json" else p.read_text().splitlines()):
            strict(line)


def test_nan_becomes_null_with_a_reason():
    from shapefirst.results import strict_dumps

    d = strict(strict_dumps({"a": float("nan"), "b": [1.0, math.inf], "c": 2}))
    assert d["a"] is None and d["b"] == [1.0, None] and d["c"] == 2
    assert set(d["null_reasons"]) == {"a", "b[1]"}


def test_fd_with_too_few_images_is_null_with_its_reason():
    from shapefirst.sweep import distribution_distances

    rng = np.random.default_rng(0)
    d = distribution_distances(rng.normal(size=(8, 16)).astype(np.float32),
                               rng.normal(size=(8, 16)).astype(np.float32))
    assert d["fd_clip"] is None and "feature dimensions" in d["fd_clip_reason"]


# -- the marker rules themselves -----------------------------------------------------------------
def test_overwrite_removes_only_listed_entries(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.png").write_bytes(b"1")
    (out / "user.txt").write_text("u")
    OutputFolder(out, "sweep", {"seed": 0}).claim(["mine.png", "../escape"])
    (tmp_path / "escape").write_text("outside")
    OutputFolder(out, "sweep", {"seed": 1}, overwrite=True).check()
    assert sorted(p.name for p in out.iterdir()) == ["user.txt"]
    assert (tmp_path / "escape").exists() and not (out / MARKER).exists()


def test_png_written_by_generate_is_readable(tiny_folder, tmp_path, capsys):
    out = tmp_path / "g"
    assert run(["generate", "x", "--model", tiny_folder, "--steps", 2, "--out", out], capsys)[0] == 0
    assert Image.open(out / "image_000.png").size[0] > 0


def test_written_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    from shapefirst.results import atomic_write_text

    p = atomic_write_text(tmp_path / "a.json", "{}")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask


def test_a_users_file_inside_an_owned_folder_survives_overwrite(tiny_pipe, tmp_path):
    from shapefirst.experiments import run_analysis

    _sweep(tiny_pipe, tmp_path / "s")
    (tmp_path / "s" / "notes.txt").write_text("mine")
    _sweep(tiny_pipe, tmp_path / "s")  # a resume claims only the sweep's own files
    _sweep(tiny_pipe, tmp_path / "s", scale=7.5, overwrite=True)
    assert (tmp_path / "s" / "notes.txt").read_text() == "mine"
    kw = dict(n=2, steps=2, prompts=["a red circle", "a blue square"], world=False, batch=2)
    run_analysis("frequency", tiny_pipe, tmp_path / "a", **kw)
    (tmp_path / "a" / "frequency" / "notes.txt").write_text("mine")
    run_analysis("frequency", tiny_pipe, tmp_path / "a", **kw)
    run_analysis("frequency", tiny_pipe, tmp_path / "a", overwrite=True, **{**kw, "seed": 3})
    assert (tmp_path / "a" / "frequency" / "notes.txt").read_text() == "mine"


def test_a_failed_overwrite_keeps_the_earlier_output_and_leaves_no_staging_folder(tiny_pipe, tmp_path, monkeypatch):
    from shapefirst.generate import GenerationResult, generate
    from shapefirst.guidance import GuidanceSchedule

    res = generate(tiny_pipe, ["a red circle"], GuidanceSchedule(7.5), steps=2, seed=0)
    out = res.save(tmp_path / "g", key={"seed": 0})
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(self, stage, vae, extra):
        (stage / "image_000.png").write_bytes(b"half")
        raise RuntimeError("decode failed")

    monkeypatch.setattr(GenerationResult, "_write", broken)
    with pytest.raises(RuntimeError, match="decode failed"):
        res.save(out, key={"seed": 1}, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_fingerprint_after_a_scheduler_swap_is_the_same_in_every_process():
    """set_scheduler builds the scheduler with from_config, whose `_use_default_values` lists a set: its order
    follows each process's string hashing. A sweep resumed in a new process must still find its folder's key."""
    import os
    import subprocess
    import sys

    code = ("from shapefirst.tiny import tiny_sd_pipeline\nfrom shapefirst.models import set_scheduler\n"
            "from shapefirst.outputs import model_fingerprint\nimport tempfile\n"
            "pipe = tiny_sd_pipeline(folder=tempfile.mkdtemp())\nset_scheduler(pipe, 'dpm++')\n"
            "print(model_fingerprint(pipe), sorted(pipe.scheduler.config['_use_default_values']) != "
            "list(pipe.scheduler.config['_use_default_values']))")
    got = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.split()
           for seed in (1, 2, 3, 4)]
    assert len({g[0] for g in got}) == 1
    assert "True" in {g[1] for g in got}  # the listed order did differ between the processes
