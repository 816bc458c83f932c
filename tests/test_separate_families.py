"""Separate-call families added by name (#32 items 1-3, 5): Qwen-Image (true CFG), Lumina 2, CogView4, Chroma,
HunyuanVideo (true CFG, video), on tiny in-code components (nothing from a hub; the tokenizers are trained in code).
For each: no stop is bit-identical to the plain pipeline; a stop equals a reference built without shapefirst (the
pipeline's own step-end callback giving the other branch the kept branch's embeddings where it accepts
negative_prompt_embeds as a callback tensor: CogView4; else a plain torch forward pre-hook, KeptFrom, that does the
same to the denoiser's arguments); 2 prompts x 2 images equal their solo runs; per-image adaptive stops equal solo
runs at those stops; evaluations equal an independent count of the rows the denoiser computes (a forward pre-hook on
its first layer); shapefirst.generate runs the family; the CLI runs a saved Qwen-Image folder. Lumina 2: its own
cfg_trunc_ratio and a stop at the same step give the same images."""
import numpy as np
import pytest
import torch

from shapefirst.families import family_of_pipe
from shapefirst.guidance import GuidanceSchedule, guidance_schedule
from shapefirst.tiny import (QWEN_TEMPLATE, tiny_chroma_pipeline, tiny_cogview4_pipeline, tiny_hunyuanvideo_pipeline,
                             tiny_lumina2_pipeline, tiny_qwenimage_pipeline)

from conftest import RowCount, keep_from

PROMPTS = ["a red circle on the left", "a large blue striped square"]  # different lengths: padding masks matter
SAME_LENGTH = ["a red circle on the left", "a blue square on the right"]
NEG = "a green triangle"
STEPS, W = 5, 4.0


class Spec:
    """How a family's tiny pipeline is called: its text arguments, the call argument of its CFG scale, its first
    layer (runs once per row computed) and its branch arguments (what the reference swaps)."""

    def __init__(self, make, first, branch_args, scale_arg="guidance_scale", callback=False, video=False, **call):
        self.make, self.first, self.branch_args, self.scale_arg, self.call = make, first, branch_args, scale_arg, call
        self.callback = callback  # its step-end callback takes prompt_embeds and negative_prompt_embeds
        self.video = video  # it returns .frames and counts num_videos_per_prompt


SPECS = {
    "qwenimage": Spec(tiny_qwenimage_pipeline, "img_in", ("encoder_hidden_states", "encoder_hidden_states_mask"),
                      scale_arg="true_cfg_scale", height=16, width=16, max_sequence_length=16),
    "lumina2": Spec(tiny_lumina2_pipeline, "x_embedder", ("encoder_hidden_states", "encoder_attention_mask"),
                    height=32, width=32, max_sequence_length=48),
    "cogview4": Spec(tiny_cogview4_pipeline, "patch_embed", ("encoder_hidden_states",), callback=True, height=16,
                     width=16, max_sequence_length=16),
    "chroma": Spec(tiny_chroma_pipeline, "x_embedder", ("encoder_hidden_states", "txt_ids", "attention_mask"),
                   height=16, width=16, max_sequence_length=16),
    "hunyuanvideo": Spec(tiny_hunyuanvideo_pipeline, "x_embedder",
                         ("encoder_hidden_states", "encoder_attention_mask", "pooled_projections"),
                         scale_arg="true_cfg_scale", video=True, height=16, width=16, num_frames=5,
                         max_sequence_length=16),
}


@pytest.fixture(scope="module", params=list(SPECS))
def fam(request):
    return request.param, SPECS[request.param].make()


def run(name, pipe, prompts=PROMPTS, per=1, seed=0, neg=NEG, w=W, **kw):
    spec = SPECS[name]
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts) * per)]
    text = {} if neg is None else {"negative_prompt": [neg] * len(prompts)}
    count = "num_videos_per_prompt" if spec.video else "num_images_per_prompt"
    out = pipe(prompts, num_inference_steps=STEPS, output_type="np", generator=gens, **{count: per},
               **{spec.scale_arg: w}, **text, **spec.call, **kw)
    return out.frames if spec.video else out.images


