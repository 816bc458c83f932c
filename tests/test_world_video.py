"""The moving world's recipe (#34): `shapefirst train --arch video` on tiny sizes writes a plain WanPipeline folder."""
import json

import numpy as np
import pytest
import torch

from shapefirst.world.train_video import VideoRecipe, encode_text, flow_time, tokenizer_at, train_video


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("video-train")
    assert train_video(out, VideoRecipe.tiny(), max_steps=3) is None  # paused by the step budget, checkpointed
    path = train_video(out, VideoRecipe.tiny())  # resumed to the end
    return out, path


def test_tiny_recipe_writes_a_wan_folder_that_plain_diffusers_runs(trained):
    from diffusers import WanPipeline

    out, path = trained
    rec = json.loads((path / "recipe.json").read_text())
    call = rec["recommended"]["call"]
    assert call == {"height": 64, "width": 64, "num_frames": 9, "max_sequence_length": 24}
    pipe = WanPipeline.from_pretrained(path, torch_dtype=torch.float32)
    frames = pipe("a small red plain circle on the left, moving up", num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0), **call).frames
    assert frames.shape == (1, 9, 64, 64, 3) and np.isfinite(frames).all()
    card = (path / "README.md").read_text()
    assert "WanPipeline.from_pretrained" in card and "num_frames=9" in card and ".frames[0]" in card


def test_the_text_states_reach_the_transformer_as_wan_passes_them(trained):
    """encode_text (training) equals WanPipeline.encode_prompt (inference) at the recipe's max_sequence_length."""
    from diffusers import WanPipeline

    out, path = trained
    pipe = WanPipeline.from_pretrained(path, torch_dtype=torch.float32)
    caps = ["a large blue dotted cross at the top, standing still", ""]
    with torch.no_grad():
        want, _ = pipe.encode_prompt(caps, do_classifier_free_guidance=False, max_sequence_length=24)
        got = encode_text(pipe.text_encoder, tokenizer_at(out), caps, 24)
    assert torch.allclose(got, want, atol=1e-6) and (got[1, 1:] == 0).all()


def test_flow_time_is_the_samplers_shift():
    from diffusers import UniPCMultistepScheduler

    s = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    s.set_timesteps(10)
    u = torch.linspace(1, 1 / 1000, 11)[:-1]  # its unshifted flow sigmas
    assert torch.allclose(flow_time(u, 3.0), torch.as_tensor(s.sigmas[:-1], dtype=torch.float32), atol=1e-4)


def test_the_vae_compresses_4x_in_space_and_2x_in_time_and_the_pipeline_reads_it(trained):
    """9 frames of 64x64 -> 5 x 16 x 16 latents; WanPipeline takes its scale factors from the VAE's config."""
    from diffusers import WanPipeline

    out, path = trained
    pipe = WanPipeline.from_pretrained(path, torch_dtype=torch.float32)
    assert (pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal) == (4, 2)
    with torch.no_grad():
        z = pipe.vae.encode(torch.zeros(1, 3, 9, 64, 64)).latent_dist.mean
    assert z.shape == (1, pipe.vae.config.z_dim, 5, 16, 16)


def test_phase_one_trains_on_single_frames_of_training_clips():
    from shapefirst.world import motion
    from shapefirst.world.train_video import FRAME_STAGE, VAE_STAGE, clip_batch, clips_at, frame_batch
    from shapefirst.world.train import rng_at

    x = frame_batch(0, 5, 4)
    clips, picks = clips_at(0, VAE_STAGE, 5, 4), rng_at(0, FRAME_STAGE, 5).integers(0, motion.FRAMES, 4)
    assert x.shape == (4, 3, 1, 64, 64)
    for i, (c, k) in enumerate(zip(clips, picks)):
        assert torch.equal(x[i, :, 0], clip_batch([c], motion.FRAMES)[0, :, k])


@pytest.mark.parametrize("what", ["frames", "clips"])
def test_the_vae_check_reads_a_work_folder(trained, what):
    """benchmarks/video_vae_check.py on the tiny run: its VAE (checkpoint or folder) loads and every attribute is
    counted (a tiny VAE reconstructs nothing: all counts are of n, none above)."""
    import subprocess
    import sys
    from pathlib import Path

    out, _ = trained
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "video_vae_check.py"
    res = subprocess.run([sys.executable, str(script), str(out), "--n", "2", "--what", what],
                         capture_output=True, text=True, check=True)
    line = res.stdout.strip().splitlines()[-1]
    names = ["shape", "color", "position", "size", "texture"] + (["motion"] if what == "clips" else [])
    assert line.startswith(f"{what}, n=2: ") and all(f"{a} " in line for a in names) and "; mse " in line


def test_the_vae_trains_in_three_checkpointed_phases(trained):
    from safetensors import safe_open

    from shapefirst.world.train_video import vae_phases

    out, _ = trained
    r = VideoRecipe()
    phases = vae_phases(r)
    assert [(p.name, p.frames, p.weight) for p in phases] == [("vae_frames", True, r.object_weight),
                                                              ("vae", False, r.object_weight),
                                                              ("vae_refine", False, r.vae_refine_weight)]
    assert phases[0].lr == r.vae_lr and phases[1].lr == phases[2].lr == r.vae_lr / 3
    for p in vae_phases(VideoRecipe.tiny()):  # every phase ran to its end and kept its checkpoint
        with safe_open(str(out / "work" / f"{p.name}.safetensors"), "pt") as f:
            assert int(f.metadata()["step"]) == p.steps
