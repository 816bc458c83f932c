"""Attention capture, token classes and [EOS] interventions on the families beyond SD/SDXL/PixArt/SD3 (#32 item 4):
Wan (cross-attention, guidance as separate calls, video), Flux (joint attention in double- and single-stream
blocks, true CFG as separate calls), Sana (cross-attention with the Gemma text mask), CogVideoX (joint attention,
video), HunyuanDiT (cross-attention to BERT + T5 with the image RoPE on the query), on tiny in-code pipelines
(random weights: these tests prove the bookkeeping and the arithmetic, not what a trained model attends to).

References: diffusers' own output of every pipeline (a capture changes nothing, bit for bit) and of every captured
layer (its processor's output is reproduced from the captured probabilities and values computed here by hand;
for joint attention with the image values zeroed by a torch forward hook on the value projection, so that the
output holds the text part alone); the branch of each separate call read from its embeddings' values; the
tokenizers' own ids for the token classes."""
import inspect

import numpy as np
import pytest
import torch

from shapefirst.attention import AttentionCapture, capture_attention, read_layer, text_attention_layers
from shapefirst.errors import ShapefirstError
from shapefirst.tokens import denoiser_token_infos
from shapefirst.generate import generate
from shapefirst.guidance import GuidanceSchedule
from shapefirst.tiny import (tiny_chroma_pipeline, tiny_cogvideox_pipeline, tiny_cogview4_pipeline,
                             tiny_flux_pipeline, tiny_hunyuandit_pipeline, tiny_lumina2_pipeline,
                             tiny_qwenimage_pipeline, tiny_sana_pipeline, tiny_wan_pipeline)

from shapefirst.tiny_dits import tiny_cogview3plus_pipeline

PROMPTS = ["a red circle on the left", "a small blue square"]
STEPS = 2
CALL = {  # call arguments of each tiny pipeline (sizes giving a token grid of 2 x 2 or more)
    "wan": dict(height=32, width=32, num_frames=5, max_sequence_length=16, guidance_scale=5.0),
    "flux": dict(height=16, width=16, max_sequence_length=16, true_cfg_scale=4.0, negative_prompt=""),
    "sana": dict(height=32, width=32, max_sequence_length=16, complex_human_instruction=None,
                 use_resolution_binning=False),
    "cogvideox": dict(height=32, width=32, num_frames=9, max_sequence_length=16),
    "hunyuandit": dict(height=16, width=16, use_resolution_binning=False),
    "qwenimage": dict(height=16, width=16, max_sequence_length=16, true_cfg_scale=4.0, negative_prompt=""),
    "lumina2": dict(height=32, width=32, max_sequence_length=48),
    "cogview4": dict(height=16, width=16, max_sequence_length=16),
    "chroma": dict(height=16, width=16, max_sequence_length=16),
    "cogvideox_rope": dict(height=32, width=32, num_frames=9, max_sequence_length=16),
    "cogview3plus": dict(height=32, width=32, max_sequence_length=16),
}
def cogvideox_rope_pipeline():
    """tiny_cogvideox_pipeline with a transformer that uses the 3-D rotary embedding (CogVideoX 1.5's setting;
    head width 16 so that its time/height/width split is even), built here."""
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    base = tiny_cogvideox_pipeline()
    torch.manual_seed(1)
    transformer = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                              out_channels=4, time_embed_dim=2, text_embed_dim=32, num_layers=1,
                                              sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
                                              temporal_compression_ratio=4, max_text_seq_length=16,
                                              use_rotary_positional_embeddings=True)
    pipe = CogVideoXPipeline(**{**base.components, "transformer": transformer})
    pipe.set_progress_bar_config(disable=True)
    return pipe


MAKE = {"wan": tiny_wan_pipeline, "flux": tiny_flux_pipeline, "sana": tiny_sana_pipeline,
        "cogvideox": tiny_cogvideox_pipeline, "hunyuandit": tiny_hunyuandit_pipeline,
        "qwenimage": tiny_qwenimage_pipeline, "lumina2": tiny_lumina2_pipeline, "cogview4": tiny_cogview4_pipeline,
        "chroma": tiny_chroma_pipeline, "cogvideox_rope": cogvideox_rope_pipeline,
        "cogview3plus": tiny_cogview3plus_pipeline}
SANA_CALL = {"sana": {"complex_human_instruction": None}}
KIND = {"wan": "cross", "flux": "joint", "sana": "cross", "cogvideox": "joint", "hunyuandit": "cross",
        "qwenimage": "joint", "lumina2": "joint", "cogview4": "joint", "chroma": "joint", "cogvideox_rope": "joint",
        "cogview3plus": "joint"}


@pytest.fixture(scope="module")
def pipes():
    return {name: make() for name, make in MAKE.items()}


def run(pipe, name, prompts=PROMPTS, **kw):
    """The pipeline's latents (no decoding) for `prompts` (or the embeddings in `kw`), image i seeded with i."""
    n = len(prompts) if prompts is not None else kw["prompt_embeds"].shape[0]
    call = {k: v for k, v in CALL[name].items() if prompts is not None or k != "negative_prompt"}  # embeddings given
    out = pipe(prompts, num_inference_steps=STEPS, output_type="latent",
               generator=[torch.Generator().manual_seed(i) for i in range(n)], **{**call, **kw})
    return out.frames if hasattr(out, "frames") else out.images


class Inputs:
    """Plain test code: the inputs and output of every call of one attention module (a torch forward hook)."""

    def __init__(self, module):
        self.calls = []
        self.handle = module.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        self.calls.append((args, dict(kwargs), output))

    def close(self):
        self.handle.remove()


