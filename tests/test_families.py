"""SDXL, PixArt-alpha and SD3: guidance schedules, trajectories, attention capture and token classes,
each on a tiny in-code pipeline (random weights, offline tokenizers), against the plain pipeline."""
import math

import numpy as np
import pytest
import torch
from diffusers.callbacks import SD3CFGCutoffCallback, SDXLCFGCutoffCallback

from shapefirst.attention import capture_attention, cross_attention_layers
from shapefirst.errors import ShapefirstError
from shapefirst.generate import count_calls, generate
from shapefirst.guidance import GuidanceSchedule, cfg_active, guidance_schedule
from shapefirst.models import FAMILIES, family_of, family_of_pipe, set_scheduler
from shapefirst.pipeline import attention_context
from shapefirst.tiny import tiny_pixart_pipeline, tiny_sd3_pipeline, tiny_sdxl_pipeline, tiny_t5_tokenizer
from shapefirst.trace import TrajectoryRecorder, predicted_x0
from shapefirst.tokens import (analyze_prompt, classify_ids, denoiser_token_info,
                               prompt_token_infos)

from conftest import gens

PROMPTS = ["a red circle on the left", "a small blue striped square at the top"]
STEPS = 4
W = 5.0
BUILDERS = {"sdxl": tiny_sdxl_pipeline, "pixart": tiny_pixart_pipeline, "sd3": tiny_sd3_pipeline}
EXTRA = {"sdxl": {}, "pixart": dict(use_resolution_binning=False, clean_caption=False), "sd3": {}}
LATENT_CHANNELS = {"sdxl": 4, "pixart": 4, "sd3": 16}
CALLBACKS = {"sdxl": SDXLCFGCutoffCallback, "sd3": SD3CFGCutoffCallback}


_PIPES = {}


def _pipe(name, tmp_path_factory):
    if name not in _PIPES:
        _PIPES[name] = BUILDERS[name](folder=tmp_path_factory.mktemp(name))
    return name, _PIPES[name]


@pytest.fixture(scope="module", params=list(BUILDERS))
def fam(request, tmp_path_factory):
    return _pipe(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=list(CALLBACKS))
