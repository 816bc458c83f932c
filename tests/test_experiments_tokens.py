import shutil

import numpy as np
import pytest
import torch

from shapefirst.errors import ShapefirstError
from shapefirst.experiments.eos_swap import (EosSwitch, encode_prompts, eos_switch, generate_embeds, generate_swaps,
                                             generate_switch, plot_eos_swap, run_eos_swap, swapped)
from shapefirst.experiments.token_ablation import (KVState, KVSubstituteProcessor, kv_substitution,
                                                   plot_token_ablation, run_token_ablation, variant_embedding)
from shapefirst.generate import count_calls, generate
from shapefirst.prompts import PAIR_KINDS, read_pairs, read_prompts, world_pairs
from shapefirst.results import Result
from shapefirst.tokens import analyze_prompt
from shapefirst.world.render import ATTRIBUTES

STEPS = 3


# -- prompt and pair files ------------------------------------------------------------------
def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return p


def test_read_prompts_skips_blank_and_comment_lines(tmp_path):
    p = _write(tmp_path, "p.txt", "\ufeff# header\n\n"
                                  "  a red circle  \n   # indented comment\na cat # not a comment\n\n")
    assert read_prompts(p) == ["a red circle", "a cat # not a comment"]


def test_read_prompts_errors(tmp_path):
    with pytest.raises(ShapefirstError, match="does not exist"):
        read_prompts(tmp_path / "nope.txt")
    bad = _write(tmp_path, "bad.txt", b"a red circle\nok line\nbad \xff byte\n")
    with pytest.raises(ShapefirstError) as e:
        read_prompts(bad)
    msg = str(e.value)
    assert f"{bad}:3:" in msg and "not UTF-8" in msg and "UTF-8" in e.value.fix and "\n" not in msg
    empty = _write(tmp_path, "empty.txt", "# only a comment\n\n   \n")
    with pytest.raises(ShapefirstError, match="holds no prompts"):
        read_prompts(empty)
    with pytest.raises(ShapefirstError, match="holds no prompts"):
        read_prompts(_write(tmp_path, "zero.txt", b""))


def test_read_pairs_ok(tmp_path):
    p = _write(tmp_path, "pairs.txt", "# A || B\n\na red circle || a blue square\n  x||y  \n")
    assert read_pairs(p) == [("a red circle", "a blue square"), ("x", "y")]


@pytest.mark.parametrize("line,needle", [
    ("a red circle | a blue square", "has no `||`"),
    ("a || b || c", "has 2 `||`"),
    ("   || a blue square", "left (A) side"),
    ("a red circle ||   ", "right (B) side"),
])
def test_read_pairs_errors_name_line(tmp_path, line, needle):
    p = _write(tmp_path, "pairs.txt", f"# comment\na || b\n\n{line}\nc || d\n")
    with pytest.raises(ShapefirstError) as e:
        read_pairs(p)
    msg = str(e.value)
    assert needle in msg and f"{p}:4:" in msg and "\n" not in msg and e.value.fix


def test_read_pairs_empty_missing_and_non_utf8(tmp_path):
    with pytest.raises(ShapefirstError, match="holds no pairs"):
        read_pairs(_write(tmp_path, "e.txt", "# nothing\n"))
    with pytest.raises(ShapefirstError, match="does not exist"):
        read_pairs(tmp_path / "missing.txt")
    with pytest.raises(ShapefirstError, match=r"n\.txt:2: pair file is not UTF-8"):
        read_pairs(_write(tmp_path, "n.txt", b"a || b\n\xe9t\xe9 || c\n"))


# -- world pairs ----------------------------------------------------------------------------
def test_world_pairs_differ_in_exactly_their_kind(tiny_pipe):
    kinds = tuple(PAIR_KINDS)
    pairs = world_pairs(24, seed=3, kinds=kinds)
    assert pairs == world_pairs(24, seed=3, kinds=kinds)
    assert pairs != world_pairs(24, seed=4, kinds=kinds)
    assert [p["kind"] for p in pairs[:len(kinds)]] == list(kinds)
    for p in pairs:
        diff = {a for a in ATTRIBUTES if p["labels_a"][a] != p["labels_b"][a]}
        assert diff == set(PAIR_KINDS[p["kind"]]), p
        ia, ib = analyze_prompt(tiny_pipe.tokenizer, p["a"]), analyze_prompt(tiny_pipe.tokenizer, p["b"])
        assert ia.n_semantic == ib.n_semantic and ia.eos_index == ib.eos_index, p
        assert p["a"] != p["b"]
    with pytest.raises(ShapefirstError, match="unknown pair kinds"):
        world_pairs(3, kinds=("shape", "smell"))