def processors(den):
    """{module name: its processor} of every attention module (Lumina 2's transformer has no attn_processors)."""
    return {name: mod.processor for name, mod in den.named_modules() if hasattr(mod, "set_processor")}


def with_values_edited(attn, args, kwargs, edit):
    """The attention layer's output with its value projection edited in place by edit(v) (a plain torch forward
    hook on to_v, on a copy), and the edited values."""
    values = []

    def hook(module, inputs, v):
        v = v.clone()
        edit(v)
        values.append(v)
        return v

    handle = attn.to_v.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return attn(*args, **kwargs), values
    finally:
        handle.remove()


class TextLength:
    """What a single-stream layer needs from the capture: the text length (here known: max_sequence_length)."""

    def __init__(self, n):
        self.n = n

    def text_length(self):
        return self.n


# -- 1. attention capture ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MAKE))
def test_capture_leaves_the_output_bit_identical_and_restores_the_processors(pipes, name):
    pipe = pipes[name]
    den = pipe.transformer
    before = processors(den)
    ref = run(pipe, name)
    with capture_attention(pipe, keep="per_head") as cap:
        inside = processors(den)
        assert sorted(k for k in before if inside[k] is not before[k]) == sorted(cap.layers)
        for layer in cap.layers:  # the wrapper has the original processor's signature (diffusers filters by it)
            orig, wrapped = before[layer], inside[layer]
            assert inspect.signature(wrapped.__call__) == inspect.signature(orig.__call__)
        got = run(pipe, name)
    assert torch.equal(ref, got)
    after = processors(den)
    assert all(after[k] is before[k] for k in before) and not den._forward_pre_hooks
    assert cap.n_calls == STEPS and cap.layers == text_attention_layers(den, KIND[name])
    assert len(cap.maps) == STEPS * len(cap.layers) and all(cap.complete)


@pytest.mark.parametrize("name", list(MAKE))
def test_maps_are_distributions_over_the_text_tokens(pipes, name):
    pipe = pipes[name]
    with capture_attention(pipe, keep="per_head") as cap:
        run(pipe, name)
    msl = CALL[name].get("max_sequence_length")
    n_text = len(denoiser_token_infos(pipe, PROMPTS, msl, **SANA_CALL.get(name, {}))[0].ids)  # the batch's positions
    for (_, layer), m in cap.maps.items():  # [images, heads, frames * h * w, tokens]
        (h, w), f = cap.spatial[layer], cap.frames[layer]
        assert m.shape == (len(PROMPTS), cap.heads[layer], f * h * w, n_text)
        assert (m >= 0).all() and torch.allclose(m.sum(-1), torch.ones(()), atol=1e-5)
    assert torch.allclose(cap.mass.sum(-1), torch.ones(STEPS, len(PROMPTS)), atol=1e-5)
    share = cap.text_share
    if KIND[name] == "joint":  # a share of the joint softmax: strictly between 0 and 1
        assert share.shape == (STEPS, len(PROMPTS)) and ((share > 0) & (share < 1)).all()
    else:
        assert torch.isnan(share).all()


def test_video_layers_hold_every_latent_frame(pipes):
    """Wan: 5 frames -> 2 latent frames (4x temporal compression), 32 px -> 4 x 4 latents -> 2 x 2 tokens (patch 2);
    CogVideoX: 9 frames -> 3 latent frames. token_maps averages the frames; frame=f picks one."""
    for name, frames in (("wan", 2), ("cogvideox", 3)):
        with capture_attention(pipes[name]) as cap:
            run(pipes[name], name)
        assert set(cap.frames.values()) == {frames} and set(cap.spatial.values()) == {(2, 2)}
        per_frame = torch.stack([cap.token_maps(1, frame=f) for f in range(frames)])
        assert torch.allclose(cap.token_maps(1), per_frame.mean(0), atol=1e-6)
        assert not torch.allclose(per_frame[0], per_frame[1])
        with pytest.raises(ShapefirstError, match="latent frame"):
            cap.token_maps(1, frame=frames)


def _value_heads(attn, v):
    return v.unflatten(-1, (attn.heads, -1)).transpose(1, 2)


def _merge(y):
    return y.transpose(1, 2).flatten(2)


@pytest.mark.parametrize("name", ["wan", "sana", "hunyuandit"])
def test_cross_attention_probabilities_reproduce_the_layer_output(pipes, name):
    """softmax over the text keys times the values computed here, through the layer's output projection, is what
    diffusers' processor returned, for every row of the first call (the captured rows equal it too)."""
    pipe = pipes[name]
    layer = text_attention_layers(pipe.transformer, "cross")[-1]
    attn = pipe.transformer.get_submodule(layer)
    rec = Inputs(attn)
    try:
        with capture_attention(pipe, keep="per_head", calls=[0]) as cap:
            run(pipe, name)
    finally:
        rec.close()
    args, kwargs, out = rec.calls[0]
    named = dict(zip(("hidden_states", "encoder_hidden_states", "attention_mask"), args), **kwargs)
    with torch.no_grad():
        probs, share, _ = read_layer(attn, attn.processor, named, None)
        ctx = named["encoder_hidden_states"]
        y = probs @ _value_heads(attn, attn.to_v(ctx))
        expect = attn.to_out[0](_merge(y))
    assert share is None
    assert torch.allclose(expect, out, atol=1e-5), (expect - out).abs().max()
    rows = [r for r, label in enumerate(cap.row_labels[0][:probs.shape[0]]) if label.startswith("cond:")]
    assert torch.allclose(cap.maps[(0, layer)], probs[rows].float(), atol=1e-6)
    if name == "sana":  # the text mask (a -10000 bias on padding): padding gets no attention
        masked = named["attention_mask"].reshape(probs.shape[0], 1, 1, -1).expand_as(probs) < 0
        assert masked.any() and probs[masked].max() < 1e-12 < probs[~masked].min()


