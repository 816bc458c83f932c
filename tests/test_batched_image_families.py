"""Batched-CFG image families declared by name (#32 item 2, second set): AuraFlow, CogView3Plus, Bria, on tiny in-code
components (shapefirst.tiny_dits). For each: no stop is bit-identical to the plain pipeline; a stop equals a reference
built without shapefirst (the denoiser's forward wrapped by plain test code that, from the stop on, runs the
conditional half of the batch and returns it in both halves: conftest.CondHalfOn) and its evaluations equal an
independent count of the rows the denoiser's first layer sees (conftest.RowCount); 2 prompts x 2 images equal their
solo runs; shapefirst.generate equals the pipeline called under the same schedule, and its trajectory's last call
decodes to the pipeline's own images (Bria's with its VAE's own compression: see its test). Lumina-Next is not served
(its CFG batch is [cond, uncond]): its row order is measured and its refusal tested. HiDream is not built (four text
encoders; docs/families.md says why it is not served)."""
import numpy as np
import pytest
import torch

from shapefirst.errors import ShapefirstError
from shapefirst.families import family, family_of_pipe
from shapefirst.guidance import GuidanceSchedule, guidance_schedule
from shapefirst.video_strip import vae_scale
from shapefirst.tiny_dits import (tiny_auraflow_pipeline, tiny_bria_pipeline, tiny_cogview3plus_pipeline,
                                  tiny_lumina_pipeline)

from conftest import CondHalfOn, stop_against_reference

PROMPTS = ["a red circle moving left", "a large blue striped square"]
STEPS, W = 5, 4.5
TOL = 1e-4

# family -> (tiny builder, call arguments, the denoiser's first layer: it runs on every row computed)
SPECS = {
    "auraflow": (tiny_auraflow_pipeline, dict(height=16, width=16, max_sequence_length=16), "pos_embed"),
    "cogview3plus": (tiny_cogview3plus_pipeline, dict(height=16, width=16, max_sequence_length=16), "patch_embed"),
    "bria": (tiny_bria_pipeline, dict(height=16, width=16, max_sequence_length=16), "x_embedder"),
}


@pytest.fixture(scope="module", params=list(SPECS))
def fam(request):
    return request.param, SPECS[request.param][0]()


def run(name, pipe, prompts=PROMPTS, per_prompt=1, seed=0):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts) * per_prompt)]
    return pipe(prompts, num_inference_steps=STEPS, guidance_scale=W, output_type="np", generator=gens,
                num_images_per_prompt=per_prompt, **SPECS[name][1]).images


def test_the_family_is_known_by_name(fam):
    name, pipe = fam
    assert family_of_pipe(pipe) == name and family(pipe).cfg == "batched"


def test_no_stop_is_bit_identical(fam):
    name, pipe = fam
    plain = run(name, pipe)
    with guidance_schedule(pipe, GuidanceSchedule(W)) as hook:
        got = run(name, pipe)
    assert np.array_equal(got, plain) and hook.evaluations_per_image() == [2 * STEPS] * 2


@pytest.mark.parametrize("stop", [0, 2])
def test_a_stop_equals_the_reference_and_counts_rows(fam, stop):
    name, pipe = fam
    den = pipe.transformer
    ref, got, evals, rows, want = stop_against_reference(pipe, den, getattr(den, SPECS[name][2]),
                                                          lambda: run(name, pipe), stop, W, STEPS)
    assert np.array_equal(got, ref)
    assert evals == [want] * 2 and rows == 2 * want
    assert float(np.abs(got - run(name, pipe)).max()) > 10 * TOL  # the stop changes the images beyond TOL


def test_a_batch_equals_its_solo_runs(fam):
    """2 prompts x 2 images under a stop equal each prompt's own run (4 seeds)."""
    name, pipe = fam
    with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=2, after="cond")) as hook:
        both = run(name, pipe, PROMPTS, per_prompt=2)
        assert hook.evaluations_per_image() == [2 * 2 + STEPS - 2] * 4
        solo = [run(name, pipe, [p], per_prompt=2, seed=2 * i) for i, p in enumerate(PROMPTS)]
    assert np.abs(both - np.concatenate(solo)).max() <= TOL


