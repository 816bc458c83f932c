"""The shapes world's second recipe: a PixArt-alpha diffusion transformer (shapefirst.world.train_dit)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from shapefirst.cli import main
from shapefirst.world.train_dit import DitRecipe, fp16_megabytes, train_dit


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """One uninterrupted tiny run, shared by the tests below."""
    return train_dit(tmp_path_factory.mktemp("dit") / "a", DitRecipe.tiny())


def test_tiny_recipe_loads_in_plain_diffusers_and_generates(tiny_model):
    assert (tiny_model / "recipe.json").exists() and (tiny_model / "clip" / "config.json").exists()
    code = textwrap.dedent(f"""
        import sys
        import torch
        from diffusers import PixArtAlphaPipeline
        pipe = PixArtAlphaPipeline.from_pretrained({str(tiny_model)!r})
        pipe.set_progress_bar_config(disable=True)
        img = pipe("a large red striped circle on the left", num_inference_steps=2, height=64, width=64,
                   use_resolution_binning=False, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
        assert img.shape == (1, 64, 64, 3), img.shape
        assert (img >= 0).all() and (img <= 1).all()
        assert not any(m.startswith("shapefirst") for m in sys.modules), "shapefirst was imported"
        print("ok", type(pipe.transformer).__name__, type(pipe.text_encoder).__name__)
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tiny_model)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ok PixArtTransformer2DModel T5EncoderModel" in r.stdout


def test_interrupted_in_the_transformer_stage_resumes_bit_identically(tiny_model, tmp_path):
    r = DitRecipe.tiny()
    assert train_dit(tmp_path / "b", r, max_steps=r.t5_steps + 1) is None  # paused inside the transformer stage
    assert (tmp_path / "b" / "work" / "transformer.safetensors").exists()
    assert not (tmp_path / "b" / "transformer").exists()
    resumed = train_dit(tmp_path / "b", r)
    name = "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(tiny_model / name)), load_file(str(resumed / name))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if k.startswith("proj_out"))  # trained away from its zero init


def test_default_recipe_fits_the_float16_budget():
    mb = fp16_megabytes(DitRecipe())  # a freshly built T5 encoder + transformer, parameters x 2 bytes
    assert mb["total"] < 30.0, mb
    assert mb["transformer"] > 10.0 and mb["text_encoder"] > 1.0, mb  # the default is not the tiny one


