"""Cross-attention capture: exact outputs, restored processors, probabilities against a hand computation."""
import math

import numpy as np
import pytest
import torch

from shapefirst.attention import (AttentionCapture, binary_f1, capture_attention, cross_attention_layers,
                                  kl_to_uniform)
from shapefirst.errors import ShapefirstError
from shapefirst.generate import generate
from shapefirst.guidance import GuidanceSchedule
from shapefirst.models import set_scheduler
from shapefirst.tokens import TOKEN_CLASSES, analyze_prompt

PROMPTS = ["a red circle on the left", "a small blue square"]
STEPS = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and leave the other core to whatever else runs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def ddim(tiny_pipe):
    set_scheduler(tiny_pipe, "ddim")
    yield


@pytest.fixture(scope="module")
def captured(one_thread, tiny_pipe):
    set_scheduler(tiny_pipe, "ddim")
    ref = generate(tiny_pipe, PROMPTS, steps=STEPS, seed=3).images
    with capture_attention(tiny_pipe, keep="per_head") as cap:
        out = generate(tiny_pipe, PROMPTS, steps=STEPS, seed=3).images
    return ref, out, cap


def test_images_are_bit_identical_inside_the_capture(captured):
    ref, out, _ = captured
    assert np.array_equal(ref, out)


def test_probabilities_are_distributions_over_tokens(captured):
    cap = captured[2]
    assert len(cap.maps) == STEPS * len(cap.layers)
    for (_, layer), m in cap.maps.items():  # [images, heads, pixels, tokens]
        h, w = cap.spatial[layer]
        assert m.shape == (len(PROMPTS), cap.heads[layer], h * w, 77)
        assert (m >= 0).all()
        assert torch.allclose(m.sum(-1), torch.ones(()), atol=1e-5)


def test_only_cross_attention_layers_are_captured(tiny_pipe, captured):
    cap = captured[2]
    attn2 = [k[:-len(".processor")] for k in tiny_pipe.unet.attn_processors if k.endswith("attn2.processor")]
    assert sorted(cap.layers) == sorted(attn2) == sorted(cross_attention_layers(tiny_pipe.unet))
    assert all(layer.endswith("attn2") for _, layer in cap.maps)
    assert {layer for _, layer in cap.maps} == set(attn2)


def test_calls_equal_denoiser_calls_and_rows_are_cond(captured):
    cap = captured[2]
    assert cap.n_calls == STEPS and cap.mass.shape == (STEPS, len(PROMPTS), 77)
    assert cap.row_labels == [["uncond:0", "uncond:1", "cond:0", "cond:1"]] * STEPS
    assert cap.cond_row == [[2, 3]] * STEPS and all(cap.complete)


def test_class_mass_sums_to_one(tiny_pipe, captured):
    cap = captured[2]
    infos = [analyze_prompt(tiny_pipe.tokenizer, p) for p in PROMPTS]
    cm = cap.class_mass(infos)
    assert set(cm) == set(TOKEN_CLASSES) and cm["sos"].shape == (STEPS, len(PROMPTS))
    total = sum(cm.values())
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)
    assert torch.allclose(cap.mass.sum(-1), torch.ones(STEPS, len(PROMPTS)), atol=1e-5)
    assert (cm["semantic"] > 0).all() and (cm["pad"] == 0).all()  # EOS padding: no "pad" class


def test_maps_convergence_and_words(tiny_pipe, captured):
    cap = captured[2]
    tm = cap.token_maps(STEPS - 1)
    assert tm.shape == (len(PROMPTS), 77, 8, 8) and torch.isfinite(tm).all()
    f1 = cap.convergence([1, 2])
    assert f1.shape == (STEPS, len(PROMPTS))
    assert torch.equal(f1[-1], torch.ones(len(PROMPTS)))
    assert ((f1 >= 0) & (f1 <= 1)).all()
    info = analyze_prompt(tiny_pipe.tokenizer, PROMPTS[0])
    wm = cap.word_maps(0, 0, info)
    assert list(wm) == info.words and wm["red"].shape == (8, 8)
    assert torch.allclose(wm["red"], cap.token_maps(0)[0, info.word_positions(1)].mean(0))
    kl = cap.kl_to_uniform(0)
    assert kl.shape == (len(PROMPTS), 77) and (kl >= -1e-6).all()


def test_kl_and_f1_closed_forms():
    uniform = torch.full((2, 3, 16), 0.25)
    assert torch.allclose(kl_to_uniform(uniform), torch.zeros(2, 3), atol=1e-7)
    peak = torch.zeros(1, 16)
    peak[0, 5] = 3.0
    assert torch.allclose(kl_to_uniform(peak), torch.tensor([math.log(16)]))
    a = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[1, 0, 1, 0]], dtype=torch.bool)
    assert torch.allclose(binary_f1(a, b), torch.tensor([0.5])) and binary_f1(a, a).item() == 1.0
    # the capture method on a synthetic capture: one layer, 4x4, uniform map for token 0
    cap = AttentionCapture(keep="mean")
    cap.layers, cap.spatial, cap.n_calls, cap.n_images = ["x.attn2"], {"x.attn2": (4, 4)}, 1, 1
    m = torch.zeros(1, 16, 2)
    m[0, :, 0] = 1 / 16
    m[0, 7, 1] = 1.0
    cap.maps[(0, "x.attn2")] = m
    assert torch.allclose(cap.kl_to_uniform(0), torch.tensor([[0.0, math.log(16)]]), atol=1e-6)