@pytest.mark.parametrize("name,layer_at", [("flux", 0), ("flux", -1), ("cogvideox", 0), ("cogvideox_rope", 0),
                                           ("qwenimage", 0), ("cogview4", 0), ("chroma", 0), ("chroma", -1),
                                           ("cogview3plus", 0)])
def test_joint_attention_probabilities_reproduce_the_layer_output(pipes, name, layer_at):
    """Joint attention: with the values of the image tokens zeroed (a forward hook on the value projection), the
    processor's output for the image queries is share * (renormalised text probabilities) @ text values.
    Flux / Chroma: a double-stream block (layer_at 0: text values from add_v_proj, as Qwen-Image) and a
    single-stream block (-1, its input [text; image] already); CogVideoX / CogView4: [text; image] in the processor."""
    pipe = pipes[name]
    layer = text_attention_layers(pipe.transformer, "joint")[layer_at]
    attn = pipe.transformer.get_submodule(layer)
    rec = Inputs(attn)
    try:
        with capture_attention(pipe, keep="per_head", calls=[0]) as cap:
            run(pipe, name)
    finally:
        rec.close()
    args, kwargs, _ = rec.calls[0]
    named = dict(zip(("hidden_states", "encoder_hidden_states"), args), **kwargs)
    ctx = named.get("encoder_hidden_states")
    n_txt = 16 if ctx is None else ctx.shape[1]  # single-stream: the T5 positions (max_sequence_length)
    own_text_values = ctx is not None and getattr(attn, "add_v_proj", None) is not None  # a double-stream layer

    def zero_image_values(v):  # plain torch: what the image tokens carry is removed
        if own_text_values:
            v.zero_()
        else:
            v[:, n_txt:] = 0

    out, values = with_values_edited(attn, args, kwargs, zero_image_values)
    with torch.no_grad():
        probs, share, _ = read_layer(attn, attn.processor, named, TextLength(n_txt))
        v_text = attn.add_v_proj(ctx) if own_text_values else values[0][:, :n_txt]
        y = _merge((share.unsqueeze(-1) * probs) @ _value_heads(attn, v_text))
        if ctx is None:
            got = out[:, n_txt:]  # pre_only: no output projection
        else:
            got, y = out[0], attn.to_out[0](y)
    assert ((share > 0) & (share < 1)).all()
    assert torch.allclose(y, got, atol=1e-5), (y - got).abs().max()
    rows = [r for r, label in enumerate(cap.row_labels[0][:probs.shape[0]]) if label.startswith("cond:")]
    assert torch.allclose(cap.maps[(0, layer)], probs[rows].float(), atol=1e-6)


