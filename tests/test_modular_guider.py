"""Parity with diffusers' modular ClassifierFreeGuidance(start, stop) guider on a tiny SDXL pipeline:
the same components, prompts and generator give the same latents as shapefirst's schedule with the
conditional branch outside [start, stop) (the guider's rule), and differ from full guidance."""
import pytest
import torch

from shapefirst.guidance import GuidanceSchedule, guidance_schedule
from shapefirst.tiny import tiny_sdxl_pipeline

PROMPTS = ["a red circle", "a large blue striped square at the top"]


@pytest.fixture(scope="module")
def pipes():
    from diffusers.modular_pipelines.stable_diffusion_xl.modular_blocks_stable_diffusion_xl import (
        StableDiffusionXLAutoBlocks)

    pipe = tiny_sdxl_pipeline()
    modular = StableDiffusionXLAutoBlocks().init_pipeline()
    modular.update_components(**{k: v for k, v in pipe.components.items() if v is not None})
    modular.set_progress_bar_config(disable=True)
    return pipe, modular


@pytest.mark.parametrize("start,stop", [(0.0, 0.5), (0.2, 0.6)])
def test_schedule_matches_the_modular_guider(pipes, start, stop):
    from diffusers import ClassifierFreeGuidance

    pipe, modular = pipes
    w, n = 5.0, 10
    modular.update_components(guider=ClassifierFreeGuidance(guidance_scale=w, start=start, stop=stop))
    theirs = modular(prompt=PROMPTS, num_inference_steps=n, generator=torch.Generator().manual_seed(3),
                     output="latents")
    run = dict(prompt=PROMPTS, num_inference_steps=n, guidance_scale=w, output_type="latent")
    with guidance_schedule(pipe, GuidanceSchedule(w, start=start, stop=stop, after="cond")) as hook:
        ours = pipe(**run, generator=torch.Generator().manual_seed(3)).images
    full = pipe(**run, generator=torch.Generator().manual_seed(3)).images
    assert hook.evaluations.tolist() == [n + round((stop - start) * n)] * len(PROMPTS)
    gap = float((ours - theirs).abs().max())
    assert gap <= 1e-4 * float(theirs.abs().max())
    assert float((full - theirs).abs().max()) > 100 * gap + 1e-4  # the guider's window is not full guidance