# -- [EOS] swap and switch --------------------------------------------------------------------
A1, A2 = "a large red plain circle in the center", "on the left, a small dotted blue square"
B1, B2 = "a small green striped triangle at the top", "on the right, a large plain yellow cross"


def test_eos_swap_with_a_equal_b_is_plain_generation(tiny_pipe):
    imgs = generate_swaps(tiny_pipe, [(A1, A1), (A2, A2)], steps=STEPS, seed=5, batch=2)
    plain = generate(tiny_pipe, [A1, A2], steps=STEPS, seed=5).images
    for c in ("a", "b", "swap", "reverse"):
        assert np.array_equal(imgs[c], plain), c


def test_switch_never_is_plain_a_and_zero_is_full_swap(tiny_pipe):
    pairs = [(A1, B1), (A2, B2)]
    n_calls = count_calls(tiny_pipe, STEPS)
    ref = generate_swaps(tiny_pipe, pairs, steps=STEPS, seed=1, batch=2)
    assert not np.array_equal(ref["swap"], ref["a"])  # the swap changes the image at all
    never = generate_switch(tiny_pipe, pairs, n_calls, steps=STEPS, seed=1, batch=2)
    assert np.array_equal(never, ref["a"])
    first = generate_switch(tiny_pipe, pairs, 0, steps=STEPS, seed=1, batch=2)
    assert np.array_equal(first, ref["swap"])
    mid = generate_switch(tiny_pipe, pairs, 1, steps=STEPS, seed=1, batch=2)
    assert not np.array_equal(mid, ref["a"]) and not np.array_equal(mid, ref["swap"])


def test_switch_hook_counts_calls_and_replaces_only_cond_rows(tiny_pipe):
    cond, uncond = encode_prompts(tiny_pipe, [A1])
    other, _ = encode_prompts(tiny_pipe, [B1])
    seen = []
    with eos_switch(tiny_pipe, other, 2) as hook:
        # registered after the switch hook, so it sees what the switch passes on (pre-hooks run in order)
        spy = tiny_pipe.unet.register_forward_pre_hook(
            lambda m, a, k: seen.append(k["encoder_hidden_states"].clone()), with_kwargs=True)
        try:
            generate_embeds(tiny_pipe, cond, uncond, STEPS, 0)
        finally:
            spy.remove()
    assert hook.call == count_calls(tiny_pipe, STEPS) == len(seen) == 3 and hook.switched == 1
    assert all(torch.equal(s[0], uncond[0]) for s in seen)
    assert torch.equal(seen[0][1], cond[0]) and torch.equal(seen[1][1], cond[0]) and torch.equal(seen[2][1], other[0])
    assert not tiny_pipe.unet._forward_pre_hooks  # removed on exit
    with pytest.raises(ShapefirstError, match="rows"):
        EosSwitch(other, 0)(tiny_pipe.unet, (), {"encoder_hidden_states": torch.cat([uncond, cond, cond])})


# -- K/V substitution ---------------------------------------------------------------------------
def _hand_attention(attn, x, ctx_k, ctx_v):
    heads = attn.heads
    q, k, v = attn.to_q(x), attn.to_k(ctx_k), attn.to_v(ctx_v)
    b, p, inner = q.shape
    d = inner // heads
    q = q.view(b, p, heads, d).transpose(1, 2)
    k = k.view(b, -1, heads, d).transpose(1, 2)
    v = v.view(b, -1, heads, d).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1)
    o = (probs @ v).transpose(1, 2).reshape(b, p, inner)
    return attn.to_out[0](o)