def test_lumina2_probabilities_reproduce_the_layer_output(pipes):
    """Lumina 2's joint layer packs row i as its L_i unmasked caption positions then the image tokens (L_i: the
    pipeline's own text mask); grouped key/value heads. With the image values zeroed the image queries' output is
    share * probabilities @ the caption's values (0 probability on the caption's padding, which is not in the
    sequence); the context and noise refiners (text alone, image alone) are not captured."""
    pipe = pipes["lumina2"]
    layers = text_attention_layers(pipe.transformer, "joint")
    assert layers == ["layers.0.attn"]
    attn = pipe.transformer.get_submodule(layers[0])
    rec = Inputs(attn)
    try:
        with capture_attention(pipe, keep="per_head", calls=[0]) as cap:
            run(pipe, "lumina2")
    finally:
        rec.close()
    with torch.no_grad():
        mask = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=48)[1]
    lengths, n_img, n_cap = mask.sum(1).tolist(), 4, mask.shape[1]  # 32 px -> 4 x 4 latents -> 2 x 2 tokens
    args, kwargs, _ = rec.calls[0]  # the first call: the prompts' own branch

    def zero_image_values(v):
        for i, n in enumerate(lengths):
            v[i, n:n + n_img] = 0

    out, values = with_values_edited(attn, args, kwargs, zero_image_values)
    named = dict(zip(("hidden_states", "encoder_hidden_states"), args), **kwargs)

    class Grid(TextLength):
        def image_tokens(self):
            return n_img

    with torch.no_grad():
        probs, share, _ = read_layer(attn, attn.processor, named, Grid(n_cap))
    d = attn.to_q.out_features // attn.heads
    v = values[0].unflatten(-1, (-1, d))  # [rows, positions, key heads, d]
    v = v.repeat_interleave(attn.heads // v.shape[2], dim=2).transpose(1, 2)
    for i, n in enumerate(lengths):
        assert probs[i, :, :, n:].abs().max() == 0 and torch.allclose(probs[i].sum(-1), torch.ones(()), atol=1e-5)
        v_text = torch.zeros(attn.heads, n_cap, d)
        v_text[:, :n] = v[i, :, :n]
        with torch.no_grad():
            y = attn.to_out[0](_merge(((share[i].unsqueeze(-1) * probs[i]) @ v_text).unsqueeze(0)))[0]
        assert torch.allclose(y, out[i, n:n + n_img], atol=1e-5), (y - out[i, n:n + n_img]).abs().max()
    assert torch.allclose(cap.maps[(0, layers[0])], probs, atol=1e-6)


ENCODE = {"wan": {}, "flux": {"prompt_2": None}, "qwenimage": {}, "cogview4": {"do_classifier_free_guidance": False},
          "chroma": {"do_classifier_free_guidance": False}}  # each pipeline's encode_prompt, for its prompt_embeds


@pytest.mark.parametrize("name", list(ENCODE))
def test_separate_calls_rows_follow_the_branch_each_call_computes(pipes, name):
    """Wan, Flux true CFG, Qwen-Image, CogView4, Chroma call the transformer once per branch: a step's two calls are
    one capture call, and the rows labelled "cond" are those of the call given the prompt's own embeddings (told
    here by their values; Qwen-Image's negative text is shorter than the prompts': each branch keeps its length)."""
    pipe = pipes[name]
    den = pipe.transformer
    layer = text_attention_layers(den, KIND[name])[0]
    rec, seen = Inputs(den.get_submodule(layer)), []
    h = den.register_forward_pre_hook(lambda m, a, k: seen.append(k["encoder_hidden_states"].clone()),
                                      with_kwargs=True)
    try:
        with capture_attention(pipe, keep="per_head") as cond, capture_attention(pipe, rows="uncond") as uncond:
            run(pipe, name)
    finally:
        rec.close()
        h.remove()
    with torch.no_grad():
        prompt_embeds = pipe.encode_prompt(PROMPTS, **ENCODE[name], max_sequence_length=16)[0]
    is_cond = [e.shape == prompt_embeds.shape and torch.allclose(e, prompt_embeds.to(e.dtype), atol=1e-5)
               for e in seen]
    assert len(seen) == 2 * STEPS and sum(is_cond) == STEPS  # one call per branch and step
    assert cond.n_calls == uncond.n_calls == STEPS
    order = ["cond" if c else "uncond" for c in is_cond[:2]]
    assert cond.row_labels[0] == [f"{b}:{i}" for b in order for i in range(len(PROMPTS))]
    for step in range(STEPS):
        c_call = 2 * step + is_cond[2 * step:2 * step + 2].index(True)
        args, kwargs, _ = rec.calls[c_call]
        named = dict(zip(("hidden_states", "encoder_hidden_states"), args), **kwargs)
        with torch.no_grad():
            probs, _, _ = read_layer(den.get_submodule(layer), den.get_submodule(layer).processor, named,
                                     TextLength(16))
        assert torch.allclose(cond.maps[(step, layer)], probs, atol=1e-6)
        other = uncond.maps[(step, layer)]
        assert other.shape != probs.shape or not torch.allclose(other, probs, atol=1e-3)
    n_uncond = uncond.mass.shape[-1]
    assert torch.allclose(cond.row_mass[1][[cond.cond_row[1]]], cond.mass[1], atol=1e-6)
    assert torch.allclose(cond.row_mass[1][[uncond.cond_row[1]]][:, :n_uncond], uncond.mass[1], atol=1e-6)
    assert (cond.row_mass[1][[uncond.cond_row[1]]][:, n_uncond:] == 0).all()  # a shorter text: no mass beyond it


@pytest.mark.parametrize("after", ["cond", "uncond"])
def test_separate_calls_under_a_guidance_stop(pipes, after):
    """Wan under a stop at step 1: after it the hook runs one forward of the kept branch only (its rows say so);
    before it the captured rows equal those of a run without a stop."""
    pipe = pipes["wan"]
    kw = dict(height=32, width=32, num_frames=5, max_sequence_length=16, steps=3)
    with capture_attention(pipe) as plain:
        generate(pipe, PROMPTS, GuidanceSchedule(5.0), **kw)
    with capture_attention(pipe) as cap:
        generate(pipe, PROMPTS, GuidanceSchedule(5.0, stop_step=1, after=after), **kw)
    assert cap.n_calls == 3 and cap.row_labels[0] == plain.row_labels[0]
    assert torch.equal(cap.mass[0], plain.mass[0])
    for c in (1, 2):
        assert cap.row_labels[c] == [f"{after}:0", f"{after}:1"]
        assert cap.complete[c] == (after == "cond")
        assert torch.isnan(cap.mass[c]).all() == (after == "uncond")


def test_wan22_captures_both_experts(pipes):
    """Wan 2.2: the high-noise expert `transformer` runs the first steps, `transformer_2` the rest; each step's
    maps come from the expert that ran it (its layers named "transformer_2.<layer>")."""
    pipe = tiny_wan_pipeline(two_experts=True)
    steps = 6  # flow shift 3, boundary 0.5: 5 steps on the high-noise expert, 1 on the low-noise one
    with capture_attention(pipe) as cap:
        pipe(PROMPTS, num_inference_steps=steps, output_type="latent",
             generator=[torch.Generator().manual_seed(i) for i in range(2)], **CALL["wan"])
    first = text_attention_layers(pipe.transformer, "cross")
    assert cap.layers == first + [f"transformer_2.{n}" for n in first]
    experts = [{layer.startswith("transformer_2.") for (c, layer) in cap.maps if c == call} for call in range(steps)]
    assert all(len(e) == 1 for e in experts) and cap.n_calls == steps
    flags = [e.pop() for e in experts]
    assert flags == sorted(flags) and flags[0] is False and flags[-1] is True  # one switch, high noise first


def test_unknown_processor_is_one_line_error(pipes):
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    class MyProcessor(WanAttnProcessor):
        pass

    pipe = tiny_wan_pipeline()
    pipe.transformer.set_attn_processor(MyProcessor())
    with pytest.raises(ShapefirstError, match="MyProcessor") as e:
        with capture_attention(pipe):
            pass
    assert "\n" not in str(e.value).strip()


def test_save_load_keeps_frames(pipes, tmp_path):
    with capture_attention(pipes["wan"]) as cap:
        run(pipes["wan"], "wan")
    back = AttentionCapture.load(cap.save(tmp_path / "att"))
    assert back.frames == cap.frames and torch.equal(back.token_maps(1), cap.token_maps(1))
    assert torch.equal(back.mass, cap.mass)


# -- 2. token classes -------------------------------------------------------------------------------------------
class TextInputs:
    """The input ids a text encoder is given (plain torch forward pre-hook): what the pipeline tokenized."""

    def __init__(self, encoder):
        self.ids = []
        self.handle = encoder.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        self.ids.append(ids[0].tolist())  # the first prompt's

    def close(self):
        self.handle.remove()


def _encoded_ids(pipe, encoder, prompt, **kw):
    rec = TextInputs(encoder)
    try:
        with torch.no_grad():
            out = pipe.encode_prompt([prompt], **kw)
    finally:
        rec.close()
    return rec.ids, out


@pytest.mark.parametrize("name", ["wan", "flux", "cogvideox"])
def test_t5_token_classes_follow_the_ids_the_pipeline_encodes(pipes, name):
    """umT5 / T5: words, then "</s>" (eos), then "<pad>" (pad); no [SOS]. The ids are those the pipeline's T5
    encoder is given (Flux: its second encoder; Wan: the prompt cleaned of its double space first)."""
    from shapefirst.tokens import EOS, PAD, SEMANTIC, SOS, denoiser_token_info

    pipe = pipes[name]
    prompt = "a  red circle, on the left"
    info = denoiser_token_info(pipe, prompt, max_sequence_length=16)
    encoder = pipe.text_encoder_2 if name == "flux" else pipe.text_encoder
    kw = {"prompt_2": None} if name == "flux" else {"do_classifier_free_guidance": False}
    ids, out = _encoded_ids(pipe, encoder, prompt, max_sequence_length=16, **kw)
    assert info.ids == ids[0] and len(info.ids) == 16
    tok = pipe.tokenizer_2 if name == "flux" else pipe.tokenizer
    eos = info.ids.index(tok.eos_token_id)
    assert info.eos_index == eos and info.classes[eos] == EOS and SOS not in info.classes
    assert info.classes[:eos] == [SEMANTIC] * eos and info.classes[eos + 1:] == [PAD] * (15 - eos)
    assert all(i == tok.pad_token_id for i in info.ids[eos + 1:])
    assert info.words == ["a", "red", "circle", "on", "the", "left"]
    assert [info.tokens[p] for p in info.word_positions(2)] == ["▁circle"]
    assert info.word_positions(2) == [2] and info.word_of_token[3] is None  # "," belongs to no word
    if name == "wan":  # the pipeline zeroes every embedding after "</s>": exactly the pad positions
        emb = out[0][0]
        assert (emb[eos + 1:] == 0).all() and (emb[:eos + 1].abs().sum(-1) > 0).all()


def test_bert_and_t5_token_classes_of_hunyuandit(pipes):
    """HunyuanDiT: 77 BERT positions ([CLS] sos, [SEP] eos, [PAD] pad) then 256 T5 positions, the ids its two
    encoders are given."""
    from shapefirst.tokens import EOS, PAD, SEMANTIC, SOS, denoiser_token_info

    pipe = pipes["hunyuandit"]
    info = denoiser_token_info(pipe, "a red circle")
    bert, _ = _encoded_ids(pipe, pipe.text_encoder, "a red circle", do_classifier_free_guidance=False)
    t5, _ = _encoded_ids(pipe, pipe.text_encoder_2, "a red circle", do_classifier_free_guidance=False,
                         max_sequence_length=256, text_encoder_index=1)
    assert info.ids == bert[0] + t5[0] and len(info.ids) == 77 + 256
    assert info.classes[:5] == [SOS, SEMANTIC, SEMANTIC, SEMANTIC, EOS] and info.classes[5:77] == [PAD] * 72
    assert info.ids[0] == pipe.tokenizer.cls_token_id and info.ids[4] == pipe.tokenizer.sep_token_id
    assert info.classes[77:81] == [SEMANTIC] * 3 + [EOS] and set(info.classes[81:]) == {PAD}
    assert info.word_positions(1) == [2, 78] and info.eos_index == 4


def gemma_tokenizer():
    """A tiny Gemma tokenizer built in code (BPE over a few words, "▁" word starts, <bos> prepended, no end token)."""
    from transformers import GemmaTokenizer

    words = ["a", "red", "circle", "on", "the", "left", "blue", "square", "user", "prompt", "describe"]
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    merges = []
    for piece in sorted({c for w in words for c in "▁" + w} | {":", "\n"}):
        vocab.setdefault(piece, len(vocab))
    for w in words:
        for s in ("▁" + w, w):
            cur = s[0]
            for ch in s[1:]:
                merges.append((cur, ch))
                cur += ch
                vocab.setdefault(cur, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), add_bos_token=True)


