"""The embedding analyses on the new families (#32 item 4): shapefirst.pipeline makes and passes the prompt embeddings
of Wan, Flux, CogVideoX and Chroma (encode_prompts, embeds_call), the [EOS] swap and the token ablation run on them,
and the families whose text has no single end token are refused in one line.

References, each written here without shapefirst.pipeline: every pipeline's own public encode_prompt (called as its
__call__ calls it, without autograd) and its own output from the prompt text (bit for bit); the swap written out with
plain tensor indexing from the pipeline's own embeddings and token ids (tokenizer's </s>), and the ablated embeddings
zeroed by hand; a plain pipeline call given them, seeded as shapefirst seeds image i (seed + i). Tiny in-code
pipelines, random weights: these tests prove the bookkeeping, not what a trained model does."""
import numpy as np
import pytest
import torch

from shapefirst.errors import ShapefirstError
from shapefirst.generate import generate
from shapefirst.guidance import GuidanceSchedule
from shapefirst.metrics import to_uint8
from shapefirst.pipeline import EMBEDDING_FAMILIES, call_defaults, embeds_call, encode_prompts
from shapefirst.report.page import not_applicable, with_call_defaults
from shapefirst.tiny import (tiny_chroma_pipeline, tiny_cogvideox_pipeline, tiny_cogview4_pipeline,
                             tiny_flux_pipeline, tiny_hunyuandit_pipeline, tiny_qwenimage_pipeline,
                             tiny_sana_pipeline, tiny_sd3_pipeline, tiny_wan_pipeline)
from shapefirst.tokens import denoiser_token_info

PROMPTS = ["a red circle on the left", "a small blue square"]
L, STEPS, W = 16, 2, 4.0
SIZE = {"wan": dict(height=16, width=16, num_frames=5), "flux": dict(height=16, width=16),
        "cogvideox": dict(height=16, width=16, num_frames=9), "chroma": dict(height=16, width=16)}
SCALE = {"flux": "true_cfg_scale"}  # the call argument of the CFG scale (Flux's guidance_scale is distilled)
MAKE = {"wan": tiny_wan_pipeline, "flux": tiny_flux_pipeline, "cogvideox": tiny_cogvideox_pipeline,
        "chroma": tiny_chroma_pipeline}


@pytest.fixture(scope="module")
def pipes():
    return {name: make() for name, make in MAKE.items()}


def gens(n, seed=0):
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]


def latents(pipe, name, **kw):
    """The pipeline's own latents (no decoding) under CFG at W, image i seeded with i."""
    n = len(kw["prompt"]) if "prompt" in kw else kw["prompt_embeds"].shape[0]
    out = pipe(num_inference_steps=STEPS, output_type="latent", generator=gens(n), max_sequence_length=L,
               **{SCALE.get(name, "guidance_scale"): W}, **SIZE[name], **kw)
    return out.frames if hasattr(out, "frames") else out.images


@torch.no_grad()  # as the pipeline's __call__ runs its encode_prompt
def reference_embeds(pipe, name, prompts):
    """{call argument: tensor} of the pipeline's own encode_prompt for `prompts` and the empty negative prompt."""
    neg = [""] * len(prompts)
    if name == "flux":  # one prompt's embeddings per call: the negative prompt is encoded as its true CFG does
        c, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=L)
        u, upooled, _ = pipe.encode_prompt(neg, prompt_2=None, max_sequence_length=L)
        return {"prompt_embeds": c, "negative_prompt_embeds": u, "pooled_prompt_embeds": pooled,
                "negative_pooled_prompt_embeds": upooled}
    if name == "chroma":
        c, _, mask, u, _, umask = pipe.encode_prompt(prompts, negative_prompt=neg, max_sequence_length=L)
        return {"prompt_embeds": c, "negative_prompt_embeds": u, "prompt_attention_mask": mask,
                "negative_prompt_attention_mask": umask}
    c, u = pipe.encode_prompt(prompts, negative_prompt=neg, num_videos_per_prompt=1, max_sequence_length=L)
    return {"prompt_embeds": c, "negative_prompt_embeds": u}


def infos_of(pipe, prompts):
    return [denoiser_token_info(pipe, p, max_sequence_length=L) for p in prompts]


