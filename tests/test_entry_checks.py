"""Checks at the entry points: small samples skip the metrics that need more (with the reason, never a
traceback), empty output paths are refused, generate()'s arguments are checked at the call, and odd CLI
inputs found by fuzzing end in one line."""
import json

import numpy as np
import pytest
import torch

from shapefirst.cli import main
from shapefirst.errors import ShapefirstError
from shapefirst.generate import generate
from shapefirst.guidance import GuidanceSchedule
from shapefirst.outputs import MARKER, read_marker
from shapefirst.results import read_jsonl


def run(argv, capsys):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.err, cap.out


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory, tiny_pipe):
    """A shapes-world model folder (recipe.json beside a world CLIP): the tiny pipeline and a tiny CLIP, so the
    CLI's sweep gets the world's prompts, judge targets, CLIP scores and real renders (KID/FD)."""
    from shapefirst.tiny import tiny_clip_folder

    folder = tmp_path_factory.mktemp("tiny_world") / "world"
    tiny_pipe.save_pretrained(folder, safe_serialization=True)
    tiny_clip_folder(folder / "clip")
    (folder / "recipe.json").write_text("{}")
    return folder


# -- 1. metrics that need a minimum sample --------------------------------------------------------
def test_sweep_of_one_prompt_skips_small_sample_metrics_with_reasons_and_finishes(tiny_world, tmp_path, capsys):
    out = tmp_path / "sw"
    code, err, text = run(["sweep", "--model", tiny_world, "--n", 1, "--steps", 2, "--schedulers", "ddim",
                           "--timing-batches", 0, "--stops", 0.5, "--out", out], capsys)
    assert code == 0, err
    assert "Traceback" not in err
    for why in ("kid_x1000 skipped: KID needs n >= 4", "fd_clip skipped: FD needs more images",
                "image_clip_floor skipped: the Image-CLIP seed floor needs n >= 2"):
        assert f"warning: {why}" in err
    rows = read_jsonl(out / "sweep.jsonl")
    assert [r["name"] for r in rows] == ["full", "stop=0.5 uncond", "stop=0.5 cond"]
    for r in rows:
        assert set(r["skipped"]) == {"kid_x1000", "fd_clip", "image_clip_floor", "image_clip_ceiling"}
        assert "kid_x1000" not in r and "image_clip_floor" not in r and r["fd_clip"] is None
        assert "image_clip" in r and "accuracy" in r  # what n=1 allows is still measured
    assert "KID needs n >= 4" in (out / "sweep.csv").read_text()
    assert "skipped: " in text
    marker = read_marker(out)
    assert marker is not None and {"sweep.jsonl", "sweep.csv", "pareto.png", "per_image"} <= set(marker["entries"])
    assert all((out / e).exists() for e in marker["entries"])


def test_kid_needs_four_per_side_fd_more_than_the_dimensions():
    from shapefirst.sweep import distribution_distances

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(8, 4)).astype(np.float32)
    for n in (1, 3):
        d = distribution_distances(feats[:n], feats[4:4 + n])
        assert "kid_x1000" not in d and "KID needs n >= 4" in d["skipped"]["kid_x1000"]
        assert d["fd_clip"] is None and "fd_clip" in d["skipped"]
    d = distribution_distances(feats[:4], feats[4:])
    assert len(d["kid_x1000"]) == 3 and "kid_x1000" not in d["skipped"]
    d = distribution_distances(rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(6, 4)).astype(np.float32))
    assert d["skipped"] == {} and d["fd_clip"] is not None


@pytest.mark.parametrize("name", ["kernel_distance", "frechet_distance"])
def test_distances_refuse_one_sample_per_side(name):
    import shapefirst.metrics as metrics

    x = torch.randn(5, 3)
    with pytest.raises(ShapefirstError, match="at least 2 feature vectors per side"):
        getattr(metrics, name)(x[:1], x)


