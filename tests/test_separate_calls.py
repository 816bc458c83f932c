"""Guidance as separate denoiser calls (#32 item 1) on tiny in-code Wan 2.1 and Wan 2.2 pipelines: no stop is
bit-identical to the plain pipeline; a stop equals diffusers' own pipeline with the kept branch's embeddings put
in place of the other branch's from that step on through its public step-end callback (then both branches are
the same computation, so u + w (c - u) is that branch exactly); 2 prompts x 2 videos equal their solo runs;
evaluations equal an independent count of the rows the transformers compute; Wan 2.2 with guidance_scale_2=1
skips the low-noise expert's unconditional pass."""
import numpy as np
import pytest
import torch

from shapefirst.errors import ShapefirstError
from shapefirst.guidance import AdaptiveStop, GuidanceSchedule, guidance_schedule
from shapefirst.cache import LateCache, apply_late_cache
from shapefirst.tiny import tiny_wan_pipeline

from conftest import CondFromStep, keep_from

PROMPTS = ["a red circle moving left", "a large blue striped square moving up"]
STEPS, W = 6, 5.0


@pytest.fixture(scope="module")
def wan():
    return tiny_wan_pipeline(seed=0)


@pytest.fixture(scope="module")
def wan22():
    return tiny_wan_pipeline(seed=1, two_experts=True)


def run(pipe, prompts=PROMPTS, seed=0, callback=None, **kw):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts) * kw.get("num_videos_per_prompt", 1))]
    extra = {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": ["prompt_embeds",
                                                                                   "negative_prompt_embeds"]}
    return pipe(prompts, negative_prompt="", height=16, width=16, num_frames=5, num_inference_steps=STEPS,
                guidance_scale=kw.pop("guidance_scale", W), max_sequence_length=16, output_type="np", generator=gens,
                **(extra if callback else {}), **kw).frames


class RowCount:
    """An independent count: rows each transformer really computes (torch forward pre-hooks on its patch
    embedding, which every forward runs on exactly the rows it computes; not shapefirst's hooks)."""

    def __init__(self, pipe):
        self.rows = {}
        self.handles = [m.patch_embedding.register_forward_pre_hook(self.hook(name))
                        for name in ("transformer", "transformer_2") if (m := getattr(pipe, name, None)) is not None]

    def hook(self, name):
        def count(module, args):
            self.rows[name] = self.rows.get(name, 0) + args[0].shape[0]
        return count

    def close(self):
        for h in self.handles:
            h.remove()


def test_no_stop_is_bit_identical(wan):
    plain = run(wan)
    with guidance_schedule(wan, GuidanceSchedule(W)) as hook:
        got = run(wan)
    assert np.array_equal(got, plain) and hook.evaluations_per_image() == [2 * STEPS] * 2


@pytest.mark.parametrize("after", ["cond", "uncond"])
@pytest.mark.parametrize("stop", [0, 2, 4])
def test_a_stop_equals_diffusers_with_the_kept_branch_in_both(wan, after, stop):
    ref = run(wan, callback=keep_from(stop, after)) if stop else None
    if stop == 0:  # no guidance at all: the pipeline without CFG on the kept branch's prompt (uncond: the negative "")
        ref = run(wan, PROMPTS if after == "cond" else ["", ""], guidance_scale=1.0)
    count = RowCount(wan)
    try:
        with guidance_schedule(wan, GuidanceSchedule(W, stop_step=stop, after=after)) as hook:
            got = run(wan)
    finally:
        count.close()
    assert np.array_equal(got, ref)
    want = 2 * stop + (STEPS - stop)
    assert hook.evaluations_per_image() == [want] * 2 and count.rows["transformer"] == 2 * want
    assert not np.array_equal(got, run(wan))


def test_two_prompts_two_videos_equal_their_solo_runs(wan):
    sched = GuidanceSchedule(W, stop_step=3, after="cond")
    with guidance_schedule(wan, sched) as hook:
        both = run(wan, PROMPTS, num_videos_per_prompt=2)
        assert hook.evaluations_per_image() == [2 * 3 + 3] * 4
        solo = [run(wan, [p], seed=s, num_videos_per_prompt=2) for p, s in ((PROMPTS[0], 0), (PROMPTS[1], 2))]
        assert hook.evaluations_per_image() == [2 * 3 + 3] * 2
    assert np.abs(both - np.concatenate(solo)).max() <= 1e-5


def test_per_sample_adaptive_stops_count_rows(wan):
    count = RowCount(wan)
    try:
        with guidance_schedule(wan, GuidanceSchedule(W, adaptive=AdaptiveStop(0.5, min_call=1), after="cond")) as hook:
            run(wan)
    finally:
        count.close()
    evals, stops = hook.evaluations_per_image(), hook.stop_calls.tolist()
    assert all(s >= 2 for s in stops)  # decided at call 1, unguided from call 2
    assert evals == [2 * s + (STEPS - s) if s >= 0 else 2 * STEPS for s in stops]
    assert count.rows["transformer"] == sum(evals)


