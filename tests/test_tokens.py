import json

import pytest
import torch

from shapefirst.errors import ShapefirstError
from shapefirst.interventions import keep_first_eos, replace_class
from shapefirst.tokens import (EOS, EOS_PAD, PAD, SEMANTIC, SOS, TOKEN_CLASSES, TokenInfo, analyze_prompt,
                               class_positions, classify_ids, swap_eos)
from shapefirst.world.vocab import load_tokenizer, write_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(write_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def tok_bang(tmp_path_factory):
    return load_tokenizer(write_tokenizer(tmp_path_factory.mktemp("tok_bang"), pad_token="!"))


def test_token_classes_constant():
    assert TOKEN_CLASSES == ("sos", "semantic", "eos", "eos_pad", "pad", "template")


def test_eos_padding_classes(tok):
    info = analyze_prompt(tok, "a red circle")
    assert tok.pad_token_id == tok.eos_token_id
    assert len(info.ids) == tok.model_max_length == 77
    assert info.ids[0] == tok.bos_token_id and info.classes[0] == SOS
    assert info.classes[1:4] == [SEMANTIC] * 3 and info.n_semantic == 3
    assert info.eos_index == 4 and info.classes[4] == EOS and info.ids[4] == tok.eos_token_id
    assert info.classes[5:] == [EOS_PAD] * 72
    assert PAD not in info.classes
    assert not info.truncated and info.dropped_text == ""
    pos = class_positions(info)
    assert set(pos) == set(TOKEN_CLASSES)
    assert pos[SOS] == [0] and pos[SEMANTIC] == [1, 2, 3] and pos[EOS] == [4] and pos[PAD] == []
    assert pos[EOS_PAD] == list(range(5, 77))
    mask = info.class_mask(EOS_PAD)
    assert mask.dtype == torch.bool and mask.shape == (77,) and int(mask.sum()) == 72 and not mask[4]
    json.dumps(info.to_dict())


def test_bang_padding_classes(tok_bang):
    info = analyze_prompt(tok_bang, "a red circle!")
    assert tok_bang.pad_token_id != tok_bang.eos_token_id
    # a "!" in the text (same id as the padding here) is still a semantic token: it precedes the EOS
    assert info.classes[:6] == [SOS] + [SEMANTIC] * 4 + [EOS]
    assert info.eos_index == 5 and info.ids[5] == tok_bang.eos_token_id
    assert info.classes[6:] == [PAD] * 71
    assert all(i == tok_bang.pad_token_id for i in info.ids[6:])
    assert info.classes.count(EOS) == 1 and EOS_PAD not in info.classes


def test_t5_style_ids_without_bos():
    eos, pad = 1, 0
    assert classify_ids([5, 6, 7, eos, pad, pad], None, eos, pad) == [SEMANTIC] * 3 + [EOS, PAD, PAD]
    # an id equal to a would-be BOS is semantic when the tokenizer has none
    assert classify_ids([9, eos, pad], None, eos, pad) == [SEMANTIC, EOS, PAD]
    # truncated without an EOS: everything (after sos) is semantic
    assert classify_ids([5, 6, 7], None, eos, pad) == [SEMANTIC] * 3
    assert classify_ids([9, 5, 6], 9, eos, pad) == [SOS, SEMANTIC, SEMANTIC]
    assert classify_ids([9, 5, eos, eos, eos], 9, eos, eos) == [SOS, SEMANTIC, EOS, EOS_PAD, EOS_PAD]


def test_prompt_exactly_filling_and_beyond_max_length(tok):
    exact = analyze_prompt(tok, " ".join(["a"] * 75))
    assert not exact.truncated and exact.dropped_text == ""
    assert exact.n_semantic == 75 and exact.eos_index == 76 and exact.classes[-1] == EOS
    assert EOS_PAD not in exact.classes

    long = analyze_prompt(tok, " ".join(["a"] * 74) + " red big circle")
    assert long.truncated
    assert long.dropped_text == "big circle"
    assert "red" not in long.dropped_text
    assert len(long.ids) == 77 and long.ids[-1] == tok.eos_token_id and long.classes[-1] == EOS
    assert long.n_semantic == 75 and long.eos_index == 76
    assert long.words[-3:] == ["red", "big", "circle"]
    assert long.word_of_token[75] == 74  # "red" made it in
    assert long.word_positions(74) == [75]
    assert long.word_positions(75) == [] and long.word_positions(76) == []


def test_word_alignment_multi_token_word_and_punctuation(tok):
    info = analyze_prompt(tok, "a Zebra, on the red circle!")
    assert info.words == ["a", "zebra", "on", "the", "red", "circle"]
    assert info.tokens[2:7] == ["z", "e", "b", "r", "a</w>"]  # zebra is five tokens here
    assert info.word_positions(0) == [1]
    assert info.word_positions(1) == [2, 3, 4, 5, 6]
    assert info.tokens[7] == ",</w>" and info.word_of_token[7] is None
    assert info.word_positions(2) == [8] and info.word_positions(5) == [11]
    assert info.tokens[12] == "!</w>" and info.word_of_token[12] is None
    assert info.word_of_token[0] is None and all(w is None for w in info.word_of_token[13:])


def _info(ids, bos=1, eos=2):
    classes = classify_ids(ids, bos, eos, eos)
    return TokenInfo(prompt="", ids=ids, tokens=[str(i) for i in ids], classes=classes, words=[],
                     word_of_token=[None] * len(ids), truncated=False, dropped_text="",
                     n_semantic=classes.count(SEMANTIC), eos_index=classes.index(EOS))


def _emb(length, prompt_id, batch=1, dim=3):
    values = torch.arange(length, dtype=torch.float32) + 100 * prompt_id
    return values[None, :, None].expand(batch, length, dim).clone()


def test_swap_eos_identity(tok):
    info = analyze_prompt(tok, "a red circle")
    emb = torch.randn(2, 77, 8)
    out = swap_eos(emb, info, emb, info)
    assert torch.equal(out, emb) and out is not emb


def test_swap_eos_different_lengths_follows_rule():
    info_a = _info([1, 5, 6, 7, 2, 2, 2, 2])  # eos at 4
    info_b = _info([1, 9, 2, 2, 2, 2, 2, 2])  # eos at 2
    emb_a, emb_b = _emb(8, 1, batch=2), _emb(8, 2, batch=2)
    a_before, b_before = emb_a.clone(), emb_b.clone()
    out = swap_eos(emb_a, info_a, emb_b, info_b)
    assert out[0, :, 0].tolist() == [100, 101, 102, 103, 202, 203, 204, 205]
    assert torch.equal(out[0], out[1])
    # B's block too short: the remainder repeats B's last position
    out = swap_eos(emb_b, info_b, emb_a, info_a)
    assert out[1, :, 0].tolist() == [200, 201, 104, 105, 106, 107, 107, 107]
    assert torch.equal(emb_a, a_before) and torch.equal(emb_b, b_before)
    # mode="first" moves only the first EOS
    out = swap_eos(emb_a, info_a, emb_b, info_b, mode="first")
    assert out[0, :, 0].tolist() == [100, 101, 102, 103, 202, 105, 106, 107]
    with pytest.raises(ShapefirstError):
        swap_eos(emb_a, info_a, emb_b, info_b, mode="nope")


def test_keep_first_eos_zeroes_after_eos_plus_n(tok):
    info = analyze_prompt(tok, "a red circle")
    emb = torch.randn(2, 77, 4) + 5
    before = emb.clone()
    out = keep_first_eos(emb, info, 3)
    cut = info.eos_index + 3
    assert torch.equal(out[:, :cut], emb[:, :cut])
    assert torch.all(out[:, cut:] == 0) and torch.all(out[:, :cut] != 0)
    assert torch.equal(emb, before)
    assert torch.all(keep_first_eos(emb, info, 0)[:, info.eos_index:] == 0)
    ref = torch.randn(1, 77, 4)
    out = keep_first_eos(emb, info, 1, fill="pad_of", pad_of=ref)
    assert torch.equal(out[:, :cut - 2], emb[:, :cut - 2])
    assert torch.equal(out[1, cut - 2:], ref[0, cut - 2:])


def test_replace_class_noise_keeps_norms_and_others(tok):
    info = analyze_prompt(tok, "a zebra on the red circle")
    emb = torch.randn(2, 77, 16)
    before = emb.clone()
    gen = torch.Generator().manual_seed(0)
    out = replace_class(emb, info, {SEMANTIC, EOS}, how="noise", generator=gen)
    mask = info.class_mask(SEMANTIC) | info.class_mask(EOS)
    assert torch.allclose(out[:, mask].norm(dim=-1), emb[:, mask].norm(dim=-1), atol=1e-5)
    assert not torch.allclose(out[:, mask], emb[:, mask])
    assert torch.equal(out[:, ~mask], emb[:, ~mask])
    assert torch.equal(emb, before)
    zero = replace_class(emb, info, EOS_PAD)
    assert torch.all(zero[:, info.class_mask(EOS_PAD)] == 0)
    assert torch.equal(zero[:, ~info.class_mask(EOS_PAD)], emb[:, ~info.class_mask(EOS_PAD)])


def test_shape_mismatch_is_an_error(tok):
    info = analyze_prompt(tok, "a red circle")
    with pytest.raises(ShapefirstError):
        replace_class(torch.zeros(1, 10, 4), info, SEMANTIC)