def callback_fam(request, tmp_path_factory):
    return _pipe(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return _pipe("sd3", tmp_path_factory)


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    return _pipe("pixart", tmp_path_factory)


def plain(name, pipe, prompts, steps=STEPS, seed=0, w=W, **kw):
    return pipe(prompts, num_inference_steps=steps, guidance_scale=w, generator=gens(seed, len(prompts)),
                output_type="np", **EXTRA[name], **kw).images


def gen(name, pipe, prompts, schedule=None, steps=STEPS, **kw):
    return generate(pipe, prompts, schedule or GuidanceSchedule(scale=W), steps=steps, **EXTRA[name], **kw)


def first_inner_module(pipe):
    """A module inside the denoiser that every row passes through (below the guidance hook)."""
    return pipe.unet.conv_in if hasattr(pipe, "unet") else pipe.transformer.pos_embed


class RowCounter:
    def __init__(self, module):
        self.rows = self.calls = 0
        self.h = module.register_forward_pre_hook(self)

    def __call__(self, mod, args):
        self.rows += args[0].shape[0]
        self.calls += 1

    def remove(self):
        self.h.remove()


# -- guidance ------------------------------------------------------------------------------------
def test_family_detection(fam):
    name, pipe = fam
    assert family_of_pipe(pipe) == name and type(pipe).__name__ in FAMILIES[name]


def test_no_stop_is_bit_identical_to_the_plain_pipeline(fam):
    name, pipe = fam
    ref = plain(name, pipe, PROMPTS)
    for sched in (GuidanceSchedule(scale=W), GuidanceSchedule(scale=W, stop=1.0)):
        res = gen(name, pipe, PROMPTS, sched)
        assert np.array_equal(res.images, ref)
        assert res.evaluations_per_image == [2 * STEPS] * 2


def test_stop_zero_cond_equals_the_pipeline_without_cfg(fam):
    """k = 0, after="cond": only the conditional rows ever run = diffusers with guidance_scale 1."""
    name, pipe = fam
    ref = plain(name, pipe, PROMPTS, w=1.0)
    res = gen(name, pipe, PROMPTS, GuidanceSchedule(scale=W, stop=0.0, after="cond"))
    assert np.array_equal(res.images, ref)
    assert res.evaluations_per_image == [STEPS] * 2


@pytest.mark.parametrize("k", [1, 3])
def test_cond_mode_equals_diffusers_cfg_cutoff_callback(callback_fam, k):
    """PixArt has no callback_on_step_end: see test_pixart_cond_mode_by_trajectory_and_rows."""
    name, pipe = callback_fam
    cb = CALLBACKS[name](cutoff_step_ratio=None, cutoff_step_index=k - 1)
    ref = plain(name, pipe, PROMPTS[:1], callback_on_step_end=cb, callback_on_step_end_tensor_inputs=cb.tensor_inputs)
    res = gen(name, pipe, PROMPTS[:1], GuidanceSchedule(scale=W, stop_step=k, after="cond"))
    assert np.array_equal(res.images, ref)
    assert not np.array_equal(res.images, plain(name, pipe, PROMPTS[:1]))  # the stop changed something
    assert res.evaluations_per_image == [2 * k + (STEPS - k)]


def test_pixart_cond_mode_by_trajectory_and_rows(pixart):
    """No diffusers callback for PixArt: from call k on, the combined prediction is the conditional
    branch, only that row runs, and it equals the transformer run alone on the recorded input."""
    name, pipe = pixart
    k = 2
    counter = RowCounter(first_inner_module(pipe))
    try:
        res = gen(name, pipe, PROMPTS[:1], GuidanceSchedule(scale=W, stop_step=k, after="cond"), trace=True)
    finally:
        counter.remove()
    tr = res.trajectory
    assert counter.calls == STEPS and counter.rows == 2 * k + (STEPS - k) == res.evaluations_per_image[0]
    assert tr.guided[:k].all() and not tr.guided[k:].any()
    assert torch.isnan(tr.arrays["uncond"][k:]).all() and not torch.isnan(tr.arrays["cond"]).any()
    assert torch.equal(tr.arrays["combined"][k:], tr.arrays["cond"][k:])
    w_comb = tr.arrays["uncond"][:k] + W * (tr.arrays["cond"][:k] - tr.arrays["uncond"][:k])
    assert torch.allclose(tr.arrays["combined"][:k], w_comb)
    emb, mask, _, _ = pipe.encode_prompt(PROMPTS[0], do_classifier_free_guidance=False, device="cpu",
                                         clean_caption=False)
    x = tr.arrays["x_t"][k]
    with torch.no_grad():
        alone = pipe.transformer(x, encoder_hidden_states=emb, encoder_attention_mask=mask,
                                 timestep=torch.tensor([tr.timesteps[k]]).long(),
                                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    assert torch.allclose(alone[:, :4], tr.arrays["cond"][k], atol=1e-5)
    # all calls guided = the plain pipeline
    full = gen(name, pipe, PROMPTS[:1], GuidanceSchedule(scale=W, stop_step=STEPS, after="cond"))
    assert np.array_equal(full.images, plain(name, pipe, PROMPTS[:1]))


@pytest.mark.parametrize("stop", [0.0, 0.5, None])
def test_evaluation_counts_match_an_independent_count(fam, stop):
    name, pipe = fam
    n_calls = count_calls(pipe, STEPS)
    sched = GuidanceSchedule(scale=W, stop=stop, after="uncond")
    k = sched.first_unguided_call(n_calls)
    counter = RowCounter(first_inner_module(pipe))
    try:
        res = gen(name, pipe, PROMPTS, sched)
    finally:
        counter.remove()
    per_image = 2 * k + (n_calls - k)
    assert counter.calls == n_calls and res.evaluations_per_image == [per_image] * 2
    assert counter.rows == 2 * per_image


def test_cfg_detection_without_a_pipeline_flag(fam):
    """PixArt has neither do_classifier_free_guidance nor guidance_scale: the halves rule."""
    name, pipe = fam
    x = torch.randn(2, 4, 8, 8)
    if name == "pixart":
        assert not hasattr(pipe, "do_classifier_free_guidance") and not hasattr(pipe, "guidance_scale")
        assert cfg_active(pipe, torch.cat([x[:1], x[:1]])) and not cfg_active(pipe, x)
        assert not cfg_active(pipe, x[:1])
    # a run with guidance 1 (no CFG) under a schedule with scale > 1 is recognised as unguided
    # (generate always passes schedule.scale: call the pipeline directly)
    with guidance_schedule(pipe, GuidanceSchedule(scale=W)) as hook:
        out = plain(name, pipe, PROMPTS, steps=2, w=1.0)
    assert hook.evaluations_per_image() == [2, 2] and np.array_equal(out, plain(name, pipe, PROMPTS, steps=2, w=1.0))


# -- trajectories --------------------------------------------------------------------------------
def test_trajectory_keeps_images_and_records_x0(fam, monkeypatch):
    name, pipe = fam
    steps_seen = []
    original_step = pipe.scheduler.step

    def step(*a, **kw):
        out = original_step(*a, **kw)
        steps_seen.append(out)
        return out

    monkeypatch.setattr(pipe.scheduler, "step", step)
    ref = plain(name, pipe, PROMPTS)
    steps_seen.clear()
    res = gen(name, pipe, PROMPTS, trace=True)
    assert np.array_equal(res.images, ref)
    tr = res.trajectory
    c = LATENT_CHANNELS[name]
    for key in ("x_t", "uncond", "cond", "combined", "x0"):
        assert tr.arrays[key].shape == (STEPS, 2, c, 8, 8), key  # PixArt: learned variance dropped
    assert torch.isfinite(tr.arrays["x0"]).all()
    if name == "sd3":  # FlowMatchEuler exposes no pred_original_sample: the last step lands on x0
        assert tr.meta["prediction_type"] == "flow"
        return
    assert len(steps_seen) == STEPS
    for i, out in enumerate(steps_seen):  # (prev_sample, pred_original_sample) of DDIM / Euler
        assert torch.allclose(tr.arrays["x0"][i], out[1].float(), atol=1e-4, rtol=1e-4), i


def test_sd3_x0_is_the_final_latent_at_the_last_call(sd3):
    name, pipe = sd3
    rec = TrajectoryRecorder()
    with guidance_schedule(pipe, GuidanceSchedule(scale=W), rec):
        lat = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=W, generator=gens(0, 2),
                   output_type="latent").images
    tr = rec.trajectory
    assert torch.allclose(tr.arrays["x0"][-1], lat.float(), atol=1e-5)


def test_flow_matching_x0_formula_against_the_scheduler_step():
    """x_next = x0 + sigma_next * v for x0 = x_t - sigma v, sigma from the (shifted) schedule."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    for shift in (1.0, 3.0):
        sch = FlowMatchEulerDiscreteScheduler(shift=shift)
        sch.set_timesteps(5)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 16, 4, 4, generator=g)
        for i, t in enumerate(sch.timesteps):
            assert math.isclose(float(t) / 1000, float(sch.sigmas[i]), rel_tol=1e-6)
            v = torch.randn(x.shape, generator=g)
            x0 = predicted_x0(sch, float(t), x, v)
            nxt = sch.step(v, t, x, return_dict=False)[0]
            assert torch.allclose(nxt, x0 + float(sch.sigmas[i + 1]) * v, atol=1e-5)
            x = nxt


# -- attention -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def captured(fam):
    name, pipe = fam
    ref = plain(name, pipe, PROMPTS)
    with capture_attention(pipe, keep="mean") as cap:
        out = gen(name, pipe, PROMPTS).images
    return ref, out, cap


def test_attention_capture_is_bit_identical(captured):
    ref, out, _ = captured
    assert np.array_equal(ref, out)


def test_attention_layers_per_family(fam, captured):
    name, pipe = fam
    cap = captured[2]
    den = pipe.unet if name == "sdxl" else pipe.transformer
    assert cap.layers == cross_attention_layers(den) and cap.layers
    suffix = "attn" if name == "sd3" else "attn2"
    assert all(layer.endswith(suffix) for layer in cap.layers)
    if name == "sd3":
        assert all(den.get_submodule(layer).add_k_proj is not None for layer in cap.layers)


def test_probabilities_are_distributions_over_the_text_tokens(fam, captured):
    name, pipe = fam
    cap = captured[2]
    n_tok = {"sdxl": 77, "pixart": 120, "sd3": 77 + 256}[name]
    assert cap.n_calls == STEPS and cap.mass.shape == (STEPS, 2, n_tok)
    assert cap.row_labels == [["uncond:0", "uncond:1", "cond:0", "cond:1"]] * STEPS
    for (_, layer), m in cap.maps.items():
        h, w = cap.spatial[layer]
        assert m.shape == (2, h * w, n_tok) and (m >= 0).all()
        assert torch.allclose(m.sum(-1), torch.ones(()), atol=1e-5)
    assert torch.allclose(cap.mass.sum(-1), torch.ones(STEPS, 2), atol=1e-5)
    infos = [denoiser_token_info(pipe, p) for p in PROMPTS]
    cm = cap.class_mass(infos)
    total = sum(cm.values())
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5) and (cm["semantic"] > 0).all()
    if name == "pixart":  # padding is masked out of the cross-attention: exactly zero
        assert (cm["pad"] == 0).all() and (cm["sos"] == 0).all()
        for (_, layer), m in cap.maps.items():
            for i, info in enumerate(infos):
                assert (m[i][:, info.class_mask("pad")] == 0).all()
    if name == "sd3":
        share = cap.text_share
        assert share.shape == (STEPS, 2) and ((share > 0) & (share < 1)).all()
    else:
        assert torch.isnan(cap.text_share).all()


def _grab_inputs(module):
    seen = []

    def grab(mod, args, kwargs):
        if not seen:
            hs = args[0] if args else kwargs["hidden_states"]
            seen.append((hs.clone(), kwargs.get("encoder_hidden_states"), kwargs.get("attention_mask")))

    return seen, module.register_forward_pre_hook(grab, with_kwargs=True)


def test_probabilities_match_a_hand_computation(fam):
    """PixArt: masked cross-attention softmax; SD3: the text part of the joint softmax, renormalised."""
    name, pipe = fam
    layer = cross_attention_layers(pipe.unet if name == "sdxl" else pipe.transformer)[0]
    attn = (pipe.unet if name == "sdxl" else pipe.transformer).get_submodule(layer)
    seen, handle = _grab_inputs(attn)
    try:
        with capture_attention(pipe, layers=[layer], calls=[0]) as cap:
            gen(name, pipe, PROMPTS, steps=1)
    finally:
        handle.remove()
    hs, ctx, mask = seen[0]
    b, heads = hs.shape[0], attn.heads
    d = attn.to_q.out_features // heads
    with torch.no_grad():
        q = attn.to_q(hs).view(b, -1, heads, d).transpose(1, 2)
        if name == "sd3":
            k = torch.cat([attn.to_k(hs), attn.add_k_proj(ctx)], 1).view(b, -1, heads, d).transpose(1, 2)
            p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)[..., hs.shape[1]:]
            share = p.sum(-1)
            p = p / share.unsqueeze(-1)
            assert torch.allclose(cap.text_share[0], share[b // 2:].mean(dim=(1, 2)), atol=1e-5)
        else:
            k = attn.to_k(ctx).view(b, -1, heads, d).transpose(1, 2)
            s = q @ k.transpose(-1, -2) / math.sqrt(d)
            if mask is not None:
                s = s + mask.unsqueeze(1)  # [b, 1, tokens] bias -> every head and pixel
            p = torch.softmax(s, dim=-1)
    assert torch.allclose(cap.maps[(0, layer)], p[b // 2:].mean(1), atol=1e-5)
    if name == "pixart":
        assert mask is not None and (mask[b // 2:] < -1000).any()


def test_attention_labels_follow_a_guidance_stop(fam):
    name, pipe = fam
    with capture_attention(pipe) as cap:
        gen(name, pipe, PROMPTS, GuidanceSchedule(scale=W, stop_step=2, after="uncond"))
    assert cap.complete == [True, True, False, False]
    assert cap.row_labels[2] == ["uncond:0", "uncond:1"] and torch.isnan(cap.mass[2:]).all()
    assert torch.allclose(cap.row_mass[3].sum(-1), torch.ones(2), atol=1e-5)


# -- token classes -------------------------------------------------------------------------------
def test_token_classes_per_family(fam):
    name, pipe = fam
    prompt = PROMPTS[0]
    infos = prompt_token_infos(pipe, prompt)
    n_words = len(prompt.split())
    if name in ("sdxl", "sd3"):
        a, b = infos["tokenizer"], infos["tokenizer_2"]
        for info in (a, b):
            assert info.classes[0] == "sos" and info.eos_index == n_words + 1
            assert info.classes[1:n_words + 1] == ["semantic"] * n_words
        assert set(a.classes[a.eos_index + 1:]) == {"eos_pad"}  # tokenizer 1: EOS padding
        assert set(b.classes[b.eos_index + 1:]) == {"pad"}  # tokenizer 2: "!" padding
    if name in ("pixart", "sd3"):
        t5 = infos["tokenizer_3" if name == "sd3" else "tokenizer"]
        tok = pipe.tokenizer_3 if name == "sd3" else pipe.tokenizer
        assert len(t5.ids) == (256 if name == "sd3" else 120)
        assert "sos" not in t5.classes and t5.classes[:n_words] == ["semantic"] * n_words
        assert t5.eos_index == n_words and t5.ids[n_words] == tok.eos_token_id == 1
        assert t5.tokens[n_words] == "</s>" and set(t5.tokens[n_words + 1:]) == {"<pad>"}
        assert set(t5.classes[n_words + 1:]) == {"pad"} and tok.pad_token_id == 0
        assert [t5.words[w] for w in t5.word_of_token[:n_words]] == prompt.split()
    den = denoiser_token_info(pipe, prompt)
    if name == "sdxl":
        assert den.classes == infos["tokenizer"].classes  # classes are taken from tokenizer 1
    if name == "pixart":
        assert den.classes == infos["tokenizer"].classes
        assert denoiser_token_info(pipe, " A RED Circle ").ids[:3] == den.ids[:3]  # the pipeline lower-cases
    if name == "sd3":
        assert len(den.ids) == 77 + 256 and den.classes[:77] == infos["tokenizer"].classes
        assert den.classes[77:] == infos["tokenizer_3"].classes
        assert den.word_positions(1) == [2, 77 + 1]  # "red": its CLIP and its T5 position


def test_tiny_t5_tokenizer_round_trips(tmp_path):
    tok = tiny_t5_tokenizer(tmp_path / "t5")
    assert (tmp_path / "t5" / "tokenizer.json").exists()
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    assert tok.bos_token_id is None and tok.pad_token == "<pad>" and tok.eos_token == "</s>"
    for text in PROMPTS + ["Zebra-7 at (3, 4)!"]:
        ids = tok(text).input_ids
        assert ids[-1] == 1 and 0 not in ids and 2 not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert [tok.convert_ids_to_tokens(i) for i in tok("a red circle").input_ids] == ["▁a", "▁red", "▁circle", "</s>"]
    info = analyze_prompt(tok, "a red circle", max_length=8)
    assert info.classes == ["semantic"] * 3 + ["eos"] + ["pad"] * 4
    assert classify_ids([5, 6, 1, 0, 0], None, 1, 0) == ["semantic", "semantic", "eos", "pad", "pad"]


# -- schedulers and unsupported pipelines ----------------------------------------------------------
def test_scheduler_choices_per_family(fam):
    name, pipe = fam
    before = pipe.scheduler
    try:
        if name == "sd3":
            with pytest.raises(ShapefirstError, match="scheduler ddim is not available for the sd3 family; "
                                                      "use: euler"):
                set_scheduler(pipe, "ddim")
            set_scheduler(pipe, "euler")
            assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
            assert pipe.scheduler.config.shift == before.config.shift
        else:
            set_scheduler(pipe, "dpm++")
            assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
            res = gen(name, pipe, PROMPTS[:1], GuidanceSchedule(scale=W, stop=0.5), steps=3)
            assert res.evaluations_per_image == [2 * 2 + 1]
    finally:
        pipe.scheduler = before


def test_sd3_skip_layer_guidance_is_refused(sd3):
    name, pipe = sd3
    with pytest.raises(ShapefirstError, match="skip-layer guidance"):
        gen(name, pipe, PROMPTS[:1], steps=10, skip_guidance_layers=[0])


def test_unsupported_pipelines_get_a_clear_error():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10))
    names = [c for cs in FAMILIES.values() for c in cs]
    assert {"StableDiffusionPipeline", "StableDiffusionXLPipeline", "PixArtAlphaPipeline", "PixArtSigmaPipeline",
            "StableDiffusion3Pipeline"} <= set(names)
    for attempt in (lambda: family_of_pipe(pipe), lambda: family_of("AudioLDM2Pipeline"),
                    lambda: guidance_schedule(pipe, GuidanceSchedule()).__enter__(),
                    lambda: capture_attention(pipe).__enter__(),
                    lambda: generate(pipe, ["a red circle"], steps=2)):
        with pytest.raises(ShapefirstError) as e:
            attempt()
        msg = str(e.value)
        assert "not supported" in msg and all(n in msg for n in names), msg


def test_trajectory_decodes_like_the_pipeline(sd3):
    """x0 at the last call decoded by Trajectory.decode = the pipeline's own image (SD3: shift_factor)."""
    name, pipe = sd3
    rec = TrajectoryRecorder()
    with guidance_schedule(pipe, GuidanceSchedule(scale=W), rec):
        lat = pipe(PROMPTS[:1], num_inference_steps=STEPS, guidance_scale=W, generator=gens(0, 1),
                   output_type="latent").images
    img = pipe(PROMPTS[:1], num_inference_steps=STEPS, guidance_scale=W, generator=gens(0, 1), output_type="pt").images
    tr = rec.trajectory
    tr.arrays["x0"][-1] = lat.float()  # the decode path itself, on the exact final latent
    dec = tr.decode(pipe.vae, "x0", calls=[STEPS - 1])[0]
    assert torch.allclose(dec, img.float(), atol=1e-4)


def test_saved_pipelines_load_through_load_pipeline(fam, tmp_path):
    from shapefirst.models import load_pipeline

    name, pipe = fam
    pipe.save_pretrained(tmp_path / name, safe_serialization=True)
    back = load_pipeline(str(tmp_path / name), device="cpu", dtype="float32")
    assert type(back) is type(pipe) and family_of_pipe(back) == name
    # (not bitwise: loaded text encoders may pick another attention kernel than freshly built ones)
    assert np.allclose(plain(name, back, PROMPTS[:1], steps=2), plain(name, pipe, PROMPTS[:1], steps=2), atol=1e-5)


def test_pixart_sigma_shares_the_pixart_support(pixart):
    name, pipe = pixart
    from diffusers import PixArtSigmaPipeline

    sigma = PixArtSigmaPipeline(**pipe.components)
    sigma.set_progress_bar_config(disable=True)
    assert family_of_pipe(sigma) == "pixart"
    ref = plain(name, sigma, PROMPTS)
    res = gen(name, sigma, PROMPTS, GuidanceSchedule(scale=W))
    assert np.array_equal(res.images, ref) and res.evaluations_per_image == [2 * STEPS] * 2
    cut = gen(name, sigma, PROMPTS, GuidanceSchedule(scale=W, stop_step=0, after="cond"))
    assert np.array_equal(cut.images, plain(name, sigma, PROMPTS, w=1.0))
    assert len(denoiser_token_info(sigma, PROMPTS[0]).ids) == 300  # PixArt-sigma's max_sequence_length


def test_pixart_kv_substitution_under_a_guidance_stop_leaves_the_unguided_rows_alone(pixart):
    """PixArt has no do_classifier_free_guidance: the K/V intervention reads the rows from the guidance
    hook's run state, so after an unconditional stop no (unconditional) row gets the conditional
    context. Substituting each image's own (projected) context changes nothing then."""
    from shapefirst.experiments.token_ablation import kv_substitution

    _, pipe = pixart
    kw = dict(prompt=PROMPTS, num_inference_steps=4, guidance_scale=4.5, output_type="latent", **EXTRA["pixart"])
    with guidance_schedule(pipe, GuidanceSchedule(4.5, stop=0.5)):
        ref = pipe(**kw, generator=gens(0, len(PROMPTS))).images
        cond = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, clean_caption=False)[0]
        with kv_substitution(pipe) as st, torch.no_grad():
            st.set(attention_context(pipe, cond), "both")
            same = pipe(**kw, generator=gens(0, len(PROMPTS))).images
    assert (same - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("sample_size", [8, 32])
def test_generate_supplies_pixarts_call_defaults_only_where_needed(tmp_path, sample_size):
    """A PixArt transformer of an untrained size (the shapes world's is 16) fails inside diffusers'
    resolution binning unless use_resolution_binning=False: generate passes it (and clean_caption=False)
    for such sizes only, and a caller's own value wins."""
    from shapefirst.pipeline import call_defaults

    pipe = tiny_pixart_pipeline(folder=tmp_path, sample_size=sample_size)
    want = {"clean_caption": False} | ({} if sample_size == 32 else {"use_resolution_binning": False})
    assert call_defaults(pipe) == want and call_defaults(pipe, {"clean_caption": True}) == {
        k: v for k, v in want.items() if k != "clean_caption"}
    assert call_defaults(tiny_sdxl_pipeline(folder=tmp_path / "xl")) == {}
    if sample_size == 8:
        with pytest.raises(ValueError, match="Invalid sample size"):
            pipe(PROMPTS[:1], num_inference_steps=2, clean_caption=False, output_type="np")
    got = generate(pipe, PROMPTS[:1], GuidanceSchedule(W), steps=2, seed=0).images
    ref = pipe(PROMPTS[:1], num_inference_steps=2, guidance_scale=W, generator=gens(0, 1),
               output_type="np", **want).images
    assert np.array_equal(got, ref)


@pytest.mark.parametrize("fam_name", ["sdxl", "pixart"])
def test_generate_embeds_of_a_prompts_own_embeddings_equals_generating_from_its_text(fam_name, tmp_path_factory):
    """The embedding interventions (eos-swap, token ablation) start from encode_prompts + generate_embeds: with
    the prompt's own embeddings that must be the pipeline's own image. PixArt masks its padding out of the
    cross-attention, so generate_embeds needs the prompts' token infos for the mask (pipeline.embeds_call)."""
    from shapefirst.generate import generate_embeds
    from shapefirst.pipeline import encode_prompts

    _, pipe = _pipe(fam_name, tmp_path_factory)
    cond, uncond = encode_prompts(pipe, PROMPTS)
    infos = [analyze_prompt(pipe.tokenizer, p, max_length=cond.shape[1]) for p in PROMPTS]
    ref = generate(pipe, PROMPTS, GuidanceSchedule(4.5), steps=3, seed=0).images
    got = generate_embeds(pipe, cond, uncond, 3, 0, GuidanceSchedule(4.5), infos=infos)
    assert np.abs(got - ref).max() <= 1e-5
    if fam_name == "pixart":
        with pytest.raises(ShapefirstError, match="token infos"):
            generate_embeds(pipe, cond, uncond, 3, 0, GuidanceSchedule(4.5))
        unmasked = generate_embeds(pipe, cond, uncond, 3, 0, GuidanceSchedule(4.5),
                                   infos=[analyze_prompt(pipe.tokenizer, "x " * 200)] * len(PROMPTS))
        assert np.abs(unmasked - ref).max() > 1e-3  # the mask matters: attending to padding changes the image


SD3_REFUSES = {"frequency": "flow matching", "eos-swap": "CLIP and T5", "token-ablation": "CLIP and T5"}


def test_every_analysis_runs_on_every_family_or_says_why_not(fam, tmp_path_factory):
    """The five analyses on each family's tiny pipeline (SD 1.x: the rest of the suite). SD3 refuses three with a
    one-line reason: its flow-matching forward process, and its two concatenated token sequences."""
    from shapefirst.experiments import ANALYSES, run_analysis
    from shapefirst.metrics import Clip
    from shapefirst.tiny import tiny_clip_folder

    name, pipe = fam
    clip = Clip.load(tiny_clip_folder(tmp_path_factory.mktemp("clip")))
    kw = dict(n=2, steps=3, prompts=["a red circle", "a blue square"], pairs=[("a red circle", "a blue square")] * 2,
              world=False, batch=2, clip=clip)
    for analysis in ANALYSES:
        out = tmp_path_factory.mktemp(analysis)
        if name == "sd3" and analysis in SD3_REFUSES:
            with pytest.raises(ShapefirstError, match=SD3_REFUSES[analysis]):
                run_analysis(analysis, pipe, out, **kw)
            continue
        res = run_analysis(analysis, pipe, out, **kw)
        assert res.kind.replace("_", "-") == analysis