# -- 1. the embeddings and the call arguments ------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MAKE))
def test_encode_prompts_are_the_pipelines_own_embeddings(pipes, name):
    """encode_prompts equals the pipeline's own encode_prompt, bit for bit; embeds_call passes every other tensor the
    pipeline's encode_prompt makes (Flux's pooled vectors, Chroma's masks: </s> and one padding position attended);
    a report runner's max_sequence_length (with_call_defaults) is the length encode_prompts makes by default."""
    pipe = pipes[name]
    ref = reference_embeds(pipe, name, PROMPTS)
    cond, uncond = encode_prompts(pipe, PROMPTS, max_sequence_length=L)
    assert cond.shape[1] == L and torch.equal(cond, ref["prompt_embeds"])
    assert torch.equal(uncond, ref["negative_prompt_embeds"])
    kw = embeds_call(pipe, cond, uncond, infos_of(pipe, PROMPTS))
    assert set(kw) == set(ref)
    for k, v in ref.items():
        assert kw[k].dtype == v.dtype and torch.equal(kw[k], v), k
    if name == "chroma":
        n_words = [ids.index(pipe.tokenizer.eos_token_id) for ids in pipe.tokenizer(PROMPTS).input_ids]
        assert kw["prompt_attention_mask"].sum(1).tolist() == [n + 2 for n in n_words]
    runner = with_call_defaults(pipe, {"max_sequence_length": L})
    assert torch.equal(encode_prompts(runner, PROMPTS)[0], cond)


@pytest.mark.parametrize("name", list(MAKE))
def test_a_call_with_embeds_call_arguments_is_the_call_with_the_text(pipes, name):
    """The pipeline given embeds_call(encode_prompts(...)) makes the very latents it makes from the prompt text (and
    the empty negative prompt). Flux's pooled vectors and Chroma's masks matter: the other prompt's pooled vectors,
    or every position attended, change them."""
    pipe = pipes[name]
    cond, uncond = encode_prompts(pipe, PROMPTS, max_sequence_length=L)
    kw = embeds_call(pipe, cond, uncond, infos_of(pipe, PROMPTS))
    want = latents(pipe, name, prompt=PROMPTS, negative_prompt=[""] * 2)
    assert torch.equal(latents(pipe, name, **kw), want)
    if name == "flux":
        other = {**kw, "pooled_prompt_embeds": kw["pooled_prompt_embeds"].flip(0)}
        assert not torch.allclose(latents(pipe, name, **other), want)
    if name == "chroma":
        every = {**kw, "prompt_attention_mask": torch.ones_like(kw["prompt_attention_mask"])}
        assert not torch.allclose(latents(pipe, name, **every), want)


def test_call_defaults_leave_the_negative_prompt_out_when_its_embeddings_are_given(pipes):
    """Flux's declared negative_prompt="" (its true CFG runs only with one) is not added next to
    negative_prompt_embeds (diffusers refuses both): generate from embeddings runs true CFG and gives the images
    of generate from the text with one empty negative prompt per prompt (the embeddings' layout; the declared ""
    alone makes a one-row negative that the transformer broadcasts, equal only to the last bits)."""
    pipe = pipes["flux"]
    assert call_defaults(pipe, {}) == {"negative_prompt": ""}
    assert call_defaults(pipe, {"negative_prompt_embeds": None}) == {}
    cond, uncond = encode_prompts(pipe, PROMPTS, max_sequence_length=L)
    kw = embeds_call(pipe, cond, uncond, infos_of(pipe, PROMPTS))
    size = dict(max_sequence_length=L, **SIZE["flux"])
    got = generate(pipe, None, GuidanceSchedule(W), steps=STEPS, seed=0, **kw, **size)
    want = generate(pipe, PROMPTS, GuidanceSchedule(W), steps=STEPS, seed=0, negative_prompt="", **size)
    assert got.evaluations_per_image == [2 * STEPS] * 2  # both branches ran: true CFG
    assert np.array_equal(got.images, want.images)


# -- 2. the runners --------------------------------------------------------------------------------------------------
def runner(pipes, name):
    """The pipeline as the report runs it at a tiny size (its calls default to it)."""
    return with_call_defaults(pipes[name], {"max_sequence_length": L, **SIZE[name]})