class KeptFrom:
    """A reference written without shapefirst: a plain torch forward pre-hook on the denoiser that, from step `k`
    on, gives the other branch's call the kept branch's arguments (`args`), so both calls compute the kept branch
    and the pipeline's u + w (c - u) is that branch. A new timestep starts a step, and every one of these pipelines
    calls its conditional branch first. The conditional arguments are the step's own first call's; the
    unconditional ones are `given` (recorded from an earlier plain run by `uncond_args`: the pipeline passes the
    same values every step and run)."""

    def __init__(self, module, k: int, kept: str, args: tuple[str, ...], given: dict | None = None):
        self.k, self.kept, self.args, self.given = k, kept, args, given
        self.step, self.t, self.cond = -1, None, None
        self.handle = module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        t = float(kwargs["timestep"].flatten()[0])
        first = t != self.t
        if first:
            self.step, self.t = self.step + 1, t
            self.cond = {a: kwargs[a] for a in self.args if a in kwargs}
        if self.step < self.k or first == (self.kept == "cond"):
            return None
        return args, {**kwargs, **(self.cond if self.kept == "cond" else self.given)}

    def close(self):
        self.handle.remove()


def uncond_args(name, pipe) -> dict:
    """The unconditional call's branch arguments in a plain run (a torch forward pre-hook: a step's second call)."""
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append({k: kw[k] for k in SPECS[name].branch_args if k in kw}), with_kwargs=True)
    try:
        run(name, pipe)
    finally:
        handle.remove()
    return seen[1]


def test_the_tiny_qwen_tokenizer_drops_exactly_the_template():
    """QwenImagePipeline drops the first prompt_template_encode_start_idx (34) positions of the chat-templated
    prompt: with the tiny tokenizer those are the template's system part and "<|im_start|>user\\n", so the
    embeddings start at the prompt's own first token, as with the real tokenizer."""
    pipe = tiny_qwenimage_pipeline()
    assert pipe.prompt_template_encode == QWEN_TEMPLATE
    tok, drop = pipe.tokenizer, pipe.prompt_template_encode_start_idx
    ids = tok(QWEN_TEMPLATE.format(PROMPTS[1]))["input_ids"]
    prefix = tok(QWEN_TEMPLATE.split("{}")[0])["input_ids"]
    assert drop == 34 and ids[:drop] == prefix
    assert tok.convert_ids_to_tokens(ids[drop:drop + 2]) == ["a", "Ġlarge"]