@pytest.fixture(scope="module")
def gemma_sana(pipes):
    """tiny Sana with a Gemma tokenizer and a Gemma 2 encoder of its vocabulary (tiny_sana_pipeline reads T5 ids)."""
    from diffusers import SanaPipeline
    from transformers import Gemma2Config, Gemma2Model

    tok = gemma_tokenizer()
    torch.manual_seed(0)
    text = Gemma2Model(Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0,
                                    bos_token_id=2, eos_token_id=1)).eval()
    comp = {k: v for k, v in pipes["sana"].components.items()}
    pipe = SanaPipeline(**{**comp, "tokenizer": tok, "text_encoder": text})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_gemma_token_classes_of_sana(gemma_sana):
    """Gemma (Sana): <bos> (sos), the lower-cased words, right padding (pad, the pipeline's mask is 0 there), no end
    token. With the complex human instruction the denoiser sees <bos>, the instruction's last token (template),
    the words, padding: the ids and the mask encode_prompt keeps."""
    from shapefirst.tokens import PAD, SEMANTIC, SOS, TEMPLATE, denoiser_token_info

    pipe = gemma_sana
    info = denoiser_token_info(pipe, "A red Circle", max_sequence_length=8, complex_human_instruction=None)
    ids, out = _encoded_ids(pipe, pipe.text_encoder, "A red Circle", max_sequence_length=8,
                            complex_human_instruction=None, do_classifier_free_guidance=False)
    assert info.ids == ids[0] and info.tokens[:4] == ["<bos>", "a", "▁red", "▁circle"]
    assert info.classes == [SOS] + [SEMANTIC] * 3 + [PAD] * 4 and info.eos_index is None
    assert out[1][0].tolist() == [int(c != PAD) for c in info.classes]  # the pipeline's attention mask
    assert info.words == ["a", "red", "circle"] and info.word_positions(2) == [3]

    # the denoiser sees position 0 and the last 7: the instruction's last token, unless the tokenizer merged the
    # instruction's final space into the prompt's first word (Sana's default instruction ends "User Prompt: ")
    for end, classes in (("user prompt:", [SOS, TEMPLATE] + [SEMANTIC] * 3 + [PAD] * 3),
                         ("user prompt: ", [SOS] + [SEMANTIC] * 3 + [PAD] * 4)):
        chi = ["describe the user prompt:", end]
        info = denoiser_token_info(pipe, "a red circle", max_sequence_length=8, complex_human_instruction=chi)
        ids, out = _encoded_ids(pipe, pipe.text_encoder, "a red circle", max_sequence_length=8,
                                complex_human_instruction=chi, do_classifier_free_guidance=False)
        kept = [0] + list(range(len(ids[0]) - 7, len(ids[0])))  # encode_prompt's select_index: [0] + [-7, 0)
        assert info.ids == [ids[0][i] for i in kept] and info.classes == classes
        assert out[1][0].tolist() == [int(c != PAD) for c in info.classes]
        assert info.words == ["a", "red", "circle"] and [info.tokens[p] for p in info.word_positions(1)] == ["▁red"]