def test_kv_processor_matches_hand_computation():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4).eval()
    x, ctx, alt = torch.randn(2, 5, 8), torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    state = KVState()
    attn.set_processor(KVSubstituteProcessor(AttnProcessor2_0(), state))
    with torch.no_grad():
        normal = attn(x, encoder_hidden_states=ctx)
        assert torch.allclose(normal, _hand_attention(attn, x, ctx, ctx), atol=1e-6)
        state.set(alt, "keys")
        k_only = attn(x, encoder_hidden_states=ctx)
        assert torch.allclose(k_only, _hand_attention(attn, x, alt, ctx), atol=1e-6)
        state.set(alt, "values")
        v_only = attn(x, encoder_hidden_states=ctx)
        assert torch.allclose(v_only, _hand_attention(attn, x, ctx, alt), atol=1e-6)
        state.set(alt, "both")
        assert torch.allclose(attn(x, encoder_hidden_states=ctx), _hand_attention(attn, x, alt, alt), atol=1e-6)
        assert not torch.allclose(k_only, normal, atol=1e-3) and not torch.allclose(v_only, normal, atol=1e-3)
        state.set(ctx, "keys")  # alternative == original: bit-identical to AttnProcessor2_0
        assert torch.equal(attn(x, encoder_hidden_states=ctx), normal)
        # CFG batch [uncond, cond]: only the second half gets the alternative
        state.set(alt, "values")
        both_rows = attn(torch.cat([x, x]), encoder_hidden_states=torch.cat([ctx, ctx]))
        assert torch.allclose(both_rows[:2], normal, atol=1e-6)
        assert torch.allclose(both_rows[2:], v_only, atol=1e-6)
        with pytest.raises(ShapefirstError, match="K/V substitution mode"):
            state.set(alt, "queries")


def test_kv_substitution_on_pipeline(tiny_pipe):
    prompts = [A1, B1]
    cond, uncond = encode_prompts(tiny_pipe, prompts)
    plain = generate_embeds(tiny_pipe, cond, uncond, STEPS, 0)
    for mode in ("keys", "values", "both"):
        with kv_substitution(tiny_pipe) as st:
            st.set(cond, mode)
            same = generate_embeds(tiny_pipe, cond, uncond, STEPS, 0)
            assert st.substituted > 0
        assert np.array_equal(same, plain), mode  # documented: bit-identical to AttnProcessor2_0 (brief: <= 1e-5)
    infos = [analyze_prompt(tiny_pipe.tokenizer, p) for p in prompts]
    alt = swapped(cond, infos, cond[[1, 0]], infos[::-1])
    ref = generate_embeds(tiny_pipe, alt, uncond, STEPS, 0)
    with kv_substitution(tiny_pipe) as st:
        st.set(alt, "both")
        both = generate_embeds(tiny_pipe, cond, uncond, STEPS, 0)
        st.set(alt, "keys")
        keys = generate_embeds(tiny_pipe, cond, uncond, STEPS, 0)
    assert np.abs(both - ref).max() <= 1e-5
    assert not np.allclose(keys, plain, atol=1e-4)