def test_calibrate_rule_without_an_interval_fails_the_row_instead_of_raising():
    from shapefirst.sweep import passes

    row = {"n": 1, "psnr": [40.0, None, None], "accuracy_delta_vs_full": {"color": [0.0, None, None]}}
    ok, why = passes(row)
    assert not ok and "no confidence interval at n=1" in why


class _FewImagesFid:
    """A stand-in for shapefirst.fid.Fid holding 5 real images; compute() refuses n < 2 as the real one does."""

    def __init__(self):
        self.n_real, self.n_fake = 5, 0

    def reset_fake(self):
        self.n_fake = 0

    def update(self, images, real):
        self.n_fake += len(images)

    def compute(self):
        if self.n_fake < 2:
            raise ShapefirstError("FID needs at least 2 images per side")
        return 1.0


def test_fid_of_one_generated_image_is_skipped_with_its_reason(tiny_pipe, tmp_path):
    from shapefirst.sweep import Config, run_sweep

    cfgs = [Config("full", GuidanceSchedule(7.5), "ddim", 2)]
    with pytest.warns(UserWarning, match="fid skipped: FID needs n >= 2"):
        rows = run_sweep(tiny_pipe, ["a red circle"], tmp_path / "o", configs=cfgs, timing_batches=0,
                         fid=_FewImagesFid())
    assert "fid" not in rows[0] and "FID needs n >= 2" in rows[0]["skipped"]["fid"]
    rows = run_sweep(tiny_pipe, ["a red circle", "a blue square"], tmp_path / "o2", configs=cfgs, timing_batches=0,
                     fid=_FewImagesFid())
    assert rows[0]["fid"] == 1.0 and rows[0]["skipped"] == {}


def test_a_failed_sweep_lists_what_it_wrote_so_overwrite_removes_it(tiny_pipe, tmp_path):
    """A failure mid-sweep leaves the marker listing the cached reference images, so a rerun with other settings
    and --overwrite removes them (a stale reference of another model must never be reused)."""
    from shapefirst.sweep import Config, run_sweep

    def boom(pipe, prompts, seed, steps, scheduler):
        raise RuntimeError("peer failed")

    out = tmp_path / "o"
    peer = Config("peer", GuidanceSchedule(7.5), "ddim", 2, run=boom)  # fails after the reference is cached
    with pytest.raises(RuntimeError, match="peer failed"):
        run_sweep(tiny_pipe, ["a red circle"], out, configs=[peer], timing_batches=0)
    assert read_marker(out)["entries"] == ["ref_ddim_2_w7.5_0.safetensors"]
    full = Config("full", GuidanceSchedule(7.5), "ddim", 2)
    run_sweep(tiny_pipe, ["a red circle"], out, configs=[full], timing_batches=0, seed=5, overwrite=True)
    assert json.loads((out / MARKER).read_text())["key"]["seed"] == 5
    from safetensors.torch import load_file

    ref = load_file(str(out / "ref_ddim_2_w7.5_0.safetensors"))["images"].numpy()
    assert np.array_equal(ref, generate(tiny_pipe, ["a red circle"], GuidanceSchedule(7.5), steps=2, seed=5).images)


# -- 2. empty output paths ----------------------------------------------------------------------------
EMPTY_OUT = [["generate", "a red circle"], ["analyze", "frequency"], ["report"], ["sweep"], ["calibrate"],
             ["train", "--tiny"]]


@pytest.mark.parametrize("value", ["", "   "], ids=["empty", "blank"])
@pytest.mark.parametrize("cmd", EMPTY_OUT, ids=lambda c: c[0])
def test_empty_out_is_refused_before_any_model_loads(cmd, value, tmp_path, capsys, monkeypatch):
    import shapefirst.models as models

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_pipeline", no_load)
    monkeypatch.chdir(tmp_path)
    code, err, _ = run(cmd + ["--out", value], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: --out") and "pass a folder path" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, flag", [(["train", "--tiny", "--dest", " "], "--dest"),
                                        (["train", "--tiny", "--base", ""], "--base")])