def test_wan22_follows_both_experts_and_skips_the_unguided_low_noise_pass(wan22):
    """guidance_scale_2=1: diffusers still runs the low-noise expert's unconditional pass and computes
    u + 1 (c - u); under any shapefirst schedule that pass is not computed (the result is c)."""
    theirs, count_theirs = None, RowCount(wan22)
    try:
        theirs = run(wan22, guidance_scale_2=1.0)
    finally:
        count_theirs.close()
    count = RowCount(wan22)
    try:
        with guidance_schedule(wan22, GuidanceSchedule(W)) as hook:
            ours = run(wan22, guidance_scale_2=1.0)
    finally:
        count.close()
    low = count_theirs.rows["transformer_2"] // 4  # steps on the low-noise expert (2 images x 2 branches)
    assert low > 0 and count.rows["transformer_2"] == 2 * low
    assert count.rows["transformer"] == count_theirs.rows["transformer"]
    assert hook.evaluations_per_image() == [2 * (STEPS - low) + low] * 2
    gap = float(np.abs(ours - theirs).max())
    assert gap <= 1e-5, gap  # the rounding of u + 1 (c - u) against c
    with guidance_schedule(wan22, GuidanceSchedule(W, stop_step=2, after="cond")) as hook:
        run(wan22)
    assert hook.evaluations_per_image() == [2 * 2 + STEPS - 2] * 2


def test_late_caches_are_refused_on_separate_calls(wan):
    with guidance_schedule(wan, GuidanceSchedule(W, stop_step=2)):
        with pytest.raises(ShapefirstError, match="once per branch"):
            apply_late_cache(wan, LateCache("mean"))


# -- Flux with true CFG (true_cfg_scale and a negative prompt): pooled vectors and text ids differ by branch --
@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    from shapefirst.tiny import tiny_flux_pipeline

    return tiny_flux_pipeline(folder=tmp_path_factory.mktemp("flux"))


def run_flux(pipe, prompts=PROMPTS, seed=0, **kw):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(prompts, negative_prompt=["a green triangle"] * len(prompts), true_cfg_scale=W, height=16, width=16,
                num_inference_steps=STEPS, max_sequence_length=16, output_type="np", generator=gens, **kw).images


@pytest.mark.parametrize("stop", [0, 3])
def test_flux_true_cfg_stop_equals_a_plain_reference(flux, stop):
    plain = run_flux(flux)
    with guidance_schedule(flux, GuidanceSchedule(W)) as hook:
        assert np.array_equal(run_flux(flux), plain) and hook.evaluations_per_image() == [2 * STEPS] * 2
    ref_hook = CondFromStep([flux.transformer], stop)
    try:
        ref = run_flux(flux)
    finally:
        ref_hook.close()
    with guidance_schedule(flux, GuidanceSchedule(W, stop_step=stop, after="cond")) as hook:
        got = run_flux(flux)
        assert hook.evaluations_per_image() == [2 * stop + STEPS - stop] * 2
        solo = [run_flux(flux, [p], seed=i) for i, p in enumerate(PROMPTS)]
    assert np.array_equal(got, ref) and not np.array_equal(got, plain)
    assert np.abs(got - np.concatenate(solo)).max() <= 1e-5


def test_flux_uncond_after_the_stop_uses_the_negative_branch_arguments(flux):
    """after="uncond": the first (cond) call of an unguided step computes the negative branch, with its pooled
    vector and text ids: the same images as the negative prompt alone without CFG (true_cfg_scale 1)."""
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    neg_only = flux(["a green triangle"] * 2, height=16, width=16, num_inference_steps=STEPS, max_sequence_length=16,
                    output_type="np", generator=gens).images
    with guidance_schedule(flux, GuidanceSchedule(W, stop_step=0, after="uncond")) as hook:
        got = run_flux(flux)
    assert np.array_equal(got, neg_only) and hook.evaluations_per_image() == [STEPS] * 2


# -- diffusers' own First Block Cache, through the pipelines' own cache_context, under the stop ----------------
@pytest.mark.parametrize("name", ["wan", "flux"])
def test_first_block_cache_composes_with_a_stop(name, wan, flux):
    """FirstBlockCache as diffusers ships it (`transformer.enable_cache`, one state per branch through the
    pipeline's cache_context): alone it skips the tail blocks; under a stop the unguided branch's call does not run
    at all (the first block runs once per computed row) and the cache still skips."""
    from diffusers.hooks import FirstBlockCacheConfig

    pipe, go = (wan, run) if name == "wan" else (flux, run_flux)
    den = pipe.transformer
    first_blk, last = (den.blocks[0], den.blocks[-1].ffn) if name == "wan" else \
        (den.transformer_blocks[0], den.single_transformer_blocks[-1].proj_out)
    rows = {"first": 0, "tail": 0}
    handles = [first_blk.register_forward_pre_hook(lambda m, a, k: rows.__setitem__("first", rows["first"] + 1),
                                                   with_kwargs=True),
               last.register_forward_pre_hook(lambda m, a: rows.__setitem__("tail", rows["tail"] + 1))]
    den.enable_cache(FirstBlockCacheConfig(threshold=10.0))  # every call after the first step reuses the tail
    try:
        go(pipe)
        alone = dict(rows)
        rows.update(first=0, tail=0)
        with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=3, after="cond")) as hook:
            go(pipe)
    finally:
        den.disable_cache()
        for h in handles:
            h.remove()
    assert alone == {"first": 2 * STEPS, "tail": 2}  # the cache skips the tail after the first step
    assert hook.evaluations_per_image() == [2 * 3 + 3] * 2 and rows == {"first": 2 * 3 + 3, "tail": 2}