def test_probabilities_match_a_hand_computation(tiny_pipe):
    layer = cross_attention_layers(tiny_pipe.unet)[0]
    attn = tiny_pipe.unet.get_submodule(layer)
    seen = []

    def grab(module, args, kwargs):
        if not seen:
            seen.append((args[0].clone(), kwargs["encoder_hidden_states"].clone()))

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with capture_attention(tiny_pipe, layers=[layer], calls=[0]) as cap:
            generate(tiny_pipe, PROMPTS, steps=2)
    finally:
        handle.remove()
    hs, ctx = seen[0]
    b, heads = hs.shape[0], attn.heads
    with torch.no_grad():
        q = attn.to_q(hs).view(b, -1, heads, attn.to_q.out_features // heads).transpose(1, 2)
        k = attn.to_k(ctx).view(b, -1, heads, attn.to_k.out_features // heads).transpose(1, 2)
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    expect = p[b // 2:].mean(1)  # cond rows, head mean
    assert cap.layers == [layer] and set(cap.maps) == {(0, layer)}
    assert torch.allclose(cap.maps[(0, layer)], expect, atol=1e-6)
    assert cap.n_calls == 2 and cap.mass.shape[0] == 2  # mass for every call, maps for call 0 only


def test_processors_restored_after_exit_and_after_an_exception(tiny_pipe):
    unet = tiny_pipe.unet
    before = dict(unet.attn_processors)
    with capture_attention(tiny_pipe) as cap:
        inside = unet.attn_processors
        changed = [k for k in before if inside[k] is not before[k]]
        assert sorted(changed) == sorted(f"{n}.processor" for n in cap.layers)
    after = unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_attention(tiny_pipe):
            generate(tiny_pipe, PROMPTS[:1], steps=1)
            raise RuntimeError("boom")
    after = unet.attn_processors
    assert all(after[k] is before[k] for k in before)
    assert not unet._forward_pre_hooks  # the call counter is gone too


def test_keep_none_stores_only_mass(tiny_pipe):
    with capture_attention(tiny_pipe, keep="none") as cap:
        generate(tiny_pipe, PROMPTS, steps=STEPS)
    assert cap.maps == {} and cap.n_calls == STEPS
    assert torch.allclose(cap.mass.sum(-1), torch.ones(STEPS, len(PROMPTS)), atol=1e-5)
    with pytest.raises(ShapefirstError):
        cap.token_maps(0)


def test_guidance_stop_flags_calls_without_cond_rows(tiny_pipe):
    with capture_attention(tiny_pipe) as cap:
        generate(tiny_pipe, PROMPTS, GuidanceSchedule(stop_step=2, after="uncond"), steps=STEPS)
    assert cap.complete == [True, True, False, False]
    assert cap.row_labels[2] == ["uncond:0", "uncond:1"] and cap.cond_row[2] == [-1, -1]
    assert torch.isnan(cap.mass[2:]).all() and torch.isfinite(cap.mass[:2]).all()
    assert torch.allclose(cap.row_mass[3].sum(-1), torch.ones(2), atol=1e-5)  # what ran is still recorded
    with capture_attention(tiny_pipe, rows="cond") as cap:
        generate(tiny_pipe, PROMPTS[:1], GuidanceSchedule(stop_step=1, after="cond"), steps=STEPS)
    assert all(cap.complete) and cap.cond_row == [[1], [0], [0], [0]]


def test_save_load_roundtrip(tmp_path, captured):
    cap = captured[2]
    cap.save(tmp_path / "att")
    back = AttentionCapture.load(tmp_path / "att")
    assert back.layers == cap.layers and back.spatial == cap.spatial and back.n_calls == cap.n_calls
    assert torch.equal(back.mass, cap.mass) and back.cond_row == cap.cond_row
    assert torch.equal(back.token_maps(1), cap.token_maps(1))
    with pytest.raises(ShapefirstError):
        AttentionCapture.load(tmp_path / "missing")


def test_bad_arguments(tiny_pipe):
    with pytest.raises(ShapefirstError):
        with capture_attention(tiny_pipe, layers=["down_blocks.0.attentions.0.transformer_blocks.0.attn1"]):
            pass
    with pytest.raises(ShapefirstError):
        with capture_attention(tiny_pipe, keep="all"):
            pass


def test_convergence_title_follows_the_measured_call():
    from shapefirst.experiments.attention import convergence_title

    assert convergence_title(44, 50) == "Word maps converge late: relative F1 >= 0.9 from call 44 of 50"
    assert convergence_title(10, 50).startswith("Word maps converge early")
    assert "never" in convergence_title(None, 50)