def test_generate_runs_it_and_its_trajectory_decodes_to_the_images(fam):
    """shapefirst.generate equals the pipeline called under the same schedule; its trajectory (trace=True) is the
    family's declared layout, guided at the calls before the stop, and its last call's x0-hat, decoded as the pipeline
    decodes its latents, is the pipeline's images (within TOL); the first call's decodes to another picture."""
    from shapefirst.generate import generate

    name, pipe = fam
    sched = GuidanceSchedule(W, stop_step=2, after="cond")
    res = generate(pipe, PROMPTS, sched, steps=STEPS, trace=True, **SPECS[name][1])
    with guidance_schedule(pipe, sched):
        direct = run(name, pipe)
    assert np.array_equal(res.images, direct) and res.evaluations_per_image == [2 * 2 + STEPS - 2] * 2
    traj = res.trajectory
    assert traj.layout == family(pipe).latent_layout and traj.n_calls == STEPS
    assert traj.guided[:2].all() and not traj.guided[2:].any()
    last = traj.decode(pipe.vae, "x0", [STEPS - 1])[0].movedim(-3, -1).numpy()
    assert last.shape == direct.shape and float(np.abs(last - direct).max()) <= TOL
    first = traj.decode(pipe.vae, "x0", [0])[0].movedim(-3, -1).numpy()
    assert float(np.abs(first - direct).max()) > 0.01


def test_bria_trajectory_decodes_as_recorded():
    """BriaPipeline's vae_scale_factor is twice its VAE's compression (Flux's equals it): packed tokens are unpacked by
    their count and the call's aspect ratio, so a Bria trajectory decodes as recorded, to the pipeline's images, also
    non-square."""
    from shapefirst.generate import generate

    pipe = tiny_bria_pipeline()
    assert pipe.vae_scale_factor == 2 * vae_scale(pipe.vae)
    call = {**SPECS["bria"][1], "height": 32, "width": 16}
    res = generate(pipe, PROMPTS, GuidanceSchedule(W, stop_step=2, after="cond"), steps=STEPS, trace=True, **call)
    last = res.trajectory.decode(pipe.vae, "x0", [STEPS - 1])[0].movedim(-3, -1).numpy()
    assert last.shape == res.images.shape and float(np.abs(last - res.images).max()) <= TOL


def test_lumina_next_is_refused_its_cfg_batch_is_conditional_first():
    """LuminaPipeline (Lumina-Next) batches CFG as [cond, uncond]: its transformer's first rows get the prompt's
    embeddings and the last ones the negative prompt's (read from the transformer's input by a plain torch pre-hook,
    compared with the pipeline's own encode_prompt), the reverse of the [uncond, cond] rows a stop relies on. It is
    not declared, so a guidance schedule (and generate) refuses it in one line instead of keeping the wrong branch."""
    from shapefirst.generate import generate

    pipe = tiny_lumina_pipeline()
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kw: seen.append(kw["encoder_hidden_states"]), with_kwargs=True)
    try:
        pipe(PROMPTS, num_inference_steps=1, guidance_scale=W, output_type="np", height=32, width=32,
             negative_prompt="a green triangle", clean_caption=False)
    finally:
        handle.remove()
    cond, _, neg, _ = pipe.encode_prompt(PROMPTS, True, negative_prompt="a green triangle")
    assert torch.equal(seen[0], torch.cat([cond, neg])) and not torch.equal(cond, neg)
    for attempt in (lambda: guidance_schedule(pipe, GuidanceSchedule(W, stop_step=1)).__enter__(),
                    lambda: generate(pipe, PROMPTS, GuidanceSchedule(W, stop_step=1), steps=2, height=32, width=32)):
        with pytest.raises(ShapefirstError, match="LuminaPipeline.* is not supported"):
            attempt()


def test_bria_ids_are_not_cut_as_rows_when_the_tokens_equal_the_cfg_rows():
    """Bria's txt_ids are [tokens, 3] for every row: 8 images (16 CFG rows) with 16 text tokens under a stop equal the
    reference (before shapefirst.rows.SHARED_ARGS they were cut as rows: a torch shape error)."""
    pipe = tiny_bria_pipeline()
    den = pipe.transformer

    def go():
        gens = [torch.Generator().manual_seed(i) for i in range(8)]
        return pipe(PROMPTS, num_inference_steps=3, guidance_scale=W, output_type="np", generator=gens,
                    num_images_per_prompt=4, height=16, width=16, max_sequence_length=16).images
    ref_wrap = CondHalfOn(den, lambda i: i >= 1)
    try:
        ref = go()
    finally:
        ref_wrap.close()
    with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=1, after="cond")) as hook:
        got = go()
    assert np.array_equal(got, ref) and hook.evaluations_per_image() == [2 + 2] * 8
