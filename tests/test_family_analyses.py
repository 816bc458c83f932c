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

import pytest
import torch

from shapefirst.attention import AttentionCapture, capture_attention, read_layer, text_attention_layers
from shapefirst.errors import ShapefirstError
from shapefirst.generate import generate
from shapefirst.guidance import GuidanceSchedule
from shapefirst.tiny import (tiny_cogvideox_pipeline, tiny_flux_pipeline, tiny_hunyuandit_pipeline,
                             tiny_sana_pipeline, tiny_wan_pipeline)

PROMPTS = ["a red circle on the left", "a small blue square"]
STEPS = 2
CALL = {  # call arguments of each tiny pipeline (sizes giving a token grid of 2 x 2 or more)
    "wan": dict(height=32, width=32, num_frames=5, max_sequence_length=16, guidance_scale=5.0),
    "flux": dict(height=16, width=16, max_sequence_length=16, true_cfg_scale=4.0, negative_prompt=""),
    "sana": dict(height=32, width=32, max_sequence_length=16, complex_human_instruction=None,
                 use_resolution_binning=False),
    "cogvideox": dict(height=32, width=32, num_frames=9, max_sequence_length=16),
    "hunyuandit": dict(height=16, width=16, use_resolution_binning=False),
}
MAKE = {"wan": tiny_wan_pipeline, "flux": tiny_flux_pipeline, "sana": tiny_sana_pipeline,
        "cogvideox": tiny_cogvideox_pipeline, "hunyuandit": tiny_hunyuandit_pipeline}
KIND = {"wan": "cross", "flux": "joint", "sana": "cross", "cogvideox": "joint", "hunyuandit": "cross"}


@pytest.fixture(scope="module")
def pipes():
    return {name: make() for name, make in MAKE.items()}


def run(pipe, name, prompts=PROMPTS, **kw):
    """The pipeline's latents (no decoding) for `prompts`, image i seeded with i."""
    out = pipe(prompts, num_inference_steps=STEPS, output_type="latent",
               generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))], **{**CALL[name], **kw})
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
    before = dict(den.attn_processors)
    ref = run(pipe, name)
    with capture_attention(pipe, keep="per_head") as cap:
        inside = den.attn_processors
        for layer in cap.layers:  # the wrapper has the original processor's signature (diffusers filters by it)
            orig, wrapped = before[f"{layer}.processor"], inside[f"{layer}.processor"]
            assert wrapped is not orig
            assert inspect.signature(wrapped.__call__) == inspect.signature(orig.__call__)
        got = run(pipe, name)
    assert torch.equal(ref, got)
    after = den.attn_processors
    assert all(after[k] is before[k] for k in before) and not den._forward_pre_hooks
    assert cap.n_calls == STEPS and cap.layers == text_attention_layers(den, KIND[name])
    assert len(cap.maps) == STEPS * len(cap.layers) and all(cap.complete)


@pytest.mark.parametrize("name", list(MAKE))
def test_maps_are_distributions_over_the_text_tokens(pipes, name):
    pipe = pipes[name]
    with capture_attention(pipe, keep="per_head") as cap:
        run(pipe, name)
    n_text = {"hunyuandit": 77 + 256}.get(name, 16)
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


@pytest.mark.parametrize("name,layer_at", [("flux", 0), ("flux", -1), ("cogvideox", 0)])
def test_joint_attention_probabilities_reproduce_the_layer_output(pipes, name, layer_at):
    """Joint attention: with the values of the image tokens zeroed (a forward hook on the value projection), the
    processor's output for the image queries is share * (renormalised text probabilities) @ text values.
    Flux: a double-stream block (layer_at 0) and a single-stream block (-1, its input [text; image] already)."""
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
    n_txt = 16  # max_sequence_length: the T5 positions
    single = name == "flux" and named.get("encoder_hidden_states") is None
    values = []

    def zero_image_values(module, inputs, v):  # plain torch: what the image tokens carry is removed
        v = v.clone()
        if module is attn.to_v and (single or name == "cogvideox"):
            v[:, n_txt:] = 0
        elif module is attn.to_v:
            v = torch.zeros_like(v)
        values.append(v)
        return v

    handles = [attn.to_v.register_forward_hook(zero_image_values)]
    try:
        with torch.no_grad():
            out = attn(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        probs, share, _ = read_layer(attn, attn.processor, named, TextLength(n_txt))
        if name == "flux" and not single:
            v_text = attn.add_v_proj(named["encoder_hidden_states"])
        else:
            v_text = values[0][:, :n_txt]
        y = _merge((share.unsqueeze(-1) * probs) @ _value_heads(attn, v_text))
        if single:
            got = out[:, n_txt:]  # pre_only: no output projection
        else:
            got = out[0]
            y = attn.to_out[0](y)
    assert ((share > 0) & (share < 1)).all()
    assert torch.allclose(y, got, atol=1e-5), (y - got).abs().max()
    rows = [r for r, label in enumerate(cap.row_labels[0][:probs.shape[0]]) if label.startswith("cond:")]
    assert torch.allclose(cap.maps[(0, layer)], probs[rows].float(), atol=1e-6)


@pytest.mark.parametrize("name", ["wan", "flux"])
def test_separate_calls_rows_follow_the_branch_each_call_computes(pipes, name):
    """Wan / Flux true CFG call the transformer once per branch: a step's two calls are one capture call, and the
    rows labelled "cond" are those of the call given the prompt's own embeddings (told here by their values)."""
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
        prompt_embeds = pipe.encode_prompt(PROMPTS, **({"prompt_2": None} if name == "flux" else {}),
                                           max_sequence_length=16)[0]
    is_cond = [torch.allclose(e, prompt_embeds.to(e.dtype), atol=1e-5) for e in seen]
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
        assert not torch.allclose(uncond.maps[(step, layer)], probs, atol=1e-3)
    assert torch.allclose(cond.row_mass[1][[cond.cond_row[1]]], cond.mass[1], atol=1e-6)
    assert torch.allclose(cond.row_mass[1][[uncond.cond_row[1]]], uncond.mass[1], atol=1e-6)


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
