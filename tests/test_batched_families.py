"""Batched-CFG families added by name (#32 items 2 and 4): Sana, CogVideoX (video), HunyuanDiT, Kolors (an
SDXL-like UNet on ChatGLM states), on tiny in-code components. For each: no stop is bit-identical to the plain
pipeline; a stop equals a reference built without shapefirst (the denoiser's forward wrapped by plain test code
that, from the stop on, runs the conditional half of the batch and returns it in both halves: conftest.CondHalfOn);
2 prompts x 2 images equal their solo runs; evaluations equal an independent count of the rows the denoiser
computes."""
import numpy as np
import pytest
import torch

from shapefirst.families import family_of_pipe
from shapefirst.guidance import GuidanceSchedule, guidance_schedule
from shapefirst.tiny import (tiny_cogvideox_pipeline, tiny_hunyuandit_pipeline, tiny_kolors_pipeline,
                             tiny_sana_pipeline)

from conftest import stop_against_reference

PROMPTS = ["a red circle moving left", "a large blue striped square"]
STEPS, W = 5, 4.5
# the denoiser's first layer: runs on every row computed
FIRST = {"sana": "patch_embed", "cogvideox": "patch_embed", "hunyuandit": "pos_embed", "kolors": "conv_in"}


@pytest.fixture(scope="module", params=["sana", "cogvideox", "hunyuandit", "kolors"])
def fam(request, tmp_path_factory):
    make = {"sana": tiny_sana_pipeline, "cogvideox": tiny_cogvideox_pipeline,
            "hunyuandit": lambda: tiny_hunyuandit_pipeline(folder=tmp_path_factory.mktemp("hunyuandit")),
            "kolors": lambda: tiny_kolors_pipeline(folder=tmp_path_factory.mktemp("kolors"))}
    return request.param, make[request.param]()


def run(name, pipe, prompts=PROMPTS, per_prompt=1, seed=0):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts) * per_prompt)]
    kw = {"sana": dict(height=32, width=32, max_sequence_length=16, complex_human_instruction=None,
                       use_resolution_binning=False),
          "cogvideox": dict(height=16, width=16, num_frames=9, max_sequence_length=16),
          "hunyuandit": dict(height=16, width=16, use_resolution_binning=False),
          "kolors": dict(height=16, width=16, max_sequence_length=16)}[name]
    count = "num_videos_per_prompt" if name == "cogvideox" else "num_images_per_prompt"
    out = pipe(prompts, num_inference_steps=STEPS, guidance_scale=W, output_type="np", generator=gens,
               **{count: per_prompt}, **kw)
    return out.frames if name == "cogvideox" else out.images


def test_the_family_is_known_by_name(fam):
    name, pipe = fam
    assert family_of_pipe(pipe) == name


def test_no_stop_is_bit_identical(fam):
    name, pipe = fam
    plain = run(name, pipe)
    with guidance_schedule(pipe, GuidanceSchedule(W)) as hook:
        got = run(name, pipe)
    assert np.array_equal(got, plain) and hook.evaluations_per_image() == [2 * STEPS] * 2


@pytest.mark.parametrize("stop", [0, 2])
def test_a_stop_equals_the_reference_and_counts_rows(fam, stop):
    name, pipe = fam
    den = pipe.unet if name == "kolors" else pipe.transformer
    ref, got, evals, rows, want = stop_against_reference(pipe, den, getattr(den, FIRST[name]),
                                                          lambda: run(name, pipe), stop, W, STEPS)
    assert np.array_equal(got, ref)
    assert evals == [want] * 2 and rows == 2 * want


def test_a_batch_equals_its_solo_runs(fam):
    """2 prompts x 2 images under a stop equal each prompt's own run. Sana's and HunyuanDiT's own text encoding
    depends on which prompts share the batch (plain pipelines, measured: 0.12 and 0.035 between a 2-prompt batch
    and its solo runs; 6e-7 and 2e-6 with one prompt twice), so they batch one prompt twice (4 images, 4 seeds).
    CogVideoX rejects a list of generators with num_videos_per_prompt > 1: 2 prompts x 1 video."""
    name, pipe = fam
    prompts = PROMPTS if name == "cogvideox" else PROMPTS[:1] * 2
    per = 1 if name == "cogvideox" else 2
    with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=2, after="cond")) as hook:
        both = run(name, pipe, prompts, per_prompt=per)
        assert hook.evaluations_per_image() == [2 * 2 + STEPS - 2] * (2 * per)
        solo = [run(name, pipe, [p], per_prompt=per, seed=per * i) for i, p in enumerate(prompts)]
    assert np.abs(both - np.concatenate(solo)).max() <= 1e-4


def test_kolors_stop_equals_diffusers_with_the_conditional_half_in_both(tmp_path):
    """A second reference without shapefirst, diffusers' own: Kolors' step-end callback takes the [uncond, cond]
    batch's prompt_embeds and add_text_embeds; from the stop on it puts the conditional half in both halves (both
    rows of each image then compute the conditional branch, and u + w (c - u) = c). Measured against a shapefirst
    stop (which computes the conditional rows alone, a batch half the size): equal up to that batch size's rounding
    (3e-7 at most on these images, measured), far below what the stop changes."""
    pipe = tiny_kolors_pipeline(folder=tmp_path / "kolors")

    def cond_in_both(p, i, t, kw):
        if i + 1 < 2:
            return {}
        half = kw["prompt_embeds"].shape[0] // 2
        return {k: torch.cat([kw[k][half:], kw[k][half:]]) for k in ("prompt_embeds", "add_text_embeds")}

    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    ref = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=W, output_type="np", generator=gens, height=16,
               width=16, max_sequence_length=16, callback_on_step_end=cond_in_both,
               callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds"]).images
    with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=2, after="cond")) as hook:
        got = run("kolors", pipe)
    gap = float(np.abs(got - ref).max())
    assert gap <= 1e-5 and hook.evaluations_per_image() == [2 * 2 + STEPS - 2] * 2
    assert float(np.abs(got - run("kolors", pipe)).max()) > 100 * gap  # the stop matters far beyond the rounding


def test_generate_runs_kolors_and_a_saved_folder_loads(tmp_path):
    """shapefirst.generate on the tiny Kolors pipeline equals the pipeline called under the same schedule; the
    pipeline saved with save_pretrained (ChatGLM's SentencePiece tokenizer.model included) loads through
    shapefirst.load_pipeline and gives the same images."""
    from shapefirst.generate import generate
    from shapefirst.models import load_pipeline

    pipe = tiny_kolors_pipeline(folder=tmp_path / "tok")
    sched = GuidanceSchedule(W, stop_step=2, after="cond")
    res = generate(pipe, PROMPTS, sched, steps=STEPS, height=16, width=16, max_sequence_length=16)
    with guidance_schedule(pipe, sched):
        direct = run("kolors", pipe)
    assert np.array_equal(res.images, direct) and res.evaluations_per_image == [2 * 2 + STEPS - 2] * 2
    pipe.save_pretrained(tmp_path / "kolors", safe_serialization=True)
    loaded = load_pipeline(str(tmp_path / "kolors"), device="cpu", dtype="float32")
    again = generate(loaded, PROMPTS, sched, steps=STEPS, height=16, width=16, max_sequence_length=16)
    assert family_of_pipe(loaded) == "kolors" and np.array_equal(again.images, res.images)
