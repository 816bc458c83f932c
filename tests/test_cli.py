"""The CLI end to end on a tiny saved pipeline, and its bad-input errors (one line, exit 2, nothing written)."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from shapefirst.cli import main


def run(argv, capsys):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def test_generate_writes_images_and_run_json(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run(["generate", "a red circle", "a blue square", "--model", tiny_folder, "--steps", 6,
                     "--guidance-stop", 0.5, "--images-per-prompt", 2, "--out", out, "--trace", "--seed", 3], capsys)
    assert code == 0, err
    run_json = json.loads((out / "run.json").read_text())
    for key in ("model", "prompts", "seed", "steps", "guidance", "schedule", "scheduler",
                "denoiser_evaluations_per_image", "wall_seconds", "load_seconds", "images"):
        assert key in run_json
    assert run_json["denoiser_evaluations_per_image"] == [2 * 3 + 3] * 4
    assert len(run_json["images"]) == 4 and all((out / n).exists() for n in run_json["images"])
    assert (out / "trajectory" / "trajectory.safetensors").exists()
    assert Image.open(out / "trajectory" / "contact_sheet.png").size[0] > 0
    assert Image.open(out / "trajectory" / "x0.gif").n_frames == 6
    assert not [p for p in out.iterdir() if p.name.startswith(".stage")]


def test_trace_changes_nothing_and_image_i_regenerates_alone(tiny_folder, tmp_path, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    common = ["--model", tiny_folder, "--steps", 5, "--seed", 7]
    assert run(["generate", "a red circle", "a blue square", *common, "--out", a, "--trace"], capsys)[0] == 0
    assert run(["generate", "a red circle", "a blue square", *common, "--out", b], capsys)[0] == 0
    for n in ("image_000.png", "image_001.png"):
        assert np.array_equal(np.asarray(Image.open(a / n)), np.asarray(Image.open(b / n)))
    assert run(["generate", "a blue square", "--model", tiny_folder, "--steps", 5, "--seed", 8,
                "--out", c], capsys)[0] == 0
    diff = np.abs(np.asarray(Image.open(b / "image_001.png"), dtype=int)
                  - np.asarray(Image.open(c / "image_000.png"), dtype=int))
    assert diff.max() <= 1


BAD = [
    (["--guidance-stop", "1.5"], "outside [0, 1]"),
    (["--guidance-stop", "-0.2"], "outside [0, 1]"),
    (["--guidance-stop-step", "99"], "beyond the 4 denoiser calls"),
    (["--scheduler", "heun2"], "unknown scheduler"),
    (["--guidance", "1.0", "--guidance-stop", "0.5"], "guidance scale 1.0 <= 1"),
    (["--guidance", "nan"], "not a finite number"),
    (["--steps", "0"], "not a positive integer"),
    (["--after", "both"], "is not one of"),
    (["--cache", "mean,deep3"], "'mean,deep3' is not understood"),  # one spec: a comma list is a sweep's
]


@pytest.mark.parametrize("extra,msg", BAD)
def test_bad_generate_options(tiny_folder, tmp_path, capsys, extra, msg):
    out = tmp_path / "out"
    code, err = run(["generate", "a red circle", "--model", tiny_folder, "--steps", 4, "--out", out, *extra], capsys)
    assert code == 2
    assert msg in err and err.strip().count("\n") == 0 and err.startswith("error: ")
    assert not out.exists()


def test_bad_models_and_prompts(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run(["generate", "x", "--model", tmp_path / "nope", "--out", out], capsys)
    assert code == 2 and "does not exist" in err
    (tmp_path / "notdiff").mkdir()
    code, err = run(["generate", "x", "--model", tmp_path / "notdiff", "--out", out], capsys)
    assert code == 2 and "not a diffusers pipeline folder" in err
    code, err = run(["generate", "--model", tmp_path / "notdiff", "--out", out], capsys)
    assert code == 2 and "no prompt" in err
    assert not out.exists()


def test_output_path_that_is_a_file(tiny_folder, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    code, err = run(["generate", "x", "--model", tiny_folder, "--steps", 2, "--out", f], capsys)
    assert code == 2 and "is a file" in err


def test_console_script_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "shapefirst", "generate", "x", "--model", str(tmp_path / "missing")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "does not exist" in r.stderr


def test_analyze_frequency_on_a_local_folder(tiny_folder, tmp_path, capsys):
    pf = tmp_path / "prompts.txt"
    pf.write_text("# two prompts\na red circle\n\na blue square\n", encoding="utf-8")
    code, err = run(["analyze", "frequency", "--model", tiny_folder, "--prompts", pf, "--steps", 3, "--n", 2,
                     "--out", tmp_path / "an"], capsys)
    assert code == 0, err
    assert (tmp_path / "an" / "frequency" / "results.json").exists()
    assert list((tmp_path / "an" / "frequency").glob("*.png"))


@pytest.mark.parametrize("argv,msg", [
    (["analyze", "nonsense"], "unknown analysis"),
    (["analyze", "stages", "--n", "0"], "--n 0 is outside [1, "),
    (["report", "--budget", "huge"], "unknown budget"),
])
def test_bad_analyze_and_report_options(tmp_path, capsys, argv, msg):
    code, err = run(argv + ["--out", tmp_path / "o"], capsys)
    assert code == 2 and msg in err
    assert not (tmp_path / "o").exists()


def test_non_world_model_without_prompts_is_refused(tiny_folder, tmp_path, capsys):
    code, err = run(["analyze", "attention", "--model", tiny_folder, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "--prompts FILE" in err


@pytest.mark.parametrize("given,missing", [((), "--prompts"), (("--prompts",), "--clip"),
                                           (("--prompts", "--clip"), "--pairs")])
def test_report_checks_every_analysis_input_before_any_work(tiny_folder, tmp_path, capsys, given, missing):
    (tmp_path / "p.txt").write_text("a red circle\n")
    (tmp_path / "pairs.txt").write_text("a red circle || a blue square\n")
    (tmp_path / "clip").mkdir()  # never loaded: the missing input is reported first
    files = {"--prompts": tmp_path / "p.txt", "--pairs": tmp_path / "pairs.txt", "--clip": tmp_path / "clip"}
    argv = ["report", "--model", tiny_folder, "--out", tmp_path / "o"] + [x for g in given for x in (g, files[g])]
    code, err = run(argv, capsys)
    assert code == 2 and missing in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_malformed_pair_file(tiny_folder, tmp_path, capsys):
    pf = tmp_path / "pairs.txt"
    pf.write_text("a red circle || a blue square\nno separator here\n", encoding="utf-8")
    code, err = run(["analyze", "eos-swap", "--model", tiny_folder, "--pairs", pf, "--out", tmp_path / "o"], capsys)
    assert code == 2 and ":2:" in err


def test_hub_id_offline_is_one_line_naming_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = run(["generate", "x", "--model", "someorg/some-model", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "someorg/some-model" in err and "HF_HUB_OFFLINE" in err
    assert err.strip().count("\n") == 0


def test_pickle_only_weights_are_refused_unless_allowed(tiny_pipe, tmp_path, capsys):
    folder = tmp_path / "pickled"
    import torch

    tiny_pipe.save_pretrained(folder, safe_serialization=False)
    for st in folder.rglob("*.safetensors"):  # transformers 5 always writes safetensors: make it a pickle
        st.unlink()
    torch.save(tiny_pipe.text_encoder.state_dict(), folder / "text_encoder" / "pytorch_model.bin")
    assert not list(folder.rglob("*.safetensors"))
    code, err = run(["generate", "x", "--model", folder, "--steps", 2, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "pickle" in err and "--allow-pickle" in err
    assert not (tmp_path / "o").exists()
    code, err = run(["generate", "x", "--model", folder, "--steps", 2,
                     "--out", tmp_path / "o", "--allow-pickle"], capsys)
    assert code == 0, err


def test_corrupt_safetensors_is_refused(tiny_pipe, tmp_path, capsys):
    folder = tmp_path / "corrupt"
    tiny_pipe.save_pretrained(folder, safe_serialization=True)
    w = next(folder.rglob("*.safetensors"))
    w.write_bytes(b"not a safetensors file at all")
    code, err = run(["generate", "x", "--model", folder, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "corrupt" in err


def test_calibrate_ranks_stops_adaptive_and_caches_and_prints_a_runnable_snippet(tmp_path, capsys):
    """On the embedded model (few prompts, 4 steps): every candidate gets a verdict line, the
    recommendation (if any) is the fastest passing one and its snippet runs."""
    out = tmp_path / "cal"
    # cosine 0.9995, none,mean,kept+deep3: defaults
    code = main(["calibrate", "--n", "8", "--steps", "4", "--stops", "0.5", "--adaptive-shape", "0.05",
                 "--stop-sigmas", "3", "--modes", "uncond", "--timing-batches", "0", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    verdicts = [line for line in text.splitlines() if line.startswith(("PASS", "fail"))]
    names = [f"{rule} uncond{c}" for rule in ("stop=0.5", "stop_sigma=3", "adaptive=0.9995", "adaptive-shape=0.05")
             for c in ("", " +mean", " +kept+deep3")]
    assert sorted(line[5:].split(" saved ")[0].strip() for line in verdicts) == sorted(f"ddim/4/{n}" for n in names)
    assert (out / "sweep.jsonl").exists() and (out / "pareto.png").exists()
    if "recommended:" in text:
        fixed = text.split("recommended: ddim/4/")[1].startswith("stop")
        assert ("in noise level: guidance stops at sigma <= " in text) == fixed, text  # #33: stated in sigma
        code_text = text.split("recommended:")[1].split("\n\n", 1)[1]
        assert ("stop_sigma=" in code_text) == fixed
        from shapefirst.models import load_pipeline

        env = {"pipe": load_pipeline("embedded"), "prompts": ["a red circle"]}
        exec(code_text.replace("num_inference_steps=4", "num_inference_steps=2"), env)
        assert len(env["images"]) == 1
    else:
        assert "keep full guidance" in text


def test_ci_runs_the_readmes_quickstart_test_command():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    quick = (root / "README.md").read_text().split("## Quickstart")[1].split("##")[0]
    commands = [ln.strip() for ln in quick.splitlines() if ln.startswith("    ")]
    assert len(commands) == 2
    ci = [ln.strip().replace(" -q", "") for ln in (root / ".ci" / "run").read_text().splitlines()]
    assert commands[1] in ci
    assert (root / "scripts" / "browser-deps.sh").exists()