def test_chat_template_token_classes_of_qwenimage(pipes):
    """Qwen-Image: the prompt inside its chat template; the pipeline drops the template's first 34 positions (its
    system part and "<|im_start|>user\n"), keeps the words (semantic), "<|im_end|>" (eos) and the template's tail
    "\n<|im_start|>assistant\n" (template), and pads the batch to its longest with zero embeddings masked out (pad):
    the ids the encoder is given after the drop, and the pipeline's own mask."""
    from shapefirst.tokens import EOS, PAD, SEMANTIC, TEMPLATE, denoiser_token_infos

    pipe = pipes["qwenimage"]
    infos = denoiser_token_infos(pipe, PROMPTS, max_sequence_length=16)
    rec = TextInputs(pipe.text_encoder)
    try:
        with torch.no_grad():
            _, mask = pipe.encode_prompt(PROMPTS, max_sequence_length=16)
    finally:
        rec.close()
    drop = pipe.prompt_template_encode_start_idx
    first = infos[0]
    assert first.ids == rec.ids[0][drop:] and len(first.ids) == mask.shape[1]
    assert first.classes == [SEMANTIC] * 6 + [EOS] + [TEMPLATE] * 4
    assert first.tokens[6:] == ["<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"]
    assert first.words == ["a", "red", "circle", "on", "the", "left"] and first.word_positions(5) == [5]
    for info, m in zip(infos, mask.tolist()):
        assert m == [int(c != PAD) for c in info.classes]
    assert infos[1].classes[4] == EOS and infos[1].classes[-2:] == [PAD, PAD]


def test_gemma_token_classes_of_lumina2(pipes):
    """Lumina 2: <bos> (sos), its system prompt and " <Prompt Start> " before the prompt (template), the words,
    right padding (pad: the pipeline's mask), no end token; the ids its Gemma encoder is given."""
    from shapefirst.tokens import PAD, SEMANTIC, SOS, TEMPLATE, denoiser_token_info

    pipe = pipes["lumina2"]
    info = denoiser_token_info(pipe, "a red circle", max_sequence_length=48)
    ids, out = _encoded_ids(pipe, pipe.text_encoder, "a red circle", max_sequence_length=48,
                            do_classifier_free_guidance=False)
    assert info.ids == ids[0] and out[1][0].tolist() == [int(c != PAD) for c in info.classes]
    n = info.classes.index(SEMANTIC)
    assert info.classes[0] == SOS and info.classes[1:n] == [TEMPLATE] * (n - 1) and info.eos_index is None
    assert info.tokens[n - 2:n + 3] == ["▁<Prompt", "▁Start>", "▁a", "▁red", "▁circle"]
    assert info.classes[n:n + 3] == [SEMANTIC] * 3 and set(info.classes[n + 3:]) == {PAD}


def test_glm_token_classes_of_cogview4(pipes):
    """CogView4: "[gMASK]<sop>" before the prompt (template), the batch left-padded to its longest and then to a
    multiple of 16 with the pad id (pad; attended: no mask), no end token; the ids its GLM encoder is given."""
    from shapefirst.tokens import PAD, SEMANTIC, TEMPLATE, denoiser_token_infos

    pipe = pipes["cogview4"]
    infos = denoiser_token_infos(pipe, ["a red circle", "a blue square on the left"], max_sequence_length=16)
    rec = TextInputs(pipe.text_encoder)
    try:
        with torch.no_grad():
            pipe.encode_prompt(["a red circle", "a blue square on the left"], do_classifier_free_guidance=False,
                               max_sequence_length=16)
    finally:
        rec.close()
    assert infos[0].ids == rec.ids[0] and len(infos[1].ids) == 16
    assert infos[0].classes == [PAD] * 11 + [TEMPLATE] * 2 + [SEMANTIC] * 3
    assert infos[1].classes == [PAD] * 8 + [TEMPLATE] * 2 + [SEMANTIC] * 6
    assert infos[0].tokens[11:13] == ["[gMASK]", "<sop>"] and infos[0].word_positions(2) == [15]


