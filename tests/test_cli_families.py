"""#32 item 6: `shapefirst generate --model <folder>` on a saved tiny folder of every declared family: one image
(or one animated WebP for a video family) beside run.json, the size given is the size made, and the evaluations
per image are the stop's (2 guided steps of 4, then one row)."""
import json

import numpy as np
import pytest
from PIL import Image

import shapefirst.tiny as tiny
import shapefirst.tiny_dits as tiny_dits
import shapefirst.tiny_videos as tiny_videos
from shapefirst.cli import main

FAMILIES = {  # builder name -> (size, extra CLI arguments)
    "pixart": (16, []), "sd3": (16, []), "sana": (32, ["--max-sequence-length", "16"]),
    "hunyuandit": (16, []), "kolors": (16, ["--max-sequence-length", "16"]),
    "cogvideox": (16, ["--num-frames", "9", "--max-sequence-length", "16"]),
    "wan": (16, ["--num-frames", "5", "--max-sequence-length", "16"]), "flux": (16, []), "qwenimage": (16, []),
    "lumina2": (16, []), "cogview4": (16, []), "chroma": (16, []),
    "hunyuanvideo": (16, ["--num-frames", "5"]),
    "auraflow": (16, ["--max-sequence-length", "16"]), "cogview3plus": (16, ["--max-sequence-length", "16"]),
    "bria": (16, ["--max-sequence-length", "16"]),
    "ltx": (32, ["--num-frames", "9", "--max-sequence-length", "16"]),
    "mochi": (16, ["--num-frames", "7", "--max-sequence-length", "16"]),
    "latte": (16, ["--num-frames", "2"]),  # Latte takes it as video_length
    "easyanimate": (16, ["--num-frames", "5"]),
}
VIDEO = {"cogvideox": 9, "wan": 5, "hunyuanvideo": 5, "ltx": 9, "mochi": 7, "latte": 2, "easyanimate": 5}


def build(name, folder):
    builder = f"tiny_{name}_pipeline"
    make = next(getattr(m, builder) for m in (tiny, tiny_dits, tiny_videos) if hasattr(m, builder))
    if "folder" in make.__code__.co_varnames:
        folder.mkdir(parents=True)
        return make(folder=folder)
    return make()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_generate_runs_a_saved_folder_of_every_family(name, tmp_path):
    size, extra = FAMILIES[name]
    build(name, tmp_path / "src").save_pretrained(tmp_path / "model", safe_serialization=True)
    out = tmp_path / "out"
    code = main(["generate", "a red circle moving left", "--model", str(tmp_path / "model"), "--steps", "4",
                 "--guidance", "4", "--guidance-stop", "0.5", "--after", "cond", "--height", str(size), "--width",
                 str(size), "--out", str(out), *extra])
    assert code == 0
    run = json.loads((out / "run.json").read_text())
    assert run["denoiser_evaluations_per_image"] == [2 * 2 + 2]
    if name in VIDEO:
        with Image.open(out / "video_000.webp") as im:
            assert im.n_frames == VIDEO[name] and im.size == (size, size)
    else:
        assert np.asarray(Image.open(out / "image_000.png")).shape == (size, size, 3)


@pytest.mark.parametrize("analysis", ["eos-swap", "attention"])
def test_analyze_runs_on_a_saved_wan_folder_at_the_size_it_is_given(analysis, tmp_path):
    """`shapefirst analyze NAME --model <Wan folder> --height --width --num-frames --max-sequence-length`: every
    call of the analysis makes that size (the saved frames are 16 x 16 here, Wan's default is 480 x 832)."""
    from shapefirst.tiny import tiny_clip_folder

    build("wan", tmp_path / "src").save_pretrained(tmp_path / "model", safe_serialization=True)
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a red circle moving left || a blue square\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\n")
    source = ["--pairs", str(pairs)] if analysis == "eos-swap" else ["--prompts", str(prompts)]
    code = main(["analyze", analysis, "--model", str(tmp_path / "model"), *source, "--n", "1", "--steps", "2",
                 "--guidance", "4", "--clip", str(tiny_clip_folder(tmp_path / "clip")), "--height", "16", "--width",
                 "16", "--num-frames", "5", "--max-sequence-length", "16", "--out", str(tmp_path / "out")])
    assert code == 0
    assert (tmp_path / "out" / analysis / "results.json").exists()
    if analysis == "eos-swap":  # its images (a video's middle frame) are at the size given
        from safetensors.torch import load_file

        arrays = load_file(str(tmp_path / "out" / analysis / "arrays.safetensors"))
        assert tuple(arrays["images_swap"].shape) == (1, 16, 16, 3)