def test_kv_substitution_restores_processors_after_exception(tiny_pipe):
    unet = tiny_pipe.unet
    before = dict(unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with kv_substitution(tiny_pipe) as st:
            during = unet.attn_processors
            assert all(isinstance(v, KVSubstituteProcessor) == k.endswith("attn2.processor")
                       for k, v in during.items())
            st.set(torch.zeros(1, 77, 32), "keys")
            raise RuntimeError("boom")
    after = unet.attn_processors
    assert st.alt is None
    assert set(after) == set(before) and all(after[k] is before[k] for k in before)


def test_variant_embeddings(tiny_pipe):
    cond, _ = encode_prompts(tiny_pipe, [A1])
    info = analyze_prompt(tiny_pipe.tokenizer, A1)
    e = info.eos_index
    k2 = variant_embedding("keep_eos_2", cond, info)
    assert torch.equal(k2[:, :e + 2], cond[:, :e + 2]) and k2[:, e + 2:].abs().sum() == 0
    assert torch.equal(variant_embedding("keep_eos_all", cond, info), cond)
    sos = variant_embedding("sos_only", cond, info)
    assert torch.equal(sos[:, 0], cond[:, 0]) and sos[:, 1:].abs().sum() == 0
    eo = variant_embedding("eos_only", cond, info)
    assert eo[:, 1:e].abs().sum() == 0 and torch.equal(eo[:, e:], cond[:, e:]) and torch.equal(eo[:, 0], cond[:, 0])
    nz = variant_embedding("eos_noise", cond, info, torch.Generator().manual_seed(0))
    assert torch.allclose(nz[:, e:].norm(dim=-1), cond[:, e:].norm(dim=-1), rtol=1e-4)
    assert not torch.allclose(nz[:, e:], cond[:, e:]) and torch.equal(nz[:, :e], cond[:, :e])


# -- smoke runs -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory, tiny_folder):
    from transformers import CLIPConfig, CLIPModel

    from shapefirst.metrics import Clip

    root = tmp_path_factory.mktemp("clip")
    shutil.copytree(tiny_folder / "tokenizer", root / "tokenizer")
    torch.manual_seed(0)
    from shapefirst.world.vocab import load_tokenizer

    n_vocab = len(load_tokenizer(root / "tokenizer"))
    cfg = CLIPConfig(text_config={"vocab_size": n_vocab, "hidden_size": 16, "intermediate_size": 32,
                                  "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "max_position_embeddings": 77},
                     vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
                     projection_dim=8)
    CLIPModel(cfg).save_pretrained(root / "clip")
    return Clip.load(root / "clip")


def test_run_eos_swap_smoke(tiny_pipe, tiny_clip, tmp_path):
    pairs = world_pairs(2, seed=0, kinds=("shape", "both"))
    res = run_eos_swap(tiny_pipe, pairs, steps=STEPS, seed=0, batch=2, clip=tiny_clip)
    res.save(tmp_path / "r")
    back = Result.load(tmp_path / "r")
    assert back.kind == "eos_swap" and "swap_eos" in back.data["rule"]
    assert back.data["switch"]["calls"] == [0, 1, 2, 3] and len(back.data["switch"]["per_call"]) == 4
    assert set(back.data["scores"]["swap"]) == {"shape", "color"}
    s = back.data["scores"]["swap"]["shape"]
    assert s["n"] == 2 and 0 <= s["a"]["rate"] <= 1 and len(s["b"]["ci"]) == 2
    assert back.data["scores"]["follows"]["color"]["n"] == 2  # one "both" pair, two directions
    assert set(back.data["clip"]) == {"a", "b", "swap", "reverse"}
    assert back.arrays["images_swap"].shape == (2, 16, 16, 3) and back.arrays["images_swap"].dtype == torch.uint8
    assert back.arrays["switch_images"].shape == (4, 2, 16, 16, 3)
    # a = number of calls is plain A, a = 0 the full swap (also through the stored images)
    assert torch.equal(back.arrays["switch_images"][-1], back.arrays["images_a"])
    assert torch.equal(back.arrays["switch_images"][0], back.arrays["images_swap"])
    paths = plot_eos_swap(back, tmp_path / "fig")
    assert {p.name for p in paths} == {"eos_swap_shares.png", "eos_swap_switch.png", "eos_swap_grid.png"}
    assert all(p.stat().st_size > 0 for p in paths)


def test_run_token_ablation_smoke(tiny_pipe, tiny_clip, tmp_path):
    pairs = world_pairs(2, seed=1)
    prompts, targets = [p["a"] for p in pairs], [p["labels_a"] for p in pairs]
    res = run_token_ablation(tiny_pipe, prompts, targets=targets, steps=STEPS, n_eos=(0, 2, "all"), clip=tiny_clip)
    res.save(tmp_path / "t")
    back = Result.load(tmp_path / "t")
    names = back.data["variants"]
    assert back.kind == "token_ablation"
    assert names[:4] == ["plain", "keep_eos_0", "keep_eos_2", "keep_eos_all"]
    assert {"semantic_zero", "semantic_noise", "eos_zero", "eos_noise", "sos_only", "eos_only",
            "eos_sub_keys", "eos_sub_values", "eos_sub_both"} <= set(names)
    assert back.data["identical_to"] == {"keep_eos_all": "plain"}
    sc = back.data["scores"]
    assert sc["plain"]["l1_to_plain"]["mean"] == 0 and sc["keep_eos_0"]["l1_to_plain"]["mean"] > 0
    assert set(sc["plain"]["judged"]) == set(ATTRIBUTES) | {"all"} and "clip" in sc["plain"]
    assert set(sc["plain"]["kl_to_uniform"]["0"]) == {"sos", "semantic", "eos_block"}
    assert "kl_to_uniform" not in sc["eos_sub_keys"]
    assert back.arrays["images"].shape == (len(names), 2, 16, 16, 3)
    paths = plot_token_ablation(back, tmp_path / "fig")
    assert len(paths) == 3 and all(p.exists() for p in paths)
