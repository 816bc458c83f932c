"""Batched-CFG video families declared by name (#32 item 2): Latte, LTX-Video, Mochi, Allegro and EasyAnimate, on
tiny in-code components (shapefirst.tiny_videos); AnimateDiff, not served, refused in one line. For each family: no
stop is bit-identical to the plain pipeline; a stop equals a reference built without shapefirst (conftest.CondHalfOn:
the denoiser's forward wrapped by plain test code that, from the stop on, runs the conditional half of the batch and
returns it in both halves); evaluations equal an independent count of the rows a layer that runs once per row sees
(conftest.RowCount); 2 x 2 videos equal their solo runs; shapefirst.generate runs it; and a recorded trajectory's last
call decodes (its family's declared latent_layout) to the pipeline's own frames, the strip ending with them. Where a
pipeline or shapefirst falls short, the test says so and is marked as an expected failure (strict: it fails once the
shortfall is gone)."""
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from shapefirst.errors import ShapefirstError
from shapefirst.families import family
from shapefirst.guidance import GuidanceSchedule, guidance_schedule
from shapefirst.tiny_videos import (tiny_allegro_pipeline, tiny_animatediff_pipeline, tiny_easyanimate_pipeline,
                                    tiny_latte_pipeline, tiny_ltx_pipeline, tiny_mochi_pipeline)
from shapefirst.trace import TrajectoryRecorder
from shapefirst.video_strip import LAYOUT_DIMS, VIDEO_LAYOUTS

from conftest import CondHalfOn, stop_against_reference

PROMPTS = ["a red circle moving left", "a large blue striped square"]
STEPS, W = 4, 4.5
TOL = 1e-4


@dataclass(frozen=True)
class Spec:
    make: object
    call: dict  # call arguments besides the prompts, steps, scale, generators
    layout: str  # the declared Family.latent_layout
    counter: str  # a layer of the denoiser that runs once per computed CFG row (its first argument: the rows)
    per: str = "num_videos_per_prompt"  # the call argument counting videos per prompt
    frames: int = 2  # frames of each output video
    batch_prompts: tuple = tuple(PROMPTS)  # the prompts of the batch-vs-solo check
    per_video: tuple = ()  # (call argument, value) pairs the pipeline takes as a list, one value per video
    one_per_prompt: bool = False  # the pipeline makes one video per prompt whatever its count argument says
    per_prompt_args: tuple = ()  # (call argument, value) pairs the pipeline needs as a list, one value per prompt


SPECS = {
    # Latte counts videos with num_images_per_prompt; caption_projection sees one row per CFG row (its patch
    # embedding one per frame). Its own text encoding depends on the batch (see test_a_batch_equals_its_solo_runs)
    "latte": Spec(tiny_latte_pipeline, dict(height=16, width=16, video_length=2, clean_caption=False),
                  "video_per_frame", "caption_projection", per="num_images_per_prompt",
                  batch_prompts=(PROMPTS[0],) * 2),
    # LTX's packed tokens [tokens, C]; proj_in (its first layer) sees one row per CFG row. With a timestep-conditioned
    # VAE, LTXPipeline makes one decode_timestep per prompt, not per video (diffusers 0.42.1: more than one video per
    # prompt fails in its decode with a size mismatch), so it is given one per video (its default value, 0)
    "ltx": Spec(tiny_ltx_pipeline, dict(height=32, width=32, num_frames=9, max_sequence_length=16), "packed_video",
                "proj_in", frames=9, per_video=(("decode_timestep", 0.0),), batch_prompts=(PROMPTS[0],) * 2),
    # Mochi's latents [C, F, H, W]; time_embed (timestep and text first) sees one row per CFG row
    "mochi": Spec(tiny_mochi_pipeline, dict(height=16, width=16, num_frames=7, max_sequence_length=16), "video",
                  "time_embed", frames=7, batch_prompts=(PROMPTS[0],) * 2),
    # Allegro's VAE decodes tiles of 24 frames and 144 x 144 pixels only; caption_projection sees one row per CFG row;
    # its __call__ sets num_videos_per_prompt = 1 whatever it is given
    "allegro": Spec(tiny_allegro_pipeline, dict(height=144, width=144, num_frames=24, max_sequence_length=16,
                                                clean_caption=False), "video_frames_out", "caption_projection",
                    frames=24, one_per_prompt=True),
    # EasyAnimate counts videos with num_images_per_prompt and needs a negative prompt per prompt (one text for
    # several prompts is encoded once and then reshaped to the batch: its hidden size gets split); time_proj sees one
    # row per CFG row
    "easyanimate": Spec(tiny_easyanimate_pipeline, dict(height=16, width=16, num_frames=5), "video", "time_proj",
                        per="num_images_per_prompt", frames=5, per_prompt_args=(("negative_prompt", ""),)),
}