def test_t5_token_classes_of_chroma(pipes):
    """Chroma reads its T5 `tokenizer`: words, "</s>" (eos), "<pad>" (pad); the ids its encoder is given."""
    from shapefirst.tokens import EOS, PAD, SEMANTIC, denoiser_token_info

    pipe = pipes["chroma"]
    info = denoiser_token_info(pipe, "a red circle", max_sequence_length=16)
    ids, _ = _encoded_ids(pipe, pipe.text_encoder, "a red circle", max_sequence_length=16,
                          do_classifier_free_guidance=False)
    assert info.ids == ids[0] and info.classes == [SEMANTIC] * 3 + [EOS] + [PAD] * 12


def test_a_tokenizer_not_handled_is_one_line(pipes, monkeypatch):
    import dataclasses

    import shapefirst.tokens as tokens
    from shapefirst.families import family

    fam = dataclasses.replace(family(pipes["wan"]), name="other", tokenizer="chatglm")
    monkeypatch.setattr(tokens, "family", lambda pipe: fam)
    with pytest.raises(ShapefirstError, match="'chatglm' tokenizer are not handled") as e:
        tokens.denoiser_token_info(pipes["wan"], "a red circle")
    assert "\n" not in str(e.value)
    with pytest.raises(ShapefirstError, match="not handled"):
        tokens.require_end_token(pipes["wan"], "eos-swap")