def test_the_tiny_llama3_tokenizer_crops_exactly_the_hunyuanvideo_template():
    """HunyuanVideoPipeline crops the first crop_start (95) positions of the templated prompt: with the tiny tokenizer
    those are <|begin_of_text|>, the template's system part and the user header, as with the real tokenizer."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    from shapefirst.tiny import tiny_llama3_tokenizer

    template, crop = DEFAULT_PROMPT_TEMPLATE["template"], DEFAULT_PROMPT_TEMPLATE["crop_start"]
    tok = tiny_llama3_tokenizer(template)
    ids = tok(template.format(PROMPTS[1]))["input_ids"]
    assert crop == 95 and ids[:crop] == tok(template.split("{}")[0])["input_ids"]
    assert tok.convert_ids_to_tokens(ids[crop:crop + 2]) == ["a", "Ġlarge"]


def test_the_family_is_known_by_name(fam):
    name, pipe = fam
    assert family_of_pipe(pipe) == name


def test_no_stop_is_bit_identical(fam):
    name, pipe = fam
    plain = run(name, pipe)
    with guidance_schedule(pipe, GuidanceSchedule(W)) as hook:
        got = run(name, pipe)
    assert np.array_equal(got, plain) and hook.evaluations_per_image() == [2 * STEPS] * 2


def reference(name, pipe, stop: int, after: str):
    """The images a stop at `stop` keeping `after` must give, made without shapefirst."""
    if stop == 0 and after == "cond":  # no guidance at all: the pipeline without CFG
        return run(name, pipe, neg=None, w=1.0)
    if SPECS[name].callback and stop > 0:  # diffusers' own step-end callback, acting after step stop - 1
        return run(name, pipe, callback_on_step_end=keep_from(stop, after),
                   callback_on_step_end_tensor_inputs=["prompt_embeds", "negative_prompt_embeds"])
    given = uncond_args(name, pipe) if after == "uncond" else None
    ref = KeptFrom(pipe.transformer, stop, after, SPECS[name].branch_args, given)
    try:
        return run(name, pipe)
    finally:
        ref.close()


@pytest.mark.parametrize("after", ["cond", "uncond"])
@pytest.mark.parametrize("stop", [0, 2])
def test_a_stop_equals_the_reference_and_counts_rows(fam, stop, after):
    name, pipe = fam
    ref = reference(name, pipe, stop, after)
    count = RowCount(getattr(pipe.transformer, SPECS[name].first))
    try:
        with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=stop, after=after)) as hook:
            got = run(name, pipe)
    finally:
        count.handle.remove()
    want = 2 * stop + STEPS - stop
    assert np.array_equal(got, ref) and not np.array_equal(got, run(name, pipe))
    assert hook.evaluations_per_image() == [want] * 2 and count.rows == 2 * want


def test_two_prompts_two_images_equal_their_solo_runs(fam):
    """2 prompts x 2 images under a stop equal each prompt's own run. The prompts have the same number of tokens:
    with different lengths the pipelines' own text encoding depends on which prompts share the batch (padding;
    measured on the plain tiny Qwen-Image pipeline, PROMPTS: 0.004 between the batch and its solo runs; 0.0 with
    SAME_LENGTH)."""
    name, pipe = fam
    lengths = {len(pipe.tokenizer(p)["input_ids"]) for p in SAME_LENGTH}
    assert len(lengths) == 1, lengths
    with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=2, after="cond")) as hook:
        both = run(name, pipe, SAME_LENGTH, per=2)
        assert hook.evaluations_per_image() == [2 * 2 + STEPS - 2] * 4
        solo = [run(name, pipe, [p], per=2, seed=2 * i) for i, p in enumerate(SAME_LENGTH)]
    gap = float(np.abs(both - np.concatenate(solo)).max())
    assert gap <= 1e-5, gap


def test_generate_runs_the_family(fam):
    from shapefirst.generate import generate

    name, pipe = fam
    res = generate(pipe, PROMPTS, GuidanceSchedule(W, stop_step=2, after="cond"), steps=STEPS, negative_prompt=NEG,
                   **SPECS[name].call)
    size = SPECS[name].call["height"]
    assert res.images.shape[0] == 2 and res.images.shape[-3:] == (size, size, 3)
    assert res.evaluations_per_image == [2 * 2 + STEPS - 2] * 2
    with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=2, after="cond")):
        direct = run(name, pipe)
    assert np.array_equal(res.images, direct)


def branch_cosines(name, pipe, step: int) -> list[float]:
    """Per image, the cosine similarity of the two branches' predictions at `step` of a plain run (a torch forward
    hook on the denoiser; the conditional call comes first)."""
    outs = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, o: outs.append(o[0].flatten(1).double()))
    try:
        run(name, pipe, SAME_LENGTH)
    finally:
        handle.remove()
    return torch.nn.functional.cosine_similarity(outs[2 * step], outs[2 * step + 1], dim=1).tolist()


def test_per_image_adaptive_stops_equal_solo_runs_at_those_stops(fam):
    """An adaptive threshold between the two images' branch agreement at call 1 (measured on a plain run) stops
    them at different steps within one batch (after="uncond": an unguided image's first call of a step computes the
    negative branch, with its own arguments, beside a guided image's conditional row); each image equals its solo
    run with a fixed stop at its step, and the rows the first layer sees are the evaluations."""
    from shapefirst.guidance import AdaptiveStop

    name, pipe = fam
    cos = branch_cosines(name, pipe, 1)
    assert cos[0] != cos[1], cos
    count = RowCount(getattr(pipe.transformer, SPECS[name].first))
    try:
        adaptive = AdaptiveStop(sum(cos) / 2, min_call=1)
        with guidance_schedule(pipe, GuidanceSchedule(W, adaptive=adaptive, after="uncond")) as hook:
            both = run(name, pipe, SAME_LENGTH)
    finally:
        count.handle.remove()
    stops, evals = hook.stop_calls.tolist(), hook.evaluations_per_image()
    assert stops[int(cos[1] > cos[0])] == 2 and stops[int(cos[1] < cos[0])] in (-1, 3, 4)
    assert count.rows == sum(evals) and evals == [2 * s + STEPS - s if s >= 0 else 2 * STEPS for s in stops]
    for i, (p, s) in enumerate(zip(SAME_LENGTH, stops)):
        sched = GuidanceSchedule(W, stop_step=s if s >= 0 else STEPS, after="uncond")
        with guidance_schedule(pipe, sched):
            solo = run(name, pipe, [p], seed=i)
        assert float(np.abs(both[i] - solo[0]).max()) <= 1e-5


# -- the command line on a saved tiny Qwen-Image folder --------------------------------------------------------
def test_the_cli_generates_from_a_qwenimage_folder(tmp_path, capsys):
    """`shapefirst generate --model FOLDER` on a save_pretrained tiny Qwen-Image: the CFG scale goes in as
    true_cfg_scale with an empty negative prompt (the family's call defaults), and the image equals the same run
    through shapefirst.generate on the in-memory pipeline that was saved (tokenizer and weights round-trip)."""
    import json

    from PIL import Image

    from shapefirst.cli import main
    from shapefirst.generate import generate

    folder, pipe = tmp_path / "qwen", tiny_qwenimage_pipeline()
    pipe.save_pretrained(folder, safe_serialization=True)
    code = main(["generate", PROMPTS[0], "--model", str(folder), "--steps", "4", "--guidance", "5",
                 "--guidance-stop", "0.5", "--after", "cond", "--height", "16", "--width", "16",
                 "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    run_json = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run_json["images"] == ["image_000.png"] and run_json["denoiser_evaluations_per_image"] == [2 * 2 + 2]
    res = generate(pipe, [PROMPTS[0]], GuidanceSchedule(5.0, stop_step=2, after="cond"), steps=4, height=16,
                   width=16)
    with Image.open(tmp_path / "out" / "image_000.png") as im:
        assert np.array_equal(np.asarray(im), np.asarray(res.pil()[0]))


# -- Lumina 2's own truncation of guidance (cfg_trunc_ratio) beside a shapefirst stop ---------------------------
@pytest.fixture(scope="module")
def lumina2():
    return tiny_lumina2_pipeline()


def test_lumina2_truncation_and_a_stop_at_the_same_step_give_the_same_images(lumina2):
    """cfg_trunc_ratio=0.4 of 5 steps: Lumina 2 makes its conditional call alone from step 2 ((i + 1) / 5 > 0.4) and
    uses it as the prediction. A shapefirst stop at step 2 keeping the conditional branch runs both calls as the
    conditional branch, and the pipeline's u + w (c - u), renormalised to |c|, is c. Measured: the images are
    bit-identical (max abs difference 0.0), with the same rows computed (2 x 2 + 3 per image)."""
    trunc_count = RowCount(lumina2.transformer.x_embedder)
    try:
        trunc = run("lumina2", lumina2, cfg_trunc_ratio=0.4)
    finally:
        trunc_count.handle.remove()
    count = RowCount(lumina2.transformer.x_embedder)
    try:
        with guidance_schedule(lumina2, GuidanceSchedule(W, stop_step=2, after="cond")) as hook:
            stop = run("lumina2", lumina2)
    finally:
        count.handle.remove()
    assert float(np.abs(stop - trunc).max()) == 0.0
    assert hook.evaluations_per_image() == [2 * 2 + 3] * 2 and count.rows == trunc_count.rows == 2 * (2 * 2 + 3)
    assert not np.array_equal(trunc, run("lumina2", lumina2))


@pytest.mark.parametrize("stop", [None, 1, 4])
def test_lumina2_truncated_steps_are_one_call_under_any_schedule(lumina2, stop):
    """With cfg_trunc_ratio the truncated steps make one call (the conditional one) and are counted as unguided
    from the first of them: no stop or a later stop gives the truncated pipeline's own images; an earlier stop
    (cond kept) gives that stop's images, as without truncation."""
    plain = run("lumina2", lumina2, cfg_trunc_ratio=0.4)
    count = RowCount(lumina2.transformer.x_embedder)
    try:
        with guidance_schedule(lumina2, GuidanceSchedule(W, stop_step=stop, after="cond")) as hook:
            got = run("lumina2", lumina2, cfg_trunc_ratio=0.4)
    finally:
        count.handle.remove()
    first = min(2, STEPS if stop is None else stop)
    assert hook.evaluations_per_image() == [2 * first + STEPS - first] * 2 and count.rows == 2 * (first + STEPS)
    assert hook.stop_calls.tolist() == [first] * 2
    if stop == 1:
        with guidance_schedule(lumina2, GuidanceSchedule(W, stop_step=1, after="cond")):
            assert np.array_equal(got, run("lumina2", lumina2))
    else:
        assert np.array_equal(got, plain)


def test_a_lumina2_trajectory_ends_at_the_pipelines_latents(lumina2):
    """Lumina 2 gives its transformer 1 - t / 1000 and steps its scheduler with minus the transformer's output
    (Family.time_reversed, negated): mapped back, the recorded x0-hat of the last (unguided) step, x_t - sigma v
    under Euler flow matching, is exactly where the pipeline lands, its returned latents."""
    from shapefirst.trace import TrajectoryRecorder

    rec = TrajectoryRecorder()
    with guidance_schedule(lumina2, GuidanceSchedule(W, stop_step=3, after="cond"), rec):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        lat = lumina2(PROMPTS, negative_prompt=[NEG] * 2, guidance_scale=W, num_inference_steps=STEPS,
                      output_type="latent", generator=gens, **SPECS["lumina2"].call).images
    traj = rec.trajectory
    assert traj.n_calls == STEPS and traj.guided[:3].all() and not traj.guided[3:].any()
    sched = lumina2.scheduler.timesteps.double().numpy()
    assert np.allclose(traj.timesteps, sched, rtol=1e-5)  # the scheduler's timesteps, not 1 - t / 1000
    assert torch.allclose(traj.arrays["x0"][-1], lat.float(), atol=1e-5)