@pytest.fixture(scope="module", params=list(SPECS))
def fam(request):
    return request.param, SPECS[request.param].make()


def gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def run(name, pipe, prompts=PROMPTS, per=1, seed=0):
    spec = SPECS[name]
    n = len(prompts) * per
    out = pipe(prompts, num_inference_steps=STEPS, guidance_scale=W, output_type="np", generator=gens(n, seed),
               **{spec.per: per}, **spec.call, **{k: [v] * n for k, v in spec.per_video},
               **{k: [v] * len(prompts) for k, v in spec.per_prompt_args})
    return out.frames


def test_the_family_is_known_by_name_and_its_layout_fits(fam):
    name, pipe = fam
    declared = family(pipe)
    assert declared.name == name and declared.video and declared.latent_layout == SPECS[name].layout
    assert declared.latent_layout in VIDEO_LAYOUTS


def test_no_stop_is_bit_identical(fam):
    name, pipe = fam
    plain = run(name, pipe)
    with guidance_schedule(pipe, GuidanceSchedule(W)) as hook:
        got = run(name, pipe)
    assert got.shape[:2] == (2, SPECS[name].frames)
    assert np.array_equal(got, plain) and hook.evaluations_per_image() == [2 * STEPS] * 2


@pytest.mark.parametrize("stop", [0, 2])
def test_a_stop_equals_the_reference_and_counts_rows(fam, stop):
    name, pipe = fam
    den = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    ref, got, evals, rows, want = stop_against_reference(pipe, den, den.get_submodule(SPECS[name].counter),
                                                          lambda: run(name, pipe), stop, W, STEPS)
    assert np.array_equal(got, ref)
    assert evals == [want] * 2 and rows == 2 * want
    assert float(np.abs(got - run(name, pipe)).max()) > 1e-5  # the stop changes the videos (random text: a little)


def test_a_batch_equals_its_solo_runs(fam):
    """2 prompts x 2 videos under a stop equal each prompt's own 2-video run (seeded alike). Latte, LTX and Mochi batch
    one prompt twice: their encode_prompt tiles the T5 masks ([m0, m1, m0, m1]) while it repeats the embeddings per
    video ([p0, p0, p1, p1]), so with 2 prompts x 2 videos two videos get the other prompt's mask (plain pipelines,
    measured between that batch and its solo runs: Latte 2.4e-3, LTX 0.059, Mochi 0.106; 0.0 with one prompt twice,
    and at most 1e-6 with 2 prompts x 1 video)."""
    name, pipe = fam
    prompts = list(SPECS[name].batch_prompts)
    if SPECS[name].one_per_prompt:  # Allegro: each prompt given twice, one video each
        with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=2, after="cond")) as hook:
            both = run(name, pipe, [p for p in prompts for _ in range(2)])
            assert hook.evaluations_per_image() == [2 * 2 + STEPS - 2] * 4
            solo = [run(name, pipe, [p], seed=i) for i, p in enumerate(p for p in prompts for _ in range(2))]
        assert np.abs(both - np.concatenate(solo)).max() <= TOL
        return
    with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=2, after="cond")) as hook:
        both = run(name, pipe, prompts, per=2)
        assert hook.evaluations_per_image() == [2 * 2 + STEPS - 2] * 4
        solo = [run(name, pipe, [p], per=2, seed=2 * i) for i, p in enumerate(prompts)]
    assert np.abs(both - np.concatenate(solo)).max() <= TOL


def test_generate_runs_it(fam, request):
    """shapefirst.generate equals the pipeline called under the same schedule, with its evaluations (EasyAnimate given
    negative_prompt="", which generate passes once per prompt). Latte and EasyAnimate count videos with
    num_images_per_prompt: generate reads the name from the signature (pipeline_call.per_prompt_argument)."""
    from shapefirst.generate import generate

    name, pipe = fam
    sched = GuidanceSchedule(W, stop_step=2, after="cond")
    call = {k: v for k, v in SPECS[name].call.items() if k not in dict(family(pipe).call_defaults)}
    res = generate(pipe, PROMPTS, sched, steps=STEPS, **call, **dict(SPECS[name].per_prompt_args))
    with guidance_schedule(pipe, sched):
        direct = run(name, pipe)
    assert np.array_equal(res.images, direct) and res.evaluations_per_image == [2 * 2 + STEPS - 2] * 2