# -- 3. the [EOS] swap and switch ------------------------------------------------------------------------------------
def _embeds(pipe, name, prompts):
    """(prompt_embeds, negative, extra call arguments) as the pipeline makes them, max_sequence_length 16."""
    with torch.no_grad():
        if name == "flux":
            c, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=16)
            u, upooled, _ = pipe.encode_prompt([""] * len(prompts), prompt_2=None, max_sequence_length=16)
            return c, u, {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": upooled}
        c, u = pipe.encode_prompt(prompts, negative_prompt=[""] * len(prompts), max_sequence_length=16)
    return c, u, {}


@pytest.mark.parametrize("name", ["wan", "flux", "cogvideox"])
def test_eos_swap_on_the_pipelines_prompt_embeds(pipes, name):
    """A's words and B's [EOS] block on T5 prompt_embeds: positions before A's </s> are A's, from it on B's block
    shifted (tokens.swap_eos; Wan's zeroed padding moves with it); the swap of A with itself is A (bit-identical
    video); a swap with B differs from both."""
    from shapefirst.tokens import denoiser_token_info, require_end_token, swapped

    pipe = pipes[name]
    require_end_token(pipe, "eos-swap")  # T5 has one end token per prompt: no refusal
    a, b = ["a red circle on the left"], ["a blue square"]
    ca, u, extra = _embeds(pipe, name, a)
    cb, _, extra_b = _embeds(pipe, name, b)
    ia, ib = (denoiser_token_info(pipe, t, max_sequence_length=16) for t in (a[0], b[0]))
    sw = swapped(ca, [ia], cb, [ib])
    ea, eb = ia.eos_index, ib.eos_index
    assert (ea, eb) == (6, 3)
    assert torch.equal(sw[:, :ea], ca[:, :ea]) and torch.equal(sw[:, ea:], cb[:, eb:eb + 16 - ea])
    if name == "wan":
        assert (sw[0, ea + 1:] == 0).all()

    def video(cond):
        return run(pipe, name, prompts=None, prompt_embeds=cond, negative_prompt_embeds=u, **extra)

    plain = video(ca)
    assert torch.equal(video(swapped(ca, [ia], ca, [ia])), plain)
    out = video(sw)
    assert not torch.allclose(out, plain) and not torch.allclose(out, video(cb))


class ReferenceSwitch:
    """The switch written without shapefirst: a torch forward pre-hook that gives the conditional calls (those given
    the very `cond` tensor) the switched embeddings from step `a` on, counting the conditional calls as steps."""

    def __init__(self, module, cond, new, a):
        self.cond, self.new, self.a, self.steps = cond, new, a, 0
        self.handle = module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        if kwargs["encoder_hidden_states"] is not self.cond:
            return None
        step, self.steps = self.steps, self.steps + 1
        return (args, {**kwargs, "encoder_hidden_states": self.new}) if step >= self.a else None

    def close(self):
        self.handle.remove()


@pytest.mark.parametrize("name", ["wan", "flux"])
def test_eos_switch_on_separate_calls_equals_a_reference(pipes, name):
    """Wan / Flux: the switch from step a (the pipeline's step-end callback) equals diffusers' pipeline with the
    reference pre-hook, for a = 0 (the full swap), 1 and STEPS (plain A); on Wan through shapefirst.generate too
    (its guidance hook tells the branches apart by identity: the callback replaces the pipeline's own
    prompt_embeds, where the reference's pre-hook would hide the branch from it)."""
    from shapefirst.interventions import eos_switch
    from shapefirst.tokens import denoiser_token_info, swapped

    pipe = pipes[name]
    ca, u, extra = _embeds(pipe, name, PROMPTS)
    cb, _, _ = _embeds(pipe, name, PROMPTS[::-1])
    ia = [denoiser_token_info(pipe, t, max_sequence_length=16) for t in PROMPTS]
    ib = ia[::-1]
    new = swapped(ca, ia, cb, ib)
    base = dict(prompt_embeds=ca, negative_prompt_embeds=u, **extra)
    plain = run(pipe, name, prompts=None, **base)
    for a in (0, 1, STEPS):
        ref_hook = ReferenceSwitch(pipe.transformer, ca, new, a)
        try:
            ref = run(pipe, name, prompts=None, **base)
        finally:
            ref_hook.close()
        assert ref_hook.steps == STEPS
        with eos_switch(pipe, new, a) as sw:
            got = run(pipe, name, prompts=None, **{**base, **sw.call_kwargs})
        assert torch.equal(got, ref), a
        assert sw.switched == STEPS - a and torch.equal(got, plain) == (a == STEPS)
    if name == "wan":  # through generate: the guidance hook still finds each call's branch (by identity)
        size = dict(height=32, width=32, num_frames=5, max_sequence_length=16)
        ref_hook = ReferenceSwitch(pipe.transformer, ca, new, 1)
        try:
            ref = pipe(num_inference_steps=STEPS, guidance_scale=5.0, output_type="np",
                       generator=[torch.Generator().manual_seed(i) for i in range(2)], **base, **size).frames
        finally:
            ref_hook.close()
        with eos_switch(pipe, new, 1) as sw:
            got = generate(pipe, None, GuidanceSchedule(5.0), steps=STEPS, seed=0, **base, **size,
                           **sw.call_kwargs).images
        assert np.array_equal(got, ref)
    with pytest.raises(ShapefirstError, match="call_kwargs"):
        with eos_switch(pipe, new, 1):
            run(pipe, name, prompts=None, **base)


def test_eos_switch_on_cogvideox_is_the_batched_pre_hook(pipes):
    """CogVideoX (batched CFG): the switch from call 0 is the pipeline given the swapped embeddings, bit for bit."""
    from shapefirst.interventions import eos_switch
    from shapefirst.tokens import denoiser_token_info, swapped

    pipe = pipes["cogvideox"]
    ca, u, _ = _embeds(pipe, "cogvideox", PROMPTS)
    cb, _, _ = _embeds(pipe, "cogvideox", PROMPTS[::-1])
    ia = [denoiser_token_info(pipe, t, max_sequence_length=16) for t in PROMPTS]
    new = swapped(ca, ia, cb, ia[::-1])
    with eos_switch(pipe, new, 0) as sw:
        assert sw.call_kwargs == {}
        got = run(pipe, "cogvideox", prompts=None, prompt_embeds=ca, negative_prompt_embeds=u)
    assert sw.switched == STEPS
    assert torch.equal(got, run(pipe, "cogvideox", prompts=None, prompt_embeds=new, negative_prompt_embeds=u))


@pytest.mark.parametrize("name,why", [("sana", "Gemma, a decoder-only model"), ("hunyuandit", "BERT and T5"),
                                      ("lumina2", "Gemma, a decoder-only model"), ("qwenimage", "chat template"),
                                      ("cogview4", "GLM, a decoder-only model")])
def test_eos_interventions_refuse_with_the_reason(pipes, gemma_sana, name, why):
    from shapefirst.interventions import keep_first_eos
    from shapefirst.tokens import denoiser_token_info, require_end_token

    with pytest.raises(ShapefirstError, match=why) as e:
        require_end_token(pipes[name], "eos-swap")
    assert "\n" not in str(e.value)
    if name == "sana":  # a Gemma prompt has no end token at all: the embedding edit says so too
        info = denoiser_token_info(gemma_sana, "a red circle", max_sequence_length=8, complex_human_instruction=None)
        with pytest.raises(ShapefirstError, match="appends none"):
            keep_first_eos(torch.zeros(1, 8, 4), info, 1)


def test_embedding_analyses_say_which_families_they_encode(pipes, monkeypatch):
    """eos-swap and token-ablation make their embeddings through shapefirst.pipeline.encode_prompts (Wan's too: they
    run on it, tests/test_family_embeddings.py); a family outside pipeline.EMBEDDING_FAMILIES (here Wan taken out of
    the list) stops with one line naming why, before any pipeline call; the end token's reason comes first."""
    import shapefirst.pipeline as pipeline
    from shapefirst.experiments.eos_swap import run_eos_swap
    from shapefirst.experiments.token_ablation import run_token_ablation

    assert "wan" in pipeline.EMBEDDING_FAMILIES
    monkeypatch.setattr(pipeline, "EMBEDDING_FAMILIES", tuple(f for f in pipeline.EMBEDDING_FAMILIES if f != "wan"))
    with pytest.raises(ShapefirstError, match="not for wan") as e:
        run_eos_swap(pipes["wan"], [("a red circle", "a blue square")], steps=1)
    assert "\n" not in str(e.value)
    with pytest.raises(ShapefirstError, match="not for wan"):
        run_token_ablation(pipes["wan"], PROMPTS, steps=1)
    with pytest.raises(ShapefirstError, match="Gemma"):  # the end token's reason comes first
        run_eos_swap(pipes["sana"], [("a red circle", "a blue square")], steps=1)


def test_a_classic_attention_layer_with_another_processor_is_refused(tiny_pipe):
    """A classic `Attention` text layer whose processor is not one that computes AttnProcessor's queries and keys
    (here a subclass: it may compute anything) is refused in one line, not read with AttnProcessor's math."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    class MyProcessor(AttnProcessor2_0):
        pass

    unet = tiny_pipe.unet
    before = dict(unet.attn_processors)
    unet.set_attn_processor({k: MyProcessor() if k.endswith("attn2.processor") else v for k, v in before.items()})
    try:
        with pytest.raises(ShapefirstError, match="MyProcessor") as e:
            with capture_attention(tiny_pipe):
                pass
        assert "\n" not in str(e.value)
    finally:
        unet.set_attn_processor(before)