# -- trajectories on a video pipeline: x0-hat of every frame at every step --------------------------------------
def test_a_wan_trajectory_ends_at_the_pipelines_latents(wan):
    """Under Euler flow matching the last step lands exactly on its call's x0-hat (x_t - sigma v), so the recorded
    x0-hat of every frame at the last step equals the latents the pipeline returns."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from shapefirst.trace import TrajectoryRecorder

    own, wan.scheduler = wan.scheduler, FlowMatchEulerDiscreteScheduler(shift=3.0)
    rec = TrajectoryRecorder()
    try:
        with guidance_schedule(wan, GuidanceSchedule(W, stop_step=3, after="cond"), rec):
            gens = [torch.Generator().manual_seed(i) for i in range(2)]
            lat = wan(PROMPTS, negative_prompt="", height=16, width=16, num_frames=5, num_inference_steps=STEPS,
                      guidance_scale=W, max_sequence_length=16, output_type="latent", generator=gens).frames
    finally:
        wan.scheduler = own
    traj = rec.trajectory
    x0 = traj.arrays["x0"]  # [calls, videos, C, frames, H, W]
    assert traj.n_calls == STEPS and tuple(x0.shape[:2]) == (STEPS, 2) and x0.shape[3] == 2  # 2 latent frames
    assert traj.guided[:3].all() and not traj.guided[3:].any()
    assert torch.allclose(x0[-1], lat.float(), atol=1e-5)


# -- Wan image-to-video: the image embeddings go to both branches ------------------------------------------------
def test_wan_image_to_video_stop_equals_diffusers_with_the_kept_branch(tmp_path):
    from PIL import Image

    from shapefirst.tiny import tiny_wan_i2v_pipeline, wan_text_pipeline

    pipe = tiny_wan_i2v_pipeline()
    pe, ne = wan_text_pipeline(pipe).encode_prompt(PROMPTS, negative_prompt=[""] * 2, max_sequence_length=16)
    img = Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype("uint8"))

    def go(**kw):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        return pipe(image=img, prompt_embeds=pe, negative_prompt_embeds=ne, height=16, width=16, num_frames=5,
                    num_inference_steps=STEPS, guidance_scale=W, output_type="np", generator=gens, **kw).frames

    plain = go()
    ref = go(callback_on_step_end=keep_from(3, "cond"),
             callback_on_step_end_tensor_inputs=["prompt_embeds", "negative_prompt_embeds"])
    with guidance_schedule(pipe, GuidanceSchedule(W)):
        assert np.array_equal(go(), plain)
    with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=3, after="cond")) as hook:
        got = go()
    assert np.array_equal(got, ref) and hook.evaluations_per_image() == [2 * 3 + 3] * 2


# -- the command line on a local Wan folder: a video a user opens ---------------------------------------------
def test_the_cli_generates_a_video_from_a_wan_folder(wan, tmp_path, capsys):
    import json

    from PIL import Image

    from shapefirst.cli import main

    folder = tmp_path / "wan"
    wan.save_pretrained(folder, safe_serialization=True)
    code = main(["generate", "a red circle moving left", "--model", str(folder), "--steps", "4", "--guidance", "5",
                 "--guidance-stop", "0.5", "--after", "cond", "--height", "16", "--width", "16", "--num-frames", "5",
                 "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    run_json = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run_json["images"] == ["video_000.webp"] and run_json["denoiser_evaluations_per_image"] == [2 * 2 + 2]
    with Image.open(tmp_path / "out" / "video_000.webp") as im:
        assert im.n_frames == 5 and im.size == (16, 16)
    assert "1 videos ->" in capsys.readouterr().err


def test_generate_runs_flux_with_true_cfg(flux):
    """shapefirst.generate gives Flux its CFG scale as true_cfg_scale and an empty negative prompt: both branches
    run while guided (without a negative prompt Flux would run no true CFG: one call per step)."""
    from shapefirst.generate import generate

    res = generate(flux, PROMPTS, GuidanceSchedule(W, stop_step=3, after="cond"), steps=STEPS, height=16, width=16,
                   max_sequence_length=16)
    assert res.images.shape == (2, 16, 16, 3) and res.evaluations_per_image == [2 * 3 + STEPS - 3] * 2