def hwc(x: torch.Tensor) -> np.ndarray:
    return x.movedim(-3, -1).numpy()


def q(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def test_the_trajectory_decodes_to_the_pipelines_frames(fam, tmp_path, request):
    """Recorded under a stop (calls 0 and 1 guided), the last call's x0-hat decoded as the family's layout says equals
    the pipeline's own frames within TOL; the first call's is another video; the strip (drawn at the first and last
    call) ends with each video's frames. Mochi's inverted sigmas are read as the signal's share (shapefirst.trace)."""
    name, pipe = fam
    spec = SPECS[name]
    rec = TrajectoryRecorder()
    with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=2, after="cond"), rec):
        ref = run(name, pipe)
    traj = rec.trajectory
    assert traj.layout == spec.layout and traj.arrays["x0"].dim() - 2 == LAYOUT_DIMS[spec.layout]
    assert traj.n_calls == STEPS and traj.guided[:2].all() and not traj.guided[2:].any()
    last = hwc(traj.decode(pipe.vae, "x0", [STEPS - 1])[0])
    assert last.shape == ref.shape
    assert float(np.abs(last - ref).max()) <= TOL
    assert float(np.abs(hwc(traj.decode(pipe.vae, "x0", [0])[0]) - ref).max()) > 0.01
    frames, h, w = ref.shape[1:4]
    with Image.open(traj.strip(pipe.vae, tmp_path / "strip.png", calls=[0, STEPS - 1], max_frames=frames)) as im:
        arr = np.asarray(im.convert("RGB"))
    assert arr.shape == (2 * 2 * h, frames * w, 3)
    for v in range(2):
        row = arr[(2 * v + 1) * h:(2 * v + 2) * h]  # video v's second row: the last call
        assert np.abs(row.astype(int) - np.concatenate(list(q(ref[v])), axis=1).astype(int)).max() <= 1


def test_packed_video_tokens_that_do_not_fit_the_call_are_refused():
    """LTX's packed tokens unpack with the call's height and width: a count that does not make whole latent frames of
    that size, or a call size not recorded, is one ShapefirstError."""
    from shapefirst.errors import ShapefirstError
    from shapefirst.video_strip import decode_latents

    vae = tiny_ltx_pipeline().vae
    good = decode_latents(vae, torch.zeros(1, 3 * 8 * 8, 8), "packed_video", 32, 32)
    assert good.shape == (1, 9, 3, 32, 32)
    for tokens, size in ((3 * 8 * 8 + 1, 32), (3 * 8 * 8, None)):
        with pytest.raises(ShapefirstError, match="packed video tokens"):
            decode_latents(vae, torch.zeros(1, tokens, 8), "packed_video", size, size)


def test_mochis_x0_from_its_inverted_sigma_decodes_to_its_frames():
    """Mochi's scheduler runs on inverted sigmas (invert_sigmas=True): call i gives the transformer t = 1000 s_i and
    the Euler step x + (s_(i+1) - s_i) v ends at s = 1, so the clean video is x_t + (1 - s_i) v (the noise level is
    1 - s_i). That x0, made here from the recorded x_t and combined prediction of the last call, decodes (layout
    "video", the VAE's latents_mean/std) to the pipeline's frames, and the recorded x0-hat is that x0."""
    from shapefirst.trace import Trajectory

    pipe = tiny_mochi_pipeline()
    rec = TrajectoryRecorder()
    with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=2, after="cond"), rec):
        ref = run("mochi", pipe)
    traj = rec.trajectory
    s = pipe.scheduler.sigmas[:STEPS].double()
    assert np.allclose(traj.timesteps, (1000 * s).numpy()) and float(s[-1]) < 1  # t = 1000 s: s is not the noise
    x0 = traj.arrays["x_t"][-1] + (1 - float(s[-1])) * traj.arrays["combined"][-1]
    hand = Trajectory(traj.timesteps[-1:], {"x0": x0[None]}, traj.guided[-1:], traj.meta)
    assert float(np.abs(hwc(hand.decode(pipe.vae)[0]) - ref).max()) <= TOL
    assert torch.allclose(traj.arrays["x0"][-1].float(), x0.float(), atol=1e-5)  # shapefirst.trace reads it so