def test_empty_train_paths_are_refused(argv, flag, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err, _ = run(argv + ["--out", tmp_path / "work"], capsys)
    assert code == 2 and err.startswith(f"error: {flag}") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_saving_a_result_to_an_empty_path_is_refused(tiny_pipe, tmp_path, monkeypatch):
    res = generate(tiny_pipe, ["a red circle"], steps=2)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ShapefirstError, match="out '' is an empty path"):
        res.save("")
    assert list(tmp_path.iterdir()) == []


# -- 3. generate()'s arguments, checked at the call --------------------------------------------------
BAD_ARGS = [
    (dict(batch=0), "batch=0"), (dict(batch=-2), "batch=-2"), (dict(batch="2"), "batch='2'"),
    (dict(batch=1.5), "batch=1.5"),
    (dict(images_per_prompt=0), "images_per_prompt=0"), (dict(images_per_prompt="2"), "images_per_prompt='2'"),
    (dict(steps="4"), "steps='4'"), (dict(steps=0), "steps=0"), (dict(steps=2.5), "steps=2.5"),
    (dict(steps=True), "steps=True"), (dict(steps=1000), "steps 1000 equals the model's 1000"),
    (dict(seed=-1), "seed=-1"), (dict(seed="0"), "seed='0'"), (dict(seed=0.5), "seed=0.5"),
    (dict(seed=2**63), "seed 9223372036854775808 is outside"),
    (dict(schedule=7.5), "GuidanceSchedule(7.5)"), (dict(schedule="7.5"), "schedule='7.5'"),
    (dict(cache="mean"), "cache='mean' is not a LateCache"), (dict(trace="yes"), "trace='yes'"),
    (dict(progress=1), "progress=1"), (dict(scheduler=5), "scheduler=5"),
    (dict(negative_prompt=5), "negative_prompt=5"), (dict(negative_prompt=["a", "b"]), "negative_prompt holds 2"),
]


@pytest.mark.parametrize("kw, msg", BAD_ARGS, ids=[f"{k}={v!r}" for kw, _ in BAD_ARGS for k, v in kw.items()])
def test_generate_refuses_a_wrong_argument_at_the_call(tiny_pipe, kw, msg, monkeypatch):
    def no_call(*a, **k):
        raise AssertionError("the pipeline was called")

    monkeypatch.setattr(type(tiny_pipe), "__call__", no_call)
    with pytest.raises(ShapefirstError) as e:
        generate(tiny_pipe, ["a red circle"], **kw)
    assert msg in str(e.value) and "; pass" in str(e.value)


@pytest.mark.parametrize("prompts", [5, b"a red circle", {"a red circle"}])
def test_generate_refuses_prompts_that_are_not_text(tiny_pipe, prompts):
    with pytest.raises(ShapefirstError, match="are not text"):
        generate(tiny_pipe, prompts, steps=2)


def test_generate_refuses_something_that_is_not_a_pipeline():
    with pytest.raises(ShapefirstError, match="is not a diffusers pipeline"):
        generate(None, ["a red circle"])


# -- 5. odd CLI input found by fuzzing ----------------------------------------------------------------
def test_steps_equal_to_the_training_timesteps_is_one_line(tiny_folder, tmp_path, capsys):
    """DDIM/PNDM/DPM++/UniPC at 1000 steps of a 1000-timestep model ask for t=1000: an IndexError inside diffusers."""
    for argv in (["generate", "x", "--model", tiny_folder, "--steps", 1000, "--out", tmp_path / "g"],
                 ["sweep", "--model", tiny_folder, "--prompts", tmp_path / "p.txt", "--steps", 1000,
                  "--out", tmp_path / "s"]):
        (tmp_path / "p.txt").write_text("a red circle\n")
        code, err, _ = run(argv, capsys)
        assert code == 2 and "equals the model's 1000 training timesteps" in err and "between 1 and 999" in err
        assert err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"]