def still(pipe, name, seed=0, **kw):
    """The pipeline's own images (a video's middle frame) as uint8, image i seeded with seed + i."""
    n = kw["prompt_embeds"].shape[0]
    out = pipe(num_inference_steps=STEPS, output_type="np", generator=gens(n, seed), max_sequence_length=L,
               **{SCALE.get(name, "guidance_scale"): W}, **SIZE[name], **kw)
    im = out.frames if hasattr(out, "frames") else out.images
    return to_uint8(im[:, im.shape[1] // 2] if im.ndim == 5 else im)


def swap_by_hand(words, eos_of, ids_words, ids_eos, eos_id):
    """Row i: words[i] up to its </s>, then eos_of[i] from its </s> on (its last position repeated once it runs
    out)."""
    out = words.clone()
    for i in range(words.shape[0]):
        ea, eb = ids_words[i].index(eos_id), ids_eos[i].index(eos_id)
        for p in range(ea, words.shape[1]):
            out[i, p] = eos_of[i, min(eb + p - ea, words.shape[1] - 1)]
    return out


@pytest.mark.parametrize("name", ["wan", "flux"])
def test_eos_swap_runs_and_its_swap_is_the_swap_written_by_hand(pipes, name):
    """run_eos_swap on tiny Wan and Flux: A's and B's images are the pipeline's own from the text's embeddings, the
    swapped images are the pipeline's own given A's embeddings with B's [EOS] block moved in by hand (Flux: A's
    pooled vector, as the result says), the switch from call 0 is the swap and from the last call plain A; the
    result says what the swap moves there."""
    from shapefirst.experiments.eos_swap import run_eos_swap
    from shapefirst.pipeline import EOS_BLOCK_NOTES

    pipe, pairs, seed = runner(pipes, name), [tuple(PROMPTS), tuple(PROMPTS[::-1])], 3
    res = run_eos_swap(pipe, pairs, steps=STEPS, seed=seed, schedule=GuidanceSchedule(W), batch=2,
                       switch_calls=[0, STEPS])
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    ra, rb = reference_embeds(pipes[name], name, a), reference_embeds(pipes[name], name, b)
    tok = pipes[name].tokenizer_2 if name == "flux" else pipes[name].tokenizer
    ids = tok(a, padding="max_length", max_length=L).input_ids, tok(b, padding="max_length", max_length=L).input_ids
    swapped = {**ra, "prompt_embeds": swap_by_hand(ra["prompt_embeds"], rb["prompt_embeds"], *ids, tok.eos_token_id)}
    if name == "wan":  # its T5 states are zero after </s>: the swap changes A's </s> alone
        changed = (swapped["prompt_embeds"] != ra["prompt_embeds"]).any(-1)
        assert [row.nonzero().flatten().tolist() for row in changed] == [[r.index(tok.eos_token_id)] for r in ids[0]]
    arr = res.arrays
    assert torch.equal(arr["images_a"], still(pipes[name], name, seed, **ra))
    assert torch.equal(arr["images_b"], still(pipes[name], name, seed, **rb))
    assert torch.equal(arr["images_swap"], still(pipes[name], name, seed, **swapped))
    assert not torch.equal(arr["images_swap"], arr["images_a"])
    assert torch.equal(arr["switch_images"][0], arr["images_swap"]) and torch.equal(arr["switch_images"][1],
                                                                                     arr["images_a"])
    assert res.data["eos_block"] == EOS_BLOCK_NOTES[name] and EOS_BLOCK_NOTES[name] in res.data["notes"]


def test_the_swap_is_the_interventions_swap_on_the_same_embeddings(pipes):
    """What generate_swaps gives the pipeline as A words + B EOS is tokens.swapped of the same embeddings (Flux),
    recorded at the denoiser's conditional calls."""
    from shapefirst.experiments.eos_swap import generate_swaps
    from shapefirst.tokens import swapped

    pipe = runner(pipes, "flux")
    ca, _ = encode_prompts(pipe, PROMPTS)
    cb, _ = encode_prompts(pipe, PROMPTS[::-1])
    want = swapped(ca, infos_of(pipe, PROMPTS), cb, infos_of(pipe, PROMPTS[::-1]))
    seen = []
    hook = pipes["flux"].transformer.register_forward_pre_hook(
        lambda m, args, kw: seen.append(kw["encoder_hidden_states"]), with_kwargs=True)
    try:
        generate_swaps(pipe, list(zip(PROMPTS, PROMPTS[::-1])), steps=STEPS, schedule=GuidanceSchedule(W), batch=2)
    finally:
        hook.remove()
    per_condition = 2 * STEPS  # conditional + unconditional call per step: conditions a, b, swap, reverse
    assert len(seen) == 4 * per_condition
    swap_calls = seen[2 * per_condition:3 * per_condition]
    assert sum(torch.equal(e, want) for e in swap_calls) == STEPS


def test_token_ablation_runs_on_wan(pipes):
    """run_token_ablation on tiny Wan: plain is the pipeline's own video (its middle frame), eos_zero is the pipeline
    given the embeddings zeroed from </s> on by hand; keeping the first [EOS] position is plain (Wan's states after
    </s> are zeros), and the K/V variants are left out with kv_substitution's one-line reason."""
    from shapefirst.experiments.token_ablation import run_token_ablation

    pipe, seed = runner(pipes, "wan"), 1
    res = run_token_ablation(pipe, PROMPTS, steps=STEPS, seed=seed, schedule=GuidanceSchedule(W), batch=2,
                             n_eos=(0, 1), attention_kl=False)
    names = res.data["variants"]
    assert names == ["plain", "keep_eos_0", "keep_eos_1", "semantic_zero", "semantic_noise", "eos_zero", "eos_noise",
                     "sos_only", "eos_only"]
    assert res.data["identical_to"] == {"keep_eos_1": "plain"}
    kv = [n for n in res.data["notes"] if "no K/V substitution variants" in n]
    assert len(kv) == 1 and "WanAttention" in kv[0] and "\n" not in kv[0]
    ref = reference_embeds(pipes["wan"], "wan", PROMPTS)
    ids = pipes["wan"].tokenizer(PROMPTS, padding="max_length", max_length=L).input_ids
    zeroed = ref["prompt_embeds"].clone()
    for i, row in enumerate(ids):
        zeroed[i, row.index(pipes["wan"].tokenizer.eos_token_id):] = 0
    imgs = res.arrays["images"]
    assert imgs.shape[:2] == (len(names), 2)
    assert torch.equal(imgs[names.index("plain")], still(pipes["wan"], "wan", seed, **ref))
    assert torch.equal(imgs[names.index("eos_zero")], still(pipes["wan"], "wan", seed, **{**ref,
                                                                                        "prompt_embeds": zeroed}))
    assert res.data["scores"]["eos_zero"]["l1_to_plain"]["mean"] > 0


# -- 3. the refusals -------------------------------------------------------------------------------------------------
REFUSED = {"sana": (tiny_sana_pipeline, "Gemma"), "qwenimage": (tiny_qwenimage_pipeline, "chat template"),
           "cogview4": (tiny_cogview4_pipeline, "GLM"), "hunyuandit": (tiny_hunyuandit_pipeline, "BERT and T5"),
           "sd3": (tiny_sd3_pipeline, "CLIP and T5")}


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_family_without_one_end_token_is_refused_in_one_line(name):
    """eos-swap and token-ablation (and the report's sections) refuse a family whose text cannot carry the prompt in
    one end token with tokens.require_end_token's reason, in one line, before the denoiser runs."""
    from shapefirst.experiments.eos_swap import run_eos_swap
    from shapefirst.experiments.token_ablation import run_token_ablation
    from shapefirst.pipeline import denoiser_of

    make, why = REFUSED[name]
    pipe = make()
    calls = []
    hook = denoiser_of(pipe).register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for analysis, run in (("eos-swap", lambda: run_eos_swap(pipe, [tuple(PROMPTS)], steps=1)),
                              ("token-ablation", lambda: run_token_ablation(pipe, PROMPTS, steps=1))):
            with pytest.raises(ShapefirstError, match=why) as e:
                run()
            assert "\n" not in str(e.value) and not calls
            assert not_applicable(analysis, pipe) == str(e.value)
    finally:
        hook.remove()
    if name not in EMBEDDING_FAMILIES:  # encode_prompts itself names the families it makes embeddings for
        with pytest.raises(ShapefirstError, match=f"not for {name}"):
            encode_prompts(pipe, PROMPTS)