def test_cli_trains_the_dit_recipe_and_refuses_a_base(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--arch", "dit", "--tiny", "--dit-steps", "3", "--dit-lr", "1e-4", "--out", str(out)]) == 0
    capsys.readouterr()
    assert '"PixArtAlphaPipeline"' in (out / "model" / "model_index.json").read_text()
    recipe = json.loads((out / "model" / "recipe.json").read_text())["recipe"]
    assert recipe["dit_steps"] == 3 and recipe["dit_lr"] == 1e-4
    for bad in (["--dit-steps", "5"], ["--dit-lr", "1e-4"]):  # the UNet recipe refuses the transformer's options
        assert main(["train", *bad, "--out", str(tmp_path / "unet")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--arch dit" in err, err
    assert not (tmp_path / "unet").exists()
    code = main(["train", "--arch", "dit", "--base", "embedded", "--out", str(tmp_path / "other")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error:") and "--base" in err, err
    assert not (tmp_path / "other").exists()


def test_a_trained_world_folder_is_the_shapes_world_for_the_cli(tiny_model, tmp_path, capsys):
    """A folder `shapefirst train --arch dit` wrote is a shapes-world model: world prompts, the judge and its own
    world CLIP apply (generate and sweep on it run without PixArt's resolution-binning error); it has no
    recommended scale yet, so the default is diffusers' 7.5. Any other folder is not the world."""
    from shapefirst.models import default_guidance, embedded_model_path, world_clip, world_folder

    assert world_folder(str(tiny_model)) == tiny_model and world_folder(str(tmp_path)) is None
    assert world_clip(str(tiny_model)) == tiny_model / "clip" and world_clip(str(tmp_path)) is None
    assert world_clip("embedded") == embedded_model_path() / "clip"
    assert default_guidance(str(tiny_model)) == 7.5
    out = tmp_path / "sweep"
    code = main(["sweep", "--model", str(tiny_model), "--n", "2", "--steps", "2", "--stops", "0.5", "--batch", "2",
                 "--schedulers", "ddim",
                 "--timing-batches", "0", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert {r["n"] for r in rows} == {2} and all("accuracy" in r for r in rows)  # judged as the world
    cal = tmp_path / "cal"
    code = main(["calibrate", "--model", str(tiny_model), "--n", "2", "--steps", "2", "--stops", "0.5", "--batch", "2",
                 "--caches", "none,kept", "--timing-batches", "1", "--out", str(cal)])
    said = capsys.readouterr()
    assert code == 0, said.err
    assert "stop=0.5" in said.out and "kept" in said.out  # each configuration judged against the tolerance
    rows = [json.loads(line) for line in (cal / "sweep.jsonl").read_text().splitlines()]
    assert any("kept" in r["key"] for r in rows) and all("accuracy" in r for r in rows)  # judged as the world


def test_the_report_runs_on_a_trained_dit_world(tiny_model, tmp_path, monkeypatch):
    """`shapefirst report --model FOLDER` on a DiT world: every analysis and the sweep run on the PixArt
    transformer, judged as the world, and the attention section's token classes follow the T5 tokenizer
    (no [SOS]; "</s>" is the eos class, "<pad>" the pad class and masked out: zero mass)."""
    from shapefirst.report import BUDGETS
    from shapefirst.results import Result

    monkeypatch.setitem(BUDGETS, "quick", {**BUDGETS["quick"], "n": 2, "steps": 3, "film": 1, "sweep_n": 2,
                                           "batch": 2, "stops": (0.5,)})
    out = tmp_path / "rep"
    assert main(["report", "--model", str(tiny_model), "--out", str(out)]) == 0
    assert (out / "index.html").exists()
    mass = Result.load(out / "results" / "attention").data["summary"]["mean_mass_per_class"]
    assert mass["sos"] == 0 and mass["pad"] == 0 and mass["eos_pad"] == 0
    assert mass["semantic"] > 0 and mass["eos"] > 0 and abs(mass["semantic"] + mass["eos"] - 1) < 1e-5
    for section in ("stages", "frequency", "eos-swap", "token-ablation", "sweep"):
        assert any((out / "results" / section).iterdir()), section
    assert "Which tokens the image attends to" in (out / "index.html").read_text()


def test_the_shipped_copy_is_the_world_as_embedded_dit(tiny_model, tmp_path, monkeypatch):
    """world.train_dit.ship writes the package's copy: no clip/ (the embedded world CLIP serves it), T5 stored in
    float16 and loaded back in float32, the recommended scale in recipe.json; `--model embedded-dit` then is
    the shapes world, and its images match the trained folder's within float16 rounding of the T5."""
    import numpy as np
    from safetensors import safe_open

    import shapefirst.world as world
    from shapefirst import GuidanceSchedule, generate, load_pipeline
    from shapefirst.models import default_guidance, embedded_model_path, world_clip, world_folder
    from shapefirst.world.train_dit import ship

    dest = ship(tiny_model, tmp_path / "model_dit", {"guidance_scale": 2.5})
    assert not (dest / "clip").exists() and not (dest / ".shapefirst.json").exists()
    with safe_open(str(dest / "text_encoder" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    monkeypatch.setattr(world, "dit_model_path", lambda: dest)
    assert world_folder("embedded-dit") == dest and default_guidance("embedded-dit") == 2.5
    assert world_clip("embedded-dit") == embedded_model_path() / "clip"
    shipped, trained = load_pipeline("embedded-dit"), load_pipeline(str(tiny_model))
    assert shipped.text_encoder.dtype == torch.float32
    kw = dict(steps=3, seed=0, height=64, width=64)
    a = generate(shipped, ["a large red striped circle on the left"], GuidanceSchedule(2.5), **kw).images
    b = generate(trained, ["a large red striped circle on the left"], GuidanceSchedule(2.5), **kw).images
    assert np.abs(a - b).max() < 0.02
    with pytest.raises(Exception, match="not a model folder"):
        ship(tmp_path, tmp_path / "x", {})


def test_attention_finding_says_when_the_tokenizer_has_no_sos():
    """T5 has no [SOS]: its class mass is exactly 0 (no position), so the finding says so instead of a number."""
    from shapefirst.experiments.attention import findings

    t5 = findings({"summary": {"mean_mass_per_class": {"sos": 0.0, "semantic": 0.7, "eos": 0.3, "pad": 0.0}}})
    clip = findings({"summary": {"mean_mass_per_class": {"sos": 0.006, "semantic": 0.1, "eos_pad": 0.84}}})
    assert "no [SOS]" in t5[0] and "word tokens" in t5[0]
    assert "[SOS] gets 0.006" in clip[0] and "[EOS] padding" in clip[0]