def test_allegro_rotary_tables_as_long_as_the_cfg_batch_survive_a_stop():
    """A stop runs the kept rows alone, cutting the denoiser's arguments whose first dimension is the CFG batch
    (shapefirst.rows.rows_of), but never the per-position ones (rows.SHARED_ARGS): Allegro's rotary frequency tables
    (image_rotary_emb) are 8 long at 128 x 128 pixels, as the CFG batch of 4 videos, and stay whole (cut, the
    transformer failed with an IndexError)."""
    pipe = tiny_allegro_pipeline(sample_size=128)
    prompts = [p for p in PROMPTS for _ in range(2)]
    kw = dict(num_inference_steps=STEPS, guidance_scale=W, output_type="latent", height=128, width=128,
              num_frames=24, max_sequence_length=16, clean_caption=False)
    ref_wrap = CondHalfOn(pipe.transformer, lambda i: i >= 2)
    try:
        ref = pipe(prompts, generator=gens(4), **kw).frames
    finally:
        ref_wrap.close()
    with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=2, after="cond")):
        got = pipe(prompts, generator=gens(4), **kw).frames
    assert torch.equal(got, ref)


def test_animatediff_is_refused_in_one_line_its_text_rows_are_per_frame():
    """AnimateDiff is not served: its pipeline repeats the prompt embeddings per frame before the UNet
    (prompt_embeds.repeat_interleave(num_frames)), so the UNetMotionModel gets 2 x videos rows of latents but
    2 x videos x frames rows of text (seen here by a plain torch pre-hook); a stop runs some latent rows alone and
    would have to cut the text rows per frame, which the batched path does not do. shapefirst refuses the pipeline in
    one line before any denoiser call."""
    from shapefirst.errors import ShapefirstError

    pipe = tiny_animatediff_pipeline()
    seen = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, args, kw: seen.append((args[0].shape[0], kw["encoder_hidden_states"].shape[0])), with_kwargs=True)
    call = dict(num_inference_steps=2, guidance_scale=W, output_type="np", height=16, width=16, num_frames=3)
    try:
        pipe(PROMPTS, generator=gens(2), **call)
        assert seen == [(2 * 2, 2 * 2 * 3)] * 2
        with pytest.raises(ShapefirstError, match="'AnimateDiffPipeline' is not supported"):
            with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=1, after="cond")):
                pipe(PROMPTS, generator=gens(2), **call)
    finally:
        hook.remove()
    assert len(seen) == 2  # refused before the UNet ran


def test_what_the_video_families_refuse_is_one_line():
    """Late caches, transformer caches and attention capture where they cannot run on these families say so in one
    line before the pipeline runs (checked by hand that each would otherwise fail inside diffusers or read nothing):
    Latte's First Block Cache and MagCache (its blocks reshape the video differently), LTX-Video's attention capture
    (its attn2 runs LTX's own processor) and late cache (no classic cross-attention), Mochi's attention capture."""
    from shapefirst.attention import capture_attention
    from shapefirst.cache import LateCache, late_cache
    from shapefirst.transformer_cache import TransformerCache, transformer_cache

    latte, ltx, mochi = tiny_latte_pipeline(), tiny_ltx_pipeline(), tiny_mochi_pipeline()
    cases = [(lambda: transformer_cache(latte, TransformerCache("fbc")), "Latte's spatial and temporal blocks"),
             (lambda: transformer_cache(latte, TransformerCache("mag", mag_ratios=[1.0] * STEPS)),
              "Latte's spatial and temporal blocks"),
             (lambda: capture_attention(ltx), "finds no text-attention layer it can read in LTXVideoTransformer3D"),
             (lambda: capture_attention(mochi), "MochiTransformer3DModel has no attention processors")]
    for make, why in cases:
        with pytest.raises(ShapefirstError, match=why) as e:
            with make():
                pass
        assert "\n" not in str(e.value)
    with pytest.raises(ShapefirstError, match="no separate cross-attention modules") as e:
        with guidance_schedule(ltx, GuidanceSchedule(W, stop=0.5, after="cond")), late_cache(ltx, LateCache("kept")):
            pass
